"""SD3Transformer2DModel: Stable Diffusion 3 / 3.5 MMDiT (joint attention)."""

from __future__ import annotations

from torch import nn

from ..base import AttentionInfo, BlockStreams, FFNInfo, LayerGroup
from ..registry import register_adapter
from ._common import attention_groups, attention_info, ffn_groups, ffn_info, group
from ._stack import TransformerStackAdapter


@register_adapter
class SD3Adapter(TransformerStackAdapter):
    """Joint blocks: image and context streams attend together (``attn``), each with its own FFN.

    ``norm1.linear`` and ``norm1_context.linear`` both read ``silu(temb)`` (equal values) and form
    one "adaln" group. The last block is ``context_pre_only``: no ``to_add_out`` nor ``ff_context``.
    SD3.5's dual-attention blocks add a second image self-attention ``attn2``.
    """

    family = "sd3"
    denoiser_classes = ("SD3Transformer2DModel",)
    stacks = (("transformer_blocks", "double_stream"),)
    # JointTransformerBlock returns (encoder_hidden_states, hidden_states); the context_pre_only last
    # block returns None for the context. ``norm1`` (AdaLayerNormZero[X]) gives the modulated input.
    kind_streams = {
        "double_stream": BlockStreams("hidden_states", "encoder_hidden_states", 1, 0, modulated="norm1"),
    }

    def block_groups(self, name: str, block: nn.Module, kind: str) -> list[LayerGroup]:
        groups = group(block, name, ("norm1.linear", "norm1_context.linear"), name, "adaln")
        # JointAttnProcessor2_0 projects the context output before the image output.
        groups += attention_groups(f"{name}.attn", block.attn, name, added_first=True)
        if getattr(block, "attn2", None) is not None:
            groups += attention_groups(f"{name}.attn2", block.attn2, name)
        groups += ffn_groups(f"{name}.ff", block.ff, name)
        if block.ff_context is not None:
            groups += ffn_groups(f"{name}.ff_context", block.ff_context, name)
        return groups

    def block_attention(self, name: str, block: nn.Module, kind: str) -> list[AttentionInfo]:
        infos = [attention_info(f"{name}.attn", block.attn)]
        if getattr(block, "attn2", None) is not None:
            infos.append(attention_info(f"{name}.attn2", block.attn2))
        return infos

    def block_ffns(self, name: str, block: nn.Module, kind: str) -> list[FFNInfo]:
        infos = [ffn_info(f"{name}.ff", block.ff)]
        if block.ff_context is not None:
            infos.append(ffn_info(f"{name}.ff_context", block.ff_context))
        return infos
