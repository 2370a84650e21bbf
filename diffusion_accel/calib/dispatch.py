"""Routing module calls to collectors: one forward pre-hook and/or post-hook per requested module.

The hooks ask ``current_step()`` for the tag of the denoiser call in progress; ``None`` means the
step is not selected and nothing is forwarded. The live runner answers from the step tracker, a
replay from the trajectory record being replayed.
"""

from __future__ import annotations

import warnings

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..hooks import ModuleHooks
from ..stacklevel import user_stacklevel
from .collectors import WANTS, Collector, ModuleCall, Step, check_module_names


def validate_collectors(collectors: Sequence[Collector] | Collector, denoiser: nn.Module) -> list[Collector]:
    """Collectors as a de-duplicated list, type-checked, module names checked, bound to ``denoiser``."""
    if not isinstance(collectors, (Collector, list, tuple)):
        raise TypeError(f"collectors must be a Collector or a list of them, got {type(collectors).__name__} "
                        f"{collectors!r:.60}")
    items = [collectors] if isinstance(collectors, Collector) else list(collectors)
    for item in items:
        if not isinstance(item, Collector):
            raise TypeError(f"collectors must be Collector instances, got {type(item).__name__}; "
                            f"accepted: RangeObserver, HessianCollector, FeatureChangeProbe, SampleStore, "
                            f"or a Collector subclass")
        if item.wants not in WANTS:
            raise ValueError(f"{type(item).__name__}.wants is {item.wants!r}; accepted: {WANTS}")
    unique = list({id(item): item for item in items}.values())
    check_module_names(denoiser, [name for item in unique for name in item.module_names])
    for item in unique:
        item.bind(denoiser)
    for item in unique:  # after every bind: a bind that raised counted the collectors before it as used
        _warn_if_reused(item)
    return unique


_RUNS_ATTR = "_diffusion_accel_runs"


def _warn_if_reused(collector: Collector) -> None:
    """Collectors accumulate: one passed to a second run adds its data to the first run's, and the first
    ``Calibration`` (which holds the same object) silently changes with it."""
    runs = getattr(collector, _RUNS_ATTR, 0)
    if runs:
        warnings.warn(f"{type(collector).__name__} already holds data from {runs} earlier run(s); it accumulates "
                      f"this run's too, and every Calibration holding it sees the sum: use a new collector per run",
                      stacklevel=user_stacklevel())
    setattr(collector, _RUNS_ATTR, runs + 1)


def forget_run(collectors: Sequence[Collector]) -> None:
    """Undo :func:`validate_collectors`' count of a run that gave ``collectors`` no data (it failed first)."""
    for collector in collectors:
        setattr(collector, _RUNS_ATTR, max(getattr(collector, _RUNS_ATTR, 1) - 1, 0))


class CollectorRouter:
    """Installs hooks on the modules collectors name and forwards their tensors on selected steps."""

    def __init__(self, denoiser: nn.Module, collectors: Sequence[Collector],
                 current_step: Callable[[], Step | None]) -> None:
        self.denoiser, self.current_step = denoiser, current_step
        self._by_module: dict[str, dict[str, list[Collector]]] = defaultdict(lambda: defaultdict(list))
        for collector in collectors:
            for name in collector.module_names:
                self._by_module[name][collector.wants].append(collector)

    def install(self, hooks: ModuleHooks) -> None:
        """Register the hooks into ``hooks`` (which removes them all on exit)."""
        for name, routes in self._by_module.items():
            module = self.denoiser.get_submodule(name)
            if routes.get("input"):
                hooks.pre(module, self._input_hook(name, routes["input"]), with_kwargs=True)
            if routes.get("output") or routes.get("call"):
                hooks.post(module, self._output_hook(name, routes.get("output", []), routes.get("call", [])),
                           with_kwargs=True)

    def _input_hook(self, name: str, collectors: list[Collector]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            step = self.current_step()
            if step is not None:
                for collector in collectors:
                    collector.observe(name, collector.pick((args, kwargs), name), step)
        return hook

    def _output_hook(self, name: str, on_output: list[Collector], on_call: list[Collector]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            step = self.current_step()
            if step is None:
                return
            for collector in on_output:
                collector.observe(name, collector.pick(output, name), step)
            for collector in on_call:
                collector.observe(name, ModuleCall(args=args, kwargs=kwargs, output=output), step)
        return hook
