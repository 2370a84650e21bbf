"""Calibrated cache schedules: both searches meet the budget; the refine search never loses to uniform."""

import pytest
import torch

from diffusion_accel.cache import BlockCacheConfig, calibrate_schedule, enable_cache, remove_cache
from diffusion_accel.cache.calibrated import (_refine, _refine_far, evenly_spaced_steps, front_loaded_steps,
                                              search_starts)
from diffusion_accel.cache.configs import CalibratedCacheConfig
from diffusion_accel.cache.forecast import forecast_scale
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


def test_front_loaded_steps_fill_the_start_and_end_at_the_last_step():
    assert front_loaded_steps(28, 12) == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27}
    for steps in range(1, 40):
        for count in range(1, steps + 1):
            chosen = front_loaded_steps(steps, count)
            assert len(chosen) == count and 0 in chosen and max(chosen) == (steps - 1 if count > 1 else 0)


def test_search_starts_are_distinct_schedules_of_the_budget():
    starts = search_starts(28, 10)
    assert starts[0] == evenly_spaced_steps(28, 10) and front_loaded_steps(28, 10) in starts
    assert len(starts) == 5 and all(len(s) == 10 and 0 in s for s in starts)
    assert len({frozenset(s) for s in starts}) == len(starts)
    assert search_starts(3, 1) == [{0}]


def test_far_moves_leave_a_local_minimum_of_the_nearby_moves():
    """A landscape whose best schedule needs a step moved further than the nearby moves reach."""
    target = {0, 3, 15}

    def error(steps):  # flat until step 15 is full
        return len(steps ^ target)

    stuck = _refine(error, 20, {0, 3, 4}, max_passes=5)
    assert stuck == {0, 3, 4}  # every nearby move of 4 is worse or equal
    assert _refine_far(error, 20, stuck, max_passes=5) == target


@pytest.mark.parametrize("search", ["greedy", "refine"])
def test_both_searches_meet_the_budget(search):
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=8, guidance_scale=1.0, search=search)
    assert len(config.full_steps) == 4 and config.full_steps[0] == 0


def test_a_budget_buys_whole_steps_never_over_it_and_one_at_least_with_a_warning():
    """round() sent half steps to the even count (0.3 and 0.5 of 5 steps both bought 2, 0.7 and 0.9 both 4; 0.3 of
    25 spent 0.32) and a budget below one step was silent (session 53 review)."""
    from diffusion_accel.cache.calibrated import full_step_count

    assert [full_step_count(budget, 5) for budget in (0.3, 0.5, 0.7, 0.9, 1.0)] == [1, 2, 3, 4, 5]
    assert full_step_count(0.3, 25) == 7 and full_step_count(11 / 28, 28) == 11  # full / steps gives back full
    with pytest.warns(RuntimeWarning, match=r"budget=0.01 of 5 steps buys less than one full step"):
        assert full_step_count(0.01, 5) == 1


def test_a_schedule_search_batches_prompts_counts_schedules_and_hides_per_run_bars(capsys, monkeypatch):
    """The README's 50-step search ran thousands of pipeline calls, each printing its own 50-step bar, with no
    overall progress; prompts now share calls (``batch_size``) and a bar counts the schedules tried."""
    from diffusion_accel.cache import calibrated

    pipe = build_tiny("sd")
    calls = []
    original = calibrated.final_outputs
    monkeypatch.setattr(calibrated, "final_outputs", lambda p, planned: calls.append(len(planned)) or original(p, planned))
    config = calibrate_schedule(pipe, ["a", "b", "c"], budget=0.5, num_inference_steps=4, batch_size=2,
                                max_passes=1, progress=True, height=32, width=32)
    assert len(config.full_steps) == 2 and set(calls) == {1, 2}  # 3 prompts in 2 calls per schedule (1: steps_that_run)
    err = capsys.readouterr().err
    assert "schedule search" in err and "4/4" not in err  # the pipeline's own bar stayed off
    assert getattr(pipe, "_progress_bar_config", {}).get("disable") is not True  # and back on after


def test_schedule_steps_count_denoiser_calls_of_second_order_schedulers():
    """Heun at 4 steps makes 7 denoiser calls: the budget is a fraction of those 7, and the schedule
    applies to them as calibrated (it used to search 4 steps, then stretch 2 full ones over 7 calls)."""
    import diffusers

    from diffusion_accel.cache import summary

    pipe = build_tiny("sd")
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = {"height": 32, "width": 32}
    config = calibrate_schedule(pipe, ["a cat"], budget=0.5, num_inference_steps=4, guidance_scale=1.0, **size)
    assert config.num_inference_steps == 7 and len(config.full_steps) == 3  # floor(0.5 x 7)
    enable_cache(pipe, config)
    pipe(**tiny_call_kwargs("sd", steps=4), guidance_scale=1.0)
    report = summary(pipe)
    computed = [record["step"] for record in report["steps"] if record["computed"]]
    assert computed == list(config.full_steps)


def test_refine_is_never_worse_than_either_start_on_the_calibration_prompt():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=8, guidance_scale=1.0, search="refine")
    error = _final_error(pipe, config, 8)
    assert error <= _final_error(pipe, BlockCacheConfig(interval=2), 8) + 1e-6
    front = CalibratedCacheConfig(tuple(sorted(front_loaded_steps(8, 4))), 8)
    assert error <= _final_error(pipe, front, 8) + 1e-6


def test_unknown_search_is_refused_and_pipeline_untouched():
    pipe = build_tiny("dit")
    with pytest.raises(ValueError, match="search must be one of"):
        calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=6, search="annealing")


def test_calibration_runs_pass_the_negative_prompt_through():
    from diffusion_accel.cache.runs import planned_calls

    pipe = build_tiny("flux")
    calls = planned_calls(pipe, ["a red bicycle"], 4, negative_prompt="", true_cfg_scale=3.0, height=16, width=16)
    assert calls[0].kwargs["negative_prompt"] == [""] and calls[0].kwargs["true_cfg_scale"] == 3.0


def test_forecast_residual_extrapolates_linearly_per_stream():
    from diffusion_accel.cache.stack import forecast_residual

    r0 = {"hidden": torch.tensor([1.0, 2.0]), "encoder": None}
    r1 = {"hidden": torch.tensor([2.0, 2.5]), "encoder": None}
    state = {"residual": r1, "previous_residual": r0}
    out = forecast_residual(state, forecast_scale(5, 4, 2))
    assert torch.allclose(out["hidden"], torch.tensor([2.5, 2.75])) and out["encoder"] is None
    assert forecast_residual({"residual": r1}, forecast_scale(1, 0, None)) is r1  # one full step: plain reuse


def test_forecast_scale_is_a_tensor_past_two_increasing_full_steps():
    scale = forecast_scale(7, 4, 2)
    assert isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.item() == 1.5
    assert forecast_scale(5, 4, None) is None and forecast_scale(5, None, None) is None
    assert forecast_scale(5, 2, 2) is None


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


def test_forecast_is_validated():
    from diffusion_accel.cache import CalibratedCacheConfig, DeepCacheConfig

    for make in (lambda f: BlockCacheConfig(interval=2, forecast=f), lambda f: DeepCacheConfig(forecast=f),
                 lambda f: CalibratedCacheConfig((0, 2), 4, forecast=f)):
        for bad in (2, 1.0, True):
            with pytest.raises(ValueError, match="forecast must be one of"):
                make(bad)


def test_linear_forecast_follows_nested_outputs_and_falls_back_to_reuse():
    from diffusion_accel.cache.forecast import linear_forecast

    before = (torch.tensor([1.0]), (torch.tensor([0.0, 0.0]), None))
    now = (torch.tensor([3.0]), (torch.tensor([1.0, 2.0]), None))
    out = linear_forecast(now, before, forecast_scale(5, 4, 2))  # half a full-step gap past step 4
    assert torch.equal(out[0], torch.tensor([4.0])) and torch.equal(out[1][0], torch.tensor([1.5, 3.0]))
    assert out[1][1] is None
    assert linear_forecast(now, None, forecast_scale(5, 4, 2)) is now
    assert linear_forecast(now, before, None) is now  # one full step only: reuse
    assert linear_forecast(now, (torch.tensor([1.0]),), forecast_scale(5, 4, 2)) is now  # structure changed


def test_deepcache_forecast_extrapolates_the_cached_feature_on_reuse_steps():
    from diffusion_accel.cache import DeepCacheConfig

    from diffusion_accel.cache.unet_branch import branch_point

    pipe = build_tiny("sd")
    pipe.set_progress_bar_config(disable=True)
    seen, mid = [], []
    fed = pipe.unet.get_submodule(branch_point(pipe, 0).blocks[-1])  # what the shallow path consumes
    handle = fed.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).clone()))
    mid_handle = pipe.unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.detach().clone()))
    enable_cache(pipe, DeepCacheConfig(interval=3, forecast=1))
    images = pipe(**tiny_call_kwargs("sd", steps=7)).images  # full steps 0, 3, 6
    assert torch.equal(images, pipe(**tiny_call_kwargs("sd", steps=7)).images)  # fresh state per call
    remove_cache(pipe)
    handle.remove(), mid_handle.remove()
    assert torch.equal(mid[5], mid[3])  # a module that only feeds cached ones is not forecast
    steps = seen[:7]  # one batched CFG call per step
    assert torch.equal(steps[1], steps[0]) and torch.equal(steps[2], steps[0])  # one full step: reuse
    expected = steps[3] + (steps[3] - steps[0]) * (5 - 3) / (3 - 0)
    assert torch.allclose(steps[5], expected, atol=1e-6) and not torch.equal(steps[5], steps[3])


def test_calibrated_schedule_with_forecast_runs_on_a_unet():
    from diffusion_accel.cache import CalibratedCacheConfig

    pipe = build_tiny("sd")
    pipe.set_progress_bar_config(disable=True)
    enable_cache(pipe, CalibratedCacheConfig((0, 2), 4, forecast=1))
    assert torch.isfinite(pipe(**tiny_call_kwargs("sd", steps=4)).images).all()
    remove_cache(pipe)


@pytest.mark.parametrize("arguments, message", [
    ({"search": "greedy", "max_candidates": 0}, "max_candidates must be an int >= 1, got 0"),  # ZeroDivisionError
    ({"max_candidates": -2}, "max_candidates must be an int >= 1"),
    ({"max_passes": -1}, "max_passes must be an int >= 0, got -1"),  # accepted
    ({"max_passes": "3"}, "max_passes must be an int >= 0"),
    ({"branch": 99}, "branch"),  # refused only after the uncached reference ran
])
def test_bad_search_settings_fail_before_any_reference_run(arguments, message, monkeypatch):
    from diffusion_accel.cache import calibrated

    monkeypatch.setattr(calibrated, "final_outputs", lambda *a: pytest.fail("ran the reference"))
    with pytest.raises(ValueError, match=message):
        calibrated.calibrate_schedule(build_tiny("sd"), ["a cat"], budget=0.5, num_inference_steps=4, **arguments)


def test_a_calibrated_schedule_holds_under_a_pipeline_with_its_own_scheduler():
    """The cache read the step count from the scheduler of the pipeline it was enabled on, even when
    another pipeline sharing the UNet drove the call: 1000 (DDIM's training steps) before the first
    call ran no cached step at all; after a 4-step call only steps 0 and 2 of 10 ran in full."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffusion_accel.cache import summary

    pipe = build_tiny("sd")
    sibling = StableDiffusionPipeline(**(pipe.components | {"scheduler": DDIMScheduler.from_config(pipe.scheduler.config)}))
    for each in (pipe, sibling):
        each.set_progress_bar_config(disable=True)
    enable_cache(pipe, CalibratedCacheConfig(full_steps=(0, 1, 4, 7), num_inference_steps=10))
    for runner, steps in ((sibling, 10), (pipe, 4), (sibling, 10)):
        runner(**tiny_call_kwargs("sd", steps=steps))
    assert [record["step"] for record in summary(pipe)["steps"] if record["computed"]] == [0, 1, 4, 7]


def test_a_schedule_for_a_pipeline_that_starts_mid_schedule_spends_its_budget_on_steps_that_run():
    """img2img at strength 0.5 of 10 steps runs steps 5..9; the search placed its full steps over all ten
    ((0, 6, 7, 8, 9)): every step that ran was computed, nothing was cached. At other step counts the schedule was
    resampled over the whole trajectory, its full steps mostly on steps the call skips."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffusion_accel.cache import summary

    img2img = StableDiffusionImg2ImgPipeline(**build_tiny("sd").components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = {"image": image, "strength": 0.5, "height": 32, "width": 32}
    schedule = calibrate_schedule(img2img, ["a red bicycle"], budget=0.5, num_inference_steps=10, max_passes=1,
                                  **kwargs)
    assert schedule.first_step == 5 and CalibratedCacheConfig.from_dict(schedule.to_dict()) == schedule
    enable_cache(img2img, schedule)
    for steps, runs, full in ((10, 5, 2), (20, 10, 4), (40, 20, 8)):  # other step counts: the share of steps that
        img2img("a red bicycle", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
        computed = [record["computed"] for record in summary(img2img)["steps"]]  # run (1 of 20 at 40 steps until
        assert len(computed) == runs and computed.count(True) == full  # session 45: resampled over all 40)


def test_a_mid_schedule_calibration_is_resampled_for_calls_of_its_step_count_that_start_elsewhere():
    """At the calibrated step count a call starting earlier ran the searched positions as they stood: text-to-image
    on the shared UNet computed (0, 5, 7) of 10 (steps 1-4 reused step 0's features), img2img at strength 0.8
    reused step 2's at steps 3-4; resample=False did not refuse."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffusion_accel.cache import summary
    from diffusion_accel.cache.apply import running_plan

    pipe = build_tiny("sd")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    schedule = CalibratedCacheConfig(full_steps=(0, 5, 7), num_inference_steps=10, first_step=5)
    enable_cache(pipe, schedule)
    for runner, kwargs, first in ((pipe, {}, 0), (img2img, {"image": image, "strength": 0.8}, 2),
                                  (img2img, {"image": image, "strength": 0.5}, 5)):
        runner("a red bicycle", num_inference_steps=10, height=32, width=32, **kwargs)
        computed = [record["step"] for record in summary(pipe)["steps"] if record["computed"]]
        assert computed == sorted(running_plan(schedule, 10, first)[0])
        assert len(computed) == round(0.4 * (10 - first))  # the calibrated share (2 of the 5 steps it ran)
    assert computed == [5, 7]  # the calibrated start: the searched positions
    remove_cache(pipe)
    enable_cache(pipe, schedule.with_(resample=False))
    with pytest.raises(ValueError, match="calibrated on calls starting at step 5 of 10 .* this call starts at step 0"):
        pipe("a red bicycle", num_inference_steps=10, height=32, width=32)


def test_a_mid_schedule_calibration_resamples_its_partial_steps_over_the_steps_that_run_too():
    from diffusion_accel.cache.apply import running_plan

    config = CalibratedCacheConfig(full_steps=(0, 5, 7), num_inference_steps=10, partial_steps=((8, 1),), first_step=5)
    assert running_plan(config, 10, 5) == (frozenset({5, 7}), {8: 1})
    full, partial = running_plan(config, 20, 10)
    assert min(full) == 10 and len(full) == 4 and len(partial) == 2 and min(partial) > 10
    with pytest.raises(ValueError, match="calibrated for 10 denoiser steps"):
        running_plan(config.with_(resample=False), 20, 10)
    with pytest.raises(ValueError, match="first_step must be below num_inference_steps=10"):
        config.with_(first_step=10)


def test_a_schedule_under_other_timesteps_of_the_same_length_follows_the_noise_levels_or_is_refused():
    """Only the step count was compared: under another scheduler / spacing of as many steps the calibrated
    positions were reused silently, and resample=False did not refuse (fashion-flux, default -> Karras
    sigmas: 24.6 dB vs 33.4 recalibrated)."""
    import diffusers

    from diffusion_accel.cache import summary
    from diffusion_accel.cache.apply import steps_at_noise_levels

    pipe = build_tiny("sd")
    pipe.set_progress_bar_config(disable=True)
    size = {"height": 32, "width": 32}
    config = calibrate_schedule(pipe, ["a cat"], budget=0.5, num_inference_steps=6, guidance_scale=1.0, **size)
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    assert config.timesteps == tuple(float(t) for t in scheduler.timesteps)
    assert CalibratedCacheConfig.from_dict(config.to_dict()) == config  # saved in artifacts
    config = config.with_(full_steps=(0, 2, 4))
    trailing = diffusers.DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    trailing.set_timesteps(6)  # starts elsewhere (999, not 831) but spaced alike: the positions stay
    assert steps_at_noise_levels(config.with_(resample=False), trailing.timesteps.tolist()) == [0, 2, 4]
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.scheduler.set_timesteps(6)
    shifted = pipe.scheduler.timesteps.tolist()
    assert shifted != list(config.timesteps)
    expected = steps_at_noise_levels(config, shifted)
    assert expected != list(config.full_steps)  # nearest noise levels sit at other positions
    enable_cache(pipe, config)
    pipe(**tiny_call_kwargs("sd", steps=6), guidance_scale=1.0)
    assert [record["step"] for record in summary(pipe)["steps"] if record["computed"]] == expected
    enable_cache(pipe, config.with_(resample=False))
    with pytest.raises(ValueError, match=r"calibrated on timesteps .* \(another scheduler, sigmas or spacing, or a resolution"):
        pipe(**tiny_call_kwargs("sd", steps=6), guidance_scale=1.0)


def test_schedule_timesteps_are_checked():
    with pytest.raises(ValueError, match="timesteps must hold 3 finite values"):
        CalibratedCacheConfig((0, 2), 3, timesteps=(999.0, 500.0))
    assert CalibratedCacheConfig((0, 2), 3, timesteps=[999, 500, 1]).timesteps == (999.0, 500.0, 1.0)


def test_a_shifted_schedule_that_keeps_every_full_step_in_place_is_not_refused():
    """Flux-style dynamic shifting moves every timestep a little with the resolution (0.9% from 16 to 32 px):
    with resample=False that was refused, though the full steps stay where they were."""
    from diffusion_accel.cache.apply import steps_at_noise_levels

    config = CalibratedCacheConfig((0, 2, 4), 6, resample=False, timesteps=(1000, 888, 750, 583, 375, 125))
    assert steps_at_noise_levels(config, [1000, 889, 752, 586, 378, 127]) == [0, 2, 4]
    with pytest.raises(ValueError, match="sit at other positions"):
        steps_at_noise_levels(config, [1000, 950, 900, 750, 500, 250])
    assert steps_at_noise_levels(config.with_(resample=True), [1000, 950, 900, 750, 500, 250]) == [0, 3, 4]


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_sibling_with_a_scheduler_of_its_own_maps_and_refuses_like_the_pipeline(family):
    """A ``from_pipe`` sibling's calls are placed by its own schedule: the calibrated full steps stayed at their
    positions (not the nearest noise levels) and resample=False never refused, unlike the same scheduler on the
    pipeline itself (until session 48)."""
    import diffusers
    from diffusers import FluxPipeline, StableDiffusionPipeline

    from diffusion_accel.cache import summary
    from diffusion_accel.cache.configs import RouterCacheConfig

    pipe, steps, full = build_tiny(family), *((8, (0, 3, 6)) if family == "flux" else (6, (0, 2, 4)))
    pipe.set_progress_bar_config(disable=True)
    if family == "sd":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    base_scheduler = pipe.scheduler
    base_scheduler.set_timesteps(steps)
    calibrated_on = tuple(base_scheduler.timesteps.tolist())
    configs = [CalibratedCacheConfig(full, steps, timesteps=calibrated_on)]
    if family == "flux":
        every = (0, 1, 2, 3)
        blocks = (every,) + tuple(every if step in (3, 6) else (0,) for step in range(1, steps))
        configs.append(RouterCacheConfig(blocks, 4, timesteps=calibrated_on))

    def karras():
        karras_class = type(base_scheduler) if family == "flux" else diffusers.EulerDiscreteScheduler
        return karras_class.from_config(base_scheduler.config, use_karras_sigmas=True)

    def full_steps(runner):
        runner(**tiny_call_kwargs(family, steps))
        return [record["step"] for record in summary(pipe)["steps"] if record["computed"]]

    pipeline_class = FluxPipeline if family == "flux" else StableDiffusionPipeline
    sibling = pipeline_class.from_pipe(pipe, scheduler=karras())
    sibling.set_progress_bar_config(disable=True)
    for config in configs:
        pipe.scheduler = base_scheduler
        enable_cache(pipe, config)
        from_sibling = full_steps(sibling)
        pipe.scheduler = karras()
        assert from_sibling == full_steps(pipe) and from_sibling != list(full)
        remove_cache(pipe)
    pipe.scheduler = base_scheduler
    enable_cache(pipe, configs[0].with_(resample=False))
    with pytest.raises(ValueError, match="resample"):
        sibling(**tiny_call_kwargs(family, steps))


def test_a_schedule_searched_from_mid_schedule_keeps_its_full_steps_on_the_steps_a_call_runs():
    """Karras sigmas moved a full step of a strength-0.4 schedule ((0, 6, 7, 8) of 10) onto step 5, which the call
    never runs: 2 of its 3 full steps computed, 0.043 off uncached instead of 0.015."""
    from diffusion_accel.cache.apply import steps_at_noise_levels

    config = CalibratedCacheConfig((0, 6, 7, 8), 10, first_step=6,
                                   timesteps=(901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0))
    karras = [901.0, 815.0, 711.0, 582.0, 427.0, 260.0, 121.0, 40.0, 9.0, 1.0]
    mapped = steps_at_noise_levels(config, karras)
    assert mapped[:2] == [0, 6] and len(mapped) == 4 and min(mapped[1:]) >= 6
    assert steps_at_noise_levels(config, list(config.timesteps)) == [0, 6, 7, 8]
