"""Calibrated cache schedules: choose the full-compute steps for a budget by greedy search on the
error of the FINAL output against the uncached trajectory (HarmoniCa's lesson: per-step feature
error is a poor proxy for what the user sees).
"""

from __future__ import annotations

from typing import Any

from ..arch import find_denoiser
from .apply import enable_cache, remove_cache
from .configs import CalibratedCacheConfig
from .runs import final_outputs, planned_calls, relative_error
from .session import get_session


def _candidates(num_steps: int, chosen: set[int], max_candidates: int | None) -> list[int]:
    """Steps not yet chosen, thinned evenly to at most ``max_candidates``."""
    free = [s for s in range(num_steps) if s not in chosen]
    if max_candidates is None or len(free) <= max_candidates:
        return free
    stride = len(free) / max_candidates
    return sorted({free[int(i * stride)] for i in range(max_candidates)})


def schedule_error(pipe: Any, config: CalibratedCacheConfig, calls: list, references: list) -> float:
    """Mean relative L2 error of the final outputs with ``config`` vs the uncached references."""
    enable_cache(pipe, config)
    try:
        return relative_error(final_outputs(pipe, calls), references)
    finally:
        remove_cache(pipe)


def calibrate_schedule(pipe: Any, prompts: Any, budget: float = 0.4, num_inference_steps: int = 25, *,
                       branch: int = 0, seed: int = 0, max_candidates: int | None = None,
                       resample: bool = True, **call_kwargs: Any) -> CalibratedCacheConfig:
    """Greedy: start from {step 0}; repeatedly add the step whose addition gives the lowest final
    error, until round(budget * steps) full steps. Costs about budget * steps * candidates runs."""
    if get_session(find_denoiser(pipe)[1]) is not None:
        raise ValueError("calibrate_schedule needs a pipeline without a cache; call remove_cache first")
    probe = CalibratedCacheConfig((0,), num_inference_steps, budget=budget, branch=branch, resample=resample)
    calls = planned_calls(pipe, prompts, num_inference_steps, seed=seed, **call_kwargs)
    references = final_outputs(pipe, calls)
    target = min(num_inference_steps, max(1, round(budget * num_inference_steps)))
    chosen = {0}
    while len(chosen) < target:
        scored = [(schedule_error(pipe, _with_steps(probe, chosen | {c}), calls, references), c)
                  for c in _candidates(num_inference_steps, chosen, max_candidates)]
        chosen.add(min(scored)[1])
    return _with_steps(probe, chosen)


def _with_steps(config: CalibratedCacheConfig, steps: set[int]) -> CalibratedCacheConfig:
    return CalibratedCacheConfig(tuple(sorted(steps)), config.num_inference_steps, budget=config.budget,
                                 branch=config.branch, resample=config.resample)
