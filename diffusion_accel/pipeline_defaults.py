"""Call settings a pipeline is meant to run with, carried on the pipeline object.

A zoo pipeline needs arguments diffusers' defaults do not give: fashion-flux was trained with a
32-token T5 (FluxPipeline pads to 512 tokens it never saw) and true CFG; fashion-sd's guidance scale
is 3.0, not 7.5. ``zoo.load`` tags its pipelines with them, and wherever diffusion_accel itself calls
a pipeline (``calibrate``, ``evaluate`` and so the CLI's demo, eval, grid and bench) they apply
beneath the caller's explicit arguments. Calling the pipeline yourself, pass them:
``pipe(prompt, **call_defaults(pipe))``.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
import warnings
from contextlib import contextmanager
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

import numpy as np
import torch

from .arch.registry import DENOISER_COMPONENTS
from .scalars import is_finite_number, plain_number
from .stacklevel import user_stacklevel

_ATTR = "_diffusion_accel_call_defaults"


def set_call_defaults(pipe: Any, defaults: dict[str, Any]) -> None:
    """Tag ``pipe`` with the keyword arguments it should be called with (a deep copy keeps them), and its
    denoiser too: a pipeline built from the components (``from_pipe``, ``Img2ImgPipeline(**components)``)
    is a new object, which lost them (fashion-flux's T5 length and true CFG, fashion-sd's CFG 3)."""
    setattr(pipe, _ATTR, dict(defaults))
    denoiser = _denoiser(pipe)
    if denoiser is not None:
        denoiser.__dict__[_ATTR] = dict(defaults)


def call_defaults(pipe: Any) -> dict[str, Any]:
    """The keyword arguments ``pipe`` was tagged with, else those of its denoiser (a pipeline sharing a
    tagged pipeline's denoiser); ``{}`` for an untagged pipeline."""
    tagged = getattr(pipe, _ATTR, None)
    if tagged is None:
        denoiser = _denoiser(pipe)
        tagged = None if denoiser is None else denoiser.__dict__.get(_ATTR)
    return dict(tagged or {})


def _denoiser(pipe: Any) -> Any:
    """``pipe.unet`` or ``pipe.transformer`` when it is a module (no adapter lookup: the tags go on the denoiser
    whether or not an adapter supports it); under ``torch.compile`` the module it wraps, which the tag is on
    (``pipe.unet = torch.compile(pipe.unet)`` lost the zoo's settings in pipelines built from the components)."""
    for attribute in DENOISER_COMPONENTS:
        module = getattr(pipe, attribute, None)
        module = getattr(module, "_orig_mod", module)
        if isinstance(getattr(module, "__dict__", None), dict) and hasattr(module, "forward"):
            return module
    return None


def per_prompt_negative(negative_prompt: Any, num_prompts: int) -> Any:
    """A negative prompt given as one string, as one copy per prompt (for a list of ``num_prompts``
    prompts): StableDiffusionPipeline refuses a string beside a list of prompts; the other pipelines
    broadcast it themselves, so this changes nothing else."""
    return [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else negative_prompt


OTHER_PROMPTS = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3")  # the other text towers


def per_prompt_values(value: Any, indices: Sequence[int], num_prompts: int) -> Any:
    """A call argument that holds one text per prompt of a run (``prompt_2`` ...) for the call taking the prompts
    at ``indices``: a string copied once per prompt, a list of ``num_prompts`` texts picked at ``indices``;
    anything else as it is. A string ``prompt_2`` beside a batched call failed in SDXL's encoder (2 vs 1 rows)."""
    if isinstance(value, str):
        return [value] * len(indices)
    if isinstance(value, (list, tuple)) and len(value) == num_prompts:
        return [value[index] for index in indices]
    return value


KWARGS_DIFFUSERS_READS = ("callback", "callback_steps")  # the deprecated arguments pipelines take via **kwargs


class CallArgumentError(TypeError, ValueError):
    """A keyword argument the pipeline's ``__call__`` does not have: a TypeError as Python raises for it, and a
    ValueError, the library's (and the command line's) bad-input error."""


def check_call_arguments(pipe: Any, names: Any, owner: str) -> None:
    """Extra keyword arguments ``owner`` (``calibrate``, ``evaluate``) will pass to ``pipe``'s calls: a name
    ``__call__`` does not have is a ``CallArgumentError``, or, where it takes ``**kwargs`` (diffusers' SD / SDXL / PixArt
    pipelines, which ignore what they do not read there), a warning — a typo such as ``hieght`` used to run
    silently at the default size."""
    params = inspect.signature(pipe.__call__).parameters
    if isinstance(names, dict):
        _check_value_types(pipe, params, names, owner)
        _check_guidance_values(names, owner)
    if "guidance_scale" in names:
        check_guidance_scale_is_read(pipe, owner)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = sorted(name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD)
    unknown = sorted(set(names) - set(named) - set(KWARGS_DIFFUSERS_READS if takes_any else ()))
    if not unknown:
        return
    message = f"{type(pipe).__name__}.__call__ has no argument {unknown[0] if len(unknown) == 1 else unknown}"
    if not takes_any:
        raise CallArgumentError(f"{message} (from {owner}); it accepts: {named}")
    warnings.warn(f"{message}: {owner} passes {'it' if len(unknown) == 1 else 'them'} into its **kwargs, which "
                  f"diffusers ignores; its arguments are {named}", stacklevel=user_stacklevel())


GUIDANCE_ARGUMENTS = ("guidance_scale", "true_cfg_scale")


def _check_guidance_values(values: dict[str, Any], owner: str) -> None:
    """CallArgumentError for a NaN, infinite or negative guidance (``true_cfg_scale`` is fashion-flux's CFG): NaN
    or -3 turned CFG off silently (the pipelines test ``> 1``), as ``--guidance nan`` did before it was refused."""
    for key in GUIDANCE_ARGUMENTS:
        value = _scalar_value(values.get(key))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and not (is_finite_number(value) and value >= 0):
            raise CallArgumentError(f"{key}={value!r} (from {owner}) must be a finite number >= 0")


def _scalar_value(value: Any) -> Any:
    """A numpy scalar or a one-value numpy array or tensor as its Python number (np.float32 NaN passed the check);
    anything else as is."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if callable(getattr(value, "numel", None)) and not getattr(value, "is_meta", False) and value.numel() == 1:
        return value.item()
    return plain_number(value)


def check_guidance_scale_is_read(pipe: Any, owner: str) -> None:
    """CallArgumentError for ``guidance_scale`` on a Flux pipeline whose transformer has no guidance embedding
    (FLUX.1-schnell, the zoo's fashion-flux): diffusers ignores it there (``--guidance 1`` and ``9`` gave the same
    images); its classifier-free guidance is ``true_cfg_scale`` with a ``negative_prompt``."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    takes_true_cfg = "true_cfg_scale" in inspect.signature(pipe.__call__).parameters
    if takes_true_cfg and config is not None and config.get("guidance_embeds") is False:
        raise CallArgumentError(
            f"guidance_scale (from {owner}) has no effect on this {type(pipe).__name__}: its transformer has no "
            f"guidance embedding (guidance_embeds=False), so diffusers ignores it; its classifier-free guidance is "
            f"true_cfg_scale with a negative_prompt (command line: --call true_cfg_scale=3.0 --call "
            f"negative_prompt=)")


def _check_value_types(pipe: Any, params: Any, values: dict[str, Any], owner: str) -> None:
    """CallArgumentError for a JSON-like value (what ``--call`` gives; numpy scalars as Python numbers) that its
    annotation, else its number or bool default, rules out (``--call guidance_scale=abc``, ``clip_skip=x``,
    ``negative_prompt=2024``, ``max_sequence_length=16.0`` ended in a TypeError deep inside diffusers). Tensors,
    images and other objects are the pipeline's to judge; None only where the default or annotation allows it."""
    hints = _call_type_hints(pipe)
    for name, raw in values.items():
        value, default = plain_number(raw), params[name].default if name in params else None
        if not _json_like(value) or (value is None and default is None):
            continue
        if name in hints:  # Union[float, List[float]] (ControlNet scales) takes lists its float default does not
            wanted, fits = _describe_type(hints[name]), _type_fits(hints[name], value) is not False
        elif isinstance(default, (int, float)):
            wanted, fits = _default_kind(default), _type_fits(type(default), value) is not False
        else:
            continue
        if not fits:
            raise CallArgumentError(f"{type(pipe).__name__}.__call__ argument {name}={value!r} (from {owner}) must "
                                    f"be {wanted}" + ("" if default is None else f" (its default is {default!r})"))


def _default_kind(default: Any) -> str:
    """What a number or bool default asks for, in words."""
    return _SIMPLE_TYPES[type(default)] if type(default) in _SIMPLE_TYPES else "a number"


def _call_type_hints(pipe: Any) -> dict[str, Any]:
    """``__call__``'s resolved annotations; {} where they do not resolve (a forward reference to a missing name)."""
    try:
        return typing.get_type_hints(type(pipe).__call__)
    except Exception:
        return {}


def _json_like(value: Any) -> bool:
    """A value ``--call`` can produce: a JSON scalar, or a list / dict of them."""
    if isinstance(value, (list, dict)):
        return all(_json_like(item) for item in (value.values() if isinstance(value, dict) else value))
    return value is None or isinstance(value, (str, int, float, bool))


_SIMPLE_TYPES = {str: "a string", int: "an int", float: "a number", bool: "true or false", type(None): "null"}


def _type_fits(annotation: Any, value: Any) -> bool | None:
    """Whether a JSON-like ``value`` has the annotated type: True, False, or None where the annotation is one this
    check does not judge (tensors, images, callables)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_type_fits(member, value) for member in args]
        return True if True in verdicts else (None if None in verdicts else False)
    if annotation is typing.Any:
        return True
    if (origin or annotation) is collections.abc.Callable:  # callback_on_step_end=x was a TypeError inside the call
        return callable(value)
    if isinstance(annotation, type) and annotation.__module__.startswith("diffusers."):  # PipelineCallback...
        return isinstance(value, annotation)
    if annotation in (int, float):
        numbers = int if annotation is int else (int, float)
        return isinstance(value, numbers) and not isinstance(value, bool)
    if annotation in _SIMPLE_TYPES:
        return isinstance(value, annotation)
    if (origin or annotation) in (list, dict):
        if not isinstance(value, origin or annotation):
            return False
        items = value.values() if isinstance(value, dict) else value
        verdicts = [_type_fits(args[-1], item) for item in items] if args else []
        return False if False in verdicts else True
    return None


def with_tuples(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with lists as tuples where ``__call__`` annotates a tuple and no list (SDXL's ``original_size``,
    ``target_size``, ``crops_coords_top_left``): JSON (``--call``, a recipe's ``[call]``) has no tuples, and
    diffusers adds them to its tuple defaults (``original_size=[64, 64]`` failed with a TypeError inside)."""
    hints = _call_type_hints(pipe)
    return {name: tuple(value) if isinstance(value, list) and _takes_tuple_not_list(hints.get(name)) else value
            for name, value in kwargs.items()}


def _takes_tuple_not_list(annotation: Any) -> bool:
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    origins = {typing.get_origin(member) or member for member in members}
    return tuple in origins and list not in origins


def _describe_type(annotation: Any) -> str:
    """An annotation in words: ``str | list[str] | None`` -> 'a string, a list of a string or null'."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [_describe_type(member) for member in typing.get_args(annotation)]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if typing.get_origin(annotation) is list and typing.get_args(annotation):
        return f"a list of {_describe_type(typing.get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}s"
    return _SIMPLE_TYPES.get(annotation, getattr(annotation, "__name__", str(annotation)))


IMAGE_ARGUMENTS = ("image", "mask_image", "control_image", "control_mask")  # inputs image-conditioned pipelines need
IP_ADAPTER_ARGUMENTS = ("ip_adapter_image", "ip_adapter_image_embeds")  # one of them, once an IP-Adapter is loaded


def images_per_condition(pipe: Any) -> bool:
    """Whether ``pipe``'s condition images (``per_prompt_image_arguments``) come one per condition, not per prompt:
    several ControlNets, a ControlNet-Union (one per ``control_mode``) or a T2I ``MultiAdapter``, by the loaded
    model (Flux's ControlNet pipelines take ``control_mode`` with any ControlNet)."""
    kinds = type(getattr(pipe, "controlnet", None)).__name__ + type(getattr(pipe, "adapter", None)).__name__
    return "Multi" in kinds or "Union" in kinds


def per_prompt_image_arguments(pipe: Any) -> tuple[str, ...]:
    """The input image arguments of ``pipe`` holding one image per prompt, which evaluation and calibration split
    per call: all of ``IMAGE_ARGUMENTS`` but the condition images of several ControlNets / a Union / a
    ``MultiAdapter`` (``control_image`` where ``__call__`` takes it, else ``image``), left whole. Until session 52
    the img2img / inpaint variants' ``image`` and ``mask_image`` were left whole too: every prompt got the first
    init image (evaluate) or the call failed (calibrate)."""
    if not images_per_condition(pipe):
        return IMAGE_ARGUMENTS
    condition = "control_image" if "control_image" in inspect.signature(pipe.__call__).parameters else "image"
    return tuple(name for name in IMAGE_ARGUMENTS if name != condition)


def odd_image_list(call_kwargs: Mapping[str, Any], num_prompts: int,
                   names: Sequence[str] = IMAGE_ARGUMENTS) -> tuple[str, int] | None:
    """(argument, length) of the first input image list among ``names`` holding neither one image nor one per
    prompt, or None: such a list went whole to every call (calibrate, evaluate)."""
    for key in names:
        value = call_kwargs.get(key)
        if isinstance(value, (list, tuple)) and len(value) not in (1, num_prompts):
            return key, len(value)
    return None


def prompt_rows(value: Any, indices: Sequence[int], num_prompts: int) -> Any:
    """An image batch holding one image (or mask) per prompt of a run of ``num_prompts`` > 1 (see
    ``is_prompt_batch``): its rows at ``indices``, still a tensor / array (some pipelines use a tensor raw but
    preprocess a list); anything else as it is. The whole batch went to every call (each prompt's rows tiled with the
    others', or a shape error) until session 52 (tensors) / 53 (numpy arrays)."""
    return value[list(indices)] if is_prompt_batch(value, num_prompts) else value


def is_prompt_batch(value: Any, num_prompts: int) -> bool:
    """Whether ``value`` is a 4-D image batch of one image or mask per prompt of ``num_prompts`` > 1: a torch
    (N, C, H, W) tensor or a numpy (N, H, W, C) array, as diffusers' image processor reads them."""
    return (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4 and num_prompts > 1
            and value.shape[0] == num_prompts)


def repeat_rows(batch: torch.Tensor | np.ndarray, repeats: int) -> torch.Tensor | np.ndarray:
    """Each row of an image batch (tensor or numpy array) ``repeats`` times in a row (A, A, B, B)."""
    if isinstance(batch, np.ndarray):
        return np.repeat(batch, repeats, axis=0)
    return batch.repeat_interleave(repeats, dim=0)


def per_prompt_images(value: Any, indices: Sequence[int]) -> Any:
    """An input image list of a run (one image, or one per prompt) for the call taking the prompts at ``indices``:
    a list of the images at ``indices`` (a one-image list's image once per prompt); anything else as it is. A list
    went whole to every call: each prompt got the first image, or the call failed; a bare tensor for a call of one
    prompt had its channels read as a ControlNet's image batch (3 vs 1, session 50 review)."""
    if not isinstance(value, (list, tuple)) or (len(value) != 1 and not all(index < len(value) for index in indices)):
        return value
    return [value[0] if len(value) == 1 else value[index] for index in indices]


def _has_ip_adapter(pipe: Any) -> bool:
    """Whether ``pipe``'s denoiser has an IP-Adapter loaded (its image projection set by ``load_ip_adapter``)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return type(getattr(denoiser, "encoder_hid_proj", None)).__name__ == "MultiIPAdapterImageProjection"


@contextmanager
def image_input_hint(pipe: Any, kwargs: dict[str, Any]) -> Iterator[None]:
    """Add to a pipeline call's TypeError / ValueError which image inputs its ``__call__`` takes that were
    not passed (inpainting without ``image`` failed with diffusers' 'Input is in incorrect format', a
    ControlNet with 'image must be passed'), and how to pass them."""
    try:
        yield
    except (TypeError, ValueError) as error:
        parameters = inspect.signature(type(pipe).__call__).parameters
        missing = [name for name in IMAGE_ARGUMENTS if name in parameters and kwargs.get(name) is None]
        if _has_ip_adapter(pipe) and all(kwargs.get(name) is None for name in IP_ADAPTER_ARGUMENTS):
            missing.append(" or ".join(IP_ADAPTER_ARGUMENTS))  # diffusers: "argument of type 'NoneType' is not
        if not missing:  # iterable" (until s46, unexplained)
            raise
        message = (f"{error}\n{type(pipe).__name__} takes {missing}, not given: pass them as extra keyword "
                   f"arguments (da.calibrate(pipe, prompts, steps, image=...), calibrate_schedule(..., image=...), "
                   f"evaluate(..., call_kwargs={{'image': ...}})), and give quantize_ / prune_ that calib=")
        try:
            replacement = type(error)(message)
        except Exception:  # an exception class with another signature
            replacement = ValueError(message)
        raise replacement from error
