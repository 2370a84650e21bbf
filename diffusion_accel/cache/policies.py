"""Step policies: whether the cached part of the denoiser is computed (True) or reused (False).

A policy sees the step index, the trajectory length and the per-context state dict; threshold
policies also get a signal tensor from the always-computed head block.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..hooks import PER_CALL
from .schedules import uniform_full_steps
from .streams import rel_l1


def plan_from_other_start(config: Any, step: int, num_steps: int | None, state: dict, plans: dict,
                          build: Callable[[int, int], Any]) -> Any:
    """For a schedule or router made on calls starting mid-schedule (``config.first_step`` > 0, img2img): the plan
    ``build(num_steps, first)`` of a call running another step count or starting at another step (its first step
    kept per context and call in ``state[PER_CALL]``), cached in ``plans``; None otherwise (the config as made)."""
    if config.first_step == 0 or num_steps is None:
        return None
    first = state.setdefault(PER_CALL, {}).setdefault("first_step", step)
    if num_steps == config.num_inference_steps and first == config.first_step:
        return None
    if (num_steps, first) not in plans:
        plans[(num_steps, first)] = build(num_steps, first)
    return plans[(num_steps, first)]


class SchedulePolicy:
    """Compute on a fixed set of steps, given as a function of the trajectory length."""

    uses_head = False
    signal = None

    def __init__(self, full_steps: Callable[[int], list[int]], fallback_interval: int,
                 assumed_steps: int | None = None, from_first_step: bool = False) -> None:
        """``from_first_step``: place the schedule on the steps a call runs, counted from its first (an interval
        schedule, as the deepcache package and FORA count), not on the positions of the whole schedule, where an
        img2img call computed its first step (nothing cached yet) and again at the next grid position."""
        self._full_steps = full_steps
        self._fallback_interval = fallback_interval
        self._assumed_steps = assumed_steps
        self._from_first_step = from_first_step
        self._memo: dict[int, frozenset[int]] = {}

    def full_steps(self, num_steps: int) -> frozenset[int]:
        """The full steps of a ``num_steps`` trajectory (memoised)."""
        if num_steps not in self._memo:
            self._memo[num_steps] = frozenset(self._full_steps(num_steps))
        return self._memo[num_steps]

    def should_compute(self, step: int, num_steps: int | None, state: dict, signal: Any = None) -> bool:
        """Whether ``step`` is a full step. For a trajectory of unknown length (a bare denoiser, or another
        pipeline's scheduler) a schedule written for ``assumed_steps`` is used as it stands (a calibrated
        one fell back to every ``num_inference_steps``-th step: only step 0 ran), else every
        ``fallback_interval``-th step; past the assumed length every step computes."""
        if self._from_first_step:
            first = state.setdefault(PER_CALL, {}).setdefault("first_step", step)  # per context and call
            step, num_steps = step - first, None if num_steps is None else num_steps - first
        if num_steps is None and self._assumed_steps is not None:
            return step >= self._assumed_steps or step in self.full_steps(self._assumed_steps)
        if num_steps is None or step >= num_steps:
            return step % self._fallback_interval == 0
        return step in self.full_steps(num_steps)


class DeltaPolicy(SchedulePolicy):
    """Δ-DiT: full steps every ``interval``; each reuse step also picks the bypassed span, "rear"
    before ``boundary`` (a fraction of the trajectory) and "front" from it on (in ``state["span"]``)."""

    def __init__(self, interval: int, boundary: float) -> None:
        super().__init__(lambda n: uniform_full_steps(n, interval), interval, from_first_step=True)
        self.boundary = boundary  # a noise level: ``span`` reads the step's absolute position

    def span(self, step: int, num_steps: int | None) -> str:
        """The span bypassed at ``step``: rear blocks in the outline stage, front blocks after it."""
        if num_steps is None or step < self.boundary * num_steps:
            return "rear"
        return "front"

    def should_compute(self, step: int, num_steps: int | None, state: dict, signal: Any = None) -> bool:
        state["span"] = self.span(step, num_steps)
        return super().should_compute(step, num_steps, state, signal)


class FirstBlockPolicy:
    """Compute when block 0's residual moved by >= ``threshold`` (relative L1) since the last full step."""

    uses_head = True
    signal = "residual"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def should_compute(self, step: int, num_steps: int | None, state: dict, signal: torch.Tensor) -> bool:
        reference = state.get("head_reference")
        change = None if reference is None else rel_l1(signal, reference)
        state["signal_change"] = change
        if change is not None and change < self.threshold:
            return False
        state["head_reference"] = signal.detach()
        return True


class TeaCachePolicy:
    """Accumulate poly(rel L1 change of the modulated input); compute once the sum reaches ``threshold``.

    The first and last steps of a trajectory are always computed.
    """

    uses_head = True
    signal = "modulated"

    def __init__(self, threshold: float, coefficients: tuple[float, ...] | None) -> None:
        self.threshold = threshold
        self.coefficients = coefficients

    def rescale(self, change: float) -> float:
        """The fitted polynomial (highest power first) at ``change``, at least 0 (an estimated drift never
        shrinks the sum); identity without coefficients."""
        if self.coefficients is None:
            return change
        value = 0.0
        for coefficient in self.coefficients:
            value = value * change + coefficient
        return max(value, 0.0)

    def should_compute(self, step: int, num_steps: int | None, state: dict, signal: torch.Tensor) -> bool:
        previous = state.get("head_reference")
        state["head_reference"] = signal.detach()
        change = None if previous is None else rel_l1(signal, previous)
        state["signal_change"] = change
        is_last = num_steps is not None and step >= num_steps - 1
        if change is None or is_last:
            state["accumulated"] = 0.0
            return True
        accumulated = state.get("accumulated", 0.0) + self.rescale(change)
        if accumulated < self.threshold:
            state["accumulated"] = accumulated
            return False
        state["accumulated"] = 0.0
        return True
