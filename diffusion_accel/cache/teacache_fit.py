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
from .apply import enable_cache, remove_cache
from .configs import TeaCacheConfig
from .runs import final_outputs, planned_calls
from .session import get_session


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


def fit_teacache_coefficients(pipe: Any, prompts: Any, num_inference_steps: int = 25, degree: int = 4,
                              seed: int = 0, **call_kwargs: Any) -> tuple[float, ...]:
    """Polynomial coefficients (highest power first) for ``TeaCacheConfig(coefficients=...)``."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an int >= 1, got {degree!r}")
    xs, ys = teacache_samples(pipe, prompts, num_inference_steps, seed=seed, **call_kwargs)
    if len(xs) <= degree:
        raise ValueError(f"only {len(xs)} calibration points for a degree-{degree} fit; use more "
                         f"prompts or steps, or a lower degree")
    return tuple(float(c) for c in np.polyfit(np.asarray(xs), np.asarray(ys), degree))
