"""Which denoising steps to calibrate on, and how much each step weighs.

Step indices count denoiser steps within one pipeline call: 0 is the first (noisiest) step and
``num_steps - 1`` the last. Selection follows Q-Diffusion; weighting follows OBS-Diff. A call with
``num_inference_steps=N`` makes ``denoiser_steps(pipe, N)`` of them: N for first-order schedulers,
2N - 1 for Heun / KDPM2, N + 1 for PNDM without its Runge-Kutta warm-up (SD 1.5's default), more with it.
"""

from __future__ import annotations

import copy
import math
from typing import Any
from collections.abc import Sequence

import torch

from ..scalars import is_finite_number, plain_values

SELECTION_FORMS = ('"all"', '"uniform:K"', '"every:K"', "a list of step indices")
WEIGHTING_SCHEMES = ("uniform", "linear", "log-decrease", "log-increase")


def denoiser_steps(pipe: Any, num_inference_steps: int, timesteps: Sequence[float] | None = None,
                   sigmas: Sequence[float] | None = None) -> int:
    """Denoiser calls per item in one call of ``pipe`` with ``num_inference_steps``: the length of its
    scheduler's timesteps once set (a copy of the scheduler is set, never the pipeline's own).

    A call with custom ``timesteps`` / ``sigmas`` (diffusers' ``retrieve_timesteps``) sets those instead:
    until session 27 the count ignored them (3 custom timesteps were planned as 10 steps). Schedulers
    that need more than the step count to set their timesteps (Flux's dynamic shifting needs ``mu``,
    which does not change their length) are set with ``mu=0``; where even that fails, or the pipeline
    has no scheduler, the answer is ``num_inference_steps`` (or the custom schedule's length).
    """
    _check_num_steps(num_inference_steps)
    custom = {"timesteps": list(timesteps)} if timesteps is not None else \
        {"sigmas": list(sigmas)} if sigmas is not None else {}
    fallback = len(next(iter(custom.values()))) if custom else num_inference_steps
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "set_timesteps"):
        return fallback
    probe = copy.deepcopy(scheduler)
    for extra in ({}, {"mu": 0.0}):
        try:
            probe.set_timesteps(**(custom or {"num_inference_steps": num_inference_steps}), **extra)
        except (TypeError, ValueError):
            continue
        found = getattr(probe, "timesteps", None)
        if isinstance(found, torch.Tensor) and found.numel() > 0:
            return int(found.numel())
    return fallback


def select_steps(num_steps: int, selection: str | Sequence[int] = "all") -> list[int]:
    """Sorted step indices in ``[0, num_steps)`` chosen by ``selection``.

    - ``"all"``: every step.
    - ``"uniform:K"``: K calibration steps spaced as Q-Diffusion does,
      ``range(0, num_steps, num_steps // K)`` (this yields more than K steps when K does not
      divide ``num_steps``, exactly like the authors' code).
    - ``"every:K"``: every K-th step starting at 0.
    - a list of ints: exactly those steps (duplicates removed).
    """
    _check_num_steps(num_steps)
    selection = plain_values(selection)  # numpy arrays and integers, as numpy-driven sweeps pass them
    if isinstance(selection, str):
        return _select_by_name(num_steps, selection)
    if isinstance(selection, Sequence):
        return _select_explicit(num_steps, selection)
    raise TypeError(f"steps selection must be a string or a list of ints, got {type(selection).__name__}; "
                    f"accepted: {', '.join(SELECTION_FORMS)}")


MAX_STEPS = 100_000  # denoiser calls per pipeline call; a step list past it is a typo or a hostile artifact (2e9 ~ 70 GB)


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be an int in [1, {MAX_STEPS}], got {num_steps!r}")


def _select_by_name(num_steps: int, selection: str) -> list[int]:
    if selection == "all":
        return list(range(num_steps))
    kind, _, count_text = selection.partition(":")
    if kind not in ("uniform", "every") or not count_text.strip().isdigit():
        raise ValueError(f"unknown steps selection {selection!r}; accepted: {', '.join(SELECTION_FORMS)}")
    count = int(count_text)
    if not 1 <= count <= num_steps:
        raise ValueError(f"K in steps selection {selection!r} must be in [1, {num_steps}] "
                         f"for {num_steps} denoiser steps per call")
    stride = num_steps // count if kind == "uniform" else count
    return list(range(0, num_steps, stride))


def _select_explicit(num_steps: int, selection: Sequence[int]) -> list[int]:
    if len(selection) == 0:
        raise ValueError("steps selection list is empty; give at least one step index")
    for value in selection:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"step indices must be ints, got {value!r} ({type(value).__name__})")
        if not 0 <= value < num_steps:
            raise ValueError(f"step index {value} is out of range; valid step indices are "
                             f"0..{num_steps - 1} for {num_steps} denoiser steps per call")
    return sorted(set(selection))


def step_weights(num_steps: int, scheme: str = "uniform", w_min: float = 0.8,
                 w_max: float = 1.2) -> torch.Tensor:
    """Per-step weights, shape (num_steps,), float32; index 0 is the noisiest step.

    - ``uniform``: all 1.
    - ``linear``: from ``w_max`` at step 0 down to ``w_min`` at the last step.
    - ``log-decrease`` (OBS-Diff): ``w_k = w_min + (w_max - w_min) * ln(T - k) / ln T``.
    - ``log-increase``: the mirror image, ``w_min + (w_max - w_min) * ln(k + 1) / ln T``.
    With a single step every non-uniform scheme gives ``w_max``.
    """
    _check_num_steps(num_steps)
    _check_weight_range(w_min, w_max)
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"unknown step weighting {scheme!r}; accepted: {', '.join(WEIGHTING_SCHEMES)}")
    if scheme == "uniform":
        return torch.ones(num_steps, dtype=torch.float32)
    if num_steps == 1:
        return torch.full((1,), float(w_max), dtype=torch.float32)
    k = torch.arange(num_steps, dtype=torch.float64)
    if scheme == "linear":
        fraction = 1.0 - k / (num_steps - 1)
    else:
        fraction = torch.log(num_steps - k) / math.log(num_steps)
        if scheme == "log-increase":
            fraction = fraction.flip(0)
    return (w_min + (w_max - w_min) * fraction).to(torch.float32)


def _check_weight_range(w_min: float, w_max: float) -> None:
    values_ok = all(is_finite_number(v) for v in (w_min, w_max))
    if not values_ok or w_min < 0 or w_max < w_min or w_max <= 0:
        raise ValueError(f"step weights need finite 0 <= w_min <= w_max with w_max > 0, "
                         f"got w_min={w_min!r}, w_max={w_max!r}")


def resolve_weights(num_steps: int, weighting: str | Sequence[float],
                    weight_range: tuple[float, float] = (0.8, 1.2)) -> torch.Tensor:
    """Weights (num_steps,) from a scheme name or an explicit per-step sequence of floats >= 0."""
    weighting, weight_range = plain_values(weighting), plain_values(weight_range)  # numpy arrays and scalars too
    if isinstance(weighting, str):
        if not isinstance(weight_range, (tuple, list)) or len(weight_range) != 2:
            raise ValueError(f"weight_range must be (w_min, w_max), got {weight_range!r}")
        return step_weights(num_steps, weighting, *weight_range)
    if not isinstance(weighting, (tuple, list, torch.Tensor)):
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTING_SCHEMES)} or one weight per step, "
                         f"got {weighting!r}")
    values = torch.as_tensor(list(weighting), dtype=torch.float32)
    if values.ndim != 1 or len(values) != num_steps:
        raise ValueError(f"explicit step weights need {num_steps} values (one per denoiser step), "
                         f"got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"explicit step weights must be finite, >= 0 and not all 0, got {values.tolist()}")
    return values
