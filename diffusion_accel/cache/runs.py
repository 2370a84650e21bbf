"""Running a pipeline over calibration inputs and collecting its final outputs.

The calls are planned by ``calib.inputs`` (the same mapping of prompts / class ids / sample counts to
pipeline arguments that ``calibrate`` uses); call k is seeded ``seed + k`` so runs are comparable.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import PIL.Image
import torch

from ..arch import find_denoiser
from ..calib.call_state import processors_restored_on_error
from ..calib.inputs import UNSET, calibration_items, placeholder_prompts, plan_calls
from ..calib.runner import restore_scheduler_state, scheduler_state, silent_pipeline_bar
from ..seeding import seeded_call
from ..uncompiled import uncompiled


def planned_calls(pipe: Any, prompts: Any, num_inference_steps: int, seed: int = 0,
                  num_samples: int | None = None, guidance_scale: float | None = None,
                  negative_prompt: Any = UNSET, batch_size: int = 1, **call_kwargs: Any) -> list:
    """The calibration calls (``batch_size`` prompts / classes / samples per call) with their seeds; pass the
    sampling settings the pipeline will run with (``height``/``width``, Flux's ``true_cfg_scale`` with
    ``negative_prompt``), since pipeline defaults may differ (Flux defaults to 1024×1024)."""
    if "num_images_per_prompt" in call_kwargs:  # calibrate's own message named an argument these callers lack
        raise ValueError(f"num_images_per_prompt={call_kwargs['num_images_per_prompt']!r}: cache calibration runs one "
                         f"image per prompt (a schedule fits any batch); give more prompts, or batch_size for "
                         f"several prompts per call")
    prompts, num_samples = placeholder_prompts(prompts, num_samples)  # [None] * N, as prompts.for_pipeline gives
    items = calibration_items(pipe, prompts, num_samples)
    return plan_calls(pipe, items, num_inference_steps=num_inference_steps, batch_size=batch_size,
                      num_images_per_prompt=1, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                      seed=seed, call_kwargs=call_kwargs)


@torch.no_grad()
def final_outputs(pipe: Any, calls: list, before_call: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """The final latents (or images) of every planned call, as float32 CPU tensors; the scheduler is left
    as it was (``calib.runner.scheduler_state``). ``before_call(index)`` runs before call ``index``."""
    outputs, saved_scheduler = [], scheduler_state(pipe)
    try:
        with uncompiled(pipe), silent_pipeline_bar(pipe), \
                processors_restored_on_error(find_denoiser(pipe)[1]):  # uncompiled: trial caches on a compiled
            # denoiser recompiled per schedule; the processors: a PAG call interrupted left its own installed
            for index, call in enumerate(calls):
                if before_call is not None:
                    before_call(index)
                result = seeded_call(pipe, call.kwargs | {"generator": torch.Generator().manual_seed(call.seed)},
                                     call.seed)
                images = result[0] if isinstance(result, tuple) else result.images
                outputs.append(_as_tensor(images))
    finally:
        restore_scheduler_state(pipe, saved_scheduler)
    return outputs


def _as_tensor(images: Any) -> torch.Tensor:
    """A call's output images as a float32 CPU tensor; PIL images (``output_type="pil"`` in the call arguments,
    a RuntimeError "Could not infer dtype of Image" until session 52) as (N, H, W, C) values in [0, 1]."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
        return torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images]))
    return torch.as_tensor(images).detach().float().cpu()


def relative_error(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """Mean over calls of ||out - ref|| / ||ref|| (L2)."""
    errors = [float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-12))
              for o, r in zip(outputs, references)]
    return sum(errors) / len(errors)
