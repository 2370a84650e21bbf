"""Prefix replay in the schedule search: the same errors and schedules as running every schedule from step 0."""

import pytest

from diffusion_accel.arch import find_denoiser
from diffusion_accel.cache import calibrate_schedule
from diffusion_accel.cache import prefix as prefix_module
from diffusion_accel.cache.calibrated import schedule_error
from diffusion_accel.cache.configs import CalibratedCacheConfig
from diffusion_accel.cache.prefix import PrefixReplay, replayed_steps, schedule_decisions
from diffusion_accel.cache.runs import final_outputs, planned_calls
from diffusion_accel.hooks import attach_tracker, detach_tracker_if_unused
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

STEPS = 10
# a search's sequence: a start, then single full steps moved or added (partial steps where the family has levels)
MOVES = [((0, 3, 6), ()), ((0, 3, 7), ()), ((0, 2, 7), ()), ((0, 3, 6), ((8, 1),)), ((0, 3, 6, 8), ()),
         ((0, 4, 6), ((2, 1),))]


def _calls(pipe, family):
    kwargs = {key: value for key, value in tiny_call_kwargs(family, steps=STEPS).items()
              if key not in ("generator", "prompt", "class_labels", "num_inference_steps")}
    prompts = {"dit": ["bag", "coat"], "ddpm": [None, None]}.get(family, ["a cat", "a dog"])  # classes, samples
    return planned_calls(pipe, prompts, STEPS, seed=0, **kwargs)


@pytest.mark.parametrize("family, forecast, target", [
    ("flux", 0, "residual"), ("flux", 1, "residual"), ("flux", 1, "output"), ("sd", 0, "residual"),
    ("sd", 1, "residual"), ("sd3", 0, "residual"), ("dit", 1, "residual"), ("ddpm", 0, "residual"),
])
def test_replayed_errors_equal_errors_run_from_step_0(family, forecast, target):
    pipe = build_tiny(family)
    calls = _calls(pipe, family)
    references = final_outputs(pipe, calls)
    configs = [CalibratedCacheConfig(full, STEPS, forecast=forecast, forecast_target=target, partial_steps=partial)
               for full, partial in MOVES]
    plain = [schedule_error(pipe, config, calls, references) for config in configs]
    denoiser = find_denoiser(pipe)[1]
    with PrefixReplay(pipe, denoiser) as replay:
        replayed = [replay.error(config, calls, references) for config in configs]
        assert replay.enabled and replay.replayed_calls > 0
    assert replayed == plain  # bit for bit
    assert "_diffusers_hook" not in vars(denoiser) and "forward" not in vars(denoiser)


def test_the_search_finds_the_same_schedule_with_fewer_denoiser_calls(monkeypatch):
    pipe = build_tiny("flux")
    kwargs = {key: value for key, value in tiny_call_kwargs("flux", steps=STEPS).items()
              if key not in ("generator", "prompt", "num_inference_steps")}
    counted = []
    original_error = PrefixReplay.error

    def counting(self, config, calls, references):
        value = original_error(self, config, calls, references)
        counted.append((self.replayed_calls, self.total_calls))
        return value

    monkeypatch.setattr(PrefixReplay, "error", counting)
    found = [calibrate_schedule(pipe, ["a cat", "a dog"], budget=0.4, num_inference_steps=STEPS, max_passes=1,
                                reuse_prefix=reuse, **kwargs) for reuse in (False, True)]
    assert found[0] == found[1]
    replayed, total = counted[-1]
    assert replayed > 0.2 * total  # the refine search's moves share long prefixes
    assert "_diffusers_hook" not in vars(find_denoiser(pipe)[1])


def test_a_tracker_already_attached_turns_replay_off():
    """A tracker attached before the search (timestep-grouped quantization) sits beneath the replay hook and
    would miss the replayed calls' steps."""
    pipe = build_tiny("flux")
    denoiser = find_denoiser(pipe)[1]
    calls = _calls(pipe, "flux")
    references = final_outputs(pipe, calls)
    attach_tracker(denoiser, pipe)
    try:
        with PrefixReplay(pipe, denoiser) as replay:
            errors = [replay.error(CalibratedCacheConfig(full, STEPS), calls, references) for full, _ in MOVES[:3]]
            assert not replay.enabled and replay.replayed_calls == 0
    finally:
        detach_tracker_if_unused(denoiser)
    assert errors == [schedule_error(pipe, CalibratedCacheConfig(full, STEPS), calls, references)
                      for full, _ in MOVES[:3]]


def test_a_run_that_decides_otherwise_than_planned_turns_replay_off_and_reruns(monkeypatch):
    pipe = build_tiny("flux")
    calls = _calls(pipe, "flux")
    references = final_outputs(pipe, calls)
    configs = [CalibratedCacheConfig(full, STEPS) for full, _ in MOVES[:3]]
    wrong = lambda config: ("full",) * STEPS  # noqa: E731  (a prediction the runs contradict)
    monkeypatch.setattr(prefix_module, "schedule_decisions", wrong)
    with PrefixReplay(pipe, find_denoiser(pipe)[1]) as replay:
        errors = [replay.error(config, calls, references) for config in configs]
        assert not replay.enabled
    assert errors == [schedule_error(pipe, config, calls, references) for config in configs]


def test_replayed_steps_keep_the_full_steps_the_cache_holds():
    decisions = schedule_decisions(CalibratedCacheConfig((0, 2, 5, 7), 10, partial_steps=((4, 1),)))
    assert decisions[:6] == ("full", "reuse", "full", "reuse", 1, "full")
    assert replayed_steps(decisions, 7, forecasting=False) == frozenset({0, 1, 2, 3, 4, 6})
    assert replayed_steps(decisions, 7, forecasting=True) == frozenset({0, 1, 3, 4, 6})
    assert replayed_steps(decisions, 1, forecasting=False) == frozenset()


def test_reuse_prefix_must_be_a_bool():
    with pytest.raises(ValueError, match="reuse_prefix must be True or False, got 'yes'"):
        calibrate_schedule(build_tiny("flux"), ["a cat"], num_inference_steps=4, reuse_prefix="yes")


def test_runs_replay_only_runs_made_with_the_same_settings():
    """A replay keyed by step decisions alone answered a forecasting schedule with a plain one's outputs."""
    pipe = build_tiny("flux")
    calls = _calls(pipe, "flux")
    references = final_outputs(pipe, calls)
    configs = [CalibratedCacheConfig((0, 3, 6), STEPS), CalibratedCacheConfig((0, 3, 7), STEPS, forecast=1),
               CalibratedCacheConfig((0, 3, 7), STEPS, forecast=1, forecast_target="output")]
    plain = [schedule_error(pipe, config, calls, references) for config in configs]
    with PrefixReplay(pipe, find_denoiser(pipe)[1]) as replay:
        assert [replay.error(config, calls, references) for config in configs] == plain


def test_a_search_on_custom_sigmas_plans_the_steps_they_set():
    """calibrate_schedule counted num_inference_steps (8), not the 4 steps custom sigmas set: every schedule it
    tried was squeezed onto the calls' 4 steps, and the result ran half its budget."""
    pipe = build_tiny("flux")
    sigmas = [1.0, 0.75, 0.5, 0.25]
    config = calibrate_schedule(pipe, ["a cat"], budget=0.5, num_inference_steps=8, search="greedy",
                                sigmas=sigmas, resample=False, **{key: value for key, value in
                                tiny_call_kwargs("flux", steps=4).items()
                                if key not in ("generator", "prompt", "num_inference_steps")})
    assert config.num_inference_steps == 4 and len(config.full_steps) == 2 and len(config.timesteps) == 4
