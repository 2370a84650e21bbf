"""Calibrated cache schedules: choose the full-compute steps for a budget by a training-free search on
the error of the FINAL output against the uncached trajectory (HarmoniCa's lesson: per-step feature
error is a poor proxy for what the user sees).

Two searches: ``"refine"`` (default) starts from several schedules with the budget's number of
full steps, evenly spaced and front-loaded with 1 to 4 leading full steps (then evenly spaced up to
the last step, like TaylorSeer's warm-up), moves single full steps to nearby free steps while that
lowers the error, then, from the best of them, also moves single full steps to any free step (a
local minimum of the nearby moves is often not one of these), so on the calibration prompts it is
never worse than any start (on fashion-flux without forecast the front-loaded start halves the
error of the evenly spaced one); ``"greedy"`` grows the schedule from step 0.

With ``search_blocks`` the search then also chooses which blocks recompute: *partial steps* (see
:mod:`.partial`) run part of the cached blocks, costing their share of those blocks' FLOPs. Greedily,
the budget left over by rounding, then one released full step at a time, is spent on the partial step
(position and level) that lowers the final error most, while that beats the schedule without them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..arch import find_denoiser
from ..calib import denoiser_steps
from ..progress import progress_counter, progress_shown, showing_progress
from ..scalars import plain_number
from ..stacklevel import user_stacklevel
from .apply import enable_cache, remove_cache, summary as cache_summary
from .configs import CalibratedCacheConfig, check_int
from .partial import level_costs, level_range
from .prefix import PrefixReplay
from .runs import final_outputs, planned_calls, relative_error
from .session import get_session


def _candidates(num_steps: int, chosen: set[int], max_candidates: int | None) -> list[int]:
    """Steps not yet chosen, thinned evenly to at most ``max_candidates``."""
    free = [s for s in range(num_steps) if s not in chosen]
    if max_candidates is None or len(free) <= max_candidates:
        return free
    stride = len(free) / max_candidates
    return sorted({free[int(i * stride)] for i in range(max_candidates)})


def cached_outputs(pipe: Any, config: Any, calls: list) -> list:
    """The final outputs of ``calls`` with the cache ``config`` enabled (removed afterwards)."""
    enable_cache(pipe, config)
    try:
        return final_outputs(pipe, calls)
    finally:
        remove_cache(pipe)


def schedule_error(pipe: Any, config: CalibratedCacheConfig, calls: list, references: list) -> float:
    """Mean relative L2 error of the final outputs with ``config`` vs the uncached references."""
    return relative_error(cached_outputs(pipe, config, calls), references)


SEARCHES = ("refine", "greedy")


def calibrate_schedule(pipe: Any, prompts: Any, budget: float = 0.4, num_inference_steps: int = 25, *,
                       branch: int = 0, seed: int = 0, search: str = "refine", max_candidates: int | None = None,
                       max_passes: int = 3, resample: bool = True, forecast: int = 0,
                       forecast_target: str = "residual", batch_size: int = 1, progress: bool = False,
                       search_blocks: bool = False, reuse_prefix: bool = True,
                       **call_kwargs: Any) -> CalibratedCacheConfig:
    """The schedule with floor(budget * steps) full steps (``full_step_count``) that minimises the final-output
    error on ``prompts`` (see the module doc for the two searches). ``max_candidates`` thins the greedy
    search's candidates; ``max_passes`` bounds the refine search's sweeps (nearby moves: about 4 runs
    per full step per sweep, per start; moves anywhere: one run per (full step, free step) pair per
    sweep, from the best start only). ``forecast`` and ``forecast_target`` are searched with (the schedule suits how
    reused steps are filled). ``branch``: the UNet skip branch cached (DeepCache's; transformers: unused);
    ``resample``: whether the schedule may be mapped onto another step count or scheduler later (else
    those are refused); ``seed``: first seed of the prompts' runs; ``batch_size``: prompts per pipeline call (the
    search runs every prompt once per schedule it tries, thousands of runs at 50 steps: batching them is ~2x faster
    on a CPU, with other random latents per prompt than one prompt per call); ``progress``: a bar counting the
    schedules tried; ``search_blocks``: also choose partial steps, which recompute part of the cached blocks
    (the budget then counts each by its share of the cached blocks' FLOPs; see the module doc; at most
    ``max_passes`` full steps are traded for them, ``max_candidates`` thins their positions);
    ``reuse_prefix``: replay the denoiser outputs a schedule shares with one tried before, up to the first step
    where they differ (:mod:`.prefix`; the same errors and result, fewer denoiser calls; False runs every schedule
    from step 0); ``call_kwargs``: further pipeline arguments."""
    budget, num_inference_steps, branch, seed, max_candidates, max_passes, forecast, batch_size = (
        plain_number(value) for value in (budget, num_inference_steps, branch, seed, max_candidates, max_passes,
                                          forecast, batch_size))  # numpy sweeps pass these
    check_search_settings(budget, branch=branch, search=search, max_candidates=max_candidates, max_passes=max_passes,
                          resample=resample, forecast=forecast, forecast_target=forecast_target,
                          search_blocks=search_blocks, reuse_prefix=reuse_prefix)
    if get_session(find_denoiser(pipe)[1]) is not None:
        raise ValueError("calibrate_schedule needs a pipeline without a cache; call remove_cache first")
    num_steps = denoiser_steps(pipe, num_inference_steps, call_kwargs.get("timesteps"),  # Heun: 2N - 1 calls
                               call_kwargs.get("sigmas"))  # custom schedules set their own length
    probe = CalibratedCacheConfig((0,), num_steps, budget=budget, branch=branch, resample=resample,
                                  forecast=forecast, forecast_target=forecast_target)
    calls = planned_calls(pipe, prompts, num_inference_steps, seed=seed, batch_size=batch_size, **call_kwargs)
    ran = steps_that_run(pipe, _with_steps(probe, set(range(num_steps))), calls)  # also checks branch / target
    probe = replace(probe, first_step=ran[0])  # img2img: other step counts resample the steps that run
    with recorded_timesteps(pipe) as timesteps:
        references = final_outputs(pipe, calls)
    if len(timesteps) == num_steps:  # the schedule follows noise levels under other schedules of this length
        probe = replace(probe, timesteps=tuple(timesteps))
    seen: dict[frozenset, float] = {}
    count = len(ran)  # the search and the budget cover the steps that run (img2img from 0.5: the last half)
    target = full_step_count(budget, count)
    with (showing_progress(progress or progress_shown()), progress_counter("schedule search", "schedule") as tried,
          PrefixReplay(pipe, find_denoiser(pipe)[1], enabled=reuse_prefix) as replay):

        def error(positions: set[int], partial: dict[int, int] | None = None) -> float:
            """Final-output error of a schedule, given as positions among the steps that run (each run once),
            with ``partial`` {position: level} steps."""
            key = (frozenset(positions), frozenset((partial or {}).items()))
            if key not in seen:
                config = _with_steps(probe, _steps_at(ran, positions), _partial_at(ran, partial))
                seen[key] = replay.error(config, calls, references)
                tried()
            return seen[key]

        chosen, partial = _search(error, count, target, search, max_candidates, max_passes), {}
        levels = candidate_levels(pipe, branch) if search_blocks else []
        if levels:  # none: a one-block stack, a UNet cached at its deepest branch
            costs = level_costs(pipe, branch, levels, lambda: final_outputs(pipe, calls[:1]))
            chosen, partial = search_partial_steps(error, count, chosen, costs, budget * count - target,
                                                   max_passes, max_candidates)
    return _with_steps(probe, _steps_at(ran, chosen), _partial_at(ran, partial))


def full_step_count(budget: float, count: int) -> int:
    """Full steps ``budget`` buys among ``count`` steps: floor(budget·count), never over the budget, and at least one
    (warned: it then spends 1/count). With round() budgets of half a step went to the even count (0.3 and 0.5 of 5
    steps both bought 2, 0.3 of 25 spent 0.32) and a partial-step search started over budget (until session 53)."""
    target = min(count, math.floor(budget * count + 1e-9))  # budget = full / steps gives back exactly ``full``
    if target < 1:
        warnings.warn(f"budget={budget} of {count} steps buys less than one full step: the schedule computes one, "
                      f"{1 / count:.3g} of the full cost", RuntimeWarning, stacklevel=user_stacklevel())
    return max(1, target)


def _search(error: Any, count: int, target: int, search: str, max_candidates: int | None, max_passes: int) -> set[int]:
    """``target`` of ``count`` positions minimising ``error`` by the named search (see the module doc)."""
    if search == "greedy":
        return _greedy(error, count, target, max_candidates)
    refined = [_refine(error, count, start, max_passes) for start in search_starts(count, target)]
    return _refine_far(error, count, min(refined, key=error), max_passes)


@contextmanager
def recorded_timesteps(pipe: Any) -> Iterator[list[float]]:
    """A list that receives the pipeline scheduler's timesteps as the first denoiser call of the block sees
    them (set by the pipeline at the start of its call)."""
    values: list[float] = []

    def record(module: nn.Module, args: tuple) -> None:
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if not values and isinstance(timesteps, torch.Tensor):
            values.extend(float(value) for value in timesteps.detach().float().cpu())

    handle = find_denoiser(pipe)[1].register_forward_pre_hook(record)
    try:
        yield values
    finally:
        handle.remove()


def steps_that_run(pipe: Any, every_step: Any, calls: list) -> list[int]:
    """The schedule positions a call actually runs, read from one fully computed cached run (``every_step``: a
    calibrated or router config computing every step): a pipeline
    that starts mid-schedule (img2img, a refiner's ``denoising_start``) skips the early ones, and a schedule
    searched over all of them spent its budget on steps that never run (no caching at all)."""
    enable_cache(pipe, every_step)
    try:
        final_outputs(pipe, calls[:1])
        steps = sorted({record["step"] for record in cache_summary(pipe)["steps"]})
    finally:
        remove_cache(pipe)
    if not steps:  # "every step ran" was assumed, and a schedule searched on outputs no denoiser call made (s49)
        raise ValueError(f"the pipeline made no denoiser call in {every_step.num_inference_steps} steps (img2img / "
                         f"inpainting run about strength x num_inference_steps of them: none at this strength); "
                         f"raise num_inference_steps or strength")
    return steps


def _steps_at(ran: list[int], positions: set[int]) -> set[int]:
    """Schedule steps of search ``positions`` (indices into ``ran``), with step 0 (the config requires it;
    a call starting later never reaches it)."""
    return {0} | {ran[position] for position in positions}


def check_search_settings(budget: Any = 0.4, *, branch: Any = 0, search: Any = "refine", max_candidates: Any = None,
                          max_passes: Any = 3, resample: Any = True, forecast: Any = 0, forecast_target: Any = "residual",
                          search_blocks: Any = False, reuse_prefix: Any = True) -> None:
    """ValueError naming the first bad :func:`calibrate_schedule` setting, before anything runs (also a recipe's
    ``[cache]`` table, whose values were checked only after the model loaded and the chain ran until session 41)."""
    _check_search(search, max_candidates, max_passes)
    for name, flag in (("search_blocks", search_blocks), ("reuse_prefix", reuse_prefix)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    CalibratedCacheConfig((0,), 1, budget=budget, branch=branch, resample=resample, forecast=forecast,
                          forecast_target=forecast_target)


def _check_search(search: Any, max_candidates: Any, max_passes: Any) -> None:
    """ValueErrors naming the bad search setting (max_candidates=0 was a ZeroDivisionError, -2 an empty
    min(), a negative max_passes was accepted)."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if max_candidates is not None:
        check_int("max_candidates", max_candidates, 1)
    check_int("max_passes", max_passes, 0)


def evenly_spaced_steps(num_steps: int, count: int) -> set[int]:
    """``count`` full steps spread evenly over ``num_steps``, starting at step 0."""
    return {min(num_steps - 1, round(i * num_steps / count)) for i in range(count)}


def front_loaded_steps(num_steps: int, count: int, head: int | None = None) -> set[int]:
    """``count`` full steps: the first ``head`` (default ``max(1, count // 3)``, at most 4) all full, the
    rest evenly spaced after them up to the last step (early steps shape the image; the last one finishes it)."""
    head = min(head or min(4, max(1, count // 3)), count)
    rest = count - head
    tail = {round(head - 1 + (num_steps - head) * (i + 1) / rest) for i in range(rest)} if rest else set()
    return set(range(head)) | {min(num_steps - 1, step) for step in tail}


def search_starts(num_steps: int, count: int) -> list[set[int]]:
    """The refine search's starting schedules: evenly spaced, and front-loaded with 1..4 leading full steps."""
    starts = [evenly_spaced_steps(num_steps, count)]
    for head in range(1, min(4, count) + 1):
        start = front_loaded_steps(num_steps, count, head)
        if len(start) == count and start not in starts:
            starts.append(start)
    return starts


def _greedy(error: Any, num_steps: int, target: int, max_candidates: int | None) -> set[int]:
    """Grow {0} by the step whose addition lowers the final error most, up to ``target`` steps."""
    chosen = {0}
    while len(chosen) < target:
        scored = [(error(chosen | {c}), c) for c in _candidates(num_steps, chosen, max_candidates)]
        chosen.add(min(scored)[1])
    return chosen


def _refine(error: Any, num_steps: int, chosen: set[int], max_passes: int) -> set[int]:
    """Move single full steps (never step 0) by ±1 or ±2 while that lowers the error."""
    best = error(chosen)
    for _ in range(max_passes):
        improved = False
        for step in sorted(chosen - {0}):
            for moved in (step - 1, step + 1, step - 2, step + 2):
                if not 0 < moved < num_steps or moved in chosen:
                    continue
                trial = (chosen - {step}) | {moved}
                trial_error = error(trial)
                if trial_error < best:
                    chosen, best, improved = trial, trial_error, True
                    break
        if not improved:
            break
    return chosen


def _refine_far(error: Any, num_steps: int, chosen: set[int], max_passes: int) -> set[int]:
    """Best single move of a full step (never step 0) to any free step, repeated while it lowers the
    error (at most ``max_passes`` times), each followed by the nearby refinement."""
    best = error(chosen)
    for _ in range(max_passes):
        moves = [(chosen - {step}) | {free} for step in sorted(chosen - {0})
                 for free in range(1, num_steps) if free not in chosen]
        trial = min(moves, key=error, default=chosen)
        if error(trial) >= best:
            break
        chosen = _refine(error, num_steps, trial, max_passes)
        best = error(chosen)
    return chosen


MAX_LEVELS = 8  # partial levels searched (evenly spaced among the model's): each costs a run per free position
MAX_PARTIAL_ADDS = 8  # partial steps added per released full step (cheap levels could otherwise fill every step)


def candidate_levels(pipe: Any, branch: int) -> list[int]:
    """The partial levels the search tries: all of the model's (``partial.level_range``), or MAX_LEVELS of
    them evenly spaced (a 57-block Flux stack has 56)."""
    levels = list(level_range(pipe, branch))
    if len(levels) <= MAX_LEVELS:
        return levels
    return sorted({levels[round(i * (len(levels) - 1) / (MAX_LEVELS - 1))] for i in range(MAX_LEVELS)})


def search_partial_steps(error: Any, count: int, chosen: set[int], costs: dict[int, float], spare: float,
                         max_rounds: int, max_candidates: int | None = None) -> tuple[set[int], dict[int, int]]:
    """(full positions, {position: level}) with the lowest ``error``: ``chosen`` as it is, or with partial steps
    bought by the ``spare`` budget (full-step units) and then by up to ``max_rounds`` released full steps (each
    round drops the full step whose loss hurts least, never position 0, adds partial steps greedily, then
    moves full and partial steps to nearby free steps while that helps); stops at the first round that does
    not improve on the best so far. ``costs``: each level's price in full-step units."""
    full, partial, left = set(chosen), {}, spare
    best = (error(full), set(full), {})
    for round_index in range(max_rounds + 1):
        if round_index:
            removable = sorted(full - {0})
            if not removable:
                break
            full = min((full - {step} for step in removable), key=lambda trial: error(trial, partial))
            left += 1.0
        partial, left = _add_partial_steps(error, count, full, partial, costs, left, max_candidates)
        full, partial = _refine_with_partial(error, count, full, partial, max(max_rounds, 1))
        current = error(full, partial)
        if current < best[0]:
            best = (current, set(full), dict(partial))
        elif round_index:
            break
    return best[1], best[2]


def _add_partial_steps(error: Any, count: int, full: set[int], partial: dict[int, int], costs: dict[int, float],
                       left: float, max_candidates: int | None) -> tuple[dict[int, int], float]:
    """Greedily add the (free position, level) that lowers ``error`` most while its cost fits in ``left`` and
    it helps, at most MAX_PARTIAL_ADDS times; returns the partial steps and the budget left."""
    partial = dict(partial)
    for _ in range(MAX_PARTIAL_ADDS):
        current = error(full, partial)
        free = _candidates(count, full | set(partial), max_candidates)
        trials = [(position, level) for position in free for level, cost in costs.items() if cost <= left + 1e-9]
        if not trials:
            break
        position, level = min(trials, key=lambda trial: error(full, partial | {trial[0]: trial[1]}))
        if error(full, partial | {position: level}) >= current:
            break
        partial[position] = level
        left -= costs[level]
    return partial, left


def _refine_with_partial(error: Any, count: int, full: set[int], partial: dict[int, int],
                         max_passes: int) -> tuple[set[int], dict[int, int]]:
    """Move single full steps (``_refine``, the partial steps held) and then single partial steps by ±1 or ±2
    to free steps while that lowers the error, at most ``max_passes`` sweeps of both."""
    if not partial:
        return full, partial
    for _ in range(max_passes):
        held = set(partial)
        moved_full = _refine(lambda trial: error(trial, partial) if not trial & held else float("inf"),
                             count, full, 1)
        moved_partial = _move_partial_steps(lambda trial: error(moved_full, trial), count, moved_full, partial)
        if moved_full == full and moved_partial == partial:
            break
        full, partial = moved_full, moved_partial
    return full, partial


def _move_partial_steps(error: Any, count: int, full: set[int], partial: dict[int, int]) -> dict[int, int]:
    """One sweep moving each partial step (its level kept) by ±1 or ±2 to a free step while that lowers ``error``."""
    best = error(partial)
    for position in sorted(partial):
        if position not in partial:
            continue
        for moved in (position - 1, position + 1, position - 2, position + 2):
            if not 0 < moved < count or moved in full or moved in partial:
                continue
            trial = {p: level for p, level in partial.items() if p != position} | {moved: partial[position]}
            trial_error = error(trial)
            if trial_error < best:
                partial, best = trial, trial_error
                break
    return partial


def _partial_at(ran: list[int], partial: dict[int, int] | None) -> tuple[tuple[int, int], ...]:
    """Schedule (step, level) pairs of partial steps given as positions among the steps that run."""
    return tuple(sorted((ran[position], level) for position, level in (partial or {}).items()))


def _with_steps(config: CalibratedCacheConfig, steps: set[int],
                partial: tuple[tuple[int, int], ...] = ()) -> CalibratedCacheConfig:
    return replace(config, full_steps=tuple(sorted(steps)), partial_steps=partial)
