"""UNet2DModel: unconditional / class-conditional pixel or latent UNets (DDPM, LDM)."""

from __future__ import annotations

from ..registry import register_adapter
from ._unet import UNetAdapter


@register_adapter
class UNet2DAdapter(UNetAdapter):
    """UNet whose attention blocks are spatial ``Attention`` modules (self-attention only)."""

    family = "unet2d"
    denoiser_classes = ("UNet2DModel",)
