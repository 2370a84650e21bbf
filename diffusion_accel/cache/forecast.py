"""First-order (TaylorSeer-style) forecasts of cached features: instead of reusing the value of the
last full step, extrapolate linearly in the step index from the last two full steps.

Works on any nesting of tuples, lists and dicts of tensors (a UNet block's ``(hidden, skips)``
output, a transformer stack's per-stream residual); ``None`` leaves and tensors whose shape changed
between the two steps are reused as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map


def forecast_scale(step: int, full_step: int | None, previous_full_step: int | None) -> torch.Tensor | None:
    """``(step - full_step) / (full_step - previous_full_step)``, how far past the last full step ``step``
    lies in units of the gap between the last two full steps; None without two increasing full steps.
    A 0-d float32 CPU tensor: a compiled hook takes it as a graph input, so the step numbers it comes
    from are not baked into (and guarded by) the graph."""
    if full_step is None or previous_full_step is None or full_step <= previous_full_step:
        return None
    return torch.tensor((step - full_step) / (full_step - previous_full_step), dtype=torch.float32)


def linear_forecast(current: Any, previous: Any, scale: torch.Tensor | None) -> Any:
    """``current + (current - previous) * scale`` leaf by leaf (``scale`` from :func:`forecast_scale`);
    ``current`` itself when there is no earlier full step to extrapolate from."""
    if previous is None or scale is None:
        return current
    try:
        return tree_map(lambda now, before: _extrapolate(now, before, scale), current, previous,
                        is_leaf=lambda value: value is None)
    except ValueError:  # the two steps' outputs differ in structure: nothing to extrapolate
        return current


def _extrapolate(now: Any, before: Any, scale: torch.Tensor) -> Any:
    same = isinstance(now, torch.Tensor) and isinstance(before, torch.Tensor) and before.shape == now.shape
    return now + (now - before) * scale if same else now
