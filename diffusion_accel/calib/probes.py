"""Feature-change probes: how much a module's output moves from one denoising step to the next.

This is what caches decide on (TeaCache/First-Block-Cache style relative L1 change, MagCache-style
magnitudes). The probe keeps only the previous output per module and CFG context (bounded
memory) plus a few floats per observation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .collectors import Collector, Step, pick_tensor

PROBE_SOURCES = ("input", "output")


@dataclass(frozen=True)
class ChangeRecord:
    """One observation: relative L1 change vs the previous observed step (None at a trajectory start)."""

    step_index: int
    timestep: float | None
    context: str
    previous_step: int | None
    rel_l1: float | None
    mean_abs: float
    l2_norm: float


class FeatureChangeProbe(Collector):
    """Records, per step and context, ``mean|y_t - y_prev| / mean|y_prev|`` and the norms of y_t.

    ``y_prev`` is the same module's tensor at the previous *observed* step of the same trajectory
    and context (with a step selection other than "all" that may be several steps back; the
    record says which). A new trajectory starts whenever the step index does not increase.
    """

    def __init__(self, module_names: str | Iterable[str], wants: str = "output",
                 tensor_index: int = 0, output_positions: dict[str, int] | None = None) -> None:
        super().__init__(module_names, tensor_index)
        if wants not in PROBE_SOURCES:
            raise ValueError(f"FeatureChangeProbe wants must be one of {PROBE_SOURCES}, got {wants!r}")
        self.wants = wants
        self.output_positions = dict(output_positions or {})  # module -> item of its tuple output (a stream)
        self.records: dict[str, list[ChangeRecord]] = {name: [] for name in self.module_names}
        self._previous: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}

    @classmethod
    def for_blocks(cls, adapter: Any) -> "FeatureChangeProbe":
        """A probe of every adapter block's image (hidden) stream: Flux's and SD3's blocks return
        ``(context, hidden)``, whose first tensor is the text; an SD3 last block ``(None, hidden)``."""
        names = [block.name for block in adapter.blocks()]
        positions = {}
        for name in names:
            try:
                positions[name] = adapter.block_streams(name).hidden_out
            except TypeError:  # UNet blocks: their first output is the hidden state
                continue
        return cls(names, output_positions=positions)

    def pick(self, value: Any, name: str) -> torch.Tensor:
        position = self.output_positions.get(name) if self.wants == "output" else None
        if position is not None and isinstance(value, (tuple, list)):
            return pick_tensor(value[position], 0, name)
        return super().pick(value, name)

    def observe(self, name: str, value: torch.Tensor, step: Step) -> None:
        """Compare ``value`` with the previous step's tensor of ``name`` in the same context."""
        current = value.detach().to(torch.float32, copy=True)
        key = (name, step.context)
        previous_step, rel_l1 = None, None
        if key in self._previous:
            last_step, last = self._previous[key]
            if last_step < step.step_index and last.shape == current.shape:
                previous_step = last_step
                rel_l1 = float((current - last).abs().mean() / last.abs().mean().clamp_min(1e-12))
        self._previous[key] = (step.step_index, current)
        self.records[name].append(ChangeRecord(
            step_index=step.step_index, timestep=step.timestep, context=step.context,
            previous_step=previous_step, rel_l1=rel_l1, mean_abs=float(current.abs().mean()),
            l2_norm=float(torch.linalg.vector_norm(current))))

    def mean_change(self, name: str, context: str | None = None) -> dict[int, float]:
        """Mean relative L1 change per step index over trajectories (and contexts unless given)."""
        return self._mean_by_step(name, context, lambda record: record.rel_l1)

    def mean_abs(self, name: str, context: str | None = None) -> dict[int, float]:
        """Mean |y| per step index over trajectories (and contexts unless given)."""
        return self._mean_by_step(name, context, lambda record: record.mean_abs)

    def _mean_by_step(self, name: str, context: str | None, read) -> dict[int, float]:
        if name not in self.records:
            raise KeyError(f"{name!r} is not probed; modules: {list(self.module_names)}")
        values: dict[int, list[float]] = defaultdict(list)
        for record in self.records[name]:
            value = read(record)
            if value is not None and (context is None or record.context == context):
                values[record.step_index].append(value)
        return {step: sum(vals) / len(vals) for step, vals in sorted(values.items())}

    def finish(self) -> None:
        """Drop the stored previous tensors after a run (the records stay)."""
        self._previous.clear()

    def describe(self) -> str:
        """One line: module count and number of records."""
        count = sum(len(records) for records in self.records.values())
        return f"FeatureChangeProbe({len(self.module_names)} module {self.wants}s, {count} records)"
