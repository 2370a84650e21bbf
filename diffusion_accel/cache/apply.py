"""Public entry points: ``enable_cache``, ``remove_cache``, ``summary``.

A registry maps each config type to its handler (a new method is one dataclass and one decorated
function). A handler validates against the model and builds everything *before* the first hook is
attached, so a bad config leaves the pipeline unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Callable

from diffusers.hooks import HookRegistry

from ..arch import find_denoiser, get_adapter
from ..arch.registry import check_no_grouped_offload
from ..artifact import base_fingerprint, mark_applied, marks_restored_on_error, unmark_applied
from ..hooks import (CACHE_CLIENT, check_no_cpu_offload, detach_tracker_if_unused, diffusers_cache_problem,
                     get_tracker)
from .configs import (BlockCacheConfig, CalibratedCacheConfig, DeepCacheConfig, DeltaCacheConfig,
                      EncoderPropagationConfig, FirstBlockCacheConfig, RouterCacheConfig, TeaCacheConfig,
                      config_to_dict)
from .delta import install_delta_cache
from .encoder import encoder_point, install_encoder_cache, key_steps
from .partial import (check_levels, deeper_points, few_values, is_unet, nearest_noise_level,
                      partial_steps_for_call, scaled_timesteps)
from .policies import DeltaPolicy, FirstBlockPolicy, SchedulePolicy, TeaCachePolicy, plan_from_other_start
from .router import RouterPolicy, check_router, install_router_cache
from .schedules import nonuniform_full_steps, resample_full_steps, uniform_full_steps
from .session import (CacheSession, drop_empty_registry, end_session, finish_session, get_session,
                      refuse_map_reading_pipeline, start_session)
from .stack import check_stack, install_stack_cache, output_layer, partial_levels
from .unet_branch import branch_point, install_branch_cache

TECHNIQUE = "cache"
Installer = Callable[[Any, Any], None]
_HANDLERS: dict[type, Callable[[Any, Any], tuple[str, Any, Installer]]] = {}


def register_cache_method(config_type: type) -> Callable:
    """Decorator: ``handler(pipe, config) -> (method name, policy, install(session, pipe))``."""
    def decorate(handler: Callable) -> Callable:
        _HANDLERS[config_type] = handler
        return handler
    return decorate


def _unet_installer(pipe: Any, branch: int) -> Installer:
    point = branch_point(pipe, branch)
    return lambda session, _pipe: install_branch_cache(session, point)


def _stack_installer(pipe: Any, uses_head: bool, config: Any = None) -> Installer:
    check_stack(pipe, uses_head)  # raises for UNets, unknown block classes, too few blocks
    output_layer(pipe, config)  # raises when forecast_target="output" has no final projection to hook
    return install_stack_cache


@register_cache_method(DeepCacheConfig)
def _deepcache(pipe: Any, config: DeepCacheConfig) -> tuple[str, Any, Installer]:
    if config.schedule == "uniform":
        full = lambda n: uniform_full_steps(n, config.interval)  # noqa: E731
    else:
        full = lambda n: nonuniform_full_steps(n, config.interval, config.center, config.power)  # noqa: E731
    policy = SchedulePolicy(full, config.interval, from_first_step=True)
    return "deepcache", policy, _unet_installer(pipe, config.branch)


@register_cache_method(BlockCacheConfig)
def _block_cache(pipe: Any, config: BlockCacheConfig) -> tuple[str, Any, Installer]:
    policy = SchedulePolicy(lambda n: uniform_full_steps(n, config.interval), config.interval, from_first_step=True)
    return "block_cache", policy, _stack_installer(pipe, policy.uses_head, config)


@register_cache_method(FirstBlockCacheConfig)
def _first_block(pipe: Any, config: FirstBlockCacheConfig) -> tuple[str, Any, Installer]:
    policy = FirstBlockPolicy(config.threshold)
    return "first_block_cache", policy, _stack_installer(pipe, policy.uses_head)


@register_cache_method(TeaCacheConfig)
def _teacache(pipe: Any, config: TeaCacheConfig) -> tuple[str, Any, Installer]:
    policy = TeaCachePolicy(config.threshold, config.coefficients)
    return "teacache", policy, _stack_installer(pipe, policy.uses_head)


@register_cache_method(DeltaCacheConfig)
def _delta_cache(pipe: Any, config: DeltaCacheConfig) -> tuple[str, Any, Installer]:
    check_stack(pipe, uses_head=False)  # raises for UNets and unknown blocks before any hook exists
    install = lambda session, _pipe: install_delta_cache(session, _pipe, config.cached_fraction)  # noqa: E731
    return "delta_cache", DeltaPolicy(config.interval, config.boundary), install


@register_cache_method(RouterCacheConfig)
def _router(pipe: Any, config: RouterCacheConfig) -> tuple[str, Any, Installer]:
    check_router(pipe, config)  # raises for UNets, unknown blocks and another stack length before any hook exists
    return "router", RouterPolicy(config), install_router_cache


@register_cache_method(EncoderPropagationConfig)
def _encoder_propagation(pipe: Any, config: EncoderPropagationConfig) -> tuple[str, Any, Installer]:
    point = encoder_point(pipe)  # raises for transformers before any hook exists
    uniform = config.key_steps is None  # an interval counts from a call's first step (img2img), as DeepCache's;
    # a key_steps list names positions of the schedule it was written for
    policy = SchedulePolicy(lambda n: key_steps(config, n), config.interval, from_first_step=uniform,
                            assumed_steps=None if uniform else config.num_inference_steps)
    return "encoder_propagation", policy, lambda session, _pipe: install_encoder_cache(session, point, config)


@register_cache_method(CalibratedCacheConfig)
def _calibrated(pipe: Any, config: CalibratedCacheConfig) -> tuple[str, Any, Installer]:
    policy = CalibratedPolicy(config)
    unet = is_unet(pipe)
    if not unet and config.branch != 0:  # it was accepted and ignored
        raise ValueError(f"branch={config.branch} picks a UNet's DeepCache skip branch; a transformer's calibrated "
                         f"schedule caches its block stack: leave branch=0")
    if unet and config.forecast_target != "residual":
        raise ValueError(f"forecast_target={config.forecast_target!r} is for transformer denoisers; a UNet's "
                         f"calibrated schedule reuses its DeepCache branch (use forecast_target='residual')")
    installer = _unet_installer(pipe, config.branch) if unet else _stack_installer(pipe, False, config)
    if config.partial_steps:
        check_levels(pipe, config)
        if unet:
            point, deeper = branch_point(pipe, config.branch), deeper_points(pipe, partial_levels(config))
            installer = lambda session, _pipe: install_branch_cache(session, point, deeper)  # noqa: E731
    return "calibrated", policy, installer


def calibrated_steps(config: CalibratedCacheConfig, num_steps: int) -> list[int]:
    """The calibrated full steps for a ``num_steps`` trajectory (resampled, or ValueError)."""
    if num_steps == config.num_inference_steps:
        return list(config.full_steps)
    _check_resampling(config, num_steps)
    return resample_full_steps(config.full_steps, config.num_inference_steps, num_steps, within_budget=True)


def _check_resampling(config: CalibratedCacheConfig, num_steps: int) -> None:
    """ValueError unless ``config`` may be resampled to a call of ``num_steps`` (another step count)."""
    if not config.resample:
        raise ValueError(f"this cache schedule was calibrated for {config.num_inference_steps} denoiser steps per "
                         f"call; this call runs {num_steps} (another num_inference_steps, or a scheduler that "
                         f"calls the denoiser 2N - 1 times for N steps, as Heun / KDPM2 do, where the calibration's "
                         f"did not): recalibrate with this scheduler and step count, or set resample=True")


def running_view(config: CalibratedCacheConfig) -> CalibratedCacheConfig:
    """``config`` counted from the first step its calibration's calls ran (``first_step``): a schedule of the steps
    that run (its step 0 the first of them)."""
    start = config.first_step
    return replace(config, full_steps=(0, *(step - start for step in config.full_steps if step > start)),
                   num_inference_steps=config.num_inference_steps - start, timesteps=None, first_step=0,
                   partial_steps=tuple((step - start, level) for step, level in config.partial_steps if step > start))


def running_plan(config: CalibratedCacheConfig, num_steps: int,
                 first_step: int) -> tuple[frozenset[int], dict[int, int]]:
    """(full steps, {partial step: level}) of a call of ``num_steps`` that runs from ``first_step``, for a schedule
    calibrated on calls starting mid-schedule (``config.first_step`` > 0: img2img) and another step count or first
    step: resampled over the steps that run. Over the whole trajectory most full steps fell on steps the call skips
    (tiny SD img2img at strength 0.3, searched for 40% of 10 steps: 2 of the 15 steps a 50-step call runs computed,
    until session 45)."""
    if num_steps != config.num_inference_steps:
        _check_resampling(config, num_steps)
    elif not config.resample:
        raise ValueError(f"this cache schedule was calibrated on calls starting at step {config.first_step} of "
                         f"{num_steps} (img2img at that strength); this call starts at step {first_step}, on steps the "
                         f"search did not plan: recalibrate at this strength, or set resample=True to resample the "
                         f"schedule over the steps this call runs")
    view, running = running_view(config), num_steps - first_step
    full = calibrated_steps(view, running)
    partial = partial_steps_for_call(view, full, running)
    return frozenset(first_step + step for step in full), {first_step + step: level for step, level in partial.items()}


class CalibratedPolicy(SchedulePolicy):
    """A calibrated schedule's policy: ``calibrated_steps`` for the call's step count and, when the config
    records the timesteps it was searched on and the call's schedule has as many but others, the full
    steps at the nearest noise levels (``steps_at_noise_levels``); partial steps follow them
    (``partial.partial_steps_for_call``)."""

    def __init__(self, config: CalibratedCacheConfig) -> None:
        super().__init__(lambda n: calibrated_steps(config, n), config.num_inference_steps,
                         assumed_steps=config.num_inference_steps)
        self.config = config
        self.tracker: Any = None
        self._last: tuple[Any, frozenset[int]] | None = None  # (the call's timesteps tensor, its full steps)
        self._partial: tuple[Any, dict[int, int]] | None = None  # ((steps, timesteps tensor), {step: level})
        self._running: dict[tuple[int, int], tuple[frozenset[int], dict[int, int]]] = {}  # (steps, first): plan

    def bind(self, tracker: Any) -> None:
        """The session's step tracker, which knows the timesteps of the call in progress."""
        self.tracker = tracker

    def _timesteps_to_map(self, num_steps: int | None) -> Any:
        """The call's timesteps tensor when the schedule follows noise levels for it, else None."""
        timesteps = self.tracker.placing_timesteps() if self.tracker is not None else None
        if timesteps is None or self.config.timesteps is None or num_steps != self.config.num_inference_steps:
            return None
        return timesteps

    def should_compute(self, step: int, num_steps: int | None, state: dict, signal: Any = None) -> bool:
        running = self._running_plan(step, num_steps, state)
        if running is not None:
            return step in running[0]
        timesteps = self._timesteps_to_map(num_steps)
        if timesteps is None:
            return super().should_compute(step, num_steps, state, signal)
        last = self._last
        if last is None or last[0] is not timesteps:
            last = self._last = (timesteps, frozenset(steps_at_noise_levels(self.config, timesteps.tolist())))
        return step in last[1]

    def partial_level(self, step: int, num_steps: int | None, state: dict | None = None) -> int | None:
        """The level of ``step`` when it is a partial step of this call's schedule, else None (``state``: the
        context's, which knows where the call started)."""
        if not self.config.partial_steps:
            return None
        running = None if state is None else self._running_plan(step, num_steps, state)
        if running is not None:
            return running[1].get(step)
        steps = self.config.num_inference_steps if num_steps is None else num_steps
        timesteps = self._timesteps_to_map(steps)
        cached = self._partial  # read once: another thread's call may replace it meanwhile
        if cached is None or cached[0][0] != steps or cached[0][1] is not timesteps:
            cached = self._partial = ((steps, timesteps), self._partial_plan(steps, timesteps))
        return cached[1].get(step)

    def _running_plan(self, step: int, num_steps: int | None,
                      state: dict) -> tuple[frozenset[int], dict[int, int]] | None:
        """``running_plan`` for this call when the schedule was calibrated from mid-schedule and the call runs
        another step count or starts at another step (its first step kept per context and call), else None. At the
        calibrated count a call starting earlier (text-to-image, a higher strength) ran the searched positions as
        they stood until session 51: steps before the searched ones reused the first step's features."""
        return plan_from_other_start(self.config, step, num_steps, state, self._running,
                                     lambda steps, first: running_plan(self.config, steps, first))

    def _partial_plan(self, num_steps: int, timesteps: Any) -> dict[int, int]:
        if timesteps is None:
            return partial_steps_for_call(self.config, calibrated_steps(self.config, num_steps), num_steps)
        values = timesteps.tolist()
        return partial_steps_for_call(self.config, steps_at_noise_levels(self.config, values), num_steps, values)


def steps_at_noise_levels(config: CalibratedCacheConfig, timesteps: list[float]) -> list[int]:
    """``config.full_steps`` for a call whose schedule is ``timesteps`` (as many steps as the config's): the
    positions nearest to the calibrated full steps' noise levels (step 0 kept), which are the same positions
    unless the levels moved (Karras sigmas, resolution-dependent shifting, another scheduler). Levels are
    compared within each schedule's own range, ``(t - min) / (max - min)``: by absolute timestep a schedule
    that only starts elsewhere (DDIM "trailing" / "linspace" spacing, DPM++: 999 vs 901) moved every full
    step one position later, 2-5 dB below reusing the positions (fashion-sd). Where the positions differ,
    ValueError when ``config.resample`` is False. A schedule searched from a mid-schedule start (``first_step``:
    img2img, reached here only by calls starting there) keeps that step and places the others on the steps that run:
    a full step moved onto a step the call skips was lost (Karras sigmas at strength 0.4: 2 of 3, until session 52)."""
    calibrated, current = scaled_timesteps(config.timesteps), scaled_timesteps(timesteps)
    start = config.first_step
    chosen = {0, start}
    for step in config.full_steps:
        if step not in (0, start):
            free = [index for index in range(start, len(current)) if index not in chosen]
            chosen.add(nearest_noise_level(free, current, calibrated[step], step))
    if sorted(chosen) != list(config.full_steps) and not config.resample:
        raise ValueError(f"this cache schedule was calibrated on timesteps {few_values(config.timesteps)}; this "
                         f"call's {len(timesteps)} steps run at {few_values(timesteps)} (another scheduler, sigmas or "
                         f"spacing, or a resolution that shifts the schedule), where its full steps sit at other "
                         f"positions: recalibrate with this schedule, or set resample=True to take the full steps at "
                         f"the nearest noise levels")
    return sorted(chosen)


# methods that may skip a block of a list while running a later one (a span, a branch, per-block decisions): under
# group offloading of several blocks per group that later block ran on offloaded weights
SPLITS_BLOCK_LISTS = (DeepCacheConfig, DeltaCacheConfig, CalibratedCacheConfig, RouterCacheConfig)


def _handler_for(config: Any) -> Callable:
    handler = _HANDLERS.get(type(config))
    if handler is None:
        accepted = ", ".join(sorted(cls.__name__ for cls in _HANDLERS))
        raise TypeError(f"enable_cache needs a cache config ({accepted}); got {type(config).__name__}")
    return handler


def check_cache_fits(pipe: Any, config: Any) -> None:
    """ValueError when ``config``'s method cannot cache ``pipe``'s denoiser (DeepCache on a transformer, a block
    cache on a UNet, a branch out of range): ``enable_cache``'s checks, installing nothing."""
    _handler_for(config)(pipe, config)


def enable_cache(pipe: Any, config: Any) -> Any:
    """Cache denoiser features across steps as ``config`` says; returns the same pipeline.

    A cache already enabled is replaced. Errors (bad config, unsupported model) leave ``pipe``
    unchanged.
    """
    handler = _handler_for(config)
    refuse_map_reading_pipeline(pipe, "enable_cache")
    component, denoiser = find_denoiser(pipe)
    _refuse_diffusers_cache(component, denoiser)
    check_no_cpu_offload(denoiser, "enable_cache")  # before the fingerprint (meta weights under sequential offload)
    if isinstance(config, SPLITS_BLOCK_LISTS):  # the others skip a block list whole or run its first block
        check_no_grouped_offload(denoiser, f"enable_cache({type(config).__name__})")
    method, policy, install = handler(pipe, config)
    previous = get_session(denoiser)
    had_registry = "_diffusers_hook" in vars(denoiser)
    try:
        with marks_restored_on_error(pipe):
            base_fingerprint(pipe)
            if previous is not None:
                end_session(previous)
            session = start_session(pipe, denoiser, config, method, policy)
            if hasattr(policy, "bind"):
                policy.bind(session.tracker)
            install(session, pipe)
            finish_session(session)
            mark_applied(pipe, TECHNIQUE)
    except BaseException:  # KeyboardInterrupt included: the hooks of a half-installed cache went on computing
        _roll_back(pipe, denoiser, previous, had_registry)
        raise
    return pipe


def _roll_back(pipe: Any, denoiser: Any, previous: CacheSession | None, had_registry: bool) -> None:
    """Remove what a failed ``enable_cache`` installed (its session, or a tracker attached before the session
    existed) and re-enable the cache it was replacing from its config (ending it left none, or half of it,
    while the marks still said 'cache'); the denoiser's (empty) diffusers hook registry exists again if it
    did before."""
    session = get_session(denoiser)
    if session is not None:  # the new one, or the replaced one, whole or half ended
        end_session(session)
    elif get_tracker(denoiser) is not None:  # interrupted inside start_session
        get_tracker(denoiser).unregister_client(CACHE_CLIENT)
        if detach_tracker_if_unused(denoiser):
            drop_empty_registry(denoiser)
    try:
        if previous is not None:
            _reenable(pipe, previous.config)
    finally:
        if had_registry:
            HookRegistry.check_if_exists_or_initialize(denoiser)
        elif get_session(denoiser) is None:  # interrupted inside attach_tracker, before its hook was registered:
            drop_empty_registry(denoiser)  # no tracker to detach, the registry alone was left


def _reenable(pipe: Any, config: Any) -> None:
    """Enable the replaced cache's ``config`` again; if that fails too (a second Ctrl-C), no cache and no
    'cache' mark is the consistent state left."""
    try:
        enable_cache(pipe, config)
    except BaseException as error:
        unmark_applied(pipe, TECHNIQUE)
        if not isinstance(error, Exception):
            raise


def _refuse_diffusers_cache(component: str, denoiser: Any) -> None:
    """Two caches on one denoiser would skip on each other's stale features: like diffusers, which
    refuses a second cache, ask for its own (``denoiser.enable_cache(...)``) to be disabled first."""
    problem = diffusers_cache_problem(denoiser, f"pipe.{component}" if component else "denoiser")
    if problem is not None:
        raise ValueError(f"{problem} before enable_cache")


def remove_cache(pipe: Any) -> Any:
    """Remove the cache and every hook it added; returns the same pipeline (no-op if none)."""
    _, denoiser = find_denoiser(pipe)
    session = get_session(denoiser)
    if session is not None:
        check_no_cpu_offload(denoiser, "remove_cache")  # offload enabled after the cache wraps our hooks
        end_session(session)
    unmark_applied(pipe, TECHNIQUE)
    return pipe


def default_cache_config(pipe: Any, interval: int = 3) -> DeepCacheConfig | BlockCacheConfig:
    """The project's default cache for ``pipe``'s denoiser: DeepCache at the shallowest skip for UNets,
    static block caching for transformers, a full step every ``interval`` and a linear forecast on
    reuse steps (``forecast=1``; for transformers of the final projection's output, closer to the
    uncached result than the stack residual on fashion-flux: benchmarks/results/cache_flux_heldout.md)."""
    if get_adapter(pipe).component == "unet":
        return DeepCacheConfig(interval=interval, branch=0, forecast=1)
    return BlockCacheConfig(interval=interval, forecast=1, forecast_target="output")


def cache_config(pipe: Any) -> Any | None:
    """The config of the enabled cache, or None."""
    session = get_session(find_denoiser(pipe)[1])
    return None if session is None else session.config


def summary(pipe: Any, as_text: bool = False) -> dict[str, Any] | str:
    """What the last pipeline call computed vs reused: totals and one record per denoiser call (a dict;
    ``as_text=True``: a readable summary). Blocks the model itself skips are counted as computed where a call
    computes: SD3's skip-layer guidance pass (``skip_guidance_layers``) runs a few blocks fewer than recorded."""
    session = get_session(find_denoiser(pipe)[1])
    if session is None:
        return "no cache enabled" if as_text else {"enabled": False}
    records = session.records
    computed = Counter(r.computed for r in records)
    info = {
        "enabled": True, "method": session.method, "config": config_to_dict(session.config),
        "cached_blocks": len(session.cached_blocks), "total_blocks": session.total_blocks,
        "denoiser_calls": len(records), "full_calls": computed[True], "reused_calls": computed[False],
        "block_compute_fraction": _block_fraction(records),
        "steps": [vars(r).copy() for r in records],
    }
    return _summary_text(info) if as_text else info


def _block_fraction(records: list) -> float | None:
    total = sum(r.computed_blocks + r.reused_blocks for r in records)
    return None if total == 0 else sum(r.computed_blocks for r in records) / total


def _summary_text(info: dict[str, Any]) -> str:
    lines = [f"{info['method']}: {info['full_calls']} full / {info['reused_calls']} reused of "
             f"{info['denoiser_calls']} denoiser calls; {info['cached_blocks']} of "
             f"{info['total_blocks']} blocks cached"]
    for record in info["steps"]:
        mark = "compute" if record["computed"] else "reuse  " if record.get("partial") is None else (
            f"partial (level {record['partial']})")
        lines.append(f"  step {record['step']:3d} [{record['context']}] {mark} "
                     f"blocks computed {record['computed_blocks']}, reused {record['reused_blocks']}")
    return "\n".join(lines)
