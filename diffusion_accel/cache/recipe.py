"""Cache configs from a recipe's ``[cache]`` table (``diffusion-accel calibrate --method cache``).

``method`` names the cache (none: ``default_cache_config``'s); the other keys are that config's
fields. Three methods calibrate on the recipe's prompts first: ``"calibrated"`` searches a schedule
(keys: ``budget``, ``branch``, ``forecast``, ``forecast_target``, ``search``, ``max_passes``,
``max_candidates``, ``resample``, ``search_blocks``), ``"router"`` learns a block router (keys: ``budget``,
``epochs``, ``lr``, ``step_weights``, ``resample``) and ``"teacache"`` fits its rescaling polynomial when no
``coefficients`` are given (key ``degree``, default 4).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .apply import check_cache_fits
from .calibrated import calibrate_schedule, check_search_settings
from .configs import (BlockCacheConfig, CalibratedCacheConfig, DeepCacheConfig, DeltaCacheConfig,
                      EncoderPropagationConfig, FirstBlockCacheConfig, TeaCacheConfig)
from .router_learn import check_learning_settings, learn_router
from .stack import check_stack
from .teacache_fit import check_degree, fit_teacache_coefficients

STATIC_METHODS: dict[str, type] = {
    "deepcache": DeepCacheConfig, "block": BlockCacheConfig, "first_block": FirstBlockCacheConfig,
    "teacache": TeaCacheConfig, "delta": DeltaCacheConfig, "encoder_propagation": EncoderPropagationConfig,
}
CALIBRATED_KEYS = ("budget", "branch", "forecast", "forecast_target", "search", "max_passes", "max_candidates",
                   "resample", "search_blocks")
ROUTER_KEYS = ("budget", "epochs", "lr", "step_weights", "resample")
LEARNED_METHODS = {"calibrated": CALIBRATED_KEYS, "router": ROUTER_KEYS}
CACHE_METHODS = (*STATIC_METHODS, *LEARNED_METHODS)


def config_from_table(pipe: Any, table: dict[str, Any], prompts: Any, num_inference_steps: int,
                      seed: int = 0, batch_size: int = 1, progress: bool = False, **call_kwargs: Any) -> Any:
    """The cache config a ``[cache]`` table describes, calibrated on ``prompts`` where the method
    needs it (``call_kwargs``: the sampling settings, e.g. ``guidance_scale``; ``batch_size`` prompts per
    call and a ``progress`` bar for a schedule search)."""
    method, options = _method_and_options(table)
    if method == "calibrated":
        return calibrate_schedule(pipe, prompts, num_inference_steps=num_inference_steps, seed=seed,
                                  batch_size=batch_size, progress=progress, **options, **call_kwargs)
    if method == "router":
        return learn_router(pipe, prompts, num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size,
                            progress=progress, **options, **call_kwargs)
    degree = options.pop("degree", 4) if method == "teacache" else None
    if method == "teacache" and options.get("coefficients") is None:
        options["coefficients"] = fit_teacache_coefficients(pipe, prompts, num_inference_steps, degree=degree,
                                                            seed=seed, **call_kwargs)
    return STATIC_METHODS[method](**options)


def check_table(table: dict[str, Any]) -> None:
    """Validate a ``[cache]`` table that names its method before any pipeline is loaded or calibrated:
    its method, its keys, and (for methods needing no calibration) its values."""
    method, options = _method_and_options(table)
    if method == "calibrated":
        check_search_settings(**options)
        return
    if method == "router":
        check_learning_settings(**options)
        return
    degree = options.pop("degree", None)
    if degree is not None:  # a TeaCache fit's (refused beside coefficients): checked before the model loads
        check_degree(degree)
    STATIC_METHODS[method](**options)  # a TeaCache to fit too: its threshold was checked only after the fit


def check_table_fits(pipe: Any, table: dict[str, Any]) -> None:
    """ValueError when the method a ``[cache]`` table names cannot cache ``pipe``'s denoiser, checked once the
    pipeline loads: a router or TeaCache on a UNet, DeepCache on a transformer failed only after a chain's
    calibration, pruning and PTQ had run (session 46)."""
    method, options = _method_and_options(table)
    if method == "router":
        check_stack(pipe, uses_head=False)
        return
    if method == "calibrated":  # the schedule is searched later; its branch / target are checked on a probe
        targets = {key: options[key] for key in ("branch", "forecast", "forecast_target") if key in options}
        check_cache_fits(pipe, CalibratedCacheConfig((0,), 2, **targets))
        return
    options.pop("degree", None)
    check_cache_fits(pipe, STATIC_METHODS[method](**options))


DEFAULT_METHODS = ("deepcache", "block")  # what default_cache_config picks: UNets, transformers


def check_table_without_method(table: dict[str, Any]) -> None:
    """A ``[cache]`` table naming no method gets the pipeline's default (known once it loads): keys neither default
    method takes (``budget``, ``search_blocks``) are refused now, before a chain's calibration, pruning and PTQ."""
    accepted = sorted({field.name for method in DEFAULT_METHODS for field in fields(STATIC_METHODS[method])})
    unknown = sorted(set(table) - set(accepted) - {"method"})
    if unknown:
        raise ValueError(f"[cache] keys {unknown} apply to no default cache method (deepcache for UNets, block for "
                         f"transformers: {accepted}); name the method that takes them ([cache] method / "
                         f"--cache-method, e.g. calibrated)")


def _method_and_options(table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method, the other keys) of a ``[cache]`` table; ValueError for an unknown method or a key that
    method does not take (``degree`` only for TeaCache's fit, not beside given coefficients)."""
    options = dict(table)
    method = options.pop("method", None)
    if method not in CACHE_METHODS:
        raise ValueError(f"[cache] method {method!r}: accepted methods are {', '.join(CACHE_METHODS)}")
    if method in LEARNED_METHODS:
        _check_keys(method, options, LEARNED_METHODS[method])
        return method, options
    if "degree" in options and options.get("coefficients") is not None:
        raise ValueError("[cache] degree fits TeaCache's polynomial; it does not apply when coefficients are given")
    accepted = tuple(f.name for f in fields(STATIC_METHODS[method])) + (("degree",) if method == "teacache" else ())
    _check_keys(method, options, accepted)
    return method, options


def default_cache_table(pipe: Any) -> dict[str, Any]:
    """``default_cache_config(pipe)`` as a ``[cache]`` table (method name + fields), for recipes and
    command lines that name no cache method."""
    from dataclasses import asdict

    from .apply import default_cache_config

    config = default_cache_config(pipe)
    method = next(name for name, config_type in STATIC_METHODS.items() if type(config) is config_type)
    return {"method": method, **asdict(config)}


def _check_keys(method: str, options: dict[str, Any], accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"[cache] keys {unknown} do not apply to method {method!r}; accepted: {list(accepted)}")
