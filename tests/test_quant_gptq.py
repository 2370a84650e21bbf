"""GPTQ weight rounding: the solver lowers the output error on correlated inputs, stays on the
grid, and ``PTQConfig(weight_rounding="gptq")`` quantizes pipelines (and refuses bad combinations)."""

import pytest
import torch

from diffusion_accel.prune.obs import upper_inverse_factor
from diffusion_accel.quant import PTQConfig, quantize_, summary
from diffusion_accel.quant.formats import get_format
from diffusion_accel.quant.gptq import gptq_codes, hessian_key
from diffusion_accel.quant.quantizers import (dequantize_weight, quantize_weight, segment_rescaler, segment_sizes,
                                              weight_scales)
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

FLUX_FAST = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all",
                 calib_kwargs=(("height", 16), ("width", 16)))


def _correlated_inputs(rows=2048, width=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width ** 0.5 + torch.eye(width)
    return torch.randn(rows, width, generator=generator) @ mixing


@pytest.mark.parametrize("fmt_name, granularity", [("int4", "per_channel"), ("int4", "group"), ("int8", "per_channel")])
def test_gptq_lowers_output_error_and_stays_on_the_grid(fmt_name, granularity):
    x = _correlated_inputs()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    fmt, sizes = get_format(fmt_name), segment_sizes(64, granularity, 32)
    scale = weight_scales(w, fmt, sizes)
    hessian = 2 * x.T @ x / len(x)
    codes, _ = gptq_codes(w, scale, sizes, fmt, upper_inverse_factor(hessian, 0.01), blocksize=16)
    assert codes.dtype == torch.int8 and codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    nearest = quantize_weight(w, scale, fmt, sizes)

    def output_error(c):
        return (x @ (dequantize_weight(c, scale, sizes) - w).T).pow(2).mean().item()

    assert output_error(codes) < 0.75 * output_error(nearest)


@pytest.mark.parametrize("fmt_name", ["int4", "int8"])
def test_act_order_rounds_the_loudest_inputs_first_and_lowers_the_output_error(fmt_name):
    """GPTQ's act_order on inputs with a few outlier channels: the same grid, the columns swept by decreasing
    Hessian diagonal (a faithfulness probe measured 20-45% lower error with the reference's act_order)."""
    from diffusion_accel.quant.gptq import activation_order, ordered_inverse_factor

    x = _correlated_inputs(seed=5)
    x[:, [3, 17, 40, 58]] *= 12.0  # outlier input channels
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    fmt, sizes = get_format(fmt_name), segment_sizes(64, "per_channel", 32)
    scale = weight_scales(w, fmt, sizes)
    hessian = 2 * x.T @ x / len(x)
    order = activation_order(hessian)
    assert set(order[:4].tolist()) == {3, 17, 40, 58} and sorted(order.tolist()) == list(range(64))
    in_order, _ = gptq_codes(w, scale, sizes, fmt, upper_inverse_factor(hessian, 0.01), blocksize=16)
    factor, order = ordered_inverse_factor(hessian, 0.01, act_order=True)
    by_energy, _ = gptq_codes(w, scale, sizes, fmt, factor, blocksize=16, order=order)
    assert by_energy.dtype == torch.int8 and by_energy.min() >= fmt.qmin and by_energy.max() <= fmt.qmax

    def output_error(codes):
        return (x @ (dequantize_weight(codes, scale, sizes) - w).T).pow(2).mean().item()

    assert output_error(by_energy) < 0.9 * output_error(in_order)
    identity_factor, identity = ordered_inverse_factor(torch.diag(torch.arange(64.0, 0, -1)), 0.01, act_order=True)
    assert torch.equal(identity, torch.arange(64))  # already in order: the plain sweep
    assert torch.equal(gptq_codes(w, scale, sizes, fmt, identity_factor, 16, order=identity)[0],
                       gptq_codes(w, scale, sizes, fmt, identity_factor, 16)[0])


def test_lazy_group_scales_fit_the_compensated_weights():
    """Each later group's scale comes from the weights as compensation left them: no code is clipped
    that a scale refitted to those weights would have kept, and the output error drops."""
    x = _correlated_inputs(width=128, seed=3)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    fmt, sizes = get_format("int4"), segment_sizes(128, "group", 32)
    scale = weight_scales(w, fmt, sizes)
    factor = upper_inverse_factor(2 * x.T @ x / len(x), 0.01)
    static_codes, static_scale = gptq_codes(w, scale, sizes, fmt, factor, blocksize=64)
    lazy_codes, lazy_scale = gptq_codes(w, scale, sizes, fmt, factor, blocksize=64,
                                        rescale=segment_rescaler(fmt, sizes))
    assert torch.equal(static_scale, scale) and torch.equal(lazy_scale[:, 0], scale[:, 0])
    assert not torch.equal(lazy_scale[:, 1:], scale[:, 1:])

    def output_error(codes, s):
        return (x @ (dequantize_weight(codes, s, sizes) - w).T).pow(2).mean().item()

    assert output_error(lazy_codes, lazy_scale) < output_error(static_codes, static_scale)
    one_segment = segment_sizes(128, "per_channel", 32)
    per_channel = weight_scales(w, fmt, one_segment)
    assert torch.equal(gptq_codes(w, per_channel, one_segment, fmt, factor)[0],
                       gptq_codes(w, per_channel, one_segment, fmt, factor,
                                  rescale=segment_rescaler(fmt, one_segment))[0])


def test_gptq_keeps_weights_already_on_the_grid_dead_inputs_too():
    fmt, sizes = get_format("int8"), (32,)
    scale = torch.full((4, 1), 0.1)
    codes = torch.randint(-127, 128, (4, 32), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    x = _correlated_inputs(512, 32)
    x[:, 5] = 0  # a dead input (no signal at the calibration size): rounded to nearest, not zeroed
    hessian = 2 * x.T @ x / len(x)
    out, _ = gptq_codes(dequantize_weight(codes, scale, sizes), scale, sizes, fmt, upper_inverse_factor(hessian, 0.01))
    assert torch.equal(out, codes)


def test_layers_sharing_an_input_share_one_hessian_only_when_they_unfold_it_alike():
    unet = build_tiny("sd").unet
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert hessian_key(unet, f"{attn}.to_k", f"{attn}.to_q") == f"{attn}.to_q"
    resnet = "up_blocks.1.resnets.0"
    assert hessian_key(unet, f"{resnet}.conv_shortcut", f"{resnet}.conv1") == f"{resnet}.conv_shortcut"


def _sqnr_db(ref, out):
    return float(10 * torch.log10(ref.var() / (out - ref).pow(2).mean()))


def test_gptq_w4_pipeline_is_closer_to_float_than_nearest_rounding():
    reference = build_tiny("flux")(**tiny_call_kwargs("flux")).images
    sqnr = {}
    for rounding, extra in (("nearest", {}), ("gptq", {}),
                            ("gptq act_order", dict(gptq_act_order=True, gptq_group_scales="static"))):
        pipe = build_tiny("flux")
        quantize_(pipe, PTQConfig(weights="int4", activations=None, weight_rounding=rounding.split()[0],
                                  gptq_groups=2, **FLUX_FAST, **extra))
        assert "int4-packed" in summary(pipe) and f"rounding {rounding.split()[0]}" in summary(pipe)  # lowered
        sqnr[rounding] = _sqnr_db(reference, pipe(**tiny_call_kwargs("flux")).images)
    assert sqnr["gptq"] > sqnr["nearest"] + 3 and sqnr["gptq act_order"] > sqnr["nearest"] + 3


def test_gptq_groups_over_the_hessian_budget_split_into_more_sweeps_with_the_same_codes(monkeypatch):
    """GPTQ collects Hessians of the float model, so splitting a group that would not fit a quarter of the
    device's memory (full-size SD 1.5 planned 13.4 GiB in one sweep) changes the number of sweeps only."""
    import warnings

    from diffusion_accel.calib import hessian
    from diffusion_accel.quant import calibrate as quant_calibrate

    sweeps, run = [], quant_calibrate._run
    monkeypatch.setattr(quant_calibrate, "_run", lambda *args, **kwargs: sweeps.append(args[2]) or run(*args, **kwargs))
    config = PTQConfig(weights="int4", activations=None, weight_rounding="gptq", gptq_groups=1, **FLUX_FAST)
    roomy = quantize_(build_tiny("flux"), config)
    roomy_sweeps = len(sweeps)
    float_model = build_tiny("flux").transformer
    largest = max(hessian.hessian_bytes(float_model, [name])
                  for name, module in float_model.named_modules()
                  if isinstance(module, torch.nn.Linear) and "blocks." in name)  # quantized layers only
    monkeypatch.setattr(hessian, "device_memory_bytes", lambda device: 4 * 2 * largest)  # budget: two layers
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        split = quantize_(build_tiny("flux"), config)
    assert roomy_sweeps == 1 and len(sweeps) - roomy_sweeps > 3
    assert torch.equal(split(**tiny_call_kwargs("flux")).images, roomy(**tiny_call_kwargs("flux")).images)


@pytest.mark.parametrize("activations", [None, "int8"])
def test_gptq_sweeps_replay_the_first_pass_and_round_as_reruns_do(monkeypatch, activations):
    """Every sweep reran the whole pipeline (text encoder, VAE, unselected steps) on the same float denoiser."""
    from diffusion_accel.quant import calibrate as quant_calibrate

    config = PTQConfig(weights="int4", activations=activations, weight_rounding="gptq", gptq_groups=3, **FLUX_FAST)
    encodes = []
    pipe = build_tiny("flux")
    pipe.text_encoder_2.register_forward_hook(lambda *args: encodes.append(1))
    quantize_(pipe, config)
    monkeypatch.setattr(quant_calibrate, "replayable", lambda calib: None)
    rerun = quantize_(build_tiny("flux"), config)
    assert len(encodes) == 1  # one pipeline call (1 prompt): the other sweeps replayed its denoiser inputs
    assert torch.equal(pipe(**tiny_call_kwargs("flux")).images, rerun(**tiny_call_kwargs("flux")).images)


@pytest.mark.parametrize("changes, message", [
    (dict(weights="fp8", activations="fp8"), "integer weights"),
    (dict(weights=None, activations="int8"), "integer weights"),
    (dict(reconstruct=True), "use one of them"),
    (dict(gptq_damp=0), "gptq_damp"),
    (dict(gptq_groups=0), "gptq_groups"),
    (dict(gptq_group_scales="dynamic"), "gptq_group_scales"),
    (dict(gptq_act_order=True), r"gptq_act_order=True rounds columns out of order.*gptq_group_scales='static'"),
    (dict(gptq_act_order=1, gptq_group_scales="static"), r"gptq_act_order must be True or False, got 1"),
])
def test_bad_gptq_configs_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        PTQConfig(weight_rounding="gptq", **changes)
    with pytest.raises(ValueError, match=r"gptq_act_order=True orders GPTQ's sweep; it needs weight_rounding='gptq'"):
        PTQConfig(gptq_act_order=True, gptq_group_scales="static")


@pytest.mark.parametrize("rounding", [dict(weight_rounding="gptq"), dict(reconstruct=True, recon_iters=30)],
                         ids=["gptq", "adaround"])
def test_quantizing_a_2_4_pruned_model_keeps_its_pruned_weights_zero(rounding):
    """GPTQ handed earlier columns' rounding errors to pruned zeros and AdaRound could round them up: a 2:4
    pruned layer left quantization with nonzero codes in its pruned places (sparsity 0.465, 8 groups broken)."""
    from diffusion_accel.prune import PruneConfig, prune_
    from diffusion_accel.quant.layers import QuantLayer

    pipe = prune_(build_tiny("dit"), PruneConfig(method="magnitude", pattern="2:4"))
    kept = {name: module.weight.detach().reshape(module.weight.shape[0], -1) != 0
            for name, module in pipe.transformer.named_modules() if getattr(module, "weight", None) is not None}
    quantize_(pipe, PTQConfig(weights="int4", activations=None, lower=False, calib_prompts=1, calib_num_steps=2,
                              calib_steps="all", **rounding))
    layers = {name: module for name, module in pipe.transformer.named_modules()
              if isinstance(module, QuantLayer)}
    checked = [name for name, layer in layers.items() if kept[name].float().mean() <= 0.5]
    assert len(checked) >= 4
    for name in checked:
        assert not (layers[name].weight_codes.reshape(kept[name].shape) != 0)[~kept[name]].any(), name


@pytest.mark.parametrize("extra", [dict(weight_scale="output_mse"), dict(weight_rounding="gptq"),
                                   dict(weight_scale="output_mse", weight_rounding="gptq")])
def test_a_grouped_conv_gets_plain_mse_scales_and_nearest_rounding(extra):
    """A depthwise Conv2d raised TypeError in the Hessian collector for output_mse scales and GPTQ (the w4a8 preset)
    while plain W8A8 quantized it; it now gets the plain MSE search and nearest rounding."""
    from torch import nn

    from diffusion_accel.prune.surgery import replace_module
    from diffusion_accel.quant.build import weight_codes

    pipe = build_tiny("sd")
    name = "down_blocks.0.downsamplers.0.conv"
    old = pipe.unet.get_submodule(name)
    replace_module(pipe.unet, name, nn.Conv2d(old.in_channels, old.out_channels, 3, stride=old.stride,
                                              padding=old.padding, groups=old.in_channels))
    depthwise = pipe.unet.get_submodule(name)
    config = PTQConfig(weights="int4", activations="int8", calib_prompts=1, calib_num_steps=2, calib_steps="all",
                       lower=False, **extra)
    expected, _, _ = weight_codes(depthwise, config.with_(weight_scale="mse" if "weight_scale" in extra else "max"),
                                  None)
    quantize_(pipe, config)
    quantized = pipe.unet.get_submodule(name)
    assert torch.equal(quantized.weight_codes.reshape(expected.shape).to(expected.dtype), expected)
    only = build_tiny("sd")  # only grouped convs selected: no Hessian collector at all ("needs at least one module")
    replace_module(only.unet, name, nn.Conv2d(old.in_channels, old.out_channels, 3, stride=old.stride,
                                              padding=old.padding, groups=old.in_channels))
    quantize_(only, config.with_(include=(name,)))
    assert type(only.unet.get_submodule(name)).__name__ == "QuantConv2d"

