"""The drop-in contract, as reusable checks: a transformed pipeline is still the same pipeline.

Every technique's tests call :func:`check_drop_in` with a transform (``quantize_``, ``prune_``,
``enable_cache``, ``calibrate``...). The checks: same object, same class, ``__call__`` untouched;
``output_type`` pil/np/pt/latent, ``return_dict=False``, ``num_images_per_prompt``, ``generator``
determinism, user ``latents``, ``negative_prompt`` and ``guidance_scale`` (still steering the images),
``guidance_scale <= 1`` (no CFG), ``callback_on_step_end`` and ``.to(dtype)`` keep working.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .tiny import build_tiny, tiny_call_kwargs

# What each family's diffusers pipeline accepts (DiT and DDPM are older, smaller interfaces).
CFG_FAMILIES = ("sd", "sdxl", "sd3", "pixart")          # negative_prompt + guidance_scale
PROMPT_FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")
LATENT_OUTPUT_FAMILIES = PROMPT_FAMILIES                # output_type="latent"
CALLBACK_FAMILIES = ("sd", "sdxl", "sd3", "flux")       # callback_on_step_end
USER_LATENTS_FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")


def _call(pipe: Any, family: str, **overrides: Any) -> Any:
    kwargs = tiny_call_kwargs(family, steps=2, seed=overrides.pop("seed", 0))
    kwargs.update(overrides)
    return pipe(**kwargs)


def _images(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output.images


def check_identity(pipe: Any, transformed: Any, original_class: type) -> None:
    """The transform returned the same object, of the same class, with ``__call__`` untouched."""
    if transformed is not pipe:
        raise AssertionError("the transform must return the pipeline object it was given")
    if type(pipe) is not original_class:
        raise AssertionError(f"class changed from {original_class.__name__} to {type(pipe).__name__}")
    if "__call__" in vars(pipe) or type(pipe).__call__ is not original_class.__call__:
        raise AssertionError("__call__ was patched")


def check_output_types(pipe: Any, family: str) -> None:
    """pil, np, pt and latent outputs have the types and shapes diffusers documents."""
    pil = _images(_call(pipe, family, output_type="pil"))
    if not (isinstance(pil, list) and isinstance(pil[0], Image.Image)):
        raise AssertionError(f"output_type='pil' gave {type(pil)}")
    array = _images(_call(pipe, family, output_type="np"))
    if not (isinstance(array, np.ndarray) and array.ndim == 4 and array.shape[-1] == 3):
        raise AssertionError(f"output_type='np' gave {type(array)} {getattr(array, 'shape', None)}")
    tensor = _images(_call(pipe, family, output_type="pt"))
    if not (isinstance(tensor, torch.Tensor) and tensor.shape[1] == 3):
        raise AssertionError(f"output_type='pt' gave {type(tensor)} {getattr(tensor, 'shape', None)}")
    if family in LATENT_OUTPUT_FAMILIES:
        latent = _images(_call(pipe, family, output_type="latent"))
        if not isinstance(latent, torch.Tensor):
            raise AssertionError(f"output_type='latent' gave {type(latent)}")


def check_determinism_and_return_dict(pipe: Any, family: str) -> None:
    """Same generator seed gives identical images, also across calls; return_dict=False a tuple."""
    first = _images(_call(pipe, family))
    second = _images(_call(pipe, family))
    if not torch.equal(first, second):
        raise AssertionError("repeated calls with the same seed gave different images")
    as_tuple = _call(pipe, family, return_dict=False)
    if not isinstance(as_tuple, tuple) or not torch.equal(as_tuple[0], first):
        raise AssertionError("return_dict=False must give a tuple whose first item is the images")


def check_prompt_options(pipe: Any, family: str) -> None:
    """num_images_per_prompt gives that many different images; negative_prompt and guidance_scale still steer
    them (a pipeline whose CFG became a no-op passed a shape-only check); guidance_scale <= 1 works."""
    if family not in PROMPT_FAMILIES:
        return
    two = _images(_call(pipe, family, num_images_per_prompt=2))
    if two.shape[0] != 2 or torch.equal(two[0], two[1]):
        raise AssertionError(f"num_images_per_prompt=2 gave {two.shape[0]} images, expected 2 different ones")
    if family in CFG_FAMILIES:
        negative = _images(_call(pipe, family, negative_prompt="blurry", guidance_scale=5.0))
        other_negative = _images(_call(pipe, family, negative_prompt="a red bicycle, bright", guidance_scale=5.0))
        stronger = _images(_call(pipe, family, negative_prompt="blurry", guidance_scale=9.0))
        without_cfg = _images(_call(pipe, family, guidance_scale=1.0))
        if negative.shape != without_cfg.shape:
            raise AssertionError("negative_prompt / guidance_scale=1 changed the output shape")
        if torch.equal(negative, other_negative) or torch.equal(negative, stronger):
            raise AssertionError("negative_prompt or guidance_scale no longer changes the images: CFG is a no-op")


def check_latents_and_callback(pipe: Any, family: str) -> None:
    """User-given latents are honoured and callback_on_step_end runs once per step."""
    steps_seen: list[int] = []

    def on_step_end(_pipe: Any, step: int, _timestep: Any, callback_kwargs: dict) -> dict:
        steps_seen.append(step)
        return callback_kwargs

    if family in CALLBACK_FAMILIES:
        _call(pipe, family, callback_on_step_end=on_step_end)
        if steps_seen != [0, 1]:
            raise AssertionError(f"callback_on_step_end saw steps {steps_seen}, expected [0, 1]")
    if family in USER_LATENTS_FAMILIES:
        latents = _initial_latents(pipe, family)
        first = _images(_call(pipe, family, latents=latents.clone(), seed=1))
        second = _images(_call(pipe, family, latents=latents.clone(), seed=2))
        if not torch.equal(first, second):
            raise AssertionError("given latents must make the generator seed irrelevant")


def _initial_latents(pipe: Any, family: str) -> torch.Tensor:
    """Random starting latents of the shape ``family``'s pipeline expects for the tiny call."""
    captured: dict[str, torch.Tensor] = {}

    def capture(_pipe: Any, step: int, _timestep: Any, callback_kwargs: dict) -> dict:
        captured.setdefault("latents", callback_kwargs["latents"])
        return callback_kwargs

    if family in CALLBACK_FAMILIES:
        _call(pipe, family, callback_on_step_end=capture, num_inference_steps=1)
        return torch.randn_like(captured["latents"])
    channels = pipe.transformer.config.in_channels
    return torch.randn(1, channels, 32 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor)


def check_to_dtype(pipe: Any, family: str) -> None:
    """``.to(dtype)`` round trip keeps the pipeline usable."""
    pipe.to(torch.float32)
    images = _images(_call(pipe, family))
    if not torch.isfinite(images).all():
        raise AssertionError("non-finite images after .to(torch.float32)")


def check_drop_in(family: str, transform: Callable[[Any], Any], seed: int = 0) -> Any:
    """Build the tiny ``family`` pipeline, apply ``transform`` and run every contract check."""
    pipe = build_tiny(family, seed=seed)
    original_class = type(pipe)
    transformed = transform(pipe)
    check_identity(pipe, transformed, original_class)
    for check in (check_output_types, check_determinism_and_return_dict, check_prompt_options,
                  check_latents_and_callback, check_to_dtype):
        check(pipe, family)
    return pipe
