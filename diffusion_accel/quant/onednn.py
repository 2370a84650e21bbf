"""oneDNN int8 convolution for lowered Conv2d layers on CPU (VNNI / AMX int8 units).

``torch.ops.onednn.qconv_pointwise`` (the kernel torch.compile's x86 int8 path uses) convolves
uint8 activation codes with prepacked int8 per-output-channel weights and writes fp32 directly, so
the result equals the simulated ``QuantConv2d`` up to summation order: no requantized output.
Static activation scales are passed as tensors at call time, so per-timestep-group scales share one
prepacked weight. A split-shortcut conv (two input-channel segments with their own activation and
weight scales) runs one int8 conv per segment and adds them: conv(cat(a, b), W) = conv(a, Wa) + conv(b, Wb).

On other devices (or when this torch build lacks oneDNN, or the CPU lacks VNNI: see ``cpu_has_vnni``)
the layer runs the float conv on the dequantized weight: the same numbers, no speed-up.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .constants import DerivedConstants, fast_path_on
from .kernel_grad import run_kernel
from .layers import ActQuantizer, DynamicActQuantizer, KeepsQuantDtypes, QuantConv2d, takes_unbatched_images
from .quantizers import act_grid, as_float32, dequantize_weight, quantize_codes

CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode")


VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=None)
def cpu_capabilities() -> dict[str, Any]:
    """torch's report of this CPU's instruction sets (``torch.cpu.get_capabilities``; {} where this torch
    cannot tell). Cached: a fixed fact of the machine, asked per layer."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    return dict(get_capabilities()) if get_capabilities is not None else {}


@torch.compiler.assume_constant_result  # a fixed fact of the machine: torch.compile takes it as a constant
def cpu_has_vnni() -> bool:
    """True when this CPU has VNNI-class int8 dot products (AVX512-VNNI, AVX-VNNI or AMX-INT8).

    Without them oneDNN's uint8 x int8 convolution adds pairs of products in saturating int16
    (``vpmaddubsw``), so full-range int8 weights give wrong sums (seen on an AVX2-only AMD EPYC: errors
    of 3.3 on outputs of ~1); PyTorch's own x86 quantization avoids it with 7-bit ``reduce_range``.
    Unknown capabilities count as absent; ``cpu_has_vnni.cache_clear()`` forgets the cached answer.
    """
    return any(bool(cpu_capabilities().get(feature, False)) for feature in VNNI_FEATURES)


cpu_has_vnni.cache_clear = cpu_capabilities.cache_clear  # type: ignore[attr-defined]


def onednn_available() -> bool:
    """True when this torch build has oneDNN's int8 convolution ops (x86 CPU builds) and this CPU computes
    them exactly (``cpu_has_vnni``); otherwise lowered convs run the float conv on their int8 weights."""
    ops = getattr(torch.ops, "onednn", None)
    return (ops is not None and hasattr(ops, "qconv_prepack") and hasattr(ops, "qconv_pointwise")
            and torch.backends.mkldnn.is_available() and cpu_has_vnni())


def per_tensor_act(act: nn.Module | None) -> bool:
    """Static, or dynamic per-tensor, int8 activations: one scale and zero point per channel segment."""
    per_tensor = isinstance(act, ActQuantizer) or (isinstance(act, DynamicActQuantizer) and act.per_tensor)
    return per_tensor and act.fmt_name == "int8"


def explicit_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """``conv.padding`` as ints per spatial dimension: "valid" is 0, "same" half the dilated kernel (None where
    that is odd, which torch pads unevenly and the int8 kernels cannot)."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [dilation * (kernel - 1) for dilation, kernel in zip(conv.dilation, conv.kernel_size)]
        return None if any(total % 2 for total in totals) else tuple(total // 2 for total in totals)
    return tuple(conv.padding)


def supports(layer: QuantConv2d) -> bool:
    """Whether ``layer`` can run as a oneDNN int8 conv: int8 weights per output channel (one scale per
    activation segment), static or dynamic per-tensor int8 activations, ungrouped, even padding, on CPU."""
    act = layer.act
    if layer.weight_fmt != "int8" or not per_tensor_act(act) or explicit_padding(layer) is None:
        return False
    unit = layer.weight_codes.shape[1] // layer.in_channels
    act_segments = act.segment_sizes if len(act.segment_sizes) > 1 else (layer.in_channels,)
    return (layer.groups == 1 and layer.weight_codes.device.type == "cpu" and onednn_available()
            and tuple(s * unit for s in act_segments) == tuple(layer.segment_sizes))


class OneDNNInt8Conv2d(KeepsQuantDtypes):
    """Conv2d computed by oneDNN from uint8 activation codes and int8 weights, fp32 out (see module doc).

    ``weight_codes``: (out, in·kh·kw) int8; ``weight_scale``: (out, S) for S channel segments;
    ``act``: the calibrated ActQuantizer (scale / zero point per timestep group and segment) or a dynamic
    per-tensor DynamicActQuantizer (scales from each call).
    """

    kind = "int8-conv"

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__()
        for name in CONV_ATTRS:
            setattr(self, name, getattr(layer, name))
        self.segment_sizes, self.weight_fmt = layer.segment_sizes, layer.weight_fmt
        self.weight_shape = layer.weight_shape
        self.register_buffer("weight_codes", layer.weight_codes)
        self.register_buffer("weight_scale", layer.weight_scale.clone())
        self.bias, self.act = layer.bias, layer.act
        self.code_offset = int(-act_grid(layer.act.fmt, layer.act.symmetric)[0])  # codes -> [0, 255]
        unit = self.weight_codes.shape[1] // self.in_channels
        self.channel_segments = tuple(size // unit for size in self.segment_sizes)
        self.kernel_padding = list(explicit_padding(self))  # padding="same" / "valid" as ints (supports checked)
        self._packed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.constants = DerivedConstants()
        self._repack()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def export_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_codes, self.weight_scale

    def __getstate__(self) -> dict[str, Any]:
        # Module's state: without ``_compiled_call_impl`` (a regional compile's binding to this layer kept by a
        # plain ``dict(self.__dict__)`` until session 52, so a deep copy ran the original's weights and hooks)
        state = super().__getstate__()
        state["_packed"] = None  # oneDNN's opaque packed weights cannot be copied ...
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._repack()  # ... so a copy packs its own

    def _apply(self, fn: Any, recurse: bool = True) -> "OneDNNInt8Conv2d":
        super()._apply(fn, recurse)
        self._repack()  # .to(device), .float(), ...: pack for where the weights are now
        return self

    def _repack(self) -> None:
        """Pack (oneDNN weight, fp32 weight scale (out,), zero points) per channel segment when the weights are on
        CPU, else drop the packs (the layer then runs the float fallback). Packing happens here, never
        inside ``forward``, so torch.compile sees the packed weights as constants."""
        if self.weight_codes.device.type != "cpu" or not onednn_available():
            self._packed = None
            return
        codes = self.weight_codes.reshape(self.weight_shape)
        self._packed = []
        for s, part in enumerate(codes.split(list(self.channel_segments), dim=1)):
            scale = self.weight_scale[:, s].float().contiguous()
            self._packed.append((torch.ops.onednn.qconv_prepack(
                part.contiguous(), scale, 1.0, 0, list(self.stride), self.kernel_padding, list(self.dilation),
                1, None), scale, torch.zeros_like(scale, dtype=torch.int64)))

    def _qparams(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per channel segment: 0-d fp32 scale and int64 uint8-grid zero point, static (current timestep
        group) or computed from ``x`` (dynamic per tensor)."""
        return self._grid_qparams(self.act.segment_qparams(x))

    def _grid_qparams(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(pairs) == 1:
            pairs = pairs * len(self.channel_segments)
        return [(scale.float(), zero.to(torch.int64) + self.code_offset) for scale, zero in pairs]

    def _folded_qparams(self, act: ActQuantizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``_qparams`` for static scales (eager inference), folded once per timestep group instead of ~8
        small ops per call (buffers read from the module dict: ``__getattr__`` costs ~1 us a lookup)."""
        group = act.group_index()
        scale, zero_point = act._buffers["scale"], act._buffers["zero_point"]
        return self.constants.get(group, (scale, zero_point),
                                  lambda: self._grid_qparams(list(zip(scale[group], zero_point[group]))))

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_weight(self.weight_codes, self.weight_scale, self.segment_sizes)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(self.act(x), weight.reshape(self.weight_shape).to(x.dtype), bias, self.stride,
                        self.padding, self.dilation, self.groups)

    @takes_unbatched_images
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or x.device.type != "cpu":
            return self._float_forward(x)
        return run_kernel(self, x, self._kernel, self._float_forward)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN's int8 convolution per channel segment, summed; fp32 out cast to ``x``'s dtype."""
        act, bias, x32 = self._modules["act"], self.bias, as_float32(x)  # dynamic scales and codes in float32
        qparams = self._folded_qparams(act) if isinstance(act, ActQuantizer) and fast_path_on() else self._qparams(x32)
        bias = bias if bias is None or bias.dtype == torch.float32 else bias.float()
        stride, padding, dilation = list(self.stride), self.kernel_padding, list(self.dilation)
        out, start, single = None, 0, len(self._packed) == 1
        for s, ((packed, w_scale, w_zero), (scale, zero)) in enumerate(zip(self._packed, qparams)):
            part = x32 if single else x32[:, start:start + self.channel_segments[s]]
            start += self.channel_segments[s]
            codes = quantize_codes(part, scale, zero, 0, 255, torch.uint8)
            y = torch.ops.onednn.qconv_pointwise.tensor(
                codes, scale, zero, packed, w_scale, w_zero, bias if s == 0 else None,
                stride, padding, dilation, 1, 1.0, 0, torch.float32, "none", [], "")
            out = y if out is None else out.add_(y)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def _repack_after_load(layer: OneDNNInt8Conv2d, incompatible_keys: Any) -> None:
    """``load_state_dict`` copies codes and scales in place: pack the loaded weights (the old packs ran on)."""
    layer._repack()
