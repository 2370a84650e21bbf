"""Attention matmul quantization: Q, K, V at the activation format and the softmax output unsigned.

``QuantAttnProcessor`` replaces diffusers' standard ``AttnProcessor2_0`` on ``Attention`` modules
(SD/SDXL/DDPM UNets, PixArt, DiT). It computes attention explicitly so the two matmul inputs can
be quantized: Q and K (for Q·Kᵀ), softmax probabilities on an unsigned ``softmax_bits`` grid over
[0, 1] and V (for P·V). Q/K/V use dynamic per-tensor symmetric scales (no calibration needed);
the softmax grid is fixed (scale ``1 / (2**bits - 1)``). Simulation only: no speed-up. Joint
attention (SD3/Flux) uses other processors and is left unchanged (``summary`` says how many).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from ..arch import get_adapter
from .formats import get_format
from .quantizers import dynamic_qparams, fake_quant_act

SUPPORTED_PROCESSORS: tuple[type, ...] = (AttnProcessor2_0,)


def quantize_softmax(probs: torch.Tensor, bits: int) -> torch.Tensor:
    """Round probabilities in [0, 1] onto the unsigned grid of ``2**bits`` levels."""
    levels = 2 ** bits - 1
    return torch.round(probs * levels).clamp(0, levels) / levels


class QuantAttnProcessor:
    """AttnProcessor2_0's computation with quantized Q, K, V and softmax output."""

    def __init__(self, fmt: str, softmax_bits: int, original: Any) -> None:
        self.fmt_name, self.softmax_bits, self.original = fmt, softmax_bits, original

    def _quant(self, x: torch.Tensor) -> torch.Tensor:
        fmt = get_format(self.fmt_name)
        flat = x.reshape(1, -1)
        scale, zero = dynamic_qparams(flat, -1, fmt, symmetric=True)
        return fake_quant_act(x, scale.reshape(()), zero.reshape(()), fmt, True)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """(B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D) with quantized matmul inputs."""
        scores = self._quant(query) @ self._quant(key).transpose(-1, -2) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = quantize_softmax(scores.softmax(dim=-1), self.softmax_bits)
        return probs.to(value.dtype) @ self._quant(value)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = self.attend(query, key, value, attention_mask, head_dim ** -0.5)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def quantizable_attention(pipe: Any) -> tuple[list[str], int]:
    """Names of attention modules whose processor can be replaced, and how many cannot."""
    adapter = get_adapter(pipe)
    names, skipped = [], 0
    for info in adapter.attention():
        module = adapter.module(info.name)
        if isinstance(getattr(module, "processor", None), SUPPORTED_PROCESSORS):
            names.append(info.name)
        else:
            skipped += 1
    return names, skipped


def install_attention(denoiser: nn.Module, names: list[str], fmt: str, softmax_bits: int) -> dict[str, Any]:
    """Set ``QuantAttnProcessor`` on ``names``; returns the processors they had (for rollback)."""
    originals = {}
    for name in names:
        module = denoiser.get_submodule(name)
        originals[name] = module.processor
        module.set_processor(QuantAttnProcessor(fmt, softmax_bits, module.processor))
    return originals


def replaced_attention(denoiser: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` whose processor is no longer a :class:`QuantAttnProcessor`."""
    return [name for name in names if not isinstance(denoiser.get_submodule(name).processor, QuantAttnProcessor)]


def restore_attention(denoiser: nn.Module, originals: dict[str, Any]) -> None:
    """Put the original processors back."""
    for name, processor in originals.items():
        denoiser.get_submodule(name).set_processor(processor)
