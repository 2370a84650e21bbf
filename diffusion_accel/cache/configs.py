"""Cache configurations: one frozen dataclass per method, validated on construction.

Model-dependent checks (a UNet branch id in range, a denoiser family the method supports) happen in
``enable_cache`` before anything is attached, so a bad config never leaves a pipeline half-changed.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..scalars import is_finite_number, plain_scalars

SCHEDULES = ("uniform", "non-uniform")
FORECAST_ORDERS = (0, 1)
FORECAST_TARGETS = ("residual", "output")


def check_int(name: str, value: Any, minimum: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_forecast(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in FORECAST_ORDERS:
        raise ValueError(f"forecast must be one of {FORECAST_ORDERS} (0 = reuse, 1 = linear "
                         f"extrapolation), got {value!r}")


def _check_forecast_target(value: Any) -> None:
    if value not in FORECAST_TARGETS:
        raise ValueError(f"forecast_target must be one of {FORECAST_TARGETS} ('residual': the block stack's "
                         f"residual, 'output': the denoiser's final projection), got {value!r}")


def _number_sequence(value: Any) -> tuple[float, ...]:
    """``value`` as a tuple of real numbers (bools and strings are not), or () if it is no such sequence."""
    if isinstance(value, (str, bytes)):
        return ()
    try:
        items = tuple(value)
    except TypeError:
        return ()
    if not all(isinstance(item, numbers.Real) and not isinstance(item, bool) for item in items):
        return ()
    try:
        return tuple(float(item) for item in items)
    except OverflowError:  # an int beyond float range (10**400): no such sequence either
        return ()


def _check_float(name: str, value: Any, minimum: float, inclusive: bool = True) -> None:
    ok = is_finite_number(value)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {bound} {minimum}, got {value!r}")


class _ConfigMethods:
    """``to_dict`` / ``from_dict`` / ``with_`` on every cache config, as on ``PTQConfig`` and ``PruneConfig``
    (the module functions ``config_to_dict`` / ``config_from_dict`` behind them read any cache config)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"type": class name, "params": fields}`` (what an artifact's manifest holds)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of ``to_dict``; a ValueError when ``data`` holds another cache config type."""
        config = config_from_dict(data)
        if not isinstance(config, cls):
            raise ValueError(f"{cls.__name__}.from_dict got a {type(config).__name__}; use config_from_dict for any type")
        return config

    def with_(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` applied (unknown fields named)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} fields {unknown}; accepted: {sorted(names)}")
        return replace(self, **changes)


@dataclass(frozen=True)
class DeepCacheConfig(_ConfigMethods):
    """DeepCache for UNets: every ``interval`` steps a full UNet call, otherwise only the shallow
    path down to skip ``branch`` (0 = ``conv_in``) and the cached deep feature.

    ``schedule="non-uniform"`` places the same number of full steps (ceil(steps / interval))
    densely around ``center`` (a fraction of the trajectory) and sparsely far from it, with
    offsets growing as ``|u| ** power``: DeepCache's own schedule (``schedules.nonuniform_full_steps``).

    ``forecast=1`` fills a reuse step with the linear extrapolation (in the step index) of the deep
    feature from the last two full steps instead of the last one (TaylorSeer's first-order forecast
    applied to DeepCache's cached branch); 0 is the DeepCache paper's plain reuse.
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: float = 0.3
    power: float = 1.4
    forecast: int = 0

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_int("interval", self.interval, 1)
        _check_forecast(self.forecast)
        check_int("branch", self.branch, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check_fraction("center", self.center)
        _check_float("power", self.power, 1.0)


@dataclass(frozen=True)
class BlockCacheConfig(_ConfigMethods):
    """Static FORA-style block caching for transformers: all blocks run every ``interval`` steps;
    in between, the cached residual of the block stack (output - input) is added to the input.

    ``forecast=1`` extrapolates that residual linearly in the step index from the last two full
    steps (a first-order Taylor forecast, as TaylorSeer does for features) instead of reusing it.
    ``forecast_target="output"`` reuses / forecasts the output of the denoiser's final projection
    (the adapter's ``output_layer``, e.g. Flux's ``proj_out``; TaylorSeer's lite mode) instead of
    the residual, so a reuse step also skips the final projection.
    """

    interval: int = 2
    forecast: int = 0
    forecast_target: str = "residual"

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_int("interval", self.interval, 1)
        _check_forecast(self.forecast)
        _check_forecast_target(self.forecast_target)


@dataclass(frozen=True)
class FirstBlockCacheConfig(_ConfigMethods):
    """First-Block-Cache: block 0 always runs; when its residual's relative L1 change since the
    last fully computed step is below ``threshold``, the remaining blocks reuse their residual."""

    threshold: float = 0.08

    def __post_init__(self) -> None:
        plain_scalars(self)
        _check_float("threshold", self.threshold, 0.0)


@dataclass(frozen=True)
class TeaCacheConfig(_ConfigMethods):
    """TeaCache-style: accumulate ``poly(rel_l1(modulated input of block 0))`` over steps and reuse
    the cached residual of the following blocks while the sum stays below ``threshold``.

    ``coefficients`` (highest power first) come from :func:`fit_teacache_coefficients` for the
    model at hand; None uses the raw relative L1 change (the identity polynomial).
    """

    threshold: float = 0.1
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        plain_scalars(self)
        _check_float("threshold", self.threshold, 0.0)
        if self.coefficients is not None:
            values = _number_sequence(self.coefficients)
            if not values or not all(is_finite_number(c) for c in values):
                raise ValueError(f"coefficients must be a non-empty sequence of finite numbers or None, "
                                 f"got {self.coefficients!r}")
            object.__setattr__(self, "coefficients", tuple(float(c) for c in values))
            _check_accumulates(self.coefficients)


def _check_accumulates(coefficients: tuple[float, ...]) -> None:
    """A rescaling polynomial that is <= 0 for every relative change in (0, 1] accumulates nothing: every step
    after the first was reused whatever the threshold ((-1.0,) and (0.0, 0.0) were accepted)."""
    changes = [index / 256 for index in range(1, 257)]
    if max(sum(c * x ** power for power, c in enumerate(reversed(coefficients))) for x in changes) <= 0:
        raise ValueError(f"coefficients {coefficients} give a polynomial <= 0 for every relative change in (0, 1]: "
                         f"TeaCache would accumulate nothing and reuse every step after the first; use "
                         f"fit_teacache_coefficients, or None for the raw change")


def _check_fraction(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


@dataclass(frozen=True)
class DeltaCacheConfig(_ConfigMethods):
    """Δ-DiT for transformers: every ``interval`` steps all blocks run; in between a span of
    ``cached_fraction`` of the blocks is bypassed and its cached *delta* (span output - span input,
    per stream, from the last full step) is added to the span's fresh input.

    Steps before ``boundary`` (a fraction of the trajectory: the outline stage) bypass the *rear*
    blocks, later steps (the detail stage) the *front* blocks, so the blocks that shape the current
    stage keep running. ``cached_fraction=1`` is FORA-style whole-stack caching.
    """

    interval: int = 2
    cached_fraction: float = 0.5
    boundary: float = 0.5

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_int("interval", self.interval, 1)
        _check_fraction("boundary", self.boundary)
        ok = isinstance(self.cached_fraction, (int, float)) and not isinstance(self.cached_fraction, bool)
        if not (ok and 0.0 < self.cached_fraction <= 1.0):
            raise ValueError(f"cached_fraction must be a fraction in (0, 1], got {self.cached_fraction!r}")


# Faster Diffusion's non-uniform key steps for 50 DDIM steps (the official code's "50ls" schedule).
FASTER_DIFFUSION_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


@dataclass(frozen=True)
class EncoderPropagationConfig(_ConfigMethods):
    """Faster Diffusion encoder propagation for UNets: the whole UNet runs on *key* steps; on the
    others the encoder (input conv, down blocks, mid block) is skipped and its outputs from the last
    key step (every skip tensor and the mid output) feed the decoder, which runs with the current
    timestep embedding.

    Key steps are every ``interval``-th step, or ``key_steps`` written for a
    ``num_inference_steps`` trajectory (resampled proportionally for other lengths), e.g. the
    paper's ``FASTER_DIFFUSION_KEY_STEPS`` for 50 steps. ``noise_injection`` > 0 adds that fraction
    of the initial noise (the denoiser's input at step 0) to the prediction on non-key steps from
    ``injection_start`` (a fraction of the trajectory) on: the paper's prior-noise injection, moved
    from the sampling loop's latents to the denoiser output (see docs/architecture.md). Calls that
    start mid-schedule (img2img and inpainting at strength < 1; LCM / TCD img2img, whose scheduler shortens
    the schedule) inject nothing; an inpainting UNet's step-0 input gives its noise latents (the leading
    channels).
    """

    interval: int = 2
    key_steps: tuple[int, ...] | None = None
    num_inference_steps: int | None = None
    noise_injection: float = 0.0
    injection_start: float = 0.5

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_int("interval", self.interval, 1)
        _check_float("noise_injection", self.noise_injection, 0.0)
        _check_fraction("injection_start", self.injection_start)
        if self.key_steps is not None:
            if self.num_inference_steps is None:
                raise ValueError("key_steps need num_inference_steps (the trajectory length they were written for)")
            object.__setattr__(self, "key_steps", _checked_steps("key_steps", self.key_steps,
                                                                 self.num_inference_steps))
        elif self.num_inference_steps is not None:
            check_int("num_inference_steps", self.num_inference_steps, 1)
            raise ValueError(f"num_inference_steps={self.num_inference_steps} is the trajectory length key_steps "
                             f"were written for; without key_steps it has no effect (interval={self.interval} "
                             f"sets the key steps of every length)")


def _checked_timesteps(values: Any, num_steps: int) -> tuple[float, ...]:
    """``values`` as a tuple of ``num_steps`` finite floats; ValueError otherwise."""
    try:
        timesteps = tuple(float(value) for value in values)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"timesteps must be a sequence of numbers, got {values!r:.80}") from None
    if len(timesteps) != num_steps or not all(is_finite_number(value) for value in timesteps):
        raise ValueError(f"timesteps must hold {num_steps} finite values (one per step), got {values!r:.80}")
    return timesteps


def _checked_steps(name: str, values: Any, num_steps: Any) -> tuple[int, ...]:
    """Sorted, de-duplicated step indices (ints: numpy ints too, not bools or floats); ValueError naming
    ``name`` unless they include 0 and lie in [0, num_steps)."""
    check_int("num_inference_steps", num_steps, 1)
    try:
        items = tuple(values)
        if any(isinstance(value, bool) for value in items):
            raise TypeError("bool")
        steps = tuple(sorted({operator.index(value) for value in items}))
    except TypeError:
        raise ValueError(f"{name} must be a sequence of int step indices, got {values!r}") from None
    if not steps or steps[0] != 0 or steps[-1] >= num_steps:
        raise ValueError(f"{name} must contain step 0 and lie in [0, {num_steps}), got {values!r}")
    return steps


@dataclass(frozen=True)
class CalibratedCacheConfig(_ConfigMethods):
    """A calibrated schedule: ``full_steps`` of a ``num_inference_steps`` trajectory run the whole
    denoiser, the others reuse (UNets: DeepCache at ``branch``; transformers: the stack residual).

    Built by :func:`calibrate_schedule` for a compute ``budget`` (fraction of full calls; a partial step
    counts as its share of the cached blocks' FLOPs). Steps count
    denoiser calls per item: ``num_inference_steps`` is the pipeline's for first-order schedulers, 2N - 1
    for a Heun / KDPM2 call of N steps (``calib.denoiser_steps``). For another step count the schedule is
    resampled proportionally, or refused when ``resample`` is False.
    ``forecast=1`` extrapolates what reuse steps fill in (the transformer stack residual as in
    :class:`BlockCacheConfig`, the UNet deep feature as in :class:`DeepCacheConfig`);
    ``forecast_target="output"`` (transformers only) fills reuse steps from the final projection's
    output instead of the stack residual (see :class:`BlockCacheConfig`).
    ``partial_steps``: ``(step, level)`` pairs of reuse steps that recompute part of the cached blocks
    (``calibrate_schedule(..., search_blocks=True)`` chooses them): for transformers ``level`` is the
    number of leading stack blocks that run, the rest adding their cached delta (output minus that
    block's input at the last full step); for UNets it is a deeper DeepCache branch than ``branch``,
    whose deep path alone is reused. Resampled with the full steps.
    ``timesteps``: the scheduler timesteps the schedule was searched on (``calibrate_schedule`` records
    them; None in older artifacts). A call with as many steps but other timesteps (another scheduler,
    Karras sigmas, another spacing) gets the full steps at the nearest noise levels, or a ValueError when
    ``resample`` is False: its positions alone were reused silently (fashion-flux, default -> Karras
    sigmas: 27.05 dB, mapped 34.60 = recalibrated; ``benchmarks/cache_schedule_transfer.py``).
    ``first_step``: the first step the calibration's calls ran (an img2img call of strength s starts at
    N - int(N s); 0 for text-to-image): a call of another step count, or starting at another step, gets the schedule
    resampled over the steps it runs, from its own first, not over the whole trajectory (where most full steps fell
    on steps it skips), or a ValueError when ``resample`` is False.
    """

    full_steps: tuple[int, ...]
    num_inference_steps: int
    budget: float = 0.4
    branch: int = 0
    resample: bool = True
    forecast: int = 0
    forecast_target: str = "residual"
    timesteps: tuple[float, ...] | None = None
    partial_steps: tuple[tuple[int, int], ...] = ()
    first_step: int = 0

    def __post_init__(self) -> None:
        plain_scalars(self)
        _check_forecast(self.forecast)
        _check_forecast_target(self.forecast_target)
        check_int("num_inference_steps", self.num_inference_steps, 1)
        check_int("branch", self.branch, 0)
        check_int("first_step", self.first_step, 0)
        if self.first_step >= self.num_inference_steps:
            raise ValueError(f"first_step must be below num_inference_steps={self.num_inference_steps}, "
                             f"got {self.first_step}")
        _check_float("budget", self.budget, 0.0, inclusive=False)
        if self.budget > 1.0:
            raise ValueError(f"budget is a fraction of full denoiser calls in (0, 1], got {self.budget!r}")
        if not isinstance(self.resample, bool):
            raise ValueError(f"resample must be True or False, got {self.resample!r}")
        object.__setattr__(self, "full_steps", _checked_steps("full_steps", self.full_steps,
                                                              self.num_inference_steps))
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", _checked_timesteps(self.timesteps, self.num_inference_steps))
        object.__setattr__(self, "partial_steps", _checked_partial_steps(self.partial_steps, self.full_steps,
                                                                         self.num_inference_steps))


def _checked_partial_steps(values: Any, full_steps: tuple[int, ...], num_steps: int) -> tuple[tuple[int, int], ...]:
    """``(step, level)`` pairs sorted by step, as ints; ValueError unless each step is a reuse step of the
    schedule (not a full step, in [1, num_steps), once) and each level an int >= 1 (the model's range is
    checked by ``enable_cache``)."""
    try:
        pairs = [tuple(pair) for pair in values]
        if any(len(pair) != 2 or any(isinstance(item, bool) for item in pair) for pair in pairs):
            raise TypeError("not a pair")
        pairs = sorted((operator.index(step), operator.index(level)) for step, level in pairs)
    except TypeError:
        raise ValueError(f"partial_steps must be a sequence of (step, level) int pairs, got {values!r:.80}") from None
    steps = [step for step, _ in pairs]
    bad = [step for step in steps if not 0 < step < num_steps or step in full_steps]
    if bad or len(set(steps)) != len(steps):
        raise ValueError(f"partial_steps must name distinct reuse steps in [1, {num_steps}) that are not full steps "
                         f"({list(full_steps)}), got {values!r:.80}")
    for _, level in pairs:
        check_int("a partial step's level", level, 1)
    return tuple(pairs)


@dataclass(frozen=True)
class RouterCacheConfig(_ConfigMethods):
    """A learned block router (Learning-to-Cache's per-step, per-block decisions, trained as HarmoniCa trains
    them: :func:`learn_router`): at step ``s`` the transformer stack's blocks listed in ``computed_blocks[s]`` run
    and every other block adds its own delta (its output minus its input, per stream) from the last step it
    ran. Step 0 runs every block. ``num_blocks``: the stack's length (checked against the model);
    ``budget``: the block FLOPs the schedule was learned for, as a fraction of running every block at every
    step. For another step count the decisions are taken from the nearest learned step (by noise level
    when both schedules' ``timesteps`` are known, else by relative position), or refused when ``resample``
    is False; ``timesteps``: the scheduler timesteps it was learned on (None if unknown). ``first_step``: the first
    step the learning calls ran (img2img: N - int(N s); 0 for text-to-image), whose row lists every block: a call
    of another step count, or starting at another step, takes the rows from ``first_step`` on over the steps it
    runs, as :class:`CalibratedCacheConfig` does (over the whole trajectory a text-to-image call ran no block at the
    steps img2img never reached, until session 52), or a ValueError when ``resample`` is False."""

    computed_blocks: tuple[tuple[int, ...], ...]
    num_blocks: int
    budget: float = 0.4
    resample: bool = True
    timesteps: tuple[float, ...] | None = None
    first_step: int = 0

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_int("num_blocks", self.num_blocks, 1)
        check_int("first_step", self.first_step, 0)
        _check_float("budget", self.budget, 0.0, inclusive=False)
        if self.budget > 1.0:
            raise ValueError(f"budget is a fraction of the stack's block FLOPs in (0, 1], got {self.budget!r}")
        if not isinstance(self.resample, bool):
            raise ValueError(f"resample must be True or False, got {self.resample!r}")
        object.__setattr__(self, "computed_blocks", _checked_block_sets(self.computed_blocks, self.num_blocks))
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", _checked_timesteps(self.timesteps, self.num_inference_steps))
        self._check_first_step()

    def _check_first_step(self) -> None:
        if self.first_step >= self.num_inference_steps:
            raise ValueError(f"first_step must be below the {self.num_inference_steps} learned steps, "
                             f"got {self.first_step}")
        if self.computed_blocks[self.first_step] != tuple(range(self.num_blocks)):
            raise ValueError(f"computed_blocks[first_step={self.first_step}] must list every block (the first step a "
                             f"call runs has nothing cached), got {list(self.computed_blocks[self.first_step])}")

    @property
    def num_inference_steps(self) -> int:
        """Denoiser calls per item the router was learned for (one entry of ``computed_blocks`` each)."""
        return len(self.computed_blocks)

    def block_fraction(self) -> float:
        """Block computations run, as a fraction of every block at every step (unweighted by FLOPs)."""
        return sum(map(len, self.computed_blocks)) / (self.num_blocks * self.num_inference_steps)


def _checked_block_sets(values: Any, num_blocks: int) -> tuple[tuple[int, ...], ...]:
    """Per step, the sorted distinct block indices (ints) that compute; ValueError unless there is at least one
    step, every index lies in [0, num_blocks) and step 0 computes every block (nothing is cached before it)."""
    try:
        steps = [tuple(sorted({operator.index(index) for index in _no_bools(step)})) for step in values]
    except TypeError:
        raise ValueError(f"computed_blocks must hold, per step, a sequence of int block indices, got "
                         f"{values!r:.80}") from None
    if not steps:
        raise ValueError("computed_blocks must hold at least one step")
    bad = [index for step in steps for index in step if not 0 <= index < num_blocks]
    if bad:
        raise ValueError(f"computed_blocks names blocks {sorted(set(bad))[:5]} outside [0, {num_blocks})")
    if steps[0] != tuple(range(num_blocks)):
        raise ValueError(f"computed_blocks[0] must list every block 0..{num_blocks - 1} (step 0 has nothing cached "
                         f"to reuse), got {list(steps[0])}")
    return tuple(steps)


def _no_bools(items: Any) -> tuple:
    """``items`` as a tuple; TypeError if any is a bool (an int subclass that is no block index)."""
    items = tuple(items)
    if any(isinstance(item, bool) for item in items):
        raise TypeError("bool")
    return items


CACHE_CONFIGS: tuple[type, ...] = (DeepCacheConfig, BlockCacheConfig, FirstBlockCacheConfig,
                                   TeaCacheConfig, CalibratedCacheConfig, DeltaCacheConfig,
                                   EncoderPropagationConfig, RouterCacheConfig)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready ``{"type": class name, "params": fields}`` of a cache config."""
    params = {k: _lists(v) for k, v in asdict(config).items()}
    return {"type": type(config).__name__, "params": params}


def _lists(value: Any) -> Any:
    """(Nested) tuples as JSON lists."""
    return [_lists(item) for item in value] if isinstance(value, tuple) else value


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; ValueError for an unknown type or unknown fields (fields added
    later keep their defaults, so older artifacts load)."""
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise ValueError(f"a cache config dict is {{'type': class name, 'params': {{...}}}} (config_to_dict), got "
                         f"{data!r:.80}")
    by_name = {cls.__name__: cls for cls in CACHE_CONFIGS}
    cls = by_name.get(data.get("type"))
    if cls is None:
        raise ValueError(f"unknown cache config type {data.get('type')!r}; known: {sorted(by_name)}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data["params"]) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; accepted: {sorted(names)}")
    return cls(**{k: _tuples(v) for k, v in data["params"].items()})


def _tuples(value: Any) -> Any:
    """JSON lists back to (nested) tuples, as the frozen configs hold them."""
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value
