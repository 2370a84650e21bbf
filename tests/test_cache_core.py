"""Cache core: analytic dummy blocks, schedules, bad configs, removal, save/load."""

import pytest
import torch

import diffusion_accel as da
from cache_toys import Offset, Toy
from diffusion_accel.cache import (BlockCacheConfig, CalibratedCacheConfig, DeepCacheConfig, EncoderPropagationConfig,
                                   FirstBlockCacheConfig, TeaCacheConfig, calibrated_steps,
                                   enable_cache, nonuniform_full_steps, remove_cache,
                                   resample_full_steps, summary, uniform_full_steps)
from diffusion_accel.cache.policies import SchedulePolicy
from diffusion_accel.cache.session import SESSION_ATTR, end_session, get_session, start_session
from diffusion_accel.cache.stack import StackBlockHook
from diffusion_accel.cache.streams import BlockIO
from diffusion_accel.cache.unet_branch import CachedOutputHook, ModelHookReady
from diffusion_accel.hooks import get_tracker
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs


def _toy_session(toy: Toy, interval: int):
    policy = SchedulePolicy(lambda n: uniform_full_steps(n, interval), interval)
    return start_session(None, toy, DeepCacheConfig(interval=interval), "toy", policy)


def test_skipped_step_returns_cached_output_and_computed_step_the_new_one():
    toy = Toy(Offset(40.0), Offset(0.0))
    session = _toy_session(toy, interval=2)
    session.cached_blocks, session.total_blocks = ("blocks.0",), 2
    session.hook(toy.blocks[0], CachedOutputHook(session, "blocks.0"))
    session.hook(toy.blocks[1], ModelHookReady(session))
    outputs = [float(toy(None, t)) for t in (4, 1, 1)]  # timesteps descend, as in every sampler
    assert outputs == [44.0, 44.0, 41.0]  # step 0 computed, step 1 reused, step 2 computed
    assert [r.computed for r in session.records] == [True, False, True]
    end_session(session)
    assert float(toy(None, 4)) == 44.0 and not hasattr(toy.blocks[0], "_diffusers_hook")


def test_stack_residual_is_added_to_the_fresh_input_on_skipped_steps():
    toy = Toy(Offset(1.0), Offset(0.0, scale=2.0))
    session = _toy_session(toy, interval=2)
    io = BlockIO("hidden_states", "encoder_hidden_states", 0, None, ("hidden_states",))
    session.cached_blocks, session.total_blocks = ("blocks.0", "blocks.1"), 2
    session.hook(toy.blocks[0], StackBlockHook(session, "blocks.0", io, 0, last=False))
    session.hook(toy.blocks[1], StackBlockHook(session, "blocks.1", io, 1, last=True))
    # step 0: (10 + 1) * 2 = 22, residual 12; step 1 reuses: 5 + 12 = 17; step 2: (5 + 1) * 2 = 12
    assert [float(toy(None, t)) for t in (10, 5, 5)] == [22.0, 17.0, 12.0]
    end_session(session)
    assert get_tracker(toy) is None


def test_stack_residual_counts_what_the_loop_adds_between_blocks_once():
    """ControlNet residuals added by the denoiser's loop between blocks are in the cached residual: a
    reuse step adds it to the stack input, not to the last block's input (which holds them again)."""
    toy = Toy(Offset(1.0), Offset(0.0, scale=2.0), between=100.0)
    session = _toy_session(toy, interval=2)
    io = BlockIO("hidden_states", None, 0, None, ("hidden_states",))
    session.cached_blocks, session.total_blocks = ("blocks.0", "blocks.1"), 2
    session.hook(toy.blocks[0], StackBlockHook(session, "blocks.0", io, 0, last=False))
    session.hook(toy.blocks[1], StackBlockHook(session, "blocks.1", io, 1, last=True))
    # step 0: ((10 + 1) + 100) * 2 = 222 (+ 100 after), residual 212; step 1 reuses: 5 + 212 (+ 100);
    # step 2: ((5 + 1) + 100) * 2 (+ 100). Adding the residual to the last block's input gave 417.
    assert [float(toy(None, t)) for t in (10, 5, 5)] == [322.0, 317.0, 312.0]
    end_session(session)


def test_schedules():
    assert uniform_full_steps(7, 3) == [0, 3, 6]
    steps = nonuniform_full_steps(50, 3)
    assert len(steps) == 17 and steps[0] == 0 and len(set(steps)) == 17
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert min(gaps) < 3 < max(gaps)  # dense near the center, sparse far from it
    assert nonuniform_full_steps(4, 1) == [0, 1, 2, 3]


def test_the_nonuniform_schedule_is_deepcaches():
    """DeepCache's sample_from_quad_center(50, n, center=15, pow=1.4) at intervals 3 / 5 / 10 (values from the
    reference implementation); our own curve through both ends made the last step full and moved the early ones
    (0, 4, 7, ..., 49 at interval 3) until session 53. It matched the reference on 42,749 settings checked then."""
    assert nonuniform_full_steps(50, 3) == [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46]
    assert nonuniform_full_steps(50, 5) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert nonuniform_full_steps(50, 10) == [0, 9, 17, 26, 37]
    assert nonuniform_full_steps(27, 9, center=0.0, power=2.0) == [0, 3, 12]  # real arithmetic from center 0
    assert nonuniform_full_steps(20, 2, center=0.1, power=6.0) == [0, 1, 2, 3, 4, 6, 8, 11, 13, 16]  # lowered to 1.74


def test_calibrated_schedule_resampling_and_refusal():
    config = CalibratedCacheConfig(full_steps=(0, 2, 5, 10, 20, 40), num_inference_steps=50)
    assert calibrated_steps(config, 50) == [0, 2, 5, 10, 20, 40]
    resampled = calibrated_steps(config, 25)
    assert resampled[0] == 0 and len(resampled) == 3 and max(resampled) < 25
    assert len(resample_full_steps(config.full_steps, 50, 100)) == 12
    assert len(calibrated_steps(CalibratedCacheConfig((0, 3, 6), 10), 25)) == 7  # 7.5: within the budget, floor
    assert len(resample_full_steps((0, 3, 6), 10, 25, within_budget=True)) == 7  # (round() gave 8, and 12 for 5)
    assert len(resample_full_steps((0, 2, 4, 6, 8), 10, 25, within_budget=True)) == 12
    assert len(resample_full_steps((0, 2, 4, 6, 8), 10, 25)) == 13  # key steps (no budget): nearest, halves up
    from diffusion_accel.cache.encoder import key_steps

    keys = EncoderPropagationConfig(key_steps=(0, 1, 2, 3, 5, 10, 15, 25, 35), num_inference_steps=50)
    assert len(key_steps(keys, 15)) == 3 and len(key_steps(keys, 10)) == 2  # a floor kept 2 and 1 (11.6 dB)
    strict = CalibratedCacheConfig(full_steps=(0, 2), num_inference_steps=50, resample=False)
    with pytest.raises(ValueError, match="calibrated for 50 denoiser steps per call; this call runs 20"):
        calibrated_steps(strict, 20)


@pytest.mark.parametrize("make, match", [
    (lambda: DeepCacheConfig(interval=0), "interval must be an int >= 1, got 0"),
    (lambda: DeepCacheConfig(schedule="cosine"), "schedule must be one of"),
    (lambda: DeepCacheConfig(branch=-1), "branch must be an int >= 0"),
    (lambda: BlockCacheConfig(interval=0), "interval must be an int >= 1"),
    (lambda: FirstBlockCacheConfig(threshold=-0.1), "threshold must be a finite number >= 0"),
    (lambda: TeaCacheConfig(threshold=-1), "threshold must be a finite number >= 0"),
    (lambda: TeaCacheConfig(coefficients=()), "coefficients must be"),
    (lambda: CalibratedCacheConfig(full_steps=(1, 2), num_inference_steps=4), "must contain step 0"),
    (lambda: CalibratedCacheConfig(full_steps=(0,), num_inference_steps=4, budget=1.5), "budget"),
    # session 27: each of these was accepted (and misbehaved) or a bare TypeError / hang
    (lambda: DeepCacheConfig(schedule="non-uniform", power=float("inf")), "power must be a finite number"),
    (lambda: DeepCacheConfig(center=True), "center must be a fraction"),
    (lambda: TeaCacheConfig(coefficients=(float("nan"),)), "coefficients must be a non-empty sequence of finite"),
    (lambda: TeaCacheConfig(coefficients=1.0), "coefficients must be"),
    # session 31: accepted, then every step after the first was reused
    (lambda: TeaCacheConfig(coefficients=(-1.0,)), "polynomial <= 0 for every relative change"),
    (lambda: TeaCacheConfig(coefficients=(0.0, 0.0)), "polynomial <= 0 for every relative change"),
    (lambda: CalibratedCacheConfig(full_steps=(0, 1.7), num_inference_steps=4), "full_steps must be a sequence of int"),
    (lambda: CalibratedCacheConfig(full_steps=(0, True), num_inference_steps=4), "full_steps must be a sequence"),
    (lambda: CalibratedCacheConfig(full_steps=0, num_inference_steps=4), "full_steps must be a sequence"),
    (lambda: CalibratedCacheConfig(full_steps=(0,), num_inference_steps=4, resample="no"), "resample must be True"),
    (lambda: EncoderPropagationConfig(key_steps=3, num_inference_steps=4), "key_steps must be a sequence"),
    (lambda: EncoderPropagationConfig(interval=2, num_inference_steps=50), "without key_steps it has no effect"),
    (lambda: EncoderPropagationConfig(noise_injection=float("inf")), "noise_injection must be a finite"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _assert_no_cache_left(pipe, denoiser):
    assert not hasattr(denoiser, SESSION_ATTR) and get_tracker(denoiser) is None
    leftovers = [name for name, module in denoiser.named_modules()
                 if hasattr(module, "_diffusers_hook") or "forward" in vars(module)]
    assert leftovers == []
    marks = [name for name in vars(denoiser) if name.startswith("_diffusion_accel_") and "call_defaults" not in name]
    guards = [name for owner in (pipe, denoiser) for name, value in vars(owner).items() if callable(value)
              and type(value).__name__ == "GuardedMethod"]
    assert marks == [] and guards == []  # no technique left: the objects are as they were
    assert "cache" not in da.artifact.applied_techniques(pipe)


@pytest.mark.parametrize("family, config, match", [
    ("sd", DeepCacheConfig(branch=99), r"valid branch ids are 0\.\.5"),
    ("sd", FirstBlockCacheConfig(), "no transformer block stacks"),
    ("flux", DeepCacheConfig(), "no UNet skip branches"),
    ("flux", CalibratedCacheConfig(full_steps=(0, 2), num_inference_steps=4, branch=3), "leave branch=0"),
])
def test_model_dependent_errors_leave_the_pipeline_unchanged(family, config, match):
    pipe = build_tiny(family)
    denoiser = da.arch.find_denoiser(pipe)[1]
    with pytest.raises(ValueError, match=match):
        enable_cache(pipe, config)
    _assert_no_cache_left(pipe, denoiser)


def test_the_deepest_branch_of_a_unet_without_a_mid_block_is_refused():
    """Nothing runs between its skip's producer and consumer, so it cached nothing while the summary counted
    reused calls."""
    from diffusers import UNet2DConditionModel

    pipe = build_tiny("sd")
    pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "mid_block_type": None}).eval()
    deepest = len(da.get_adapter(pipe).cache_points()) - 1
    with pytest.raises(ValueError, match=rf"branch {deepest} caches nothing .*no mid block.*\(0\.\.{deepest - 1}\)"):
        enable_cache(pipe, DeepCacheConfig(interval=2, branch=deepest))
    _assert_no_cache_left(pipe, pipe.unet)
    enable_cache(pipe, DeepCacheConfig(interval=2, branch=deepest - 1))
    pipe(**tiny_call_kwargs("sd", steps=4))
    assert da.cache_summary(pipe)["block_compute_fraction"] < 1


def test_partial_steps_of_a_unet_without_a_mid_block_never_use_its_empty_deepest_branch():
    """level_range offered it: enable_cache failed with an IndexError and search_blocks tried it."""
    from diffusers import UNet2DConditionModel

    from diffusion_accel.cache.calibrated import candidate_levels

    pipe = build_tiny("sd")
    pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "mid_block_type": None}).eval()
    deepest = len(da.get_adapter(pipe).cache_points()) - 1
    assert deepest not in candidate_levels(pipe, 0) and deepest - 1 in candidate_levels(pipe, 0)
    with pytest.raises(ValueError, match=rf"partial step 1 has level {deepest}.*accepted levels here are 1\.\."):
        enable_cache(pipe, CalibratedCacheConfig((0, 2), 4, partial_steps=((1, deepest),)))
    _assert_no_cache_left(pipe, pipe.unet)
    enable_cache(pipe, CalibratedCacheConfig((0, 2), 4, partial_steps=((1, deepest - 1),)))
    pipe(**tiny_call_kwargs("sd", steps=4))


def test_unsupported_config_type_and_unsupported_pipeline():
    pipe = build_tiny("sd")
    with pytest.raises(TypeError, match="DeepCacheConfig"):
        enable_cache(pipe, {"interval": 3})
    with pytest.raises(TypeError, match="supported denoisers"):
        enable_cache(object(), DeepCacheConfig())


def test_remove_cache_is_bit_identical_and_leaves_no_hooks():
    pipe = build_tiny("sd")
    base = pipe(**tiny_call_kwargs("sd", steps=4)).images
    enable_cache(pipe, DeepCacheConfig(interval=2, branch=1))
    cached = pipe(**tiny_call_kwargs("sd", steps=4)).images
    assert not torch.equal(cached, base)
    remove_cache(pipe)
    assert torch.equal(pipe(**tiny_call_kwargs("sd", steps=4)).images, base)
    _assert_no_cache_left(pipe, pipe.unet)



def test_a_deep_copy_of_a_cached_denoiser_compiled_in_place_runs_its_own_weights():
    """The copy kept module.compile()'s binding to the original (torch's __getstate__ drops it; copying __dict__
    did not): zeroing the copy's output layer changed nothing, it ran the original."""
    import copy

    from diffusion_accel.eval.pipes import compile_denoiser
    from diffusion_accel.uncompiled import runs_compiled

    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=2))
    compile_denoiser(pipe, regional=False, backend="eager")
    reference = pipe(**tiny_call_kwargs("sd", steps=3)).images
    twin = copy.deepcopy(pipe)
    assert "_compiled_call_impl" not in vars(twin.unet) and not runs_compiled(twin)
    with torch.no_grad():
        twin.unet.conv_out.weight.zero_()
        twin.unet.conv_out.bias.zero_()
    assert not torch.equal(twin(**tiny_call_kwargs("sd", steps=3)).images, reference)
    assert torch.equal(pipe(**tiny_call_kwargs("sd", steps=3)).images, reference)


@pytest.mark.parametrize("family, config", [("sd", DeepCacheConfig(interval=2, branch=1)),
                                            ("pixart", BlockCacheConfig(interval=2))])
def test_a_deep_copy_of_a_cached_pipeline_runs_its_own_weights_and_state(family, config):
    """The copy kept diffusers' hooked-forward closures: it ran the original's hooks and weights (zeroing
    the copy's output layer changed nothing) and shared its cache state."""
    import copy

    pipe = build_tiny(family)
    enable_cache(pipe, config)
    kwargs = lambda: tiny_call_kwargs(family, steps=4)  # noqa: E731 (a fresh generator per call)
    reference = pipe(**kwargs()).images
    twin = copy.deepcopy(pipe)
    twin_denoiser = twin.unet if family == "sd" else twin.transformer
    assert get_tracker(twin_denoiser).pipeline is twin and summary(twin)["enabled"]
    nested = {}

    def run_twin_inside(step):
        if step == 1:
            nested["images"] = twin(**kwargs()).images

    callbacks = {"sd": {"callback_on_step_end": lambda pipeline, step, timestep, kw: run_twin_inside(step) or kw},
                 "pixart": {"callback": lambda step, timestep, latents: run_twin_inside(step)}}
    assert torch.equal(pipe(**kwargs(), **callbacks[family]).images, reference)
    assert torch.equal(nested["images"], reference)
    output_layer = twin_denoiser.conv_out if family == "sd" else twin_denoiser.proj_out
    with torch.no_grad():
        output_layer.weight.zero_()
        output_layer.bias.zero_()
    assert not torch.equal(twin(**kwargs()).images, reference)
    assert torch.equal(pipe(**kwargs()).images, reference)
    remove_cache(twin)
    _assert_no_cache_left(twin, twin_denoiser)


def test_pickling_a_cached_denoiser_is_a_clear_error_and_gradients_flow_through_reused_steps():
    import copy
    import pickle

    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
    with pytest.raises(TypeError, match=r"cannot pickle or copy.copy this UNet2DConditionModel: .*da.save"):
        pickle.dumps(pipe.unet)
    with pytest.raises(TypeError, match=r"copy.copy this .*a shallow copy would share the hooks"):
        copy.copy(pipe.unet)
    pipe.scheduler.set_timesteps(3)
    context = torch.randn(1, 4, pipe.unet.config.cross_attention_dim)
    for timestep in pipe.scheduler.timesteps:  # classifier guidance: a backward per step, reused steps too
        sample = torch.randn(1, 4, 8, 8, requires_grad=True)
        pipe.unet(sample, timestep, context).sample.sum().backward()
        assert sample.grad is not None and torch.isfinite(sample.grad).all()
    assert [record["computed"] for record in summary(pipe)["steps"]] == [True, False, False]
    remove_cache(pipe)
    pickle.loads(pickle.dumps(pipe.unet))

def test_enable_twice_replaces_the_cache():
    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=2))
    enable_cache(pipe, DeepCacheConfig(interval=3))
    pipe(**tiny_call_kwargs("sd", steps=6))
    assert [r["computed"] for r in summary(pipe)["steps"]] == [True, False, False, True, False, False]
    remove_cache(pipe)
    _assert_no_cache_left(pipe, pipe.unet)


def test_summary_counts_per_step():
    pipe = build_tiny("sd")
    assert summary(pipe) == {"enabled": False}
    enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
    pipe(**tiny_call_kwargs("sd", steps=5))
    info = summary(pipe)
    assert (info["denoiser_calls"], info["full_calls"], info["reused_calls"]) == (5, 2, 3)
    reused = [s for s in info["steps"] if not s["computed"]]
    assert all(s["reused_blocks"] == info["cached_blocks"] for s in reused)
    assert "2 full / 3 reused of 5 denoiser calls" in summary(pipe, as_text=True)


def test_save_and_load_carry_the_cache_config(tmp_path):
    pipe = build_tiny("dit")
    config = CalibratedCacheConfig(full_steps=(0, 1, 3), num_inference_steps=6)
    enable_cache(pipe, config)
    expected = pipe(**tiny_call_kwargs("dit", steps=6)).images
    da.save(pipe, tmp_path / "art")
    base = build_tiny("dit")
    da.load(base, tmp_path / "art")
    assert da.cache.cache_config(base) == config
    assert torch.equal(base(**tiny_call_kwargs("dit", steps=6)).images, expected)


def test_teacache_rescaling_never_shrinks_the_accumulated_change():
    """A fitted polynomial negative near 0 (a degree-4 fit to 6 points gave poly(0) = -1040) made the sum
    fall forever: every middle step was reused."""
    from diffusion_accel.cache.policies import TeaCachePolicy

    policy = TeaCachePolicy(threshold=0.1, coefficients=(1.0, -0.5))  # negative below change 0.5
    assert policy.rescale(0.2) == 0.0 and policy.rescale(1.0) == 0.5


def _decisions(policy, values, num_steps):
    """The policy's compute (True) / reuse (False) per step for signals ``torch.full((4,), value)``: relative L1
    changes between consecutive values are exact (|v1 - v0| / |v0|)."""
    state = {}
    return [policy.should_compute(step, num_steps, state, torch.full((4,), value)) for step, value in enumerate(values)]


def test_teacache_accumulates_rescaled_changes_and_always_computes_the_first_and_last_step():
    """Nothing checked the step-by-step sequence: never forcing the last step passed every test (session 32)."""
    from diffusion_accel.cache.policies import TeaCachePolicy

    values = [1.0, 1.1, 1.21, 1.331, 1.4641, 1.61051, 1.771561]  # each 10% above the one before
    assert _decisions(TeaCachePolicy(0.25, None), values, 7) == [True, False, False, True, False, False, True]
    assert _decisions(TeaCachePolicy(0.25, None), values[:5], 5) == [True, False, False, True, True]  # last forced
    doubled = TeaCachePolicy(0.25, (2.0, 0.0))  # the fitted polynomial 2x: each change counts 0.2
    assert _decisions(doubled, values, 7) == [True, False, True, False, True, False, True]


def test_first_block_cache_reuses_while_the_head_residual_moved_less_than_the_threshold_since_the_last_full_step():
    """The change is measured against the last computed step's signal, not the previous step's; a doubled
    threshold passed every test before (session 32)."""
    from diffusion_accel.cache.policies import FirstBlockPolicy

    values = [1.0, 1.06, 1.099, 1.2, 1.25, 1.3]
    # 1.06 and 1.099 are within 10% of 1.0; 1.2 is not (computes, new reference); 1.25 and 1.3 are within 10% of it
    assert _decisions(FirstBlockPolicy(0.1), values, 6) == [True, False, False, True, False, False]
    # at 5%: 1.06 computes (new reference); 1.099 is 3.7% above it; 1.2 computes; 1.25 is 4.2%, 1.3 8.3% above 1.2
    assert _decisions(FirstBlockPolicy(0.05), values, 6) == [True, True, False, True, False, True]


def test_a_teacache_fit_negative_on_the_seen_range_is_refused(monkeypatch):
    import numpy

    from diffusion_accel.cache import teacache_fit

    changes = [0.136, 0.14, 0.145, 0.15, 0.155, 0.16, 0.162, 0.164, 0.166, 0.168]
    noisy = [0.4, 0.01, 0.0, 0.01, 0.3, 0.3, 0.01, 0.0, 0.01, 0.4]  # the degree-4 fit dips to -0.09 among them
    monkeypatch.setattr(teacache_fit, "teacache_samples", lambda *a, **k: (changes, noisy))
    with pytest.raises(ValueError, match=r"the degree-4 fit to 10 points is negative on the changes seen, \[0.136, "):
        teacache_fit.fit_teacache_coefficients(None, ["a cat"], degree=4)
    # y = 2x fitted on Python 3.12's numpy gave an intercept of -1.0e-16: rounding, not a negative fit
    teacache_fit._check_non_negative(numpy.array([2.0, -1.012e-16]), (0.0, 1.0), 1, 10)
    # negative only below the smallest change seen (where the policy clamps at 0): a usable fit (session 49)
    teacache_fit._check_non_negative(numpy.array([1.157, -0.0428]), (0.164, 1.184), 1, 10)
    with pytest.raises(ValueError, match="only 10 calibration points for a degree-5 fit"):
        teacache_fit.fit_teacache_coefficients(None, ["a cat"], degree=5)
    for steps in (0, 1, 2.0):  # 0 was a ZeroDivisionError inside FluxPipeline (session 31)
        with pytest.raises(ValueError, match=f"num_inference_steps must be an int >= 2 .*got {steps!r}"):
            teacache_fit.fit_teacache_coefficients(None, ["a cat"], num_inference_steps=steps)


def test_schedule_and_teacache_fits_take_numpy_numbers(monkeypatch):
    """np.int64 degree / max_passes were "must be an int >= 1, got np.int64(1)" (session 32)."""
    import numpy as np

    from diffusion_accel.cache import calibrate_schedule, teacache_fit
    from diffusion_accel.testing.tiny import build_tiny

    changes = [0.1 * i for i in range(1, 11)]
    monkeypatch.setattr(teacache_fit, "teacache_samples", lambda *a, **k: (changes, [2 * c for c in changes]))
    fitted = teacache_fit.fit_teacache_coefficients(None, ["a"], num_inference_steps=np.int64(6), degree=np.int64(1),
                                                    seed=np.int64(0))
    assert fitted == pytest.approx((2.0, 0.0), abs=1e-9)
    config = calibrate_schedule(build_tiny("sd"), ["a"], budget=np.float32(0.5), num_inference_steps=np.int64(4),
                                seed=np.int64(1), max_passes=np.int64(1), branch=np.int64(0), height=32, width=32)
    assert len(config.full_steps) == 2 and type(config.budget) is float


@pytest.mark.parametrize("power", [1e6, float("inf"), 1.0 + 1e-9])
def test_nonuniform_schedule_with_a_huge_power_ends(power):
    """Lowering the power 0.02 at a time from 1e6 took 5e7 tries (inf never ended): bounded, then even spacing."""
    steps = nonuniform_full_steps(10, 3, power=power)
    assert len(steps) == 4 and steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] < 10


def test_a_denoiser_looped_at_one_position_keeps_a_bounded_state(monkeypatch):
    """Direct calls repeating one scheduler position each got a context of their own ('default#k', with its
    cached features) and a step record, without end until the next pipeline call (session 32 soak probe)."""
    from diffusion_accel.cache import session as session_module
    from diffusion_accel.hooks import MAX_REPEAT_CONTEXTS

    monkeypatch.setattr(session_module, "MAX_RECORDS", 5)
    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=2))
    pipe(**tiny_call_kwargs("sd", steps=4))
    unet, tracker = pipe.unet, get_tracker(pipe.unet)
    x, text = torch.randn(2, 4, 4, 4), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        for _ in range(3 * MAX_REPEAT_CONTEXTS):
            unet(x, pipe.scheduler.timesteps[0], encoder_hidden_states=text)
    assert len(tracker.client_states("cache")) == MAX_REPEAT_CONTEXTS + 1
    with torch.no_grad():
        for _ in range(12):  # a fixed timestep that is no view of the schedule: one trajectory that never resets
            unet(x, torch.tensor(500), encoder_hidden_states=text)
    assert len(get_session(unet).records) == 5
    pipe(**tiny_call_kwargs("sd", steps=4))
    assert summary(pipe)["denoiser_calls"] == 4


def test_pipelines_reading_attention_maps_inside_the_unet_are_refused_or_computed_not_crashed():
    """SAG reads the mid block's self-attention map and Attend-and-Excite back-propagates through cross-attention
    maps: on a reuse step those modules do not run, and both crashed deep in diffusers (a shape error; autograd's
    "not used in the graph") until session 49. enable_cache refuses them; a from_pipe sibling of a cached pipeline
    computes every block of its calls (uncached images, a warning), and the cached pipeline goes on caching."""
    from diffusers import StableDiffusionAttendAndExcitePipeline, StableDiffusionSAGPipeline

    sd = build_tiny("sd")
    components = {name: part for name, part in sd.components.items() if name != "image_encoder"}
    for cls in (StableDiffusionSAGPipeline, StableDiffusionAttendAndExcitePipeline):
        with pytest.raises(ValueError, match=f"enable_cache: {cls.__name__} reads attention maps"):
            da.enable_cache(cls(**components), DeepCacheConfig(interval=2))
    assert get_tracker(sd.unet) is None  # nothing installed
    sag, excite = StableDiffusionSAGPipeline.from_pipe(sd), StableDiffusionAttendAndExcitePipeline.from_pipe(sd)
    sag_kwargs, excite_kwargs = {"sag_scale": 0.75}, {"token_indices": [2], "max_iter_to_alter": 3}
    uncached = [pipe(**tiny_call_kwargs("sd", steps=4), **kwargs).images
                for pipe, kwargs in ((sd, {}), (sag, sag_kwargs), (excite, excite_kwargs))]
    da.enable_cache(sd, DeepCacheConfig(interval=2))
    cached = sd(**tiny_call_kwargs("sd", steps=4)).images
    assert not torch.equal(cached, uncached[0])
    for pipe, kwargs, expected in ((sag, sag_kwargs, uncached[1]), (excite, excite_kwargs, uncached[2])):
        with pytest.warns(UserWarning, match=f"{type(pipe).__name__} reads attention maps .* compute every block"):
            assert torch.equal(pipe(**tiny_call_kwargs("sd", steps=4), **kwargs).images, expected)
        assert all(record["computed"] for record in da.cache_summary(sd)["steps"])
    assert torch.equal(sd(**tiny_call_kwargs("sd", steps=4)).images, cached)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # load refuses by the class, not as a damaged artifact
        da.save(sd, folder)
        with pytest.raises(da.ArtifactError, match="enables a feature cache, which StableDiffusionSAGPipeline cannot"):
            fresh = {name: part for name, part in build_tiny("sd").components.items() if name != "image_encoder"}
            da.load(StableDiffusionSAGPipeline(**fresh), folder)
