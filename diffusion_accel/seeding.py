"""Seeded pipeline calls that also pin the global RNG, and leave the caller's stream as it was.

Pipelines seed their initial noise from ``generator=``, but some samplers draw their per-step noise
from torch's global RNG: FluxPipeline calls ``scheduler.step`` without the generator, so
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` gave other images for the same seed
(relative error 0.35 between two identical calls on fashion-flux). A calibrated cache schedule was then
searched on noise, and calibration moved the user's RNG. Each seeded call of ours now runs in
``seeded_global_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .pipeline_defaults import image_input_hint


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Within the block the global CPU RNG (and every initialised CUDA device's) starts from ``seed``; after
    it, their states are what they were before."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


def seeded_call(pipe: Any, kwargs: dict[str, Any], seed: int) -> Any:
    """``pipe(**kwargs)`` inside ``seeded_global_rng(seed)`` (a missing image input of an image-conditioned
    pipeline named, ``image_input_hint``): how calibration, schedule search and evaluation call pipelines."""
    with image_input_hint(pipe, kwargs), seeded_global_rng(seed):
        return pipe(**kwargs)
