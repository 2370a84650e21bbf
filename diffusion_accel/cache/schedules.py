"""Which denoising steps run the full denoiser: uniform, non-uniform (DeepCache) and resampled."""

from __future__ import annotations

import math

import numpy as np


def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
    """Steps 0, interval, 2*interval, ... below ``num_steps``."""
    return list(range(0, num_steps, interval))


POWER_TRIES = 200  # powers lowered by 0.05 at most this often before even spacing


def nonuniform_full_steps(num_steps: int, interval: int, center: float = 0.3,
                          power: float = 1.4) -> list[int]:
    """ceil(num_steps / interval) full steps, dense near ``center * num_steps``, sparse far from it.

    Offsets from the center are ``sign(u) * |u| ** power`` for ``u`` evenly spaced; if rounding
    makes two steps collide the power is lowered towards 1 (even spacing). Step 0 is always full.
    """
    count = min(num_steps, math.ceil(num_steps / interval))
    if count >= num_steps:
        return list(range(num_steps))
    middle = center * (num_steps - 1)
    for lowered in range(POWER_TRIES):  # bounded: power 1e6 took 2e7 tries, inf never ended
        candidate = power - 0.05 * lowered
        if candidate <= 1.0:
            break
        steps = _power_spaced(num_steps, count, middle, candidate)
        if len(steps) == count:
            return steps
    return _power_spaced(num_steps, count, 0.0, 1.0) if count > 1 else [0]


def _power_spaced(num_steps: int, count: int, middle: float, power: float) -> list[int]:
    """Distinct steps at ``middle + sign(u) |u|^power``; u spans [0, num_steps - 1] after mapping."""
    low = -(middle ** (1.0 / power))
    high = (num_steps - 1 - middle) ** (1.0 / power)
    points = [low + (high - low) * i / (count - 1) for i in range(count)] if count > 1 else [low]
    steps = {0}
    for u in points[1:]:
        steps.add(min(num_steps - 1, max(0, int(round(middle + math.copysign(abs(u) ** power, u))))))
    return sorted(steps)


def resample_full_steps(full_steps: tuple[int, ...], source_steps: int, target_steps: int) -> list[int]:
    """Map a schedule of ``source_steps`` onto ``target_steps``, keeping the fraction of full steps.

    The full steps are read as positions in [0, 1] of the trajectory; the target takes
    floor(count * target / source) positions, at least one (as ``calibrate_schedule`` buys full steps: never more
    than the fraction; round() sent halves to the even count until session 53, 3 of 10 steps to 8 of 25),
    interpolated along them (so dense regions stay dense), each rounded to the nearest free step. Step 0 stays full.
    """
    if target_steps == source_steps:
        return sorted(full_steps)
    wanted = min(target_steps, max(1, resampled_count(len(full_steps), source_steps, target_steps)))
    chosen: set[int] = set()
    for _, position in interpolated_positions(sorted(full_steps), source_steps, target_steps, wanted):
        chosen.add(nearest_free(position, chosen, target_steps))
    return sorted(chosen)


def resampled_count(count: int, source_steps: int, target_steps: int) -> int:
    """How many of ``count`` steps of a ``source_steps`` schedule a ``target_steps`` one keeps: floor of their share,
    never more (round() sent halves to the even count until session 53)."""
    return math.floor(count * target_steps / source_steps + 1e-9)


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
