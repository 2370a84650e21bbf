"""Latency: whole pipeline and denoiser only, warm-up then median (p10/p90) of repeats.

On CUDA devices times come from CUDA events (synchronised once per measurement); on CPU from
``time.perf_counter``. Denoiser time is measured *inside* real pipeline calls: forward hooks on the
denoiser time every call, so feature caching (cheaper or skipped steps) shows up honestly. The
denoiser figure is the summed denoiser time per pipeline call; ``per_call_ms`` is the median
single call.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Union

import numpy as np
import torch

from .pipes import denoiser_of

KwargsSource = Union[dict[str, Any], Callable[[], dict[str, Any]]]
from ..hooks import ModuleHooks


@dataclass
class LatencyStats:
    """Milliseconds: median, 10th/90th percentile and mean of ``repeats`` timed runs after warm-up."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    timer: str
    samples_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_stats(samples_ms: list[float], *, warmup: int, timer: str) -> LatencyStats:
    """Summarise timed samples (ms) as median, p10, p90 (linear interpolation) and mean."""
    if not samples_ms:
        raise ValueError("need at least one timed sample")
    values = np.asarray(samples_ms, dtype=np.float64)
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return LatencyStats(float(median), float(p10), float(p90), float(values.mean()), len(samples_ms),
                        warmup, timer, [float(v) for v in samples_ms])


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _wait_for(device: Any) -> None:
    """Finish the work queued on a non-CUDA accelerator (Apple's MPS, Intel's XPU) before reading the clock:
    their calls return before the kernels run, so perf_counter timed only the launches."""
    kind = None if device is None else torch.device(device).type
    if kind in (None, "cpu", "cuda", "meta"):  # the usual case, on the timing path: nothing else to ask
        return
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None and accelerator.type == kind:  # another backend's device (xla): not ours to sync
        torch.accelerator.synchronize(torch.device(device))


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1; got warmup={warmup}, repeats={repeats}")


def time_once_ms(fn: Callable[[], Any], device: Any = None) -> float:
    """Wall time of one ``fn()`` call in ms (CUDA events on a CUDA ``device``)."""
    if _is_cuda(device):  # events on ``device``'s stream: the current device may be another GPU
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    _wait_for(device)
    begin = time.perf_counter()
    fn()
    _wait_for(device)
    return (time.perf_counter() - begin) * 1000.0


def time_callable(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, device: Any = None) -> LatencyStats:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return the statistics."""
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    samples = [time_once_ms(fn, device) for _ in range(repeats)]
    return latency_stats(samples, warmup=warmup, timer="cuda_events" if _is_cuda(device) else "perf_counter")


class DenoiserTimer:
    """Context manager timing every forward call of ``module`` (CUDA events or perf_counter)."""

    def __init__(self, module: torch.nn.Module, device: Any = None) -> None:
        self.module, self.cuda, self.device = module, _is_cuda(device), device
        self._hooks = ModuleHooks()
        self._marks: list[tuple[Any, Any]] = []
        self._open: Any = None

    def _stamp(self) -> Any:
        if not self.cuda:
            _wait_for(self.device)
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    # kept out of compiled graphs (compile_denoiser compiles the module's call, hooks included): dynamo cannot
    # trace perf_counter and warned at every bench --compile run
    @torch.compiler.disable
    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._open = self._stamp()

    @torch.compiler.disable
    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._marks.append((self._open, self._stamp()))

    def __enter__(self) -> "DenoiserTimer":
        self._hooks.pre(self.module, self._pre)
        self._hooks.post(self.module, self._post)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.remove()

    def reset(self) -> None:
        self._marks.clear()

    def durations_ms(self) -> list[float]:
        """Duration of each recorded call in ms (synchronises CUDA first)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [float(start.elapsed_time(end)) for start, end in self._marks]
        return [(end - start) * 1000.0 for start, end in self._marks]


@dataclass
class PipelineTiming:
    """Pipeline latency, denoiser latency per pipeline call, and the per-call breakdown."""

    pipeline: LatencyStats
    denoiser: LatencyStats
    denoiser_calls: int
    per_call_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline.to_dict(), "denoiser": self.denoiser.to_dict(),
                "denoiser_calls": self.denoiser_calls, "per_call_ms": self.per_call_ms}


def pipeline_device(pipe: Any) -> torch.device:
    """The device the pipeline's denoiser runs on: diffusers' ``_execution_device`` when the pipeline has one
    (with model CPU offload the parameters sit on the CPU between calls: timing fell back to perf_counter
    without a sync and memory to the process RSS), else its first parameter's."""
    try:
        execution = getattr(pipe, "_execution_device", None)
    except Exception:  # noqa: BLE001 - a property of a half-built or custom pipeline
        execution = None
    if isinstance(execution, torch.device) and execution.type not in ("meta", "cpu"):
        return execution
    denoiser = denoiser_of(pipe)
    parameter = next(denoiser.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _kwargs_factory(call_kwargs: dict[str, Any] | Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    return call_kwargs if callable(call_kwargs) else (lambda: dict(call_kwargs))


def _summarise(pipeline_ms: list[float], denoiser_ms: list[float], calls: list[float], repeats: int,
               warmup: int, timer: str) -> PipelineTiming:
    return PipelineTiming(latency_stats(pipeline_ms, warmup=warmup, timer=timer),
                          latency_stats(denoiser_ms, warmup=warmup, timer=timer),
                          denoiser_calls=len(calls) // repeats,
                          per_call_ms=float(np.median(calls)) if calls else 0.0)


def time_pipelines(pipes: Mapping[str, Any], call_kwargs: Mapping[str, KwargsSource], *, warmup: int = 1,
                   repeats: int = 5) -> dict[str, PipelineTiming]:
    """Time several pipelines round-robin (each repeat times each pipeline once), so load drift on a
    shared machine affects all alike; denoiser calls are timed inside the same pipeline calls."""
    _check_counts(warmup, repeats)
    factories = {name: _kwargs_factory(call_kwargs[name]) for name in pipes}
    devices = {name: pipeline_device(pipe) for name, pipe in pipes.items()}
    for _ in range(warmup):
        for name, pipe in pipes.items():
            pipe(**factories[name]())
    samples: dict[str, tuple[list[float], list[float], list[float]]] = {name: ([], [], []) for name in pipes}
    with ExitStack() as stack:
        timers = {name: stack.enter_context(DenoiserTimer(denoiser_of(pipe), devices[name]))
                  for name, pipe in pipes.items()}
        for _ in range(repeats):
            for name, pipe in pipes.items():
                timers[name].reset()
                pipeline_ms = time_once_ms(lambda: pipe(**factories[name]()), devices[name])
                calls = timers[name].durations_ms()
                samples[name][0].append(pipeline_ms)
                samples[name][1].append(sum(calls))
                samples[name][2].extend(calls)
    return {name: _summarise(*samples[name], repeats, warmup, "cuda_events" if _is_cuda(devices[name])
                             else "perf_counter") for name in pipes}


def time_pipeline(pipe: Any, call_kwargs: KwargsSource, *, warmup: int = 1, repeats: int = 5) -> PipelineTiming:
    """Time ``pipe(**call_kwargs)`` and, in the same calls, its denoiser's forward calls.

    ``call_kwargs`` may be a callable returning fresh kwargs (e.g. new seeded generators) per call.
    """
    return time_pipelines({"pipe": pipe}, {"pipe": call_kwargs}, warmup=warmup, repeats=repeats)["pipe"]
