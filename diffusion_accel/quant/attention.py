"""Attention matmul quantization: Q, K, V at the activation format and the softmax output unsigned.

Each diffusers processor we know is replaced by a quantizing one computing the same attention
explicitly, so the two matmul inputs can be quantized: Q and K (for Q·Kᵀ), softmax probabilities on
an unsigned ``softmax_bits`` grid over [0, 1] and V (for P·V):

- ``QuantAttnProcessor`` for the standard ``AttnProcessor2_0`` (SD/SDXL/DDPM UNets, PixArt, DiT);
- ``QuantJointAttnProcessor`` for SD3's ``JointAttnProcessor2_0`` (image tokens, then the context's);
- ``QuantFluxAttnProcessor`` for Flux's ``FluxAttnProcessor`` (context tokens first, rotary
  embeddings, fused projections, the single-stream blocks' output without projection).

Q/K/V use dynamic symmetric scales, one per batch row (no calibration needed); the softmax grid is fixed
(scale ``1 / (2**bits - 1)``). Simulation only: no speed-up. Other processors (IP-Adapter, attention slicing)
are left unchanged (``summary`` says how many; PAG swaps its own in only during calls, which ``summary`` notes).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from ..arch import get_adapter
from .formats import get_format
from .quantizers import dynamic_qparams, fake_quant_act, in_float32, round_ste


def quantize_softmax(probs: torch.Tensor, bits: int) -> torch.Tensor:
    """Round probabilities in [0, 1] onto the unsigned grid of ``2**bits`` levels, in float32 (float16 holds no
    65535: 16 bits failed every float16 call) and returned in ``probs``' dtype. The rounding passes gradients
    straight through, as the Q/K/V fake quantization does (a plain round left Q and K without gradient: block
    reconstruction never moved their AdaRound codes)."""
    levels = 2 ** bits - 1
    return (round_ste(probs.float() * levels).clamp(0, levels) / levels).to(probs.dtype)


class QuantAttentionBase:
    """The quantized attention product shared by the processors; ``original`` is the replaced one."""

    def __init__(self, fmt: str, softmax_bits: int, original: Any) -> None:
        self.fmt_name, self.softmax_bits, self.original = fmt, softmax_bits, original

    def _quant(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic symmetric fake quantization, one scale per batch row (image, CFG half); integer codes computed in
        float32 (``in_float32``)."""
        fmt = get_format(self.fmt_name)
        return in_float32(lambda values: self._fake_quant(values, fmt), x, fmt)

    @staticmethod
    def _fake_quant(x: torch.Tensor, fmt: Any) -> torch.Tensor:
        """``x`` (B, H, L, D) on a grid scaled per batch row: one scale over the whole batch made an image depend on
        the others generated beside it (evaluate's PSNR changed with batch_size) until session 53."""
        scale, zero = dynamic_qparams(x.reshape(x.shape[0], -1), -1, fmt, symmetric=True)
        per_row = (x.shape[0],) + (1,) * (x.ndim - 1)
        return fake_quant_act(x, scale.reshape(per_row), zero.reshape(per_row), fmt, True)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """(B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D) with quantized matmul inputs. Scores and softmax in
        float32 (as an int8 kernel accumulates in int32, and SDPA in float): unscaled Q·Kᵀ of a float16 pipeline
        overflowed to inf where the float model's attention stayed finite (NaN images)."""
        scores = self._quant(query).float() @ self._quant(key).float().transpose(-1, -2) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = quantize_softmax(scores.softmax(dim=-1), self.softmax_bits)
        return probs.to(value.dtype) @ self._quant(value)


class QuantAttnProcessor(QuantAttentionBase):
    """AttnProcessor2_0's computation with quantized Q, K, V and softmax output."""

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


class QuantJointAttnProcessor(QuantAttentionBase):
    """SD3's joint attention (``JointAttnProcessor2_0``) with quantized Q, K, V and softmax output:
    image and context tokens attend together, image tokens first."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        image_tokens = hidden_states.shape[1]
        query, key, value = _heads(attn, ("to_q", "to_k", "to_v"), hidden_states, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:
            context = _heads(attn, ("add_q_proj", "add_k_proj", "add_v_proj"), encoder_hidden_states,
                             attn.norm_added_q, attn.norm_added_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in zip((query, key, value), context))
        out = self.attend(query, key, value, None, query.shape[-1] ** -0.5)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](out)), context_out


def _heads(attn: nn.Module, names: tuple[str, str, str], states: torch.Tensor, norm_q: Any, norm_k: Any) -> tuple:
    """Q, K, V of ``states`` through the projections ``names``, as (B, H, L, D), Q and K normed."""
    batch = states.shape[0]
    query, key, value = (getattr(attn, name)(states) for name in names)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    query = query if norm_q is None else norm_q(query)
    key = key if norm_k is None else norm_k(key)
    return query, key, value


class QuantFluxAttnProcessor(QuantAttentionBase):
    """Flux's attention (``FluxAttnProcessor``) with quantized Q, K, V and softmax output: context tokens
    first, rotary embeddings on Q and K; single-stream blocks return the attention output unprojected."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        query, key, value = _flux_projections(attn, ("to_q", "to_k", "to_v"), "to_qkv", hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            context = _flux_projections(attn, ("add_q_proj", "add_k_proj", "add_v_proj"), "to_added_qkv",
                                        encoder_hidden_states)
            context = (attn.norm_added_q(context[0]), attn.norm_added_k(context[1]), context[2])
            query, key, value = (torch.cat(pair, dim=1) for pair in zip(context, (query, key, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attention_mask is not None and attention_mask.ndim == 2:  # (batch, tokens), as diffusers' native
            attention_mask = attention_mask[:, None, None, :]  # backend reads it (batch > 1 failed until session 41)
        out = self.attend(*(t.transpose(1, 2) for t in (query, key, value)), attention_mask, attn.head_dim ** -0.5)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        context_tokens = encoder_hidden_states.shape[1]
        context_out, out = out.split_with_sizes([context_tokens, out.shape[1] - context_tokens], dim=1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(context_out.contiguous())


def _flux_projections(attn: nn.Module, names: tuple[str, str, str], fused: str, states: torch.Tensor) -> tuple:
    """Q, K, V of ``states`` as (B, L, H, D): separate projections, or the fused one after
    ``fuse_qkv_projections``."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, fused):
        projected = getattr(attn, fused)(states).chunk(3, dim=-1)
    else:
        projected = [getattr(attn, name)(states) for name in names]
    return tuple(t.unflatten(-1, (-1, attn.head_dim)) for t in projected)


# diffusers processor class -> its quantizing replacement (exact classes: a subclass may compute otherwise)
QUANT_PROCESSORS: dict[type, type[QuantAttentionBase]] = {
    AttnProcessor2_0: QuantAttnProcessor,
    JointAttnProcessor2_0: QuantJointAttnProcessor,
    FluxAttnProcessor: QuantFluxAttnProcessor,
}


def quantizable_attention(pipe: Any) -> tuple[list[str], dict[str, int]]:
    """Names of attention modules whose processor can be replaced, and the other processors' class
    names with how many modules use each."""
    adapter = get_adapter(pipe)
    names, others = [], {}
    for info in adapter.attention():
        processor = getattr(adapter.module(info.name), "processor", None)
        if type(processor) in QUANT_PROCESSORS:
            names.append(info.name)
        else:
            others[type(processor).__name__] = others.get(type(processor).__name__, 0) + 1
    unlisted = _unlisted_attention(adapter.denoiser, {info.name for info in adapter.attention()})
    if unlisted:  # GLIGEN's fuser.attn ran in float with no word (until session 49)
        others[f"modules the adapter does not list, e.g. {unlisted[0]!r}"] = len(unlisted)
    return names, others


def _unlisted_attention(denoiser: nn.Module, listed: set[str]) -> list[str]:
    """Names of the denoiser's attention modules (those with a ``processor``) outside ``listed``."""
    return [name for name, module in denoiser.named_modules()
            if name not in listed and hasattr(module, "processor") and hasattr(module, "to_q")]


def describe_processors(counts: dict[str, int]) -> str:
    """"AttnProcessor ×14, PAGIdentitySelfAttnProcessor2_0 ×2" from {class name: modules}."""
    return ", ".join(f"{name} ×{count}" for name, count in counts.items())


def install_attention(denoiser: nn.Module, names: list[str], fmt: str, softmax_bits: int,
                      originals: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set the quantizing processor on ``names``; returns the processors they had (for rollback), recorded into
    ``originals`` as each is swapped (a caller's dict holds them also when the loop is interrupted)."""
    originals = {} if originals is None else originals
    for name in names:
        module = denoiser.get_submodule(name)
        originals[name] = module.processor
        module.set_processor(QUANT_PROCESSORS[type(module.processor)](fmt, softmax_bits, module.processor))
    return originals


def replaced_attention(denoiser: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` whose processor is no longer a quantizing one."""
    return [name for name in names if not isinstance(denoiser.get_submodule(name).processor, QuantAttentionBase)]


def quantizing_processors(model: nn.Module) -> list[str]:
    """Names (as ``attn_processors`` lists them) of ``model``'s attention processors that quantize."""
    processors = getattr(model, "attn_processors", {})
    return [name for name, processor in processors.items() if isinstance(processor, QuantAttentionBase)]


def restore_attention(denoiser: nn.Module, originals: dict[str, Any]) -> None:
    """Put the original processors back."""
    for name, processor in originals.items():
        denoiser.get_submodule(name).set_processor(processor)
