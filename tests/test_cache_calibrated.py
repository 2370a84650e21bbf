"""Calibrated cache schedules: both searches meet the budget; the refine search never loses to uniform."""

import pytest
import torch

from diffusion_accel.cache import BlockCacheConfig, calibrate_schedule, enable_cache, remove_cache
from diffusion_accel.cache.calibrated import evenly_spaced_steps
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs


def _final_error(pipe, config, steps: int) -> float:
    base = pipe(**tiny_call_kwargs("dit", steps=steps)).images
    enable_cache(pipe, config)
    try:
        cached = pipe(**tiny_call_kwargs("dit", steps=steps)).images
    finally:
        remove_cache(pipe)
    return float((cached - base).norm())


def test_evenly_spaced_steps_start_at_zero_and_have_the_count():
    assert len(evenly_spaced_steps(50, 17)) == 17
    assert evenly_spaced_steps(10, 5) == {0, 2, 4, 6, 8}
    assert 0 in evenly_spaced_steps(7, 3) and len(evenly_spaced_steps(7, 3)) == 3


@pytest.mark.parametrize("search", ["greedy", "refine"])
def test_both_searches_meet_the_budget(search):
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=8, guidance_scale=1.0, search=search)
    assert len(config.full_steps) == 4 and config.full_steps[0] == 0


def test_refine_is_never_worse_than_evenly_spaced_on_the_calibration_prompt():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=8, guidance_scale=1.0, search="refine")
    assert _final_error(pipe, config, 8) <= _final_error(pipe, BlockCacheConfig(interval=2), 8) + 1e-6


def test_unknown_search_is_refused_and_pipeline_untouched():
    pipe = build_tiny("dit")
    with pytest.raises(ValueError, match="search must be one of"):
        calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=6, search="annealing")


def test_calibration_runs_pass_the_negative_prompt_through():
    from diffusion_accel.cache.runs import planned_calls

    pipe = build_tiny("flux")
    calls = planned_calls(pipe, ["a red bicycle"], 4, negative_prompt="", true_cfg_scale=3.0, height=16, width=16)
    assert calls[0].kwargs["negative_prompt"] == "" and calls[0].kwargs["true_cfg_scale"] == 3.0


def test_forecast_residual_extrapolates_linearly_per_stream():
    from diffusion_accel.cache.stack import forecast_residual

    r0 = {"hidden": torch.tensor([1.0, 2.0]), "encoder": None}
    r1 = {"hidden": torch.tensor([2.0, 2.5]), "encoder": None}
    state = {"residual": r1, "residual_step": 4, "previous_residual": (r0, 2)}
    out = forecast_residual(state, 5)
    assert torch.allclose(out["hidden"], torch.tensor([2.5, 2.75])) and out["encoder"] is None
    assert forecast_residual({"residual": r1, "residual_step": 0}, 1) is r1  # one full step: plain reuse


def test_block_cache_forecast_changes_reused_steps_only_and_is_deterministic():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    outputs = {}
    for forecast in (0, 1):
        enable_cache(pipe, BlockCacheConfig(interval=3, forecast=forecast))
        outputs[forecast] = pipe(**tiny_call_kwargs("dit", steps=8)).images
        assert torch.equal(outputs[forecast], pipe(**tiny_call_kwargs("dit", steps=8)).images)
        remove_cache(pipe)
    assert not torch.equal(outputs[0], outputs[1]) and torch.isfinite(outputs[1]).all()


def test_forecast_is_validated_and_refused_for_unets():
    from diffusion_accel.cache import CalibratedCacheConfig

    with pytest.raises(ValueError, match="forecast must be one of"):
        BlockCacheConfig(interval=2, forecast=2)
    with pytest.raises(ValueError, match="forecast must be one of"):
        BlockCacheConfig(interval=2, forecast=1.0)
    pipe = build_tiny("sd")
    with pytest.raises(ValueError, match="UNet"):
        enable_cache(pipe, CalibratedCacheConfig((0, 2), 4, forecast=1))
    assert not hasattr(pipe.unet, "_diffusers_hook") or pipe.unet._diffusers_hook.get_hook("diffusion_accel.step_tracker") is None
