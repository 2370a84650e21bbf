"""GPTQ weight rounding: integer codes chosen against each layer's calibrated input Hessian.

Columns are rounded one by one to the nearest code of their fixed per-segment scale grid, and each
rounding error (divided by U_ii) is folded into the columns not yet rounded, along the upper
Cholesky factor U of H^-1 (Frantar et al., 2023), the same sweep as OBS pruning
(``prune.obs.obs_column_pass``) with "round" in place of "remove". Hessians are collected over
the calibration trajectory in ``gptq_groups`` sweeps of the float model, so only one group's
(d x d) accumulators are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..calib import HessianCollector
from ..prune.obs import no_tf32, obs_column_pass, upper_inverse_factor
from ..prune.sequential import split_into_groups
from .configs import PTQConfig
from .formats import NumberFormat
from .quantizers import expand_segments, quantize_weight

Sweep = Callable[[list[str]], HessianCollector]


def gptq_codes(w2d: torch.Tensor, scale: torch.Tensor, sizes: Sequence[int], fmt: NumberFormat,
               inverse_factor: tuple[torch.Tensor, torch.Tensor], blocksize: int = 128) -> torch.Tensor:
    """Codes (out, d) of ``w2d`` (out, d) on the per-segment grid ``scale`` (out, S), GPTQ-rounded.

    ``inverse_factor``: ``prune.obs.upper_inverse_factor(H, damp)`` of the layer's input Hessian
    (d, d); weights of dead inputs (zero Hessian diagonal) get code 0.
    """
    with no_tf32():
        work = w2d.detach().to(torch.float32).clone()
        factor, dead = (t.to(work.device) for t in inverse_factor)
        work[:, dead] = 0
        grid = expand_segments(scale.float(), sizes).expand_as(work)

        def round_column(block_w: torch.Tensor, block_u: torch.Tensor, start: int, i: int) -> torch.Tensor:
            step = grid[:, start + i]
            return fmt.round(block_w[:, i] / step) * step

        obs_column_pass(work, factor, blocksize, round_column)
    return quantize_weight(work, scale, fmt, sizes)


def hessian_key(denoiser: nn.Module, name: str, representative: str) -> str:
    """The layer whose collected Hessian ``name`` uses: its input group's representative when that
    layer unfolds its input the same way (same type and weight shape past dim 0), else itself."""
    layer, source = denoiser.get_submodule(name), denoiser.get_submodule(representative)
    same = type(layer) is type(source) and layer.weight.shape[1:] == source.weight.shape[1:] and all(
        getattr(layer, attr, None) == getattr(source, attr, None) for attr in ("stride", "padding", "dilation"))
    return representative if same else name


def gptq_round_all(denoiser: nn.Module, targets: Sequence[Any], config: PTQConfig, sweep: Sweep,
                   grid: Callable[[Any], tuple[torch.Tensor, torch.Tensor, tuple[int, ...], NumberFormat]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """(GPTQ codes, scales, segment sizes) of every target (``LayerTarget``), group by group;
    ``grid(target)`` gives its (w2d, scale, segment sizes, format), ``sweep(layer names)`` a
    collector of their Hessians."""
    keys = {t.name: hessian_key(denoiser, t.name, t.representative) for t in targets}
    rounded: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    for group in split_into_groups(list(targets), config.gptq_groups):
        collector = sweep(list(dict.fromkeys(keys[t.name] for t in group)))
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for target in group:
            key = keys[target.name]
            if key not in factors:
                with no_tf32():
                    factors[key] = upper_inverse_factor(collector.hessian(key), config.gptq_damp)
            w2d, scale, sizes, fmt = grid(target)
            codes = gptq_codes(w2d, scale, sizes, fmt, factors[key], config.gptq_blocksize)
            rounded[target.name] = codes, scale, sizes
        collector.free()
    return rounded
