"""Global unstructured sparsity: one target over all pruned layers, split into per-layer sparsities.

Two allocations; either way each layer keeps at least ``1 - MAX_LAYER_SPARSITY`` of its weights,
the layers are then pruned one by one at their own sparsity, and the weight-count-weighted mean of
the per-layer sparsities is the target.

``error`` (default for OBS and Wanda): each layer is pruned by its own method on its real Hessian
at a grid of sparsities, giving a curve of relative output error ``tr(dW H dW^T) / tr(W H W^T)``.
The sparsities minimising the summed error at the global budget are found greedily on the curves'
convex hulls: every removed weight goes where it costs the least error.

``saliency`` (default for magnitude, which reads no data): each weight's share of its layer's
output energy, ``w_ij^2 * E[x_j^2]`` (``w_ij^2`` for magnitude) over the layer's mean. One global
threshold on it decides how much of each layer goes, so layers whose importance is concentrated in
few weights are pruned harder than layers where every weight matters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

MAX_LAYER_SPARSITY = 0.95
ERROR_GRID_STEP = 0.05
QUANTILE_LEVELS = 1025
BISECTION_STEPS = 60
BUDGET_TOLERANCE = 0.5  # weights: an error allocation stops once less than half a weight is left to remove


def normalized_saliency(weight: torch.Tensor, input_sq_norms: torch.Tensor | None) -> torch.Tensor:
    """Saliency of every weight of a 2-D ``weight`` (rows, d) over its layer mean, flattened (fp32)."""
    saliency = weight.detach().float().pow(2)
    if input_sq_norms is not None:
        saliency = saliency * input_sq_norms.to(saliency.device).float().unsqueeze(0)
    mean = saliency.mean()
    return (saliency / mean if mean > 0 else torch.ones_like(saliency)).flatten()


class SaliencyProfile:
    """A layer's normalised-saliency distribution as quantiles: fraction below any threshold."""

    def __init__(self, saliency: torch.Tensor) -> None:
        levels = torch.linspace(0, 1, QUANTILE_LEVELS, dtype=torch.float64)
        values = saliency.double()
        if values.numel() > 2 ** 24:  # torch.quantile's input limit: a strided subsample is exact enough
            values = values[:: values.numel() // 2 ** 24 + 1]
        self.levels, self.quantiles = levels, torch.quantile(values, levels)
        self.numel = saliency.numel()

    def fraction_below(self, threshold: float) -> float:
        """Fraction of the layer's weights with normalised saliency below ``threshold`` (piecewise linear)."""
        q = self.quantiles
        if threshold >= q[-1]:  # first: a layer of equal saliencies (q[0] == q[-1]) is all below its top
            return 1.0
        if threshold <= q[0]:
            return 0.0
        index = int(torch.searchsorted(q, torch.tensor(threshold, dtype=q.dtype), right=True)) - 1
        low, high = float(q[index]), float(q[index + 1])
        share = 0.0 if high == low else (threshold - low) / (high - low)
        return float(self.levels[index] + share * (self.levels[index + 1] - self.levels[index]))


def allocate_sparsity(profiles: dict[str, SaliencyProfile], target: float) -> dict[str, float]:
    """Per-layer sparsities whose weight-count-weighted mean is ``target`` (one global threshold,
    found by bisection; the mean is exact up to the per-layer rounding to whole weights: a layer whose
    saliencies tie at the threshold takes only part of the tied weights, ``_blend``). The cap per layer is
    ``max(MAX_LAYER_SPARSITY, target)``, so every target below 1 is reachable.
    """
    if not profiles:
        return {}
    cap = max(MAX_LAYER_SPARSITY, target)
    total = sum(p.numel for p in profiles.values())

    def allocation(threshold: float) -> dict[str, float]:
        return {name: min(p.fraction_below(threshold), cap) for name, p in profiles.items()}

    def overall(shares: dict[str, float]) -> float:
        return sum(shares[name] * p.numel for name, p in profiles.items()) / total

    low, high = 0.0, max(float(p.quantiles[-1]) for p in profiles.values())
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if overall(allocation(middle)) < target else (low, middle)
    return _blend(allocation(low), allocation(high), target, overall)


def _blend(below: dict[str, float], above: dict[str, float], target: float,
           overall: Callable[[dict[str, float]], float]) -> dict[str, float]:
    """The shares just below and at the threshold, mixed so that their mean is ``target``. Where saliencies
    tie (a quantile plateau: a layer of equal magnitudes, or dequantized int4 weights) a layer's fraction
    jumps at the threshold, and the threshold alone missed the target (an all-equal layer kept 0% at a 50%
    target; an int4-rounded one took 67%); any part of a tie is as salient as the rest."""
    low_mean, high_mean = overall(below), overall(above)
    if high_mean <= low_mean:
        return above
    mix = min(max((target - low_mean) / (high_mean - low_mean), 0.0), 1.0)
    return {name: below[name] + mix * (above[name] - below[name]) for name in above}


def error_grid(target: float) -> list[float]:
    """Sparsities at which error curves are measured: 0, ERROR_GRID_STEP, ... up to the layer cap."""
    cap = max(MAX_LAYER_SPARSITY, target)
    steps = int(round(cap / ERROR_GRID_STEP + 1e-9))
    grid = [round(i * ERROR_GRID_STEP, 6) for i in range(steps + 1) if i * ERROR_GRID_STEP < cap - 1e-9]
    return grid + [cap]


def relative_output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: the layer's output error energy on the calibration inputs over
    its output energy (``weight`` / ``new_weight`` (rows, d), ``hessian`` (d, d))."""
    weight, hessian = weight.detach().float(), hessian.float()
    delta = new_weight.float() - weight
    energy = float(torch.einsum("rd,de,re->", weight, hessian, weight))
    return float(torch.einsum("rd,de,re->", delta, hessian, delta)) / energy if energy > 0 else 0.0


def error_curve(weight: torch.Tensor, hessian: torch.Tensor, prune: Callable[[float], torch.Tensor],
                grid: Sequence[float]) -> list[float]:
    """Relative output error of ``prune(sparsity)`` (the pruned 2-D weight) at every ``grid`` point."""
    return [0.0 if sparsity == 0 else relative_output_error(weight, prune(sparsity), hessian) for sparsity in grid]


def _hull_segments(grid: Sequence[float], curve: Sequence[float]) -> list[tuple[float, float, float]]:
    """Lower convex hull of the points (grid, curve) as (slope, start, end) segments, slopes ascending."""
    hull: list[int] = [0]
    for k in range(1, len(grid)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (grid[b] - grid[a]) * (curve[k] - curve[a]) - (curve[b] - curve[a]) * (grid[k] - grid[a])
            if cross > 0:
                break
            hull.pop()
        hull.append(k)
    return [((curve[b] - curve[a]) / (grid[b] - grid[a]), grid[a], grid[b]) for a, b in zip(hull, hull[1:])]


def allocate_by_error(curves: dict[str, Sequence[float]], sizes: dict[str, int], target: float,
                      grid: Sequence[float]) -> dict[str, float]:
    """Per-layer sparsities with weight-count-weighted mean ``target`` that minimise the summed error.

    ``curves[name][k]`` is the layer's error at ``grid[k]`` (grid[0] = 0); ``sizes[name]`` its weight
    count. Segments of every curve's convex hull are taken cheapest-first by error per removed weight
    (their slopes ascend within a layer, so each layer fills in order); the last one only in part.
    """
    segments = sorted((slope / sizes[name], start, end, name)
                      for name, curve in curves.items() for slope, start, end in _hull_segments(grid, curve))
    budget = target * sum(sizes.values())
    shares = dict.fromkeys(curves, 0.0)
    for _, start, end, name in segments:
        if budget < BUDGET_TOLERANCE:  # a float residue of the last partial take once jumped a layer to its next
            break                      # segment's start: 15% for a 13.6% target
        take = min(end - start, budget / sizes[name])
        shares[name] = start + take
        budget -= take * sizes[name]
    return shares
