"""The stored calibration trajectory: denoiser call inputs at selected steps (Q-Diffusion's set).

Each record holds one denoiser call's positional and keyword arguments (latents x_t, timestep,
encoder states, added conditions, ...) copied to the CPU, tagged with its step. Tensors passed
unchanged to several calls of one pipeline call (the prompt embeddings) are copied once and
shared between records. Recording stops, with a warning, once ``max_bytes`` would be exceeded:
the records kept are then whole trajectories of the first prompts (every selected step).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .collectors import Step
from .trees import (batched_leaf_indices, call_batch_size, flatten, merge_rows, same_layout, shared_leaf_indices,
                    to_cpu_copy)
from ..stacklevel import user_stacklevel


@dataclass
class TrajectoryRecord:
    """One recorded denoiser call: CPU copies of its arguments, its batch size and step tag."""

    step: Step
    args: tuple
    kwargs: dict[str, Any]
    batch: int
    batched: frozenset[int]

    def leaves(self) -> list[Any]:
        """Flattened (args, kwargs) leaves, in the order ``batched`` refers to."""
        return flatten((self.args, self.kwargs))[0]


class TrajectoryRecorder:
    """Copies denoiser call inputs to the CPU within a byte budget, sharing repeated tensors."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_trajectory_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.records: list[TrajectoryRecord] = []
        self.bytes = 0
        self.truncated = False
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._call_start = 0  # index of the current pipeline call's first record

    def new_trajectory(self) -> None:
        """Forget the shared-tensor cache (called at the start of every pipeline call)."""
        self._copies.clear()
        self._call_start = len(self.records)

    def record(self, args: tuple, kwargs: dict[str, Any], step: Step) -> None:
        """Store one call's inputs unless the byte budget is exhausted."""
        if self.truncated:
            return
        leaves, rebuild = flatten((args, kwargs))
        new_bytes = sum(t.numel() * t.element_size() for t in leaves
                        if isinstance(t, torch.Tensor) and self._cached(t) is None)
        if self.bytes + new_bytes > self.max_bytes:
            self._stop()
            return
        copies = [self._copy(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.bytes += new_bytes
        batch = call_batch_size(args, kwargs)
        stored_args, stored_kwargs = rebuild(copies)
        self.records.append(TrajectoryRecord(step, stored_args, stored_kwargs, batch,
                                             batched_leaf_indices(copies, batch, shared_leaf_indices(args, kwargs))))

    def _cached(self, tensor: torch.Tensor) -> torch.Tensor | None:
        entry = self._copies.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
            return None
        return entry[2]

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        cached = self._cached(tensor)
        if cached is not None:
            return cached
        copy = to_cpu_copy(tensor)
        self._copies[id(tensor)] = (weakref.ref(tensor), tensor._version, copy)
        return copy

    def _stop(self) -> None:
        """Stop recording and drop the records of the pipeline call in progress, so the trajectory holds whole
        pipeline calls (until session 31 it kept the first steps of the last one: replays leaned to the noisy
        steps)."""
        self.truncated = True
        self._copies.clear()
        del self.records[self._call_start:]
        kept = {id(leaf): leaf for record in self.records for leaf in record.leaves() if isinstance(leaf, torch.Tensor)}
        self.bytes = sum(tensor.numel() * tensor.element_size() for tensor in kept.values())
        warnings.warn(f"calibration trajectory reached max_trajectory_bytes={self.max_bytes}: it keeps the first "
                      f"{len(self.records)} denoiser calls, whole pipeline calls; later calls are not stored (replay "
                      f"will see only the stored ones)", RuntimeWarning, stacklevel=user_stacklevel())


def group_records(records: list[TrajectoryRecord], max_rows: int | None) -> Iterator[list[TrajectoryRecord]]:
    """Records merged into groups of the same step and context with at most ``max_rows`` rows.

    ``max_rows=None`` yields each record alone, in recording order. Otherwise groups come in the
    order their first record was recorded; a record larger than ``max_rows`` stays alone.
    """
    if max_rows is None:
        yield from ([record] for record in records)
        return
    open_groups: dict[tuple[int, str], list[list[TrajectoryRecord]]] = {}
    order: list[list[TrajectoryRecord]] = []
    for record in records:
        groups = open_groups.setdefault((record.step.step_index, record.step.context), [])
        if groups and _fits(groups[-1], record, max_rows):
            groups[-1].append(record)
        else:
            groups.append([record])
            order.append(groups[-1])
    yield from order


def _fits(group: list[TrajectoryRecord], record: TrajectoryRecord, max_rows: int) -> bool:
    first = group[0]
    rows = sum(item.batch for item in group) + record.batch
    return (rows <= max_rows and record.step == first.step and record.batched == first.batched
            and same_layout(first.leaves(), record.leaves(), first.batched))


def merged_call(group: list[TrajectoryRecord]) -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) of one denoiser call covering every record of ``group``."""
    first = group[0]
    if len(group) == 1:
        return first.args, first.kwargs
    _, rebuild = flatten((first.args, first.kwargs))
    return rebuild(merge_rows([record.leaves() for record in group], first.batched))
