"""``calibrate``: run the real pipeline once and stream module tensors, tagged by step, into collectors.

How inputs map to pipeline calls (prompts, class ids, unconditional samples) is described in
``inputs.py``. Under classifier-free guidance SD-style pipelines make one denoiser call per step
holding both halves (2 x batch rows, context "default"); pipelines that call the denoiser twice
per step inside ``cache_context("cond"/"uncond")`` (Flux true CFG) give two calls per step with
the same step index and their own context. Collectors see all of them: CFG branches included.
"""

from __future__ import annotations

import copy
import inspect
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch.registry import find_any_denoiser
from ..hooks import ModuleHooks, StepTracker, get_tracker, refuse_while_cached, use_tracker
from ..pipeline_defaults import call_defaults
from ..scalars import plain_number, plain_values
from ..seeding import seeded_call
from ..stacklevel import user_stacklevel
from ..uncompiled import uncompiled
from .collectors import Collector, Step
from .dispatch import CollectorRouter, forget_run, validate_collectors
from .inputs import UNSET, PlannedCall, calibration_items, call_mode, placeholder_prompts, plan_calls
from .result import Calibration, CalibrationSettings, architecture_config
from .schedule import denoiser_steps, resolve_weights, select_steps
from .call_state import CallState, call_state, processors_restored_on_error, state_change, stateful_modules
from .trajectory import TrajectoryRecorder
from .trees import call_batch_size, map_tensors

TRACKER_CLIENT = "calib"
DEFAULT_MAX_TRAJECTORY_BYTES = 1 << 30


@torch.inference_mode(False)  # tensors made under a caller's inference_mode have no version to record
def calibrate(pipe: Any, prompts: Any = None, num_inference_steps: int = 25, *,
              collectors: Sequence[Collector] | Collector = (), steps: str | Sequence[int] = "all",
              weighting: str | Sequence[float] = "uniform", weight_range: tuple[float, float] = (0.8, 1.2),
              guidance_scale: float | None = None, negative_prompt: str | Sequence[str] | None = UNSET,
              batch_size: int = 1, num_images_per_prompt: int = 1, num_samples: int | None = None,
              seed: int = 0, store_trajectory: bool = True,
              max_trajectory_bytes: int = DEFAULT_MAX_TRAJECTORY_BYTES, progress: bool = True,
              **call_kwargs: Any) -> Calibration:
    """Run ``pipe`` over the calibration inputs and feed ``collectors`` on the selected steps.

    ``prompts``: strings for text-to-image pipelines, class ids or label names for class-conditional
    ones (DiT), None for unconditional ones (DDPM; then ``num_samples`` items), run at
    ``num_inference_steps`` steps, ``batch_size`` items per pipeline call, ``num_images_per_prompt`` images
    each (CFG's unconditional branch, ``negative_prompt`` if given, is observed too; left unset, the pipeline's
    call default applies, e.g. fashion-flux's "" for true CFG, and None drops it). ``steps``: "all",
    "uniform:K", "every:K" or a list of step indices. ``weighting``: "uniform", "linear",
    "log-decrease", "log-increase" (between ``weight_range`` = (w_min, w_max)) or one weight per step.
    ``guidance_scale=None`` keeps the pipeline's default. Pipeline call k (of ``batch_size`` items) uses a
    CPU generator seeded ``seed + k``. With ``store_trajectory`` the denoiser inputs of selected steps are kept (CPU, at
    most ``max_trajectory_bytes``) for ``Calibration.replay``. Extra keyword arguments go to every
    pipeline call (e.g. height, width). ``progress``: a bar over the pipeline calls. The pipeline is left
    exactly as it was.
    """
    _, denoiser = find_any_denoiser(pipe)  # a pipeline at all (None, a spec string, a list): named before anything
    num_inference_steps, batch_size, num_images_per_prompt, num_samples, seed, max_trajectory_bytes = (
        plain_number(value) for value in (num_inference_steps, batch_size, num_images_per_prompt, num_samples, seed,
                                           max_trajectory_bytes))
    guidance_scale = plain_number(guidance_scale)
    steps, weighting, weight_range = (plain_values(value) for value in (steps, weighting, weight_range))  # recorded
    num_steps = denoiser_steps(pipe, num_inference_steps, call_kwargs.get("timesteps"),  # Heun: 2N - 1
                               call_kwargs.get("sigmas"))
    selected = select_steps(num_steps, steps)
    weights = resolve_weights(num_steps, weighting, weight_range)
    prompts, num_samples = placeholder_prompts(prompts, num_samples)
    items = calibration_items(pipe, prompts, num_samples)
    calls = plan_calls(pipe, items, num_inference_steps=num_inference_steps, batch_size=batch_size,
                       num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt, seed=seed, call_kwargs=call_kwargs)
    recorder = TrajectoryRecorder(max_trajectory_bytes) if store_trajectory else None
    refuse_while_cached(denoiser, "calibrate")
    bound = validate_collectors(collectors, denoiser)
    settings = CalibrationSettings(
        prompts=None if call_mode(pipe) == "unconditional" else tuple(items),
        num_inference_steps=num_inference_steps, steps=_frozen(steps), weighting=_frozen(weighting),
        weight_range=tuple(weight_range), guidance_scale=guidance_scale,
        negative_prompt=_frozen(None if negative_prompt is UNSET else negative_prompt), batch_size=batch_size,
        num_images_per_prompt=num_images_per_prompt, num_samples=num_samples, seed=seed,
        max_trajectory_bytes=max_trajectory_bytes, call_kwargs=dict(call_kwargs),
        drop_negative_prompt=negative_prompt is None and call_defaults(pipe).get("negative_prompt") is not None)
    result = Calibration(settings=settings, pipeline_class=type(pipe).__name__,
                         denoiser_class=type(denoiser).__name__, selected_steps=selected,
                         step_weights=weights, collectors=bound, seeds=[call.seed for call in calls],
                         denoiser_config=architecture_config(denoiser))
    live = _LiveRun(result, recorder)
    try:
        live.run(pipe, denoiser, calls, progress)
        _check_selected_steps_ran(result)
    except BaseException:
        if not live.fed_collectors:  # they hold nothing of this run: the retry was warned they held data (s49); a
            forget_run(bound)        # failure inside the first observed call counted none while they held data (s50)
        raise
    return result


def _check_selected_steps_ran(result: Calibration) -> None:
    """Raise if no step or no selected step ran, warn if some did not (unless all steps were asked for): calls
    that start mid-schedule (img2img, inpainting at strength < 1) never run the early steps."""
    ran = sorted(result.timesteps)
    beyond = [step for step in ran if step >= result.num_steps]
    if beyond:
        warnings.warn(f"the pipeline ran {ran[-1] + 1} denoiser steps per call where its scheduler set for "
                      f"num_inference_steps={result.settings.num_inference_steps} has {result.num_steps} "
                      f"(custom timesteps or sigmas?); steps {beyond} were not calibrated",
                      stacklevel=user_stacklevel())
    if not ran:  # it returned an empty calibration: prune_ then pruned nothing, silently (until session 49)
        raise ValueError(f"the pipeline made no denoiser call in {result.settings.num_inference_steps} steps "
                         f"(img2img / inpainting run about strength x num_inference_steps of them: none at this "
                         f"strength); raise num_inference_steps or strength")
    observed = [step for step in result.selected_steps if step in result.timesteps]
    missed = [step for step in result.selected_steps if step not in result.timesteps]
    if not missed:
        return
    why = ("img2img and inpainting start mid-schedule" if ran[0] > 0 else
           "the trajectory ended early: denoising_end, custom timesteps or sigmas, or a callback that interrupted it")
    where = f"the pipeline ran steps {ran[0]}..{ran[-1]} of {result.num_steps} ({why})"
    if not observed:
        raise ValueError(f"none of the selected calibration steps {result.selected_steps} ran: {where}; "
                         f"select steps among those, or steps='all'")
    if result.settings.steps != "all":
        warnings.warn(f"selected calibration steps {missed} did not run: {where}; the calibration "
                      f"observed {observed} only", stacklevel=user_stacklevel())


def _frozen(value: Any) -> Any:
    """Strings and None as they are; other sequences as tuples (settings are immutable), tensors and arrays as
    tuples of plain numbers (a tensor of step weights was recorded as '<Tensor>' entries)."""
    if value is None or isinstance(value, str):
        return value
    return tuple(value.tolist() if hasattr(value, "tolist") else value)


class _LiveRun:
    """State of one calibration pass: tags denoiser calls, counts them, records the trajectory."""

    def __init__(self, result: Calibration, recorder: TrajectoryRecorder | None) -> None:
        self.result, self.recorder = result, recorder
        self.selected = frozenset(result.selected_steps)
        self.weights = result.step_weights.tolist()
        self.tracker: StepTracker | None = None
        self.thread = threading.get_ident()  # calls of the denoiser from other threads are not ours
        self.items_in_call = 0
        self.next_progress_step = 0
        self.bar: tqdm | None = None
        self.stateful: list[tuple[str, nn.Module]] = []  # the denoiser's modules call_state reads
        self.call_states: set[CallState] = set()  # the denoiser's modules on recorded calls (call_state)
        self.call_inputs: tuple[tuple, dict] | None = None  # the call in progress's inputs, containers copied
        self.fed_collectors = False  # whether a step tag went to the collectors' hooks (they may hold data)

    def current_step(self) -> Step | None:
        """Tag of the denoiser call in progress, or None when its step is not selected."""
        tracker = self.tracker
        if tracker is None or not self._ours() or not tracker.in_call or tracker.step_index not in self.selected:
            return None
        self.fed_collectors = True
        return Step(tracker.step_index, tracker.timestep, tracker.context, self.weights[tracker.step_index])

    def _ours(self) -> bool:
        """Whether the denoiser call in progress is this calibration's: another pipeline sharing the denoiser
        may run in another thread (a server), and its calls were recorded too (22 calls counted for 16)."""
        return threading.get_ident() == self.thread

    def on_new_trajectory(self) -> None:
        """Tracker reset callback: a new pipeline call began."""
        if not self._ours():
            return
        self.next_progress_step = 0
        if self.recorder is not None:
            self.recorder.new_trajectory()

    def before_denoiser_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the denoiser: keep the inputs' containers as given (a UNet pops T2I-Adapter
        residuals off its ``down_intrablock_additional_residuals`` list: recorded after the call, every stored
        record held an empty list and replays ran without the adapter, 10.9 vs 26.3 dB W8A8 SNR)."""
        if self._ours() and self.recorder is not None:
            self.call_inputs = map_tensors(lambda tensor: tensor, (args, kwargs))  # new containers, same tensors

    def after_denoiser_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward post-hook on the denoiser: count, remember the timestep, record the inputs."""
        if not self._ours():
            return
        args, kwargs = self.call_inputs or (args, kwargs)
        self.call_inputs = None
        tracker, counts = self.tracker, self.result.counts
        index = tracker.step_index
        counts.denoiser_calls += 1
        self.result.timesteps.setdefault(index, tracker.timestep)
        if index >= self.next_progress_step and self.bar is not None:  # steps a call starts after
            self.bar.update(self.items_in_call * (index + 1 - self.next_progress_step))  # (img2img) count as done
            self.next_progress_step = index + 1
        if index in self.selected:
            step = Step(index, tracker.timestep, tracker.context, self.weights[index])
            counts.add_observed(step, call_batch_size(args, kwargs))
            self.call_states.add(call_state(self.stateful))  # also unrecorded: reconstruction's stored outputs (s50)
            if self.recorder is not None:
                self.recorder.record(args, kwargs, step)

    def run(self, pipe: Any, denoiser: nn.Module, calls: list[PlannedCall], progress: bool) -> None:
        """Make every planned pipeline call with hooks installed; hooks always come off again."""
        _refuse_nested(denoiser)
        self.thread, self.stateful = threading.get_ident(), stateful_modules(denoiser)
        router = CollectorRouter(denoiser, self.result.collectors, self.current_step)
        total = sum(call.num_items for call in calls) * self.result.num_steps
        saved_bar_config, saved_scheduler = _silence_pipeline_bar(pipe), scheduler_state(pipe)
        try:
            with uncompiled(pipe), processors_restored_on_error(denoiser), \
                    use_tracker(denoiser, TRACKER_CLIENT, pipeline=pipe, on_reset=self.on_new_trajectory) as tracker, \
                    ModuleHooks() as hooks, tqdm(total=total, desc="calibrate", disable=not progress) as bar:
                self.tracker, self.bar = tracker, bar
                router.install(hooks)
                hooks.pre(denoiser, self.before_denoiser_call, with_kwargs=True)
                hooks.post(denoiser, self.after_denoiser_call, with_kwargs=True)
                for call in calls:
                    tracker.reset()   # a new trajectory, even if a scheduler reuses its timesteps tensor
                    self.items_in_call = call.num_items
                    seeded_call(pipe, call.kwargs | {"generator": torch.Generator().manual_seed(call.seed)}, call.seed)
        finally:
            self.tracker = self.bar = None
            _restore_pipeline_bar(pipe, saved_bar_config)
            restore_scheduler_state(pipe, saved_scheduler)
            self._finish()

    def _finish(self) -> None:
        for collector in self.result.collectors:
            collector.finish()
        self.result.trajectory_state_change = state_change(self.call_states, call_state(self.stateful))
        if self.recorder is not None:
            self.recorder.new_trajectory()
            self.result.trajectory = self.recorder.records
            self.result.trajectory_bytes = self.recorder.bytes
            self.result.trajectory_truncated = self.recorder.truncated


def _refuse_nested(denoiser: nn.Module) -> None:
    tracker = get_tracker(denoiser)
    if tracker is not None and TRACKER_CLIENT in tracker.client_names:
        raise RuntimeError("a calibration is already running on this denoiser; calibrate is not re-entrant")


_NO_CONFIG = object()


def _silence_pipeline_bar(pipe: Any) -> Any:
    """Disable the pipeline's own progress bar; returns the previous config to restore."""
    saved = pipe.__dict__.get("_progress_bar_config", _NO_CONFIG)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**(dict(saved) if isinstance(saved, dict) else {}) | {"disable": True})
    return saved


def _restore_pipeline_bar(pipe: Any, saved: Any) -> None:
    if saved is _NO_CONFIG:
        pipe.__dict__.pop("_progress_bar_config", None)
    else:
        pipe._progress_bar_config = saved


@contextmanager
def silent_pipeline_bar(pipe: Any) -> Iterator[None]:
    """The pipeline's own per-call progress bar off within the block (runs that make many calls show their
    own progress instead: a schedule search printed one 50-step bar per run, thousands of them)."""
    saved = _silence_pipeline_bar(pipe)
    try:
        yield
    finally:
        _restore_pipeline_bar(pipe, saved)


def scheduler_state(pipe: Any) -> dict[str, Any] | None:
    """The pipeline scheduler's attributes (timesteps, sigmas, step index, multistep buffers), or None without a
    scheduler. The values themselves, lists and dicts copied: schedulers replace their tensors rather than
    edit them, and keeping the same ``timesteps`` object keeps the step tracker from taking the restore for
    a new trajectory of the original pipeline (it then placed another pipeline's next call by it)."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return None
    return {name: copy.copy(value) if isinstance(value, (list, dict)) else value for name, value in vars(scheduler).items()}


def restore_scheduler_state(pipe: Any, saved: dict[str, Any] | None) -> None:
    """Put the attributes ``scheduler_state`` copied back on the same scheduler object: calibration runs left
    it set for their own step count (a user's ``set_timesteps(20)`` before ``quantize_`` found 10 after)."""
    scheduler = getattr(pipe, "scheduler", None)
    if saved is not None and scheduler is not None:
        vars(scheduler).clear()
        vars(scheduler).update(saved)


def calibrate_parameters() -> set[str]:
    """Names of ``calibrate``'s own parameters: extra pipeline arguments must not reuse them (``seed`` was
    a 'multiple values' crash, ``weight_range`` silently changed the weighting)."""
    return {name for name, parameter in inspect.signature(calibrate).parameters.items()
            if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}

