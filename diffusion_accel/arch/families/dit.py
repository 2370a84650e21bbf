"""DiTTransformer2DModel: class-conditional DiT (adaLN-zero)."""

from __future__ import annotations

from ..registry import register_adapter
from ._stack import BasicTransformerStackAdapter


@register_adapter
class DiTAdapter(BasicTransformerStackAdapter):
    """Blocks: adaLN-zero modulation, self-attention, FFN.

    Each block's ``norm1.emb`` (timestep + label embedder) is high precision, as are
    ``proj_out_1`` (final modulation) and ``proj_out_2``.
    """

    family = "dit"
    denoiser_classes = ("DiTTransformer2DModel",)
    final_projection = "proj_out_2"

    def num_classes(self) -> int | None:
        """``num_embeds_ada_norm``: the label embedding's extra null row is CFG's unconditional label, not a class."""
        count = getattr(self.denoiser.config, "num_embeds_ada_norm", None)
        return int(count) if isinstance(count, int) else None
