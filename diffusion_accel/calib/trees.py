"""Small helpers for nested call arguments (tuples, lists, dicts of tensors and plain values).

Used to copy denoiser and module call inputs off the device, to count their bytes, and to split
a batched call into rows or merge rows back into one call. A tensor leaf counts as *batched* when
its first dimension equals the call's batch size (the first dimension of the call's first tensor),
unless it belongs to a keyword argument every image shares (``arch.base.BATCH_SHARED_ARGUMENTS``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from ..arch.base import BATCH_SHARED_ARGUMENTS


def flatten(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Leaves of ``tree`` in a fixed order and a function rebuilding the same structure from leaves (torch's
    pytree: tuples, lists, dicts, namedtuples and diffusers' output classes keep their types; None is a leaf)."""
    leaves, spec = tree_flatten(tree)
    return leaves, lambda new_leaves: tree_unflatten(list(new_leaves), spec)


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """``tree`` with every tensor leaf replaced by ``fn(tensor)``."""
    return tree_map_only(torch.Tensor, fn, tree)


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """All tensor leaves of ``tree`` in flatten order."""
    return [leaf for leaf in flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def to_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy that never aliases the original (also for CPU tensors)."""
    return tensor.detach().to("cpu", copy=True)


def nbytes(tree: Any) -> int:
    """Bytes held by the distinct tensor leaves of ``tree`` (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors_in(tree):
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def call_batch_size(args: tuple, kwargs: dict) -> int:
    """Batch size of a call: first dimension of the first tensor in args, else in kwargs; 1 if none."""
    for tensor in tensors_in(args) + tensors_in(kwargs):
        if tensor.ndim >= 1:
            return int(tensor.shape[0])
    return 1


def batched_leaf_indices(leaves: list[Any], batch: int, shared: frozenset[int] = frozenset()) -> frozenset[int]:
    """Indices of tensor leaves whose first dimension equals ``batch``, but for those in ``shared``."""
    return frozenset(i for i, leaf in enumerate(leaves) if i not in shared
                     and isinstance(leaf, torch.Tensor) and leaf.ndim >= 1 and leaf.shape[0] == batch)


_SHARED = object()  # marks the leaves of batch-shared arguments


def shared_leaf_indices(args: tuple, kwargs: dict[str, Any]) -> frozenset[int]:
    """Indices, among the leaves of ``flatten((args, kwargs))``, of the tensors of keyword arguments every image
    of the batch shares (``BATCH_SHARED_ARGUMENTS``)."""
    marked = {name: map_tensors(lambda tensor: _SHARED, value) if name in BATCH_SHARED_ARGUMENTS else value
              for name, value in kwargs.items()}
    return frozenset(i for i, leaf in enumerate(flatten((args, marked))[0]) if leaf is _SHARED)


def take_row(leaves: list[Any], batched: frozenset[int], row: int) -> list[Any]:
    """Leaves of one batch row (batched leaves sliced to ``[row:row+1]``, the others unchanged)."""
    return [leaf[row:row + 1] if i in batched else leaf for i, leaf in enumerate(leaves)]


def merge_rows(leaf_lists: list[list[Any]], batched: frozenset[int]) -> list[Any]:
    """Concatenate batched leaves of several calls along dim 0; other leaves come from the first."""
    first = leaf_lists[0]
    return [torch.cat([leaves[i] for leaves in leaf_lists]) if i in batched else leaf
            for i, leaf in enumerate(first)]


def same_layout(a: list[Any], b: list[Any], batched: frozenset[int]) -> bool:
    """Whether two leaf lists can be merged: same count, same shapes except batched dims, and equal values in the
    tensors every row shares (``merge_rows`` keeps the first's: Flux Kontext's position ids and rotary tables of a
    landscape and a portrait reference have one shape, and merged calls ran with the first's until session 52)."""
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            shape_x, shape_y = (x.shape[1:], y.shape[1:]) if i in batched else (x.shape, y.shape)
            if shape_x != shape_y or x.dtype != y.dtype:
                return False
            if i not in batched and x is not y and not torch.equal(x, y):
                return False
    return True
