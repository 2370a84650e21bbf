"""int4 weight-only Linear layers on CUDA through PyTorch's tinygemm kernel (``torch._weight_int4pack_mm``,
what torchao's int4 weight-only tensors call), with bf16 activations.

tinygemm dequantizes ``w = (q - 8) * scale + zero`` per group of ``g`` input columns (g in 32..256), with
bf16 scales and zeros. Our symmetric int4 codes ``c`` in [-8, 7] are ``q = c + 8`` with zero 0, and our
per-segment scales (one per output channel and weight segment: the whole row, groups, or split-shortcut
halves) become per-group scales for the largest ``g`` dividing every segment. So the kernel computes our
codes exactly; only the scales round to bf16 (relative error <= 2**-8 per weight, bf16's unit roundoff).

The packed weight is CUDA-only and rebuilt wherever the layer moves (``StoredWeightLayer._apply``). Each
pack is checked once against the dequantized matmul on a small random input; a mismatch (a kernel or
layout this code was not verified on) leaves the layer on the dequantize path, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .quantizers import expand_segments
from ..stacklevel import user_stacklevel

GROUP_SIZES = (256, 128, 64, 32)  # tinygemm's group sizes, largest first
INNER_K_TILES = (8, 4, 2)
CHECK_ROWS = 8
CHECK_TOLERANCE = 2e-2  # relative to the output's max: bf16 activations, scales and accumulation order


class TinyGemmWeight(NamedTuple):
    """Operands of ``torch._weight_int4pack_mm``: packed weight, (K/g, N, 2) bf16 scales and zeros, g."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int


def group_size_for(segment_sizes: Sequence[int]) -> int | None:
    """The largest tinygemm group size dividing every weight segment, or None."""
    return next((size for size in GROUP_SIZES if all(segment % size == 0 for segment in segment_sizes)), None)


def tinygemm_operands(codes: torch.Tensor, weight_scale: torch.Tensor,
                      segment_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(q (N, K) int32 in [0, 15], scales_and_zeros (K/g, N, 2) bf16, g) of int4 ``codes`` (N, K) with
    per-segment ``weight_scale`` (N, S); None when no tinygemm group size fits the segments."""
    group = group_size_for(segment_sizes)
    if group is None:
        return None
    columns = expand_segments(weight_scale.float(), segment_sizes)  # (N, K), or (N, 1) for one segment
    columns = columns.expand(codes.shape[0], codes.shape[1]) if columns.shape[1] == 1 else columns
    scales = columns[:, ::group]  # one per group: constant within it, as g divides every segment
    scales_and_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1)
    return (codes.to(torch.int32) + 8), scales_and_zeros.to(torch.bfloat16).contiguous(), group


def pack_for_cuda(codes: torch.Tensor, weight_scale: torch.Tensor,
                  segment_sizes: Sequence[int]) -> TinyGemmWeight | None:
    """The tinygemm weight of a CUDA int4 Linear, or None where the kernel does not apply (shape, group
    size, no kernel in this torch build) or its check against the dequantized matmul fails."""
    n, k = codes.shape
    inner = next((tiles for tiles in INNER_K_TILES if k % (tiles * 16) == 0), None)
    operands = tinygemm_operands(codes, weight_scale, segment_sizes)
    if codes.device.type != "cuda" or inner is None or n % 8 or operands is None \
            or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack"):
        return None
    q, scales_and_zeros, group = operands
    nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # even column in the high nibble (tinygemm's order)
    weight = TinyGemmWeight(torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner),
                            scales_and_zeros, group)
    return weight if _matches_dequantized(weight, codes, weight_scale, segment_sizes) else None


def _matches_dequantized(weight: TinyGemmWeight, codes: torch.Tensor, weight_scale: torch.Tensor,
                         segment_sizes: Sequence[int]) -> bool:
    """One small product against ``x @ dequantized.T`` in float32: proves the layout on this GPU / torch."""
    generator = torch.Generator(device=codes.device).manual_seed(0)
    x = torch.randn(CHECK_ROWS, codes.shape[1], device=codes.device, generator=generator).to(torch.bfloat16)
    dense = codes.float() * expand_segments(weight_scale.float(), segment_sizes)
    expected = x.float() @ dense.t()
    got = torch.ops.aten._weight_int4pack_mm(x, weight.packed, weight.group_size, weight.scales_and_zeros)
    error = (got.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
    if error <= CHECK_TOLERANCE:
        return True
    warnings.warn(f"tinygemm int4 check failed (relative error {float(error):.3g}); this layer keeps the "
                  f"dequantize-per-call path", stacklevel=user_stacklevel())
    return False


def tinygemm_linear(x: torch.Tensor, weight: TinyGemmWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of bf16 CUDA ``x`` (..., K) with a tinygemm weight: (..., N) bf16."""
    out = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight.packed,
                                             weight.group_size, weight.scales_and_zeros)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias.to(out.dtype)
