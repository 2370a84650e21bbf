"""Copying and pickling a denoiser that carries diffusers hooks (the step tracker, feature caches).

diffusers' ``HookRegistry`` replaces ``module.forward`` with a partial of a closure over the original
module's hook chain. ``copy.deepcopy`` keeps that closure, so before session 28 a copy of a cached UNet
ran the *original's* hooks and forward: its own weights were ignored (zeroing the copy's ``conv_out``
changed nothing) and the two shared cache state (a copy called during the original's call changed
the original's image). :func:`install` gives such a denoiser an instance ``__deepcopy__`` that copies
as the default would and then rebuilds every copied registry's forward chain on the copy, and an
instance ``__reduce_ex__`` that refuses pickling with a clear message (the closures cannot pickle).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .pretrained_guard import GuardedMethod

COPY_METHODS = ("__deepcopy__", "__reduce_ex__")


def install(denoiser: nn.Module) -> None:
    """Give ``denoiser`` (once its first hook of ours is registered) the copy and pickle methods."""
    object.__setattr__(denoiser, "__deepcopy__", GuardedMethod(_deepcopy_with_hooks, denoiser))
    object.__setattr__(denoiser, "__reduce_ex__", GuardedMethod(_refuse_pickle, denoiser))


def uninstall(denoiser: nn.Module) -> None:
    """Remove them again (the last hook of ours is gone: default copying and pickling work)."""
    for method in COPY_METHODS:
        denoiser.__dict__.pop(method, None)


def _deepcopy_with_hooks(denoiser: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(denoiser)`` whose hooks run on the copy: copied as ``object.__reduce_ex__`` would
    (the same memo, so hooks, sessions and registries map to their copies), then each hook registry in
    the copy re-registers its copied hooks in order, which rebuilds ``forward`` around the copy."""
    _refuse_unrebuildable_hooks(denoiser)
    cls = type(denoiser)
    clone = cls.__new__(cls)
    memo[id(denoiser)] = clone
    # Module.__getstate__ drops ``_compiled_call_impl``: copied, ``module.compile()``'s binding ran the original
    clone.__setstate__(copy.deepcopy(denoiser.__getstate__(), memo))
    for module in clone.modules():
        _rebuild_forward_chain(module)
    return clone


def _refuse_unrebuildable_hooks(denoiser: nn.Module) -> None:
    """diffusers' layerwise casting hook cannot be removed (``NotImplementedError`` from its registry), so a copy's
    chain cannot be rebuilt around it: a clear TypeError instead of diffusers' "does not support deinitialization"."""
    from .arch.registry import LAYERWISE_CASTING_HOOK, first_diffusers_hook

    found = first_diffusers_hook(denoiser, LAYERWISE_CASTING_HOOK)
    if found is not None:
        raise TypeError(f"cannot copy.deepcopy this {type(denoiser).__name__}: it carries diffusion_accel's step hooks "
                        f"and diffusers' layerwise casting (at {found[0]!r}), whose hook cannot be rebuilt on a copy; "
                        f"copy it before enable_layerwise_casting (the step hooks come from a cache, "
                        f"da.remove_cache(pipe) removes them, or from quantize_'s timestep groups)")


def _rebuild_forward_chain(module: nn.Module) -> None:
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        return
    names = list(registry._hook_order)
    hooks = [registry.hooks[name] for name in names]
    for name in reversed(names):  # the first hook's saved forward is the copy's own (a bound method)
        registry.remove_hook(name, recurse=False)
    for name, hook in zip(names, hooks):
        registry.register_hook(hook, name)


def _refuse_pickle(denoiser: nn.Module, protocol: int = 2) -> Any:
    raise TypeError(
        f"cannot pickle or copy.copy this {type(denoiser).__name__}: it carries diffusion_accel's step hooks (a "
        f"feature cache or timestep-group activation scales), and diffusers' hooked forward is a closure that does not "
        f"pickle. Save the accelerated pipeline with da.save(pipe, folder) (safetensors + manifest), or, for a "
        f"cache, da.remove_cache(pipe) first (timestep groups keep theirs); copy.deepcopy works (a shallow copy would "
        f"share the hooks and their state)")
