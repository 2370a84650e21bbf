"""The live cache on one denoiser: its hooks, its step decisions and what the last call computed.

The session is stored on the denoiser (``_diffusion_accel_cache``). Per-context state (cached
tensors, policy memory) lives in the step tracker under the client ``"cache"``, so CFG's cond and
uncond passes never share a cache and every pipeline call starts fresh.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..hooks import (CACHE_CLIENT, StepTracker, attach_tracker, calling_pipeline, detach_tracker_if_unused,
                     diffusers_cache_problem, remove_hook_keeping_later)
from ..pretrained_guard import GuardedMethod
from ..stacklevel import user_stacklevel
from .forecast import forecast_scale

SESSION_ATTR = "_diffusion_accel_cache"
DIFFUSERS_ENABLE = "enable_cache"  # diffusers' CacheMixin method, refused while our cache is on
DIFFUSERS_RESET = "_reset_stateful_cache"  # what pipelines call on each component when a call ends
CACHE_HOOK_NAME = "diffusion_accel.cache"
TRACKER_CLIENT = CACHE_CLIENT


# Pipelines that read attention maps out of the denoiser's inner modules during a call (SAG the mid block's
# self-attention map, Attend-and-Excite the cross-attention maps it back-propagates through to the latents): a cache
# skips those modules on reuse steps, leaving a stale map or none (a shape error, or autograd's "not used in the
# graph", deep inside diffusers; session 49 review).
MAP_READING_PIPELINES = ("StableDiffusionSAGPipeline", "StableDiffusionAttendAndExcitePipeline")


def map_reading_name(pipe: Any) -> str | None:
    """The name in :data:`MAP_READING_PIPELINES` that ``pipe`` is or derives from (None: none, or no pipeline)."""
    names = {cls.__name__ for cls in type(pipe).__mro__} if pipe is not None else set()
    return next((name for name in MAP_READING_PIPELINES if name in names), None)


def refuse_map_reading_pipeline(pipe: Any, where: str) -> None:
    """ValueError when ``pipe`` is, or derives from, one of :data:`MAP_READING_PIPELINES`."""
    name = map_reading_name(pipe)
    if name is not None:
        raise ValueError(f"{where}: {name} reads attention maps from inside the denoiser during its call, and a "
                         f"feature cache skips those modules on reuse steps (the map would be stale or missing); "
                         f"call it without the cache (da.remove_cache(pipe)), or cache another pipeline")


def _warn_if_map_reading(caller: Any) -> bool:
    """Whether ``caller`` (the pipeline making this denoiser call) reads attention maps: then the call computes
    every block (a ``from_pipe`` sibling of a cached pipeline; refusing mid-call left SAG's attention processor
    swapped), with a warning that its calls are not accelerated."""
    name = map_reading_name(caller)
    if name is not None:
        warnings.warn(f"{name} reads attention maps from inside the cached denoiser: its calls compute every block "
                      f"(no caching; enable_cache refuses it)", stacklevel=user_stacklevel())
    return name is not None


@dataclass
class StepRecord:
    """What one denoiser call did: blocks computed vs reused, the policy's signal change, and a partial step's
    level (a reuse step recomputing part of the cached blocks; None otherwise)."""

    step: int
    context: str
    computed: bool
    computed_blocks: int
    reused_blocks: int
    signal_change: float | None = None
    partial: int | None = None


class _CallLog(threading.local):
    """What the last pipeline call of one thread computed (pipelines sharing a cached denoiser in threads
    each read their own call in ``summary``); a deep copy carries the copying thread's log."""

    def __init__(self) -> None:
        self.records: deque[StepRecord] = _log()
        self.residual_changes: deque[tuple[int, str, float]] = _log()
        self.fresh = True  # the next record starts a new call's log

    def __deepcopy__(self, memo: dict[int, Any]) -> "_CallLog":
        clone = _CallLog()
        clone.records, clone.fresh = _log(copy.deepcopy(list(self.records), memo)), self.fresh
        clone.residual_changes = _log(self.residual_changes)
        return clone


MAX_RECORDS = 20_000  # per call's log: a 1,000-step pipeline call with separate CFG calls makes 2,000-3,000


def _log(items: Any = ()) -> deque:
    """A call log keeping the last MAX_RECORDS entries: a denoiser called directly in a loop, never reset by a
    pipeline call, added one record per call without end (session 32 soak probe)."""
    return deque(items, maxlen=MAX_RECORDS)


class StepDecision:
    """One context's decision for its current call. A single object per context, updated in place outside
    compiled code, so a compiled hook reading ``compute`` guards on that bool only, not on step numbers
    (one graph per decision, not per step)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.compute = True
        self.full_step: int | None = None  # the last two steps that computed, for forecasts
        self.previous_full_step: int | None = None
        self.forecast_scale: torch.Tensor | None = None  # on reuse steps (see forecast.forecast_scale)
        self.partial: int | None = None  # a reuse step's level when it recomputes part of the cached blocks

    def update(self, step: int, compute: bool, partial: int | None = None) -> None:
        """Record ``compute`` (and a reuse step's ``partial`` level) for ``step`` and, on a reuse step, its
        forecast scale."""
        self.step, self.compute, self.partial = step, compute, None if compute else partial
        if compute:
            self.previous_full_step, self.full_step = self.full_step, step
        self.forecast_scale = None if compute else forecast_scale(step, self.full_step, self.previous_full_step)


def _logged(name: str) -> property:
    """A CacheSession attribute kept in the calling thread's ``_CallLog``."""
    return property(lambda self: getattr(self.log, name), lambda self, value: setattr(self.log, name, value))


@dataclass
class CacheSession:
    """Hooks and bookkeeping of one enabled cache (see :func:`enable_cache`)."""

    denoiser: nn.Module
    tracker: StepTracker
    config: Any
    method: str
    policy: Any
    cached_blocks: tuple[str, ...] = ()
    total_blocks: int = 0
    reuse_size: int | None = None  # blocks bypassed per reuse step when fewer than cached_blocks (Δ-DiT)
    partial_reused: dict[int, int] = field(default_factory=dict)  # blocks a partial step of each level reuses
    hooked: list[nn.Module] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    named_hooks: dict[str, tuple[nn.Module, Any]] = field(default_factory=dict)  # name -> (module, make_hook)
    log: _CallLog = field(default_factory=_CallLog)
    record_residuals: bool = False  # log residual changes per full step (TeaCache fitting only)
    replayed_steps: frozenset[int] = frozenset()  # steps whose outputs a schedule search replays (.prefix): they
    # decide as if the steps before them had run (ready, partial levels recorded) although no hook ran

    records = _logged("records")  # this thread's last call: one StepRecord per denoiser call
    residual_changes = _logged("residual_changes")  # (step, context, change) per full step, when recorded
    fresh = _logged("fresh")

    # ---- per-call state and decisions ------------------------------------------------
    def active(self) -> bool:
        """True inside a denoiser call (hooks fall back to plain computation otherwise)."""
        return self.tracker.in_call

    def state(self) -> dict[str, Any]:
        """This context's state dict for the current pipeline call."""
        return self.tracker.state(TRACKER_CLIENT)

    def on_call(self) -> None:
        """Tracker callback at each denoiser call, once the call is placed: a step policy decides here, so
        under torch.compile the decision costs no graph break of its own (a head policy decides on its
        signal, in the head block: see :meth:`decide`)."""
        self._follow_replaced_modules()
        state = self.state()
        if "map_reading" not in state:  # once per context and pipeline call (a stack walk), not per denoiser call
            state["map_reading"] = _warn_if_map_reading(calling_pipeline())  # a from_pipe sibling: computes
            _refuse_later_diffusers_cache(self.denoiser)
        if not getattr(self.policy, "uses_head", False):
            self._decide(None)

    def log_undecided_call(self) -> None:
        """Log a head policy's call that never ran its head block (SD3's skip-layer guidance skipping block 0)
        as computed: it ran every block without a decision, and ``summary`` left it out (until session 41)."""
        if not getattr(self.policy, "uses_head", False) or self.tracker.shared_context:
            return
        state = self.state()
        decision, step = state.get("decision"), self.tracker.step_index
        if decision is None or decision.step != step:
            self._record(step, True, None, None, state)

    def compute(self, state: dict[str, Any]) -> bool:
        """This call's decision for a hooked module: True computes (also before any decision)."""
        decision = state.get("decision")
        return True if decision is None else decision.compute

    def partial(self, state: dict[str, Any]) -> int | None:
        """This reuse step's partial level (None: the whole cached part is reused, or the step computes)."""
        decision = state.get("decision")
        return None if decision is None else decision.partial

    def forecast_scale(self, state: dict[str, Any]) -> torch.Tensor | None:
        """This reuse step's forecast scale (None: reuse the last full step's value as it is)."""
        decision = state.get("decision")
        return None if decision is None else decision.forecast_scale

    @torch.compiler.disable
    def decide(self, signal: torch.Tensor | None = None) -> bool:
        """Whether this call computes the cached blocks, from a head policy's ``signal`` (a graph break)."""
        return self._decide(signal)

    def _decide(self, signal: torch.Tensor | None) -> bool:
        """Ask the policy once per (context, step); store and log the answer."""
        state, step = self.state(), self.tracker.step_index
        decision = state.setdefault("decision", StepDecision())
        if self.tracker.shared_context or state.get("map_reading"):  # tiles in one context / a map-reading pipeline:
            decision.update(step, True, None)  # each computes, and is logged: once per step under-counted the
            self._record(step, True, None, None, state)  # summary's calls (38 of 44 for 11 panorama views, s50)
            return True
        if decision.step != step:
            num_steps = self.tracker.num_inference_steps
            ready = state.get("ready", False) or step in self.replayed_steps
            compute = self.policy.should_compute(step, num_steps, state, signal) or not ready
            decision.update(step, compute, None if compute else self._partial_level(step, num_steps, state))
            self._record(step, decision.compute, state.get("signal_change"), decision.partial, state)
        return decision.compute

    def _partial_level(self, step: int, num_steps: int | None, state: dict[str, Any]) -> int | None:
        """The policy's partial level for this reuse step, if the last full step recorded what it reuses
        (``state["partial_levels"]``); else None, a whole reuse."""
        level_of = getattr(self.policy, "partial_level", None)
        level = None if level_of is None else level_of(step, num_steps, state)
        recorded = level in state.get("partial_levels", ()) or step in self.replayed_steps
        return level if level is not None and recorded else None

    def _record(self, step: int, compute: bool, change: float | None, partial: int | None = None,
                state: dict[str, Any] | None = None) -> None:
        self.start_records_if_fresh()
        reused = 0 if compute else self._reused_count(partial, state)
        self.records.append(StepRecord(step, self.tracker.context, compute,
                                       self.total_blocks - reused, reused, change, partial))

    def _reused_count(self, partial: int | None, state: dict[str, Any] | None) -> int:
        """Blocks a reuse step reuses: a partial level's, the policy's own count (a block router's), or all cached."""
        if partial is not None:
            return self.partial_reused[partial]
        counted = getattr(self.policy, "reused_count", None)
        if counted is not None and state is not None:
            return counted(state)
        return self.reuse_size or len(self.cached_blocks)

    def on_reset(self) -> None:
        """The tracker reset (a new call, or diffusers resetting hooks after one): the next record
        starts a new call's log (so the last call's log stays readable after it returned)."""
        self.fresh = True

    def start_records_if_fresh(self) -> None:
        """Drop the previous call's log on the first record after a reset."""
        if self.fresh:
            self.records, self.residual_changes, self.fresh = _log(), _log(), False

    # ---- installation --------------------------------------------------------------
    def hook(self, module: nn.Module, hook: ModelHook) -> None:
        """Register ``hook`` on ``module`` under the cache's hook name."""
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, CACHE_HOOK_NAME)
        self.hooked.append(module)

    def hook_named(self, name: str, make_hook: Any) -> None:
        """Hook the denoiser's submodule ``name`` with ``make_hook(session)``, and hook whatever module holds that
        name at a later call instead (``_follow_replaced_modules``). The session is an argument, not captured: a
        deep copy shares the function, and a closure tied the copy's moved hook to the original's session."""
        module = self.denoiser.get_submodule(name)
        self.hook(module, make_hook(self))
        self.named_hooks[name] = (module, make_hook)

    def _follow_replaced_modules(self) -> None:
        """Move each named hook onto the module now at its name. peft wraps a leaf layer in place when a LoRA is
        added (the hooked ``proj_out`` became its ``base_layer``: the cached base output plus a LoRA delta of the
        passed-through input) and puts the base back on unload (the wrapper's hook went with it: output caching
        stopped, silently); until session 46."""
        for name, (module, make_hook) in list(self.named_hooks.items()):
            current = self.denoiser.get_submodule(name)
            if current is module:
                continue
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                remove_hook_keeping_later(registry, CACHE_HOOK_NAME)
                drop_empty_registry(module)
            self.hooked = [hooked for hooked in self.hooked if hooked is not module]
            self.hook(current, make_hook(self))
            self.named_hooks[name] = (current, make_hook)

    def remove(self) -> None:
        """Remove every hook, torch handle and the tracker client; leave no empty registries."""
        for module in self.hooked:
            registry = getattr(module, "_diffusers_hook", None)  # gone already: a removal interrupted before
            if registry is not None:
                remove_hook_keeping_later(registry, CACHE_HOOK_NAME)
                drop_empty_registry(module)
        for handle in self.handles:
            handle.remove()
        self.hooked, self.handles, self.named_hooks = [], [], {}
        self.tracker.unregister_client(TRACKER_CLIENT)
        if detach_tracker_if_unused(self.denoiser):
            drop_empty_registry(self.denoiser)
        _invalidate_registry_cache(self.denoiser)


class AfterEachCall:
    """Forward hook on the denoiser, registered after the method's own, ending each denoiser call: it logs a
    head policy's call that made no decision (``CacheSession.log_undecided_call``) and, once a context's last
    step of the schedule has run, drops its cached features. UNet caches kept them (fashion-sd DeepCache with a
    forecast: 2.9 MiB; SD 1.5 at 512 px ~21 MB, encoder propagation ~54 MB) on the device after the call
    returned, until the next call. A torch hook runs after every diffusers hook's post-forward, so the
    cache's own hooks (and the prior-noise injection, also a torch hook, registered earlier) still saw
    them on that step."""

    def __init__(self, session: CacheSession) -> None:
        self.session = session

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.session.log_undecided_call()
        if self.session.tracker.at_last_step:
            self.session.tracker.drop_state(TRACKER_CLIENT)


def finish_session(session: CacheSession) -> None:
    """Last step of installing a cache: the hook ending each denoiser call (``AfterEachCall``)."""
    session.handles.append(session.denoiser.register_forward_hook(AfterEachCall(session)))


def start_session(pipe: Any, denoiser: nn.Module, config: Any, method: str, policy: Any) -> CacheSession:
    """Attach the tracker, register the cache client and store a new session on the denoiser."""
    tracker = attach_tracker(denoiser, pipe)
    session = CacheSession(denoiser=denoiser, tracker=tracker, config=config, method=method, policy=policy)
    tracker.register_client(TRACKER_CLIENT, session.on_reset, on_call=session.on_call)
    setattr(denoiser, SESSION_ATTR, session)
    _guard_diffusers_cache(denoiser)
    _reset_when_calls_end(denoiser)
    return session


def get_session(denoiser: nn.Module) -> CacheSession | None:
    """The cache session of ``denoiser``, or None."""
    return getattr(denoiser, SESSION_ATTR, None)


def end_session(session: CacheSession) -> None:
    """Remove the session's hooks and forget it."""
    session.remove()
    if getattr(session.denoiser, SESSION_ATTR, None) is session:
        delattr(session.denoiser, SESSION_ATTR)
    for name, ours in ((DIFFUSERS_ENABLE, _refuse_diffusers_cache), (DIFFUSERS_RESET, _reset_stateful_hooks)):
        method = vars(session.denoiser).get(name)
        if getattr(method, "__func__", None) is ours:
            del session.denoiser.__dict__[name]


def _guard_diffusers_cache(denoiser: nn.Module) -> None:
    """While our cache is on, the denoiser's own ``enable_cache`` (diffusers' ``CacheMixin``: First-Block,
    TaylorSeer, MagCache, ...) refuses: both would hook the same blocks and skip on each other's
    stale features (an instance-bound method, like ``pretrained_guard``; a deep copy carries its own)."""
    if callable(getattr(type(denoiser), DIFFUSERS_ENABLE, None)) and DIFFUSERS_ENABLE not in vars(denoiser):
        object.__setattr__(denoiser, DIFFUSERS_ENABLE, GuardedMethod(_refuse_diffusers_cache, denoiser))


def _reset_when_calls_end(denoiser: nn.Module) -> None:
    """Every diffusers pipeline calls its components' ``_reset_stateful_cache`` when a call ends
    (``maybe_free_model_hooks``), a call stopped early by ``denoising_end`` (SDXL base + refiner) or an interrupt
    included. Transformers have it (``CacheMixin``) and their tracker resets there; UNets do not, and their
    cached features stayed on the device after such calls until the next one (``AfterEachCall`` only
    frees them after the schedule's last step). While the cache is on, an instance-bound one does the same."""
    if not hasattr(type(denoiser), DIFFUSERS_RESET) and DIFFUSERS_RESET not in vars(denoiser):
        object.__setattr__(denoiser, DIFFUSERS_RESET, GuardedMethod(_reset_stateful_hooks, denoiser))


def _reset_stateful_hooks(denoiser: nn.Module, recurse: bool = True) -> None:
    """``CacheMixin._reset_stateful_cache``: reset the stateful hooks of the denoiser's registry (the tracker)."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks(recurse=recurse)


def _refuse_later_diffusers_cache(denoiser: nn.Module) -> None:
    """ValueError when diffusers' ``apply_*`` cache functions hooked the denoiser after our cache was enabled (the
    guard only covers ``denoiser.enable_cache``): both caches ran, each skipping on the other's stale features
    (0.026 off either alone, until session 50)."""
    problem = diffusers_cache_problem(denoiser)
    if problem is not None:
        raise ValueError(f"diffusion_accel's cache is enabled on this {type(denoiser).__name__}, and {problem}: two "
                         f"caches would skip on each other's stale features; keep one (diffusion_accel.remove_cache"
                         f"(pipe) removes ours)")


def _refuse_diffusers_cache(denoiser: nn.Module, *args: Any, **kwargs: Any) -> None:
    name = type(denoiser).__name__
    raise ValueError(f"diffusion_accel's cache is enabled on this {name}; diffusers' enable_cache would stack a "
                     f"second cache on the same blocks. Call diffusion_accel.remove_cache(pipe) first")


def drop_empty_registry(module: nn.Module) -> None:
    """Delete an empty diffusers hook registry and the instance ``forward`` it left behind."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.hooks:
        return
    del module._diffusers_hook
    forward = vars(module).get("forward")
    if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward


def _invalidate_registry_cache(denoiser: nn.Module) -> None:
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
