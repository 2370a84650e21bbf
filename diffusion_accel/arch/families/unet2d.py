"""UNet2DModel: unconditional / class-conditional pixel or latent UNets (DDPM, LDM)."""

from __future__ import annotations

from ..registry import register_adapter
from ._unet import UNetAdapter


@register_adapter
class UNet2DAdapter(UNetAdapter):
    """UNet whose attention blocks are spatial ``Attention`` modules (self-attention only)."""

    family = "unet2d"
    denoiser_classes = ("UNet2DModel",)

    def num_classes(self) -> int | None:
        """``num_class_embeds`` of a UNet with a class embedding table (``class_embed_type`` None); None for
        continuous labels ("timestep", "identity") and unconditional UNets. Without it the default calibration ids
        and ``prompts.for_pipeline`` ran past the table (an IndexError inside torch, until session 51)."""
        config = self.denoiser.config
        count = getattr(config, "num_class_embeds", None)
        return int(count) if getattr(config, "class_embed_type", None) is None and isinstance(count, int) else None
