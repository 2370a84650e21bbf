"""Global unstructured sparsity: one target over all pruned layers, split into per-layer sparsities.

Each weight gets a saliency comparable across layers: its share of the layer's output energy,
``w_ij^2 * E[x_j^2]`` (the diagonal-Hessian OBS saliency; ``w_ij^2`` for magnitude, which reads no
inputs) divided by the layer's mean saliency. One global threshold on that normalised saliency
then decides how much of each layer goes, so layers whose importance is concentrated in few
weights are pruned harder than layers where every weight matters. Each layer keeps at least
``1 - MAX_LAYER_SPARSITY`` of its weights. The layers are then pruned one by one (OBS, Wanda or
magnitude) at their own sparsity; the weighted mean of the per-layer sparsities is the target.
"""

from __future__ import annotations

import torch

MAX_LAYER_SPARSITY = 0.95
QUANTILE_LEVELS = 1025
BISECTION_STEPS = 60


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
        if threshold <= q[0]:
            return 0.0
        if threshold >= q[-1]:
            return 1.0
        index = int(torch.searchsorted(q, torch.tensor(threshold, dtype=q.dtype), right=True)) - 1
        low, high = float(q[index]), float(q[index + 1])
        share = 0.0 if high == low else (threshold - low) / (high - low)
        return float(self.levels[index] + share * (self.levels[index + 1] - self.levels[index]))


def allocate_sparsity(profiles: dict[str, SaliencyProfile], target: float) -> dict[str, float]:
    """Per-layer sparsities whose weight-count-weighted mean is ``target`` (one global threshold,
    found by bisection; the per-layer fractions are continuous in it, so the mean is exact up to the
    per-layer rounding to whole weights). The cap per layer is ``max(MAX_LAYER_SPARSITY, target)``,
    so every target below 1 is reachable.
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
    return allocation(high)
