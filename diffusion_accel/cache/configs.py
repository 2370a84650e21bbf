"""Cache configurations: one frozen dataclass per method, validated on construction.

Model-dependent checks (a UNet branch id in range, a denoiser family the method supports) happen in
``enable_cache`` before anything is attached, so a bad config never leaves a pipeline half-changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEDULES = ("uniform", "non-uniform")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, minimum: float, inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a number {bound} {minimum}, got {value!r}")


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache for UNets: every ``interval`` steps a full UNet call, otherwise only the shallow
    path down to skip ``branch`` (0 = ``conv_in``) and the cached deep feature.

    ``schedule="non-uniform"`` places the same number of full steps (ceil(steps / interval))
    densely around ``center`` (a fraction of the trajectory) and sparsely far from it, with
    offsets growing as ``|u| ** power``.
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: float = 0.3
    power: float = 1.4

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, 1)
        _check_int("branch", self.branch, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (isinstance(self.center, (int, float)) and 0.0 <= self.center <= 1.0):
            raise ValueError(f"center must be a fraction in [0, 1], got {self.center!r}")
        _check_float("power", self.power, 1.0)


@dataclass(frozen=True)
class BlockCacheConfig:
    """Static FORA-style block caching for transformers: all blocks run every ``interval`` steps;
    in between, the cached residual of the block stack (output - input) is added to the input."""

    interval: int = 2

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, 1)


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """First-Block-Cache: block 0 always runs; when its residual's relative L1 change since the
    last fully computed step is below ``threshold``, the remaining blocks reuse their residual."""

    threshold: float = 0.08

    def __post_init__(self) -> None:
        _check_float("threshold", self.threshold, 0.0)


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache-style: accumulate ``poly(rel_l1(modulated input of block 0))`` over steps and reuse
    the cached residual of the following blocks while the sum stays below ``threshold``.

    ``coefficients`` (highest power first) come from :func:`fit_teacache_coefficients` for the
    model at hand; None uses the raw relative L1 change (the identity polynomial).
    """

    threshold: float = 0.1
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_float("threshold", self.threshold, 0.0)
        if self.coefficients is not None:
            values = tuple(self.coefficients)
            if not values or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in values):
                raise ValueError(f"coefficients must be a non-empty sequence of numbers or None, "
                                 f"got {self.coefficients!r}")
            object.__setattr__(self, "coefficients", tuple(float(c) for c in values))


@dataclass(frozen=True)
class CalibratedCacheConfig:
    """A calibrated schedule: ``full_steps`` of a ``num_inference_steps`` trajectory run the whole
    denoiser, the others reuse (UNets: DeepCache at ``branch``; transformers: the stack residual).

    Built by :func:`calibrate_schedule` for a compute ``budget`` (fraction of full calls). For another
    step count the schedule is resampled proportionally, or refused when ``resample`` is False.
    """

    full_steps: tuple[int, ...]
    num_inference_steps: int
    budget: float = 0.4
    branch: int = 0
    resample: bool = True

    def __post_init__(self) -> None:
        _check_int("num_inference_steps", self.num_inference_steps, 1)
        _check_int("branch", self.branch, 0)
        _check_float("budget", self.budget, 0.0, inclusive=False)
        if self.budget > 1.0:
            raise ValueError(f"budget is a fraction of full denoiser calls in (0, 1], got {self.budget!r}")
        steps = tuple(sorted(set(int(s) for s in self.full_steps)))
        if not steps or steps[0] != 0 or steps[-1] >= self.num_inference_steps:
            raise ValueError(f"full_steps must contain step 0 and lie in [0, {self.num_inference_steps}), "
                             f"got {self.full_steps!r}")
        object.__setattr__(self, "full_steps", steps)


CACHE_CONFIGS: tuple[type, ...] = (DeepCacheConfig, BlockCacheConfig, FirstBlockCacheConfig,
                                   TeaCacheConfig, CalibratedCacheConfig)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready ``{"type": class name, "params": fields}`` of a cache config."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    return {"type": type(config).__name__, "params": params}


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; raises ValueError for an unknown type."""
    by_name = {cls.__name__: cls for cls in CACHE_CONFIGS}
    cls = by_name.get(data.get("type"))
    if cls is None:
        raise ValueError(f"unknown cache config type {data.get('type')!r}; known: {sorted(by_name)}")
    names = {f.name for f in fields(cls)}
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in data["params"].items() if k in names}
    return cls(**params)
