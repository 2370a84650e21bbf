"""Quantizer math: error bounds, per-channel and group-wise scales, zero points, int4 packing, configs."""

import numpy as np
import pytest
import torch

from diffusion_accel.quant import PTQConfig
from diffusion_accel.quant.formats import get_format
from diffusion_accel.quant.quantizers import (activation_qparams, dequantize_weight, dynamic_qparams,
                                              fake_quant_act, pack_int4, quantize_weight, segment_sizes,
                                              unpack_int4, weight_scales)


def test_per_channel_int8_scales_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(8, 32) * torch.linspace(0.1, 10, 8)[:, None]
    fmt = get_format("int8")
    scale = weight_scales(w, fmt, (32,))
    assert scale.shape == (8, 1)
    torch.testing.assert_close(scale[:, 0], w.abs().amax(dim=1) / 127)
    error = (dequantize_weight(quantize_weight(w, scale, fmt, (32,)), scale, (32,)) - w).abs()
    assert (error <= scale / 2 + 1e-6).all()


def test_a_group_size_that_does_not_divide_the_columns_leaves_a_shorter_last_group():
    """SD 1.5's 320-channel 3x3 convs (2,880 columns) under group 128 were quantized per channel, silently."""
    assert segment_sizes(2880, "group", 128) == (128,) * 22 + (64,)
    assert segment_sizes(96, "group", 128) == (96,)  # no wider than one group: one segment
    torch.manual_seed(0)
    w = torch.randn(3, 160)
    w[:, 128:] *= 0.01  # a quiet tail group keeps its own fine scale
    fmt, sizes = get_format("int4"), segment_sizes(160, "group", 64)
    scale = weight_scales(w, fmt, sizes)
    assert sizes == (64, 64, 32) and scale.shape == (3, 3)
    deq = dequantize_weight(quantize_weight(w, scale, fmt, sizes), scale, sizes)
    assert ((deq - w)[:, 128:].abs() <= scale[:, 2:] / 2 + 1e-7).all()
    assert (deq - w)[:, 128:].abs().max() < 1e-2 * w[:, :128].abs().max() / fmt.qmax


def test_groupwise_int4_has_one_scale_per_group_and_bounded_error():
    torch.manual_seed(0)
    w = torch.randn(4, 256)
    w[:, :64] *= 20  # one loud group must not spoil the others
    fmt = get_format("int4")
    sizes = segment_sizes(256, "group", 64)
    assert sizes == (64,) * 4
    scale = weight_scales(w, fmt, sizes)
    assert scale.shape == (4, 4)
    codes = quantize_weight(w, scale, fmt, sizes)
    assert codes.min() >= -8 and codes.max() <= 7
    deq = dequantize_weight(codes, scale, sizes)
    for g in range(4):
        part = slice(64 * g, 64 * (g + 1))
        assert ((deq[:, part] - w[:, part]).abs() <= scale[:, g:g + 1] / 2 + 1e-6).all()
    per_channel = weight_scales(w, fmt, (256,))
    error_channel = (dequantize_weight(quantize_weight(w, per_channel, fmt, (256,)), per_channel, (256,)) - w)
    quiet = slice(64, 256)
    assert (deq - w)[:, quiet].pow(2).mean() < error_channel[:, quiet].pow(2).mean() / 4


def test_mse_scale_search_never_worse_than_max():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[0, 0] = 30.0  # outlier
    fmt = get_format("int4")
    errors = {}
    for method in ("max", "mse"):
        scale = weight_scales(w, fmt, (128,), method)
        errors[method] = (dequantize_weight(quantize_weight(w, scale, fmt, (128,)), scale, (128,)) - w).pow(2).sum(1)
    assert (errors["mse"] <= errors["max"] + 1e-6).all() and errors["mse"].sum() < errors["max"].sum()


def test_output_mse_scales_minimise_output_error_on_unevenly_scaled_inputs():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, :8] *= 6  # large weights on quiet inputs: clipping them costs little output error
    x = torch.randn(4096, 64) * torch.cat([torch.full((8,), 0.05), torch.ones(56)])
    column_weights = x.pow(2).mean(0)
    fmt = get_format("int4")

    def output_error(method):
        scale = weight_scales(w, fmt, (64,), method, column_weights)
        deq = dequantize_weight(quantize_weight(w, scale, fmt, (64,)), scale, (64,))
        return (x @ (deq - w).T).pow(2).mean().item()

    assert output_error("output_mse") < 0.7 * output_error("mse") < output_error("max")
    with pytest.raises(ValueError, match="output_mse.*column_weights of shape \\(64,\\)"):
        weight_scales(w, fmt, (64,), "output_mse")


def test_asymmetric_zero_point_represents_zero_and_the_range():
    fmt = get_format("int8")
    scale, zero = activation_qparams(-1.0, 3.0, fmt, symmetric=False)
    assert scale == pytest.approx(4 / 255) and zero == 64
    x = torch.tensor([-1.0, 0.0, 3.0, 1.234])
    out = fake_quant_act(x, torch.tensor(scale), torch.tensor(zero), fmt, False)
    assert out[1] == 0.0
    assert (out - x).abs().max() <= scale / 2 + 1e-6
    sym_scale, sym_zero = activation_qparams(-1.0, 3.0, fmt, symmetric=True)
    assert sym_zero == 0 and sym_scale == pytest.approx(3 / 127)
    # a positive-only range is widened to include 0
    assert activation_qparams(2.0, 3.0, fmt, False)[1] == 0


def _textbook_fake_quant(x, scale, zero, qmin, qmax):
    q = torch.clamp(x / scale + (torch.round(x / scale) - x / scale).detach() + zero, qmin, qmax)
    return (q - zero) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_the_textbook_form_in_values_and_gradients(dtype):
    """``clamp(round(x/s), qmin - z, qmax - z) * s`` is ``(clamp(round(x/s) + z, qmin, qmax) - z) * s``:
    same values (with and without autograd, scalar or per-channel zero points) and same gradients."""
    torch.manual_seed(0)
    fmt = get_format("int8")
    x = (torch.randn(4, 6, 5) * 3).to(dtype)
    for scale, zero in ((torch.tensor(0.02), torch.tensor(100)),
                        (torch.tensor([0.01, 0.03, 0.02, 0.05, 0.02, 0.04]).reshape(1, 6, 1),
                         torch.tensor([0, 30, 128, 255, 7, 90]).reshape(1, 6, 1))):
        expected = _textbook_fake_quant(x, scale.to(dtype), zero.to(dtype), 0, 255)
        assert torch.equal(fake_quant_act(x, scale.to(dtype), zero, fmt, False), expected)
        xg, sg = x.float().requires_grad_(), scale.clone().requires_grad_()
        xt, st = x.float().requires_grad_(), scale.clone().requires_grad_()
        out, ref = fake_quant_act(xg, sg, zero, fmt, False), _textbook_fake_quant(xt, st, zero.float(), 0, 255)
        assert torch.equal(out, ref)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
        assert torch.equal(xg.grad, xt.grad)
        torch.testing.assert_close(sg.grad, st.grad, rtol=1e-4, atol=1e-3)


def test_dynamic_per_token_params_follow_each_token():
    x = torch.stack([torch.linspace(-1, 1, 16), torch.linspace(0, 100, 16)])
    scale, zero = dynamic_qparams(x, -1, get_format("int8"), symmetric=False)
    assert scale.shape == (2, 1) and scale[1, 0] > 40 * scale[0, 0]
    out = fake_quant_act(x, scale, zero, get_format("int8"), False)
    assert ((out - x).abs() <= scale / 2 + 1e-5).all()


def test_fp8_activations_of_all_zero_tokens_stay_finite_in_float16():
    """An all-zero token (SDXL's zeroed negative-prompt embeddings) got an fp8 scale of 0 in float16 (EPS 1e-12
    underflows there): 0 / 0 made NaN images; static scales of an all-zero range did the same."""
    from diffusion_accel.quant.layers import ActQuantizer, DynamicActQuantizer

    x = torch.randn(4, 16).half()
    x[1] = 0
    static = ActQuantizer(torch.full((1, 1), 1e-12), torch.zeros(1, 1), "fp8", True)  # an all-zero range
    for quantizer in (DynamicActQuantizer("fp8", True, -1), DynamicActQuantizer("fp8", True, -1, per_tensor=True),
                      static):
        out = quantizer(x)
        assert out.dtype == torch.float16 and torch.isfinite(out).all() and (out[1] == 0).all()


def test_int4_pack_round_trip():
    codes = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes)


def test_fp8_weights_simulated_within_relative_precision():
    w = torch.randn(4, 64)
    fmt = get_format("fp8")
    scale = weight_scales(w, fmt, (64,))
    deq = dequantize_weight(quantize_weight(w, scale, fmt, (64,)), scale, (64,))
    assert ((deq - w).abs() <= w.abs() * 2 ** -3 + scale * 2 ** -6).all()


@pytest.mark.parametrize("field, value, accepted", [
    ("weights", "int3", "'int8', 'int4', 'fp8', None"),
    ("weights", 3, "'int8'"),
    ("activations", "int4", "'int8', 'fp8', None"),
    ("weight_granularity", "block", "'per_channel', 'group'"),
    ("group_size", 100, "64, 128"),
    ("act_method", "kl", "'minmax', 'percentile', 'mse'"),
    ("act_mode", "per_token", "'static', 'dynamic'"),
    ("weight_scale", "l1", "'max', 'mse', 'output_mse'"),
    ("weight_rounding", "adaround", "'nearest', 'gptq'"),
])
def test_bad_config_values_are_named_with_accepted_values(field, value, accepted):
    with pytest.raises(ValueError) as error:
        PTQConfig(**{field: value})
    assert repr(value) in str(error.value) and accepted in str(error.value) and field in str(error.value)


def test_more_bad_configs():
    with pytest.raises(ValueError, match="all are None"):
        PTQConfig(weights=None, activations=None)
    with pytest.raises(ValueError, match="calib_steps"):
        PTQConfig(calib_num_steps=4, calib_steps="uniform:5")
    with pytest.raises(ValueError, match="timestep_groups"):
        PTQConfig(act_mode="dynamic", timestep_groups=2)
    for name in ("w2a2", ["w8a8"]):  # a list was "unhashable type: 'list'" (session 49)
        with pytest.raises(ValueError, match="unknown PTQ preset"):
            PTQConfig.preset(name)
    with pytest.raises(ValueError, match="unknown PTQConfig fields"):
        PTQConfig.from_dict({"bits": 3})
    with pytest.raises(ValueError, match=r"act_exclude takes a tuple of glob strings.*\('\*conv_shortcut',\)"):
        PTQConfig(act_exclude="*conv_shortcut")  # tuple() of it would be the globs "*", "c", ...
    with pytest.raises(ValueError, match="activations=None already keeps"):
        PTQConfig(activations=None, act_exclude=("*conv_shortcut",))


@pytest.mark.parametrize("fields, message", [  # session 31: quantize_ ran, then save refused / a TypeError inside
    ({"calib_kwargs": {"height": {32}}}, r"calib_kwargs=.*cannot be stored in the artifact manifest"),  # a set
    # (a numpy int in a calib_kwargs dict is made plain since session 48, as in the pairs form)
    ({"recon_lr": float("nan")}, r"recon_lr must be a finite number in \(0, inf\), got nan"),
    ({"recon_reg": "strong"}, r"recon_reg must be a finite number in \[0, inf\), got 'strong'"),
    ({"lower": np.str_("yes")}, "lower must be True or False"),
    ({"calib_kwargs": {"num_inference_steps": 3}}, r"calib_kwargs may not set \['num_inference_steps'\]"),
    ({"calib_kwargs": {"guidance_scale": 3.0}}, "use calib_num_steps, calib_steps, calib_prompts and calib_guidance"),
    ({"calib_kwargs": {"prompts": ["a"]}}, r"may not set \['prompts'\]: quantize_'s own calibration sets them"),
])
def test_configs_an_artifact_could_not_hold_or_calibrate_could_not_take_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        PTQConfig(**fields)


def test_calibrate_arguments_quantize_does_not_set_pass_on():
    """Flux's true CFG calibrates with a negative prompt: calibrate's own argument, not one quantize_ sets."""
    config = PTQConfig(calib_kwargs={"negative_prompt": "", "true_cfg_scale": 3.0, "seed": 5, "height": 16})
    assert dict(config.calib_kwargs)["negative_prompt"] == ""


def test_numpy_scalars_in_configs_become_python_scalars():
    """A numpy-driven sweep's values: np.int64 was "must be an int >= 1, got np.int64(2)"; np.float32 quantized,
    then save could not write it (session 31)."""
    from diffusion_accel.cache import CalibratedCacheConfig, DeepCacheConfig
    from diffusion_accel.prune import PruneConfig

    config = PTQConfig(timestep_groups=np.int64(2), recon_lr=np.float32(0.5), lower=np.bool_(False))
    assert (type(config.timestep_groups), type(config.recon_lr), config.lower) == (int, float, False)
    assert DeepCacheConfig(interval=np.int64(3)).interval == 3 and type(DeepCacheConfig(interval=np.int32(3)).interval) is int
    assert CalibratedCacheConfig((0, 2), 4, budget=np.float32(0.5)).budget == 0.5
    assert type(PruneConfig(sparsity=np.float64(0.3), blocksize=np.int32(64)).blocksize) is int


@pytest.mark.parametrize("fields, message", [  # session 27: accepted as truthy, or bare errors deep inside
    ({"lower": "false"}, "lower must be True or False, got 'false'"),
    ({"act_symmetric": "no"}, "act_symmetric must be True or False"),
    ({"weight_granularity": "group", "group_size": 32.0}, "group_size must be an int >= 1, got 32.0"),
    ({"weight_rounding": "gptq", "gptq_damp": float("inf")}, r"gptq_damp must be a finite number in \(0, inf\)"),
    ({"reconstruct": True, "recon_lr": "1e-3"}, "recon_lr must be a finite number"),
    ({"reconstruct": True, "recon_p": 0}, "recon_p must be a finite number in"),
    ({"reconstruct": True, "recon_beta": (float("nan"), 2.0)}, "recon_beta must be \\(start, end\\), two finite"),
    ({"reconstruct": True, "recon_warmup": "0.2"}, "recon_warmup must be a finite number"),
    ({"include": 5}, "include takes a tuple"),
    ({"include": {"*": 1}}, "include takes a tuple"),
    ({"calib_kwargs": (("eta",),)}, "calib_kwargs takes \\(name, value\\) pairs"),
    ({"calib_kwargs": (("height", 16), ("height", 32))}, r"calib_kwargs sets \['height'\] more than once"),
    ({"calib_steps": 5}, "calib_steps takes a tuple \\(or list\\) or a string: 'all', 'uniform:K'"),
    ({"calib_guidance_scale": float("nan")}, "calib_guidance_scale must be a finite number"),
])
def test_config_fields_of_the_wrong_type_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        PTQConfig(**fields)


def test_calib_kwargs_may_be_a_dict():
    """A dict was taken by its keys, then failed when quantize_ calibrated by itself."""
    config = PTQConfig(calib_kwargs={"height": 32})
    assert config.calib_kwargs == (("height", 32),) and PTQConfig.from_dict(config.to_dict()) == config


def test_config_dict_round_trip_and_presets():
    config = PTQConfig.preset("qdiffusion")
    assert config.weights == "int4" and config.reconstruct and config.recon_iters == 20000
    assert PTQConfig.from_dict(config.to_dict()) == config
    assert PTQConfig.preset("W8A8") == PTQConfig.preset("w8a8")  # as papers write it


def test_numpy_scalars_inside_tuple_fields_are_plain_values():
    """calib_steps=(np.int64(0),) was 'step indices must be ints', recon_beta of np.float32 'two finite numbers'."""
    from diffusion_accel.cache.configs import CalibratedCacheConfig
    from diffusion_accel.quant import PTQConfig

    config = PTQConfig(calib_steps=(np.int64(0), np.int64(3)), recon_beta=(np.float32(20.0), 2.0))
    assert config.calib_steps == (0, 3) and type(config.calib_steps[0]) is int and config.recon_beta == (20.0, 2.0)
    cache = CalibratedCacheConfig((np.int64(0), 2), 4, partial_steps=((np.int64(1), np.int64(1)),))
    assert cache.partial_steps == ((1, 1),) and type(cache.partial_steps[0][0]) is int


@pytest.mark.parametrize(("activations", "symmetric"), [("int8", True), ("int8", False)])
def test_an_mse_range_search_scores_the_quantizer_the_layers_get(activations, symmetric):
    """act_method="mse" scored every range on an asymmetric int8 grid (symmetric int8 on fashion-sd: 30.6 dB, below
    minmax's 33.0; scored on its own grid 33.8, since session 45). fp8 is refused: its own MSE clips outliers."""
    from diffusion_accel.calib import RangeObserver, Step
    from diffusion_accel.quant.calibrate import _range_options, activation_quant_error

    config = PTQConfig(weights="int8", activations=activations, act_method="mse", act_symmetric=symmetric)
    observer = RangeObserver(["layer"], **_range_options(config))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        values = torch.distributions.StudentT(3.0).sample((65536,))  # heavy tails, as activations have
    observer.observe("layer", values, Step(0))
    error = lambda lo, hi: activation_quant_error(values, lo, hi, get_format(activations), symmetric)  # noqa: E731
    assert error(*observer.range("layer")) <= error(*observer.minmax("layer"))
    from diffusion_accel.quant.configs import check_calibration_choices

    saved = PTQConfig(weights="fp8", activations="fp8", act_method="mse")  # artifacts saved so still load
    with pytest.raises(ValueError, match="act_method='mse' clips a range .* use act_method='minmax'"):
        check_calibration_choices(saved)  # what quantize_ and the CLI check before calibrating
