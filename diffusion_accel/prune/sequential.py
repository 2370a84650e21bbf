"""Group-wise sequential pruning (OBS-Diff's "module packages").

Units (layer groups, or blocks for structured pruning) are ordered by depth and split into K
contiguous groups. For each group one calibration sweep runs the whole pipeline through the model
as pruned so far, collecting inputs of that group's layers only, then the group is pruned and its
accumulators freed. K = number of units is fully sequential pruning; K = 1 prunes everything from one
sweep of the dense model. Groups hold equal numbers of units, so with a ``MemoryBudget`` a group whose
full Hessians would exceed it is split further into contiguous pieces (one more sweep each): the
default K = 4 on full-size SD 1.5 planned 13.4 GiB of Hessians in one sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import nn

from ..calib import HessianCollector
from ..calib.hessian import UnobservedLayerError, hessian_bytes, hessian_memory_budget
from ..progress import progress_bar

UnitT = TypeVar("UnitT")
Sweep = Callable[..., HessianCollector]  # (layer names, full Hessians?) -> collector


@dataclass
class SequentialStats:
    """Groups, calibration sweeps, peak accumulator bytes alive at once, wall time (s)."""

    groups: int = 0
    sweeps: int = 0
    peak_hessian_bytes: int = 0
    seconds: float = 0.0


def split_into_groups(units: Sequence[UnitT], groups: int | str) -> list[list[UnitT]]:
    """Contiguous groups of near-equal size; ``groups="all"`` gives one unit per group."""
    count = len(units) if groups == "all" else min(int(groups), len(units))
    if count == 0:
        return []
    bounds = [round(i * len(units) / count) for i in range(count + 1)]
    return [list(units[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass(frozen=True)
class MemoryBudget:
    """Most bytes of full input Hessians one sweep may collect, and how to size a set of layers."""

    limit: int
    bytes_of: Callable[[list[str]], int]

    @classmethod
    def for_denoiser(cls, denoiser: nn.Module) -> MemoryBudget:
        """A quarter of the memory of ``denoiser``'s device, sized by its layers' weight columns."""
        return cls(hessian_memory_budget(denoiser), lambda names: hessian_bytes(denoiser, names))


def split_by_memory(group: Sequence[UnitT], names_of: Callable[[UnitT], list[str]],
                    budget: MemoryBudget) -> list[list[UnitT]]:
    """Contiguous pieces of ``group`` whose layers' Hessians fit ``budget.limit`` bytes each; a unit
    over the limit on its own is a piece of its own (``HessianCollector.bind`` warns about it)."""
    pieces: list[list[UnitT]] = []
    current: list[UnitT] = []
    names: dict[str, None] = {}
    for unit in group:
        added = [name for name in names_of(unit) if name not in names]
        if current and added and budget.bytes_of([*names, *added]) > budget.limit:
            pieces.append(current)
            current, names = [], {}
        current.append(unit)
        names.update(dict.fromkeys(names_of(unit)))
    return pieces + [current] if current else pieces


def plan_groups(units: Sequence[UnitT], groups: int | str, names_of: Callable[[UnitT], list[str]],
                budget: MemoryBudget | None = None) -> list[list[UnitT]]:
    """``split_into_groups``, then each group split by ``budget`` (when given)."""
    planned = split_into_groups(units, groups)
    if budget is None:
        return planned
    return [piece for group in planned for piece in split_by_memory(group, names_of, budget)]


def accumulator_bytes(collector: HessianCollector, names: list[str]) -> int:
    """Bytes held by ``collector`` for ``names`` (d x d fp32 Hessians, or d norms)."""
    total = 0
    for name in names:
        try:
            width = collector.input_width(name)
        except UnobservedLayerError:
            continue
        total += 4 * (width * width + width if collector.full else width)
    return total


@dataclass
class SequentialPruner(Generic[UnitT]):
    """Runs ``prune(unit, collector)`` over units group by group, sweeping ``layers_of`` inputs;
    ``budget`` (for sweeps of full Hessians) splits groups that would not fit it."""

    layers_of: Callable[[UnitT], list[str]]
    prune: Callable[[UnitT, HessianCollector | None], None]
    sweep: Sweep | None = None
    budget: MemoryBudget | None = None
    label: str = "prune groups"

    def run(self, units: Sequence[UnitT], groups: int | str) -> SequentialStats:
        """Prune all ``units``; without a ``sweep`` (magnitude) no calibration runs."""
        stats, start = SequentialStats(), time.perf_counter()
        budget = self.budget if self.sweep is not None else None
        for group in progress_bar(plan_groups(units, groups, self.layers_of, budget), self.label):
            collector = self._collect(group, stats)
            for index, unit in enumerate(group):
                self.prune(unit, collector)
                if collector is not None:  # its Hessians are done with: the group's shrink as it goes
                    later = {name for other in group[index + 1:] for name in self.layers_of(other)}
                    for name in set(self.layers_of(unit)) - later:
                        collector.free(name)
            if collector is not None:
                collector.free()
            stats.groups += 1
        stats.seconds = time.perf_counter() - start
        return stats

    def _collect(self, group: list[UnitT], stats: SequentialStats) -> HessianCollector | None:
        if self.sweep is None:
            return None
        names = list(dict.fromkeys(name for unit in group for name in self.layers_of(unit)))
        collector = self.sweep(names)
        stats.sweeps += 1
        stats.peak_hessian_bytes = max(stats.peak_hessian_bytes, accumulator_bytes(collector, names))
        return collector
