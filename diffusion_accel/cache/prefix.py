"""Reusing the shared prefix of cache schedules in a schedule search.

Two schedules that decide the same (full / partial level / reuse) at every step before step ``d`` give
the denoiser the same inputs there and get the same outputs (same prompts, seeds, decisions). The searches
try hundreds of schedules that differ from earlier ones in a step or two, so :class:`PrefixReplay` keeps
the denoiser outputs of recent runs and replays the longest matching prefix: a hook on the denoiser,
beneath the step tracker (which still places every call, so the cache session decides every step as
usual), returns the recorded output instead of computing. Only the full steps whose features the cache
holds at step ``d`` run in the prefix (the last one; the last two when forecasting), then everything from
``d`` on. The pipeline's own loop (scheduler, guidance) runs unchanged on bit-identical values, so every
error equals a run without replay (checked: each run's decisions must match the predicted ones, else
replay is switched off for the rest of the search).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import BaseOutput
from torch import nn

from ..hooks import get_tracker, remove_hook_keeping_later
from .apply import enable_cache, remove_cache, summary as cache_summary
from .configs import CalibratedCacheConfig
from .runs import final_outputs, relative_error
from .session import drop_empty_registry, get_session
from .streams import detached
from .unet_branch import clone_tensors

REPLAY_HOOK_NAME = "diffusion_accel.cache.prefix_replay"
KEPT_RUNS = 16  # recent runs whose outputs may be replayed


class ReplayHook(ModelHook):
    """Beneath the tracker: returns the source run's output for calls at ``replayed`` steps, else computes;
    with ``record``, keeps every output of the current pipeline call (detached copies; a replayed one is the
    source's own copy, which is never handed out, so shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.replayed_calls = self.total_calls = 0  # over the hook's life
        self.start(None, frozenset(), record=False)

    def start(self, source: list | None, replayed: frozenset[int], record: bool = True) -> None:
        """Begin a pipeline call replaying ``source`` (its outputs in call order) at ``replayed`` steps."""
        self.source, self.replayed, self.record, self.recorded = source, replayed, record, []
        self.calls = 0  # denoiser calls of this pipeline call

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        tracker, index = get_tracker(module), self.calls
        self.calls, self.total_calls = self.calls + 1, self.total_calls + 1
        step = tracker.step_index if tracker is not None and tracker.in_call else None
        kept = self.source[index] if self.source is not None and index < len(self.source) else None
        if kept is not None and step in self.replayed:
            self.replayed_calls += 1
            output = _copied(kept)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
            kept = _kept_copy(output) if self.record else None
        if self.record:
            self.recorded.append(kept)
        return output


def _kept_copy(value: Any) -> Any:
    """A detached copy of a denoiser output made of tensors in tuples / lists (pipelines passing
    ``return_dict=False``) or in a diffusers output (DiT's and DDPM's read ``.sample``); None for any
    other output, which is then never replayed."""
    if isinstance(value, BaseOutput):
        return _copied(type(value)(**{key: detached(item) for key, item in value.items()})) \
            if _tensors_only(tuple(value.values())) else None
    return clone_tensors(detached(value)) if _tensors_only(value) else None


def _copied(value: Any) -> Any:
    """``value`` with its tensors cloned (a diffusers output rebuilt in its own class)."""
    if isinstance(value, BaseOutput):
        return type(value)(**{key: clone_tensors(item) for key, item in value.items()})
    return clone_tensors(value)


def _tensors_only(value: Any) -> bool:
    """Whether ``value`` is a tensor, or tuples / lists holding only those."""
    if isinstance(value, (tuple, list)):
        return all(_tensors_only(item) for item in value)
    return isinstance(value, torch.Tensor)


def run_settings(config: CalibratedCacheConfig) -> tuple[Any, ...]:
    """What besides the step decisions shapes a run's outputs (the branch cached, the forecast and its target,
    the timesteps steps are mapped by): runs replay only runs made with the same."""
    return (config.num_inference_steps, config.branch, config.forecast, config.forecast_target, config.timesteps)


def schedule_decisions(config: CalibratedCacheConfig) -> tuple[Any, ...]:
    """Per step of ``config``: "full", the partial level (int) or "reuse"."""
    partial = dict(config.partial_steps)
    return tuple("full" if step in config.full_steps else partial.get(step, "reuse")
                 for step in range(config.num_inference_steps))


def replayed_steps(decisions: tuple, differs_at: int, forecasting: bool) -> frozenset[int]:
    """Steps before ``differs_at`` to replay: all but the full steps whose features the cache holds at
    ``differs_at`` (the last full one; the last two when forecasting)."""
    full = [step for step in range(differs_at) if decisions[step] == "full"]
    kept = set(full[-2:] if forecasting else full[-1:])
    return frozenset(step for step in range(differs_at) if step not in kept)


def _common_prefix(first: tuple, second: tuple) -> int:
    """Length of the common prefix of two decision sequences."""
    for step, (one, other) in enumerate(zip(first, second)):
        if one != other:
            return step
    return min(len(first), len(second))


class PrefixReplay:
    """Schedule errors with prefix replay (see the module doc): ``with PrefixReplay(pipe, denoiser) as replay:``
    installs the hook on ``denoiser`` (the pipeline's, not a compiled wrapper) and removes it afterwards;
    ``replay.error(config, calls, references)`` is the mean relative final-output error of ``config``.
    ``enabled=False`` runs every schedule from step 0."""

    def __init__(self, pipe: Any, denoiser: nn.Module, enabled: bool = True) -> None:
        self.pipe, self.denoiser = pipe, denoiser  # the denoiser itself, not a compiled wrapper
        self.runs: deque[tuple[tuple, tuple, list[list]]] = deque(maxlen=KEPT_RUNS)  # (settings, decisions, outputs)
        # a tracker already attached (timestep-grouped quantization) would sit beneath the hook, miss replayed calls
        self.enabled, self.hook = enabled and get_tracker(denoiser) is None, ReplayHook()

    @property
    def replayed_calls(self) -> int:
        """Denoiser calls answered from recorded runs so far."""
        return self.hook.replayed_calls

    @property
    def total_calls(self) -> int:
        """Denoiser calls through the hook so far, replayed or computed (none while it is not installed)."""
        return self.hook.total_calls

    def __enter__(self) -> "PrefixReplay":
        if self.enabled:  # registered before enable_cache attaches the tracker, so the tracker wraps it
            HookRegistry.check_if_exists_or_initialize(self.denoiser).register_hook(self.hook, REPLAY_HOOK_NAME)
        return self

    def __exit__(self, *exc: object) -> None:
        registry = getattr(self.denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(REPLAY_HOOK_NAME) is not None:
            remove_hook_keeping_later(registry, REPLAY_HOOK_NAME)
            drop_empty_registry(self.denoiser)

    def error(self, config: CalibratedCacheConfig, calls: list, references: list) -> float:
        """Mean relative L2 error of the final outputs of ``calls`` with ``config`` vs ``references``."""
        decisions, settings = schedule_decisions(config), run_settings(config)
        source, replayed = self._plan(settings, decisions, bool(getattr(config, "forecast", 0)))
        recorded: list[list] = []

        def start(index: int) -> None:
            """Before pipeline call ``index``: keep the previous call's outputs, replay this one's prefix."""
            if index:
                recorded.append(self.hook.recorded)
            self.hook.start(None if source is None else source[index], replayed, record=self.enabled)

        enable_cache(self.pipe, config)
        get_session(self.denoiser).replayed_steps = replayed
        try:
            outputs = final_outputs(self.pipe, calls, before_call=start)
            recorded.append(self.hook.recorded)
            as_planned = self._ran_as_planned(decisions)
        finally:
            remove_cache(self.pipe)
            self.hook.start(None, frozenset(), record=False)  # other runs (the search's FLOP count) only compute
        if not as_planned:  # placed otherwise than predicted: replays could be wrong; run without them from now
            self.enabled = False
            if source is not None:
                return self.error(config, calls, references)
        if self.enabled:
            self.runs.append((settings, decisions, recorded))
        return relative_error(outputs, references)

    def _plan(self, settings: tuple, decisions: tuple, forecasting: bool) -> tuple[list | None, frozenset[int]]:
        """The kept run (of the same ``settings``) sharing the longest prefix with ``decisions`` and the steps to
        replay from it."""
        alike = [(kept, outputs) for kept_settings, kept, outputs in self.runs if kept_settings == settings]
        if not self.enabled or not alike:
            return None, frozenset()
        length, outputs = max(((_common_prefix(decisions, kept), outputs) for kept, outputs in alike),
                              key=lambda pair: pair[0])
        replayed = replayed_steps(decisions, length, forecasting)
        return (outputs, replayed) if replayed else (None, frozenset())

    def _ran_as_planned(self, decisions: tuple) -> bool:
        """Whether the last call's recorded decisions are ``decisions`` at every step it ran."""
        for record in cache_summary(self.pipe)["steps"]:
            planned = decisions[record["step"]] if record["step"] < len(decisions) else None
            actual = "full" if record["computed"] else (record["partial"] if record["partial"] is not None
                                                        else "reuse")
            if planned != actual:
                return False
        return True
