"""Per-call constants of lowered layers, folded once and reused while their source tensors stay unchanged.

A lowered int8 layer with static activation scales rescales its int32 products with the same few
vectors on every call (activation scale x weight scale per output channel, zero-point correction plus
bias). Rebuilding them from the buffers took ~15 small tensor ops per layer and call, which on a small
UNet cost more time than the int8 kernels saved. ``DerivedConstants`` keeps them per key (timestep
group, dtype) and rebuilds them when a source tensor is replaced (``.to()``, ``load_state_dict`` with
``assign``) or modified in place (its version counter moved). Only used in eager inference (grad off,
not tracing): torch.compile folds the same expressions into its own kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

Sources = Sequence[torch.Tensor | None]


def fast_path_on() -> bool:
    """Eager inference: gradients off and not under torch.compile / export tracing."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _versions(sources: Sources) -> tuple[int, ...] | None:
    """Version counters of ``sources`` (-1 for None), or None when one cannot tell (inference tensors)."""
    try:
        return tuple([-1 if tensor is None else tensor._version for tensor in sources])  # a list: no generator
    except RuntimeError:  # inference-mode tensors track no version: never cache what derives from them
        return None


class DerivedConstants:
    """A small cache: ``get(key, sources, build)`` returns ``build()``'s value for ``key``, rebuilt when any
    of ``sources`` is another tensor object or was changed in place since. Copies start empty."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple, tuple[int, ...], Any]] = {}

    def get(self, key: Hashable, sources: Sources, build: Callable[[], Any]) -> Any:
        versions = _versions(sources)
        if versions is None:
            return build()
        entry = self._entries.get(key)
        if entry is not None and entry[1] == versions and all([kept is given for kept, given in zip(entry[0], sources)]):
            return entry[2]
        with torch.no_grad():
            value = build()
        self._entries[key] = (tuple(sources), versions, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo: dict) -> "DerivedConstants":
        return DerivedConstants()  # a copy's layers have their own buffers: let it fold its own

    def __getstate__(self) -> dict:
        return {"_entries": {}}
