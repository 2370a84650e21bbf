"""PixArtTransformer2DModel: PixArt-alpha/sigma (adaLN-single DiT with cross-attention)."""

from __future__ import annotations

from ..registry import register_adapter
from ._stack import BasicTransformerStackAdapter


@register_adapter
class PixArtAdapter(BasicTransformerStackAdapter):
    """Blocks: self-attention, cross-attention to T5 states, FFN; modulation is a per-block table.

    The shared ``adaln_single`` (timestep embedder and its 6x modulation linear) and the caption
    projection are time/text embeddings: high precision.
    """

    family = "pixart"
    denoiser_classes = ("PixArtTransformer2DModel",)
