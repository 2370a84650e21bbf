"""Shared adapter for transformer denoisers made of block stacks (SD3, Flux, PixArt, DiT).

A subclass names its stacks (``stacks``: (attribute, block kind) in execution order) and describes
one block of each kind; everything outside the stacks (patch/x embedder, time/text/pooled
embedders, ``norm_out``, ``proj_out``) is kept in high precision.
"""

from __future__ import annotations

from abc import abstractmethod

from typing import ClassVar

from torch import nn

from ..base import (AttentionInfo, BlockInfo, BlockStreams, CachePoint, DenoiserAdapter, FFNInfo,
                    LayerGroup)
from ._common import (basic_block_attention, basic_block_groups, basic_block_time_embedding,
                      ffn_info, in_module_order, layers_outside)


class TransformerStackAdapter(DenoiserAdapter):
    """Base for DiT-style denoisers; subclasses implement the ``block_*`` descriptions."""

    component = "transformer"
    stacks: ClassVar[tuple[tuple[str, str], ...]] = (("transformer_blocks", "transformer"),)
    # How each block kind's forward takes and returns its streams (see ``BlockStreams``).
    kind_streams: ClassVar[dict[str, BlockStreams]] = {}
    # The final projection after the stacks (after ``norm_out``), whose output the denoiser returns.
    final_projection: ClassVar[str] = "proj_out"

    # ---- per-block descriptions (subclasses) --------------------------------------------
    @abstractmethod
    def block_groups(self, name: str, block: nn.Module, kind: str) -> list[LayerGroup]:
        """Layer groups of one block, in execution order."""

    @abstractmethod
    def block_attention(self, name: str, block: nn.Module, kind: str) -> list[AttentionInfo]:
        """Attention modules of one block."""

    @abstractmethod
    def block_ffns(self, name: str, block: nn.Module, kind: str) -> list[FFNInfo]:
        """Feed-forward pairs of one block."""

    def block_high_precision(self, name: str, block: nn.Module, kind: str) -> list[str]:
        """Layers inside one block kept in high precision (none by default)."""
        return []

    # ---- queries -----------------------------------------------------------------------
    def blocks(self) -> list[BlockInfo]:
        return [BlockInfo(f"{attr}.{i}", kind) for attr, kind in self.stacks
                for i in range(len(getattr(self.denoiser, attr)))]

    def _each_block(self) -> list[tuple[str, nn.Module, str]]:
        return [(info.name, self.module(info.name), info.kind) for info in self.blocks()]

    def layer_groups(self) -> list[LayerGroup]:
        return [g for name, block, kind in self._each_block()
                for g in self.block_groups(name, block, kind)]

    def attention(self) -> list[AttentionInfo]:
        return [a for name, block, kind in self._each_block()
                for a in self.block_attention(name, block, kind)]

    def ffns(self) -> list[FFNInfo]:
        return [f for name, block, kind in self._each_block() for f in self.block_ffns(name, block, kind)]

    def cache_points(self) -> list[CachePoint]:
        """One ``block_stack`` point per stack, listing its blocks in order."""
        return [CachePoint(kind="block_stack", stack=attr,
                           blocks=tuple(f"{attr}.{i}" for i in range(len(getattr(self.denoiser, attr)))))
                for attr, _ in self.stacks]

    def output_layer(self) -> str | None:
        """``final_projection`` when the denoiser has that module, else None."""
        names = dict(self.denoiser.named_modules())
        return self.final_projection if self.final_projection in names else None

    def block_streams(self, name: str) -> BlockStreams:
        """The stream layout of block ``name``, from its kind (TypeError for a non-block name)."""
        kinds = {info.name: info.kind for info in self.blocks()}
        if name not in kinds or kinds[name] not in self.kind_streams:
            stacks = ", ".join(attr for attr, _ in self.stacks)
            raise TypeError(f"{name!r} is not a transformer block of {type(self.denoiser).__name__} "
                            f"(its blocks are {stacks}.<i>)")
        return self.kind_streams[kinds[name]]

    def high_precision_layers(self) -> list[str]:
        outside = layers_outside(self.denoiser, [attr for attr, _ in self.stacks])
        inside = [n for name, block, kind in self._each_block()
                  for n in self.block_high_precision(name, block, kind)]
        return in_module_order(self.denoiser, outside + inside)


class BasicTransformerStackAdapter(TransformerStackAdapter):
    """Stacks of diffusers ``BasicTransformerBlock`` (PixArt's adaLN-single, DiT's adaLN-zero).

    A block's own timestep/label embedder (DiT's ``norm1.emb``) is time embedding: high precision;
    its modulation linear (``norm1.linear``) is eligible.

    Streams: ``hidden_states`` in, a tensor out; ``encoder_hidden_states`` is only read by
    cross-attention. The modulated input is ``attn1``'s input: adaLN-zero's ``norm1`` output (DiT)
    or ``norm1(x) * (1 + scale) + shift`` computed inline from the shared table (PixArt).
    """

    kind_streams = {"transformer": BlockStreams(modulated="attn1", modulated_from="input")}

    def block_groups(self, name: str, block: nn.Module, kind: str) -> list[LayerGroup]:
        return basic_block_groups(name, block, name)

    def block_attention(self, name: str, block: nn.Module, kind: str) -> list[AttentionInfo]:
        return basic_block_attention(name, block)

    def block_ffns(self, name: str, block: nn.Module, kind: str) -> list[FFNInfo]:
        return [ffn_info(f"{name}.ff", block.ff)]

    def block_high_precision(self, name: str, block: nn.Module, kind: str) -> list[str]:
        return basic_block_time_embedding(name, block)
