"""Partial steps of a calibrated schedule: reuse steps that recompute part of the cached blocks.

A partial step's *level* says which part: for a transformer's block stack, the number of leading
blocks that run (the others add their delta from the last full step, as in Δ-DiT's rear span); for
a UNet, a DeepCache branch deeper than the schedule's own, whose deep path alone is reused. This
module checks levels against the model, maps a schedule's partial steps onto a call's steps, and
measures what each level costs (its share of the cached blocks' FLOPs), which the schedule search
spends its budget on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..arch import get_adapter
from ..arch.base import CachePoint
from .schedules import interpolated_positions, nearest_free, resampled_count
from .stack import stack_blocks
from .unet_branch import skip_branches


def is_unet(pipe: Any) -> bool:
    """True when the denoiser caches DeepCache skip branches (a UNet), False for a block stack."""
    return bool(skip_branches(pipe))


def level_range(pipe: Any, branch: int) -> range:
    """The partial levels ``pipe``'s denoiser accepts: UNets the branches deeper than ``branch`` that cache
    something (a UNet without a mid block has nothing below its deepest skip: an IndexError at install, and
    the search tried it), transformers 1 .. blocks - 1 (leading blocks run)."""
    branches = skip_branches(pipe)
    if not branches:
        return range(1, len(stack_blocks(pipe)))
    return range(branch + 1, len(branches) - (0 if branches[-1].blocks else 1))


def check_levels(pipe: Any, config: Any) -> None:
    """ValueError naming a partial level of ``config`` outside :func:`level_range` (before any hook)."""
    accepted = level_range(pipe, config.branch)
    for step, level in config.partial_steps:
        if level not in accepted:
            meaning = ("a UNet partial step reuses a deeper DeepCache branch than branch="
                       f"{config.branch}" if is_unet(pipe) else "a transformer partial step runs that many "
                       "leading blocks of the stack")
            raise ValueError(f"partial step {step} has level {level}; {meaning}: accepted levels here are "
                             f"{_range_text(accepted)}")


def _range_text(levels: range) -> str:
    return f"{levels.start}..{levels.stop - 1}" if len(levels) else "none (no deeper branch or too few blocks)"


def deeper_points(pipe: Any, levels: Sequence[int]) -> dict[int, CachePoint]:
    """UNet cache points of the partial ``levels`` (deeper branches), by level."""
    points = skip_branches(pipe)
    return {level: points[level] for level in levels}


def partial_steps_for_call(config: Any, full_steps: Sequence[int], num_steps: int,
                           timesteps: Sequence[float] | None = None) -> dict[int, int]:
    """``config.partial_steps`` for a call of ``num_steps`` whose full steps are ``full_steps``: {step: level}.
    Each goes to the free step nearest its noise level (when both schedules' ``timesteps`` are known and as
    long), else nearest its relative position, resampled like the full steps (``resampled_partials``); a call
    of the calibrated schedule keeps them as they are."""
    taken, plan = set(full_steps), {}
    calibrated = scaled_timesteps(config.timesteps) if timesteps is not None and config.timesteps is not None else None
    current = scaled_timesteps(timesteps) if calibrated is not None else None
    if current is not None:
        for step, level in config.partial_steps:
            free = [index for index in range(num_steps) if index not in taken]
            if not free:
                break
            target = nearest_noise_level(free, current, calibrated[step], step)
            taken.add(target)
            plan[target] = level
        return plan
    for position, level in resampled_partials(config.partial_steps, config.num_inference_steps, num_steps):
        target = nearest_free(position, taken, num_steps)
        if target in taken:
            break
        taken.add(target)
        plan[target] = level
    return plan


def resampled_partials(partial_steps: Sequence[tuple[int, int]], source_steps: int,
                       target_steps: int) -> list[tuple[int, int]]:
    """(position, level) pairs of ``partial_steps`` for a call of ``target_steps``: as many as keep their share
    of the steps, count * target / source to the nearest (``schedules.resampled_count``, halves up: round() sent
    them to the even count until session 53), at positions interpolated along them (as
    ``schedules.resample_full_steps`` does for full steps), each with the level of the nearest original. Until
    session 41 every partial step was kept, so a 50-step schedule's 8 partial steps filled all reuse steps of a
    10-step call (block compute 0.50 for a 0.2 budget)."""
    ordered = sorted(partial_steps)
    if target_steps == source_steps or not ordered:
        return ordered
    wanted = min(target_steps - 1, resampled_count(len(ordered), source_steps, target_steps))  # halves up
    return [(position, ordered[round(index)][1]) for index, position
            in interpolated_positions([step for step, _ in ordered], source_steps, target_steps, wanted)]


def nearest_noise_level(free: Sequence[int], levels: Sequence[float], wanted: float, step: int) -> int:
    """The position among ``free`` whose scaled noise level (``levels``) is nearest ``wanted``, the one nearest
    ``step`` on ties."""
    return min(free, key=lambda index: (abs(levels[index] - wanted), abs(index - step)))


def few_values(values: Any) -> str:
    """A short text of a timestep list for error messages (the first three and the last past six; None: unknown)."""
    if values is None:
        return "(unknown)"
    values = [round(float(value), 3) for value in values]
    return str(values) if len(values) <= 6 else f"[{', '.join(map(str, values[:3]))}, ..., {values[-1]}]"


def scaled_timesteps(timesteps: Sequence[float]) -> list[float]:
    """``timesteps`` scaled to [0, 1] by their own minimum and maximum (all 0 for a constant schedule): a
    schedule's noise levels, comparable across schedules."""
    values = [float(value) for value in timesteps]
    low, span = min(values), max(values) - min(values)
    return [(value - low) / span if span > 0 else 0.0 for value in values]


def flop_shares(pipe: Any, names: Sequence[str], run: Any) -> dict[str, float]:
    """Each named denoiser module's share of the FLOPs the named modules ran during ``run()`` (one calibration
    call, uncached)."""
    from ..eval.cost import module_flops  # the eval package loads the metrics; only searches and learning need this

    flops = module_flops(get_adapter(pipe).denoiser, names, run)
    total = max(sum(flops.values()), 1)
    return {name: flops[name] / total for name in names}


def level_costs(pipe: Any, branch: int, levels: Sequence[int], run: Any) -> dict[int, float]:
    """What a partial step of each level computes, as a fraction of the FLOPs of the blocks a whole reuse
    step skips (branch ``branch``'s deep path; a transformer's stack), counted during ``run()`` (one
    calibration call, uncached)."""
    points = skip_branches(pipe)
    if points:
        cached, reused = points[branch].blocks, {level: set(points[level].blocks) for level in levels}
    else:
        cached = stack_blocks(pipe)
        reused = {level: set(cached[level:]) for level in levels}
    shares = flop_shares(pipe, cached, run)
    return {level: sum(shares[name] for name in cached if name not in reused[level]) for level in levels}
