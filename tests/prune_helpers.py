"""Shared helpers of the prune tests: tiny calibrations and deterministic generation."""

from typing import Any

import torch

from diffusion_accel.calib import calibrate
from diffusion_accel.testing.tiny import tiny_call_kwargs

PIPELINE_ONLY_KWARGS = ("height", "width", "use_resolution_binning", "clean_caption")


def tiny_calibration(pipe: Any, family: str, steps: int = 2, **overrides: Any) -> Any:
    """A one-item calibration of a tiny pipeline with the kwargs its family needs."""
    options = dict(num_inference_steps=steps, progress=False, store_trajectory=False) | overrides
    if family == "dit":
        return calibrate(pipe, [1], guidance_scale=1.0, **options)
    if family == "ddpm":
        return calibrate(pipe, None, num_samples=1, **options)
    extra = {k: v for k, v in tiny_call_kwargs(family).items() if k in PIPELINE_ONLY_KWARGS}
    return calibrate(pipe, ["a red bicycle"], **options, **extra)


def generate(pipe: Any, family: str, steps: int = 2) -> torch.Tensor:
    """Images of one seeded tiny call (output_type "pt")."""
    return pipe(**tiny_call_kwargs(family, steps=steps)).images
