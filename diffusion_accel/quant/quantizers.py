"""Quantizer math: weight scales (per channel / segment, max or MSE), activation qparams, fake quant.

Weights are symmetric with one scale per (output channel, input segment). A segment is a run of
flattened input columns (``in * kh * kw`` for convs, in-channel-major): one segment = per-channel,
equal segments = group-wise, two unequal ones = split-shortcut halves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .formats import NumberFormat

EPS = 1e-12
MSE_CANDIDATES = torch.linspace(1.0, 0.3, 15).tolist()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity backward)."""
    return x + (torch.round(x) - x).detach() if x.requires_grad else torch.round(x)


def segment_sizes(columns: int, granularity: str, group_size: int, split: int | None = None,
                  unit: int = 1) -> tuple[int, ...]:
    """Column counts of the scale segments of a weight with ``columns`` flattened inputs.

    ``split`` (in channels, times ``unit`` = kh * kw columns each) wins over group-wise. Group-wise
    segments are ``group_size`` columns each, the last one shorter where ``group_size`` does not divide
    ``columns`` (SD 1.5's 320-channel 3x3 convs: 2,880 = 22 x 128 + 64; until session 31 such layers fell
    back to per-channel scales silently); a layer no wider than one group has one segment.
    """
    if split is not None:
        return (split * unit, columns - split * unit)
    if granularity == "group" and columns > group_size:
        full, rest = divmod(columns, group_size)
        return (group_size,) * full + ((rest,) if rest else ())
    return (columns,)


def expand_segments(scale: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """(rows, S) per-segment values -> (rows, sum(sizes)) per-column values (or (rows, 1) if S == 1)."""
    if len(sizes) == 1:
        return scale
    if len(set(sizes)) == 1:
        return scale.repeat_interleave(sizes[0], dim=1)
    # unequal segments (split shortcuts): expanded views concatenated, no repeats tensor to upload and
    # sum on the host (repeat_interleave with a tensor of repeats syncs a GPU per call)
    return torch.cat([scale[:, index:index + 1].expand(-1, size) for index, size in enumerate(sizes)], dim=1)


def _segment_amax(w2d: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """(out, S) absolute max of each row within each segment."""
    if len(set(sizes)) == 1:
        return w2d.reshape(w2d.shape[0], len(sizes), sizes[0]).abs().amax(dim=2)
    return torch.stack([part.abs().amax(dim=1) for part in w2d.split(list(sizes), dim=1)], dim=1)


def weight_scales(w2d: torch.Tensor, fmt: NumberFormat, sizes: Sequence[int], method: str = "max",
                  column_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(out, S) symmetric scales of a flattened weight ``w2d`` (out, columns) by max or a clipping search.

    "mse" minimises each segment's squared weight error; "output_mse" weights column j's error by
    ``column_weights[j]`` (the layer's mean squared input feature, the diagonal of its Hessian), so
    the search minimises the expected output error instead; it needs ``column_weights`` (columns,).
    """
    amax = _segment_amax(w2d.float(), sizes).clamp_min(EPS)
    if method == "max":
        return amax / fmt.qmax
    if method == "output_mse" and (column_weights is None or column_weights.numel() != w2d.shape[1]):
        got = None if column_weights is None else tuple(column_weights.shape)
        raise ValueError(f"weight_scale 'output_mse' needs column_weights of shape ({w2d.shape[1]},); got {got}")
    weights = column_weights.float().reshape(1, -1) if method == "output_mse" else None
    best_scale, best_error = amax / fmt.qmax, None
    for fraction in MSE_CANDIDATES:
        scale = amax * fraction / fmt.qmax
        error = _segment_error(w2d.float(), scale, fmt, sizes, weights)
        best_error = error if best_error is None else best_error
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.minimum(error, best_error)
    return best_scale


def segment_rescaler(fmt: NumberFormat, sizes: Sequence[int], method: str = "max",
                     column_weights: torch.Tensor | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``rescale(current (out, width), segment index) -> (out,)``: one segment's scale by ``method``
    (see ``weight_scales``) from its current weights, for GPTQ's lazy group scales."""
    spans = {index: (start, width) for index, start, width in segment_spans(sizes)}

    def rescale(current: torch.Tensor, index: int) -> torch.Tensor:
        start, width = spans[index]
        weights = None if column_weights is None else column_weights.reshape(-1)[start:start + width]
        return weight_scales(current, fmt, (width,), method, weights)[:, 0]

    return rescale


def _segment_error(w2d: torch.Tensor, scale: torch.Tensor, fmt: NumberFormat,
                   sizes: Sequence[int], column_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(out, S) squared error of fake-quantizing each segment with ``scale``, columns optionally weighted."""
    full = expand_segments(scale, sizes)
    error = (fmt.round(w2d / full) * full - w2d).pow(2)
    if column_weights is not None:
        error = error * column_weights
    if len(sizes) == 1:
        return error.sum(dim=1, keepdim=True)
    return torch.stack([part.sum(dim=1) for part in error.split(list(sizes), dim=1)], dim=1)


def quantize_weight(w2d: torch.Tensor, scale: torch.Tensor, fmt: NumberFormat,
                    sizes: Sequence[int]) -> torch.Tensor:
    """Codes (int8 or fp8) of ``w2d`` (out, columns) under per-segment ``scale`` (out, S)."""
    return fmt.to_codes(w2d.float() / expand_segments(scale.float(), sizes))


def segment_spans(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(segment index, first column, width) of consecutive column segments of ``sizes``."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(index, start, size) for index, (start, size) in enumerate(zip(starts, sizes))]


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 for computing integer codes and their scales: in bfloat16 ``x / scale`` keeps 8
    significant bits, so near 127 it moves in steps of 0.5 and ``round`` picked another int8 code for many
    values (float16: 11 bits). With float32 codes a lowered 320x320 int8 Linear in bf16 is 5.4x closer to
    the same layer computed in float32 and 4% closer to the float layer; no whole-pipeline PSNR effect
    could be shown (benchmarks/ptq_half_precision.py)."""
    return x if x.dtype == torch.float32 else x.float()


def in_float32(fake_quant: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               fmt: NumberFormat) -> torch.Tensor:
    """``fake_quant(x)`` with integer formats computed in float32 (``as_float32``), returned in ``x``'s
    dtype; float formats (fp8) round directly in ``x``'s dtype."""
    if x.dtype == torch.float32 or fmt.is_float:
        return fake_quant(x)
    return fake_quant(x.float()).to(x.dtype)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, high: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, low, high)`` as ``dtype``; ``scale`` is a 0-d tensor in
    ``x``'s dtype, ``zero`` a 0-d tensor holding an integer (four passes over ``x`` and the cast; rounding in
    place saves a temporary: ~13% of the time on a 2×320×32×32 input, same codes)."""
    return (x / scale).round_().add_(zero).clamp_(low, high).to(dtype)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Float weight (out, columns) in ``scale``'s dtype from codes and per-segment scales."""
    return codes.to(scale.dtype) * expand_segments(scale, sizes)


def activation_qparams(lo: float, hi: float, fmt: NumberFormat, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) covering [lo, hi] (widened to include 0); zero_point 0 if symmetric."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric or fmt.is_float:
        return max(max(-lo, hi) / fmt.qmax, EPS), 0
    qmin, qmax = fmt.unsigned_range()
    scale = max((hi - lo) / (qmax - qmin), EPS)
    return scale, int(min(max(round(qmin - lo / scale), qmin), qmax))


def act_grid(fmt: NumberFormat, symmetric: bool) -> tuple[float, float]:
    """(qmin, qmax) code range of an activation quantizer."""
    return (fmt.qmin, fmt.qmax) if symmetric or fmt.is_float else fmt.unsigned_range()


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   fmt: NumberFormat, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize ``x`` with broadcastable ``scale`` / ``zero_point`` (STE when training).

    ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` computed as ``clamp(round(x / s), qmin - z, qmax - z) * s``
    (the same values and gradients, z being an integer): four passes, in place when no gradient is needed.
    """
    if fmt.is_float:
        return fmt.round(x / scale) * scale
    qmin, qmax = act_grid(fmt, symmetric)
    if zero_point.numel() == 1 and zero_point.device.type == "cpu" and not torch.compiler.is_compiling():
        zp = zero_point.item()  # eager CPU: a scalar clamp is ~2x faster than one with tensor bounds (no GPU sync)
    else:
        zp = zero_point.to(x.dtype)
    lo, hi = qmin - zp, qmax - zp
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return torch.clamp(round_ste(x / scale), lo, hi) * scale
    return (x / scale).round_().clamp_(lo, hi).mul_(scale)


def dynamic_qparams(x: torch.Tensor, dim: int, fmt: NumberFormat,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (scale, zero_point) of ``x``, reducing over channel dimension ``dim`` (kept)."""
    lo = x.detach().amin(dim=dim, keepdim=True)
    hi = x.detach().amax(dim=dim, keepdim=True)
    return range_qparams(lo, hi, fmt, symmetric)


def tensor_qparams(x: torch.Tensor, fmt: NumberFormat, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """0-d (scale, zero_point) covering all of ``x`` (one ``aminmax`` pass): dynamic per-tensor."""
    lo, hi = torch.aminmax(x.detach())
    return range_qparams(lo, hi, fmt, symmetric)


def scale_floor(dtype: torch.dtype) -> float:
    """The smallest scale held in ``dtype``: EPS, or float16's smallest normal (6.1e-5), where EPS is 0 and an
    all-zero token (SDXL's zeroed negative-prompt embeddings) made fp8's ``0 / 0`` NaN images. A larger scale
    only lowers ``|x| / scale``, so no value leaves the grid."""
    return max(EPS, torch.finfo(dtype).tiny) if dtype.is_floating_point else EPS


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, fmt: NumberFormat,
                  symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) tensors covering [lo, hi] widened to include 0, as ``activation_qparams``."""
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    floor = scale_floor(lo.dtype)
    if symmetric or fmt.is_float:
        return (torch.maximum(-lo, hi) / fmt.qmax).clamp_min(floor), torch.zeros_like(lo)
    qmin, qmax = fmt.unsigned_range()
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(floor)
    return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] with an even last dim -> uint8 holding two nibbles (low = even column)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 (..., n/2) -> int8 codes (..., n) in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).flatten(-2)
    return torch.where(both > 7, both - 16, both)
