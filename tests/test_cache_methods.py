"""Δ-DiT (DeltaCacheConfig), Faster Diffusion encoder propagation (EncoderPropagationConfig),
adapter-provided block streams and caches on torch.compile'd denoisers."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionAdapterPipeline, T2IAdapter
from torch import nn

import diffusion_accel as da
from cache_toys import Offset, Toy
from diffusion_accel.arch import find_denoiser, get_adapter
from diffusion_accel.cache import (FASTER_DIFFUSION_KEY_STEPS, BlockCacheConfig, DeepCacheConfig, DeltaCacheConfig,
                                   EncoderPropagationConfig, FirstBlockCacheConfig, TeaCacheConfig, enable_cache,
                                   remove_cache, summary)
from diffusion_accel.cache.configs import CalibratedCacheConfig, config_from_dict, config_to_dict
from diffusion_accel.cache.delta import DeltaBlockHook, delta_spans
from diffusion_accel.cache.encoder import key_steps
from diffusion_accel.cache.policies import DeltaPolicy
from diffusion_accel.cache.session import SESSION_ATTR, end_session, get_session, start_session
from diffusion_accel.cache.streams import BlockIO
from diffusion_accel.hooks import get_tracker
from diffusion_accel.testing.contract import check_drop_in
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

UNET_FAMILIES = ("sd", "sdxl", "ddpm")
DIT_FAMILIES = ("sd3", "flux", "pixart", "dit")


def _images(pipe, family, steps=6, **overrides):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**(tiny_call_kwargs(family, steps=steps) | overrides)).images


def _arguments(block, args, kwargs):
    """A block call's arguments by parameter name."""
    return inspect.signature(type(block).forward).bind(block, *args, **kwargs).arguments


def _assert_no_cache_left(pipe, denoiser):
    assert not hasattr(denoiser, SESSION_ATTR) and get_tracker(denoiser) is None
    leftovers = [name for name, module in denoiser.named_modules()  # Flux's pipeline leaves an empty registry
                 if getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
                 or module._forward_hooks or module._forward_pre_hooks]
    assert leftovers == []
    assert "cache" not in da.artifact.applied_techniques(pipe)


# ---- Δ-DiT on an analytic toy stack ------------------------------------------------------------


class Trajectory:
    """Stands in for a pipeline: the step tracker reads the trajectory length from its scheduler."""

    def __init__(self, steps: int) -> None:
        self.scheduler = SimpleNamespace(timesteps=torch.arange(steps), num_inference_steps=steps)  # set, as by set_timesteps


def _delta_toy(between: float = 0.0):
    """A 4-block toy stack under Δ-caching (interval 2, boundary at half the trajectory, spans of 2)."""
    toy = Toy(Offset(1.0), Offset(2.0), Offset(0.0, scale=2.0), Offset(3.0), between=between)
    toy.trajectory = Trajectory(4)  # the tracker holds it weakly
    session = start_session(toy.trajectory, toy, DeltaCacheConfig(), "delta_cache", DeltaPolicy(2, 0.5))
    spans = delta_spans(4, 0.5)
    io = BlockIO("hidden_states", None, 0, None, ("hidden_states",))
    session.cached_blocks, session.total_blocks, session.reuse_size = ("b0", "b1", "b2", "b3"), 4, 2
    for i, block in enumerate(toy.blocks):
        session.hook(block, DeltaBlockHook(session, f"blocks.{i}", io, i, i == 3, spans))
    return toy, session


def test_delta_cache_bypasses_the_rear_span_early_and_the_front_span_late():
    toy, session = _delta_toy()
    # full x: front (b0, b1) = x + 3 (delta 3); rear (b2, b3) = 2(x + 3) + 3 (delta x + 6)
    # step 0 t=10 full: 29, rear delta 16 | step 1 t=5 rear reused: (5 + 3) + 16 = 24
    # step 2 t=5 full: 19, front delta 3  | step 3 t=4 front reused: 2 * (4 + 3) + 3 = 17
    assert [float(toy(None, t)) for t in (10, 5, 5, 4)] == [29.0, 24.0, 19.0, 17.0]
    assert [r.reused_blocks for r in session.records] == [0, 2, 0, 2]
    end_session(session)
    assert float(toy(None, 4)) == 17.0 and get_tracker(toy) is None


def test_delta_cache_counts_what_the_loop_adds_between_blocks_once():
    toy, session = _delta_toy(between=100.0)
    # full x: 2x + 609; front delta 103 (b1 out - b0 in), rear delta x + 306 (b3 out - b2 in)
    # step 1 t=5, rear reused: b2 gets 208, returns 208 + 316 via b3, + 100 -> 624 (was 724)
    # step 3 t=4, front reused: 4 + 103 + 100 -> 207 into b2 -> 2 * 207 + 203 = 617 (was 817)
    assert [float(toy(None, t)) for t in (10, 5, 5, 4)] == [629.0, 624.0, 619.0, 617.0]
    end_session(session)


def test_delta_spans_and_policy():
    front, rear = delta_spans(28, 0.25).values()
    assert (front.start, front.stop, rear.start, rear.stop) == (0, 7, 21, 28)
    assert [s.stop - s.start for s in delta_spans(28, 0.001).values()] == [1, 1]
    assert [s.stop - s.start for s in delta_spans(3, 1.0).values()] == [3, 3]
    policy = DeltaPolicy(interval=3, boundary=0.4)
    state: dict = {}
    plan = [(policy.should_compute(step, 10, state), state["span"]) for step in range(10)]
    assert [c for c, _ in plan] == [True, False, False, True, False, False, True, False, False, True]
    assert [s for _, s in plan] == ["rear"] * 4 + ["front"] * 6


# ---- encoder propagation on the tiny SD UNet ----------------------------------------------------
def _record_unet(pipe):
    """Forward hooks recording every UNet call and the mid block / first up block per call."""
    seen = {"calls": [], "mid": [], "temb": [], "skips": []}
    unet = pipe.unet
    handles = [
        unet.register_forward_hook(lambda m, a, k, out: seen["calls"].append((a, k, out[0])), with_kwargs=True),
        unet.mid_block.register_forward_hook(lambda m, a, out: seen["mid"].append(out)),
        unet.up_blocks[0].register_forward_pre_hook(
            lambda m, a, k: seen["temb"].append(k["temb"]) or seen["skips"].append(k["res_hidden_states_tuple"]),
            with_kwargs=True),
    ]
    return seen, handles


def test_encoder_propagation_reuses_the_encoder_and_runs_the_decoder_with_the_current_timestep():
    pipe = build_tiny("sd")
    enable_cache(pipe, EncoderPropagationConfig(interval=2))
    seen, handles = _record_unet(pipe)
    _images(pipe, "sd", steps=4)
    for handle in handles:
        handle.remove()
    mid = seen["mid"]
    assert torch.equal(mid[1], mid[0]) and torch.equal(mid[3], mid[2]) and not torch.equal(mid[2], mid[0])
    assert all(torch.equal(a, b) for a, b in zip(seen["skips"][1], seen["skips"][0]))
    assert not torch.equal(seen["temb"][1], seen["temb"][0])  # decoder sees step 1's timestep
    assert [r["computed"] for r in summary(pipe)["steps"]] == [True, False, True, False]
    remove_cache(pipe)
    for step, expect_equal in ((2, True), (3, False)):  # key step = the full UNet; reused step differs
        args, kwargs, output = seen["calls"][step]
        assert torch.equal(pipe.unet(*args, **kwargs)[0], output) is expect_equal


def test_encoder_propagation_with_a_t2i_adapter_adds_its_residual_once_per_step():
    """The UNet adds T2I-Adapter residuals to a plain down block's output in place (``sample +=``),
    and that output is also the decoder's deepest skip: reuse steps get a fresh copy of the stored
    output, so the residual is added once per step instead of piling up in the cache."""
    base = build_tiny("sd")
    torch.manual_seed(1)
    adapter = T2IAdapter(in_channels=3, channels=[16, 32, 32], num_res_blocks=1, downscale_factor=2).eval()
    components = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = StableDiffusionAdapterPipeline(**components, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    enable_cache(pipe, EncoderPropagationConfig(interval=4))
    deepest_skips = []
    handle = pipe.unet.up_blocks[0].register_forward_pre_hook(
        lambda m, a, k: deepest_skips.append(k["res_hidden_states_tuple"][-1].clone()), with_kwargs=True)
    pipe("a photo", image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), height=32,
         width=32, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    # key step 0, then three reuse steps: all see step 0's skip (it grew by one residual per step before)
    assert all(torch.equal(skip, deepest_skips[0]) for skip in deepest_skips[1:])


@pytest.mark.parametrize("family", ["sd", "ddpm"])
def test_prior_noise_injection_adds_the_initial_noise_on_late_reused_steps(family):
    pipe = build_tiny(family)
    outputs = {}
    for strength in (0.0, 0.1):
        enable_cache(pipe, EncoderPropagationConfig(interval=2, noise_injection=strength, injection_start=0.5))
        calls = []
        handle = pipe.unet.register_forward_hook(
            lambda m, a, k, out: calls.append((a[0], out[0])), with_kwargs=True)
        _images(pipe, family, steps=4)
        handle.remove()
        outputs[strength] = calls
    plain, injected = outputs[0.0], outputs[0.1]
    for step in range(3):  # key steps 0, 2 and the early reused step 1 are untouched
        assert torch.equal(plain[step][1], injected[step][1])
    prior = injected[0][0]
    assert torch.allclose(injected[3][1], plain[3][1] + 0.1 * prior, atol=1e-6)


def test_prior_noise_fits_predictions_of_other_channels_and_a_cut_batch():
    """An inpainting UNet's 9-channel input never matched its 4-channel prediction: nothing was injected; a CFG
    batch halved mid-call dropped the prior noise (until session 41)."""
    from diffusion_accel.cache.encoder import add_to_prediction

    prior, prediction = torch.randn(2, 9, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.equal(add_to_prediction(prediction, prior), prediction + prior[:, :4])  # inpainting: the latents
    variance = torch.randn(2, 8, 4, 4)  # learned variance: on the epsilon half
    added = add_to_prediction(variance, prior[:, :4])
    assert torch.equal(added[:, :4], variance[:, :4] + prior[:, :4]) and torch.equal(added[:, 4:], variance[:, 4:])
    assert torch.equal(add_to_prediction(prediction[1:], prior[:, :4]), prediction[1:] + prior[1:, :4])
    assert add_to_prediction(prediction, torch.randn(2, 4, 8, 8)) is None


def test_prior_noise_injection_goes_on_after_a_cfg_cutoff():
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = build_tiny("sd")
    outputs = {}
    for strength in (0.0, 0.1):
        enable_cache(pipe, EncoderPropagationConfig(interval=2, noise_injection=strength, injection_start=0.5))
        calls = []
        handle = pipe.unet.register_forward_hook(lambda m, a, k, out: calls.append((a[0], out[0])), with_kwargs=True)
        _images(pipe, "sd", steps=8, guidance_scale=5.0,
                callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4))
        handle.remove()
        outputs[strength] = calls
    plain, injected = outputs[0.0], outputs[0.1]
    assert plain[5][1].shape[0] == 1 and plain[0][0].shape[0] == 2  # the batch was cut after step 3
    torch.testing.assert_close(injected[5][1], plain[5][1] + 0.1 * injected[0][0][-1:], rtol=0, atol=1e-6)


def test_lcm_img2img_injects_no_noised_image_as_prior_noise():
    """LCM's scheduler shortens its own schedule for img2img: step 0 is a noised image at timestep 499 (it was
    injected as the prior noise until session 41)."""
    from diffusers import (LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline, LCMScheduler,
                           UNet2DConditionModel)

    from diffusion_accel.testing.tiny import TEXT_DIM

    pipe = build_tiny("sd")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=32).eval()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    img2img = LatentConsistencyModelImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    images = {}
    for strength in (0.0, 0.1):
        enable_cache(img2img, EncoderPropagationConfig(interval=2, noise_injection=strength, injection_start=0.5))
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        images[strength] = img2img("a red bicycle", image=image, num_inference_steps=6, strength=0.5,
                                   generator=torch.Generator().manual_seed(0), output_type="latent").images
        assert img2img.scheduler.timesteps[0] < 999
    assert torch.equal(images[0.0], images[0.1])
    text_to_image = LatentConsistencyModelPipeline.from_pipe(pipe)  # starts from the prior noise, at 989 for
    text_to_image.set_progress_bar_config(disable=True)  # original_inference_steps=30: nothing was injected (s45)
    for strength in (0.0, 0.5):
        enable_cache(text_to_image, EncoderPropagationConfig(interval=3, noise_injection=strength, injection_start=0))
        images[strength] = text_to_image("a red bicycle", num_inference_steps=6, original_inference_steps=30,
                                         generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert text_to_image.scheduler.timesteps[0] == 989 and not torch.equal(images[0.0], images[0.5])


def test_key_steps_uniform_paper_and_resampled():
    assert key_steps(EncoderPropagationConfig(interval=3), 10) == [0, 3, 6, 9]
    paper = EncoderPropagationConfig(key_steps=FASTER_DIFFUSION_KEY_STEPS, num_inference_steps=50)
    assert key_steps(paper, 50) == list(FASTER_DIFFUSION_KEY_STEPS)
    resampled = key_steps(paper, 100)
    assert resampled[0] == 0 and len(resampled) == 18 and max(resampled) < 100
    assert EncoderPropagationConfig(key_steps=[5, 0, 5], num_inference_steps=8).key_steps == (0, 5)


# ---- configuration errors -----------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: DeltaCacheConfig(interval=0), "interval must be an int >= 1, got 0"),
    (lambda: DeltaCacheConfig(boundary=1.5), r"boundary must be a fraction in \[0, 1\], got 1.5"),
    (lambda: DeltaCacheConfig(boundary=-0.1), r"boundary must be a fraction in \[0, 1\], got -0.1"),
    (lambda: DeltaCacheConfig(cached_fraction=0.0), r"cached_fraction must be a fraction in \(0, 1\], got 0.0"),
    (lambda: DeltaCacheConfig(cached_fraction=True), "cached_fraction .* got True"),
    (lambda: EncoderPropagationConfig(interval=0), "interval must be an int >= 1, got 0"),
    (lambda: EncoderPropagationConfig(noise_injection=-0.01), "noise_injection must be a finite number >= 0.0, got -0.01"),
    (lambda: EncoderPropagationConfig(injection_start=2), r"injection_start must be a fraction in \[0, 1\], got 2"),
    (lambda: EncoderPropagationConfig(key_steps=(0, 50), num_inference_steps=50),
     r"key_steps must contain step 0 and lie in \[0, 50\), got \(0, 50\)"),
    (lambda: EncoderPropagationConfig(key_steps=(1, 2), num_inference_steps=10), "must contain step 0"),
    (lambda: EncoderPropagationConfig(key_steps=(0, -1), num_inference_steps=10), r"got \(0, -1\)"),
    (lambda: EncoderPropagationConfig(key_steps=(0, 2)), "key_steps need num_inference_steps"),
    (lambda: EncoderPropagationConfig(key_steps=(0, 1.5), num_inference_steps=4), r"key_steps must be a sequence of int step indices, got \(0, 1.5\)"),
    (lambda: EncoderPropagationConfig(num_inference_steps=0), "num_inference_steps must be an int >= 1, got 0"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("family, config, match", [
    ("sd", DeltaCacheConfig(), "no transformer block stacks"),
    ("flux", EncoderPropagationConfig(), "no UNet encoder"),
])
def test_model_dependent_errors_leave_the_pipeline_unchanged(family, config, match):
    pipe = build_tiny(family)
    with pytest.raises(ValueError, match=match):
        enable_cache(pipe, config)
    _assert_no_cache_left(pipe, find_denoiser(pipe)[1])


def test_diffusers_own_cache_must_be_disabled_first():
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFirstBlockCache

    pipe = build_tiny("flux")
    pipe.transformer.enable_cache(DiffusersFirstBlockCache(threshold=0.2))
    with pytest.raises(ValueError, match=r"diffusers' own cache \(FirstBlockCacheConfig\).*pipe.transformer.disable_cache\(\)"):
        enable_cache(pipe, DeltaCacheConfig())
    assert find_denoiser(pipe)[1].is_cache_enabled and get_session(find_denoiser(pipe)[1]) is None
    pipe.transformer.disable_cache()
    enable_cache(pipe, DeltaCacheConfig())


def test_diffusers_caches_applied_by_their_functions_are_found_too(tmp_path):
    """apply_first_block_cache / apply_pyramid_attention_broadcast set no is_cache_enabled: calibration ran through
    them (quantize_'s scales from the computed steps only) and our cache stacked on them."""
    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFirstBlockCache
    from diffusers.hooks import HookRegistry

    import diffusion_accel as da

    da.save(enable_cache(build_tiny("flux"), DeltaCacheConfig()), tmp_path)
    pipe = build_tiny("flux")
    diffusers.apply_first_block_cache(pipe.transformer, DiffusersFirstBlockCache(threshold=0.2))
    with pytest.raises(ValueError, match=r"diffusers' cache hook 'fbc_.*remove_hook"):
        enable_cache(pipe, DeltaCacheConfig())
    with pytest.raises(ValueError, match=r"calibrate needs every block .* diffusers' cache hook 'fbc_"):
        da.calibrate(pipe, ["a"], 2, progress=False)
    with pytest.raises(da.artifact.ArtifactError, match=r"load\(\) needs a base without diffusers' own cache"):
        da.load(pipe, tmp_path)
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    for name in ("fbc_leader_block_hook", "fbc_block_hook"):
        registry.remove_hook(name, recurse=True)
    enable_cache(pipe, DeltaCacheConfig())


def test_diffusers_cache_applied_after_ours_is_refused_and_survives_remove_cache():
    """diffusers' apply_first_block_cache after our cache stacked silently (0.016 off diffusers' alone), and
    remove_cache then bypassed diffusers' hooks: their images equalled uncached ones (until session 50)."""
    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFirstBlockCache

    from diffusion_accel.testing.tiny import tiny_call_kwargs

    def generate(pipe):
        return pipe(**tiny_call_kwargs("flux", steps=8)).images

    theirs = build_tiny("flux")
    diffusers.apply_first_block_cache(theirs.transformer, DiffusersFirstBlockCache(threshold=0.5))
    expected, uncached = generate(theirs), generate(build_tiny("flux"))
    pipe = enable_cache(build_tiny("flux"), BlockCacheConfig(interval=4))
    diffusers.apply_first_block_cache(pipe.transformer, DiffusersFirstBlockCache(threshold=0.5))
    with pytest.raises(ValueError, match=r"diffusion_accel's cache is enabled on this FluxTransformer2DModel, and "
                                         r"diffusers' cache hook 'fbc_.*keep one"):
        generate(pipe)
    remove_cache(pipe)
    images = generate(pipe)
    assert torch.equal(images, expected) and not torch.equal(images, uncached)


def test_a_cache_under_group_offloading_of_several_blocks_per_group_is_refused(tmp_path):
    """A group loads its weights when its first block runs: a Δ-DiT reuse step skipping block 0 ran block 1 on
    offloaded weights (NaN images from disk offload, until session 50). Enabled first, the cache works."""
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    config = DeltaCacheConfig(interval=2, cached_fraction=0.5, boundary=0.0)

    def offload(pipe, folder, per_group=2):
        pipe.transformer.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=per_group,
                                              offload_to_disk_path=str(folder))
        return pipe

    pipe = offload(build_tiny("pixart"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"enable_cache\(DeltaCacheConfig\): diffusers' group offloading loads 2 "
                                         r"modules together .*enable the cache first and call enable_group_offload"):
        enable_cache(pipe, config)
    assert get_session(pipe.transformer) is None
    whole_stack = BlockCacheConfig(interval=2)  # skips every block or none: it was refused too (session 50 review)
    expected_whole = enable_cache(build_tiny("pixart"), whole_stack)(**tiny_call_kwargs("pixart", steps=5)).images
    assert torch.equal(enable_cache(pipe, whole_stack)(**tiny_call_kwargs("pixart", steps=5)).images, expected_whole)
    expected = enable_cache(build_tiny("pixart"), config)(**tiny_call_kwargs("pixart", steps=5)).images
    cached_first = offload(enable_cache(build_tiny("pixart"), config), tmp_path / "b")
    assert torch.equal(cached_first(**tiny_call_kwargs("pixart", steps=5)).images, expected)
    one_per_group = enable_cache(offload(build_tiny("pixart"), tmp_path / "c", per_group=1), config)
    assert torch.equal(one_per_group(**tiny_call_kwargs("pixart", steps=5)).images, expected)


def test_a_pipeline_built_from_the_components_with_its_own_scheduler_repeats_its_images():
    """Per-call reset must not depend on which pipeline calls the cached denoiser: with 5 steps and
    interval 3, a missed reset starts the second call mid-schedule on the first call's stale features."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    def other_pipeline(pipe):
        return StableDiffusionPipeline(**{**pipe.components,
                                          "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})

    config = DeepCacheConfig(interval=3, branch=0)
    fresh = other_pipeline(build_tiny("sd"))
    enable_cache(fresh, config)  # enabled on the very pipeline that calls it
    expected = fresh(**tiny_call_kwargs("sd", steps=5)).images
    other = other_pipeline(enable_cache(build_tiny("sd"), config))
    for _ in range(2):
        assert torch.equal(other(**tiny_call_kwargs("sd", steps=5)).images, expected)


# ---- every family, CFG, per-call state, drop-in, save/load ----------------------------------------
UNET_CONFIGS = (EncoderPropagationConfig(interval=2), EncoderPropagationConfig(interval=3, noise_injection=0.05),
                EncoderPropagationConfig(key_steps=(0, 1, 3), num_inference_steps=6))
DIT_CONFIGS = (DeltaCacheConfig(interval=2), DeltaCacheConfig(interval=3, cached_fraction=1.0, boundary=0.0))


@pytest.mark.parametrize("family", UNET_FAMILIES + DIT_FAMILIES)
def test_every_family_caches_generates_and_is_deterministic(family):
    pipe = build_tiny(family)
    base = _images(pipe, family)
    for config in UNET_CONFIGS if family in UNET_FAMILIES else DIT_CONFIGS:
        enable_cache(pipe, config)
        first, second = _images(pipe, family), _images(pipe, family)
        assert torch.equal(first, second) and torch.isfinite(first).all(), config
        assert summary(pipe)["reused_calls"] > 0, config
        relative = (first - base).norm() / base.norm()
        assert 0 < relative < 1.0, (config, float(relative))  # random weights: loose bound
    remove_cache(pipe)
    assert torch.equal(_images(pipe, family), base)
    _assert_no_cache_left(pipe, find_denoiser(pipe)[1])


@pytest.mark.parametrize("family, config", [("sd", EncoderPropagationConfig(interval=2, noise_injection=0.1)),
                                            ("dit", DeltaCacheConfig(interval=2))])
def test_fresh_state_at_every_call(family, config):
    pipe = build_tiny(family)
    enable_cache(pipe, config)
    _images(pipe, family, steps=3)
    after_other_call = _images(pipe, family, steps=5)
    fresh = build_tiny(family)
    enable_cache(fresh, config)
    assert torch.equal(_images(fresh, family, steps=5), after_other_call)
    assert [s["step"] for s in summary(pipe)["steps"]] == [0, 1, 2, 3, 4]


def test_flux_true_cfg_keeps_separate_delta_state_per_context():
    pipe = build_tiny("flux")
    enable_cache(pipe, DeltaCacheConfig(interval=2))
    deltas = {}

    def inspect_state(_pipe, step, _t, kwargs):
        tracker = get_tracker(_pipe.transformer)
        if tracker.at_last_step:
            return kwargs  # the cache dropped its state after the last step
        deltas[step] = {c: tracker.state("cache", c)["deltas"]["front"]["hidden"].clone() for c in ("cond", "uncond")}
        return kwargs

    _images(pipe, "flux", steps=4, negative_prompt="blurry", true_cfg_scale=3.0, callback_on_step_end=inspect_state)
    assert not torch.equal(deltas[0]["cond"], deltas[0]["uncond"])
    steps = [(s["context"], s["step"], s["computed"], s["reused_blocks"]) for s in summary(pipe)["steps"]]
    for context in ("cond", "uncond"):
        assert [s[1:] for s in steps if s[0] == context] == [(0, True, 0), (1, False, 2), (2, True, 0), (3, False, 2)]


def test_flux_batch_with_an_unrepeated_negative_prompt_keeps_the_text_delta():
    """Flux's uncond text stream enters the stack with batch 1 and leaves it with batch B: the front
    span's text delta must broadcast rather than be dropped (it feeds the single-stream blocks)."""
    pipe = build_tiny("flux")
    enable_cache(pipe, DeltaCacheConfig(interval=2, cached_fraction=0.5, boundary=0.0))
    images = _images(pipe, "flux", steps=4, prompt=["a red bicycle", "a blue car"], negative_prompt="",
                     true_cfg_scale=3.0)
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    assert summary(pipe)["reused_calls"] > 0


def test_batched_cfg_propagates_both_halves_in_one_state():
    pipe = build_tiny("sd")
    enable_cache(pipe, EncoderPropagationConfig(interval=2, noise_injection=0.1))
    seen = {}

    def inspect_state(_pipe, step, _t, kwargs):
        if get_tracker(_pipe.unet).at_last_step:
            return kwargs  # the cache dropped its state after the last step
        state = get_tracker(_pipe.unet).state("cache", "default")
        seen[step] = (state["outputs"]["mid_block"].shape[0], state["per_call"]["prior_noise"].shape[0])
        return kwargs

    _images(pipe, "sd", steps=3, guidance_scale=5.0, callback_on_step_end=inspect_state)
    assert seen[1] == (2, 2)  # cond and uncond halves together, prior noise of both


@pytest.mark.parametrize("family, config", [
    ("sd", EncoderPropagationConfig(interval=2, noise_injection=0.1, injection_start=0.0)),
    ("ddpm", EncoderPropagationConfig(interval=2)),
    ("flux", DeltaCacheConfig(interval=2)), ("pixart", DeltaCacheConfig(interval=2, boundary=0.0)),
])
def test_drop_in_contract(family, config):
    check_drop_in(family, lambda p: enable_cache(p, config))


@pytest.mark.parametrize("family, config", [
    ("pixart", DeltaCacheConfig(interval=3, cached_fraction=0.5, boundary=0.3)),
    ("sd", EncoderPropagationConfig(key_steps=(0, 1, 3), num_inference_steps=6, noise_injection=0.05)),
])
def test_save_and_load_carry_the_config(tmp_path, family, config):
    assert config_from_dict(config_to_dict(config)) == config
    pipe = build_tiny(family)
    enable_cache(pipe, config)
    expected = _images(pipe, family)
    da.save(pipe, tmp_path / "art")
    base = build_tiny(family)
    da.load(base, tmp_path / "art")
    assert da.cache.cache_config(base) == config
    assert torch.equal(_images(base, family), expected)


def test_a_saved_cache_config_with_unknown_fields_is_refused_naming_them():
    """They were dropped silently (a misspelt field in an edited manifest ran with its default), while
    PTQConfig.from_dict refused them."""
    data = config_to_dict(DeepCacheConfig(interval=3))
    data["params"]["intervall"] = 5
    with pytest.raises(ValueError, match=r"unknown DeepCacheConfig fields \['intervall'\]; accepted: .*'interval'"):
        config_from_dict(data)


# ---- adapter-provided block streams --------------------------------------------------------------
@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_adapter_block_streams_match_what_the_blocks_take_and_return(family):
    pipe = build_tiny(family)
    adapter = get_adapter(pipe)
    seen = {}
    handles = []
    for info in adapter.blocks():
        block = adapter.module(info.name)
        spec = adapter.block_streams(info.name)
        parameters = inspect.signature(type(block).forward).parameters
        assert spec.hidden_arg in parameters and (spec.encoder_arg is None or spec.encoder_arg in parameters)
        assert isinstance(block.get_submodule(spec.modulated), nn.Module)
        handles.append(block.register_forward_hook(
            lambda m, a, k, out, name=info.name: seen.setdefault(name, (_arguments(m, a, k), out)) and None,
            with_kwargs=True))
    _images(pipe, family, steps=1)
    for handle in handles:
        handle.remove()
    for name, (kwargs, output) in seen.items():
        spec = adapter.block_streams(name)
        hidden = output if isinstance(output, torch.Tensor) else output[spec.hidden_out]
        assert hidden.shape == kwargs[spec.hidden_arg].shape, name
        if spec.encoder_out is not None and output[spec.encoder_out] is not None:
            assert output[spec.encoder_out].shape == kwargs[spec.encoder_arg].shape, name


def test_unet_adapters_have_no_block_streams_but_an_encoder():
    adapter = get_adapter(build_tiny("sd"))
    with pytest.raises(TypeError, match="no transformer blocks"):
        adapter.block_streams("down_blocks.0")
    point = adapter.encoder_cache_point()
    assert point.blocks == ("conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block")
    assert point.up == "up_blocks.0" and get_adapter(build_tiny("flux")).encoder_cache_point() is None
    with pytest.raises(TypeError, match="not a transformer block"):
        get_adapter(build_tiny("dit")).block_streams("proj_out_1")


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_teacache_watches_the_timestep_modulated_input(family):
    pipe = build_tiny(family)
    enable_cache(pipe, TeaCacheConfig(threshold=0.0))
    policy = get_session(find_denoiser(pipe)[1]).policy
    signals, inputs = [], []
    original = policy.should_compute
    policy.should_compute = lambda step, n, state, signal: signals.append(signal) or original(step, n, state, signal)
    head = get_adapter(pipe).module(get_adapter(pipe).blocks()[0].name)
    handle = head.register_forward_pre_hook(
        lambda m, a, k: inputs.append(_arguments(m, a, k)["hidden_states"]), with_kwargs=True)
    _images(pipe, family, steps=3)
    handle.remove()
    assert len(signals) == len(inputs) > 0
    for signal, block_input in zip(signals, inputs):  # the modulated input, not the raw-input fallback
        assert not (signal.shape == block_input.shape and torch.equal(signal, block_input))


# ---- torch.compile ---------------------------------------------------------------------------
@pytest.mark.parametrize("family, config, backend", [
    ("dit", DeltaCacheConfig(interval=2), "eager"),
    ("ddpm", EncoderPropagationConfig(interval=2, noise_injection=0.05), "eager"),
    ("dit", BlockCacheConfig(interval=2, forecast=1, forecast_target="output"), "eager"),
    ("flux", CalibratedCacheConfig((0, 2), 4, forecast=1, partial_steps=((1, 2),)), "eager"),
    ("sd", CalibratedCacheConfig((0, 2), 4, partial_steps=((3, 2),)), "eager"),
    pytest.param("sd", EncoderPropagationConfig(interval=2), "inductor", marks=pytest.mark.slow),
    pytest.param("flux", DeltaCacheConfig(interval=2), "inductor", marks=pytest.mark.slow),
])
def test_enable_cache_on_a_compiled_denoiser_matches_eager(family, config, backend):
    torch._dynamo.reset()
    pipe = build_tiny(family)
    base = _images(pipe, family, steps=4)
    enable_cache(pipe, config)
    eager = _images(pipe, family, steps=4)
    remove_cache(pipe)
    component, denoiser = find_denoiser(pipe)
    setattr(pipe, component, torch.compile(denoiser, backend=backend))
    enable_cache(pipe, config)  # find_denoiser looks through the compiled wrapper
    try:
        assert torch.allclose(_images(pipe, family, steps=4), eager, atol=1e-4)
        assert summary(pipe)["reused_calls"] == 2
        remove_cache(pipe)
        assert torch.allclose(_images(pipe, family, steps=4), base, atol=1e-4)
    finally:
        torch._dynamo.reset()



@pytest.mark.parametrize("family, config", [
    ("dit", BlockCacheConfig(interval=3, forecast=1)),
    ("ddpm", EncoderPropagationConfig(interval=3, noise_injection=0.05)),
    ("dit", DeltaCacheConfig(interval=2)),
    ("flux", CalibratedCacheConfig((0, 6), 12, partial_steps=((2, 1), (4, 1), (8, 1)))),
])
def test_a_compiled_step_schedule_cache_compiles_a_few_graphs_whatever_the_step_count(family, config):
    """A step policy decides in the tracker's graph break and no step number reaches a compiled hook: one graph
    per decision state (not per step or per block: 32-44 graphs at 6-12 steps before), no break in the cache."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe = build_tiny(family)
    enable_cache(pipe, config)
    component, denoiser = find_denoiser(pipe)
    setattr(pipe, component, torch.compile(denoiser, backend="eager"))
    try:
        counters.clear()
        _images(pipe, family, steps=12)
        breaks = [reason for reason in counters["graph_break"] if "CacheSession" in reason]
        assert counters["stats"]["unique_graphs"] <= 4 and not breaks
        counters.clear()
        _images(pipe, family, steps=12)
        assert counters["stats"]["unique_graphs"] == 0
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("config", [FirstBlockCacheConfig(threshold=0.3),
                                    TeaCacheConfig(threshold=0.3, coefficients=(1.0, 0.0))])
def test_a_threshold_cache_compiles_its_blocks_beneath_their_hooks_with_no_graph_break(config):
    """Compiled whole, a First-Block-Cache / TeaCache decision (in the denoiser's block loop) made dynamo skip the
    loop's frame and compile each hooked block's hook frame (fashion-flux: slower than eager). compile_denoiser
    picks the regional form for them: each block compiled beneath its hook, one graph per block class."""
    from torch._dynamo.utils import counters

    from diffusion_accel.eval import compile_denoiser
    from diffusion_accel.eval.pipes import hooked_blocks, unhooked_regions
    from diffusion_accel.uncompiled import is_compiled, uncompiled

    torch._dynamo.reset()
    pipe = build_tiny("flux")
    base = _images(pipe, "flux", steps=8)
    enable_cache(pipe, config)
    eager = _images(pipe, "flux", steps=8)
    blocks, regions = [module for module, _ in hooked_blocks(pipe.transformer)], unhooked_regions(pipe.transformer)
    head = pipe.transformer.transformer_blocks[0]
    assert len(blocks) == 4 - isinstance(config, TeaCacheConfig)  # TeaCache's head block has a hooked child
    assert (head in blocks) != isinstance(config, TeaCacheConfig)
    try:
        compile_denoiser(pipe, backend="eager")
        assert all(is_compiled(block) for block in blocks) and not is_compiled(pipe.transformer)
        counters.clear()
        torch.testing.assert_close(_images(pipe, "flux", steps=8), eager, atol=1e-5, rtol=1e-5)
        assert summary(pipe)["reused_calls"] > 0 and not counters["graph_break"]
        assert counters["stats"]["unique_graphs"] <= len(regions) + len({type(block) for block in blocks})
        counters.clear()
        _images(pipe, "flux", steps=8)
        assert counters["stats"]["unique_graphs"] == 0
        with uncompiled(pipe):
            assert not any(is_compiled(block) for block in blocks)
        assert all(is_compiled(block) for block in blocks)
        remove_cache(pipe)
        assert not any(is_compiled(block) for block in blocks)  # the compiled forwards lived on the hooks
        torch.testing.assert_close(_images(pipe, "flux", steps=8), base, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["sd3", "pixart", "dit"])
@pytest.mark.parametrize("config", [FirstBlockCacheConfig(threshold=0.3), DeltaCacheConfig(interval=2)])
def test_every_transformer_family_compiles_its_cached_blocks_beneath_their_hooks(family, config):
    from torch._dynamo.utils import counters

    from diffusion_accel.eval import compile_denoiser
    from diffusion_accel.eval.pipes import hooked_blocks

    torch._dynamo.reset()
    pipe = enable_cache(build_tiny(family), config)
    eager = _images(pipe, family, steps=6)
    assert len(hooked_blocks(find_denoiser(pipe)[1])) == 2
    try:
        compile_denoiser(pipe, regional=True, backend="eager")
        counters.clear()
        torch.testing.assert_close(_images(pipe, family, steps=6), eager, atol=1e-5, rtol=1e-5)
        assert not counters["graph_break"] and summary(pipe)["reused_calls"] > 0
    finally:
        torch._dynamo.reset()


def test_compile_denoiser_compiles_a_step_schedule_cache_whole_and_a_threshold_cache_by_regions():
    """The default (``regional=None``) picks the faster form of each on the zoo (benchmarks/cache_compile.py)."""
    from diffusion_accel.eval import compile_denoiser
    from diffusion_accel.eval.machine import denoiser_runtime
    from diffusion_accel.eval.pipes import hooked_blocks
    from diffusion_accel.uncompiled import is_compiled

    for config, whole in ((DeltaCacheConfig(interval=2), True), (FirstBlockCacheConfig(threshold=0.3), False)):
        pipe = enable_cache(build_tiny("flux"), config)
        compile_denoiser(pipe, backend="eager")
        blocks = [module for module, _ in hooked_blocks(pipe.transformer)]
        assert is_compiled(pipe.transformer) == whole and len(blocks) == 4
        assert all(is_compiled(block) != whole for block in blocks)
        assert denoiser_runtime(pipe)["compiled"]  # reports (bench --compile) say so for regions too


def test_a_block_whose_hook_wraps_another_hooks_forward_is_not_compiled_beneath_it():
    """Beneath our hook lies another hook's forward, not the block's own: compiling the block's class forward
    in its place would skip that hook, so regional compilation compiles the block's children instead."""
    from diffusers.hooks import HookRegistry, ModelHook

    from diffusion_accel.eval import compile_denoiser
    from diffusion_accel.eval.pipes import hooked_blocks

    class Doubling(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            hidden, encoder = self.fn_ref.original_forward(*args, **kwargs)
            return hidden, encoder * 2

    torch._dynamo.reset()
    pipe = build_tiny("flux")
    block = pipe.transformer.transformer_blocks[1]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(Doubling(), "doubling")
    enable_cache(pipe, FirstBlockCacheConfig(threshold=0.3))
    eager = _images(pipe, "flux", steps=6)
    assert block not in [module for module, _ in hooked_blocks(pipe.transformer)]
    try:
        compile_denoiser(pipe, regional=True, backend="eager")
        torch.testing.assert_close(_images(pipe, "flux", steps=6), eager, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
