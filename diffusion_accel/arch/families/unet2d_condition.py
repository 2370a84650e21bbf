"""UNet2DConditionModel: Stable Diffusion 1.x/2.x and SDXL (cross-attention UNets)."""

from __future__ import annotations

from ..registry import register_adapter
from ._unet import UNetAdapter


@register_adapter
class UNet2DConditionAdapter(UNetAdapter):
    """Text-conditioned UNet: ``Transformer2DModel`` attentions (self + cross, GEGLU FFN).

    SDXL's ``add_embedding`` (text_time) sits outside the blocks and is kept in high precision
    with ``conv_in``, ``time_embedding`` and ``conv_out``.
    """

    family = "unet2d_condition"
    denoiser_classes = ("UNet2DConditionModel",)
