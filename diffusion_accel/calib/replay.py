"""Running a (possibly modified) denoiser directly on stored trajectory inputs.

Each stored call is replayed with its own step tag and weight, so collectors receive the same
stream as in the live run. If the denoiser carries a step tracker (because a technique such as a
per-step-group quantizer is applied), the tracker is pinned to the record's step and the call runs
inside the record's CFG ``cache_context``, so step-aware hooks see the step they would see live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hooks import DEFAULT_CONTEXT, ModuleHooks, get_tracker
from .collectors import Collector, Step
from .dispatch import CollectorRouter
from .trajectory import TrajectoryRecord, group_records, merged_call
from .trees import call_batch_size, map_tensors


@dataclass
class CallCounts:
    """Denoiser calls seen and observed, rows observed, observed calls per CFG context."""

    denoiser_calls: int = 0
    observed_calls: int = 0
    observed_rows: int = 0
    calls_per_context: dict[str, int] = field(default_factory=dict)

    def add_observed(self, step: Step, rows: int) -> None:
        self.observed_calls += 1
        self.observed_rows += rows
        self.calls_per_context[step.context] = self.calls_per_context.get(step.context, 0) + 1


def replay_records(records: Sequence[TrajectoryRecord], collectors: Sequence[Collector],
                   denoiser: nn.Module, batch_size: int | None = None, progress: bool = True) -> CallCounts:
    """Run ``denoiser`` on ``records`` (merged up to ``batch_size`` rows) streaming into ``collectors``."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    current: list[Step | None] = [None]
    router = CollectorRouter(denoiser, collectors, lambda: current[0])
    device, dtype = _device_of(denoiser), _float_dtype_of(denoiser)
    counts = CallCounts()
    groups = list(group_records(list(records), batch_size))
    try:
        with ModuleHooks() as hooks, torch.no_grad():
            router.install(hooks)
            for group in tqdm(groups, desc="replay", disable=not progress):
                current[0] = group[0].step
                args, kwargs = map_tensors(lambda t: _to_model(t, device, dtype), merged_call(group))
                with _as_live_step(denoiser, group[0].step):
                    denoiser(*args, **kwargs)
                counts.denoiser_calls += 1
                counts.add_observed(group[0].step, call_batch_size(args, kwargs))
    finally:
        for collector in collectors:
            collector.finish()
    return counts


def _device_of(denoiser: nn.Module) -> torch.device:
    parameter = next(denoiser.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _float_dtype_of(denoiser: nn.Module) -> torch.dtype | None:
    """The dtype of the denoiser's first floating-point parameter (None if it has none)."""
    return next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), None)


def _to_model(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Move a stored input to the denoiser's device and, for floating activations (2-D and up),
    its dtype: a trajectory recorded in float32 replays into a bfloat16 copy as a bfloat16 run
    would feed it. Timesteps and guidance (0-D/1-D) keep their dtype, as pipelines pass them."""
    if dtype is not None and tensor.is_floating_point() and tensor.dim() >= 2:
        return tensor.to(device, dtype)
    return tensor.to(device)


@contextlib.contextmanager
def _as_live_step(denoiser: nn.Module, step: Step):
    """Enter the record's CFG context and pin an attached tracker to the record's step index."""
    context = contextlib.nullcontext()
    if step.context != DEFAULT_CONTEXT and hasattr(denoiser, "cache_context"):
        context = denoiser.cache_context(step.context)
    with context:
        tracker = get_tracker(denoiser)
        if tracker is None:
            yield
            return
        tracker.pin(step.step_index, step.context)
        try:
            yield
        finally:
            tracker.unpin()
