"""The hook engine: step counting per context, reset per pipeline call, clean removal."""

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_accel.arch import find_denoiser
from diffusion_accel.hooks import (ModuleHooks, attach_tracker, detach_tracker_if_unused,
                                   get_tracker, use_tracker)
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs


class AddOne(nn.Module):
    """Denoiser stand-in: output = sample + 1."""

    def forward(self, sample, timestep=None):
        return sample + 1


def test_step_index_counts_calls_and_records_timestep():
    model = AddOne()
    seen = []
    with use_tracker(model, "probe") as tracker:
        for t in (999, 500, 1):
            model(torch.zeros(1), timestep=torch.tensor([t]))
            seen.append((tracker.step_index, tracker.timestep))
    assert seen == [(0, 999.0), (1, 500.0), (2, 1.0)]
    assert get_tracker(model) is None


def test_pipeline_calls_never_read_the_timestep_value(monkeypatch):
    """A GPU tensor's .item() waits for the device: the tracker must not pay it when the watched
    scheduler vouches for the call (the timestep is a view of its timesteps: SD, SDXL, SD3, PixArt,
    DiT, DDPM), nor on Flux, which diffusers resets itself at the end of every call."""
    from diffusion_accel import hooks

    reads = []
    real = hooks._scalar_timestep
    monkeypatch.setattr(hooks, "_scalar_timestep", lambda value: reads.append(1) or real(value))
    for family in ("sd", "flux"):
        pipe = build_tiny(family)
        with use_tracker(find_denoiser(pipe)[1], "probe", pipeline=pipe) as tracker:
            pipe(**tiny_call_kwargs(family, steps=2))
            assert reads == []
            assert tracker.timestep is not None and tracker.timestep == tracker.timestep
            assert reads == [1]  # converted once when asked, then remembered
        reads.clear()


def test_a_bare_denoiser_starts_a_new_trajectory_when_the_timestep_rises():
    """No pipeline vouches for the calls (a custom sampling loop): the timestep value decides."""
    model, seen = AddOne(), []
    with use_tracker(model, "probe") as tracker:
        for t in (900, 500, 100, 900, 400, 400):  # the last repeats a timestep, as Heun's second stage does
            model(torch.zeros(1), torch.tensor([t]))
            seen.append(tracker.step_index)
    assert seen == [0, 1, 2, 0, 1, 2]


def test_a_pipeline_sharing_the_denoiser_with_its_own_scheduler_gets_fresh_state():
    """The tracker watches the scheduler of the pipeline it was attached with; a pipeline built from
    its components with another scheduler, or one outliving it, still starts every call at step 0."""
    import gc

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = build_tiny("sd")
    other = StableDiffusionPipeline(**{**pipe.components,
                                       "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    steps: list[int] = []
    with use_tracker(pipe.unet, "probe", pipeline=pipe) as tracker:
        with ModuleHooks() as module_hooks:
            module_hooks.pre(pipe.unet.conv_in, lambda module, args: steps.append(tracker.step_index))
            pipe(**tiny_call_kwargs("sd", steps=3))
            other(**tiny_call_kwargs("sd", steps=3))
            other(**tiny_call_kwargs("sd", steps=3))
            del pipe
            gc.collect()
            other(**tiny_call_kwargs("sd", steps=3))
    assert steps == [0, 1, 2] * 4


def test_tracker_resets_on_new_pipeline_call():
    pipe = build_tiny("sd")
    steps_per_call: list[list[int]] = [[], []]
    call_number = {"n": 0}
    with use_tracker(pipe.unet, "probe", pipeline=pipe,
                     on_reset=lambda: call_number.__setitem__("n", call_number["n"] + 1)) as tracker:
        def record(module, args):
            steps_per_call[call_number["n"] - 1].append(tracker.step_index)
        with ModuleHooks() as hooks:
            hooks.pre(pipe.unet.conv_in, record)
            pipe(**tiny_call_kwargs("sd", steps=3))
            pipe(**tiny_call_kwargs("sd", steps=3))
    assert steps_per_call == [[0, 1, 2], [0, 1, 2]]


def test_cache_context_keeps_separate_counters_and_state():
    pipe = build_tiny("flux")
    transformer = pipe.transformer
    with use_tracker(transformer, "probe") as tracker:
        inputs = _flux_inputs(transformer)
        observed = []
        for _ in range(2):
            for name in ("cond", "uncond"):
                with transformer.cache_context(name):
                    transformer(**inputs)
                    observed.append((tracker.context, tracker.step_index))
                    tracker.state("probe")["calls"] = tracker.state("probe").get("calls", 0) + 1
        assert observed == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]
        assert tracker.state("probe", "cond")["calls"] == 2
        assert tracker.state("probe", "uncond")["calls"] == 2


def _flux_inputs(transformer):
    tokens, text_tokens = 16, 4
    return dict(
        hidden_states=torch.randn(1, tokens, transformer.config.in_channels),
        encoder_hidden_states=torch.randn(1, text_tokens, transformer.config.joint_attention_dim),
        pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3),
    )


def test_tracker_detached_after_exception_and_shared_between_clients():
    model = AddOne()
    with pytest.raises(RuntimeError):
        with use_tracker(model, "a"):
            with use_tracker(model, "b") as tracker:
                assert sorted(tracker.client_names) == ["a", "b"]
                raise RuntimeError("boom")
    assert get_tracker(model) is None
    assert model(torch.zeros(1)).item() == 1.0


def test_detach_keeps_tracker_in_use():
    model = AddOne()
    tracker = attach_tracker(model)
    tracker.register_client("x")
    assert detach_tracker_if_unused(model) is False
    tracker.unregister_client("x")
    assert detach_tracker_if_unused(model) is True


def test_state_of_unknown_client_is_a_clear_error():
    model = AddOne()
    with use_tracker(model, "a") as tracker:
        with pytest.raises(KeyError, match="registered"):
            tracker.state("nope")


def test_module_hooks_removed_even_after_exception():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError):
        with ModuleHooks() as hooks:
            hooks.pre(layer, lambda m, a: None)
            hooks.post(layer, lambda m, a, o: None)
            assert len(hooks) == 2
            raise ValueError("stop")
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_pin_reports_a_given_step_and_context_until_unpinned():
    model = AddOne()
    with use_tracker(model, "probe") as tracker:
        tracker.pin(7, "uncond")
        model(torch.zeros(1))
        assert (tracker.step_index, tracker.context) == (7, "uncond")
        tracker.unpin()
        model(torch.zeros(1))
        assert tracker.context == "default"
        with pytest.raises(ValueError, match="step_index"):
            tracker.pin(-1)


def test_a_pin_after_a_call_that_raised_reports_its_step():
    """The next call ended the failed call by resetting the tracker, which dropped the pin: a replay after an OOM
    was placed at step 0 (session 48 review)."""
    class FailsOnce(AddOne):
        failed = False

        def forward(self, sample, timestep=None):
            if not self.failed:
                self.failed = True
                raise RuntimeError("out of memory")
            return super().forward(sample, timestep)

    model = FailsOnce()
    with use_tracker(model, "probe") as tracker:
        with pytest.raises(RuntimeError, match="out of memory"):
            model(torch.zeros(1))
        assert tracker.in_call
        tracker.pin(3)
        model(torch.zeros(1))
        assert tracker.step_index == 3 and not tracker.in_call


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_a_transformer_called_with_a_positional_timestep_reports_it(family):
    """PixArt, SD3 and Flux take the timestep third or fourth: a positional call reported the text embeddings'
    first value as its timestep (timestep groups then picked another group's scales; session 48 review)."""
    import inspect

    pipe = build_tiny(family)
    denoiser = find_denoiser(pipe)[1]
    names = list(inspect.signature(type(denoiser).forward).parameters)[1:]
    generator = torch.Generator().manual_seed(0)
    config = denoiser.config
    inputs = {"hidden_states": torch.randn(1, config.in_channels, 4, 4, generator=generator),
              "encoder_hidden_states": torch.randn(1, 3, config.get("joint_attention_dim") or
                                                   config.get("caption_channels") or config.cross_attention_dim,
                                                   generator=generator),
              "timestep": torch.tensor([0.9 if family == "flux" else 900.0])}
    if family == "flux":
        inputs["hidden_states"] = torch.randn(1, 4, config.in_channels, generator=generator)
        inputs |= {"pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
                   "txt_ids": torch.zeros(3, 3), "img_ids": torch.zeros(4, 3)}
    elif family == "sd3":
        inputs["pooled_projections"] = torch.randn(1, config.pooled_projection_dim, generator=generator)
    elif family == "pixart":
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    position = names.index("timestep")
    positional = [inputs.pop(name) for name in names[:position + 1]]
    with use_tracker(denoiser, "probe") as tracker, torch.no_grad():
        denoiser(*positional, **inputs)
        assert tracker.timestep == pytest.approx(float(positional[position]))


def test_a_custom_denoiser_taking_its_timestep_second_before_varargs_reports_it():
    """forward(self, sample, t, *extra) named no timestep: the *args made its position unknown (session 48 review),
    and a second direct loop continued the first one's step count."""

    class WithExtras(nn.Module):
        def forward(self, sample, t, *extra, **options):
            return sample + 1

    model = WithExtras()
    with use_tracker(model, "probe") as tracker:
        steps = []
        for _ in range(2):
            for t in (900, 500, 100):
                model(torch.zeros(1), torch.tensor(t))
                steps.append(tracker.step_index)
        assert tracker.timestep == 100.0 and steps == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("timestep", [np.int64(900), np.int32(900), np.float32(900.0), np.array([900])],
                         ids=["int64", "int32", "float32", "array"])
def test_numpy_timesteps_are_read(timestep):
    """np.int64 timesteps (a loop over scheduler.timesteps.numpy()) were taken for none: timestep groups fell back
    to counting calls (session 48 review)."""
    model = AddOne()
    with use_tracker(model, "probe") as tracker:
        model(torch.zeros(1), timestep)
        assert tracker.timestep == 900.0


def test_detach_leaves_the_module_as_it_was():
    model = AddOne()
    with use_tracker(model, "probe"):
        pass
    assert "forward" not in vars(model) and not hasattr(model, "_diffusers_hook")


def test_a_sibling_pipeline_with_its_own_scheduler_is_placed_by_it_after_the_watched_one_ran():
    """After a text-to-image call made before the tracker was attached (or a calibration restored the watched
    scheduler), the first call of a FluxImg2ImgPipeline with a scheduler of its own was counted from 0 as a new run
    of the watched pipeline: a Δ-cache's first img2img call differed from the second (0.0115 on latents of 3.4)."""
    import diffusion_accel as da
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    flux = build_tiny("flux")
    flux.set_progress_bar_config(disable=True)
    flux(prompt="x", num_inference_steps=8, height=16, width=16, output_type="latent")  # before any tracker
    da.enable_cache(flux, da.DeltaCacheConfig(interval=2, cached_fraction=0.5, boundary=0.5))
    sibling = FluxImg2ImgPipeline.from_pipe(flux, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
        flux.scheduler.config))
    sibling.set_progress_bar_config(disable=True)
    tracker, positions = get_tracker(flux.transformer), []
    flux.transformer.register_forward_hook(lambda *args: positions.append(tracker.step_index))
    latents = [sibling(prompt="a cat", image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
                       strength=0.5, num_inference_steps=8, height=16, width=16, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    assert positions == [4, 5, 6, 7] * 2 and torch.equal(latents[0], latents[1])


def test_copying_a_cached_denoiser_under_layerwise_casting_is_a_clear_error():
    """diffusers' layerwise-casting hook cannot be removed, so rebuilding the copy's chain raised its
    "does not support deinitialization" NotImplementedError."""
    import copy

    import diffusion_accel as da

    pipe = build_tiny("sd")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    with pytest.raises(TypeError, match=r"cannot copy.deepcopy .* layerwise casting .*before enable_layerwise_casting"):
        copy.deepcopy(pipe.unet)
    assert torch.isfinite(pipe(**tiny_call_kwargs("sd", steps=2)).images).all()


def _direct_loop(pipe, family, args, kwargs, steps=5):
    """A user's own sampling loop: the denoiser called with fresh timestep tensors, no pipeline on the stack."""
    _, denoiser = find_denoiser(pipe)
    outputs, lengths = [], []
    for index in range(steps):
        timestep = torch.full((1,), (1.0 - index / steps) * (1 if family == "flux" else 999))
        call_args, call_kwargs = list(args), dict(kwargs)
        if len(call_args) > 1:
            call_args[1] = timestep
        else:
            call_kwargs["timestep"] = timestep
        with torch.no_grad():
            outputs.append(denoiser(*call_args, **call_kwargs)[0])
        lengths.append(get_tracker(denoiser).num_inference_steps)
    return outputs, lengths


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("pipeline_first", [True, False])
def test_direct_denoiser_loops_of_a_cached_pipeline_repeat_exactly(family, pipeline_first):
    """Flux (a CacheMixin) called directly never started a new trajectory, so a second loop reused the first's
    features; a loop after the pipeline ran before enable_cache was placed on that call's finished schedule."""
    import diffusion_accel as da
    from diffusion_accel.cache.configs import BlockCacheConfig, DeepCacheConfig

    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny(family)
    if family == "sd":  # a scheduler that counts its steps (DDIM keeps no step_index: see docs/architecture.md)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    _, denoiser = find_denoiser(pipe)
    captured = []
    handle = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append((args, dict(kwargs))) if not captured else None, with_kwargs=True)
    pipe(**tiny_call_kwargs(family, steps=2))
    handle.remove()
    da.enable_cache(pipe, BlockCacheConfig(interval=3) if family == "flux" else DeepCacheConfig(interval=3))
    if not pipeline_first:
        pipe(**tiny_call_kwargs(family, steps=2))
    first, lengths = _direct_loop(pipe, family, *captured[0])
    second, _ = _direct_loop(pipe, family, *captured[0])
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and lengths == [None] * 5
    assert [row["computed"] for row in da.cache_summary(pipe)["steps"]][-5:] == [True, False, False, True, False]
