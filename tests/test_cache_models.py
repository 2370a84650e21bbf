"""Caches on the tiny pipelines: DeepCache parity with the deepcache package, every family, CFG
state separation, per-call reset, the drop-in contract, torch.compile, fitting and calibration."""

import copy
import importlib.util

import pytest
import torch
from diffusers import (FluxControlNetModel, FluxControlNetPipeline, FluxImg2ImgPipeline,
                       StableDiffusionImg2ImgPipeline, UNet2DConditionModel)

from diffusion_accel.cache import (BlockCacheConfig, CalibratedCacheConfig, DeepCacheConfig, DeltaCacheConfig,
                                   EncoderPropagationConfig, FirstBlockCacheConfig, TeaCacheConfig, calibrate_schedule,
                                   enable_cache, fit_teacache_coefficients, remove_cache, summary)
from diffusion_accel.hooks import get_tracker
from diffusion_accel.testing.contract import check_drop_in
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

UNET_FAMILIES = ("sd", "sdxl", "ddpm")
DIT_FAMILIES = ("sd3", "flux", "pixart", "dit")
DIT_CONFIGS = (BlockCacheConfig(interval=2), FirstBlockCacheConfig(threshold=0.5),
               TeaCacheConfig(threshold=0.5))


def _images(pipe, family, steps=6, **overrides):
    return pipe(**(tiny_call_kwargs(family, steps=steps) | overrides)).images


def _sd_with_three_resnet_up_blocks():
    """Tiny SD whose UNet has layers_per_block=2 (3 resnets per up block, as DeepCache assumes)."""
    pipe = build_tiny("sd")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.skipif(importlib.util.find_spec("DeepCache") is None,
                    reason="the deepcache package is not installed (pip install --no-deps deepcache)")
@pytest.mark.parametrize("branch", [0, 3, 7])
def test_deepcache_matches_the_deepcache_package(branch):
    from DeepCache import DeepCacheSDHelper

    pipe = _sd_with_three_resnet_up_blocks()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    reference = _images(pipe, "sd", steps=7, output_type="latent")
    helper.disable()
    fresh = _sd_with_three_resnet_up_blocks()  # DeepCache leaves instance forwards behind
    enable_cache(fresh, DeepCacheConfig(interval=3, branch=branch))
    ours = _images(fresh, "sd", steps=7, output_type="latent")
    assert (ours - reference).abs().max().item() <= 1e-4


@pytest.mark.skipif(importlib.util.find_spec("DeepCache") is None,
                    reason="the deepcache package is not installed (pip install --no-deps deepcache)")
@pytest.mark.parametrize("strength, interval", [(0.5, 3), (0.8, 5)])
def test_deepcache_on_img2img_matches_the_deepcache_package(strength, interval):
    """The package counts its interval from the call's first step; until session 41 ours placed it on the whole
    schedule's positions: at strength 0.8 steps 0, 1, 6, 11 of 16 computed (0, 5, 10, 15 in the package)."""
    from DeepCache import DeepCacheSDHelper
    from diffusers import StableDiffusionImg2ImgPipeline

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(image=image, strength=strength, height=None, width=None, output_type="latent")
    reference_pipe = StableDiffusionImg2ImgPipeline.from_pipe(_sd_with_three_resnet_up_blocks())
    helper = DeepCacheSDHelper(pipe=reference_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    reference = _images(reference_pipe, "sd", steps=20, **kwargs)
    helper.disable()
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(_sd_with_three_resnet_up_blocks())
    enable_cache(pipe, DeepCacheConfig(interval=interval, branch=0))
    ours = _images(pipe, "sd", steps=20, **kwargs)
    steps = [record["step"] for record in summary(pipe)["steps"] if record["computed"]]
    assert steps == list(range(steps[0], 20, interval)) and (ours - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("threshold", [0.25, 0.35])  # tiny Flux at 20 steps: 7-29 of 20 / 40 calls reused
@pytest.mark.parametrize("true_cfg", [False, True])
def test_first_block_cache_matches_diffusers_first_block_cache(threshold, true_cfg):
    """A faithful port: diffusers' FirstBlockCache and ours make the same decisions, so the images are equal."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFirstBlockCacheConfig

    extra = {"negative_prompt": "blurry", "true_cfg_scale": 3.0} if true_cfg else {}
    reference_pipe = build_tiny("flux")
    reference_pipe.transformer.enable_cache(DiffusersFirstBlockCacheConfig(threshold=threshold))
    reference = _images(reference_pipe, "flux", steps=20, **extra)
    pipe = build_tiny("flux")
    enable_cache(pipe, FirstBlockCacheConfig(threshold=threshold))
    ours = _images(pipe, "flux", steps=20, **extra)
    assert 0 < summary(pipe)["reused_calls"] < (40 if true_cfg else 20) - 2 and torch.equal(ours, reference)


@pytest.mark.parametrize("family", UNET_FAMILIES + DIT_FAMILIES)
def test_every_family_caches_generates_and_is_deterministic(family):
    pipe = build_tiny(family)
    pipe.set_progress_bar_config(disable=True)
    base = _images(pipe, family)
    configs = (DeepCacheConfig(interval=2), DeepCacheConfig(interval=3, schedule="non-uniform")) \
        if family in UNET_FAMILIES else DIT_CONFIGS
    for config in configs:
        enable_cache(pipe, config)
        first, second = _images(pipe, family), _images(pipe, family)
        assert torch.equal(first, second) and torch.isfinite(first).all()
        assert summary(pipe)["reused_calls"] > 0, config
        relative = (first - base).norm() / base.norm()
        assert 0 < relative < 1.0, (config, float(relative))  # random weights: loose bound
    remove_cache(pipe)
    assert torch.equal(_images(pipe, family), base)


def test_default_cache_config_follows_the_denoiser():
    from diffusion_accel.cache import default_cache_config

    assert default_cache_config(build_tiny("sd")) == DeepCacheConfig(interval=3, branch=0, forecast=1)
    assert default_cache_config(build_tiny("flux"), interval=2) == \
        BlockCacheConfig(interval=2, forecast=1, forecast_target="output")


def test_fresh_state_at_every_call_for_any_step_count_and_batch():
    pipe = build_tiny("sd")
    pipe.set_progress_bar_config(disable=True)
    enable_cache(pipe, DeepCacheConfig(interval=2))
    _images(pipe, "sd", steps=3, num_images_per_prompt=2, height=48, width=48)
    after_other_call = _images(pipe, "sd", steps=5)
    fresh = build_tiny("sd")
    enable_cache(fresh, DeepCacheConfig(interval=2))
    assert torch.equal(_images(fresh, "sd", steps=5), after_other_call)
    assert [s["step"] for s in summary(pipe)["steps"]] == [0, 1, 2, 3, 4]


def test_batched_cfg_caches_both_halves_in_one_state():
    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=2))
    seen = {}

    def inspect(_pipe, step, _t, kwargs):
        if get_tracker(_pipe.unet).at_last_step:
            return kwargs  # the cache dropped its state after the last step
        state = get_tracker(_pipe.unet).state("cache", "default")
        seen[step] = {tuple(v.shape)[0] for v in state["outputs"].values() if isinstance(v, torch.Tensor)}
        return kwargs

    _images(pipe, "sd", steps=3, guidance_scale=5.0, callback_on_step_end=inspect)
    assert seen[1] == {2}  # cond and uncond halves together


@pytest.mark.parametrize("family, callback_name, config", [
    ("sd", "SDCFGCutoffCallback", DeepCacheConfig(interval=3)),
    ("sdxl", "SDXLCFGCutoffCallback", DeepCacheConfig(interval=3)),
    ("sd3", "SD3CFGCutoffCallback", BlockCacheConfig(interval=3)),
])
def test_cfg_cutoff_callback_mid_call_recomputes_instead_of_reusing_the_other_batch(family, callback_name,
                                                                                     config):
    """diffusers' CFG cutoff callbacks halve the batch after step 4 of 10: UNets crashed on the cached
    batch-2 features, and SD3 silently broadcast the batch-2 residual (cond + uncond) onto the cond
    latents. The cache now recomputes at the cut and reuses from there on."""
    from diffusers import callbacks

    pipe = build_tiny(family)
    enable_cache(pipe, config)
    cutoff = getattr(callbacks, callback_name)(cutoff_step_ratio=0.4)
    images = _images(pipe, family, steps=10, guidance_scale=5.0, callback_on_step_end=cutoff)
    assert images.shape[0] == 1 and torch.isfinite(images).all()
    computed = {s["step"]: s["computed"] for s in summary(pipe)["steps"]}
    assert [step for step in range(10) if computed[step]] == [0, 3, 5, 6, 9]  # 5: the first at batch 1


@pytest.mark.parametrize("stop", ["denoising_end", "interrupt"])
def test_a_unet_call_stopped_before_the_last_step_frees_its_cached_features(stop):
    """SDXL base with denoising_end (base + refiner) or an interrupted call never reached the schedule's last step:
    the UNet's cached features stayed on the device until its next call (until session 41)."""
    from diffusion_accel.cache.session import DIFFUSERS_RESET

    def interrupt(pipe, step, timestep, kwargs):
        pipe._interrupt = step == 4
        return kwargs

    pipe = build_tiny("sdxl")
    enable_cache(pipe, DeepCacheConfig(interval=3))
    extra = {"denoising_end": 0.8} if stop == "denoising_end" else {"callback_on_step_end": interrupt}
    _images(pipe, "sdxl", steps=10, output_type="latent", **extra)
    assert get_tracker(pipe.unet).client_states("cache") == {}
    assert 0 < len(summary(pipe)["steps"]) < 10  # the call's log is still readable
    remove_cache(pipe)
    assert DIFFUSERS_RESET not in vars(pipe.unet)


def test_flux_true_cfg_keeps_separate_state_per_context():
    pipe = build_tiny("flux")
    enable_cache(pipe, BlockCacheConfig(interval=2))
    residuals = {}

    def inspect(_pipe, step, _t, kwargs):
        tracker = get_tracker(_pipe.transformer)
        if tracker.at_last_step:
            return kwargs  # the cache dropped its state after the last step
        residuals[step] = {c: tracker.state("cache", c)["residual"]["hidden"].clone() for c in ("cond", "uncond")}
        return kwargs

    _images(pipe, "flux", steps=4, negative_prompt="blurry", true_cfg_scale=3.0, callback_on_step_end=inspect)
    assert not torch.equal(residuals[0]["cond"], residuals[0]["uncond"])
    contexts = [(s["context"], s["step"], s["computed"]) for s in summary(pipe)["steps"]]
    for context in ("cond", "uncond"):
        assert [(st, c) for ctx, st, c in contexts if ctx == context] == [(0, True), (1, False), (2, True), (3, False)]


def _img2img(pipe, pipeline_class, **overrides):
    """Run ``pipeline_class`` built from ``pipe``'s components (shared scheduler) at strength 0.5 of 10 steps."""
    img2img = pipeline_class(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a shoe", image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                  num_inference_steps=10, strength=0.5, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    return img2img(**(kwargs | overrides)).images


@pytest.mark.parametrize("config", [BlockCacheConfig(interval=3), DeltaCacheConfig(interval=3)])
def test_transformer_interval_caches_count_from_an_img2img_calls_first_step(config):
    """Δ-DiT kept the whole schedule's grid until session 41: steps 5, 6 and 9 of 5..9 computed (two in a row)."""
    pipe = build_tiny("flux")
    enable_cache(pipe, config)
    _img2img(pipe, FluxImg2ImgPipeline, height=32, width=32)
    assert [s["step"] for s in summary(pipe)["steps"] if s["computed"]] == [5, 8]


def test_img2img_steps_are_positions_in_the_schedule():
    """Starting mid-schedule (strength 0.5 of 10 steps) runs steps 5..9 of the schedule, not 0..4:
    timestep-dependent schedules and PTQ's step-group scales stay aligned with text-to-image."""
    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=2))
    _img2img(pipe, StableDiffusionImg2ImgPipeline)
    steps = [(s["step"], s["computed"]) for s in summary(pipe)["steps"]]
    assert steps == [(5, True), (6, False), (7, True), (8, False), (9, True)]  # the interval from the first step


def test_encoder_propagation_counts_its_interval_from_an_img2img_calls_first_step():
    """It kept the whole schedule's grid: steps 5, 6 and 9 of 5..9 computed (two in a row), unlike DeepCache."""
    pipe = build_tiny("sd")
    enable_cache(pipe, EncoderPropagationConfig(interval=3))
    _img2img(pipe, StableDiffusionImg2ImgPipeline)
    assert [s["step"] for s in summary(pipe)["steps"] if s["computed"]] == [5, 8]


def test_flux_img2img_true_cfg_without_cache_context_keeps_branches_apart():
    """FluxImg2ImgPipeline calls the transformer twice per step without ``cache_context``: the
    second call at a step gets its own state ("default#1") instead of reusing the first's."""
    pipe = build_tiny("flux")
    enable_cache(pipe, BlockCacheConfig(interval=2))
    residuals = {}

    def inspect(_pipe, step, _t, kwargs):
        tracker = get_tracker(_pipe.transformer)
        if tracker.at_last_step:
            return kwargs  # the cache dropped its state after the last step
        residuals[step] = [tracker.state("cache", c)["residual"]["hidden"].clone() for c in ("default", "default#1")]
        return kwargs

    _img2img(pipe, FluxImg2ImgPipeline, height=32, width=32, negative_prompt="blurry", true_cfg_scale=3.0,
             callback_on_step_end=inspect)
    assert not torch.equal(*residuals[0])
    records = [(s["context"], s["step"], s["computed"]) for s in summary(pipe)["steps"]]
    for context in ("default", "default#1"):
        assert [(st, c) for ctx, st, c in records if ctx == context] == \
            [(5, True), (6, False), (7, True), (8, False), (9, True)]


def test_a_flux_pipeline_sharing_the_transformer_with_its_own_scheduler_places_steps_by_it():
    """Its calls had no step count (Flux passes no timestep views): a Δ-cache never reached its detail stage and
    gave other images than the same cache called from the pipeline it was enabled on."""

    from diffusers import FluxPipeline

    pipe = build_tiny("flux")
    enable_cache(pipe, DeltaCacheConfig(interval=2, boundary=0.5))
    reference = pipe(**tiny_call_kwargs("flux", steps=6)).images
    sharing = FluxPipeline.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    assert torch.equal(sharing(**tiny_call_kwargs("flux", steps=6)).images, reference)
    assert len(summary(pipe)["steps"]) == 6


def _flux_and_an_img2img_sibling():
    """Tiny Flux with a block cache, and a FluxImg2ImgPipeline sharing its transformer with a scheduler of its own."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_tiny("flux")
    pipe.set_progress_bar_config(disable=True)
    enable_cache(pipe, BlockCacheConfig(interval=3))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    img2img = FluxImg2ImgPipeline.from_pipe(pipe, scheduler=scheduler)
    img2img.set_progress_bar_config(disable=True)
    return pipe, img2img


@pytest.mark.parametrize("before", ["direct call", "interrupted text-to-image", "its own interrupted call"])
def test_a_flux_pipeline_with_its_own_scheduler_starts_fresh_after_an_unfinished_trajectory(before):
    """diffusers resets Flux's hooks only at the end of a completed pipeline call: after a direct transformer
    call or an interrupted call, an img2img pipeline with its own scheduler continued the stale trajectory
    (steps counted on, features reused: images off by 0.07-0.11; session 33 probe)."""
    pipelines = _flux_and_an_img2img_sibling

    def stop(*_):
        raise RuntimeError("stopped by the user")

    def kwargs():  # a fresh generator for every call
        return dict(tiny_call_kwargs("flux", steps=4), strength=0.6,
                    image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))

    pipe, img2img = pipelines()
    fresh, fresh_steps = img2img(**kwargs()).images, summary(pipe)["steps"]
    pipe, img2img = pipelines()
    with pytest.raises(RuntimeError, match="stopped by the user") if before != "direct call" else torch.no_grad():
        if before == "direct call":
            pipe.transformer(hidden_states=torch.randn(1, 16, 16), timestep=torch.tensor([1.0]),
                             encoder_hidden_states=torch.randn(1, 8, 32), pooled_projections=torch.randn(1, 32),
                             txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), guidance=None)
        elif before == "interrupted text-to-image":
            pipe(**tiny_call_kwargs("flux", steps=6), callback_on_step_end=stop)
        else:
            img2img(**kwargs(), callback_on_step_end=stop)
    assert torch.equal(img2img(**kwargs()).images, fresh) and summary(pipe)["steps"] == fresh_steps


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_an_img2img_pipeline_with_its_own_scheduler_starts_fresh_after_its_interrupted_call(family):
    """diffusers never resets after an exception, and for denoisers other than Flux's only a rising timestep
    marked a new call: an img2img sibling with a scheduler of its own whose call was stopped at step 4 of 10, then
    called at strength 0.3 (its first timestep below the stopped call's last), continued the stopped trajectory
    (reused its features, counted its steps: SD 0.39 off a fresh call, SD3 0.046; session 47 review)."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    img2img_class = {"sd": StableDiffusionImg2ImgPipeline, "sd3": StableDiffusion3Img2ImgPipeline}[family]
    config = DeepCacheConfig(interval=3, branch=0) if family == "sd" else BlockCacheConfig(interval=3)

    def pipelines():
        pipe = build_tiny(family)
        enable_cache(pipe, config)
        img2img = img2img_class(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
        img2img.set_progress_bar_config(disable=True)
        return pipe, img2img

    def kwargs(strength):  # a fresh generator for every call
        return dict(tiny_call_kwargs(family, steps=10), strength=strength,
                    image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))

    def stop(_pipe, step, _timestep, _kwargs):
        if step == 4:
            raise RuntimeError("stopped by the user")
        return {}

    pipe, img2img = pipelines()
    fresh, fresh_steps = img2img(**kwargs(0.3)).images, summary(pipe)["steps"]
    pipe, img2img = pipelines()
    with pytest.raises(RuntimeError, match="stopped by the user"):
        img2img(**kwargs(1.0), callback_on_step_end=stop)
    assert torch.equal(img2img(**kwargs(0.3)).images, fresh) and summary(pipe)["steps"] == fresh_steps


def test_an_img2img_pipeline_with_its_own_scheduler_starts_fresh_after_an_unfinished_direct_loop():
    """A direct UNet loop passing plain ints, stopped part-way, then the sibling's strength-0.3 call: the first
    call viewing a schedule after calls passing none is a new trajectory (it continued the loop's: 0.0087 off;
    session 47 review)."""
    def pipelines():
        pipe = build_tiny("sd")
        enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
        img2img = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
        img2img.set_progress_bar_config(disable=True)
        return pipe, img2img

    def kwargs():
        return dict(tiny_call_kwargs("sd", steps=10), strength=0.3,
                    image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))

    pipe, img2img = pipelines()
    fresh = img2img(**kwargs()).images
    pipe, img2img = pipelines()
    config = pipe.unet.config
    with torch.no_grad():
        sample, context = torch.randn(1, config.in_channels, 8, 8), torch.randn(1, 4, config.cross_attention_dim)
        for timestep in (999, 899, 799, 699, 599):
            pipe.unet(sample, timestep, encoder_hidden_states=context)
    assert torch.equal(img2img(**kwargs()).images, fresh)


def test_a_direct_loop_indexing_a_fresh_copy_of_its_schedule_still_reuses():
    """sched.timesteps.float()[i] views a new tensor every step: taken for a new schedule, every call reset and
    nothing was reused (session 47 review); direct calls are left to the value check."""
    from diffusers import DDIMScheduler

    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    config = pipe.unet.config
    with torch.no_grad():
        sample, context = torch.randn(1, config.in_channels, 8, 8), torch.randn(1, 4, config.cross_attention_dim)
        for index in range(6):
            pipe.unet(sample, scheduler.timesteps.float()[index], encoder_hidden_states=context)
        assert summary(pipe)["reused_calls"] == 4
        for index in range(6):  # CFG as two calls, each indexing its own fresh copy: reset at every step (review)
            for _branch in range(2):
                pipe.unet(sample, scheduler.timesteps.float()[index], encoder_hidden_states=context)
    assert summary(pipe)["reused_calls"] == 8


def _cached_sd_with_two_samples():
    """Tiny SD with DeepCache (interval 3), two latent samples and a text context for direct UNet loops."""
    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
    config = pipe.unet.config
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(1, config.in_channels, 8, 8, generator=generator) for _ in range(2)]
    return pipe, samples, torch.randn(1, 4, config.cross_attention_dim, generator=generator)


@pytest.mark.parametrize("first_loop_passes", ["views", "ints"])
def test_a_direct_loop_restarted_at_the_step_an_unfinished_one_stopped_reuses_none_of_its_features(first_loop_passes):
    """A loop over steps 0-4 stopped, then a loop over a new schedule from step 4 (a step run, then the whole loop):
    the restart's first call was taken for a CFG-style repeat and its next call reused the stopped loop's step-4
    features (1.03 off; session 47 review). After a loop of views its first two calls now compute; after a loop of
    ints its first view resets at once."""
    from diffusers import DDIMScheduler

    pipe, samples, context = _cached_sd_with_two_samples()

    def loop(sample, start, stop, as_int=False):
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(10)
        with torch.no_grad():
            return [pipe.unet(sample, int(t) if as_int else t, encoder_hidden_states=context).sample
                    for t in scheduler.timesteps[start:stop]]

    loop(samples[0], 0, 5, as_int=first_loop_passes == "ints")
    restarted = loop(samples[1], 4, 6)
    remove_cache(pipe)
    if first_loop_passes == "ints":  # the restart's first view resets at once: a fresh cached run's outputs
        enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
    expected = loop(samples[1], 4, 6)
    assert all(torch.equal(a, b) for a, b in zip(restarted, expected))


def test_two_direct_loops_in_lockstep_keep_their_own_trajectories():
    """Loop A's step i, loop B's step i (each with its own scheduler), A's step i + 1, ...: A continued B's
    trajectory and reused its features (0.6 off A alone) when only one position on continued (session 47 review)."""
    from diffusers import DDIMScheduler

    pipe, samples, context = _cached_sd_with_two_samples()
    schedulers = [DDIMScheduler.from_config(pipe.scheduler.config) for _ in range(2)]
    for scheduler in schedulers:
        scheduler.set_timesteps(6)
    with torch.no_grad():
        alone = [pipe.unet(samples[0], t, encoder_hidden_states=context).sample for t in schedulers[0].timesteps]
        remove_cache(pipe)
        enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
        lockstep = []
        for index in range(6):
            for loop, scheduler in enumerate(schedulers):
                output = pipe.unet(samples[loop], scheduler.timesteps[index], encoder_hidden_states=context).sample
                if loop == 0:
                    lockstep.append(output)
    assert all(torch.equal(a, b) for a, b in zip(alone, lockstep))


def test_a_second_direct_loop_over_a_new_schedule_starts_fresh_after_an_unfinished_one():
    """Loop A over views of its own schedule stopped after 5 of 10 steps, then loop B over a new schedule from step
    7 (below A's last timestep): B continued A's trajectory when direct calls were left to the value check (0.68
    off; session 47 review)."""
    from diffusers import DDIMScheduler

    def loop(pipe, start, stop):
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(10)
        config, generator = pipe.unet.config, torch.Generator().manual_seed(0)
        sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
        context = torch.randn(1, 4, config.cross_attention_dim, generator=generator)
        outputs = []
        with torch.no_grad():
            for timestep in scheduler.timesteps[start:stop]:
                outputs.append(pipe.unet(sample, timestep, encoder_hidden_states=context).sample)
                sample = scheduler.step(outputs[-1], timestep, sample).prev_sample
        return torch.stack(outputs)

    def cached():
        pipe = build_tiny("sd")
        enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
        return pipe

    fresh = loop(cached(), 7, 10)
    pipe = cached()
    loop(pipe, 0, 5)
    assert torch.equal(loop(pipe, 7, 10), fresh)


def test_a_panorama_pipeline_with_its_own_scheduler_caches_as_with_the_shared_one():
    """StableDiffusionPanoramaPipeline restores a deep copy of its scheduler's state before every view, so its
    scheduler.timesteps is a new object at every UNet call: a new-call check on that object reset the cache at every
    call (nothing reused, 0.062 off the shared-scheduler call; session 47 review of the fix above)."""
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

    def panorama(own_scheduler):
        pipe = build_tiny("sd")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
        components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
        if own_scheduler:
            components["scheduler"] = DDIMScheduler.from_config(pipe.scheduler.config)
        sibling = StableDiffusionPanoramaPipeline(**components)
        sibling.set_progress_bar_config(disable=True)
        return sibling(**tiny_call_kwargs("sd", steps=8)).images, summary(pipe)

    (shared, shared_summary), (own, own_summary) = panorama(False), panorama(True)
    assert own_summary["reused_calls"] == shared_summary["reused_calls"] > 0
    assert torch.equal(own, shared)


def test_a_direct_flux_loop_after_an_interrupted_call_of_a_pipeline_with_its_own_scheduler_counts_from_0():
    """The tracker kept the interrupted caller's scheduler: a user's own transformer loop was placed at that call's
    step (3 of 8), each call in a repeat context (default#1, #2, ...), so caches reused across contexts never
    (session 47)."""
    pipe, img2img = _flux_and_an_img2img_sibling()

    def stop(_pipe, step, _timestep, _kwargs):
        if step == 2:
            raise RuntimeError("stopped by the user")
        return {}

    with pytest.raises(RuntimeError, match="stopped by the user"):
        img2img(**tiny_call_kwargs("flux", steps=8), strength=1.0, callback_on_step_end=stop,
                image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    tracker, placed = get_tracker(pipe.transformer), []
    with torch.no_grad():
        for step in range(4):
            pipe.transformer(hidden_states=torch.randn(1, 16, 16), timestep=torch.tensor([1.0 - 0.2 * step]),
                             encoder_hidden_states=torch.randn(1, 8, 32), pooled_projections=torch.randn(1, 32),
                             txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), guidance=None)
            placed.append((tracker.context, tracker.step_index, tracker.num_inference_steps))
    assert placed == [("default", step, None) for step in range(4)]


def _flux_controlnet_pipeline():
    """Tiny FluxControlNetPipeline whose ControlNet residuals are far from zero (its output
    projections start at zero when trained from scratch)."""
    base = build_tiny("flux")
    torch.manual_seed(3)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                parameter.normal_(0, 0.3)
    pipe = FluxControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("config", [BlockCacheConfig(interval=2), DeltaCacheConfig(interval=2),
                                    FirstBlockCacheConfig(threshold=0.3)], ids=lambda c: type(c).__name__)
def test_flux_controlnet_residuals_are_not_counted_twice_on_reuse_steps(config):
    """The transformer's loop adds ControlNet residuals between blocks; reuse steps must not add
    them on top of the cached residual that holds them already (error was 13-20x, now as without)."""
    pipe = _flux_controlnet_pipeline()
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def latents(scale):
        return pipe("a photo", control_image=control, controlnet_conditioning_scale=scale, height=16, width=16,
                    num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="latent").images

    errors = {}
    for scale in (0.0, 1.0):
        reference = latents(scale)
        enable_cache(pipe, config)
        errors[scale] = float((latents(scale) - reference).norm() / reference.norm())
        remove_cache(pipe)
    assert 0 < errors[1.0] < max(2 * errors[0.0], 0.006), errors


@pytest.mark.parametrize("family, config", [
    ("sd", DeepCacheConfig(interval=2, branch=1)), ("ddpm", DeepCacheConfig(interval=2)),
    ("flux", FirstBlockCacheConfig(threshold=0.3)), ("dit", BlockCacheConfig(interval=2)),
    ("sd3", TeaCacheConfig(threshold=0.3)),
])
def test_drop_in_contract(family, config):
    check_drop_in(family, lambda p: enable_cache(p, config))


def test_cache_then_compile_a_block_runs_and_matches_eager():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    enable_cache(pipe, BlockCacheConfig(interval=2))
    eager = _images(pipe, "dit", steps=4)
    pipe.transformer.transformer_blocks[1].compile(backend="eager")
    compiled = _images(pipe, "dit", steps=4)
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert summary(pipe)["reused_calls"] == 2


def test_fit_teacache_coefficients_gives_a_usable_polynomial():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    coefficients = fit_teacache_coefficients(pipe, [1, 3], num_inference_steps=8, degree=2, guidance_scale=1.0)
    assert len(coefficients) == 3 and get_tracker(pipe.transformer) is None
    enable_cache(pipe, TeaCacheConfig(threshold=0.3, coefficients=coefficients))
    assert torch.isfinite(_images(pipe, "dit", steps=8)).all()


def test_calibrate_schedule_meets_the_budget_and_beats_uniform():
    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=6, guidance_scale=1.0)
    assert len(config.full_steps) == 3 and config.full_steps[0] == 0
    base = _images(pipe, "dit", steps=6)
    errors = {}
    for name, cfg in (("calibrated", config), ("uniform", BlockCacheConfig(interval=2))):
        enable_cache(pipe, cfg)
        errors[name] = float((_images(pipe, "dit", steps=6) - base).norm())
        assert summary(pipe)["full_calls"] == 3
        remove_cache(pipe)
    assert errors["calibrated"] <= errors["uniform"] + 1e-6


def test_cache_searches_compare_pil_outputs_when_the_call_asks_for_them():
    """output_type="pil" in a search's call arguments (DiT's own default) failed in torch.as_tensor: "Could not
    infer dtype of Image"; the images are compared as arrays in [0, 1]."""
    from diffusion_accel.cache.runs import final_outputs, planned_calls

    pipe = build_tiny("dit")
    pipe.set_progress_bar_config(disable=True)
    config = calibrate_schedule(pipe, [1], budget=0.5, num_inference_steps=4, guidance_scale=1.0, output_type="pil")
    assert len(config.full_steps) == 2
    calls = planned_calls(pipe, [1], num_inference_steps=2, guidance_scale=1.0, output_type="pil")
    (images,) = final_outputs(pipe, calls)
    assert images.dtype == torch.float32 and images.shape[-1] == 3 and 0 <= images.min() <= images.max() <= 1


def test_calibrating_techniques_refuse_an_enabled_cache_before_changing_anything():
    """Calibration under a cache sees the deep blocks only on recomputing steps (and replay would run
    through the cache): calibrate, quantize_ and prune_ refuse, naming the order; the cache keeps working."""
    import diffusion_accel as da

    calib = da.calibrate(build_tiny("sd"), ["a cat"], num_inference_steps=3, progress=False)
    pipe = build_tiny("sd")
    enable_cache(pipe, DeepCacheConfig(interval=2))
    before = _images(pipe, "sd")
    for action, apply in (("calibrate", lambda: da.calibrate(pipe, ["a cat"], num_inference_steps=3)),
                          ("quantize_", lambda: da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib)),
                          ("prune_", lambda: da.prune_(pipe, da.PruneConfig(sparsity=0.5), calib=calib))):
        with pytest.raises(ValueError, match=rf"{action} needs every block .* da.remove_cache\(pipe\)"):
            apply()
    assert torch.equal(_images(pipe, "sd"), before) and summary(pipe)["reused_calls"] > 0


def test_diffusers_own_cache_and_ours_exclude_each_other_and_calibration():
    """diffusers' CacheMixin.enable_cache stacked its hooks on ours (the images matched neither cache);
    ours already refuses when diffusers' is on. After remove_cache diffusers' works as usual, and then
    calibrate / prune_ refuse it as they refuse ours."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFirstBlockCacheConfig

    from diffusion_accel.calib import calibrate
    from diffusion_accel.prune import PruneConfig, prune_

    pipe = build_tiny("flux")
    enable_cache(pipe, BlockCacheConfig(interval=2))
    with pytest.raises(ValueError, match=r"diffusion_accel's cache is enabled .*remove_cache\(pipe\) first"):
        pipe.transformer.enable_cache(DiffusersFirstBlockCacheConfig(threshold=0.2))
    assert not pipe.transformer.is_cache_enabled
    remove_cache(pipe)
    assert "enable_cache" not in vars(pipe.transformer)
    pipe.transformer.enable_cache(DiffusersFirstBlockCacheConfig(threshold=0.2))
    assert pipe.transformer.is_cache_enabled
    for name, action in [("calibrate", lambda: calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False)),
                         ("prune_", lambda: prune_(pipe, PruneConfig(method="magnitude", sparsity=0.5)))]:
        with pytest.raises(ValueError, match=rf"{name} needs every block .* diffusers' own cache"):
            action()  # statistics through diffusers' cache would miss every skipped block too


@pytest.mark.parametrize("skipped", [[1], [2]], ids=["rear-span-start", "front-span-end"])
def test_delta_cache_spans_with_a_block_the_skip_layer_pass_skips_run_it_plainly(skipped):
    """4 blocks, spans [0, 3) and [1, 4): a skipped span start raised KeyError; a skipped span end recorded no
    delta, yet reuse steps bypassed the span's blocks (their work lost). Such a span now computes on reuse
    steps of that pass."""
    from diffusers import SD3Transformer2DModel

    pipe = build_tiny("sd3")
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel.from_config({**pipe.transformer.config, "num_layers": 4}).eval()
    kwargs = tiny_call_kwargs("sd3", steps=6) | {"guidance_scale": 5.0, "skip_guidance_layers": skipped,
                                                 "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    enable_cache(pipe, DeltaCacheConfig(interval=2, cached_fraction=0.75, boundary=0.0))  # reuse steps: front
    first = pipe(**kwargs).images
    runs = []  # the pass of every computation of block 0 (its norm1 runs only then), which only the front span holds
    pipe.transformer.transformer_blocks[0].norm1.register_forward_pre_hook(
        lambda module, args: runs.append(get_tracker(pipe.transformer).context))
    again = pipe(**(kwargs | {"generator": torch.Generator().manual_seed(0)})).images
    assert torch.isfinite(first).all() and torch.equal(first, again)
    skip_pass = [record for record in summary(pipe)["steps"] if record["context"] == "default#1"]
    reused = sum(not record["computed"] for record in skip_pass)
    if skipped == [2]:  # the front span has no delta in that pass: block 0 runs at each of its steps, reused or not
        assert reused and runs.count("default#1") == len(skip_pass)


@pytest.mark.parametrize("config", [BlockCacheConfig(interval=2), TeaCacheConfig(threshold=0.3),
                                    DeltaCacheConfig(interval=2, cached_fraction=1.0)])
def test_sd3_skip_layer_guidance_skipping_the_first_cached_block_runs(config):
    """SD3's skip-layer guidance pass skips block 0, so the last cached block found no stack input
    (KeyError: 'stack_input')."""
    pipe = build_tiny("sd3")
    kwargs = tiny_call_kwargs("sd3", steps=6) | {"guidance_scale": 5.0, "skip_guidance_layers": [0],
                                                 "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    enable_cache(pipe, config)
    first = pipe(**kwargs).images
    again = pipe(**(kwargs | {"generator": torch.Generator().manual_seed(0)})).images
    assert torch.isfinite(first).all() and torch.equal(first, again)


def test_calls_repeating_one_step_past_the_context_cap_never_reuse_a_shared_context(monkeypatch):
    """A loop calling the UNet once per tile at each step (MultiDiffusion / panorama views) put every call past
    the ninth in one context: on reuse steps they all got the last tile's features (max diff 0.147 on 11 views).
    With the cap at 0 both views (width 576: the panorama pipeline counts 8 px per latent) share one context: the
    cached pipeline now computes every call there,
    giving the uncached images exactly."""
    from diffusers import StableDiffusionPanoramaPipeline

    from diffusion_accel import hooks

    sd = build_tiny("sd")
    pipe = StableDiffusionPanoramaPipeline(**{key: value for key, value in sd.components.items()
                                              if key != "image_encoder"})
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a photo of a red bicycle", height=32, width=576, num_inference_steps=4, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    uncached = run()
    monkeypatch.setattr(hooks, "MAX_REPEAT_CONTEXTS", 0)
    enable_cache(pipe, DeepCacheConfig(interval=2))
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert torch.equal(run(), uncached)
    handle.remove()
    records = summary(pipe)["steps"]
    assert {record["context"] for record in records} == {"default"} and all(r["computed"] for r in records)
    assert len(records) == len(calls) == 8  # one per view and step: once per step under-counted (session 50)


@pytest.mark.parametrize("config", [FirstBlockCacheConfig(threshold=0.3), TeaCacheConfig(threshold=0.3)])
def test_summary_counts_skip_layer_guidance_calls_that_skip_the_head_block(config):
    """SD3's skip-layer guidance skipping block 0 bypasses the head policy's decision: those 5 of 11 calls were
    missing from summary() until session 41."""
    pipe = build_tiny("sd3")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    enable_cache(pipe, config)
    _images(pipe, "sd3", steps=6, guidance_scale=5.0, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0)
    report = summary(pipe)
    assert report["denoiser_calls"] == len(calls) == 11
    assert {record["context"] for record in report["steps"]} == {"default", "default#1"}


@pytest.mark.parametrize("failure", ["error inside the UNet", "refused step count"])
def test_a_sibling_call_after_a_call_that_raised_starts_a_fresh_trajectory(failure):
    """A call raising inside the denoiser (an OOM) or refused by the schedule left its position recorded and no
    call counted: a sibling with a scheduler of its own then ran step 0 in a repeat context and recomputed a reuse
    step (0.048 off), its summary holding the failed call's record too (until session 48)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = build_tiny("sd")
    pipe.set_progress_bar_config(disable=True)
    sibling = StableDiffusionPipeline.from_pipe(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    enable_cache(pipe, CalibratedCacheConfig((0, 2, 4), 6, resample=False))
    clean = sibling(**tiny_call_kwargs("sd", 6)).images
    clean_records = summary(pipe)["steps"]
    if failure == "refused step count":
        with pytest.raises(ValueError, match="calibrated for 6"):
            pipe(**tiny_call_kwargs("sd", 8))
        assert not get_tracker(pipe.unet).in_call
    else:
        def fail(*_):
            raise RuntimeError("out of memory")

        handle = pipe.unet.conv_in.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            pipe(**tiny_call_kwargs("sd", 6))
        handle.remove()
        assert get_tracker(pipe.unet).in_call  # no hook runs after an error in the forward: the next call ends it
    assert torch.equal(torch.as_tensor(sibling(**tiny_call_kwargs("sd", 6)).images), torch.as_tensor(clean))
    assert summary(pipe)["steps"] == clean_records
