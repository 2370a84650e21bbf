"""GPTQ weight rounding: integer codes chosen against each layer's calibrated input Hessian.

Columns are rounded one by one to the nearest code of their fixed per-segment scale grid, and each
rounding error (divided by U_ii) is folded into the columns not yet rounded, along the upper
Cholesky factor U of H^-1 (Frantar et al., 2023), the same sweep as OBS pruning
(``prune.obs.obs_column_pass``) with "round" in place of "remove". Hessians are collected over
the calibration trajectory in ``gptq_groups`` sweeps of the float model (more where a group's would
exceed ``hessian_memory_budget``), so only one group's (d x d) accumulators are alive at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..calib import HessianCollector
from ..prune.obs import no_tf32, obs_column_pass, upper_inverse_factor
from ..progress import progress_bar
from ..prune.sequential import MemoryBudget, plan_groups
from .configs import PTQConfig
from .formats import NumberFormat
from .quantizers import expand_segments, quantize_weight, segment_spans

Sweep = Callable[[list[str]], HessianCollector]
Rescale = Callable[[torch.Tensor, int], torch.Tensor]


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's act_order: input columns by decreasing Hessian diagonal (d,), the inputs carrying the most energy
    rounded first, while the most columns remain to absorb their error (ties keep column order)."""
    return torch.sort(torch.diagonal(hessian), descending=True, stable=True).indices


def ordered_inverse_factor(hessian: torch.Tensor, damp: float, act_order: bool
                           ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """(``upper_inverse_factor`` of ``hessian`` with rows and columns in rounding order, that order or None)."""
    order = activation_order(hessian) if act_order else None
    ordered = hessian if order is None else hessian[order][:, order]
    return upper_inverse_factor(ordered, damp), order


def gptq_codes(w2d: torch.Tensor, scale: torch.Tensor, sizes: Sequence[int], fmt: NumberFormat,
               inverse_factor: tuple[torch.Tensor, torch.Tensor], blocksize: int = 128,
               rescale: Rescale | None = None, order: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, d), scales (out, S)) of ``w2d`` (out, d) on a per-segment grid, GPTQ-rounded.

    ``scale`` (out, S) is the grid of the first segment, and of every segment when ``rescale`` is
    None. With ``rescale(current weights (out, width), segment index) -> (out,)``, each later
    segment's scale is chosen when the sweep reaches its first column, from the weights as the
    earlier columns' rounding errors have moved them (GPTQ's lazy group scales; columns past the
    current block lack only that block's pending update; the reference fits a group starting inside a
    block to the weights before that block's updates): a scale fitted to the original weights would clip
    what the compensation pushed past it.
    ``inverse_factor``: ``prune.obs.upper_inverse_factor(H, damp)`` of the layer's input Hessian
    (d, d). Weights of dead inputs (zero Hessian diagonal: no signal in calibration) are rounded to
    nearest: zero there only at the calibration size (a 3x3 conv's off-centre taps on a 1x1 feature
    map see padding), so zeroing them (SparseGPT's rule, ours until session 27) broke larger images.
    ``order`` (d,): round the columns in this order (``activation_order``; ``inverse_factor`` is then of the
    Hessian in that order, ``ordered_inverse_factor``), on static scales only.
    Weights that are exactly zero (pruned) stay zero, their compensation handed on (SparseGPT's joint rule):
    the rounding errors of earlier columns re-filled them, a 2:4 pruned layer lost its pattern.
    """
    if order is not None and rescale is not None:
        raise ValueError("GPTQ's act_order rounds columns out of order: its scales must be static")
    with no_tf32():
        work = w2d.detach().to(torch.float32).clone()
        factor, _ = (t.to(work.device) for t in inverse_factor)
        scale = scale.float().clone()
        grid = expand_segments(scale, sizes).expand_as(work).clone()
        if order is not None:
            order = order.to(work.device)
            work, grid = work[:, order].contiguous(), grid[:, order].contiguous()
        later_starts = {start: (index, width) for index, start, width in segment_spans(sizes) if index > 0}
        pruned = work == 0

        def round_column(block_w: torch.Tensor, block_u: torch.Tensor, start: int, i: int) -> torch.Tensor:
            column = start + i
            if rescale is not None and column in later_starts:
                index, width = later_starts[column]
                inside = block_w[:, i:i + width]
                current = torch.cat([inside, work[:, start + block_w.shape[1]:column + width]], dim=1)
                scale[:, index] = rescale(current, index)
                grid[:, column:column + width] = scale[:, index:index + 1]
            step = grid[:, column]
            return (fmt.round(block_w[:, i] / step) * step).masked_fill(pruned[:, column], 0.0)

        obs_column_pass(work, factor, blocksize, round_column)
        if order is not None:
            work = work[:, torch.argsort(order)]
    return quantize_weight(work, scale, fmt, sizes), scale


def hessian_key(denoiser: nn.Module, name: str, representative: str) -> str:
    """The layer whose collected Hessian ``name`` uses: its input group's representative when that
    layer unfolds its input the same way (same type and weight shape past dim 0), else itself."""
    layer, source = denoiser.get_submodule(name), denoiser.get_submodule(representative)
    same = type(layer) is type(source) and layer.weight.shape[1:] == source.weight.shape[1:] and all(
        getattr(layer, attr, None) == getattr(source, attr, None) for attr in ("stride", "padding", "dilation"))
    return representative if same else name


def gptq_round_all(denoiser: nn.Module, targets: Sequence[Any], config: PTQConfig, sweep: Sweep,
                   grid: Callable[[Any], tuple[torch.Tensor, torch.Tensor, tuple[int, ...], NumberFormat,
                                               Rescale | None]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """(GPTQ codes, scales, segment sizes) of every target (``LayerTarget``), group by group;
    ``grid(target)`` gives its (w2d, initial scales, segment sizes, format, rescale or None; see
    ``gptq_codes``), ``sweep(layer names)`` a collector of their Hessians."""
    keys = {t.name: hessian_key(denoiser, t.name, t.representative) for t in targets}
    rounded: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    budget = MemoryBudget.for_denoiser(denoiser)
    groups = plan_groups(list(targets), config.gptq_groups, lambda target: [keys[target.name]], budget)
    for group in progress_bar(groups, "GPTQ layer groups"):
        collector = sweep(list(dict.fromkeys(keys[t.name] for t in group)))
        users = Counter(keys[t.name] for t in group)
        factors: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]] = {}
        for target in group:
            key = keys[target.name]
            if key not in factors:
                with no_tf32():
                    factors[key] = ordered_inverse_factor(collector.hessian(key), config.gptq_damp,
                                                          config.gptq_act_order)
                collector.free(key)  # the factor replaces it: a group held every Hessian and factor at once
            w2d, scale, sizes, fmt, rescale = grid(target)
            factor, order = factors[key]
            codes, scale = gptq_codes(w2d, scale, sizes, fmt, factor, config.gptq_blocksize, rescale, order)
            rounded[target.name] = codes, scale, sizes
            users[key] -= 1
            if not users[key]:
                del factors[key]
        collector.free()
    return rounded
