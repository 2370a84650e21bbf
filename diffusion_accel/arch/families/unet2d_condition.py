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

    @property
    def embeds_guidance(self) -> bool:  # type: ignore[override]
        """LCM / TCD-style UNets (``time_cond_proj_dim`` set) take the guidance scale as an embedding and run no
        classifier-free guidance batch (the CFG-off calibration warning was false for them until session 52)."""
        return getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None
