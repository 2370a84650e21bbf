"""Wrong inputs to the public API: a clear error naming the value, before any work (session 28 review:
these ended in bare AttributeError / TypeError from deep inside)."""

import pytest

import diffusion_accel as da
from diffusion_accel.testing.tiny import build_tiny


@pytest.fixture(scope="module")
def pipe():
    return build_tiny("sd")


@pytest.mark.parametrize("call, error, message", [
    (lambda p: da.calibrate(None, ["a"], 2), TypeError, "NoneType .* is not supported"),
    (lambda p: da.calibrate("zoo:fashion-sd", ["a"], 2), TypeError, "str .* is not supported"),
    (lambda p: da.calibrate(p, ["a"], 2, collectors=5), TypeError, "collectors must be a Collector or a list"),
    (lambda p: da.calibrate(p, ["a"], 2, negative_prompt=5), ValueError, "negative_prompt must be a string or a list"),
    (lambda p: da.quantize_(p, filter_fn="*attn*"), TypeError, r"filter_fn must be a function .* PTQConfig\(include"),
    (lambda p: da.PTQConfig.preset("w8a8", bogus=1), ValueError, r"unknown PTQConfig fields \['bogus'\]"),
    (lambda p: da.PTQConfig().with_(bogus=1), ValueError, r"unknown PTQConfig fields \['bogus'\]"),
    (lambda p: da.PTQConfig.from_dict(None), TypeError, "from_dict takes a dict"),
    (lambda p: da.evaluate({"a": None}, ["x"]), TypeError, r"variants \['a'\] are no pipelines"),
    (lambda p: da.evaluate({"a": p}, None), ValueError, "prompts must be a non-empty list"),
    (lambda p: da.save(p, None), TypeError, r"save\(pipe, directory\) takes the pipeline first"),
    (lambda p: da.load("some/folder", p), TypeError, r"load\(base_pipe, directory\) takes the pipeline first"),
], ids=["calibrate-none", "calibrate-spec", "collectors", "negative", "filter-fn", "preset-field", "with-field",
        "from-dict", "evaluate-none", "evaluate-prompts", "save-none", "load-swapped"])
def test_wrong_inputs_are_named_before_any_work(pipe, call, error, message):
    unet = pipe.unet
    with pytest.raises(error, match=message):
        call(pipe)
    assert pipe.unet is unet and da.artifact.applied_techniques(pipe) == []


def test_unconditional_placeholder_prompts_work_for_cache_calibration_too():
    """calibrate took [None] * N (what prompts.for_pipeline gives a DDPM); calibrate_schedule refused it."""
    config = da.calibrate_schedule(build_tiny("ddpm"), [None, None], budget=0.5, num_inference_steps=4)
    assert config.full_steps[0] == 0 and config.num_inference_steps == 4


def test_evaluating_a_pipeline_without_images_is_a_clear_error():
    import types

    pipe = build_tiny("ddpm")

    class AudioLike(type(pipe)):
        def __call__(self, batch_size=1, num_inference_steps=2, generator=None, output_type="pil"):
            return types.SimpleNamespace(audios=super().__call__(batch_size=batch_size, generator=generator,
                                                                 num_inference_steps=num_inference_steps).images)

    audio = AudioLike(unet=pipe.unet, scheduler=pipe.scheduler)
    with pytest.raises(TypeError, match="returned a SimpleNamespace without images: evaluation scores image pipelines"):
        da.evaluate({"a": audio}, [None], metrics=("latency",), num_inference_steps=2, progress=False)


@pytest.mark.parametrize("config", [da.PTQConfig(), da.PruneConfig(method="obs"), da.DeepCacheConfig(interval=2),
                                    da.BlockCacheConfig(interval=2), da.CalibratedCacheConfig(full_steps=(0, 3),
                                                                                            num_inference_steps=6)],
                         ids=lambda config: type(config).__name__)
def test_every_config_round_trips_and_copies_the_same_way(config):
    """Only PTQConfig had with_; cache configs had no to_dict / from_dict of their own."""
    cls = type(config)
    assert cls.from_dict(config.to_dict()) == config
    change = {"PTQConfig": {"timestep_groups": 2}, "PruneConfig": {"groups": 2}, "DeepCacheConfig": {"interval": 5},
              "BlockCacheConfig": {"interval": 5}, "CalibratedCacheConfig": {"resample": False}}[cls.__name__]
    changed = config.with_(**change)
    assert changed != config and type(changed) is cls
    with pytest.raises(ValueError, match=rf"unknown {cls.__name__} fields \['bogus'\]"):
        config.with_(bogus=1)


def test_calib_kwargs_and_calib_steps_are_taken_or_refused_alike_in_every_form():
    """PTQConfig.from_dict split a dict's keys into letters, took ['hw'] as a pair and failed on 5 naming nothing;
    numpy values were made plain in pairs but refused in a dict; (0.0, 2.0) as calib_steps was a TypeError naming
    no field (session 48 review)."""
    import numpy as np

    assert da.PTQConfig.from_dict({"calib_kwargs": {"height": 32}}).calib_kwargs == (("height", 32),)
    assert da.PTQConfig.from_dict({"calib_kwargs": [["height", 32]]}).calib_kwargs == (("height", 32),)
    for bad in (5, ["hw"]):
        with pytest.raises(ValueError, match="PTQConfig.calib_kwargs takes"):
            da.PTQConfig.from_dict({"calib_kwargs": bad})
    for cls in (da.PTQConfig, da.PruneConfig):
        assert cls(calib_kwargs={"height": np.int64(32)}).calib_kwargs == (("height", 32),)
    with pytest.raises(ValueError, match=r"PTQConfig.calib_steps=\(0.0, 2.0\) .*must be ints"):
        da.PTQConfig(calib_steps=(0.0, 2.0))


def test_configs_with_tuple_calib_kwargs_equal_themselves_after_a_json_round_trip():
    """``original_size=(64, 64)`` came back from the manifest as a list: the loaded config compared unequal to the
    one saved (until session 50); values are held as JSON gives them back."""
    import json

    for cls in (da.PTQConfig, da.PruneConfig):
        config = cls(calib_kwargs={"original_size": (64, 64), "extra": {"a": (1, (2, 3))}})
        assert config == cls.from_dict(json.loads(json.dumps(config.to_dict())))
        assert dict(config.calib_kwargs)["extra"] == {"a": [1, [2, 3]]}


def test_an_int_beyond_float_range_is_refused_by_name_in_every_config_field():
    """10**400 in a float field raised OverflowError from math.isfinite / float() (TeaCacheConfig coefficients,
    PTQConfig.recon_lr, PruneConfig.damp, ...), not the field's error; so did calibrate's guidance (session 49)."""
    import dataclasses

    configs = [getattr(da, name) for name in dir(da) if name.endswith("Config")]
    assert len(configs) >= 10
    checked = 0
    for cls in configs:
        for field in (f for f in dataclasses.fields(cls) if f.init):
            for value in (10 ** 400, (10 ** 400, 1.0)):
                try:
                    cls(**{field.name: value})
                except (ValueError, TypeError):
                    checked += 1
    assert checked > 50
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        da.calibrate(build_tiny("sd"), ["a"], 2, guidance_scale=10 ** 400)


def test_a_cache_config_dict_of_another_type_is_refused():
    with pytest.raises(ValueError, match="DeepCacheConfig.from_dict got a BlockCacheConfig"):
        da.DeepCacheConfig.from_dict(da.BlockCacheConfig(interval=2).to_dict())
    with pytest.raises(ValueError, match="a cache config dict is"):
        da.DeepCacheConfig.from_dict({})


NAN_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CALIB_FAST = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all")


@pytest.mark.parametrize("apply", [
    lambda p: da.quantize_(p, da.PTQConfig.preset("w8a8", **CALIB_FAST)),
    lambda p: da.quantize_(p, da.PTQConfig.preset("w8a16", **CALIB_FAST)),
    lambda p: da.prune_(p, da.PruneConfig(method="obs", sparsity=0.5, calib_prompts=1, calib_num_steps=2)),
], ids=["w8a8", "w8a16", "obs"])
def test_a_weight_holding_nan_is_named_and_nothing_changes(apply):
    """w8a8 failed with "cannot convert float NaN to integer", OBS with "Hessian ... not positive definite",
    both naming no layer; w8a16 quantized silently (NaN images, as the float model's)."""
    import torch

    pipe = build_tiny("sd")
    with torch.no_grad():
        pipe.unet.get_submodule(NAN_LAYER).weight[0, 0] = float("nan")
    before = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=rf"needs finite weights, but '{NAN_LAYER}.weight' holds 1 NaN"):
        apply(pipe)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) or name.endswith("to_q.weight") for name in before)


@pytest.mark.parametrize("apply", [
    lambda p, calib: da.quantize_(p, da.PTQConfig.preset("w8a8"), calib=calib),
    lambda p, calib: da.quantize_(p, da.PTQConfig.preset("w8a8", act_method="mse"), calib=calib),  # round(NaN)
    lambda p, calib: da.prune_(p, da.PruneConfig(method="obs", sparsity=0.5), calib=calib),
], ids=["w8a8", "w8a8-mse", "obs"])
def test_calibration_inputs_that_overflow_are_named(apply):
    """Finite weights whose activations overflow (a float16 model's usual failure) gave errors naming no layer."""
    import torch

    pipe = build_tiny("sd")
    with torch.no_grad():
        pipe.unet.get_submodule(NAN_LAYER).weight.mul_(1e38)
    calib = da.calibrate(pipe, ["a photo"], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"calibration inputs of layer '.*' (range over|hold) .*NaN or inf"):
        apply(pipe, calib)


def test_every_public_name_resolves_and_dir_lists_the_lazy_ones():
    """``dir(diffusion_accel)`` listed only what was already imported (no tab completion for ``da.calibrate``)."""
    import diffusion_accel

    assert set(diffusion_accel.__all__) <= set(dir(diffusion_accel))
    for name in diffusion_accel.__all__:
        assert getattr(diffusion_accel, name) is not None, name
