"""Running pipelines for evaluation: the denoiser, prompts -> call kwargs, seeded generation.

How ``prompts`` map to a pipeline call (``default_prompt_to_kwargs``), by the pipeline's
``__call__`` signature:

- text-to-image (has ``prompt``: SD, SDXL, SD3, Flux, PixArt, ...): prompts are strings,
  passed as ``prompt=[...]``;
- class-conditional (has ``class_labels``: DiT): prompts are class ids (int) or label names
  (str, looked up with ``pipe.get_label_ids``), passed as ``class_labels=[...]``;
- unconditional (has ``batch_size`` only: DDPM): prompts are placeholders (e.g. ``[None] * 8``
  or sample names) that only count images and label grid columns; passed as ``batch_size=n``.

Anything else: pass ``prompt_to_kwargs=lambda pipe, prompts: {...}``.

Every image gets its own CPU ``torch.Generator`` seeded ``seed + image_index`` (image index =
prompt index x images_per_prompt + copy), so an image does not depend on the batch size, the
process count or the variant: variants are compared on identical starting noise.
"""

from __future__ import annotations

import functools
import inspect
import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..arch.registry import DENOISER_COMPONENTS
from ..calib.inputs import check_class_ids
from ..pipeline_defaults import (OTHER_PROMPTS, call_defaults, per_prompt_image_arguments, per_prompt_images,
                                 per_prompt_negative, per_prompt_values, prompt_rows, with_tuples)
from ..seeding import seeded_call
from .images import to_uint8

CONTROLLED_KWARGS = ("generator", "num_inference_steps", "prompt", "class_labels", "batch_size",
                     "num_images_per_prompt", "return_dict")
IMAGE_OUTPUT_TYPES = ("np", "pil", "pt")  # "latent" would be scored as if latents were images

SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
PromptToKwargs = Callable[[Any, list[Any]], dict[str, Any]]


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's denoiser (``unet`` or ``transformer``, compiled or not), or ``pipe`` itself."""
    for attribute in DENOISER_COMPONENTS:
        module = getattr(pipe, attribute, None)
        if isinstance(module, nn.Module):
            return module
    if isinstance(pipe, nn.Module):
        return pipe
    raise TypeError(f"{type(pipe).__name__} has no denoiser; expected a pipeline with one of "
                    f"{DENOISER_COMPONENTS} or an nn.Module")


def compile_denoiser(pipe: Any, *, regional: bool | None = None, **compile_kwargs: Any) -> Any:
    """``torch.compile`` the pipeline's denoiser in place (``nn.Module.compile``: the module, its
    hooks and the pipeline's attribute stay the same objects); compilation runs on the first call.
    Returns ``pipe``.

    A denoiser with hooked modules (a feature cache's blocks) compiles one graph per cache state (step
    schedules) or, where the decision falls inside the block loop (First-Block-Cache, TeaCache), one per
    hooked block and state, past dynamo's default ``recompile_limit`` of 8, after which those frames run
    eagerly with a warning only; so the limit is raised to ``recompile_limit_for(denoiser)``.
    ``regional=True`` compiles instead every largest submodule that carries no hook (``unhooked_regions``),
    as diffusers' ``compile_repeated_blocks`` does for its caches, and each cache-hooked transformer block
    beneath its hook (``hooked_blocks``: the hook computes the block through the compiled forward of its class,
    shared by the blocks of that class): the hooks and their skip decisions run eagerly between compiled
    regions, with no graph break inside one. Remove the cache and the blocks run uncompiled again. ``regional=None``
    (default): regional for a cache that decides inside the block loop, else the whole denoiser (the faster
    form of each on the zoo). Numbers: ``benchmarks/results/cache_compile.md``."""
    denoiser = denoiser_of(pipe)
    limit = recompile_limit_for(denoiser)
    if limit > torch._dynamo.config.recompile_limit:
        torch._dynamo.config.recompile_limit = limit
    if regional is None:
        regional = decides_inside_the_block_loop(denoiser)
    if not regional:
        denoiser.compile(**compile_kwargs)
        return pipe
    for module in unhooked_regions(denoiser):
        module.compile(**compile_kwargs)
    compiled_forwards: dict[type, Callable[..., Any]] = {}  # one per block class: its blocks share the graphs
    for module, hook in hooked_blocks(denoiser):
        block_class = type(module)
        if block_class not in compiled_forwards:
            compiled_forwards[block_class] = torch.compile(block_class.forward, **compile_kwargs)
        hook.compiled_forward = functools.partial(compiled_forwards[block_class], module)
    return pipe


def decides_inside_the_block_loop(denoiser: nn.Module) -> bool:
    """Whether a feature cache on ``denoiser`` takes its skip decision in the block loop, from a head block's
    output (First-Block-Cache, TeaCache), where a compiled whole denoiser breaks its graph and dynamo then
    compiles the hooked blocks one by one, or decides block by block (a learned router: a whole graph would be
    specialised, and recompiled, for each step's set of running blocks)."""
    from ..cache.session import get_session

    session = get_session(getattr(denoiser, "_orig_mod", denoiser))
    return session is not None and (session.policy.uses_head or getattr(session.policy, "decides_per_block", False))


def _hooked(module: nn.Module) -> bool:
    """Whether a diffusers hook registry or a torch forward (pre-)hook sits on ``module``."""
    return "_diffusers_hook" in vars(module) or bool(module._forward_hooks) or bool(module._forward_pre_hooks)


def _block_hook(module: nn.Module) -> Any:
    """The hook on ``module`` that computes it through its own forward and can take a compiled one instead (the
    cache's hooks on a transformer's repeated blocks), if nothing beneath ``module`` is hooked; else None."""
    registry = vars(module).get("_diffusers_hook")
    if registry is None or any(_hooked(inner) for inner in list(module.modules())[1:]):
        return None
    return next((hook for hook in registry.hooks.values()
                 if getattr(hook, "repeated_block", False) and hook.computes_own_forward(module)), None)


def _regions(root: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, Any]]]:
    """``unhooked_regions`` and ``hooked_blocks`` of ``root``, found in one walk."""
    regions: list[nn.Module] = []
    blocks: list[tuple[nn.Module, Any]] = []

    def visit(module: nn.Module) -> None:
        container = type(module).forward is nn.Module.forward  # ModuleList / ModuleDict: never called, and their
        # compiled form left every block inside eager (session 50 review): their children are the regions
        if not container and not any(_hooked(inner) for inner in module.modules()):
            if next(module.parameters(), None) is not None:
                regions.append(module)
            return
        hook = _block_hook(module)
        if hook is not None:
            blocks.append((module, hook))
            return
        for child in module.children():
            visit(child)

    visit(root)
    return regions, blocks


def unhooked_regions(root: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``root`` with parameters on which, and under which, no hook is registered
    (diffusers hook registries or torch forward hooks), outside the ``hooked_blocks``; ``root`` itself when
    nothing is hooked."""
    return _regions(root)[0]


def hooked_blocks(root: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, hook) pairs: the repeated transformer blocks of ``root`` whose cache hook computes them with their
    own forward (``cache.computing.ComputingHook.repeated_block``) and under which nothing is hooked, so that they
    can be compiled beneath that hook."""
    return _regions(root)[1]


def recompile_limit_for(denoiser: nn.Module) -> int:
    """A dynamo ``recompile_limit`` for compiling ``denoiser`` with its hooks: 4 per hooked module + 16
    (the default 8 when nothing is hooked). Users compiling a cached denoiser themselves set
    ``torch._dynamo.config.recompile_limit`` to this."""
    hooked = sum(1 for module in denoiser.modules() if "_diffusers_hook" in vars(module))
    return 8 if hooked == 0 else 4 * hooked + 16


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: its global index, prompt (index and value) and noise seed."""

    index: int
    prompt_index: int
    prompt: Any
    seed: int


def whole_number(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (numpy integers accepted, bools and floats not); a clear error naming ``name``."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    return number


def make_jobs(prompts: Sequence[Any], images_per_prompt: int = 1, seed: int = 0) -> list[ImageJob]:
    """One job per (prompt, copy), seeds ``seed + index``."""
    seed = whole_number("seed", seed)
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1; got {images_per_prompt}")
    if isinstance(prompts, str) or not hasattr(prompts, "__len__") or not len(prompts):
        raise ValueError(f"prompts must be a non-empty list (of strings, class labels, or None placeholders for "
                         f"unconditional pipelines), got {prompts!r:.60}")
    last_seed = seed + len(prompts) * images_per_prompt - 1
    if seed < SEED_RANGE[0] or last_seed > SEED_RANGE[1]:
        raise ValueError(f"seed {seed} gives image seeds {seed}..{last_seed}; torch generators take seeds in "
                         f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    return [ImageJob(p * images_per_prompt + c, p, prompt, seed + p * images_per_prompt + c)
            for p, prompt in enumerate(prompts) for c in range(images_per_prompt)]


def _call_parameters(pipe: Any) -> set[str]:
    return set(inspect.signature(type(pipe).__call__).parameters)


def _class_ids(pipe: Any, labels: list[Any]) -> list[int]:
    """Class ids from ints (numpy integers too, as DiT takes them) or label names (``pipe.get_label_ids``)."""
    if all(_is_integer(label) for label in labels):  # out of range: DiT's 1000 gave unconditional images, silently
        ids = [operator.index(label) for label in labels]
        check_class_ids(pipe, ids)
        return ids
    if all(isinstance(label, str) for label in labels) and hasattr(pipe, "get_label_ids"):
        return list(pipe.get_label_ids(labels))
    raise TypeError(f"class-conditional {type(pipe).__name__} needs prompts that are class ids (int) or label "
                    f"names (str); got {sorted({type(label).__name__ for label in labels})}")


def _is_integer(value: Any) -> bool:
    """An int or numpy integer, not a bool (``operator.index`` takes both)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def default_prompt_to_kwargs(pipe: Any, prompts: list[Any]) -> dict[str, Any]:
    """Call kwargs for a batch of prompts (see module doc for the per-family rules)."""
    parameters = _call_parameters(pipe)
    if "prompt" in parameters:
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError(f"{type(pipe).__name__} takes text prompts; got "
                            f"{sorted({type(prompt).__name__ for prompt in prompts})}")
        return {"prompt": list(prompts)}
    if "class_labels" in parameters:
        return {"class_labels": _class_ids(pipe, prompts)}
    if "batch_size" in parameters:
        return {"batch_size": len(prompts)}
    raise TypeError(f"don't know how to pass prompts to {type(pipe).__name__} (no 'prompt', 'class_labels' or "
                    "'batch_size' argument); pass prompt_to_kwargs=lambda pipe, prompts: {...}")


def is_text_conditioned(pipe: Any) -> bool:
    """True if the pipeline takes a ``prompt`` argument."""
    return "prompt" in _call_parameters(pipe)


def check_call_kwargs(call_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Extra call kwargs, refusing those evaluation controls itself."""
    if call_kwargs is not None and not isinstance(call_kwargs, Mapping):
        raise TypeError(f"call_kwargs must be a dict of further pipeline arguments (e.g. {{'height': 256}}) or None, "
                        f"got {type(call_kwargs).__name__} {call_kwargs!r:.60}")
    extra = dict(call_kwargs or {})
    clashes = sorted(set(extra) & set(CONTROLLED_KWARGS))
    if clashes:
        raise ValueError(f"call_kwargs may not set {clashes}: evaluation controls {list(CONTROLLED_KWARGS)} "
                         "(use the prompts, seed, num_inference_steps and prompt_to_kwargs arguments)")
    if extra.get("output_type", "np") not in IMAGE_OUTPUT_TYPES:
        raise ValueError(f"call_kwargs output_type={extra['output_type']!r}: evaluation scores decoded images; "
                         f"accepted: {list(IMAGE_OUTPUT_TYPES)}")
    return extra


def build_call_kwargs(pipe: Any, jobs: Sequence[ImageJob], *, num_inference_steps: int,
                      call_kwargs: dict[str, Any] | None = None,
                      prompt_to_kwargs: PromptToKwargs | None = None, num_prompts: int = 0) -> dict[str, Any]:
    """Keyword arguments generating ``jobs`` in one call, one seeded CPU generator per image
    (``call_kwargs`` over the pipeline's own ``call_defaults``); ``num_prompts``: the run's prompt count, by which an
    (N, C, H, W) image tensor of one per prompt gives the jobs their rows (``prompt_rows``)."""
    to_kwargs = prompt_to_kwargs or default_prompt_to_kwargs
    extra = with_tuples(pipe, check_call_kwargs(call_kwargs))
    kwargs: dict[str, Any] = {"output_type": "np", **call_defaults(pipe), **extra}
    kwargs.update(to_kwargs(pipe, [job.prompt for job in jobs]))
    negative = extra.get("negative_prompt")
    if isinstance(negative, (list, tuple)) and jobs and all(job.prompt_index < len(negative) for job in jobs):
        negative = [negative[job.prompt_index] for job in jobs]  # one per prompt of the run, as calibration reads it
    if "negative_prompt" in extra and isinstance(kwargs.get("prompt"), list):  # yours, not a zoo default
        kwargs["negative_prompt"] = per_prompt_negative(negative, len(kwargs["prompt"]))
    if isinstance(kwargs.get("prompt"), list):  # the other towers' texts follow the prompts of the call
        kwargs |= {name: _per_job(extra[name], jobs) for name in OTHER_PROMPTS if name in extra}
    # a MultiControlNet's control images hold one per ControlNet, left whole
    kwargs |= {name: _image_per_job(prompt_rows(extra[name], [job.prompt_index for job in jobs], num_prompts), jobs)
               for name in per_prompt_image_arguments(pipe) if extra.get(name) is not None}
    kwargs["num_inference_steps"] = num_inference_steps
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    return kwargs


def _per_job(value: Any, jobs: Sequence[ImageJob]) -> Any:
    """``value`` (one text, or one per prompt of the run) as one text per job of this call."""
    indices = [job.prompt_index for job in jobs]
    if isinstance(value, (list, tuple)):
        return per_prompt_values(value, indices, len(value)) if all(index < len(value) for index in indices) \
            else value
    return per_prompt_values(value, indices, len(indices))


def _image_per_job(value: Any, jobs: Sequence[ImageJob]) -> Any:
    """An input image of the run (``image``, ``mask_image``, ``control_image``) for this call's jobs: of a list of
    one per prompt the jobs' own, one image once per job. A list went whole to every call (at batch size 1 every
    prompt got the first image); inpainting and Flux img2img drew one image's latents from the first generator
    only, so an image changed with its place in the batch (until session 49)."""
    if isinstance(value, (list, tuple)):
        return per_prompt_images(value, [job.prompt_index for job in jobs])
    return [value] * len(jobs) if len(jobs) > 1 and _one_image(value) else value


def _one_image(value: Any) -> bool:
    """Whether ``value`` is one image: a PIL image, or a (C, H, W) / (1, C, H, W) tensor or array."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)
    return type(value).__module__.startswith("PIL.")


@contextmanager
def quiet_progress(pipe: Any, quiet: bool = True) -> Iterator[None]:
    """Silence a diffusers pipeline's per-step progress bar, restoring its setting afterwards."""
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    if quiet and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if hasattr(pipe, "_progress_bar_config"):
            pipe._progress_bar_config = saved


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1; got {size}")
    return [items[start:start + size] for start in range(0, len(items), size)]


def generate_images(pipe: Any, jobs: Sequence[ImageJob], *, num_inference_steps: int, batch_size: int = 1,
                    call_kwargs: dict[str, Any] | None = None, prompt_to_kwargs: PromptToKwargs | None = None,
                    progress: Callable[[int], None] | None = None,
                    total: int | None = None, num_prompts: int = 0) -> list[tuple[int, torch.Tensor]]:
    """Generate every job's image: list of (job index, uint8 (3, H, W)); ``total``: the run's image count, which
    errors name (``jobs`` may be one process's share); ``num_prompts`` as in ``build_call_kwargs``."""
    num_inference_steps = whole_number("num_inference_steps", num_inference_steps, minimum=1)
    results: list[tuple[int, torch.Tensor]] = []
    with quiet_progress(pipe):
        for batch in chunks(list(jobs), batch_size):
            kwargs = build_call_kwargs(pipe, batch, num_inference_steps=num_inference_steps,
                                       call_kwargs=call_kwargs, prompt_to_kwargs=prompt_to_kwargs,
                                       num_prompts=num_prompts)
            output = seeded_call(pipe, kwargs, batch[0].seed)  # stochastic samplers draw from the global RNG
            if not hasattr(output, "images"):  # AudioLDM & co. (their UNets are supported denoisers)
                raise TypeError(f"{type(pipe).__name__} returned a {type(output).__name__} without images: "
                                f"evaluation scores image pipelines")
            try:
                images = to_uint8(output.images)
            except ValueError as error:  # NaN images: say which of the run's images
                first, last = batch[0].index + 1, batch[-1].index + 1
                raise ValueError(f"{type(pipe).__name__} image{'s' if last > first else ''} "
                                 f"{first if last == first else f'{first}-{last}'} of {total or len(jobs)}: "
                                 f"{error}") from None
            if len(images) != len(batch):
                raise ValueError(f"{type(pipe).__name__} returned {len(images)} images for {len(batch)} requested")
            results.extend((job.index, image) for job, image in zip(batch, images))
            if progress is not None:
                progress(len(batch))
    return results
