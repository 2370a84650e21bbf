"""Simulated layers, split-shortcut quantization, timestep-group selection, lowering vs simulation."""

import time

import pytest
import torch
from torch import nn

from diffusion_accel.hooks import attach_tracker
from diffusion_accel.quant import fp8, onednn
from diffusion_accel.quant.build import weight_codes
from diffusion_accel.quant.configs import PTQConfig
from diffusion_accel.quant.formats import get_format
from diffusion_accel.quant.layers import ActQuantizer, DynamicActQuantizer, QuantConv2d, QuantLinear, StepGroups
from diffusion_accel.quant.lower import (Fp8Conv1x1, Fp8Linear, Int8Conv1x1, Int8Linear, StoredWeightLayer, int8_kernels_on,
                                        int8_matmul, lower_layer)
from diffusion_accel.quant.quantizers import activation_qparams, quantize_weight, weight_scales


def _quant(module, fmt, sizes, act):
    w2d = module.weight.detach().reshape(module.weight.shape[0], -1)
    scale = weight_scales(w2d, get_format(fmt), sizes)
    codes = quantize_weight(w2d, scale, get_format(fmt), sizes)
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    return cls(module, codes, scale, sizes, fmt, act)


def _split_act(x, split, fmt, channel_dim=1):
    pairs = [activation_qparams(float(p.min()), float(p.max()), get_format(fmt), False)
             for p in (x[:, :split], x[:, split:])]
    scale = torch.tensor([[p[0] for p in pairs]])
    zero = torch.tensor([[p[1] for p in pairs]])
    return ActQuantizer(scale, zero, fmt, False, (split, x.shape[1] - split), channel_dim)


def _skip_input():
    torch.manual_seed(0)
    return torch.cat([torch.randn(2, 8, 4, 4) * 0.05, torch.randn(2, 24, 4, 4) * 20], dim=1)


@pytest.fixture(params=[True, False], ids=["grad", "no_grad"])
def grad_enabled(request):
    """Both forward paths of lowered layers: gradients on (constants rebuilt per call) and eager inference
    (static-scale constants folded once, ``quant.constants``)."""
    with torch.set_grad_enabled(request.param):
        yield request.param


def test_split_shortcut_layer_equals_float_layer_at_16_bits():
    conv = nn.Conv2d(32, 16, 1)
    x = _skip_input()
    layer = _quant(conv, "int16", (8, 24), _split_act(x, 8, "int16"))
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-3, atol=1e-3)
    assert layer.weight_scale.shape == (16, 2) and layer.act.scale.shape == (1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_shortcut_beats_one_scale_on_mismatched_halves(seed):
    """One scale over both halves rounds the small half (|x| ~ 0.05 beside ~ 20) to the zero point: the
    split keeps its contribution. Scored on that half's contribution, where the whole-input error was
    dominated by the large half's rounding, so the conv's random init decided (33 of 200 inits failed;
    it was built from whatever RNG state earlier tests left)."""
    x = _skip_input()
    torch.manual_seed(seed)
    conv = nn.Conv2d(32, 16, 1)
    split = _quant(conv, "int8", (8, 24), _split_act(x, 8, "int8"))
    s, z = activation_qparams(float(x.min()), float(x.max()), get_format("int8"), False)
    whole = _quant(conv, "int8", (32,), ActQuantizer(torch.tensor([[s]]), torch.tensor([[z]]), "int8", False, (), 1))
    skip_half = torch.cat([x[:, :8], torch.zeros_like(x[:, 8:])], dim=1)  # the ranges stay those of x
    with torch.no_grad():
        ref = conv(skip_half)
        assert (split(skip_half) - ref).pow(2).mean() < 0.01 * (whole(skip_half) - ref).pow(2).mean()


def test_split_segments_from_config_follow_the_adapter_split():
    conv = nn.Conv2d(48, 16, 1)
    _, scale, sizes = weight_codes(conv, PTQConfig(), split=16)
    assert sizes == (16, 32) and scale.shape == (16, 2)


def test_timestep_group_scale_selected_by_step_index():
    denoiser = nn.Linear(4, 4)
    tracker = attach_tracker(denoiser)
    selector = StepGroups(denoiser, groups=2, default_steps=10)
    act = ActQuantizer(torch.tensor([[0.5], [0.01]]), torch.tensor([[0], [0]]), "int8", True, (), -1, selector)
    x = torch.tensor([0.26, 0.74])
    tracker.step_index = 2            # steps 0..4 -> group 0 (scale 0.5)
    assert torch.equal(act(x), torch.tensor([0.5, 0.5]))
    tracker.step_index = 7            # steps 5..9 -> group 1 (scale 0.01)
    torch.testing.assert_close(act(x), torch.tensor([0.26, 0.74]))
    assert selector.group_of(0, 50) == 0 and selector.group_of(49, 50) == 1 and selector.group_of(24, 50) == 0


def _static(scale, zero, symmetric=False):
    return ActQuantizer(torch.tensor([[scale]]), torch.tensor([[zero]]), "int8", symmetric, (), -1)


@pytest.mark.parametrize("act", [lambda: _static(0.03, 120), lambda: _static(0.03, 0, True),
                                 lambda: DynamicActQuantizer("int8", False, -1),
                                 lambda: DynamicActQuantizer("int8", True, -1),
                                 lambda: DynamicActQuantizer("int8", False, -1, per_tensor=True),
                                 lambda: DynamicActQuantizer("int8", True, -1, per_tensor=True)])
def test_int8_linear_matches_simulation(act, int8_kernels, grad_enabled):
    torch.manual_seed(0)
    layer = _quant(nn.Linear(64, 48), "int8", (64,), act())
    lowered = lower_layer(layer)
    assert isinstance(lowered, Int8Linear)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module, channel_dim, shape", [(nn.Linear(1, 5), -1, (2, 3, 1)),
                                                        (nn.Conv2d(1, 4, 1), 1, (2, 1, 3, 3))], ids=["linear", "conv1x1"])
def test_an_int8_gemm_with_one_input_column_matches_simulation(monkeypatch, int8_kernels, module, channel_dim, shape):
    """The (1, N) transposed weight of a one-input layer has strides (1, 1), which torch counts as contiguous and
    CPU _int_mm misread: huge values changing from run to run (until session 49)."""
    monkeypatch.setattr(onednn, "supports", lambda layer: False)  # the GEMM path for the conv too
    monkeypatch.setattr(onednn, "cpu_has_vnni", lambda: True)  # _int_mm itself, on any CPU
    torch.manual_seed(0)
    layer = _quant(module, "int8", (1,), DynamicActQuantizer("int8", False, channel_dim))
    lowered = lower_layer(layer)
    assert lowered.kind == "int8-gemm"
    x = torch.randn(*shape)
    for _ in range(3):
        torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-4)
    column = torch.full((5, 1), 3, dtype=torch.int8).t()
    assert int8_matmul(torch.ones(2, 1, dtype=torch.int8), column).eq(3).all()


@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_conv1x1_split_matches_simulation(monkeypatch, int8_kernels, dynamic, grad_enabled):
    monkeypatch.setattr(onednn, "supports", lambda layer: False)  # the portable GEMM path
    conv = nn.Conv2d(32, 16, 1)
    x = _skip_input()
    act = DynamicActQuantizer("int8", False, 1, per_tensor=True, segment_sizes=(8, 24)) if dynamic \
        else _split_act(x, 8, "int8")
    layer = _quant(conv, "int8", (8, 24), act)
    lowered = lower_layer(layer)
    assert isinstance(lowered, Int8Conv1x1)
    torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-4)


def test_dynamic_per_tensor_quantizer_takes_each_halfs_range_from_the_call():
    x = _skip_input()  # halves with ranges ~0.15 and ~60
    act = DynamicActQuantizer("int8", False, 1, per_tensor=True, segment_sizes=(8, 24))
    (small, small_zero), (large, _) = act.segment_qparams(x)
    expected = activation_qparams(float(x[:, :8].min()), float(x[:, :8].max()), get_format("int8"), False)
    assert small.shape == () and float(small) == pytest.approx(expected[0]) and int(small_zero) == expected[1]
    assert float(large) > 100 * float(small)
    out = act(x)
    assert (out[:, :8] - x[:, :8]).abs().max() <= float(small) / 2 + 1e-6  # the small half keeps its resolution
    assert (act(x * 2) - 2 * out).abs().max() < 1e-4  # scales follow the input: no calibrated range
    whole = DynamicActQuantizer("int8", False, 1, per_tensor=True)
    assert (whole(x)[:, :8] - x[:, :8]).abs().max() > 10 * float(small)


needs_onednn = pytest.mark.skipif(not onednn.onednn_available(),
                                  reason="torch build without oneDNN int8 ops, or a CPU without VNNI")


def _conv_act(x, split=None, symmetric=False, dynamic=False):
    if dynamic:
        return DynamicActQuantizer("int8", symmetric, 1, per_tensor=True,
                                   segment_sizes=() if split is None else (split, x.shape[1] - split))
    if split is not None:
        return _split_act(x, split, "int8")
    s, z = activation_qparams(float(x.min()), float(x.max()), get_format("int8"), symmetric)
    return ActQuantizer(torch.tensor([[s]]), torch.tensor([[z]]), "int8", symmetric, (), 1)


@needs_onednn
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kernel,stride,split,symmetric", [(3, 1, None, False), (3, 2, None, True), (1, 1, None, False),
                                                         (3, 1, 8, False), (1, 1, 8, False)])
def test_onednn_int8_conv_matches_simulation(kernel, stride, split, symmetric, dynamic, grad_enabled):
    torch.manual_seed(0)
    x = _skip_input()
    conv = nn.Conv2d(32, 16, kernel, stride=stride, padding=kernel // 2)
    sizes = (32 * kernel ** 2,) if split is None else (split * kernel ** 2, (32 - split) * kernel ** 2)
    layer = _quant(conv, "int8", sizes, _conv_act(x, split, symmetric, dynamic))
    lowered = lower_layer(layer)
    assert isinstance(lowered, onednn.OneDNNInt8Conv2d) and lowered.kind == "int8-conv"
    torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("padding,kernel,dilation,kind", [("same", 3, 1, "int8-conv"), ("same", 3, 2, "int8-conv"),
                                                          ("valid", 3, 1, "int8-conv"), ("valid", 1, 1, "int8-conv"),
                                                          ("same", 4, 1, "dequant-int8")])
def test_string_padding_lowers_and_matches_simulation(padding, kernel, dilation, kind):
    """Conv2d(padding="same" / "valid") reached oneDNN's prepack as ["s", "a", "m", "e"] (RuntimeError in
    quantize_ until session 41); an even kernel's "same" pads unevenly, which only the float form can."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 7)
    conv = nn.Conv2d(8, 6, kernel, padding=padding, dilation=dilation)
    layer = _quant(conv, "int8", (8 * kernel ** 2,), _conv_act(x))
    lowered = lower_layer(layer)
    if kind == "int8-conv" and not onednn.onednn_available():  # a 1x1 "valid" conv is a GEMM over pixels
        kind = "int8-gemm" if kernel == 1 and int8_kernels_on(torch.device("cpu")) else "dequant-int8"
    assert lowered.kind == kind
    torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weight_only", [False, True])
def test_load_state_dict_into_lowered_layers_computes_with_the_loaded_weights(weight_only):
    """oneDNN packs and cached dequantized weights were made once, so a lowered UNet that loaded another's state
    dict went on computing with its own weights (1.7 apart on tiny SD, session 41)."""
    x = torch.randn(2, 8, 6, 6)
    layers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        layers.append(lower_layer(_quant(nn.Conv2d(8, 6, 3, padding=1), "int8", (72,),
                                         None if weight_only else _conv_act(x))))
    source, target = layers
    with torch.no_grad():
        target(x)
        target.load_state_dict(source.state_dict())
        assert torch.equal(target(x), source(x))


@needs_onednn
def test_onednn_int8_conv_follows_timestep_groups_and_survives_copies():
    import copy

    denoiser = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1))
    tracker = attach_tracker(denoiser)
    selector = StepGroups(denoiser, groups=2, default_steps=10)
    act = ActQuantizer(torch.tensor([[0.05], [0.002]]), torch.tensor([[128], [128]]), "int8", False, (), 1, selector)
    layer = _quant(denoiser[0], "int8", (72,), act)
    denoiser[0] = lower_layer(layer)
    x = torch.randn(1, 8, 5, 5) * 0.2
    for step in (1, 8):
        tracker.step_index = step
        torch.testing.assert_close(denoiser(x), layer(x), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(denoiser)  # oneDNN's packed weights are not copyable: repacked on use
    torch.testing.assert_close(twin[0](x), denoiser[0](x))
    assert torch.equal(denoiser.double().float()[0](x), twin[0](x))


@needs_onednn
def test_a_deep_copy_of_a_compiled_onednn_conv_runs_its_own_weights():
    """OneDNNInt8Conv2d's __getstate__ copied __dict__ whole, with module.compile()'s binding to the original
    (a regional compile_denoiser compiles lowered convs in place): the copy ran the original's weights and hooks."""
    import copy

    x = torch.randn(1, 8, 5, 5)
    layer = lower_layer(_quant(nn.Conv2d(8, 4, 3, padding=1), "int8", (72,), _conv_act(x)))
    layer.compile(backend="eager")
    reference = layer(x)
    twin = copy.deepcopy(layer)
    assert "_compiled_call_impl" not in vars(twin)
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        twin.weight_codes.zero_()
        twin._repack()
    assert not torch.equal(twin(x), reference) and not calls


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "onednn-conv"])
def test_folded_constants_follow_timestep_groups_edits_and_copies(monkeypatch, int8_kernels, kind):
    """In eager inference lowered layers fold their static scales once per timestep group; the folded
    values must follow the step, in-place edits and replaced buffers, bias edits (even via ``.data``) and copies."""
    import copy

    if kind == "onednn-conv" and not onednn.onednn_available():
        pytest.skip("torch build without oneDNN int8 ops, or a CPU without VNNI")
    if kind == "conv1x1":
        monkeypatch.setattr(onednn, "supports", lambda layer: False)
    module, x, dim = {"linear": (nn.Linear(16, 8), torch.randn(3, 16) * 0.2, -1),
                      "conv1x1": (nn.Conv2d(8, 4, 1), torch.randn(2, 8, 5, 5) * 0.2, 1),
                      "onednn-conv": (nn.Conv2d(8, 4, 3, padding=1), torch.randn(2, 8, 5, 5) * 0.2, 1)}[kind]
    denoiser = nn.Sequential(module)
    tracker = attach_tracker(denoiser)
    act = ActQuantizer(torch.tensor([[0.05], [0.002]]), torch.tensor([[128], [120]]), "int8", False, (), dim,
                       StepGroups(denoiser, groups=2, default_steps=10))
    layer = _quant(module, "int8", (module.weight[0].numel(),), act)
    denoiser[0] = lower_layer(layer)
    assert denoiser[0].kind == ("int8-conv" if kind == "onednn-conv" else "int8-gemm")

    def check():  # the layer itself: a call of the denoiser would move the tracker's step
        out = denoiser[0](x)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
        return out

    with torch.no_grad():
        outputs = {}
        for step in (1, 8, 1, 8):
            tracker.step_index = step
            outputs.setdefault(step, check())
        assert not torch.allclose(outputs[1], outputs[8])
        act.scale.mul_(1.5)                              # in place: the version counter moves
        assert not torch.allclose(check(), outputs[8])
        act.zero_point = torch.tensor([[100], [90]])     # a replaced buffer
        check()
        layer.bias.data.add_(1.0)                        # invisible to version counters: never folded
        check()
        twin = copy.deepcopy(denoiser)
        torch.testing.assert_close(twin[0](x), denoiser[0](x))


def test_int8_layers_without_vnni_run_the_exact_float_form(monkeypatch):
    """AVX2-only CPUs saturate oneDNN's u8 x s8 pair sums and have only a scalar ``_int_mm``: there lowered
    int8 layers run the float op on their int8 weights."""
    for capabilities, expected in (({"avx2": True}, False), ({"avx_vnni": True}, True), ({"amx_int8": True}, True),
                                   ({"avx512_vnni": True}, True)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=capabilities: caps)
        onednn.cpu_has_vnni.cache_clear()
        assert onednn.cpu_has_vnni() is expected and int8_kernels_on(torch.device("cpu")) is expected
        assert int8_kernels_on(torch.device("cuda"))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    onednn.cpu_has_vnni.cache_clear()
    try:
        _check_float_form_without_vnni()
    finally:
        onednn.cpu_has_vnni.cache_clear()  # the real CPU's answer for the tests after this one


def _check_float_form_without_vnni():
    """Without int8 units every int8 layer (k x k conv, 1x1 conv, linear) runs dequant-int8: same numbers."""
    assert not onednn.onednn_available() and not int8_kernels_on(torch.device("cpu"))
    torch.manual_seed(0)
    x = _skip_input()
    for conv in (nn.Conv2d(32, 16, 3, padding=1), nn.Conv2d(32, 16, 1)):
        layer = _quant(conv, "int8", (32 * conv.kernel_size[0] ** 2,), _conv_act(x))
        lowered = lower_layer(layer)
        assert isinstance(lowered, StoredWeightLayer) and lowered.kind == "dequant-int8"
        torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-5)
    linear = _quant(nn.Linear(64, 48), "int8", (64,), _static(0.03, 120))
    assert lower_layer(linear).kind == "dequant-int8"


def test_int8_matmul_is_exact_with_and_without_vnni(monkeypatch):
    """Without VNNI the int8 GEMM runs as fp32 blocks (``_int_mm`` is a scalar loop there): still exact,
    even at the extremes (-128 x -128 products over K = 2,500, past fp32's 2**24 in one sum)."""
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (37, 2500), dtype=torch.int8)
    b = torch.randint(-128, 128, (2500, 24), dtype=torch.int8)
    a[0], b[:, 0] = -128, -128
    expected = (a.double() @ b.double()).to(torch.int32)
    assert expected[0, 0] == 2500 * 128 * 128
    for capabilities in ({"avx2": True}, {"avx512_vnni": True}):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=capabilities: caps)
        onednn.cpu_has_vnni.cache_clear()
        try:
            assert torch.equal(int8_matmul(a, b), expected)
        finally:
            onednn.cpu_has_vnni.cache_clear()


def test_kxk_conv_and_int4_lowering_are_storage_forms_that_match_exactly():
    torch.manual_seed(0)
    conv = _quant(nn.Conv2d(8, 16, 3, padding=1), "int8", (72,), None)  # weight-only: no int8 kernel
    lowered = lower_layer(conv)
    assert isinstance(lowered, StoredWeightLayer) and lowered.kind == "dequant-int8"
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(lowered(x), conv(x))
    linear = _quant(nn.Linear(64, 8), "int4", (64,), None)
    packed = lower_layer(linear)
    assert packed.kind == "int4-packed" and packed.weight_codes.dtype == torch.uint8
    assert packed.weight_codes.numel() == 64 * 8 // 2
    x = torch.randn(3, 64)
    assert torch.equal(packed(x), linear(x))


@pytest.mark.slow  # ~30 s of compile on 2 shared cores
@pytest.mark.parametrize("dynamic", [False, True])
def test_lowered_linear_under_torch_compile_matches_eager(dynamic):
    torch.manual_seed(0)
    act = DynamicActQuantizer("int8", False, -1, per_tensor=True) if dynamic else _static(0.03, 120)
    lowered = lower_layer(_quant(nn.Linear(64, 32), "int8", (64,), act))
    x = torch.randn(8, 64)
    start = time.perf_counter()
    compiled = torch.compile(lowered, fullgraph=True)
    with torch.no_grad():  # inference: the int8 kernel itself is compiled (with grads: the simulated path)
        out = compiled(x)
        elapsed = time.perf_counter() - start
        torch.testing.assert_close(out, lowered(x), rtol=1e-5, atol=1e-5)
    assert elapsed < 120, f"compiling one lowered Linear took {elapsed:.0f} s"


@needs_onednn
@pytest.mark.slow  # compile on 2 shared cores
@pytest.mark.parametrize("dynamic", [False, True])
def test_onednn_int8_conv_under_torch_compile_matches_eager(dynamic):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    lowered = lower_layer(_quant(nn.Conv2d(8, 16, 3, padding=1), "int8", (72,), _conv_act(x, dynamic=dynamic)))
    compiled = torch.compile(lowered, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lowered(x), rtol=1e-5, atol=1e-5)



def _input_and_bias_grads(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return x.grad, layer.bias.grad


@needs_onednn
@pytest.mark.parametrize("kind", ["linear", "linear_dynamic", "conv1x1", "conv3x3"])
def test_lowered_layers_give_the_simulated_layers_gradients(monkeypatch, int8_kernels, kind):
    # the int8 kernels have no autograd formula: backward used to stop at them (no input gradient)
    torch.manual_seed(0)
    if kind.startswith("linear"):
        x = torch.randn(3, 5, 64)
        act = DynamicActQuantizer("int8", False, -1) if kind == "linear_dynamic" else _static(0.03, 120)
        make = lambda: _quant(nn.Linear(64, 32), "int8", (64,), act)  # noqa: E731
    else:
        if kind == "conv1x1":
            monkeypatch.setattr(onednn, "supports", lambda layer: False)  # the portable GEMM path
        size = 1 if kind == "conv1x1" else 3
        x = torch.randn(2, 8, 6, 6)
        make = lambda: _quant(nn.Conv2d(8, 16, size, padding=size // 2), "int8", (8 * size * size,),  # noqa: E731
                              _conv_act(x))
    torch.manual_seed(1)
    simulated = make()
    torch.manual_seed(1)
    lowered = lower_layer(make())
    assert lowered.kind in ("int8-gemm", "int8-conv")
    for got, want in zip(_input_and_bias_grads(lowered, x), _input_and_bias_grads(simulated, x)):
        assert got is not None and float(got.abs().sum()) > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), simulated(x), rtol=1e-5, atol=1e-4)

def test_a_lowered_layers_gradient_keeps_the_timestep_group_of_its_forward(int8_kernels):
    """Backward recomputed the simulated path with the group current at backward time: after another denoiser
    call moved the tracker (a loss over several sampling steps) it took the other group's scales."""
    denoiser = nn.Sequential(nn.Identity())
    tracker = attach_tracker(denoiser)
    selector = StepGroups(denoiser, groups=2, default_steps=10)
    act = ActQuantizer(torch.tensor([[0.05], [0.5]]), torch.tensor([[128], [128]]), "int8", False, (), -1, selector)
    torch.manual_seed(0)
    simulated = _quant(nn.Linear(16, 8), "int8", (16,), act)
    lowered = lower_layer(simulated)
    assert isinstance(lowered, Int8Linear)
    x = torch.randn(4, 16) * 8  # beyond group 0's clip range (0.05 * 128 = 6.4): no straight-through gradient
    grads = {}
    for name, layer in (("simulated", simulated), ("lowered", lowered)):
        x_in = x.clone().requires_grad_(True)
        tracker.step_index = 1  # group 0
        out = layer(x_in)
        tracker.step_index = 8  # the next denoiser call is in group 1 before backward
        out.pow(2).sum().backward()
        grads[name] = x_in.grad
    assert selector.forced is None
    torch.testing.assert_close(grads["lowered"], grads["simulated"], rtol=1e-4, atol=1e-5)


def test_deepcopy_of_a_quantized_denoiser_reads_its_own_tracker():
    import copy

    denoiser = nn.Sequential(nn.Linear(4, 4))
    selector = StepGroups(denoiser, groups=2, default_steps=10)
    denoiser[0] = QuantLinear(denoiser[0], None, None, (4,), None,
                              ActQuantizer(torch.ones(2, 1), torch.zeros(2, 1), "int8", True, (), -1, selector))
    twin = copy.deepcopy(denoiser)
    assert twin[0].act.selector.denoiser is twin and selector.denoiser is denoiser


@needs_onednn
def test_flop_counter_counts_the_int8_kernels_like_the_float_ops(int8_kernels):
    from diffusion_accel.eval.cost import count_flops

    torch.manual_seed(0)
    x, xl = torch.randn(2, 8, 6, 6), torch.randn(8, 64)
    conv, linear = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(64, 32)
    lowered_conv = lower_layer(_quant(conv, "int8", (72,), _conv_act(x)))
    lowered_linear = lower_layer(_quant(linear, "int8", (64,), _static(0.03, 120)))
    assert isinstance(lowered_linear, Int8Linear)
    assert count_flops(lowered_conv, x) == count_flops(conv, x) > 0
    assert count_flops(lowered_linear, xl) == count_flops(linear, xl) > 0


def _fp8_static(x, channel_dim=-1):
    return ActQuantizer(torch.tensor([[float(x.abs().max()) / 448]]), torch.tensor([[0]]), "fp8", True, (),
                        channel_dim)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("dynamic", [False, True, "per_tensor"])
def test_fp8_linear_matches_simulation_with_and_without_the_fp8_kernel(monkeypatch, kernel, dynamic):
    # torch's CPU _scaled_mm computes the kernel path exactly, so the GPU path is checked here too
    monkeypatch.setattr(fp8, "fp8_kernel_available", lambda device: kernel)
    torch.manual_seed(0)
    x = torch.randn(2, 10, 64) * 3
    act = DynamicActQuantizer("fp8", True, -1, per_tensor=dynamic == "per_tensor") if dynamic else _fp8_static(x)
    layer = _quant(nn.Linear(64, 48), "fp8", (64,), act)
    lowered = lower_layer(layer)
    assert isinstance(lowered, Fp8Linear) and lowered.kind == "fp8-gemm"
    assert lowered.core.weight_codes.dtype == torch.float8_e4m3fn
    calls = []
    real_scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real_scaled_mm(*a, **k))
    torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-4)
    assert bool(calls) == kernel


def test_fp8_conv1x1_split_matches_simulation_and_kxk_stays_simulated(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_kernel_available", lambda device: True)
    x = _skip_input()
    scales = torch.tensor([[float(x[:, :8].abs().max()) / 448, float(x[:, 8:].abs().max()) / 448]])
    act = ActQuantizer(scales, torch.zeros(1, 2), "fp8", True, (8, 24), 1)
    layer = _quant(nn.Conv2d(32, 16, 1), "fp8", (8, 24), act)
    lowered = lower_layer(layer)
    assert isinstance(lowered, Fp8Conv1x1)
    torch.testing.assert_close(lowered(x), layer(x), rtol=1e-5, atol=1e-4)
    assert lower_layer(_quant(nn.Conv2d(32, 16, 3, padding=1), "fp8", (288,), _fp8_static(x, 1))) is None
    assert lower_layer(_quant(nn.Linear(32, 16), "fp8", (32,), None)) is None  # fp8 weight-only


def test_fp8_kernel_needs_cuda_capability_8_9_and_shapes_of_16():
    assert not fp8.fp8_kernel_available(torch.device("cpu"))
    assert fp8.kernel_shapes_ok(torch.device("cpu"), 10, 3)
    assert not fp8.kernel_shapes_ok(torch.device("cuda"), 24, 32)
    assert fp8.kernel_shapes_ok(torch.device("cuda"), 32, 48)


def test_fp8_codes_stay_fp8_through_a_dtype_cast(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_kernel_available", lambda device: True)
    x = torch.randn(4, 64)
    layer = _quant(nn.Linear(64, 32), "fp8", (64,), _fp8_static(x))
    lowered = lower_layer(layer)
    expected = lowered(x)
    layer.to(torch.bfloat16), lowered.to(torch.bfloat16)
    assert layer.weight_codes.dtype == lowered.core.weight_codes.dtype == torch.float8_e4m3fn
    assert lowered.core.weight_scale.dtype == layer.weight_scale.dtype == torch.float32  # kept as calibrated
    torch.testing.assert_close(lowered(x.bfloat16()).float(), expected, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make_act", [lambda: _static(0.03, 120), lambda: _static(0.03, 0, True),
                                      lambda: DynamicActQuantizer("int8", False, -1),
                                      lambda: DynamicActQuantizer("int8", False, -1, per_tensor=True)],
                         ids=["static", "static-sym", "dynamic", "dynamic-tensor"])
def test_int8_codes_of_half_precision_inputs_are_those_of_float32(dtype, make_act):
    """In bf16 ``x / scale`` moves in steps of 0.5 near the grid's ends, so ``round`` picked other codes: the
    quantizers (simulated) and the int8 GEMM (lowered) compute scales and codes in float32."""
    torch.manual_seed(0)
    x = (torch.randn(16, 64) * 1.5).to(dtype)  # reaches the clip range 0.03 * 127 ≈ 3.8
    act = make_act()
    assert torch.equal(act(x), act(x.float()).to(dtype))
    lowered = lower_layer(_quant(nn.Linear(64, 32), "int8", (64,), make_act()))
    core = lowered.core.to(dtype)
    assert torch.equal(core(x, None), core(x.float(), None).to(dtype))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dynamic", [False, True])
def test_onednn_conv_codes_of_half_precision_inputs_are_those_of_float32(dtype, dynamic, int8_kernels):
    """The oneDNN conv took a dynamic per-tensor scale from the half-precision input (2-3x further from the
    simulated layer than static scales), unlike the quantizers and the int8 GEMM."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6) * 3 + 1
    lowered = lower_layer(_quant(nn.Conv2d(8, 16, 3, padding=1), "int8", (72,), _conv_act(x, dynamic=dynamic)))
    assert isinstance(lowered, onednn.OneDNNInt8Conv2d)
    lowered.to(dtype)
    with torch.no_grad():
        assert torch.equal(lowered(x.to(dtype)), lowered(x.to(dtype).float()).to(dtype))


@pytest.mark.parametrize("segments", [(256,), (64, 64, 64, 64), (128, 192), (96, 32)])
def test_tinygemm_operands_compute_our_int4_codes_with_bf16_scales(segments):
    """The CUDA int4 path hands tinygemm q = code + 8 with zero 0 and one scale per group of the largest
    group size dividing every segment; checked here with tinygemm's CPU twin (same scales-and-zeros
    semantics; the CUDA op differs only in how it packs, checked on the GPU in tests/test_cuda.py)."""
    from diffusion_accel.quant.quantizers import expand_segments
    from diffusion_accel.quant.tinygemm import group_size_for, tinygemm_operands

    generator = torch.Generator().manual_seed(0)
    n, k = 16, sum(segments)
    codes = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8)
    scale = torch.rand(n, len(segments), generator=generator) * 0.1 + 0.01
    q, scales_and_zeros, group = tinygemm_operands(codes, scale, segments)
    assert group == group_size_for(segments) and all(size % group == 0 for size in segments)
    x = torch.randn(5, k, generator=generator).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros).float()
    dense = codes.float() * expand_segments(scale, segments)
    expected = x.float() @ dense.t()
    assert (out - expected).abs().max() / expected.abs().max() < 1e-2  # bf16 scales and output


def test_tinygemm_needs_a_group_size_dividing_every_segment_and_cuda():
    from diffusion_accel.quant.tinygemm import group_size_for, pack_for_cuda

    assert group_size_for((320,)) == 64 and group_size_for((256, 512)) == 256 and group_size_for((100,)) is None
    codes = torch.zeros(16, 256, dtype=torch.int8)
    assert pack_for_cuda(codes, torch.ones(16, 1), (256,)) is None  # CPU tensors: the dequantize path


@pytest.mark.parametrize("kernel, dynamic", [(1, False), (3, False), (1, True)])
def test_lowered_convs_take_an_unbatched_input_as_conv2d_does(kernel, dynamic):
    """nn.Conv2d and the simulated layer take (C, H, W); the lowered kernels unpacked four dims or failed in
    oneDNN's descriptor."""
    from diffusion_accel.quant.lower import lower_layer

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, kernel, padding=kernel // 2)
    weight = conv.weight.detach().reshape(8, -1)
    scale = weight_scales(weight, get_format("int8"), (weight.shape[1],))
    act = DynamicActQuantizer("int8", False, 1) if dynamic else \
        ActQuantizer(torch.tensor([[0.05]]), torch.tensor([[128]]), "int8", False, (), 1)
    simulated = QuantConv2d(conv, quantize_weight(weight, scale, get_format("int8"), (weight.shape[1],)), scale,
                            (weight.shape[1],), "int8", act)
    lowered, x = lower_layer(simulated), torch.randn(16, 4, 4)
    with torch.no_grad():  # and as the batch of one it is (the simulated per-token scales read H as channels)
        assert torch.allclose(simulated(x), simulated(x[None])[0], atol=1e-6)
        assert torch.allclose(lowered(x), simulated(x), atol=1e-4, rtol=1e-5)


def test_a_dequantized_conv_takes_an_unbatched_input_as_conv2d_does():
    """The dequant path (group-wise int8 with three scale segments, CPUs without int8 kernels) passed (C, H, W) to
    per-token activation scales that read H as the channels (0.058 off the simulated layer)."""
    from diffusion_accel.quant.lower import StoredWeightLayer, lower_layer

    torch.manual_seed(0)
    conv = nn.Conv2d(48, 8, 3, padding=1)
    weight = conv.weight.detach().reshape(8, -1)
    segments = (144, 144, 144)
    scale = weight_scales(weight, get_format("int8"), segments)
    simulated = QuantConv2d(conv, quantize_weight(weight, scale, get_format("int8"), segments), scale, segments,
                            "int8", DynamicActQuantizer("int8", False, 1))
    lowered, x = lower_layer(simulated), torch.randn(48, 5, 6) * torch.linspace(0.1, 10, 48)[:, None, None]
    assert isinstance(lowered, StoredWeightLayer)
    with torch.no_grad():
        assert torch.allclose(lowered(x), simulated(x), atol=1e-5) and torch.allclose(lowered(x), lowered(x[None])[0])
