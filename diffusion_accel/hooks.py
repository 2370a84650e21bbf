"""The one hook engine: step tracking and per-context named state for a denoiser.

A :class:`StepTracker` is attached once per denoiser (as a diffusers ``ModelHook``). On every
denoiser call it knows the step index within the current pipeline call, the timestep, and the
context name ("cond"/"uncond" when the pipeline uses ``denoiser.cache_context``; ``"default"``
otherwise, e.g. SD's batched CFG).

The step index is the call's position in ``scheduler.timesteps`` whenever that is known without a
device sync: from the offset of a timestep that is a view of them, else from the watched
scheduler's ``step_index``/``begin_index`` when that scheduler runs this call. So img2img and
inpainting, which start mid-schedule (strength < 1), index the same steps a text-to-image call
would, and timestep-dependent schedules and scales stay aligned. A second call at the same position
in the same context (pipelines that run CFG's two branches as separate calls without
``cache_context``, e.g. FluxImg2ImgPipeline's true CFG) gets a context of its own, ``"default#1"``,
so the branches never share state. Otherwise calls are counted from the start of the trajectory.

Techniques register named *clients* with the tracker and keep their state in
``tracker.state(client)``, which is separate per context and cleared at the start of every
pipeline call. A context's state is also dropped when the shapes of the denoiser's tensor inputs
change within a call: a ``callback_on_step_end`` that turns classifier-free guidance off part-way
(diffusers' documented "dynamic CFG") halves the batch, and features cached for the old batch
cannot be reused (the next call recomputes them).

A new pipeline call is detected without patching anything on the pipeline: every diffusers pipeline
calls ``scheduler.set_timesteps`` at the start of ``__call__``, which builds a new
``scheduler.timesteps`` tensor. When the tracker sees a different tensor object than on its last
call, a new trajectory has begun and all state resets. (Assigning ``pipe.__call__`` on an instance
would not work: Python looks ``__call__`` up on the class.) That watches the scheduler of the
pipeline the technique was applied to; the denoiser may also be called by another pipeline built
from its components with a scheduler of its own, or outlive that pipeline. So a call whose timestep
is not a view of the watched ``scheduler.timesteps`` (SD, SDXL, SD3, PixArt, DiT and DDPM pass
views; checking costs no device sync) is checked by value instead: the first such call after calls
that were views, a timestep above the previous one in the same context (samplers only descend), or a
timestep viewing another schedule tensor than the previous such call's (its own scheduler's new
``set_timesteps``: after an interrupted call, a strength-0.3 img2img call starts below the stopped call's last
timestep; a direct call at the same position or one on in a same-length schedule continues) starts a new
trajectory. Calls of denoisers with diffusers' ``CacheMixin`` (Flux) from a pipeline skip the value check: their
pipelines reset stateful hooks (``reset_state`` here) at the end of every completed call; after an interrupted or
a direct call, a call from a pipeline whose scheduler holds other timesteps starts a new trajectory, and a direct
call after a pipeline's starts one too.

Trajectory state is per thread (``_CallState``, a ``threading.local``; diffusers' ``cache_context`` name
too): pipelines built from the same components (diffusers' documented way to share a denoiser) may run
in threads of a server at once. Before session 29 one tracker's state served every thread: a shared
cached or timestep-grouped denoiser gave wrong images (off by up to 0.39 on [0, 1]) or crashed. The
clients' reset callbacks run for every thread's reset.

Hook order: a plain torch forward *pre*-hook registered on the denoiser itself runs before the
tracker's ``pre_forward`` and still sees the previous call's step; read the tracker from hooks on
submodules, or from a forward *post*-hook on the denoiser.
"""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.cache_utils import CacheMixin

from . import hook_copy

TRACKER_HOOK_NAME = "diffusion_accel.step_tracker"
DEFAULT_CONTEXT = "default"
PER_CALL = "per_call"  # a client state's entry that a batch change mid-call keeps (the rest is dropped)
CACHE_CLIENT = "cache"  # the client name feature caching registers (cache/session.py)
# Contexts of their own for calls repeating a position (CFG branches called one by one, PAG's or SD3's skip-layer
# third pass): a few per step. A loop calling the denoiser at one position made one per call, each keeping its
# cached features until the next pipeline call (~21 MB a call on SD 1.5 at 512 px, session 32 soak probe).
MAX_REPEAT_CONTEXTS = 8


class _ContextState:
    """Empty per-context state object; diffusers' StateManager needs a class to build."""

    def reset(self) -> None:
        return None


class _ContextReader(StateManager):
    """A StateManager whose only job is to receive diffusers' ``cache_context`` name (per thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._local = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def _context(self) -> Any:
        return getattr(self._local, "context", None)

    @_context.setter
    def _context(self, value: Any) -> None:
        self._local.context = value

    def __deepcopy__(self, memo: dict[int, Any]) -> "_ContextReader":
        return _ContextReader(self._state_cls)  # a thread's context name is not copied (a lock inside)

    def current_name(self) -> str:
        context = self._context
        return DEFAULT_CONTEXT if context is None else str(context.name)


@dataclass
class _Client:
    """A technique using the tracker: its reset callback; its per-context state dicts are per thread."""

    on_reset: Callable[[], None] | None = None
    on_call: Callable[[], None] | None = None  # runs once per denoiser call, after the call is placed


class _ClientStates(dict):
    """One thread's client states (client -> context -> state dict); a dict a weak reference can point to."""


class _CallState(threading.local):
    """A tracker's trajectory state in one thread (see the module doc); fresh in every thread. Each
    thread's client states join ``registry`` so that unregistering a client forgets them in every thread
    (cached features of a removed cache would otherwise stay alive in the other threads' state)."""

    def __init__(self, registry: "weakref.WeakValueDictionary[int, _ClientStates]") -> None:
        self.counters: dict[str, int] = {}
        self.last_timesteps: torch.Tensor | None = None
        self.last_values: dict[str, float] = {}  # per context: the previous unvouched call's timestep
        self.last_positions: dict[str, int] = {}  # per context: the previous call's position in the timesteps
        self.input_shapes: dict[str, tuple] = {}  # per context: the previous call's tensor input shapes
        self.scheduler_live = False  # the watched scheduler's timesteps were set in this trajectory
        self.caller_timesteps: torch.Tensor | None = None  # CacheMixin: the last calling pipeline's timesteps
        self.caller_scheduler: Any = None  # ... and its scheduler (which places calls the watched one does not)
        # the schedule tensor the previous unvouched call's timestep viewed: a new one is a new call of a pipeline
        # with a scheduler of its own (set_timesteps made it), which after an interrupted call nothing else marked:
        # a strength-0.3 img2img call starts below the stopped call's last timestep (0.39 off, session 47)
        self.foreign_schedule: tuple[torch.Tensor, int | None] | None = None  # (schedule, position in it)
        self.provisional_schedule: tuple[torch.Tensor, int] | None = None  # a direct call's new one, same position
        self.vouched = False  # whether the previous call's timestep was a view of the watched ones
        self.driven = False  # whether the watched scheduler places the current call (see num_inference_steps)
        self.foreign_timesteps: torch.Tensor | None = None  # another schedule placing this call (a view's, a caller's)
        self.step_index = 0
        self.timestep_argument: Any = None
        self.timestep_value: float | None = None
        self.context = DEFAULT_CONTEXT
        self.in_call = False
        self.shared_contexts: set[str] = set()  # contexts calls past MAX_REPEAT_CONTEXTS repeats of a position share
        self.calls_since_reset = 0
        self.pinned_context: str | None = None
        self.client_states = _ClientStates()  # client -> context -> state
        registry[id(self.client_states)] = self.client_states


def _per_thread(name: str) -> property:
    """A StepTracker attribute stored in the calling thread's ``_CallState`` field ``name``."""
    return property(lambda self: getattr(self._call, name), lambda self, value: setattr(self._call, name, value))


class StepTracker(ModelHook):
    """Counts denoiser calls per context within a pipeline call; owns techniques' named state.

    Attributes readable inside any hook during a denoiser call:
      - ``step_index``: this call's position in ``scheduler.timesteps`` (0 = the noisiest step; an
        img2img call starts later), else the count of earlier calls in this context and trajectory.
      - ``timestep``: the scalar timestep of this call as a float (None if the caller passed none),
        read from the tensor only when asked: ``.item()`` on a GPU tensor waits for the device, so
        hooks that never read it (caching) keep the host running ahead of the GPU.
      - ``context``: the context name of this call (``"<name>#k"`` for the k-th repeat of a position).
      - ``num_inference_steps``: length of the watched ``scheduler.timesteps`` when that scheduler
        drives this call (its timestep is a view of them, its step index places the call, or its
        timesteps were set in this trajectory and the timestep is no view of another schedule's); else
        the length of the other schedule the timestep is a view of (a pipeline built from the
        components with its own scheduler; the step index is then its position there); else None (a
        bare denoiser). Until session 27 the watched scheduler's stale length was reported: 1000
        before its first call, else its last call's.
    """

    _is_stateful = True
    _counters = _per_thread("counters")
    _last_timesteps = _per_thread("last_timesteps")
    _last_values = _per_thread("last_values")
    _last_positions = _per_thread("last_positions")
    _input_shapes = _per_thread("input_shapes")
    _scheduler_live = _per_thread("scheduler_live")
    _caller_timesteps = _per_thread("caller_timesteps")
    _caller_scheduler = _per_thread("caller_scheduler")
    _foreign_schedule = _per_thread("foreign_schedule")
    _provisional_schedule = _per_thread("provisional_schedule")
    _vouched = _per_thread("vouched")
    _driven = _per_thread("driven")
    _foreign_timesteps = _per_thread("foreign_timesteps")
    step_index = _per_thread("step_index")
    _timestep_argument = _per_thread("timestep_argument")
    _timestep_value = _per_thread("timestep_value")
    context = _per_thread("context")
    in_call = _per_thread("in_call")
    _shared_contexts = _per_thread("shared_contexts")
    calls_since_reset = _per_thread("calls_since_reset")
    _pinned_context = _per_thread("pinned_context")

    def __init__(self, pipeline: Any | None = None) -> None:
        super().__init__()
        self._pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self._context_reader = _ContextReader(_ContextState)
        self._clients: dict[str, _Client] = {}
        self._thread_states: weakref.WeakValueDictionary[int, _ClientStates] = weakref.WeakValueDictionary()
        self._call = _CallState(self._thread_states)
        self._timesteps_owner: tuple[torch.Tensor, int] | None = None  # (watched timesteps, first thread to use them)

    def __deepcopy__(self, memo: dict[int, Any]) -> "StepTracker":
        """A copy watching the copied pipeline when the pipeline itself is being deep-copied (a weakref
        copies as itself), else the same pipeline (a copied denoiser placed in another pipeline is
        placed by the schedule its timesteps come from, see ``num_inference_steps``). The copy carries
        the copying thread's trajectory state (other threads start fresh in it)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        pipeline = self.pipeline
        kept = {k: v for k, v in self.__dict__.items() if k not in ("_pipeline_ref", "_call", "_thread_states")}
        clone.__dict__.update(copy.deepcopy(kept, memo))
        clone._thread_states = weakref.WeakValueDictionary()
        clone._call = _CallState(clone._thread_states)
        for name, value in vars(self._call).items():
            if name != "client_states":
                setattr(clone._call, name, copy.deepcopy(value, memo))
        clone._call.client_states.update(copy.deepcopy(dict(self._call.client_states), memo))
        watched = memo.get(id(pipeline), pipeline) if pipeline is not None else None
        clone._pipeline_ref = weakref.ref(watched) if watched is not None else None
        return clone

    # ----- clients and state -------------------------------------------------------------
    def register_client(self, name: str, on_reset: Callable[[], None] | None = None,
                        on_call: Callable[[], None] | None = None) -> None:
        """Register a technique under ``name``; ``on_reset`` runs at each new pipeline call, ``on_call`` at each
        denoiser call once it is placed (outside torch.compile graphs, like the tracker itself)."""
        self._clients[name] = _Client(on_reset=on_reset, on_call=on_call)
        self._forget_states(name)

    def unregister_client(self, name: str) -> None:
        """Forget the technique ``name`` and its state in every thread."""
        self._clients.pop(name, None)
        self._forget_states(name)

    def _forget_states(self, client: str) -> None:
        """Drop ``client``'s state in every thread (features a removed cache held stay alive otherwise)."""
        for states in list(self._thread_states.values()):
            states.pop(client, None)

    def client_states(self, client: str) -> dict[str, dict[str, Any]]:
        """``client``'s state dicts by context in the calling thread (empty when it has none)."""
        return self._call.client_states.get(client, {})

    @property
    def client_names(self) -> list[str]:
        return list(self._clients)

    def state(self, client: str, context: str | None = None) -> dict[str, Any]:
        """The mutable state dict of ``client`` for ``context`` (default: the current one)."""
        if client not in self._clients:
            raise KeyError(f"no client named {client!r} is registered; registered: {self.client_names}")
        states = self._call.client_states.setdefault(client, {})
        return states.setdefault(context or self.context, {})

    def reset(self) -> None:
        """Forget this thread's step counters and every client's state (a new trajectory begins)."""
        self._counters.clear()
        self._last_values.clear()
        self._last_positions.clear()
        self._input_shapes.clear()
        self._shared_contexts.clear()
        self._foreign_schedule = self._provisional_schedule = None
        self._scheduler_live = False
        self.calls_since_reset = 0
        self._call.client_states.clear()
        for client in self._clients.values():
            if client.on_reset is not None:
                client.on_reset()

    def pin(self, step_index: int, context: str = DEFAULT_CONTEXT) -> None:
        """Make the next denoiser calls report ``step_index`` under ``context`` until ``unpin``.

        For replaying stored denoiser inputs outside a pipeline call (calibration replay).
        """
        if step_index < 0:
            raise ValueError(f"step_index must be >= 0, got {step_index}")
        if self.in_call:  # end a call that raised now: at the next call its reset dropped this pin (session 48)
            self._end_aborted_call()
        self._detect_new_call()
        self._pinned_context = context
        self._counters[context] = step_index

    def unpin(self) -> None:
        """Return to counting calls and reading the pipeline's context."""
        self._pinned_context = None

    # ----- pipeline awareness -------------------------------------------------------------
    @property
    def pipeline(self) -> Any | None:
        return self._pipeline_ref() if self._pipeline_ref is not None else None

    @property
    def num_inference_steps(self) -> int | None:
        timesteps = self.placing_timesteps()
        return None if timesteps is None else int(len(timesteps))

    def _scheduler_timesteps(self) -> torch.Tensor | None:
        pipeline = self.pipeline
        scheduler = getattr(pipeline, "scheduler", None) if pipeline is not None else None
        timesteps = getattr(scheduler, "timesteps", None)
        return timesteps if isinstance(timesteps, torch.Tensor) else None

    def _detect_new_call(self) -> bool:
        """Reset if the watched scheduler has new timesteps, unless this call's timestep is a view of another
        schedule (a pipeline sharing the denoiser, maybe running in another thread while the watched one
        starts a call: the value check places those); returns whether the current timestep argument is a
        view of the watched timesteps (so that scheduler vouches for this call)."""
        timesteps = self._scheduler_timesteps()
        vouched = _is_view_of(self._timestep_argument, timesteps)
        owned = self._claim(timesteps) or vouched
        # a view of another pipeline's schedule, or (Flux passes no views) timesteps another thread started on,
        # or the schedule the watched scheduler was built with (no set_timesteps yet: another pipeline calls)
        unset = getattr(getattr(self.pipeline, "scheduler", None), "num_inference_steps", None) is None
        foreign = not vouched and (_is_any_view(self._timestep_argument) or not owned or unset)
        if timesteps is not None and timesteps is not self._last_timesteps and not foreign:
            if not vouched and _called_with_another_scheduler(self.pipeline):
                return vouched  # the watched schedule is an old one (set before attach, or restored): not this call's
            self._last_timesteps = timesteps
            self.reset()
            self._scheduler_live = True
        return vouched

    def _claim(self, timesteps: torch.Tensor | None) -> bool:
        """Whether the calling thread owns the watched ``timesteps``: the first thread to call the denoiser after
        they were set (the pipeline sets them in its own thread just before its first denoiser call)."""
        owner, thread = self._timesteps_owner, threading.get_ident()
        if timesteps is None:
            return True
        if owner is None or owner[0] is not timesteps:
            self._timesteps_owner = (timesteps, thread)
            return True
        return owner[1] == thread

    def _detect_other_caller(self, module: torch.nn.Module, context: str) -> None:
        """For a call the watched scheduler does not vouch for: reset on a switch of caller, on a timestep viewing
        another schedule than the previous such call's, or on a rising timestep in ``context`` (a new descent);
        ``CacheMixin`` denoisers called by a pipeline are reset by diffusers (called directly, in a user's own
        loop, they never were: a second loop continued the first)."""
        if isinstance(module, CacheMixin):
            caller = calling_pipeline()
            if caller is not None:
                self._detect_calling_schedule(caller)
                return
            # a direct call after a pipeline's (an interrupted one: diffusers reset none) starts a new trajectory,
            # which no pipeline's scheduler places: a user's loop was placed at the stopped call's step, each call
            # in a repeat context (session 47)
            if self._caller_timesteps is not None and self.calls_since_reset > 0:
                self.reset()
            self._caller_timesteps = self._caller_scheduler = None
        value = self.timestep
        previous = self._last_values.get(context)
        caller_switched = self._vouched and self.calls_since_reset > 0
        schedule = _viewed_schedule(self._timestep_argument)
        position = None if schedule is None else _view_position(self._timestep_argument, schedule)
        if caller_switched or self._new_schedule(schedule, position) or (value is not None and previous is not None
                                                                         and value > previous):
            self.reset()
        self._foreign_schedule = None if schedule is None else (schedule, position)
        if value is not None:
            self._last_values[context] = value

    def _new_schedule(self, schedule: torch.Tensor | None, position: int | None) -> bool:
        """Whether this unvouched call's timestep views (at ``position`` of ``schedule``) another schedule tensor
        than the previous unvouched call's, or is the first view after calls passing none: a new call of a pipeline
        or loop with a scheduler of its own (set_timesteps made the tensor), which after an interrupted call nothing
        else marked: a strength-0.3 img2img call starts below the stopped call's last timestep (0.39 off, session
        47). A direct call at the same position or one on, in a schedule of the same length, continues: a user's
        loop may index a fresh copy of its schedule at every call (``.float()[i]``, CFG as two calls) or run two
        loops in lockstep. One at the same position stays provisional: the next call viewing that tensor one on,
        with no other tensor between, was a restarted loop (a step run, then the whole loop), which resets there.
        So a second direct loop starting one on from where an unfinished one stopped continues it."""
        earlier, provisional, self._provisional_schedule = self._foreign_schedule, self._provisional_schedule, None
        if schedule is None or self.calls_since_reset == 0:
            return False
        if provisional is not None and schedule is provisional[0] and position == provisional[1] + 1:
            return True  # the same-position call began a new loop
        if earlier is not None and schedule is earlier[0]:
            return False
        if calling_pipeline() is not None or earlier is None:
            return True
        same_length = len(earlier[0]) == len(schedule) and earlier[1] is not None and position is not None
        if same_length and position == earlier[1]:
            self._provisional_schedule = (schedule, position)
        return not (same_length and position - earlier[1] in (0, 1))

    def _detect_calling_schedule(self, caller: DiffusionPipeline) -> None:
        """``CacheMixin`` (Flux) denoisers are reset by diffusers at the end of a completed pipeline call, not after
        an interrupted one (an exception from a callback, Ctrl-C) or a direct call. So a call from a pipeline whose
        scheduler holds other timesteps than the previous caller's (another pipeline's own scheduler, or its new
        call after an interruption) starts a new trajectory: it continued the stale one, counting steps on and
        reusing its features (images off by 0.07-0.11 on tiny Flux, session 33 probe). The watched scheduler's
        new timesteps are ``_detect_new_call``'s."""
        scheduler = getattr(caller, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor):
            return
        stale = timesteps is not self._caller_timesteps and self.calls_since_reset > 0
        if stale and timesteps is not self._scheduler_timesteps():
            self.reset()
        self._caller_timesteps, self._caller_scheduler = timesteps, scheduler

    def _place(self, context: str, vouched: bool) -> tuple[str, int]:
        """This call's (context, step index): its position in the timesteps when known, a context of
        its own for a repeated position (a CFG branch called separately), else the call count."""
        position = self._position(vouched)
        self._driven = position is not None or (self._scheduler_live and not _is_any_view(self._timestep_argument)
                                                and not self._watched_schedule_finished())
        self._foreign_timesteps = None
        if position is None and not self._driven:
            position = self._foreign_position()
        if position is None and not self._driven:
            position = self._caller_position()
        if position is None:
            return context, self._counters.get(context, 0)
        branch, repeat = context, 0
        while self._last_positions.get(branch) == position and repeat < MAX_REPEAT_CONTEXTS:
            repeat += 1
            branch = f"{context}#{repeat}"
        if self._last_positions.get(branch) == position:  # past the cap: tiles or views of one step share the last
            self._shared_contexts.add(branch)             # context (``shared_context``), not branches
        self._last_positions[branch] = position
        return branch, position

    def _foreign_position(self) -> int | None:
        """Index of this call's timestep in the schedule it is a view of when that is not the watched one
        (a pipeline built from the components with a scheduler of its own: SD-style pipelines pass
        views), which also gives the trajectory length; None if the timestep is no such view."""
        value = self._timestep_argument
        base = value._base if isinstance(value, torch.Tensor) else None
        if base is None or base.dim() != 1 or base.numel() < 2 or base.device != value.device:
            return None  # a one-value base is no schedule (AuraFlow expands a fresh tensor([t]) each step)
        position = _view_position(value, base)
        if position is not None:
            self._foreign_timesteps = base
        return position

    def _caller_position(self) -> int | None:
        """For a ``CacheMixin`` (Flux) call from another pipeline with a scheduler of its own (its timesteps are no
        views): that scheduler's ``step_index`` (``begin_index`` before its first step, else 0), which also gives the
        trajectory length. Without it such calls had no step count (a Δ-cache never reached its detail stage, a
        calibrated schedule was not resampled), unlike the same call from the watched pipeline."""
        scheduler, timesteps = self._caller_scheduler, self._caller_timesteps
        if scheduler is None or timesteps is None or scheduler is getattr(self.pipeline, "scheduler", None):
            return None
        position = _scheduler_position(scheduler, timesteps)
        if position is not None:
            self._foreign_timesteps = timesteps
        return position

    def _watched_schedule_finished(self) -> bool:
        """Whether the watched scheduler has stepped past its last timestep: a call now is no step of that schedule
        (a direct denoiser loop after the pipeline ran was placed on it: its length and last step, session 43)."""
        timesteps = self._scheduler_timesteps()
        step_index = getattr(getattr(self.pipeline, "scheduler", None), "step_index", None)
        return timesteps is not None and isinstance(step_index, int) and step_index >= len(timesteps)

    def _position(self, vouched: bool) -> int | None:
        """Index of this call's timestep in the watched ``scheduler.timesteps``, or None if unknown:
        a view's offset, else the scheduler's ``step_index`` (None before its first step, then
        ``begin_index``, else 0) while that scheduler drives this trajectory."""
        timesteps = self._scheduler_timesteps()
        if timesteps is None:
            return None
        if vouched:
            return _view_position(self._timestep_argument, timesteps)
        return _scheduler_position(self.pipeline.scheduler, timesteps) if self._scheduler_live else None

    @property
    def timestep(self) -> float | None:
        """The current call's scalar timestep as a float; converted (and the device synced) on first read."""
        if self._timestep_value is None and self._timestep_argument is not None:
            self._timestep_value = _scalar_timestep(self._timestep_argument)
        return self._timestep_value

    # ----- diffusers ModelHook interface ------------------------------------------------
    # Step bookkeeping is Python state: kept out of
    # torch.compile graphs so it costs one clean graph break instead of recompiles and splits.
    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.in_call:  # this thread's previous call raised (post_forward never ran): its trajectory ended there
            self._end_aborted_call()
        self._timestep_argument, self._timestep_value = _timestep_argument(module, args, kwargs), None
        context = self._pinned_context or self._context_reader.current_name()
        vouched = self._detect_new_call() or self._pinned_context is not None
        if not vouched:
            self._detect_other_caller(module, context)
        self._vouched = vouched
        if self._pinned_context is None:
            context, self.step_index = self._place(context, vouched)
        else:
            self.step_index, self._driven = self._counters.get(context, 0), True
        self.context = context
        self._drop_state_if_shapes_changed(context, _tensor_shapes(args, kwargs))
        self.in_call = True
        try:
            for client in self._clients.values():
                if client.on_call is not None:
                    client.on_call()
        except BaseException:  # a client refused the call (a schedule calibrated for other steps): not in one
            self._end_aborted_call()
            raise
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self._counters[self.context] = self.step_index + 1
        self.calls_since_reset += 1
        self.in_call = False
        return output

    def _end_aborted_call(self) -> None:
        """Start afresh after a call that raised (an OOM, a policy's refusal): it left its position recorded and
        no call counted, so the next call of a sibling with a scheduler of its own continued the stale trajectory
        in a repeat context (0.048 off) and its records followed the failed call's (until session 48)."""
        self.in_call = False
        self.reset()

    @property
    def shared_context(self) -> bool:
        """Whether this call's context is shared by calls repeating one position more than MAX_REPEAT_CONTEXTS
        times in this trajectory (tiles, MultiDiffusion views): caches must compute every call there (reused,
        one tile's features went to the others)."""
        return self.context in self._shared_contexts

    def placing_timesteps(self) -> torch.Tensor | None:
        """The timesteps of the schedule placing the current call: the watched scheduler's when it drives the call,
        else another schedule the call's timestep views or its calling pipeline's scheduler holds (a sibling with a
        scheduler of its own, whose calls calibrated schedules mapped by position, not noise level, and never
        refused, until session 48); None for a bare denoiser."""
        timesteps = self._scheduler_timesteps()
        return timesteps if timesteps is not None and self._driven else self._foreign_timesteps

    @property
    def at_last_step(self) -> bool:
        """Whether the current (or just finished) call sits at the last position of the schedule placing it
        (the watched one, or another schedule its timestep is a view of; never for a bare denoiser)."""
        length = self.num_inference_steps
        return length is not None and self.step_index + 1 == length

    def drop_state(self, client: str, context: str | None = None) -> None:
        """Forget ``client``'s state of ``context`` (default: the current one)."""
        self._call.client_states.get(client, {}).pop(context or self.context, None)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.reset()
        return module

    def _drop_state_if_shapes_changed(self, context: str, shapes: tuple) -> None:
        """Forget every client's state of ``context`` when this call's input shapes differ from its
        previous call's (the batch changed mid-trajectory), except what clients keep for the whole call under
        ``PER_CALL`` (a schedule's first step, the prior noise); step positions are kept."""
        if self._input_shapes.get(context, shapes) != shapes:
            for states in self._call.client_states.values():
                dropped = states.pop(context, None)
                if dropped and PER_CALL in dropped:
                    states[context] = {PER_CALL: dropped[PER_CALL]}
        self._input_shapes[context] = shapes


def _tensor_shapes(args: tuple, kwargs: dict) -> tuple:
    """The shapes of a call's tensor arguments, including those inside dicts (SDXL's
    ``added_cond_kwargs``), in argument order (None for non-tensors)."""
    values = list(args) + [kwargs[name] for name in sorted(kwargs)]
    return tuple(_shapes_of(value) for value in values)


def _shapes_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return tuple((name, _shapes_of(value[name])) for name in sorted(value))
    return None


def _is_view_of(value: Any, timesteps: torch.Tensor | None) -> bool:
    """Whether tensor ``value`` shares ``timesteps``' storage (an element, slice or expand of it)."""
    if not isinstance(value, torch.Tensor) or timesteps is None or value.device != timesteps.device:
        return False
    return value.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()


def _viewed_schedule(value: Any) -> torch.Tensor | None:
    """The 1-D schedule (two values or more) tensor ``value`` is a view of, else None (AuraFlow expands a fresh
    tensor([t]) each step: a one-value base is no schedule)."""
    base = value._base if isinstance(value, torch.Tensor) else None
    return base if base is not None and base.dim() == 1 and base.numel() >= 2 else None


def _is_any_view(value: Any) -> bool:
    """True for a tensor that views another one (an element of some ``scheduler.timesteps``)."""
    return isinstance(value, torch.Tensor) and value._base is not None


def _view_position(value: torch.Tensor, timesteps: torch.Tensor) -> int | None:
    """Index in 1-D ``timesteps`` of the element view ``value`` starts at (None if not a valid one)."""
    stride = timesteps.stride(0) if timesteps.dim() == 1 else 0
    if stride <= 0:
        return None
    offset, remainder = divmod(value.storage_offset() - timesteps.storage_offset(), stride)
    return offset if remainder == 0 and 0 <= offset < len(timesteps) else None


def _timestep_argument(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The ``timestep`` argument of a denoiser call (keyword, or positional where the class's ``forward`` takes
    it), or None. PixArt, SD3 and Flux transformers take it third or fourth: a positional call read the text
    embeddings' first value as its timestep, which picked another timestep group's scales (until session 48)."""
    value = kwargs.get("timestep")
    position = _timestep_position(type(module))
    if value is None and position is not None and len(args) > position:
        value = args[position]
    return value


@functools.lru_cache(maxsize=None)
def _timestep_position(module_class: type) -> int | None:
    """Index among the positional arguments of ``module_class.forward`` of its ``timestep`` parameter (1, as
    UNets take it, where the signature names none), or None when it cannot be given positionally."""
    try:
        parameters = list(inspect.signature(module_class.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return 1
    for index, parameter in enumerate(parameters):
        if parameter.name == "timestep":
            return index if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                               inspect.Parameter.POSITIONAL_OR_KEYWORD) else None
    return 1  # (also with *args: forward(self, sample, t, *extra) takes it second)


PIPELINE_FRAME_DEPTH = 40  # frames searched above a denoiser call for the pipeline __call__ making it


def _scheduler_position(scheduler: Any, timesteps: torch.Tensor) -> int | None:
    """The step a scheduler is at in ``timesteps``: its ``step_index`` (``begin_index`` before its first step,
    else 0); None for a scheduler without these or past the end."""
    if not hasattr(scheduler, "begin_index"):
        return None
    position = getattr(scheduler, "step_index", None)
    position = getattr(scheduler, "begin_index", None) if position is None else position
    position = 0 if position is None else int(position)
    return position if position < len(timesteps) else None


def calling_pipeline() -> DiffusionPipeline | None:
    """The diffusers pipeline whose ``__call__`` makes the current denoiser call (the nearest on this thread's
    stack), or None (a direct call)."""
    frame = sys._getframe(1)
    for _ in range(PIPELINE_FRAME_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__" and isinstance(frame.f_locals.get("self"), DiffusionPipeline):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


def _called_with_another_scheduler(watched: Any) -> bool:
    """Whether a pipeline other than ``watched``, with a scheduler of its own, makes the current denoiser call (a
    ``FluxImg2ImgPipeline.from_pipe(flux, scheduler=...)``): the watched scheduler's timesteps do not place it."""
    caller = calling_pipeline()
    return caller is not None and getattr(caller, "scheduler", None) is not getattr(watched, "scheduler", None)


def _scalar_timestep(value: Any) -> float | None:
    """The first value of a timestep argument as a float (None for anything else): a tensor, a number (numpy's
    too: ``np.int64`` timesteps of a loop over ``scheduler.timesteps.numpy()`` were taken for none, and timestep
    groups chosen by call count, until session 48) or a numpy array."""
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[0].item()) if value.numel() else None
    if isinstance(value, np.ndarray):
        return float(value.flat[0]) if value.size and np.issubdtype(value.dtype, np.number) else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def get_tracker(denoiser: torch.nn.Module) -> StepTracker | None:
    """The tracker attached to ``denoiser``, or None."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is None:
        return None
    hook = registry.get_hook(TRACKER_HOOK_NAME)
    return hook if isinstance(hook, StepTracker) else None


def refuse_while_cached(denoiser: torch.nn.Module, action: str) -> None:
    """Raise if a feature cache is enabled on ``denoiser``: ``action`` must see every block computed
    (calibration under a cache observes only the steps that recompute each block)."""
    tracker = get_tracker(denoiser)
    if tracker is not None and CACHE_CLIENT in tracker.client_names:
        raise ValueError(f"{action} needs every block of the denoiser computed, but a feature cache is "
                         "enabled on it. Caching comes last (prune_, then quantize_, then enable_cache): "
                         f"call da.remove_cache(pipe), run {action}, then enable the cache again")
    problem = diffusers_cache_problem(denoiser)
    if problem is not None:
        raise ValueError(f"{action} needs every block of the denoiser computed, but {problem}, run {action}, then "
                         f"enable the cache again")


# diffusers' cache hooks (apply_first_block_cache, apply_faster_cache, apply_mag_cache,
# apply_pyramid_attention_broadcast, apply_sea_cache, apply_taylorseer_cache); named in diffusers.hooks' modules
DIFFUSERS_CACHE_HOOKS = frozenset({
    "fbc_leader_block_hook", "fbc_block_hook", "faster_cache_denoiser", "faster_cache_block",
    "mag_cache_leader_block_hook", "mag_cache_block_hook", "pyramid_attention_broadcast", "sea_cache_root",
    "sea_cache_leader_block", "sea_cache_block", "sea_cache_post_norm", "taylorseer_cache"})


def diffusers_cache_problem(denoiser: torch.nn.Module, owner: str = "") -> str | None:
    """What of diffusers' own caches sits on ``denoiser`` and how to remove it (a clause), or None: one enabled
    with ``denoiser.enable_cache(...)`` (``is_cache_enabled``), or hooks its ``apply_*`` functions registered,
    which set no flag (until session 44 calibration ran through them and our cache stacked on them). ``owner``:
    how the caller names the denoiser (``pipe.transformer``)."""
    name = type(denoiser).__name__
    if getattr(denoiser, "is_cache_enabled", False):
        return (f"diffusers' own cache ({type(denoiser._cache_config).__name__}) is enabled on this {name}: call "
                f"{owner + '.' if owner else 'its '}disable_cache()")
    for module_name, module in denoiser.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        found = sorted(DIFFUSERS_CACHE_HOOKS & set(getattr(registry, "hooks", {})))
        if found:
            return (f"diffusers' cache hook {found[0]!r} (from diffusers' apply_* cache functions) is on "
                    f"{module_name or name!r} of this {name}: remove it (diffusers.hooks.HookRegistry."
                    f"check_if_exists_or_initialize(denoiser).remove_hook({found[0]!r}, recurse=True), for each of "
                    f"its hooks)")
    return None


def check_no_cpu_offload(denoiser: torch.nn.Module, action: str) -> None:
    """Refuse ``action`` on a denoiser under accelerate's CPU offload (``enable_model_cpu_offload``,
    ``enable_sequential_cpu_offload``): diffusers re-applies it at the end of every call, restoring the forward it
    saved, so hooks added after it stopped running from the second call on (a cache then gave uncached images,
    calibration saw only the first prompt), removing ours deleted its wrapper, and copies of the denoiser copied
    the models its hook chain points at (until session 41)."""
    if getattr(denoiser, "_hf_hook", None) is not None:
        raise ValueError(f"{action}: the {type(denoiser).__name__} is under CPU offload (enable_model_cpu_offload / "
                         f"enable_sequential_cpu_offload), which re-installs its own forward after every call and "
                         f"drops hooks added after it. Call pipe.remove_all_hooks() first and enable the offload "
                         f"again afterwards")


def attach_tracker(denoiser: torch.nn.Module, pipeline: Any | None = None) -> StepTracker:
    """Attach (or return the existing) tracker; ``pipeline`` enables automatic per-call reset."""
    tracker = get_tracker(denoiser)
    if tracker is not None:
        if pipeline is not None and tracker.pipeline is None:
            tracker._pipeline_ref = weakref.ref(pipeline)
        return tracker
    check_no_cpu_offload(denoiser, "calibrate / step-dependent techniques")
    tracker = StepTracker(pipeline)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(tracker, TRACKER_HOOK_NAME)
    hook_copy.install(denoiser)
    return tracker


def remove_hook_keeping_later(registry: Any, name: str) -> None:
    """``registry.remove_hook(name, recurse=False)`` that keeps a hook registered after ``name`` running: diffusers
    re-points the next hook's ``forward`` at the removed one's inner forward, which for a hook with its own
    ``new_forward`` (diffusers' FirstBlockCache, MagCache ... added after our cache) replaced that hook's entry
    point, so it stopped caching, silently (until session 50). The inner forward belongs beneath it instead."""
    if name not in registry.hooks:
        return
    hook, index = registry.hooks[name], registry._hook_order.index(name)
    following = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    entry = following.forward if following is not None and following.original_forward is not None else None
    registry.remove_hook(name, recurse=False)
    if entry is not None:
        following.original_forward, following.forward = following.forward, entry
    hook.fn_ref = None  # it held the hook's own bound methods and the module's forward: a cycle that kept a deleted
    # pipeline's denoiser alive until the cycle collector ran (session 50)


def detach_tracker_if_unused(denoiser: torch.nn.Module) -> bool:
    """Remove the tracker when no client uses it any more; returns True if it was removed."""
    tracker = get_tracker(denoiser)
    if tracker is None or tracker.client_names:
        return False
    registry = denoiser._diffusers_hook
    remove_hook_keeping_later(registry, TRACKER_HOOK_NAME)
    hook_copy.uninstall(denoiser)
    if not registry.hooks:  # leave the module exactly as it was: class forward, no registry
        denoiser.__dict__.pop("forward", None)
        del denoiser._diffusers_hook
    return True


class use_tracker:
    """Context manager: register ``client`` on the denoiser's tracker and always clean up.

    >>> with use_tracker(unet, "calib", pipeline=pipe) as tracker:
    ...     pipe("a prompt")   # hooks read tracker.step_index / tracker.timestep
    """

    def __init__(self, denoiser: torch.nn.Module, client: str, pipeline: Any | None = None,
                 on_reset: Callable[[], None] | None = None) -> None:
        self.denoiser, self.client, self.pipeline, self.on_reset = denoiser, client, pipeline, on_reset
        self.tracker: StepTracker | None = None

    def __enter__(self) -> StepTracker:
        self.tracker = attach_tracker(self.denoiser, self.pipeline)
        self.tracker.register_client(self.client, self.on_reset)
        return self.tracker

    def __exit__(self, *exc_info: object) -> None:
        if self.tracker is not None:
            self.tracker.unregister_client(self.client)
        detach_tracker_if_unused(self.denoiser)


class ModuleHooks:
    """A set of plain torch forward (pre-)hooks that is always removed as a whole.

    Used by collectors and simulated quantizers; ``remove()`` is idempotent and also runs on
    ``__exit__`` so hooks never outlive an exception.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre(self, module: torch.nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module: torch.nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "ModuleHooks":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
