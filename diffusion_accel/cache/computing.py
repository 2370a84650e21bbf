"""The base of the cache's block hooks: they compute their module through :meth:`ComputingHook.compute`.

That is the module's own forward (the one the hook registry found beneath the hook), or, for a transformer's
repeated blocks, its compiled form once regional compilation (``eval.compile_denoiser(pipe, regional=True)``)
set ``compiled_forward``: the hook's decisions then stay in Python and dynamo traces only the block, one
graph per block class and input signature, with no graph break inside. Compiling the whole denoiser instead
makes a threshold policy's decision (First-Block-Cache, TeaCache: inside the denoiser's block loop) a break
after which dynamo skips the loop's frame and compiles each hooked block's hook frame on its own
(fashion-flux with First-Block-Cache ran slower compiled than eager).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers.hooks import ModelHook
from torch import nn


class ComputingHook(ModelHook):
    """A diffusers ``ModelHook`` that computes its module with :meth:`compute`. ``repeated_block``: the module
    is one of a transformer's repeated blocks, which regional compilation compiles beneath the hook (blocks of
    one class share their graphs); the UNet modules DeepCache hooks differ in shape, each a recompile (fashion-
    sd: 43 s first call and slower than eager), so their unhooked children are compiled instead."""

    compiled_forward: Callable[..., Any] | None = None
    repeated_block = False

    def compute(self, *args: Any, **kwargs: Any) -> Any:
        """The module's output for these arguments (compiled if regional compilation set ``compiled_forward``)."""
        if self.compiled_forward is not None:
            return self.compiled_forward(*args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def computes_own_forward(self, module: nn.Module) -> bool:
        """True if what lies beneath this hook is ``module``'s own forward (no other hook with its own forward
        below), so that a compiled form of that forward may stand in for it."""
        original = getattr(self.fn_ref, "original_forward", None)
        return (getattr(original, "__self__", None) is module
                and getattr(original, "__func__", None) is type(module).forward)
