"""Trajectory calibration: step selection and weights, collectors, the pipeline runner, replay."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_accel.calib import (Calibration, Collector, FeatureChangeProbe, HessianCollector,
                                   RangeObserver, SampleStore, Step, ValueReservoir, calibrate,
                                   call_mode, denoiser_steps, quantization_mse, select_steps, step_weights)
from diffusion_accel.hooks import get_tracker, use_tracker
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

SD_SIZE = {"height": 32, "width": 32}
SD_LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SD_CONV = "down_blocks.0.resnets.0.conv1"


class Recorder(Collector):
    """Test collector: keeps every tensor it is given, with its step."""

    def __init__(self, module_names, wants="input"):
        super().__init__(module_names)
        self.wants = wants
        self.seen: list[tuple[str, torch.Tensor, Step]] = []

    def observe(self, name, value, step):
        self.seen.append((name, value.detach().clone(), step))

    @property
    def rows(self) -> int:
        return sum(tensor.shape[0] for _, tensor, _ in self.seen)


class FailAtStep(Collector):
    """Raises when it sees ``step_index``."""

    def __init__(self, module_names, step_index):
        super().__init__(module_names)
        self.step_index = step_index

    def observe(self, name, value, step):
        if step.step_index == self.step_index:
            raise RuntimeError(f"collector failed at step {step.step_index}")



@pytest.fixture(scope="module")
def sd_pipe():
    pipe = build_tiny("sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_pipeline_clean(pipe, denoiser, bar_config=None):
    """No torch hook on any denoiser module, no step tracker, the pipeline's bar config as before."""
    assert get_tracker(denoiser) is None
    for name, module in denoiser.named_modules():
        assert not module._forward_pre_hooks, name
        assert not module._forward_hooks, name
    assert pipe.__dict__.get("_progress_bar_config") == bar_config


# ----- schedule ---------------------------------------------------------------------------------

def test_uniform_selection_picks_q_diffusion_steps():
    assert select_steps(25, "uniform:5") == [0, 5, 10, 15, 20]
    assert select_steps(50, "uniform:25") == list(range(0, 50, 2))
    assert select_steps(10, "uniform:3") == [0, 3, 6, 9]   # the authors' code keeps range(0, n, n // K)
    assert select_steps(4, "all") == [0, 1, 2, 3]
    assert select_steps(10, "every:4") == [0, 4, 8]
    assert select_steps(10, [7, 2, 2]) == [2, 7]


@pytest.mark.parametrize("selection, error, words", [
    ([0, 7], ValueError, ["step index 7", "0..4"]),
    ([-1], ValueError, ["step index -1", "0..4"]),
    ("random", ValueError, ["'random'", '"all"', '"uniform:K"']),
    ("uniform:0", ValueError, ["[1, 5]"]),
    ("uniform:9", ValueError, ["[1, 5]"]),
    ([], ValueError, ["empty"]),
    ([1.5], TypeError, ["1.5"]),
])
def test_select_steps_rejects_bad_selections(selection, error, words):
    with pytest.raises(error) as info:
        select_steps(5, selection)
    for word in words:
        assert word in str(info.value)


def test_a_step_count_past_the_limit_is_refused_before_listing_its_steps():
    """A PTQConfig (or an artifact's) calib_num_steps of 1e7 built a 0.4 GB list while validating; 2e9 ~ 70 GB."""
    from diffusion_accel import PTQConfig

    with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, 100000\], got 10000000000"):
        select_steps(10 ** 10, "all")
    with pytest.raises(ValueError, match=r"calib_num_steps=2000000000: num_inference_steps must be an int in"):
        PTQConfig(calib_num_steps=2_000_000_000)


def test_log_decrease_weights_match_obs_diff_formula():
    T, w_min, w_max = 25, 0.8, 1.2
    weights = step_weights(T, "log-decrease", w_min, w_max)
    expected = [w_min + (w_max - w_min) * math.log(T - k) / math.log(T) for k in range(T)]
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-6)
    assert weights[0] == pytest.approx(1.2) and weights[-1] == pytest.approx(0.8)
    assert torch.allclose(step_weights(T, "log-increase"), weights.flip(0))
    linear = step_weights(5, "linear")
    assert torch.allclose(linear, torch.tensor([1.2, 1.1, 1.0, 0.9, 0.8]))
    assert torch.equal(step_weights(3), torch.ones(3))
    assert step_weights(1, "log-decrease").tolist() == [pytest.approx(1.2)]
    with pytest.raises(ValueError, match="log-decrease"):
        step_weights(5, "exponential")
    with pytest.raises(ValueError, match="w_min"):
        step_weights(5, "linear", w_min=1.5, w_max=1.0)


# ----- collectors by hand -----------------------------------------------------------------------

def test_linear_hessian_equals_hand_computed_weighted_xxt():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(5, 3))
    collector = HessianCollector(["0"])
    collector.bind(layer)
    weights = step_weights(3, "log-decrease")
    inputs = [torch.randn(2, 4, 5) for _ in range(3)]
    for k, x in enumerate(inputs):
        collector.observe("0", x, Step(k, weight=float(weights[k])))
    rows = [x.reshape(-1, 5) for x in inputs]
    numerator = sum(weights[k] * rows[k].T @ rows[k] for k in range(3))
    normalizer = sum(weights[k] * rows[k].shape[0] for k in range(3))
    assert torch.allclose(collector.hessian("0"), 2 * numerator / normalizer, atol=1e-6)
    assert torch.allclose(collector.input_sq_norms("0"), sum(r.pow(2).sum(0) for r in rows), atol=1e-5)
    assert collector.num_rows("0") == 24 and collector.rows_per_step("0") == {0: 8, 1: 8, 2: 8}


def test_hessian_in_pipeline_equals_weighted_xxt_of_hooked_inputs(sd_pipe):
    recorder = Recorder([SD_LINEAR])
    hessian = HessianCollector([SD_LINEAR])
    calib = calibrate(sd_pipe, ["a red bicycle", "a cat"], 3, collectors=[recorder, hessian],
                      weighting="log-decrease", progress=False, **SD_SIZE)
    weights = step_weights(3, "log-decrease")
    rows = [(tensor.reshape(-1, tensor.shape[-1]), step) for _, tensor, step in recorder.seen]
    assert all(step.weight == pytest.approx(float(weights[step.step_index])) for _, step in rows)
    numerator = sum(step.weight * x.T @ x for x, step in rows)
    normalizer = sum(step.weight * x.shape[0] for x, step in rows)
    assert torch.allclose(hessian.hessian(SD_LINEAR), 2 * numerator / normalizer, rtol=1e-4, atol=1e-6)
    assert calib.step_weights.tolist() == pytest.approx(weights.tolist())


def _patches_by_hand(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patch rows (B * L, C * kh * kw) gathered with explicit loops (independent of F.unfold)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                window = padded[b, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
                rows.append(window.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("conv_kwargs", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=1, padding=(2, 1), dilation=(2, 1)),
])
def test_conv_hessian_equals_linear_hessian_on_unfolded_patches(conv_kwargs):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, **conv_kwargs)
    model = nn.ModuleDict({"conv": conv, "linear": nn.Linear(conv.weight[0].numel(), 4)})
    collector = HessianCollector(["conv", "linear"])
    collector.bind(model)
    for k, weight in enumerate((1.2, 0.9)):
        x = torch.randn(2, 3, 7, 6)
        patches = _patches_by_hand(x, conv)
        conv_as_linear = (patches @ conv.weight.reshape(4, -1).T + conv.bias).reshape(2, -1, 4)
        assert torch.allclose(conv_as_linear, conv(x).flatten(2).transpose(1, 2), atol=1e-5)
        collector.observe("conv", x, Step(k, weight=weight))
        collector.observe("linear", patches, Step(k, weight=weight))
    assert torch.allclose(collector.hessian("conv"), collector.hessian("linear"), atol=1e-5)
    assert collector.num_rows("conv") == collector.num_rows("linear")


def test_hessian_rejects_unsupported_layers():
    model = nn.Sequential(nn.Linear(2, 2), nn.Conv2d(4, 4, 3, groups=2), nn.GroupNorm(1, 4))
    with pytest.raises(TypeError, match="groups=2"):
        HessianCollector(["1"]).bind(model)
    with pytest.raises(TypeError, match="GroupNorm.*Linear"):
        HessianCollector(["2"]).bind(model)


def test_range_observers_minmax_percentile_and_mse():
    torch.manual_seed(2)
    tensors = [torch.distributions.StudentT(1.5).sample((4, 2000)) for _ in range(3)]
    seen = torch.cat([t.reshape(-1) for t in tensors])
    observers = {method: RangeObserver(["m"], method=method, percentile=99.0, bits=4, per_step=True)
                 for method in ("minmax", "percentile", "mse")}
    for k, tensor in enumerate(tensors):
        for observer in observers.values():
            observer.observe("m", tensor, Step(k))
    lo, hi = seen.min().item(), seen.max().item()
    assert observers["minmax"].range("m") == (pytest.approx(lo), pytest.approx(hi))
    assert observers["minmax"].step_ranges("m")[1] == (pytest.approx(tensors[1].min().item()),
                                                        pytest.approx(tensors[1].max().item()))
    for method in ("percentile", "mse"):
        r_lo, r_hi = observers[method].range("m")
        assert lo <= r_lo < r_hi <= hi and (r_lo, r_hi) != (lo, hi)
        assert observers[method].minmax("m") == (pytest.approx(lo), pytest.approx(hi))
    assert quantization_mse(seen, *observers["mse"].range("m"), 4) < quantization_mse(seen, lo, hi, 4)
    assert len(observers["mse"].sample("m")) == seen.numel()   # under sample_size: the search sees all


def test_reservoir_is_bounded_and_samples_seen_values():
    reservoir = ValueReservoir(100, seed=0)
    for start in range(0, 10_000, 1000):
        reservoir.add(torch.arange(start, start + 1000, dtype=torch.float32))
    assert len(reservoir.values) == 100 and reservoir.seen == 10_000
    assert len(set(reservoir.values.tolist())) == 100
    assert 3000 < reservoir.values.mean().item() < 7000   # drawn from the whole stream


def test_reservoir_batched_merges_keep_the_smallest_keys_as_merging_every_tensor():
    class MergeEveryTensor(ValueReservoir):
        def add(self, tensor):
            super().add(tensor)
            self._merge()

    stream = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (5, 700, 90, 3000, 1, 2500, 40)]
    for capacity in (64, 1000, 10_000):
        batched, eager = ValueReservoir(capacity, seed=3), MergeEveryTensor(capacity, seed=3)
        for tensor in stream:
            batched.add(tensor)
            eager.add(tensor)
        assert torch.equal(batched.values, eager.values) and torch.equal(batched.keys, eager.keys)
        assert len(batched.values) == min(capacity, sum(t.numel() for t in stream))


def test_feature_change_probe_relative_l1_by_hand():
    probe = FeatureChangeProbe(["block"])
    for k, value in enumerate((1.0, 3.0, 1.5)):
        probe.observe("block", torch.full((2, 4), value), Step(k, timestep=1000.0 - k))
    probe.observe("block", torch.full((2, 4), 9.0), Step(0))   # a new trajectory starts
    records = probe.records["block"]
    assert [r.rel_l1 for r in records] == [None, pytest.approx(2.0), pytest.approx(0.5), None]
    assert records[1].previous_step == 0 and records[1].l2_norm == pytest.approx(3.0 * math.sqrt(8))
    assert probe.mean_change("block") == {1: pytest.approx(2.0), 2: pytest.approx(0.5)}
    assert probe.mean_abs("block")[0] == pytest.approx(5.0)


# ----- the runner -------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance, cfg_factor", [(7.5, 2), (1.0, 1)])
def test_collectors_see_prompts_times_steps_times_cfg(sd_pipe, guidance, cfg_factor):
    prompts, steps, images = ["a", "b", "c"], 2, 2
    recorder = Recorder([SD_CONV])
    calib = calibrate(sd_pipe, prompts, steps, collectors=[recorder], guidance_scale=guidance,
                      batch_size=2, num_images_per_prompt=images, progress=False, **SD_SIZE)
    rows = len(prompts) * images * steps * cfg_factor
    assert len(recorder.seen) == 2 * steps                 # 2 pipeline calls (batches of 2 + 1) x steps
    assert recorder.rows == rows == calib.observed_rows
    assert calib.denoiser_calls == calib.observed_calls == 2 * steps
    assert [step.step_index for _, _, step in recorder.seen] == [0, 1, 0, 1]
    assert calib.seeds == [0, 1]
    assert sorted(record.batch for record in calib.trajectory) == sorted([4 * cfg_factor] * 2 + [2 * cfg_factor] * 2)


def test_selected_steps_only_and_timesteps_recorded(sd_pipe):
    recorder = Recorder([SD_CONV])
    calib = calibrate(sd_pipe, "a cat", 4, collectors=recorder, steps=[1, 3], progress=False, **SD_SIZE)
    assert [step.step_index for _, _, step in recorder.seen] == [1, 3]
    assert calib.denoiser_calls == 4 and calib.observed_calls == 2
    assert list(calib.timesteps) == [0, 1, 2, 3]
    assert [step.timestep for _, _, step in recorder.seen] == [calib.timesteps[1], calib.timesteps[3]]
    assert [record.step.step_index for record in calib.trajectory] == [1, 3]


def test_img2img_calibrates_the_steps_it_runs_and_says_which_selected_ones_it_missed():
    """strength 0.3 of 10 steps runs steps 7..9: those are recorded as such; selected steps that never
    run give a warning (some ran) or a clear error (none ran) naming the steps that did."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**build_tiny("sd").components)
    kwargs = dict(image=torch.rand(1, 3, 32, 32), strength=0.3, progress=False)
    calib = calibrate(pipe, ["a cat"], num_inference_steps=10, **kwargs)
    assert sorted(calib.timesteps) == [7, 8, 9] and calib.counts.observed_calls == 3
    with pytest.warns(UserWarning, match=r"steps \[0, 3, 6\] did not run: the pipeline ran steps 7..9 of 10"):
        calibrate(pipe, ["a cat"], num_inference_steps=10, steps=[0, 3, 6, 9], **kwargs)
    with pytest.raises(ValueError, match=r"none of the selected calibration steps \[0, 5\] ran: .* steps 7..9"):
        calibrate(pipe, ["a cat"], num_inference_steps=10, steps=[0, 5], **kwargs)
    # a strength that runs no step gave an empty calibration, silently: prune_ then pruned nothing (session 49)
    none_run = dict(kwargs, strength=0.05)
    with pytest.raises(ValueError, match="the pipeline made no denoiser call in 10 steps"):
        calibrate(pipe, ["a cat"], num_inference_steps=10, **none_run)
    import diffusion_accel as da

    with pytest.raises(ValueError, match="the pipeline made no denoiser call in 10 steps"):
        da.calibrate_schedule(pipe, ["a cat"], budget=0.5, num_inference_steps=10, image=kwargs["image"],
                              strength=0.05)


def _with_scheduler(name, **overrides):
    import diffusers

    pipe = build_tiny("sd")
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_denoiser_steps_follow_the_scheduler():
    """Second-order schedulers call the denoiser 2N - 1 times for N steps, PNDM N + 1 (SD 1.5's default,
    without its Runge-Kutta warm-up); Flux's dynamic shifting needs ``mu`` to set timesteps at all."""
    flux = build_tiny("flux")
    flux.scheduler = flux.scheduler.from_config(flux.scheduler.config, use_dynamic_shifting=True)
    assert denoiser_steps(flux, 6) == 6 and denoiser_steps(build_tiny("sd"), 6) == 6
    assert denoiser_steps(_with_scheduler("HeunDiscreteScheduler"), 6) == 11
    assert denoiser_steps(_with_scheduler("KDPM2DiscreteScheduler"), 6) == 11
    assert denoiser_steps(_with_scheduler("PNDMScheduler", skip_prk_steps=True), 50) == 51
    pipe = _with_scheduler("HeunDiscreteScheduler")
    pipe.scheduler.set_timesteps(3)
    before = pipe.scheduler.timesteps.clone()
    assert denoiser_steps(pipe, 6) == 11 and torch.equal(pipe.scheduler.timesteps, before)  # a copy is set
    assert denoiser_steps(object(), 7) == 7


def test_second_order_scheduler_calibrates_its_whole_trajectory():
    """Heun at 4 steps calls the denoiser 7 times: "all" and "uniform:K" select among those 7 (they
    used to cover the first 4 only: the noisier half), and each gets its weight."""
    pipe = _with_scheduler("HeunDiscreteScheduler")
    recorder = Recorder([SD_CONV])
    calib = calibrate(pipe, "a cat", 4, collectors=recorder, guidance_scale=1.0, weighting="log-decrease",
                      progress=False, **SD_SIZE)
    assert calib.num_steps == 7 and calib.selected_steps == list(range(7)) and len(calib.step_weights) == 7
    assert [step.step_index for _, _, step in recorder.seen] == list(range(7))
    assert calib.denoiser_calls == calib.observed_calls == 7 and sorted(calib.timesteps) == list(range(7))
    uniform = calibrate(pipe, "a cat", 4, steps="uniform:3", guidance_scale=1.0, progress=False, **SD_SIZE)
    assert uniform.selected_steps == [0, 2, 4, 6]
    assert "4 (7 denoiser steps)" in uniform.summary()


def test_flux_true_cfg_counts_cond_and_uncond_contexts():
    pipe = build_tiny("flux")
    recorder = Recorder(["transformer_blocks.0.attn.to_q"])
    calib = calibrate(pipe, ["a cat", "a dog"], 2, collectors=recorder, negative_prompt="blurry",
                      true_cfg_scale=2.0, height=16, width=16, progress=False)
    assert calib.counts.calls_per_context == {"cond": 2 * 2, "uncond": 2 * 2}
    assert [(s.context, s.step_index) for _, _, s in recorder.seen[:4]] == [
        ("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]


def test_one_negative_prompt_string_serves_a_batch_of_prompts(sd_pipe):
    """StableDiffusionPipeline refuses a str negative_prompt beside a list of prompts; calibrate
    passes one copy per prompt (it raised diffusers' TypeError)."""
    calib = calibrate(sd_pipe, ["a cat", "a dog"], 2, negative_prompt="blurry", batch_size=2, progress=False,
                      **SD_SIZE)
    assert calib.denoiser_calls == 2


def test_hooks_removed_after_success_and_after_exception(sd_pipe):
    calibrate(sd_pipe, "a cat", 2, collectors=[HessianCollector([SD_LINEAR, SD_CONV])], progress=False,
              **SD_SIZE)
    assert_pipeline_clean(sd_pipe, sd_pipe.unet, {"disable": True})
    with pytest.raises(RuntimeError, match="failed at step 1"):
        calibrate(sd_pipe, "a cat", 3, collectors=[FailAtStep([SD_LINEAR], 1), RangeObserver([SD_CONV])],
                  progress=False, **SD_SIZE)
    assert_pipeline_clean(sd_pipe, sd_pipe.unet, {"disable": True})


def test_pipeline_images_identical_before_and_after_calibrate():
    pipe = build_tiny("sd")
    before = pipe(**tiny_call_kwargs("sd", steps=2)).images
    bar_config = pipe._progress_bar_config
    calibrate(pipe, ["a red bicycle", "a cat"], 2, collectors=[RangeObserver([SD_CONV], method="mse"),
              FeatureChangeProbe(["mid_block"])], progress=False, **SD_SIZE)
    after = pipe(**tiny_call_kwargs("sd", steps=2)).images
    assert torch.equal(before, after)
    assert_pipeline_clean(pipe, pipe.unet, bar_config)


def test_replay_reproduces_live_statistics(sd_pipe):
    def collectors():
        return [HessianCollector([SD_LINEAR, SD_CONV]), RangeObserver([SD_CONV]),
                FeatureChangeProbe(["mid_block"]), Recorder([SD_CONV])]
    live = calibrate(sd_pipe, ["a cat", "a dog"], 3, collectors=collectors(), weighting="linear",
                     guidance_scale=5.0, progress=False, **SD_SIZE)
    replayed = live.replay(collectors(), sd_pipe.unet, progress=False)
    merged = live.replay(collectors(), sd_pipe, batch_size=8, progress=False)
    assert replayed.observed_calls == live.observed_calls == 6 and merged.denoiser_calls == 3
    for result in (replayed, merged):
        for name in (SD_LINEAR, SD_CONV):
            assert torch.allclose(result.collector(HessianCollector).hessian(name),
                                  live.collector(HessianCollector).hessian(name), rtol=1e-4, atol=1e-6)
        assert result.collector(RangeObserver).range(SD_CONV) == pytest.approx(
            live.collector(RangeObserver).range(SD_CONV))
    live_steps = [(s.step_index, s.weight) for _, _, s in live.collector(Recorder).seen]
    assert [(s.step_index, s.weight) for _, _, s in replayed.collector(Recorder).seen] == live_steps
    assert replayed.collector(FeatureChangeProbe).mean_change("mid_block") == pytest.approx(
        live.collector(FeatureChangeProbe).mean_change("mid_block"), rel=1e-4)
    assert_pipeline_clean(sd_pipe, sd_pipe.unet, {"disable": True})


def test_replay_pins_an_attached_tracker_to_the_recorded_step(sd_pipe):
    live = calibrate(sd_pipe, "a cat", 3, steps=[0, 2], progress=False, **SD_SIZE)
    seen = []

    class TrackerReader(Collector):
        def observe(self, name, value, step):
            seen.append((step.step_index, tracker.step_index))

    with use_tracker(sd_pipe.unet, "quant", pipeline=sd_pipe) as tracker:
        live.replay([TrackerReader([SD_CONV])], sd_pipe.unet, progress=False)
    assert seen == [(0, 0), (2, 2)]


def test_rerun_repeats_the_pass_with_identical_settings(sd_pipe):
    first = calibrate(sd_pipe, ["a cat", "a dog"], 2, collectors=[HessianCollector([SD_LINEAR])],
                      batch_size=2, seed=5, steps="uniform:2", progress=False, **SD_SIZE)
    second = first.rerun(sd_pipe, [HessianCollector([SD_LINEAR])], progress=False)
    assert second.settings == first.settings and second.seeds == [5] and second.trajectory == []
    assert torch.equal(second.collector(HessianCollector).hessian(SD_LINEAR),
                       first.collector(HessianCollector).hessian(SD_LINEAR))
    assert "HessianCollector" in first.summary() and "uniform:2" in first.summary()
    assert "guidance_scale: the pipeline's default, negative_prompt: the pipeline's default" in first.summary()


def test_sample_store_keeps_a_capped_uniform_sample_with_outputs(sd_pipe):
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    store = SampleStore([block, SD_CONV], max_samples=5, with_outputs=True)
    calibrate(sd_pipe, ["a", "b", "c"], 3, collectors=[store], progress=False, store_trajectory=False,
              **SD_SIZE)
    samples = store.samples(block)
    assert len(samples) == 5 and store.rows_seen[block] == 3 * 3 * 2
    assert all(s.args[0].shape[0] == 1 and s.kwargs["encoder_hidden_states"].shape == (1, 77, 32)
               for s in samples)
    call = store.batch(block)
    assert call.args[0].shape[0] == 5 and call.kwargs["encoder_hidden_states"].shape[0] == 5
    with torch.no_grad():
        rebuilt = sd_pipe.unet.get_submodule(block)(*call.args, **call.kwargs)
    assert torch.allclose(rebuilt, call.output, atol=1e-5)
    assert store.inputs(SD_CONV).shape[0] == 5
    one_sample_bytes = store.samples(SD_CONV)[0].nbytes
    small = SampleStore([SD_CONV], max_samples=100, max_bytes=3 * one_sample_bytes, with_outputs=True)
    calibrate(sd_pipe, "a", 3, collectors=[small], progress=False, store_trajectory=False, **SD_SIZE)
    assert len(small.samples(SD_CONV)) == 3


def _offer_rows(store, name, rows, width, step=0):
    """Offer ``rows`` float32 rows of ``width`` values (and as large outputs) as one call of ``name``."""
    from diffusion_accel.calib.collectors import ModuleCall

    values = torch.randn(rows, width)
    store.observe(name, ModuleCall((values,), {}, values.clone()), Step(step))


def test_the_sample_store_budget_is_shared_by_sample_count_not_bytes():
    """An equal byte share per module left the modules of large samples (a full-size UNet's 64x64 blocks) 1-2
    samples while small ones kept dozens; the budget now keeps the counts level."""
    store = SampleStore(["big", "small"], max_samples=64, max_bytes=20 * (2 * 4 * 1000 + 2 * 4 * 10),
                        with_outputs=True)
    for step in range(40):
        _offer_rows(store, "big", 1, 1000, step)
        _offer_rows(store, "small", 1, 10, step)
    assert len(store.samples("big")) == len(store.samples("small")) == 20
    assert store.total_bytes <= store.max_bytes
    kept = [sample.step.step_index for sample in store.samples("big")]
    assert max(kept) > 20  # late rows are still taken (below the keys given up), not only the first ones


def test_a_sample_store_budget_below_one_sample_per_module_names_max_bytes():
    store = SampleStore(["a", "b"], max_samples=4, max_bytes=1000, with_outputs=True)
    _offer_rows(store, "a", 1, 100)
    with pytest.raises(ValueError, match="max_bytes=1000 cannot hold one sample of each of the 2 modules"):
        _offer_rows(store, "b", 1, 100)


def test_trajectory_cap_keeps_whole_first_trajectories(sd_pipe):
    full = calibrate(sd_pipe, ["a", "b"], 2, progress=False, **SD_SIZE)
    per_prompt = full.trajectory_bytes // 2
    with pytest.warns(RuntimeWarning, match="max_trajectory_bytes"):
        capped = calibrate(sd_pipe, ["a", "b"], 2, max_trajectory_bytes=per_prompt + 10, progress=False,
                           **SD_SIZE)
    assert capped.trajectory_truncated and len(capped.trajectory) == 2
    assert [r.step.step_index for r in capped.trajectory] == [0, 1]
    assert capped.trajectory_bytes <= per_prompt + 10
    shared = capped.trajectory[0].kwargs["encoder_hidden_states"]
    assert capped.trajectory[1].kwargs["encoder_hidden_states"] is shared   # prompt embeddings stored once


def test_a_cap_reached_inside_a_pipeline_call_drops_that_call_and_a_cap_below_one_call_is_named(sd_pipe):
    """A cap between steps kept the first steps of a prompt (replays leaned to the noisy steps); a cap below one
    call said 'run calibrate(..., store_trajectory=True)', which it had (session 31)."""
    full = calibrate(sd_pipe, ["a", "b"], 4, progress=False, **SD_SIZE)
    per_prompt = full.trajectory_bytes // 2
    with pytest.warns(RuntimeWarning, match="whole pipeline calls"):
        capped = calibrate(sd_pipe, ["a", "b"], 4, max_trajectory_bytes=per_prompt * 3 // 2, progress=False,
                           **SD_SIZE)
    assert [r.step.step_index for r in capped.trajectory] == [0, 1, 2, 3] and capped.trajectory_bytes <= per_prompt
    with pytest.warns(RuntimeWarning):
        tiny = calibrate(sd_pipe, ["a"], 4, max_trajectory_bytes=per_prompt // 2, progress=False, **SD_SIZE)
    with pytest.raises(ValueError, match=r"its first pipeline call alone needed more than max_trajectory_bytes="):
        tiny.replay([RangeObserver([SD_CONV])], sd_pipe, progress=False)


def test_replay_refuses_a_cached_denoiser_and_unwraps_a_compiled_one(sd_pipe):
    """Through DeepCache the replay fed 2 of 6 steps to the collectors, silently; a compiled UNet passed alone
    was 'cannot feed a OptimizedModule' (session 31)."""
    import diffusion_accel as da

    calib = calibrate(sd_pipe, ["a"], 3, progress=False, **SD_SIZE)
    cached = build_tiny("sd")
    da.enable_cache(cached, da.DeepCacheConfig(interval=2))
    with pytest.raises(ValueError, match="replay needs every block of the denoiser computed"):
        calib.replay([RangeObserver([SD_CONV])], cached, progress=False)
    direct, compiled = RangeObserver([SD_CONV]), RangeObserver([SD_CONV])
    calib.replay([direct], sd_pipe.unet, progress=False)
    calib.replay([compiled], torch.compile(sd_pipe.unet, backend="eager"), progress=False)
    assert direct.range(SD_CONV) == compiled.range(SD_CONV)


def test_tensor_step_weights_are_recorded_as_numbers(sd_pipe):
    calib = calibrate(sd_pipe, ["a"], 4, weighting=torch.tensor([1.0, 2.0, 3.0, 4.0]), progress=False, **SD_SIZE)
    assert calib.provenance()["settings"]["weighting"] == [1.0, 2.0, 3.0, 4.0]


def test_a_calibration_refused_at_binding_leaves_its_collectors_unused(sd_pipe):
    """The failed run counted the first collector as used: the retry warned it held earlier data (session 31)."""
    import warnings

    ranges = RangeObserver([SD_CONV])
    with pytest.raises(TypeError):
        calibrate(sd_pipe, ["a"], 2, collectors=[ranges, HessianCollector(["down_blocks.0"])], progress=False,
                  **SD_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(sd_pipe, ["a"], 2, collectors=[ranges], progress=False, **SD_SIZE)


FAMILY_CALLS = {
    "sd": (["a cat", "a dog"], SD_SIZE),
    "sdxl": (["a cat", "a dog"], SD_SIZE),
    "sd3": (["a cat", "a dog"], SD_SIZE),
    "flux": (["a cat", "a dog"], {"height": 16, "width": 16}),
    "pixart": (["a cat", "a dog"], SD_SIZE | {"use_resolution_binning": False, "clean_caption": False}),
    "dit": ([1, "dress"], {"guidance_scale": 1.0}),
    "ddpm": (None, {"num_samples": 2}),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CALLS))
def test_calibrate_runs_on_every_tiny_family(family):
    pipe = build_tiny(family)
    _, denoiser = ("unet", pipe.unet) if hasattr(pipe, "unet") else ("transformer", pipe.transformer)
    linear = [n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)][-1]
    first_conv = [n for n, m in denoiser.named_modules() if isinstance(m, nn.Conv2d)][:1]
    prompts, extra = FAMILY_CALLS[family]
    collectors = [HessianCollector([linear, *first_conv]), RangeObserver([linear], method="percentile"),
                  FeatureChangeProbe([linear]), SampleStore([linear], max_samples=3)]
    calib = calibrate(pipe, prompts, 2, collectors=collectors, batch_size=2, progress=False, **extra)
    assert isinstance(calib, Calibration) and calib.observed_calls == calib.denoiser_calls == 2
    assert calib.observed_rows >= 4 and len(calib.trajectory) == 2
    assert calib.collector(HessianCollector).hessian(linear).shape[0] == denoiser.get_submodule(linear).in_features
    assert len(calib.collector(SampleStore).samples(linear)) == 3
    assert_pipeline_clean(pipe, denoiser)


def test_call_modes_and_labels():
    assert call_mode(build_tiny("sd")) == "prompt"
    dit = build_tiny("dit")
    assert call_mode(dit) == "class"
    calib = calibrate(dit, ["dress", 3], 2, guidance_scale=1.0, num_images_per_prompt=2, progress=False)
    assert calib.settings.prompts == (3, 3) and calib.observed_rows == 2 * 2 * 2
    ddpm = build_tiny("ddpm")
    assert call_mode(ddpm) == "unconditional"
    calib = calibrate(ddpm, None, 2, num_samples=3, batch_size=2, progress=False)
    assert calib.observed_rows == 3 * 2 and calib.seeds == [0, 1]


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(prompts=[]), ValueError, ["at least one"]),
    (dict(num_inference_steps=0), ValueError, ["num_inference_steps", "in [1, 100000]"]),
    (dict(steps="sometimes"), ValueError, ["'sometimes'", "uniform:K"]),
    (dict(weighting="cubic"), ValueError, ["'cubic'", "log-decrease"]),
    (dict(collectors=[RangeObserver(["down_blocks.9.conv", SD_CONV, "mid_block.nope"])]), ValueError,
     ["down_blocks.9.conv", "mid_block.nope"]),
    (dict(collectors=[object()]), TypeError, ["Collector"]),
    (dict(num_samples=4), ValueError, ["num_samples"]),
    (dict(generator=torch.Generator()), TypeError, ["'generator'", "seed"]),
    (dict(negative_prompt=["x", "y", "z"]), ValueError, ["negative_prompt"]),
    (dict(batch_size=0), ValueError, ["batch_size"]),
])
def test_calibrate_validates_inputs(sd_pipe, kwargs, error, words):
    arguments = dict(prompts=["a cat"], num_inference_steps=2, progress=False) | kwargs
    with pytest.raises(error) as info:
        calibrate(sd_pipe, **arguments)
    for word in words:
        assert word in str(info.value)
    assert_pipeline_clean(sd_pipe, sd_pipe.unet, {"disable": True})


def test_collector_options_are_validated():
    with pytest.raises(ValueError, match="'kl'.*minmax"):
        RangeObserver([SD_CONV], method="kl")
    with pytest.raises(ValueError, match="percentile"):
        RangeObserver([SD_CONV], method="percentile", percentile=120)
    with pytest.raises(ValueError, match="at least one module"):
        HessianCollector([])
    with pytest.raises(ValueError, match="max_samples"):
        SampleStore([SD_CONV], max_samples=0)


@pytest.mark.parametrize("guidance", ["3", True, float("nan"), -1.0, float("inf")])
def test_a_guidance_scale_that_is_not_a_finite_number_is_a_clear_error(sd_pipe, guidance):
    """'3' was diffusers' "'>' not supported between instances of 'str' and 'int'" from inside the call; NaN and
    -1 calibrated without CFG, silently (session 31), inf overflowed every range."""
    with pytest.raises(ValueError, match=f"guidance_scale must be a finite number >= 0 .*got {guidance!r}"):
        calibrate(sd_pipe, ["a cat"], num_inference_steps=2, guidance_scale=guidance, progress=False)


@pytest.mark.parametrize("arguments, message", [
    ({"weighting": None}, "weighting must be one of uniform.* or one weight per step, got None"),
    ({"weighting": "linear", "weight_range": None}, r"weight_range must be \(w_min, w_max\), got None"),
    ({"weighting": "linear", "weight_range": (True, 2)}, "step weights need finite"),
])
def test_weighting_values_that_are_no_weights_are_clear_errors(sd_pipe, arguments, message):
    """None was "'NoneType' object is not iterable"; a bool bound passed as 1."""
    with pytest.raises(ValueError, match=message):
        calibrate(sd_pipe, ["a cat"], num_inference_steps=2, progress=False, **arguments)


def test_unconditional_pipeline_rejects_prompts():
    with pytest.raises(TypeError, match="num_samples"):
        calibrate(build_tiny("ddpm"), ["a cat"], 2, progress=False)


def test_a_default_unconditional_pass_reports_its_one_sample_and_text_embeddings_are_refused(sd_pipe):
    """Its summary said "items: None x 1 image(s)"; prompt_embeds beside the prompts failed in the first pipeline
    call, printing the tensor (session 45)."""
    assert "items: 1 x 1 image(s)" in calibrate(build_tiny("ddpm"), None, 2, progress=False).summary()
    with pytest.raises(TypeError, match="do not pass 'prompt_embeds' .* from its own argument\\(s\\): prompts"):
        calibrate(sd_pipe, ["a cat"], 1, progress=False, prompt_embeds=torch.zeros(1, 4, 8), **SD_SIZE)


def test_replay_needs_a_stored_trajectory(sd_pipe):
    calib = calibrate(sd_pipe, "a", 1, store_trajectory=False, progress=False, **SD_SIZE)
    with pytest.raises(ValueError, match="store_trajectory=True"):
        calib.replay([RangeObserver([SD_CONV])], sd_pipe.unet)


def test_unconditional_pipeline_takes_placeholder_prompts():
    """``prompts.for_pipeline`` gives an unconditional pipeline one None per sample; calibrate takes them."""
    from diffusion_accel import prompts

    ddpm = build_tiny("ddpm")
    placeholders = prompts.for_pipeline(ddpm, limit=3)
    assert placeholders == [None] * 3
    assert calibrate(ddpm, placeholders, 2, progress=False).summary() == \
        calibrate(ddpm, None, 2, num_samples=3, progress=False).summary()
    with pytest.raises(ValueError, match="num_samples=2 but 3 placeholder"):
        calibrate(ddpm, placeholders, 2, num_samples=2, progress=False)


def test_replay_refuses_a_denoiser_of_another_architecture(sd_pipe):
    """A stored trajectory only feeds the architecture it was recorded on: another class, or the same
    class with another config, got an unrelated TypeError / shape error deep in the replay."""
    from diffusers import UNet2DConditionModel

    calibration = calibrate(sd_pipe, ["a cat"], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"recorded on a StableDiffusionPipeline \(UNet2DConditionModel\).*"
                                         r"cannot feed a FluxTransformer2DModel"):
        calibration.replay(RangeObserver([SD_CONV]), build_tiny("flux"))
    other = UNet2DConditionModel.from_config({**sd_pipe.unet.config, "cross_attention_dim": 16})
    with pytest.raises(ValueError, match="differs in cross_attention_dim"):
        calibration.replay(RangeObserver([SD_CONV]), other)
    bf16_copy = build_tiny("sd").to(torch.bfloat16)  # same architecture: fits
    assert calibration.replay(RangeObserver([SD_CONV]), bf16_copy, progress=False).observed_calls > 0


def test_replay_fits_the_same_model_loaded_from_its_folder(sd_pipe, tmp_path):
    """A config read back from JSON holds lists where the model built in code holds tuples."""
    from diffusers import UNet2DConditionModel

    calibration = calibrate(sd_pipe, ["a cat"], num_inference_steps=2, progress=False)
    sd_pipe.unet.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert calibration.replay(RangeObserver([SD_CONV]), reloaded, progress=False).observed_calls > 0


def test_class_ids_beyond_the_model_and_huge_seeds_are_refused_before_any_call():
    """DiT id 5000 failed mid-run inside the embedding (1000, the CFG null label, ran silently); a seed of
    2**64 failed in torch with 'Overflow when unpacking long long'."""
    pipe = build_tiny("dit")
    classes = pipe.transformer.config.num_embeds_ada_norm
    with pytest.raises(ValueError, match=f"class ids \\[{classes}\\] are out of range"):
        calibrate(pipe, [classes], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="seed must be an int in"):
        calibrate(build_tiny("sd"), ["a cat"], num_inference_steps=2, seed=2 ** 64, progress=False)


class _ClassUNetPipeline:
    """A minimal class-conditional pipeline around a UNet2DModel (no diffusers pipeline passes class_labels to one)."""

    @staticmethod
    def build():
        from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        class ClassUNetPipeline(DiffusionPipeline):
            def __init__(self, unet, scheduler):
                super().__init__()
                self.register_modules(unet=unet, scheduler=scheduler)

            @torch.no_grad()
            def __call__(self, class_labels, num_inference_steps=2, generator=None, output_type="np"):
                labels = torch.tensor(class_labels, dtype=torch.long)
                size = self.unet.config.sample_size
                image = torch.randn(len(labels), 3, size, size, generator=generator)
                self.scheduler.set_timesteps(num_inference_steps)
                for t in self.scheduler.timesteps:
                    noise = self.unet(image, t, class_labels=labels).sample
                    image = self.scheduler.step(noise, t, image).prev_sample
                return ImagePipelineOutput(images=(image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())

        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=4,
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=2).eval()
        return ClassUNetPipeline(unet=unet, scheduler=DDIMScheduler())


def test_a_class_conditional_unet2d_knows_its_classes():
    """The UNet2DModel adapter reported no class count: default calibration ids and prompts.for_pipeline ran past its
    2-row class table (an IndexError inside torch), and explicit ids beyond it were not refused up front."""
    import diffusion_accel as da

    pipe = _ClassUNetPipeline.build()
    assert da.get_adapter(pipe).num_classes() == 2 and da.prompts.for_pipeline(pipe) == [0, 1]
    with pytest.raises(ValueError, match=r"class ids \[5\] are out of range: .* has 2 classes"):
        calibrate(pipe, [0, 1, 5], num_inference_steps=2, progress=False)
    da.quantize_(pipe, da.PTQConfig.preset("w8a8").with_(calib_num_steps=2, calib_steps="all"))
    assert da.get_adapter(build_tiny("ddpm")).num_classes() is None


def test_custom_timesteps_set_the_number_of_calibrated_steps():
    """With timesteps=[999, 500, 1] three steps ran while ten were planned (and weighted)."""
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny("sd")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    result = calibrate(pipe, ["a cat"], num_inference_steps=10, timesteps=[999, 500, 1], progress=False)
    assert result.num_steps == 3 and list(result.selected_steps) == [0, 1, 2]


def test_an_image_conditioned_pipeline_called_without_its_image_says_how_to_pass_it():
    """Inpainting without image failed with diffusers' 'Input is in incorrect format', naming nothing."""
    from diffusers import StableDiffusionInpaintPipeline

    inpaint = StableDiffusionInpaintPipeline(**build_tiny("sd").components)
    with pytest.raises(ValueError, match=r"takes \['image', 'mask_image'\], not given: pass them"):
        calibrate(inpaint, ["a cat"], num_inference_steps=2, progress=False)


def test_a_collector_passed_to_a_second_run_warns_that_it_accumulates():
    """The second run added its rows to the first Calibration's collector silently."""
    pipe = build_tiny("sd")
    layer = "down_blocks.0.resnets.0.conv1"
    collector = HessianCollector([layer])
    calibrate(pipe, ["a cat"], num_inference_steps=2, collectors=[collector], progress=False)
    with pytest.warns(UserWarning, match="already holds data from 1 earlier run"):
        calibrate(pipe, ["a dog"], num_inference_steps=2, collectors=[collector], progress=False)
    fresh = HessianCollector([layer])  # a run failing before any observed call leaves it unused (session 49)
    with pytest.raises(ValueError):
        calibrate(pipe, ["a cat"], num_inference_steps=2, collectors=[fresh], progress=False, height=33, width=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrate(pipe, ["a cat"], num_inference_steps=2, collectors=[fresh], progress=False)
    assert not [warning for warning in caught if "already holds data" in str(warning.message)]


def test_a_run_failing_inside_its_first_observed_call_still_counts_as_holding_data():
    """An error in a late layer of the first observed call (an out-of-memory) left the collector with that call's
    rows but counted the run as never made: the retry on it was not warned and mixed the rows in (session 50)."""
    pipe = build_tiny("sd")
    layer = "down_blocks.0.resnets.0.conv1"
    collector = HessianCollector([layer])

    def out_of_memory(module, args):
        raise RuntimeError("out of memory (simulated)")

    handle = pipe.unet.up_blocks[-1].register_forward_pre_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        calibrate(pipe, ["a cat"], num_inference_steps=2, collectors=[collector], progress=False)
    handle.remove()
    assert collector.num_rows(layer) > 0
    with pytest.warns(UserWarning, match="already holds data from 1 earlier run"):
        calibrate(pipe, ["a cat"], num_inference_steps=2, collectors=[collector], progress=False)


def test_calibrating_without_the_cfg_a_pipeline_guides_with_by_default_warns():
    """CFG off in calibration never observes the unconditional branch: a tiny DiT's W8A8 fell from 56 to 27-29 dB
    with CFG on (session 31). A Flux without guidance embedding ignores guidance_scale (true_cfg_scale guides): a
    clear error there, since --guidance changed nothing (session 40)."""
    import warnings

    from diffusion_accel.pipeline_defaults import CallArgumentError

    with pytest.warns(UserWarning, match=r"DiTPipeline with guidance_scale=1.0 runs no classifier-free guidance, "
                                         r"while its default \(4.0\) does"):
        calibrate(build_tiny("dit"), [1], 2, guidance_scale=1.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(build_tiny("dit"), [1], 2, guidance_scale=4.0, progress=False)
    with pytest.raises(CallArgumentError, match=r"guidance_scale \(from calibrate\) has no effect on this FluxPipeline"
                                                r".*true_cfg_scale"):
        calibrate(build_tiny("flux"), ["a cat"], 2, guidance_scale=1.0, height=16, width=16, progress=False)


@pytest.mark.parametrize("pipeline_class", ["FluxControlPipeline", "FluxFillPipeline"])
def test_flux_pipelines_without_true_cfg_get_no_cfg_warning(pipeline_class):
    """FluxFill / FluxControl embed guidance_scale and have no true_cfg_scale: calibrating them at guidance 1 warned
    that "its default (30.0) runs classifier-free guidance ... the unconditional branch is never observed"."""
    import inspect
    import warnings

    import diffusers

    from diffusion_accel.calib.inputs import _warn_if_cfg_is_off

    cls = getattr(diffusers, pipeline_class)
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{name: value for name, value in build_tiny("flux-dev").components.items() if name in accepted})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_cfg_is_off(pipe, dict(inspect.signature(cls.__call__).parameters), 1.0)


def test_numpy_numbers_are_taken_as_python_numbers(sd_pipe):
    """np.int64 seeds and counts were "must be an int >= 0, got np.int64(0)" (session 31)."""
    import numpy as np

    calib = calibrate(sd_pipe, ["a"], np.int64(2), seed=np.int64(3), batch_size=np.int32(1),
                      guidance_scale=np.float32(2.0), progress=False, **SD_SIZE)
    assert calib.seeds == [3] and type(calib.settings.seed) is int and calib.settings.guidance_scale == 2.0
    assert calib.provenance()["settings"]["num_inference_steps"] == 2


@pytest.mark.parametrize("family, kwargs", [("flux", dict(height=16, width=16)), ("sd3", {})])
def test_block_feature_probes_watch_the_image_stream_of_two_stream_blocks(family, kwargs, monkeypatch):
    """Flux's and SD3's blocks return (context, hidden): the probe watched the text stream of every block but
    SD3's last, which returns (None, hidden) and so gave the image stream; tensor_index=1 failed there."""
    from diffusion_accel.arch import get_adapter

    pipe = build_tiny(family)
    adapter = get_adapter(pipe)
    probe = FeatureChangeProbe.for_blocks(adapter)
    seen = {}
    observe = FeatureChangeProbe.observe
    monkeypatch.setattr(FeatureChangeProbe, "observe",
                        lambda self, name, value, step: (seen.setdefault(name, value.shape), observe(self, name, value,
                                                                                                      step))[1])
    text_tokens = set()

    def note_text(module, args, kwargs):
        text_tokens.add(kwargs["encoder_hidden_states"].shape[1])

    pipe.transformer.register_forward_pre_hook(note_text, with_kwargs=True)
    calibrate(pipe, ["a cat"], num_inference_steps=2, collectors=[probe], progress=False, **kwargs)
    assert set(seen) == {block.name for block in adapter.blocks()}
    assert len({shape for shape in seen.values()}) == 1 and all(shape[1] not in text_tokens
                                                                 for shape in seen.values()), (seen, text_tokens)


def test_a_denoiser_no_adapter_supports_is_calibrated_and_placed_step_by_step():
    """calibrate needs no adapter (dispatch's own docs), yet its uncompiled() step asked for one: an AuraFlow
    pipeline raised UnsupportedModelError after marking the collectors used. AuraFlow also passes a view of a fresh
    one-value tensor per step, which the tracker read as position 0 of a 1-step schedule (four contexts at step 0)."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from diffusion_accel.hooks import attach_tracker
    from diffusion_accel.testing.tiny import tiny_vae
    from diffusion_accel.testing.tokenizers import t5_tokenizer

    torch.manual_seed(0)
    tokenizer = t5_tokenizer()
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                       num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0)).eval()
    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=64).eval()
    pipe = AuraFlowPipeline(tokenizer=tokenizer, text_encoder=text, vae=tiny_vae(), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    layer = [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)][3]
    observer = RangeObserver([layer])
    calibration = calibrate(pipe, ["a cat"], 4, collectors=[observer], height=32, width=32, max_sequence_length=16,
                            progress=False)
    low, high = calibration.collector(RangeObserver).range(layer)
    assert low < high
    tracker, placed = attach_tracker(transformer, pipe), []
    transformer.register_forward_hook(lambda *args: placed.append((tracker.context, tracker.step_index)))
    pipe("a cat", num_inference_steps=4, height=32, width=32, output_type="latent", max_sequence_length=16)
    assert placed == [("default", step) for step in range(4)]


def test_a_default_negative_prompt_goes_one_per_prompt_with_several_images_each():
    """fashion-flux's call defaults hold negative_prompt="": calibrate with batch_size 2 and
    num_images_per_prompt 2 failed inside FluxPipeline (4 vs 2) unless the user passed it again."""
    import diffusion_accel as da
    from diffusion_accel.pipeline_defaults import set_call_defaults

    pipe = build_tiny("flux")
    set_call_defaults(pipe, {"true_cfg_scale": 2.0, "negative_prompt": ""})
    calibration = da.calibrate(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=2,
                               num_images_per_prompt=2, progress=False)
    assert len(calibration.seeds) == 1


def test_an_explicit_negative_prompt_none_drops_the_pipelines_default_also_on_rerun():
    """calibrate(negative_prompt=None) (the CLI's --call negative_prompt=null) could not be told from no value:
    fashion-flux's default "" stayed, so the calibration ran true CFG where evaluate, keeping the None, ran
    without (session 47). Left unset the default applies; a rerun repeats either."""
    import diffusion_accel as da
    from diffusion_accel.calib import HessianCollector
    from diffusion_accel.pipeline_defaults import set_call_defaults

    pipe = build_tiny("flux")
    set_call_defaults(pipe, {"true_cfg_scale": 2.0, "negative_prompt": ""})
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    layer = ["transformer_blocks.0.attn.to_q"]
    for given, expected in (({}, 4), ({"negative_prompt": None}, 2)):
        calls.clear()
        calibration = da.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, **given)
        assert len(calls) == expected, given
        calls.clear()
        calibration.rerun(pipe, [HessianCollector(layer)], progress=False)
        assert len(calls) == expected, given
        dropped = bool(given)  # the summary and the record artifacts keep say which (both said "default")
        assert ("negative_prompt: none (the pipeline default dropped)" in calibration.summary()) == dropped
        assert calibration.provenance()["settings"].get("drop_negative_prompt", False) == dropped
        assert calibration.provenance()["settings"]["negative_prompt"] is None  # null: none given, as before
    plain = da.calibrate(build_tiny("sd"), ["a cat"], num_inference_steps=2, progress=False, negative_prompt=None)
    assert "dropped" not in plain.summary() and "drop_negative_prompt" not in plain.provenance()["settings"]  # none


def test_a_pipeline_that_changes_the_denoiser_during_its_calls_is_rerun_not_replayed():
    """PAG swaps attention processors for its perturbed branch (restored at the end of the call): the stored
    inputs replayed through the restored processors, so quantize_(calib=...) calibrated other ranges (W8A8 at
    17.1 dB vs 21.3 dB when rerun, silently)."""
    import diffusion_accel as da
    from diffusers import StableDiffusionPAGPipeline

    from diffusion_accel.calib import HessianCollector

    pipe = StableDiffusionPAGPipeline(**build_tiny("sd").components, pag_applied_layers=["mid"])
    calibration = da.calibrate(pipe, ["a cat", "a dog"], 2, progress=False, height=32, width=32, pag_scale=3.0)
    assert calibration.trajectory and not calibration.complete_trajectory
    assert "processor" in calibration.trajectory_state_change
    with pytest.raises(ValueError, match="cannot be replayed: the pipeline changed .*processor"):
        calibration.replay([HessianCollector(["mid_block.attentions.0.proj_in"])], pipe, progress=False)
    plain = da.calibrate(build_tiny("sd"), ["a cat"], 2, progress=False)
    assert plain.complete_trajectory and plain.trajectory_state_change is None


def test_a_pag_calibration_stopped_part_way_restores_the_attention_processors():
    """PAG swaps its processors in at the start of a call and restores them only at the normal end: a Ctrl-C in
    calibrate left them installed, and calls without PAG failed on "not enough values to unpack" (until s50)."""
    from diffusers import StableDiffusionPAGPipeline

    from diffusion_accel.testing.tiny import tiny_call_kwargs

    pipe = StableDiffusionPAGPipeline(**build_tiny("sd").components, pag_applied_layers=["mid"])
    processors = dict(pipe.unet.attn_processors)
    calls = []

    def interrupt_the_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = pipe.unet.register_forward_pre_hook(interrupt_the_third_call)
    with pytest.raises(KeyboardInterrupt):
        calibrate(pipe, ["a cat"], 4, progress=False, height=32, width=32)
    handle.remove()
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in processors.items())
    pipe(**tiny_call_kwargs("sd", 2), pag_scale=0.0)


def test_block_reconstruction_on_pag_fits_the_float_blocks_outputs():
    """PAG's perturbed rows ran identity self-attention, outputs the block cannot produce outside a PAG call: a
    third of the mid block's targets were unreachable and the reconstruction loss stayed 240x higher (until s50)."""
    import diffusion_accel as da
    import diffusion_accel.quant.reconstruct as reconstruct
    from diffusers import StableDiffusionPAGPipeline

    losses = []
    loss_of = reconstruct.reconstruction_loss

    def recorded(preds, targets, p):
        loss = loss_of(preds, targets, p)
        losses.append(loss.item())
        return loss

    pipe = StableDiffusionPAGPipeline(**build_tiny("sd").components, pag_applied_layers=["mid"])
    original = reconstruct.reconstruction_loss
    reconstruct.reconstruction_loss = recorded
    try:
        da.quantize_(pipe, da.PTQConfig(weights="int4", activations=None, reconstruct=True, recon_iters=20,
                                        recon_act_iters=0, calib_prompts=2, calib_num_steps=4, calib_steps="all",
                                        include=("mid_block.attentions*",)))
    finally:
        reconstruct.reconstruction_loss = original
    assert losses and max(losses) < 1e-3  # 5e-3 or more with the PAG rows' stored outputs as targets
    # with timestep groups the copy reached the whole denoiser through their selector and failed half-built, and
    # it kept the quantizing attention processors in its "float" targets (session 50 review)
    from diffusion_accel.quant.attention import QuantAttentionBase
    from diffusion_accel.quant.layers import QuantLayer

    copies = []
    make_copy = reconstruct.float_block
    reconstruct.float_block = lambda *args: copies.append(make_copy(*args)) or copies[-1]
    try:
        grouped = StableDiffusionPAGPipeline(**build_tiny("sd").components, pag_applied_layers=["mid"])
        da.quantize_(grouped, da.PTQConfig(weights="int4", activations="int8", attention="int8", timestep_groups=2,
                                           reconstruct=True, recon_iters=2, recon_act_iters=0, calib_prompts=1,
                                           calib_num_steps=4, calib_steps="all"))
    finally:
        reconstruct.float_block = make_copy
    modules = [module for copied in copies for module in copied.modules()]
    assert copies and not any(isinstance(module, QuantLayer) for module in modules)
    assert not any(isinstance(getattr(module, "processor", None), QuantAttentionBase) for module in modules)


def test_a_t2i_adapter_trajectory_replays_with_the_adapter_residuals():
    """The UNet pops the adapter's residuals off the list it is given, and the inputs were stored after the call:
    every record held an empty list and replays (quantize_(calib=...)) ran as if there were no adapter."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    base = build_tiny("sd")
    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[16, 32, 32], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.3)
    components = {name: value for name, value in base.components.items() if name != "image_encoder"}
    pipe = StableDiffusionAdapterPipeline(**components, adapter=adapter)
    name = "mid_block.resnets.0.conv1"
    live = RangeObserver([name])
    calib = calibrate(pipe, ["a cat"], 2, collectors=[live], progress=False, image=torch.rand(1, 3, 32, 32),
                      **SD_SIZE)
    assert all(record.kwargs["down_intrablock_additional_residuals"] for record in calib.trajectory)
    replayed = calib.replay([RangeObserver([name])], pipe.unet, progress=False)
    assert replayed.collectors[0].range(name) == live.range(name)


def test_numpy_class_ids_steps_and_weights_are_taken_as_their_values():
    """DiTPipeline and evaluate take numpy class ids, PTQConfig numpy steps; calibrate refused them all."""
    import numpy as np

    calib = calibrate(build_tiny("dit"), list(np.array([3, 1])), 2, progress=False, guidance_scale=1.0)
    assert calib.provenance()["settings"]["prompts"] == [3, 1]
    calib = calibrate(build_tiny("sd"), ["a"], 4, steps=np.arange(0, 4, 2), weighting=np.array([1.0, 2.0, 3.0, 4.0]),
                      progress=False, **SD_SIZE)
    assert calib.selected_steps == [0, 2] and calib.provenance()["settings"]["weighting"] == [1.0, 2.0, 3.0, 4.0]
    calib = calibrate(build_tiny("sd"), ["a"], 2, weighting="linear", weight_range=(np.float32(0.5), np.float32(1.5)),
                      progress=False, **SD_SIZE)
    assert calib.provenance()["settings"]["weight_range"] == [0.5, 1.5]


def test_the_other_text_towers_prompts_follow_each_calls_prompts():
    """A string prompt_2 beside two prompts per call failed in SDXL's encoder (2 vs 1 rows); a list of one per
    prompt went whole to every call."""
    from diffusion_accel.calib.inputs import plan_calls

    pipe = build_tiny("sdxl")
    calls = plan_calls(pipe, ["a", "b", "c"], num_inference_steps=2, batch_size=2, num_images_per_prompt=1,
                          guidance_scale=None, negative_prompt=None, seed=0,
                          call_kwargs={"prompt_2": ["A", "B", "C"], "negative_prompt_2": "blurry"})
    assert [call.kwargs["prompt_2"] for call in calls] == [["A", "B"], ["C"]]
    assert [call.kwargs["negative_prompt_2"] for call in calls] == [["blurry", "blurry"], ["blurry"]]
    calibrate(pipe, ["a red bike", "a cat"], 2, batch_size=2, progress=False, height=32, width=32,
              prompt_2="a blue bike")


def test_other_prompt_lists_are_one_per_prompt_and_step_tensors_are_index_lists():
    """A prompt_2 list of the wrong length paired calls with the wrong texts or failed inside the text encoder; a
    torch tensor of step indices was refused while numpy arrays were taken (session 49)."""
    from diffusion_accel.calib.schedule import select_steps

    pipe = build_tiny("sdxl")
    with pytest.raises(ValueError, match=r"prompt_2 must be a string or a list of 4 strings \(one per prompt\)"):
        calibrate(pipe, ["a", "b", "c", "d"], num_inference_steps=2, prompt_2=["x", "y"], progress=False)
    assert select_steps(4, torch.tensor([0, 2])) == [0, 2]


def test_default_calibration_items_repeat_the_bundled_prompts_or_classes_for_quantize_and_prune(monkeypatch):
    """quantize_'s own calibration stopped at the end of the prompt set (10 fashion prompts for calib_prompts 32)
    and ran past a DiT's classes ("class ids [10, 11] are out of range"); prune_ repeated both (session 49)."""
    import diffusion_accel as da
    from diffusion_accel.calib import default_calibration_items
    import diffusion_accel.calib.inputs as inputs

    sd = build_tiny("sd")
    assert len(default_calibration_items(sd, 40)["prompts"]) == 40
    monkeypatch.setattr(inputs, "class_count", lambda pipe: 3)
    assert default_calibration_items(build_tiny("dit"), 5) == {"prompts": [0, 1, 2, 0, 1]}
    assert default_calibration_items(build_tiny("ddpm"), 4) == {"prompts": None, "num_samples": 4}
    seen = {}

    def recorded(pipe, prompts=None, *args, **kwargs):
        seen["prompts"] = prompts
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusion_accel.quant.calibrate.calibrate", recorded)
    with pytest.raises(KeyboardInterrupt):
        da.quantize_(sd, da.PTQConfig(calib_prompts=40, calib_num_steps=2, calib_steps="all"))
    assert len(seen["prompts"]) == 40


def test_an_image_list_gives_each_prompt_its_own_image():
    """A list of one image per prompt went whole to every call: at batch size 1 img2img failed (512 vs 256 rows)
    or paired each prompt with the list (session 50); each call now takes its prompts' images, as evaluate does."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**build_tiny("sd").components)
    images = [torch.full((3, 32, 32), value) for value in (0.2, 0.8)]
    kwargs = dict(num_inference_steps=3, strength=1.0, steps=[0], progress=False)
    both = calibrate(pipe, ["a cat", "a dog"], image=images, batch_size=1, **kwargs)
    second = calibrate(pipe, ["a dog"], image=images[1], seed=1, **kwargs)
    assert torch.equal(both.trajectory[1].args[0], second.trajectory[0].args[0])
    batched = calibrate(pipe, ["a cat", "a dog"], image=images, batch_size=2, **kwargs)
    assert batched.trajectory[0].batch == 4  # two prompts, with CFG
    with pytest.raises(ValueError, match=r"image must be one image or a list of 2 \(one per prompt\), got a list of 3"):
        calibrate(pipe, ["a cat", "a dog"], image=images + images[:1], **kwargs)
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from diffusion_accel.eval import evaluate

    # a call of one prompt takes a one-image list: a bare CHW tensor's channels were a ControlNet's image batch
    sd = build_tiny("sd")
    controlled = StableDiffusionControlNetPipeline(
        **sd.components, controlnet=ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(4, 8)))
    calibrate(controlled, ["a cat", "a dog"], image=images, num_inference_steps=2, progress=False)
    report = evaluate({"base": controlled}, ["a cat", "a dog"], metrics=("latency",), num_inference_steps=2,
                      repeats=1, call_kwargs={"image": images})
    import json  # the settings name a tensor by type, shape and dtype, not by its whole repr

    recorded = json.loads(report.to_json())["settings"]["call_kwargs"]["image"]
    assert recorded == ["<Tensor (3, 32, 32) torch.float32>"] * 2


def test_multi_controlnet_img2img_splits_init_images_per_prompt_and_keeps_control_images_whole():
    """With several ControlNets every image list was left whole: evaluate generated every prompt from the first
    init image, and calibrate failed inside diffusers (4 vs 2 rows); only control_image is one per ControlNet."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from diffusion_accel.calib.inputs import plan_calls
    from diffusion_accel.eval.pipes import build_call_kwargs, make_jobs

    sd = build_tiny("sd")
    controlnets = MultiControlNetModel([ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(4, 8))
                                        for _ in range(2)])
    pipe = StableDiffusionControlNetImg2ImgPipeline(**sd.components, controlnet=controlnets)
    init = [torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), 0.9)]
    control = [torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)]
    call_kwargs = {"image": init, "control_image": control, "strength": 0.5}
    jobs = make_jobs(["a cat", "a dog"])
    second = build_call_kwargs(pipe, jobs[1:], num_inference_steps=2, call_kwargs=call_kwargs)
    assert second["image"][0] is init[1] and second["control_image"] is control
    calls = plan_calls(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=1, num_images_per_prompt=1,
                       guidance_scale=None, negative_prompt=None, seed=0, call_kwargs=call_kwargs)
    assert [call.kwargs["image"][0] for call in calls] == init and calls[1].kwargs["control_image"] is control
    calibration = calibrate(pipe, ["a cat", "a dog"], num_inference_steps=2, progress=False, **call_kwargs)
    assert len(calibration.trajectory) == 2  # strength 0.5: one of the two steps per prompt
    with pytest.raises(ValueError, match=r"image must be one image or a list of 2 \(one per prompt\), got a list of 3"):
        calibrate(pipe, ["a cat", "a dog"], num_inference_steps=2, progress=False,
                  **{**call_kwargs, "image": init + init[:1]})


def test_flux_position_ids_and_rotary_tables_stay_whole_at_a_batch_equal_to_their_token_count():
    """A tensor whose first dimension equals the call's batch counted as per image: at 8x8 px (4 image tokens)
    and 4 prompts per call img_ids was cut into rows and concatenated on merge (replay(batch_size=8) failed), and
    a block's rotary table at 12 rows (4 + 8 tokens) was sliced per sample and merged in sample order."""
    from diffusion_accel.calib import RangeObserver, SampleStore

    pipe = build_tiny("flux")
    seen = {}
    block = pipe.transformer.transformer_blocks[0]
    block.register_forward_pre_hook(lambda module, args, kwargs: seen.setdefault("rope", kwargs["image_rotary_emb"])
                                    and None, with_kwargs=True)
    store = SampleStore(["transformer_blocks.0"], max_samples=64, with_outputs=True)
    calib = calibrate(pipe, [f"item {i}" for i in range(12)], num_inference_steps=2, steps="all", batch_size=12,
                      height=8, width=8, max_sequence_length=8, collectors=[store], store_trajectory=True,
                      progress=False)
    call = store.batch("transformer_blocks.0", [5, 0, 17, 3, 9, 22, 1, 14, 7, 2, 11, 20])
    assert all(torch.equal(merged, true) for merged, true in zip(call.kwargs["image_rotary_emb"], seen["rope"]))
    torch.testing.assert_close(block(*call.args, **call.kwargs)[1], call.output[1])
    calib = calibrate(pipe, [f"item {i}" for i in range(8)], num_inference_steps=2, steps="all", batch_size=4,
                      height=8, width=8, store_trajectory=True, progress=False)
    calib.replay(RangeObserver(["x_embedder"]), pipe.transformer, batch_size=8, progress=False)


def test_calls_whose_shared_position_tables_differ_are_never_merged():
    """Flux Kontext's ids and rotary tables follow the reference image's shape: a 16x32 and a 32x16 reference
    have one token count, and merged records / samples ran with the first's tables (replay(batch_size=2), block
    reconstruction's batches), 0.09 off on the second row."""
    from diffusers import FluxKontextPipeline

    from diffusion_accel.calib import SampleStore
    from diffusion_accel.calib.trajectory import group_records
    from diffusion_accel.quant.reconstruct import _block_outputs

    pipe = FluxKontextPipeline(**build_tiny("flux").components)
    store = SampleStore(["transformer_blocks.0"], max_samples=64, with_outputs=True)
    images = [torch.rand(1, 3, 16, 32), torch.rand(1, 3, 32, 16)]
    calib = calibrate(pipe, ["a", "b"], num_inference_steps=2, steps="all", height=16, width=16, image=images,
                      _auto_resize=False, max_area=256, max_sequence_length=8, collectors=[store],
                      store_trajectory=True, progress=False)
    assert all(len(group) == 1 for group in group_records(calib.trajectory, 2))
    layouts = store.layout_classes("transformer_blocks.0")
    assert sorted(set(layouts)) == [0, 1] and len(layouts) == 4
    with pytest.raises(ValueError, match="different input layouts"):
        store.batch("transformer_blocks.0")
    block = pipe.transformer.transformer_blocks[0]
    outputs = _block_outputs(store, "transformer_blocks.0", torch.device("cpu"), block)
    for index, sample in enumerate(store.samples("transformer_blocks.0")):
        torch.testing.assert_close(outputs[1][index:index + 1], sample.output[1])


def test_sd3_controlnet_inpainting_masks_are_split_per_prompt():
    """control_mask was no image argument: every call got the whole list (calibrate failed inside diffusers,
    evaluate gave each job every mask)."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetInpaintingPipeline

    from diffusion_accel.eval.pipes import build_call_kwargs, make_jobs

    sd3 = build_tiny("sd3")
    config = sd3.transformer.config
    controlnet = SD3ControlNetModel(
        sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels, num_layers=1,
        attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim, caption_projection_dim=config.caption_projection_dim,
        pooled_projection_dim=config.pooled_projection_dim, out_channels=config.out_channels,
        pos_embed_max_size=config.pos_embed_max_size, extra_conditioning_channels=1)
    parts = {name: part for name, part in sd3.components.items() if name not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusion3ControlNetInpaintingPipeline(**parts, controlnet=controlnet)
    controls = [torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)]
    masks = [torch.ones(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)]
    kwargs = build_call_kwargs(pipe, make_jobs(["a", "b"])[1:], num_inference_steps=2,
                               call_kwargs={"control_image": controls, "control_mask": masks})
    assert kwargs["control_mask"] == [masks[1]] and kwargs["control_image"] == [controls[1]]
    calibration = calibrate(pipe, ["a", "b"], num_inference_steps=2, height=32, width=32, control_image=controls,
                            control_mask=masks, progress=False)
    assert len(calibration.trajectory) == 4


def test_several_images_per_prompt_keep_each_prompts_input_image_on_its_rows():
    """diffusers tiles an image list against repeated prompts ([A, B] -> A, B, A, B for p0, p0, p1, p1): calibrate
    with num_images_per_prompt=2 and batch_size=2 paired half the rows with another prompt's image or mask."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline

    from diffusion_accel.calib.inputs import plan_calls

    sd = build_tiny("sd")
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    images = [torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), 0.9)]
    (call,) = plan_calls(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=2, num_images_per_prompt=2,
                         guidance_scale=None, negative_prompt=["ugly", "blurry"], seed=0,
                         call_kwargs={"image": images, "strength": 0.5})
    assert call.kwargs["prompt"] == ["a cat", "a cat", "a dog", "a dog"] and "num_images_per_prompt" not in call.kwargs
    assert call.kwargs["negative_prompt"] == ["ugly", "ugly", "blurry", "blurry"]
    assert [image is images[0] for image in call.kwargs["image"]] == [True, True, False, False]
    (call,) = plan_calls(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=2, num_images_per_prompt=2,
                         guidance_scale=None, negative_prompt=None, seed=0,
                         call_kwargs={"image": torch.stack(images), "strength": 0.5})  # one batched tensor
    assert torch.equal(call.kwargs["image"], torch.stack([images[0], images[0], images[1], images[1]]))
    first, second = plan_calls(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=1, num_images_per_prompt=1,
                               guidance_scale=None, negative_prompt=None, seed=0,
                               call_kwargs={"image": torch.stack(images), "strength": 0.5})
    assert torch.equal(second.kwargs["image"], images[1][None])  # the whole tensor went to every call
    (whole,) = plan_calls(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=2, num_images_per_prompt=1,
                          guidance_scale=None, negative_prompt=None, seed=0,
                          call_kwargs={"image": torch.stack(images), "strength": 0.5})
    assert torch.equal(whole.kwargs["image"], torch.stack(images))  # a tensor stays one (Flux / SD3 ControlNets
    # use a tensor as it is but preprocess a list: [0, 1] images became [-1, 1] ones in a review's first fix)
    from diffusion_accel.eval import evaluate

    report = evaluate({"base": pipe}, ["a cat", "a dog"], metrics=("latency",), num_inference_steps=2, warmup=0,
                      repeats=1, progress=False, call_kwargs={"image": torch.stack(images), "strength": 0.5})
    assert report.rows[0]["images"] == 2  # "cannot duplicate image of batch size 2 to 1 text prompts" before
    generated = {}
    for label, image in (("list", images), ("tensor", torch.stack(images))):  # the generated images too, not only
        generated[label] = evaluate({"base": pipe}, ["a cat", "a dog"], metrics=("latency",), num_inference_steps=2,
                                    warmup=0, repeats=1, progress=False, images_per_prompt=2, batch_size=2,
                                    call_kwargs={"image": image, "strength": 0.5}).images["base"]  # the timed calls
    assert torch.equal(torch.as_tensor(generated["list"]), torch.as_tensor(generated["tensor"]))
    calibration = calibrate(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=2, num_images_per_prompt=2,
                            image=images, strength=0.5, progress=False)
    assert calibration.trajectory[0].batch == 8  # 2 prompts x 2 images, with CFG
    controlled = StableDiffusionControlNetPipeline(
        **sd.components, controlnet=ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(4, 8)))
    calibrate(controlled, ["a cat", "a dog"], num_inference_steps=2, batch_size=2, num_images_per_prompt=2,
              image=images, progress=False)  # a ControlNet takes one image per row as well


def test_a_numpy_image_batch_of_one_per_prompt_is_split_like_a_tensor():
    """diffusers reads a 4-D numpy array as an (N, H, W, C) image batch: one image per prompt went whole to every
    call (calibrate at batch size 1: "cannot duplicate image of batch size 2 to 1 text prompts")."""
    import numpy as np
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffusion_accel.calib.inputs import plan_calls
    from diffusion_accel.eval import evaluate

    pipe = StableDiffusionImg2ImgPipeline(**build_tiny("sd").components)
    images = np.stack([np.full((32, 32, 3), 0.2, np.float32), np.full((32, 32, 3), 0.9, np.float32)])
    first, second = plan_calls(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=1, num_images_per_prompt=1,
                               guidance_scale=None, negative_prompt=None, seed=0,
                               call_kwargs={"image": images, "strength": 0.5})
    assert np.array_equal(first.kwargs["image"], images[:1]) and np.array_equal(second.kwargs["image"], images[1:])
    (call,) = plan_calls(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=2, num_images_per_prompt=2,
                         guidance_scale=None, negative_prompt=None, seed=0, call_kwargs={"image": images, "strength": 0.5})
    assert np.array_equal(call.kwargs["image"], images[[0, 0, 1, 1]])
    calibration = calibrate(pipe, ["a cat", "a dog"], num_inference_steps=2, batch_size=1, image=images, strength=0.5,
                            progress=False)
    assert len(calibration.trajectory) == 2
    generated = {label: evaluate({"base": pipe}, ["a cat", "a dog"], metrics=("latency",), num_inference_steps=2,
                                 warmup=0, repeats=1, progress=False, images_per_prompt=2, batch_size=2,
                                 call_kwargs={"image": image, "strength": 0.5}).images["base"]
                 for label, image in (("list", list(images)), ("array", images))}
    assert torch.equal(torch.as_tensor(generated["list"]), torch.as_tensor(generated["array"]))


def test_an_lcm_unet_embeds_its_guidance_and_gets_no_cfg_warning():
    """LCM feeds guidance_scale to the UNet (time_cond_proj_dim) and runs no CFG batch: calibrating it at guidance 1
    warned that the unconditional branch is never observed."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    from diffusion_accel.arch import get_adapter
    from diffusion_accel.calib.inputs import _warn_if_cfg_is_off

    sd = build_tiny("sd")
    unet = UNet2DConditionModel(**{**sd.unet.config, "time_cond_proj_dim": 32})
    pipe = LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, safety_checker=None,
        scheduler=LCMScheduler.from_config(sd.scheduler.config), feature_extractor=None, requires_safety_checker=False)
    assert get_adapter(pipe).embeds_guidance and not get_adapter(sd).embeds_guidance
    params = dict(inspect.signature(pipe.__call__).parameters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_cfg_is_off(pipe, params, 1.0)


def test_a_calibration_prints_as_one_line(sd_pipe):
    """The dataclass repr printed every stored trajectory tensor (130k characters on tiny SD; session 53 review)."""
    calib = calibrate(sd_pipe, ["a"], 2, progress=False, **SD_SIZE)
    text = repr(calib)
    assert "\n" not in text and len(text) < 300 and text.startswith("Calibration(pipeline, ")
