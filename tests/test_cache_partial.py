"""Partial steps of calibrated schedules: reuse steps that recompute part of the cached blocks."""

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.cache import (DeepCacheConfig, DeltaCacheConfig, cache_config, calibrate_schedule, enable_cache,
                                   remove_cache, summary)
from diffusion_accel.cache.calibrated import (_refine_with_partial, candidate_levels, schedule_error,
                                              search_partial_steps)
from diffusion_accel.cache.configs import CalibratedCacheConfig, config_from_dict, config_to_dict
from diffusion_accel.cache.partial import level_costs, level_range, partial_steps_for_call
from diffusion_accel.cache.runs import final_outputs, planned_calls
from diffusion_accel.cache.session import get_session
from diffusion_accel.cache.stack import stack_blocks
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

REUSE_STEPS = (1, 2, 3, 5, 6, 7)


def _images(pipe, family: str, config) -> torch.Tensor:
    enable_cache(pipe, config)
    try:
        return pipe(**tiny_call_kwargs(family, steps=8)).images
    finally:
        remove_cache(pipe)


def _everywhere(level: int, forecast: int = 0) -> CalibratedCacheConfig:
    """Full steps 0 and 4 of 8, every other step partial at ``level``."""
    return CalibratedCacheConfig((0, 4), 8, forecast=forecast, partial_steps=tuple((s, level) for s in REUSE_STEPS))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_transformer_partial_steps_equal_delta_caching_of_the_rear_span(family):
    """Leading ``level`` blocks run, the rest add their delta: Δ-DiT's rear span, another implementation."""
    pipe = build_tiny(family)
    blocks = len(stack_blocks(pipe))
    for level in range(1, blocks):
        ours = _images(pipe, family, _everywhere(level))
        delta = _images(pipe, family, DeltaCacheConfig(interval=4, cached_fraction=(blocks - level) / blocks,
                                                        boundary=1.0))
        assert torch.equal(ours, delta), level


@pytest.mark.parametrize("forecast", [0, 1])
def test_unet_partial_steps_equal_deepcache_at_the_deeper_branch(forecast):
    pipe = build_tiny("sd")
    for level in (1, 3):
        ours = _images(pipe, "sd", _everywhere(level, forecast))
        deeper = _images(pipe, "sd", DeepCacheConfig(interval=4, branch=level, forecast=forecast))
        assert torch.equal(ours, deeper), level


def test_partial_steps_differ_from_whole_reuse_and_are_logged():
    pipe = build_tiny("flux")
    blocks = len(stack_blocks(pipe))
    config = CalibratedCacheConfig((0, 4), 8, partial_steps=((2, 1),))
    whole = _images(pipe, "flux", CalibratedCacheConfig((0, 4), 8))
    enable_cache(pipe, config)
    partial = pipe(**tiny_call_kwargs("flux", steps=8)).images
    records = {r["step"]: r for r in summary(pipe)["steps"]}
    text = summary(pipe, as_text=True)
    remove_cache(pipe)
    assert "step   2 [cond] partial (level 1) blocks computed 1" in text, text
    assert not torch.equal(partial, whole)
    assert (records[2]["computed_blocks"], records[2]["reused_blocks"], records[2]["partial"]) == (1, blocks - 1, 1)
    assert (records[3]["computed_blocks"], records[3]["reused_blocks"]) == (0, blocks)


def test_transformer_partial_steps_forecast_their_delta():
    pipe = build_tiny("flux")
    plain, forecast = (_images(pipe, "flux", _everywhere(2, f)) for f in (0, 1))
    assert not torch.equal(plain, forecast)
    assert torch.isfinite(forecast).all()


@pytest.mark.parametrize("partial", [((0, 1),), ((4, 1),), ((8, 1),), ((2, 1), (2, 2)), ((2, 0),), ((2, True),),
                                     ((2,),), "x"])
def test_bad_partial_steps_are_refused(partial):
    with pytest.raises(ValueError, match="partial"):
        CalibratedCacheConfig((0, 4), 8, partial_steps=partial)


@pytest.mark.parametrize("family, level", [("flux", 4), ("sd", 6), ("dit", 2)])
def test_a_level_outside_the_model_is_refused_before_any_hook(family, level):
    pipe = build_tiny(family)
    with pytest.raises(ValueError, match=f"level {level}.*accepted levels here are"):
        enable_cache(pipe, CalibratedCacheConfig((0, 4), 8, partial_steps=((2, level),)))
    assert get_session(pipe.unet if family == "sd" else pipe.transformer) is None
    assert list(level_range(pipe, 0)) == {"flux": [1, 2, 3], "sd": [1, 2, 3, 4, 5], "dit": [1]}[family]


def test_partial_steps_survive_the_manifest_and_save_load(tmp_path):
    config = CalibratedCacheConfig((0, 4), 8, partial_steps=[[5, 2], [2, 1]])
    assert config.partial_steps == ((2, 1), (5, 2))
    assert config_from_dict(config_to_dict(config)) == config
    pipe = build_tiny("flux")
    enable_cache(pipe, config)
    expected = pipe(**tiny_call_kwargs("flux", steps=8)).images
    da.save(pipe, tmp_path / "cached")
    loaded = da.load(build_tiny("flux"), tmp_path / "cached")
    assert cache_config(loaded) == config
    assert torch.equal(loaded(**tiny_call_kwargs("flux", steps=8)).images, expected)


def test_partial_steps_follow_the_schedule_onto_other_step_counts():
    config = CalibratedCacheConfig((0, 4, 9), 12, partial_steps=((2, 1), (6, 2), (10, 3)))
    assert partial_steps_for_call(config, config.full_steps, 12) == {2: 1, 6: 2, 10: 3}
    plan = partial_steps_for_call(config, [0, 2, 4], 6)  # half the steps: 3 / 2 to the nearest = 2 partial steps
    assert len(plan) == 2 and set(plan.values()) <= {1, 2, 3} and not set(plan) & {0, 2, 4}
    assert len(partial_steps_for_call(config, [0, 4, 8, 13, 17], 24)) == 6  # twice the steps: twice as many
    assert partial_steps_for_call(config, list(range(6)), 6) == {}  # no free step left
    one = CalibratedCacheConfig((0, 5), 10, partial_steps=((3, 1),))  # 2.5 at 25 steps: halves up (round() gave 2)
    assert len(partial_steps_for_call(one, [0, 12], 25)) == 3
    levels = [float(t) for t in range(12, 0, -1)]  # same noise levels: same positions
    timed = CalibratedCacheConfig((0, 4, 9), 12, partial_steps=((2, 1),), timesteps=levels)
    assert partial_steps_for_call(timed, timed.full_steps, 12, levels) == {2: 1}


@pytest.mark.parametrize("steps", [4, 16, 40])
def test_partial_steps_keep_their_share_of_the_steps_at_another_step_count(steps):
    """A 20-step schedule with 4 partial steps (1 in 5) keeps 1 in 5 at other counts; until session 41 all 4 were
    kept, every reuse step of a 4-step call (block compute 1.0 for a 0.35 schedule)."""
    pipe = build_tiny("flux")
    enable_cache(pipe, CalibratedCacheConfig((0, 7, 14), 20, partial_steps=((3, 1), (5, 2), (10, 1), (17, 2))))
    pipe(**tiny_call_kwargs("flux", steps=steps))
    records = summary(pipe)["steps"]
    partial = [r for r in records if not r["computed"] and r["computed_blocks"]]
    full = [r for r in records if r["computed"]]
    remove_cache(pipe)
    assert len(partial) == round(4 * steps / 20) and len(full) == max(1, round(3 * steps / 20))


def test_level_costs_are_fractions_growing_with_the_level():
    for family in ("flux", "sd"):
        pipe = build_tiny(family)
        calls = planned_calls(pipe, ["a cat"], 2, **{k: v for k, v in tiny_call_kwargs(family).items()
                                                      if k in ("height", "width")})
        levels = list(level_range(pipe, 0))
        costs = level_costs(pipe, 0, levels, lambda: final_outputs(pipe, calls))
        values = [costs[level] for level in levels]
        assert all(0 < value < 1 for value in values) and values == sorted(values), (family, costs)


def test_candidate_levels_are_thinned_evenly(monkeypatch):
    import diffusion_accel.cache.calibrated as calibrated

    assert candidate_levels(build_tiny("flux"), 0) == [1, 2, 3]
    assert candidate_levels(build_tiny("sd"), 2) == [3, 4, 5]
    monkeypatch.setattr(calibrated, "MAX_LEVELS", 3)
    assert candidate_levels(build_tiny("sd"), 0) == [1, 3, 5]


def test_partial_search_spends_spare_and_released_budget_only_where_it_helps():
    def error(full, partial=None):  # position 5 as a partial step at level 2 helps; losing full step 3 costs 0.1
        partial = partial or {}
        return 1.0 - 0.5 * (partial.get(5) == 2) - 0.05 * len(partial) + 0.1 * (3 not in full)

    costs = {1: 0.3, 2: 0.6}
    full, partial = search_partial_steps(error, 10, {0, 3, 7}, costs, spare=0.0, max_rounds=2)
    assert partial.get(5) == 2 and len(full) < 3
    assert sum(costs[level] for level in partial.values()) <= 3 - len(full) + 1e-9
    def worse_with_partials(full, partial=None):
        return len(partial or {})

    assert search_partial_steps(worse_with_partials, 10, {0, 3}, costs, 0.5, 2) == ({0, 3}, {})


def test_joint_refinement_moves_full_and_partial_steps_to_better_nearby_steps():
    def error(full, partial=None):  # best: full steps {0, 4}, a partial step at 8 (level 1)
        partial = partial or {}
        return len(full ^ {0, 4}) + sum(abs(position - 8) for position in partial)

    assert _refine_with_partial(error, 12, {0, 2}, {6: 1}, max_passes=3) == ({0, 4}, {8: 1})
    assert _refine_with_partial(error, 12, {0, 2}, {}, max_passes=3) == ({0, 2}, {})


def test_calibrate_schedule_with_block_search_is_never_worse_on_its_prompts():
    pipe = build_tiny("dit")
    kwargs = dict(budget=0.35, num_inference_steps=10, max_passes=1)
    steps_only = calibrate_schedule(pipe, [1, 2], **kwargs)
    with_blocks = calibrate_schedule(pipe, [1, 2], search_blocks=True, **kwargs)
    calls = planned_calls(pipe, [1, 2], 10)
    references = final_outputs(pipe, calls)
    assert schedule_error(pipe, with_blocks, calls, references) <= schedule_error(pipe, steps_only, calls, references)
    with pytest.raises(ValueError, match="search_blocks"):
        calibrate_schedule(pipe, [1], search_blocks="yes", **kwargs)
