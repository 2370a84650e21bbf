"""Cache configs from a recipe's [cache] table: static configs, calibrated ones, clear errors."""

import pytest

from diffusion_accel.cache import BlockCacheConfig, CalibratedCacheConfig, DeepCacheConfig, TeaCacheConfig
from diffusion_accel.cache.recipe import config_from_table
from diffusion_accel.testing.tiny import build_tiny


def test_static_table_builds_its_config_without_running_the_pipeline():
    config = config_from_table(None, {"method": "deepcache", "interval": 4, "forecast": 1}, [], 10)
    assert config == DeepCacheConfig(interval=4, forecast=1)
    assert config_from_table(None, {"method": "block", "interval": 2}, [], 10) == BlockCacheConfig(interval=2)
    block = config_from_table(None, {"method": "block", "forecast_target": "output"}, [], 10)
    assert block == BlockCacheConfig(forecast_target="output")


def test_calibrated_table_searches_a_schedule_for_the_budget():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = config_from_table(pipe, {"method": "calibrated", "budget": 0.5, "forecast": 1,
                                      "forecast_target": "output"}, [1], 6, guidance_scale=1.0)
    assert isinstance(config, CalibratedCacheConfig) and config.forecast_target == "output"
    assert len(config.full_steps) == 3 and config.forecast == 1 and config.num_inference_steps == 6


def test_router_table_learns_a_block_router_for_the_budget():
    from diffusion_accel.cache import RouterCacheConfig

    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = config_from_table(pipe, {"method": "router", "budget": 0.5, "epochs": 1, "step_weights": "uniform"},
                               [1], 6, guidance_scale=1.0)
    assert isinstance(config, RouterCacheConfig) and config.num_inference_steps == 6 and config.budget == 0.5


def test_teacache_without_coefficients_fits_them():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = config_from_table(pipe, {"method": "teacache", "threshold": 0.2, "degree": 1}, [1, 2], 8,
                               guidance_scale=1.0)
    assert isinstance(config, TeaCacheConfig) and len(config.coefficients) == 2 and config.threshold == 0.2


@pytest.mark.parametrize("table, message", [
    ({"method": "fora"}, "accepted methods are deepcache"),
    ({}, "accepted methods"),
    ({"method": "deepcache", "budget": 0.3}, r"keys \['budget'\] do not apply to method 'deepcache'"),
    ({"method": "calibrated", "interval": 3}, r"keys \['interval'\] do not apply"),
    ({"method": "router", "forecast": 1}, r"keys \['forecast'\] do not apply to method 'router'"),
    ({"method": "deepcache", "interval": 0}, "interval must be an int >= 1"),
    ({"method": "teacache", "coefficients": [1.0, 0.0], "degree": 2}, "does not apply when coefficients"),
])
def test_bad_tables_name_the_value_and_what_is_accepted(table, message):
    with pytest.raises(ValueError, match=message):
        config_from_table(None, table, [], 10)


def test_every_shipped_recipe_cache_table_builds_a_config():
    from pathlib import Path

    from diffusion_accel.recipes import load_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))
    assert recipes
    for path in recipes:
        table = load_recipe(path).get("cache")
        if table is not None:
            assert config_from_table(None, table, [], 10) is not None, path.name


@pytest.mark.parametrize("table, message", [
    ({"method": "router", "epochs": 0}, "epochs must be an int >= 1"),
    ({"method": "router", "step_weights": "loss"}, "step_weights must be one of"),
    ({"method": "router", "budget": 2.0}, "budget is a fraction"),
    ({"method": "router", "resample": "yes"}, "resample must be True or False"),
])
def test_a_router_table_is_checked_before_any_pipeline_loads(table, message):
    from diffusion_accel.cache.recipe import check_table

    with pytest.raises(ValueError, match=message):
        check_table(table)
    check_table({"method": "router", "budget": 0.3, "epochs": 5})


@pytest.mark.parametrize("table, message", [
    ({"method": "calibrated", "search": "gready"}, "search must be one of"),
    ({"method": "calibrated", "max_passes": -1}, "max_passes"),
    ({"method": "calibrated", "max_candidates": 0}, "max_candidates"),
    ({"method": "calibrated", "forecast": 3}, "forecast"),
    ({"method": "calibrated", "forecast_target": "velocity"}, "forecast_target"),
    ({"method": "calibrated", "resample": "yes"}, "resample must be True or False"),
    ({"method": "calibrated", "search_blocks": "yes"}, "search_blocks must be True or False"),
    ({"method": "calibrated", "branch": -1}, "branch"),
])
def test_a_calibrated_table_is_checked_before_any_pipeline_loads(table, message):
    """Only its budget was checked: `search = "gready"` failed after the model loaded and the chain ran (until
    session 41)."""
    from diffusion_accel.cache.recipe import check_table

    with pytest.raises(ValueError, match=message):
        check_table(table)
    check_table({"method": "calibrated", "budget": 0.3, "search": "greedy", "forecast": 1, "search_blocks": True})


@pytest.mark.parametrize("table, message", [
    ({"method": "teacache", "threshold": -1.0}, "threshold must be a finite number >= 0.0"),
    ({"method": "teacache", "threshold": "high"}, "threshold must be a finite number"),
    ({"method": "teacache", "degree": 0}, "degree must be an int >= 1, got 0"),
    ({"method": "teacache", "degree": "four"}, "degree must be an int >= 1, got 'four'"),
])
def test_a_teacache_table_to_fit_is_checked_before_any_pipeline_loads(table, message):
    """Without coefficients (to be fitted) its values were checked after the model loaded and the fit ran."""
    from diffusion_accel.cache.recipe import check_table

    with pytest.raises(ValueError, match=message):
        check_table(table)
    check_table({"method": "teacache", "threshold": 0.2, "degree": 3})


def test_cache_calibration_refuses_several_images_per_prompt_with_its_own_message():
    """It named calibrate's num_images_per_prompt argument, which calibrate_schedule lacks (until session 41)."""
    from diffusion_accel.cache import calibrate_schedule
    from diffusion_accel.testing.tiny import build_tiny

    with pytest.raises(ValueError, match="cache calibration runs one image per prompt"):
        calibrate_schedule(build_tiny("sd"), ["a cat"], num_inference_steps=4, num_images_per_prompt=2)
