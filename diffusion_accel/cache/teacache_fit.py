"""Fitting TeaCache's rescaling polynomial for the model at hand from a calibration trajectory.

The uncached trajectory is run with a probe cache that computes every step and records, per step,
x = relative L1 change of block 0's modulated input and y = relative L1 change of the residual of
the following blocks (the quantity TeaCache reuses). ``numpy.polyfit(x, y, degree)`` maps one to
the other, so the accumulated sum estimates how far the reused residual has drifted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..arch import find_denoiser
from ..scalars import plain_number
from .apply import enable_cache, remove_cache
from .configs import TeaCacheConfig
from .runs import final_outputs, planned_calls
from .session import get_session


POINTS_PER_COEFFICIENT = 2  # a fit with fewer points per coefficient follows noise


def teacache_samples(pipe: Any, prompts: Any, num_inference_steps: int = 25, seed: int = 0,
                     **call_kwargs: Any) -> tuple[list[float], list[float]]:
    """Paired (input change, residual change) per step of the calibration trajectories."""
    if get_session(find_denoiser(pipe)[1]) is not None:
        raise ValueError("fit_teacache_coefficients needs a pipeline without a cache; call remove_cache first")
    calls = planned_calls(pipe, prompts, num_inference_steps, seed=seed, **call_kwargs)
    enable_cache(pipe, TeaCacheConfig(threshold=0.0))  # threshold 0: every step computes
    xs: list[float] = []
    ys: list[float] = []
    try:
        session = get_session(find_denoiser(pipe)[1])
        session.record_residuals = True
        for call in calls:
            final_outputs(pipe, [call])
            inputs = {(r.step, r.context): r.signal_change for r in session.records}
            for step, context, change in session.residual_changes:
                if inputs.get((step, context)) is not None:
                    xs.append(inputs[(step, context)])
                    ys.append(change)
    finally:
        remove_cache(pipe)
    return xs, ys


def check_degree(degree: Any) -> int:
    """``degree`` of the polynomial fit, checked: an int >= 1 (numpy integers too); ValueError otherwise."""
    degree = plain_number(degree)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an int >= 1, got {degree!r}")
    return degree


def fit_teacache_coefficients(pipe: Any, prompts: Any, num_inference_steps: int = 25, degree: int = 4,
                              seed: int = 0, **call_kwargs: Any) -> tuple[float, ...]:
    """Polynomial coefficients (highest power first) for ``TeaCacheConfig(coefficients=...)``: a degree-
    ``degree`` fit of the stack's output change against its modulated input's change, over uncached runs
    of ``prompts`` (``num_inference_steps`` steps, seeded from ``seed``, ``call_kwargs`` passed on)."""
    degree = check_degree(degree)
    num_inference_steps, seed = (plain_number(value) for value in (num_inference_steps, seed))
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise ValueError(f"num_inference_steps must be an int >= 2 (the fit needs changes between steps), "
                         f"got {num_inference_steps!r}")  # 0 was a ZeroDivisionError inside the pipeline
    xs, ys = teacache_samples(pipe, prompts, num_inference_steps, seed=seed, **call_kwargs)
    if len(xs) < POINTS_PER_COEFFICIENT * (degree + 1):
        raise ValueError(f"only {len(xs)} calibration points for a degree-{degree} fit (need at least "
                         f"{POINTS_PER_COEFFICIENT * (degree + 1)}); use more prompts or steps, or a lower degree")
    coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), degree)
    _check_non_negative(coefficients, (min(xs), max(xs)), degree, len(xs))
    return tuple(float(c) for c in coefficients)


def _check_non_negative(coefficients: np.ndarray, seen: tuple[float, float], degree: int, points: int) -> None:
    """The policy accumulates the polynomial's values: one that dips below zero over the changes ``seen`` (smallest,
    largest) never lets the sum reach the threshold, so every middle step was reused (a degree-4 fit to 6 points
    gave poly(0) = -1040). Below the smallest change seen the policy's clamp at 0 makes a dip harmless: checking
    from 0 refused a usable degree-1 fit, positive at every change seen (until session 49)."""
    grid = np.linspace(seen[0], seen[1], 257)
    values = np.polyval(coefficients, grid)
    rounding = 1e-9 * max(float(np.abs(values).max()), 1e-12)  # y = 2x fitted to poly(0) = -1e-16 on one numpy
    if values.min() < -rounding:
        where = float(grid[int(values.argmin())])
        raise ValueError(f"the degree-{degree} fit to {points} points is negative on the changes seen, "
                         f"[{seen[0]:.4g}, {seen[1]:.4g}] "
                         f"(minimum {values.min():.4g} at change {where:.4g}): TeaCache would accumulate "
                         f"nothing and reuse every step; use more prompts or steps, or a lower degree")
