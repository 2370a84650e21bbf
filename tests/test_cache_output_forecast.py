"""forecast_target="output": reuse steps take the final projection's cached or forecast output."""

import pytest
import torch

from diffusion_accel.arch import get_adapter
from diffusion_accel.cache import (BlockCacheConfig, CalibratedCacheConfig, calibrate_schedule, enable_cache,
                                   remove_cache, summary)
from diffusion_accel.cache.configs import config_from_dict, config_to_dict
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs


def _pipe(family: str):
    pipe = build_tiny(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family,expected", [("flux", "proj_out"), ("sd3", "proj_out"), ("pixart", "proj_out"),
                                             ("dit", "proj_out_2"), ("sd", None)])
def test_adapter_names_the_final_projection(family, expected):
    assert get_adapter(_pipe(family)).output_layer() == expected


def _projection_outputs(pipe, config, steps: int) -> list[torch.Tensor]:
    """The final projection's output at every denoiser call of one cached pipeline call."""
    seen = []
    module = pipe.transformer.get_submodule(get_adapter(pipe).output_layer())
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    enable_cache(pipe, config)
    try:
        pipe(**tiny_call_kwargs("dit", steps=steps))
    finally:
        remove_cache(pipe)
        handle.remove()
    return seen


def test_reuse_steps_return_the_last_output_or_its_linear_forecast():
    pipe = _pipe("dit")  # one batched CFG call per step; full steps 0, 3, 6
    reused = _projection_outputs(pipe, BlockCacheConfig(interval=3, forecast_target="output"), 8)
    assert torch.equal(reused[1], reused[0]) and torch.equal(reused[5], reused[3])
    forecast = _projection_outputs(pipe, BlockCacheConfig(interval=3, forecast=1, forecast_target="output"), 8)
    assert torch.equal(forecast[2], forecast[0])  # one full step so far: plain reuse
    expected = forecast[6] + (forecast[6] - forecast[3]) * (7 - 6) / (6 - 3)
    assert torch.allclose(forecast[7], expected, atol=1e-6) and not torch.equal(forecast[7], forecast[6])


def test_reuse_steps_skip_the_blocks_and_the_projection():
    pipe = _pipe("dit")
    module = pipe.transformer.get_submodule("proj_out_2")
    calls = []
    original = module.forward
    module.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    enable_cache(pipe, BlockCacheConfig(interval=3, forecast=1, forecast_target="output"))
    pipe(**tiny_call_kwargs("dit", steps=8))
    info = summary(pipe)
    remove_cache(pipe)
    assert len(calls) == info["full_calls"] == 3 and info["reused_calls"] == 5


def test_output_target_is_deterministic_and_removal_restores_the_pipeline():
    pipe = _pipe("flux")
    base = pipe(**tiny_call_kwargs("flux", steps=6)).images
    enable_cache(pipe, CalibratedCacheConfig((0, 1, 3), 6, forecast=1, forecast_target="output"))
    first = pipe(**tiny_call_kwargs("flux", steps=6)).images
    assert torch.equal(first, pipe(**tiny_call_kwargs("flux", steps=6)).images)
    assert not torch.equal(first, base) and torch.isfinite(first).all()
    remove_cache(pipe)
    assert torch.equal(pipe(**tiny_call_kwargs("flux", steps=6)).images, base)


def test_bad_target_and_unet_are_refused_and_leave_the_pipeline_unchanged():
    for make in (lambda t: BlockCacheConfig(forecast_target=t), lambda t: CalibratedCacheConfig((0,), 4, forecast_target=t)):
        with pytest.raises(ValueError, match="forecast_target must be one of"):
            make("proj_out")
    pipe = _pipe("sd")
    with pytest.raises(ValueError, match="forecast_target='output' is for transformer denoisers"):
        enable_cache(pipe, CalibratedCacheConfig((0, 2), 4, forecast_target="output"))
    assert summary(pipe)["enabled"] is False and not hasattr(pipe.unet, "_diffusers_hook")


def test_calibrated_search_keeps_the_target_and_it_survives_the_manifest():
    pipe = _pipe("dit")
    config = calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=6, guidance_scale=1.0, forecast=1,
                                forecast_target="output")
    assert config.forecast_target == "output" and len(config.full_steps) == 3
    assert config_from_dict(config_to_dict(config)) == config
    old_manifest = {"type": "CalibratedCacheConfig", "params": {"full_steps": [0, 2], "num_inference_steps": 4}}
    assert config_from_dict(old_manifest).forecast_target == "residual"  # artifacts saved before the field
