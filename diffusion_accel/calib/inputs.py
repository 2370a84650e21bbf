"""Turning calibration inputs into pipeline calls, for the three kinds of diffusers pipelines.

The kind is read from the pipeline's ``__call__`` signature, not its class:

- ``"prompt"`` (text-to-image: SD, SDXL, SD3, Flux, PixArt, ...): ``prompts`` are strings; a call
  gets ``prompt=[...]``, ``negative_prompt``, ``num_images_per_prompt`` and ``guidance_scale``,
  and ``output_type="latent"`` so the VAE decode is skipped.
- ``"class"`` (class-conditional: DiT): ``prompts`` are class ids or label names (looked up in
  ``pipe.labels``); each id is repeated ``num_images_per_prompt`` times in ``class_labels``.
- ``"unconditional"`` (DDPM, ...): ``prompts`` must be None; ``num_samples`` (default 1) items, each
  giving ``num_images_per_prompt`` images, are generated ``batch_size`` items per call.

Pipelines without a latent output (DiT decodes always, DDPM is pixel-space) get
``output_type="pt"`` to skip the PIL conversion. ``call_kwargs`` may override ``output_type``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..argtypes import SEED_LIMIT
from ..arch.registry import UnsupportedModelError, get_adapter
from ..pipeline_defaults import (OTHER_PROMPTS, call_defaults, check_call_arguments, check_guidance_scale_is_read,
                                 is_prompt_batch, odd_image_list, per_prompt_image_arguments, per_prompt_images,
                                 per_prompt_negative, per_prompt_values, prompt_rows, repeat_rows, with_tuples)
from ..scalars import is_finite_number, plain_number
from ..stacklevel import user_stacklevel

CALL_MODES = ("prompt", "class", "unconditional")
RESERVED_KWARGS = {
    "prompt": "prompts", "negative_prompt": "negative_prompt", "class_labels": "prompts",
    "batch_size": "num_samples and batch_size", "num_images_per_prompt": "num_images_per_prompt",
    "guidance_scale": "guidance_scale", "generator": "seed", "num_inference_steps": "num_inference_steps",
    # text embeddings beside the prompts failed in the first call ("Cannot forward both"), printing the tensor
    "prompt_embeds": "prompts", "negative_prompt_embeds": "negative_prompt", "pooled_prompt_embeds": "prompts",
    "negative_pooled_prompt_embeds": "negative_prompt",
}


@dataclass(frozen=True)
class PlannedCall:
    """One pipeline call of a calibration: its keyword arguments (no generator), items, seed."""

    kwargs: dict[str, Any]
    num_items: int
    seed: int


def call_mode(pipe: Any) -> str:
    """"prompt", "class" or "unconditional", from the parameters of ``pipe.__call__``."""
    params = _call_parameters(pipe)
    if "prompt" in params:
        return "prompt"
    if "class_labels" in params:
        return "class"
    if "batch_size" in params:
        return "unconditional"
    raise TypeError(f"{type(pipe).__name__}.__call__ takes none of 'prompt', 'class_labels' or "
                    f"'batch_size'; calibrate supports text-to-image, class-conditional and "
                    f"unconditional diffusers pipelines")


def _call_parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def calibration_items(pipe: Any, prompts: Any, num_samples: int | None) -> list[Any]:
    """The per-item inputs (prompt strings, class ids, or None per unconditional sample)."""
    mode = call_mode(pipe)
    if mode == "unconditional":
        return _unconditional_items(pipe, prompts, num_samples)
    if num_samples is not None:
        raise ValueError(f"num_samples is for unconditional pipelines; {type(pipe).__name__} takes "
                         f"{'prompts' if mode == 'prompt' else 'class ids or labels'} via `prompts`")
    if mode == "prompt":
        return _prompt_items(prompts)
    return _class_items(pipe, prompts)


def _as_list(values: Any, what: str) -> list[Any]:
    if values is None:
        raise ValueError(f"calibration needs {what}; got None")
    items = [values] if isinstance(values, (str, int)) else list(values)
    if not items:
        raise ValueError(f"calibration needs at least one of {what}; got an empty list")
    return items


def _prompt_items(prompts: Any) -> list[str]:
    items = _as_list(prompts, "prompts (strings)")
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"prompts must be strings, got {item!r} ({type(item).__name__})")
    return items


def _class_items(pipe: Any, prompts: Any) -> list[int]:
    labels = getattr(pipe, "labels", None) or {}
    ids = []
    for item in _as_list(prompts, "class ids or label names (`prompts`)"):
        item = plain_number(item)  # numpy ids, as DiTPipeline and evaluate take them
        if isinstance(item, str):
            if item not in labels:
                raise ValueError(f"unknown class label {item!r}; known labels: {sorted(labels)}")
            item = labels[item]
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise TypeError(f"class ids must be ints >= 0 or label strings, got {item!r}")
        ids.append(int(item))
    check_class_ids(pipe, ids)
    return ids


def check_class_ids(pipe: Any, ids: Sequence[int]) -> None:
    """ValueError for class ids ``pipe``'s denoiser has no class for: negative, or past its class count (1000 is
    DiT's unconditional (CFG) label: its images are not of a class; larger ids failed inside the embedding)."""
    classes = class_count(pipe)
    beyond = [item for item in ids if item < 0 or (classes is not None and item >= classes)]
    if beyond:
        accepted = f"{type(pipe).__name__} has {classes} classes (ids 0..{classes - 1})" if classes is not None \
            else "class ids are ints >= 0"
        raise ValueError(f"class ids {beyond[:5]} are out of range: {accepted}")


def default_calibration_items(pipe: Any, count: int) -> dict[str, Any]:
    """``calibrate`` keyword arguments giving ``count`` default items for ``pipe``'s call mode: its bundled
    prompts or class ids, repeated up to ``count`` (quantize_ stopped at the set's end, 10 fashion prompts for
    calib_prompts 32, and ran past a DiT's classes; prune_ repeated them: one function since session 49), or
    ``count`` unconditional samples."""
    from .. import prompts as prompt_sets

    mode = call_mode(pipe)
    if mode == "unconditional":
        return {"prompts": None, "num_samples": count}
    items = list(range(class_count(pipe) or count)) if mode == "class" else prompt_sets.for_pipeline(pipe, limit=count)
    return {"prompts": [items[index % len(items)] for index in range(count)]}


def class_count(pipe: Any) -> int | None:
    """Classes of a class-conditional pipeline's denoiser (its adapter's ``num_classes``), None if unknown
    (no class labels, or no adapter for the denoiser)."""
    try:
        return get_adapter(pipe).num_classes()
    except UnsupportedModelError:
        return None


def placeholder_prompts(prompts: Any, num_samples: int | None) -> tuple[Any, int | None]:
    """A list of Nones (what ``prompts.for_pipeline`` gives an unconditional pipeline) becomes
    ``(None, its length)``; anything else passes through unchanged."""
    if not (isinstance(prompts, (list, tuple)) and prompts and all(item is None for item in prompts)):
        return prompts, num_samples
    if num_samples is not None and num_samples != len(prompts):
        raise ValueError(f"num_samples={num_samples} but {len(prompts)} placeholder prompts (None); give one of them")
    return None, len(prompts)


class PromptsForUnconditionalError(TypeError, ValueError):
    """Prompts given to an unconditional pipeline: a TypeError of the Python call, and a ValueError, the command
    line's bad-input error (``calibrate --pipe zoo:mnist-ddpm --prompts default`` ended in a traceback)."""


def _unconditional_items(pipe: Any, prompts: Any, num_samples: int | None) -> list[None]:
    if prompts is not None:
        raise PromptsForUnconditionalError(
            f"{type(pipe).__name__} is unconditional and takes no prompts; pass prompts=None and num_samples=N "
            f"(command line: drop --prompts, and --num-prompts N sets the number of samples)")
    count = 1 if num_samples is None else num_samples
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    return [None] * count


class _Unset:
    """The default of calibration's ``negative_prompt``: the pipeline's own applies (fashion-flux's "", which runs
    true CFG), where an explicit None turns it off as it does in evaluate (``--call negative_prompt=null`` was
    indistinguishable from no value: calibrated with true CFG what the evaluation ran without)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


def plan_calls(pipe: Any, items: list[Any], *, num_inference_steps: int, batch_size: int,
               num_images_per_prompt: int, guidance_scale: float | None,
               negative_prompt: str | Sequence[str] | None, seed: int,
               call_kwargs: dict[str, Any]) -> list[PlannedCall]:
    """Split ``items`` into pipeline calls of ``batch_size`` items; call k is seeded ``seed + k``. ``negative_prompt``
    UNSET keeps the pipeline's default, None drops it."""
    drop_negative, negative_prompt = negative_prompt is None, None if negative_prompt is UNSET else negative_prompt
    mode, params = call_mode(pipe), _call_parameters(pipe)
    _check_counts(batch_size, num_images_per_prompt, seed)
    _check_call_kwargs(pipe, call_kwargs)
    _check_options(pipe, mode, params, num_images_per_prompt, guidance_scale, negative_prompt, len(items))
    _check_other_prompts(call_kwargs, len(items))
    # a MultiControlNet's control images: one per ControlNet, left whole
    split_images = per_prompt_image_arguments(pipe) if mode == "prompt" else ()
    _check_image_lists(call_kwargs, len(items), split_images)
    shared = {"num_inference_steps": num_inference_steps}
    if "output_type" in params:
        shared["output_type"] = "latent" if mode == "prompt" else "pt"
    shared.update(call_defaults(pipe))  # the pipeline's own settings, beneath the explicit ones
    if drop_negative:
        shared.pop("negative_prompt", None)
    if guidance_scale is not None:
        shared["guidance_scale"] = guidance_scale
    shared.update(with_tuples(pipe, call_kwargs))
    _warn_if_cfg_is_off(pipe, params, shared.get("guidance_scale"))
    calls = []
    for index, start in enumerate(range(0, len(items), batch_size)):
        chunk = slice(start, start + batch_size)
        kwargs = shared | _batch_inputs(mode, items[chunk], num_images_per_prompt, negative_prompt, chunk)
        if mode == "prompt" and isinstance(kwargs.get("negative_prompt"), str):  # a zoo default's or --call's:
            # one per prompt, as an explicit one (Flux failed on a string with num_images_per_prompt > 1)
            kwargs["negative_prompt"] = per_prompt_negative(kwargs["negative_prompt"], len(items[chunk]))
        if mode == "prompt":  # the other towers' texts follow the prompts of the call
            indices = range(len(items))[chunk]
            kwargs |= {name: per_prompt_values(shared[name], indices, len(items))
                       for name in OTHER_PROMPTS if name in shared}
        kwargs |= {name: per_prompt_images(shared[name], range(len(items))[chunk])
                   for name in split_images if isinstance(shared.get(name), (list, tuple))}
        kwargs |= {name: prompt_rows(shared[name], range(len(items))[chunk], len(items))
                   for name in split_images if is_prompt_batch(shared.get(name), len(items))}
        calls.append(PlannedCall(kwargs=_rows_per_image(kwargs, split_images), num_items=len(items[chunk]),
                                 seed=seed + index))
    return calls


def _rows_per_image(kwargs: dict[str, Any], image_names: Sequence[str]) -> dict[str, Any]:
    """A call of several prompts, each with its own input image, and ``num_images_per_prompt`` > 1, as one row per
    image: every prompt, per-prompt text and image repeated ``num_images_per_prompt`` times in a row, one image per
    prompt (the same latents: one generator, one batch). diffusers tiles such image lists ([A, B] -> A, B, A, B
    against prompts p0, p0, p1, p1: instruct-pix2pix, inpainting) where ControlNets repeat each image: half the
    rows paired a prompt with another's image or mask until session 52."""
    per_image, prompts = kwargs.get("num_images_per_prompt", 1), len(kwargs.get("prompt") or ())
    images = [name for name in image_names if isinstance(kwargs.get(name), list) and len(kwargs[name]) > 1]
    batches = [name for name in image_names if is_prompt_batch(kwargs.get(name), prompts)]  # one per prompt
    if per_image == 1 or not images + batches:
        return kwargs
    repeated = {name: [value for value in kwargs[name] for _ in range(per_image)]
                for name in ("prompt", "negative_prompt", *OTHER_PROMPTS, *images)
                if isinstance(kwargs.get(name), list)}
    repeated |= {name: repeat_rows(kwargs[name], per_image) for name in batches}
    return {name: value for name, value in kwargs.items() if name != "num_images_per_prompt"} | repeated


def _embeds_guidance(pipe: Any) -> bool:
    try:
        return get_adapter(pipe).embeds_guidance
    except UnsupportedModelError:
        return False


def _warn_if_cfg_is_off(pipe: Any, params: dict[str, inspect.Parameter], guidance: Any) -> None:
    """Warn when the calibration turns classifier-free guidance off (guidance_scale <= 1) for a pipeline that
    guides by default: the unconditional branch its calls run is then never observed (a tiny DiT's W8A8 fell
    from 56 to 27-29 dB PSNR with CFG on, session 31 probe). Pipelines whose denoiser embeds guidance_scale
    (the adapter's ``embeds_guidance``: every Flux pipeline, FluxFill / FluxControl too, which have no
    ``true_cfg_scale`` and got this warning until session 51) are left alone."""
    parameter = params.get("guidance_scale")
    if parameter is None or not isinstance(guidance, (int, float)) or guidance > 1 or _embeds_guidance(pipe):
        return
    default = call_defaults(pipe).get("guidance_scale", parameter.default)
    if isinstance(default, (int, float)) and default > 1:
        warnings.warn(f"calibrating {type(pipe).__name__} with guidance_scale={guidance} runs no classifier-free "
                      f"guidance, while its default ({default}) does: the unconditional branch is never observed, "
                      f"and accelerated calls with CFG will be less accurate; calibrate at the guidance you "
                      f"generate with", stacklevel=user_stacklevel())


def _batch_inputs(mode: str, batch: list[Any], per_item: int, negative_prompt: Any,
                  chunk: slice) -> dict[str, Any]:
    if mode == "unconditional":
        return {"batch_size": len(batch) * per_item}
    if mode == "class":
        return {"class_labels": [label for label in batch for _ in range(per_item)]}
    inputs: dict[str, Any] = {"prompt": list(batch)}
    if per_item != 1:
        inputs["num_images_per_prompt"] = per_item
    if negative_prompt is not None:
        inputs["negative_prompt"] = per_prompt_negative(negative_prompt, len(batch)) if isinstance(negative_prompt, str) \
            else list(negative_prompt[chunk])
    return inputs


MAX_SEED = SEED_LIMIT  # the --seed flag's bound too


def _check_counts(batch_size: int, num_images_per_prompt: int, seed: int) -> None:
    for label, value, low in (("batch_size", batch_size, 1), ("num_images_per_prompt", num_images_per_prompt, 1),
                              ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    if seed > MAX_SEED:  # call k is seeded seed + k; torch generators overflowed past 2**64 - 1
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")


def _check_call_kwargs(pipe: Any, call_kwargs: dict[str, Any]) -> None:
    for key in call_kwargs:
        if key in RESERVED_KWARGS:
            raise TypeError(f"do not pass {key!r} as an extra pipeline argument; calibrate sets it "
                            f"from its own argument(s): {RESERVED_KWARGS[key]}")
    check_call_arguments(pipe, call_kwargs, "calibrate")


def _check_other_prompts(call_kwargs: dict[str, Any], num_items: int) -> None:
    """ValueError for a list of the other towers' texts (``prompt_2`` ...) that is not one per prompt, as for
    ``negative_prompt``: 2 of 4 paired every call with the same two texts, 2 of 3 failed inside the text encoder
    (until session 49)."""
    for key in OTHER_PROMPTS:
        value = call_kwargs.get(key)
        if isinstance(value, (list, tuple)) and (len(value) != num_items or not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{key} must be a string or a list of {num_items} strings (one per prompt), "
                             f"got {value!r:.80}")


def _check_image_lists(call_kwargs: dict[str, Any], num_items: int, names: Sequence[str]) -> None:
    """ValueError for a list of input images (``image``, ``mask_image``, ``control_image``) that is neither one image
    nor one per prompt: the whole list went to every call, which failed in the pipeline (512 vs 256 rows) or paired
    each prompt with the first image (until session 50)."""
    odd = odd_image_list(call_kwargs, num_items, names)
    if odd is not None:
        raise ValueError(f"{odd[0]} must be one image or a list of {num_items} (one per prompt), got a list of {odd[1]}")


def _check_options(pipe: Any, mode: str, params: dict[str, inspect.Parameter], per_item: int,
                   guidance_scale: float | None, negative_prompt: Any, num_items: int) -> None:
    name = type(pipe).__name__
    if guidance_scale is not None and "guidance_scale" not in params:
        raise ValueError(f"{name} has no guidance_scale; leave guidance_scale=None")
    if guidance_scale is not None:
        check_guidance_scale_is_read(pipe, "calibrate")
    if guidance_scale is not None and not (is_finite_number(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (or None for the pipeline's default), got "
                         f"{guidance_scale!r}")  # NaN / -1 ran without CFG, silently; inf overflowed the ranges
    if per_item != 1 and mode == "prompt" and "num_images_per_prompt" not in params:
        raise ValueError(f"{name} has no num_images_per_prompt; leave num_images_per_prompt=1")
    if negative_prompt is None:
        return
    if "negative_prompt" not in params:
        raise ValueError(f"{name} takes no negative_prompt; leave negative_prompt unset")
    if isinstance(negative_prompt, str):
        return
    negatives = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else None
    if negatives is None or len(negatives) != num_items or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt must be a string or a list of {num_items} strings "
                         f"(one per prompt), got {negative_prompt!r}")
