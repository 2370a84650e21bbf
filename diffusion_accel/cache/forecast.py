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


def linear_forecast(current: Any, previous: Any, current_step: int, previous_step: int | None,
                    step: int) -> Any:
    """``current + (current - previous) * (step - current_step) / (current_step - previous_step)``
    leaf by leaf; ``current`` itself when there is no earlier full step to extrapolate from."""
    if previous is None or previous_step is None or current_step <= previous_step:
        return current
    scale = (step - current_step) / (current_step - previous_step)
    try:
        return tree_map(lambda now, before: _extrapolate(now, before, scale), current, previous,
                        is_leaf=lambda value: value is None)
    except ValueError:  # the two steps' outputs differ in structure: nothing to extrapolate
        return current


def _extrapolate(now: Any, before: Any, scale: float) -> Any:
    same = isinstance(now, torch.Tensor) and isinstance(before, torch.Tensor) and before.shape == now.shape
    return now + (now - before) * scale if same else now

