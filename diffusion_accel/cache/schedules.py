"""Which denoising steps run the full denoiser: uniform, non-uniform (DeepCache) and resampled."""

from __future__ import annotations

import math

import numpy as np


def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
    """Steps 0, interval, 2*interval, ... below ``num_steps``."""
    return list(range(0, num_steps, interval))


POWER_STEP = 0.02  # DeepCache's
POWER_TRIES = 50_000  # at most (about 0.6 s): DeepCache lowers a power of 1e6 for 5e7 tries, inf for ever


def nonuniform_full_steps(num_steps: int, interval: int, center: float = 0.3,
                          power: float = 1.4) -> list[int]:
    """ceil(num_steps / interval) full steps, dense near step round(``center`` * num_steps), sparse far from it:
    DeepCache's non-uniform schedule (its ``sample_from_quad_center``; step 0 always full, the last step not).

    Until session 53 this was a curve of our own through both ends (the last step always full, the early ones
    later): at interval 3 of 50 steps, 0, 4, 7, ..., 49 where DeepCache takes 0, 3, 6, ..., 46. If two steps
    collide the power is lowered towards 1 by DeepCache's 0.02; past that, even spacing.
    """
    count = min(num_steps, math.ceil(num_steps / interval))
    if count >= num_steps:
        return list(range(num_steps))
    center_step, candidate = round(center * num_steps), power
    tries = min(POWER_TRIES, math.ceil((power - 1.0) / POWER_STEP) + 1) if math.isfinite(power) else POWER_TRIES
    for _ in range(tries):  # down to 1, as DeepCache (200 tries of 0.02 fell back to even spacing from power 5.4)
        if candidate <= 1.0:
            break
        steps = _quadratic_around(num_steps, count, center_step, candidate)
        if len(steps) == count and steps == sorted(set(steps)) and steps[-1] < num_steps:
            return steps
        candidate -= POWER_STEP  # lowered by repeated subtraction, as DeepCache: the same float powers
    return _evenly_spaced(num_steps, count)


def _quadratic_around(num_steps: int, count: int, center_step: int, power: float) -> list[int]:
    """Step 0, then the inner ones of ``count`` + 1 points evenly spaced in u between the principal
    ``power``-th roots of -center_step and num_steps - center_step, mapped back by u ** power (real part, truncated
    towards zero; DeepCache's numpy arithmetic takes the complex root of the negative end, and its published
    schedules come from that), distinct, offset by ``center_step``."""
    start = complex(-center_step) ** (1.0 / power) if center_step > 0 else 0.0  # real arithmetic from 0, as there
    stop = (num_steps - center_step) ** (1.0 / power)
    offsets = np.trunc((np.linspace(start, stop, count + 1) ** power).real).astype(np.int64)
    return [0] + [int(offset) + center_step for offset in np.unique(offsets)[1:-1]]


def _evenly_spaced(num_steps: int, count: int) -> list[int]:
    """``count`` distinct steps evenly spread over [0, num_steps - 1], step 0 first."""
    if count <= 1:
        return [0]
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def resample_full_steps(full_steps: tuple[int, ...], source_steps: int, target_steps: int,
                        within_budget: bool = False) -> list[int]:
    """Map a schedule of ``source_steps`` onto ``target_steps``, keeping the fraction of full steps.

    The full steps are read as positions in [0, 1] of the trajectory; the target takes count * target / source
    positions (``resampled_count``: the nearest, halves up; ``within_budget``, for schedules searched for a budget:
    the floor, never more, as ``calibrate_schedule`` buys them), at least one, interpolated along them (so dense
    regions stay dense), each rounded to the nearest free step. Step 0 stays full.
    """
    if target_steps == source_steps:
        return sorted(full_steps)
    wanted = min(target_steps, max(1, resampled_count(len(full_steps), source_steps, target_steps, within_budget)))
    chosen: set[int] = set()
    for _, position in interpolated_positions(sorted(full_steps), source_steps, target_steps, wanted):
        chosen.add(nearest_free(position, chosen, target_steps))
    return sorted(chosen)


def resampled_count(count: int, source_steps: int, target_steps: int, within_budget: bool = False) -> int:
    """How many of ``count`` steps of a ``source_steps`` schedule a ``target_steps`` one keeps: their share to the
    nearest, halves up, or (``within_budget``) its floor. round() sent halves to the even count until session 53
    (3 of 10 steps became 8 of 25, 5 of 10 12)."""
    share = count * target_steps / source_steps
    return math.floor(share + 1e-9) if within_budget else math.floor(share + 0.5)


def interpolated_positions(steps: list[int], source_steps: int, target_steps: int,
                           wanted: int) -> list[tuple[float, int]]:
    """``wanted`` (index into ``steps``, position in a ``target_steps`` trajectory) pairs, evenly spaced along the
    sorted ``steps`` of a ``source_steps`` one read as fractions of it (dense regions stay dense)."""
    fractions = [step / max(source_steps - 1, 1) for step in steps]
    pairs = []
    for i in range(wanted):
        index = i * (len(steps) - 1) / max(wanted - 1, 1)
        pairs.append((index, round(float(np.interp(index, range(len(steps)), fractions)) * (target_steps - 1))))
    return pairs


def nearest_free(step: int, taken: set[int], num_steps: int) -> int:
    """``step`` if free, else the closest free step in [0, num_steps) (later one first on ties)."""
    for distance in range(num_steps):
        for candidate in (step + distance, step - distance):
            if 0 <= candidate < num_steps and candidate not in taken:
                return candidate
    return step
