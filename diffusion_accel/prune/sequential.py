"""Group-wise sequential pruning (OBS-Diff's "module packages").

Units (layer groups, or blocks for structured pruning) are ordered by depth and split into K
contiguous groups. For each group one calibration sweep runs the whole pipeline through the model
as pruned so far, collecting inputs of that group's layers only (memory stays bounded by one
group's Hessians; groups hold equal numbers of units, not bytes, so ``HessianCollector.bind`` warns
when one group's would take over a quarter of the device's memory), then the group is pruned and its
accumulators freed. K = number of units is
fully sequential pruning; K = 1 prunes everything from one sweep of the dense model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..calib import HessianCollector

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


def accumulator_bytes(collector: HessianCollector, names: list[str]) -> int:
    """Bytes held by ``collector`` for ``names`` (d x d fp32 Hessians, or d norms)."""
    total = 0
    for name in names:
        try:
            width = collector.input_sq_norms(name).numel()
        except ValueError:
            continue
        total += 4 * (width * width + width if collector.full else width)
    return total


@dataclass
class SequentialPruner(Generic[UnitT]):
    """Runs ``prune(unit, collector)`` over units group by group, sweeping ``layers_of`` inputs."""

    layers_of: Callable[[UnitT], list[str]]
    prune: Callable[[UnitT, HessianCollector | None], None]
    sweep: Sweep | None = None

    def run(self, units: Sequence[UnitT], groups: int | str) -> SequentialStats:
        """Prune all ``units``; without a ``sweep`` (magnitude) no calibration runs."""
        stats, start = SequentialStats(), time.perf_counter()
        for group in split_into_groups(units, groups):
            collector = self._collect(group, stats)
            for unit in group:
                self.prune(unit, collector)
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
