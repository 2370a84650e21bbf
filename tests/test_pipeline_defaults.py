"""A pipeline's own call settings (pipeline_defaults.py) apply beneath explicit arguments wherever the
library calls it: calibration plans and evaluation calls, recorded in the evaluation report."""

import copy
import json

import numpy as np
import pytest
import torch

import diffusion_accel as da
from diffusion_accel.calib.inputs import UNSET, plan_calls
from diffusion_accel.pipeline_defaults import call_defaults, set_call_defaults
from diffusion_accel.eval.pipes import ImageJob, build_call_kwargs
from diffusion_accel.testing.tiny import build_tiny

FLUX_DEFAULTS = {"true_cfg_scale": 2.0, "negative_prompt": "", "max_sequence_length": 16}


def _tagged_flux():
    pipe = build_tiny("flux")
    set_call_defaults(pipe, FLUX_DEFAULTS)
    return pipe


def test_defaults_survive_a_deep_copy_and_untagged_pipelines_have_none():
    pipe = _tagged_flux()
    assert call_defaults(copy.deepcopy(pipe)) == FLUX_DEFAULTS
    assert da.call_defaults(pipe) == FLUX_DEFAULTS  # the top-level name is the function, not the module
    assert call_defaults(build_tiny("flux")) == {}


def test_pipelines_built_from_a_tagged_pipelines_components_keep_its_defaults():
    """from_pipe / Img2Img(**components) made a new, untagged object: the same call gave another image."""
    import diffusers

    pipe = _tagged_flux()
    assert call_defaults(type(pipe).from_pipe(pipe)) == FLUX_DEFAULTS
    assert call_defaults(diffusers.FluxImg2ImgPipeline(**pipe.components)) == FLUX_DEFAULTS
    own = type(pipe).from_pipe(pipe)
    set_call_defaults(own, {"max_sequence_length": 8})  # a pipeline's own tag wins
    assert call_defaults(own) == {"max_sequence_length": 8}


def test_calibration_calls_use_the_defaults_under_explicit_arguments():
    pipe = _tagged_flux()
    settings = dict(num_inference_steps=2, batch_size=1, num_images_per_prompt=1, seed=0)
    call = plan_calls(pipe, ["a cat"], guidance_scale=None, negative_prompt=UNSET, call_kwargs={}, **settings)[0]
    per_prompt = {"negative_prompt": [FLUX_DEFAULTS["negative_prompt"]]}  # a string default goes one per prompt
    assert {key: call.kwargs[key] for key in FLUX_DEFAULTS} == FLUX_DEFAULTS | per_prompt
    dropped = plan_calls(pipe, ["a cat"], guidance_scale=None, negative_prompt=None, call_kwargs={}, **settings)[0]
    assert "negative_prompt" not in dropped.kwargs and dropped.kwargs["true_cfg_scale"] == 2.0  # None given: no
    # negative prompt, so no true CFG, as evaluate runs it
    call = plan_calls(pipe, ["a cat"], guidance_scale=None, negative_prompt="blurry",
                      call_kwargs={"max_sequence_length": 8}, **settings)[0]
    assert call.kwargs["max_sequence_length"] == 8 and call.kwargs["negative_prompt"] == ["blurry"]
    assert call.kwargs["true_cfg_scale"] == 2.0


def test_evaluation_calls_use_the_defaults_and_the_report_names_them():
    pipe = _tagged_flux()
    jobs = [ImageJob(index=0, prompt_index=0, prompt="a cat", seed=0)]
    kwargs = build_call_kwargs(pipe, jobs, num_inference_steps=2, call_kwargs={"true_cfg_scale": 1.0})
    assert kwargs["max_sequence_length"] == 16 and kwargs["true_cfg_scale"] == 1.0
    report = da.evaluate({"flux": pipe}, ["a cat"], metrics=("psnr",), num_inference_steps=2,
                         call_kwargs={"height": 16, "width": 16}, progress=False)
    assert report.settings["pipeline_call_defaults"] == {"flux": FLUX_DEFAULTS}  # JSON values as they are (3.0 was "3.0")



def _misspelt_calls(pipe):
    return (lambda: da.calibrate(pipe, ["a cat"], num_inference_steps=2, hieght=48, progress=False),
            lambda: da.evaluate({"base": pipe}, ["a cat"], metrics=("psnr",), num_inference_steps=2,
                                call_kwargs={"hieght": 48}, progress=False))


def test_a_misspelt_argument_of_a_pipeline_without_kwargs_fails_before_any_call(monkeypatch):
    """Flux: diffusers' bare TypeError at the first pipeline call (a traceback from the command line)."""
    import importlib

    import pytest

    from diffusion_accel.pipeline_defaults import CallArgumentError

    pipe = build_tiny("flux")
    monkeypatch.setattr(importlib.import_module("diffusion_accel.eval.evaluate"), "_generate_all",
                        lambda *a: pytest.fail("generated"))
    for run in _misspelt_calls(pipe):
        with pytest.raises(CallArgumentError, match=r"FluxPipeline.__call__ has no argument hieght .*'height'"):
            run()
    assert issubclass(CallArgumentError, ValueError) and issubclass(CallArgumentError, TypeError)


def test_a_misspelt_argument_of_a_pipeline_taking_kwargs_warns():
    """SD's __call__ takes **kwargs and ignores what it does not read: 'hieght' ran silently at the default size."""
    import pytest

    for run in _misspelt_calls(build_tiny("sd")):
        with pytest.warns(UserWarning, match=r"StableDiffusionPipeline.__call__ has no argument hieght: .*ignores") \
                as record:
            run()
        assert {item.filename for item in record if "hieght" in str(item.message)} == {__file__}  # the caller's line


def test_a_call_argument_of_the_wrong_type_is_named_before_any_call():
    """``--call guidance_scale=abc`` ended in a TypeError traceback from inside diffusers' first call."""
    import pytest

    from diffusion_accel.pipeline_defaults import CallArgumentError

    pipe = build_tiny("sd")
    for value, wanted in (("abc", "a number"), (True, "a number")):
        with pytest.raises(CallArgumentError, match=rf"guidance_rescale={value!r} \(from evaluate\) must be {wanted}"):
            da.evaluate({"base": pipe}, ["a cat"], metrics=("psnr",), num_inference_steps=2,
                        call_kwargs={"guidance_rescale": value}, progress=False)
    with pytest.raises(CallArgumentError, match=r"eta='0.5' \(from calibrate\) must be a number"):
        da.calibrate(pipe, ["a cat"], num_inference_steps=2, eta="0.5", progress=False)


def test_a_call_argument_contradicting_its_annotation_is_named_before_any_call():
    """Parameters defaulting to None are judged by their annotation: ``--call negative_prompt=2024`` and
    ``clip_skip=x`` ended in diffusers' TypeError traceback; values it does not judge (dicts of Any, tensors)
    and right ones pass."""
    import pytest

    from diffusion_accel.pipeline_defaults import CallArgumentError, check_call_arguments

    pipe = build_tiny("sd")
    for name, value, wanted in (("negative_prompt", 2024, "a string, a list of strings or null"),
                                ("negative_prompt", ["blurry", 3], "a string, a list of strings or null"),
                                ("clip_skip", "x", "an int or null"), ("clip_skip", True, "an int or null")):
        message = rf"{name}={value!r} \(from evaluate\) must be {wanted}$".replace("[", r"\[")
        with pytest.raises(CallArgumentError, match=message):
            check_call_arguments(pipe, {name: value}, "evaluate")
    check_call_arguments(pipe, {"negative_prompt": ["blurry"], "clip_skip": 1, "timesteps": [999, 500],
                                "cross_attention_kwargs": {"scale": 0.5}, "latents": torch.zeros(1)}, "evaluate")
    # numpy scalars and tensors pass (they were refused for number defaults); None only where allowed
    import numpy as np

    check_call_arguments(pipe, {"eta": np.float32(0.5), "guidance_rescale": torch.tensor(0.7),
                                "return_dict": np.bool_(True), "height": np.int64(32)}, "evaluate")
    for name, value, wanted in (("eta", None, "a number"), ("height", 32.0, "an int or null")):
        with pytest.raises(CallArgumentError, match=rf"{name}={value!r} \(from evaluate\) must be {wanted}"):
            check_call_arguments(pipe, {name: value}, "evaluate")
    from diffusers import StableDiffusionControlNetPipeline  # Union[float, List[float]] with a float default

    controlnet = StableDiffusionControlNetPipeline.__new__(StableDiffusionControlNetPipeline)
    check_call_arguments(controlnet, {"controlnet_conditioning_scale": [1.0, 0.5],
                                      "control_guidance_start": [0.0, 0.2]}, "calibrate")
    with pytest.raises(CallArgumentError, match=r"controlnet_conditioning_scale='x'"):
        check_call_arguments(controlnet, {"controlnet_conditioning_scale": "x"}, "calibrate")
    with pytest.raises(CallArgumentError, match=r"clip_skip='x' \(from calibrate\)"):
        da.calibrate(pipe, ["a cat"], num_inference_steps=2, clip_skip="x", progress=False)


def test_warnings_of_decorated_entry_points_point_at_the_callers_line():
    """calibrate / quantize_ / prune_ run under torch.inference_mode(False), whose wrapper frame lies outside the
    package: fixed stacklevels pointed into torch/utils/_contextlib.py."""
    import warnings

    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    import diffusion_accel as da

    pipe = StableDiffusionImg2ImgPipeline(**build_tiny("sd").components)
    image = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        da.calibrate(pipe, ["a cat"], 4, steps=(0, 3), progress=False, image=image, strength=0.5)
    ours = [item for item in caught if "did not run" in str(item.message)]
    assert ours and all(item.filename == __file__ for item in ours)


@pytest.mark.parametrize("family, key", [("sd", "guidance_scale"), ("flux", "true_cfg_scale")])
@pytest.mark.parametrize("value", [float("nan"), -3.0, float("inf"), np.float32("nan"), torch.tensor(-2.0),
                                   np.array([float("nan")])])
def test_a_nan_or_negative_guidance_is_refused_by_every_entry(family, key, value):
    """NaN or -3 turned CFG off silently (the pipelines test > 1): evaluate's call_kwargs and, for true_cfg_scale
    (fashion-flux's CFG), the command line's --call took them; --guidance refused them since session 45."""
    from diffusion_accel.pipeline_defaults import CallArgumentError, check_call_arguments
    from diffusion_accel.recipes import parse_call_args

    with pytest.raises(CallArgumentError, match=f"{key}=.* \\(from evaluate\\) must be a finite number >= 0"):
        check_call_arguments(build_tiny(family), {key: value}, "evaluate")
    if key == "true_cfg_scale" and isinstance(value, float):
        with pytest.raises(ValueError, match="--call true_cfg_scale=.* must be a finite number >= 0"):
            parse_call_args([f"true_cfg_scale={json.dumps(value)}"])  # NaN, Infinity: JSON's spellings
