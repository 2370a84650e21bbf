"""FluxTransformer2DModel: FLUX.1 (double-stream MMDiT blocks, then single-stream blocks)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..base import AttentionInfo, BlockStreams, FFNInfo, LayerGroup
from ..registry import register_adapter
from ._common import (attention_groups, attention_info, ffn_groups, ffn_info,
                      group, present)
from ._stack import TransformerStackAdapter


def single_block_ffn(name: str, block: nn.Module) -> FFNInfo:
    """The MLP branch of a single-stream block: ``proj_mlp`` -> (columns ``dim:`` of) ``proj_out``.

    ``proj_out`` reads ``cat([attention_output, gelu(proj_mlp(x))])``: its first
    ``proj_out_offset`` input columns are the attention output projection, the rest the MLP.
    """
    hidden = block.proj_mlp.out_features
    offset = block.proj_out.in_features - hidden
    if offset != block.attn.to_q.out_features:
        raise ValueError(f"{name}.proj_out reads {block.proj_out.in_features} features; expected "
                         f"attention {block.attn.to_q.out_features} + mlp {hidden}")
    return FFNInfo(name=name, proj_in=(f"{name}.proj_mlp",), proj_out=f"{name}.proj_out",
                  hidden=hidden, gated=False, proj_out_offset=offset)


@register_adapter
class FluxAdapter(TransformerStackAdapter):
    """Double-stream blocks (joint attention, two FFNs) then single-stream blocks.

    Single-stream block: ``proj_mlp`` and ``attn.to_q/k/v`` read the same normed input (one
    "qkv_mlp" group); ``proj_out`` reads ``cat([attention, mlp])`` (role "attn_mlp_out"), so the
    attention has ``to_out=None`` with ``shared_out="proj_out"`` and the FFN a ``proj_out_offset``.
    """

    family = "flux"
    denoiser_classes = ("FluxTransformer2DModel",)
    embeds_guidance = True
    stacks = (("transformer_blocks", "double_stream"), ("single_transformer_blocks", "single_stream"))
    # Both block kinds take (hidden_states, encoder_hidden_states, temb) and return
    # (encoder_hidden_states, hidden_states); the adaptive norm's first output is the modulated input.
    kind_streams = {
        "double_stream": BlockStreams("hidden_states", "encoder_hidden_states", 1, 0, modulated="norm1"),
        "single_stream": BlockStreams("hidden_states", "encoder_hidden_states", 1, 0, modulated="norm"),
    }

    def block_groups(self, name: str, block: nn.Module, kind: str) -> list[LayerGroup]:
        if kind == "single_stream":
            shared = present(block, name, ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"))
            return (group(block, name, ("norm.linear",), name, "adaln")
                    + [LayerGroup(layers=shared, block=name, role="qkv_mlp")]
                    + group(block, name, ("proj_out",), name, "attn_mlp_out"))
        return (group(block, name, ("norm1.linear", "norm1_context.linear"), name, "adaln")
                + attention_groups(f"{name}.attn", block.attn, name)
                + ffn_groups(f"{name}.ff", block.ff, name)
                + ffn_groups(f"{name}.ff_context", block.ff_context, name))

    def block_attention(self, name: str, block: nn.Module, kind: str) -> list[AttentionInfo]:
        info = attention_info(f"{name}.attn", block.attn)
        if kind == "single_stream":  # projected by the block's proj_out, columns 0:dim
            width = block.attn.to_q.out_features
            info = replace(info, shared_out=f"{name}.proj_out", shared_out_columns=(0, width))
        return [info]

    def block_ffns(self, name: str, block: nn.Module, kind: str) -> list[FFNInfo]:
        if kind == "single_stream":
            return [single_block_ffn(name, block)]
        return [ffn_info(f"{name}.ff", block.ff), ffn_info(f"{name}.ff_context", block.ff_context)]
