"""Calibration passes run a pipeline's denoiser uncompiled.

Calibration hooks every eligible layer (range observers, Hessian collectors, replay pins). On a denoiser
the user had compiled first (``pipe.unet = torch.compile(pipe.unet)``, ``compile_denoiser``), dynamo then
recompiled per hooked layer (session 30 compile probe, tiny SD: 53 recompiles and 3 recompile-limit hits
during one calibration), and frames past the limit stayed eager afterwards (the quantized UNet compiled 13
graphs instead of 1). The passes gain nothing from compilation, so they run on the plain module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .arch.registry import find_any_denoiser, find_denoiser


@contextmanager
def uncompiled(pipe: Any) -> Iterator[None]:
    """Within: ``pipe``'s denoiser runs without torch.compile (a wrapper swapped for its module, modules
    compiled in place and blocks compiled beneath their cache hooks switched off); all are put back
    afterwards, also on error. (Calibration runs here, which needs no adapter: ``find_any_denoiser``.)"""
    component, denoiser = find_any_denoiser(pipe)
    wrapper = getattr(pipe, component, None) if component else None
    unwrapped = wrapper is not None and wrapper is not denoiser
    if unwrapped:
        setattr(pipe, component, denoiser)
    try:
        with uncompiled_module(denoiser):
            yield
    finally:
        if unwrapped:
            setattr(pipe, component, wrapper)


@contextmanager
def uncompiled_module(denoiser: Any) -> Iterator[None]:
    """Within: ``denoiser`` (a module, not a wrapper) and its submodules run eagerly: compiled-in-place forwards
    (``module.compile()``, ``compile_denoiser``) and compiled forwards beneath cache hooks switched off, put back
    afterwards, also on error. ``Calibration.replay`` runs here (its collector hooks recompiled per layer)."""
    in_place = {module: module._compiled_call_impl for module in denoiser.modules()
                if getattr(module, "_compiled_call_impl", None) is not None}
    beneath = {hook: hook.compiled_forward for module in denoiser.modules() for hook in compiled_hooks(module)}
    for module in in_place:
        module._compiled_call_impl = None
    for hook in beneath:
        hook.compiled_forward = None
    try:
        yield
    finally:
        for module, compiled in in_place.items():
            module._compiled_call_impl = compiled
        for hook, compiled in beneath.items():
            hook.compiled_forward = compiled


def runs_compiled(pipe: Any) -> bool:
    """Whether ``pipe``'s denoiser is compiled: behind a torch.compile wrapper, or (parts) compiled in place
    (``module.compile()``, ``compile_denoiser(regional=True)``). A deep copy of it, as ``prune_`` and ``load``
    make, is not."""
    component, denoiser = find_denoiser(pipe)
    attribute = getattr(pipe, component, denoiser) if component else denoiser
    return is_compiled(attribute) or any(is_compiled(module) for module in denoiser.modules())


def is_compiled(module: Any) -> bool:
    """True if ``module`` is a ``torch.compile`` wrapper, was compiled in place (``module.compile()``) or is
    computed by a compiled forward beneath its cache hook (``compile_denoiser(pipe, regional=True)``)."""
    return (hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None
            or bool(compiled_hooks(module)))


def compiled_hooks(module: Any) -> list[Any]:
    """The hooks on ``module`` that compute it through a compiled forward (``compiled_forward``, set by
    regional compilation on the cache's block hooks)."""
    registry = getattr(module, "__dict__", {}).get("_diffusers_hook")
    hooks = registry.hooks.values() if registry is not None else ()
    return [hook for hook in hooks if getattr(hook, "compiled_forward", None) is not None]
