"""Lowering: simulated quantized layers -> layers that run in low precision or store packed weights.

What each layer becomes (``summary`` lists the counts):

- ``int8-gemm``: int8 weights (per channel, or the two split-shortcut halves) with int8
  activations (static per-tensor / per timestep group, or dynamic per token / per tensor): activations are
  quantized once, multiplied by ``torch._int_mm`` (int8 x int8 -> int32) and rescaled in one fused
  expression; zero points are folded in via the weight column sums. Linear layers and 1x1
  stride-1 convs (as a GEMM over pixels), on CUDA and on CPUs with VNNI-class int8 units
  (``int8_kernels_on``). Without them ``_int_mm`` is a scalar loop: such CPUs lower these layers to
  ``dequant-int8``, and an int8-gemm layer that still lands there takes its product exactly in fp32
  blocks (``exact_float_matmul``).
- ``int8-conv`` (CPU with oneDNN): Conv2d layers of any kernel size with int8 per-channel weights
  and static or dynamic per-tensor int8 activations run oneDNN's int8 convolution (``onednn.OneDNNInt8Conv2d``), fp32 out.
  Measured on this CPU (SD 1.5 3x3 320-channel conv, 32x32 latents, 1 thread): ~3x faster than the
  fp32 conv. Elsewhere such convs fall back to the paths below.
- ``int4-packed``: int4 weights stored two per byte, dequantized on the fly; activations stay
  fake-quantized if configured. torchao's int4 weight-only needs mslk or CUDA here, and torch's
  ``_weight_int4pack_mm_for_cpu`` measured slower than a dense bf16 matmul: smaller, not faster.
  On CUDA, weight-only int4 Linear layers called in bf16 run tinygemm (``torch._weight_int4pack_mm``, the
  kernel torchao's int4 weight-only tensors use) on the same codes (``tinygemm``). An int4 layer with an odd
  number of input columns cannot pack two codes per byte: it is ``dequant-int4`` (int8-stored codes,
  dequantized once into a cached float weight, as ``dequant-int8``).
- ``dequant-int8``: int8 weights that cannot use an int8 kernel (group-wise with more than two groups (two are
  computed as the split-shortcut halves are, ``int8-gemm``), weight-only, k x k
  convs without oneDNN, every int8 layer on a CPU without VNNI), stored as int8 and dequantized once into a cached float weight: fp speed, int8 on disk.
  k x k convs are not lowered to unfold + int8 GEMM: on a 2-core AMD EPYC (SD 1.5 3x3 shapes, 256 px; session 47)
  it took 0.2-3.2x the fp32 conv's time eager and 0.35-1.2x compiled (mixed by shape), with a 9x larger unfolded
  input, while a bf16 conv took 0.3-0.5x (``benchmarks/ptq_conv_unfold.py``).
- ``fp8-gemm``: fp8 weights with fp8 activations (Linear and 1x1 convs) run ``torch._scaled_mm`` on
  GPUs with fp8 tensor cores and the simulated fp8 math elsewhere (``fp8.Fp8GemmCore``); fp8 k x k
  convs and fp8 weight-only layers stay simulated (``simulated`` in the summary).

Outputs equal the simulated layers up to float summation order (relative error ~1e-6). In eager
inference the static-scale constants of ``int8-gemm`` and ``int8-conv`` layers are folded once per
timestep group (``constants.DerivedConstants``) instead of being rebuilt on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.registry import find_denoiser
from ..artifact import applied_techniques, base_fingerprint, compute_dtype, mark_applied
from . import onednn
from .fp8 import Fp8GemmCore
from .formats import get_format
from .kernel_grad import run_kernel
from .constants import DerivedConstants, fast_path_on
from .layers import (ActQuantizer, DynamicActQuantizer, KeepsQuantDtypes, QuantConv2d, QuantLayer, QuantLinear,
                     takes_unbatched_images)
from .quantizers import (as_float32, dequantize_weight, dynamic_qparams, pack_int4, quantize_codes, segment_spans,
                         unpack_int4)
from .state import TECHNIQUE, get_state, swap_module
from .tinygemm import TinyGemmWeight, pack_for_cuda, tinygemm_linear

INT8_OFFSET = 128  # unsigned activation codes [0, 255] are shifted to int8 [-128, 127]


CUBLAS_REFUSED: set[tuple[int, int, int, int]] = set()  # (device, rows, K, N) cuBLASLt said NOT_SUPPORTED for


EXACT_FP32_BLOCK = 1024  # int8 products are <= 2**14 in size: 1024 of them sum to <= 2**24, exact in fp32


def exact_float_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32 through fp32 matmuls over K blocks of ``EXACT_FP32_BLOCK``.

    Every partial sum of a block is an integer of magnitude <= 2**24, which fp32 holds exactly in any
    summation order, so the result is exact at about the speed of an fp32 matmul (measured 1.0-1.1x).
    """
    out = None
    for start in range(0, a.shape[1], EXACT_FP32_BLOCK):
        block = slice(start, start + EXACT_FP32_BLOCK)
        part = (a[:, block].float() @ b[block].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def row_major(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (2-D) with row-major strides (rows apart by the row length, elements by 1). The transpose of an
    (N, 1) tensor has strides (1, 1), which torch counts as contiguous and CPU ``_int_mm`` misread: a
    ``Linear(1, N)`` lowered to int8 returned garbage that changed from run to run (session 49)."""
    return matrix if matrix.stride() == (matrix.shape[1], 1) else matrix.clone(memory_format=torch.contiguous_format)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exact.

    CPU takes any shape. CUDA's ``_int_mm`` (cuBLASLt) needs more than 16 rows, a row count that is a
    multiple of 8, and K, N multiples of 8: rows are zero-padded up to that (and cut off again). Other
    K, N, and shapes cuBLASLt refuses at run time (seen for K, N <= 64 on an H100), take an exact float64
    product; refused shapes are remembered so the refusal is paid once.
    On CPUs without VNNI-class int8 units (``onednn.cpu_has_vnni``) ``_int_mm`` is a scalar loop (25-35x
    slower than an fp32 matmul on an AVX2 EPYC), so there the product is taken in fp32 blocks that are exact.
    """
    m, k = a.shape
    if a.device.type == "cpu" and not onednn.cpu_has_vnni():
        return exact_float_matmul(a, b)
    if a.device.type != "cuda":
        return torch._int_mm(row_major(a), row_major(b))
    rows = max(24, -(-m // 8) * 8)
    key = (a.device.index or 0, rows, k, b.shape[1])
    if k % 8 or b.shape[1] % 8 or key in CUBLAS_REFUSED:
        return (a.double() @ b.double()).to(torch.int32)
    padded = torch.cat([a, a.new_zeros(rows - m, k)]) if rows != m else a.contiguous()
    if torch.compiler.is_compiling():
        return torch._int_mm(padded, b)[:m]
    try:
        return torch._int_mm(padded, b)[:m]
    except RuntimeError as error:
        if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(error):
            raise
        CUBLAS_REFUSED.add(key)
        return (a.double() @ b.double()).to(torch.int32)


class Int8GemmCore(KeepsQuantDtypes):
    """int8 GEMM of activations (M, K) with a weight split in column segments, rescaled to float.

    ``weight_t``: (K, N) int8 codes; ``weight_scale``: (N, S); ``col_sums``: (S, N) int32 per-segment
    weight column sums (for zero points); ``act``: the calibrated ActQuantizer or a DynamicActQuantizer
    (per token, or per tensor with the scales computed from each call's input).
    """

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, segment_sizes: Sequence[int],
                 act: nn.Module) -> None:
        super().__init__()
        self.segment_sizes = tuple(segment_sizes)
        self.register_buffer("weight_t", row_major(codes.t()))
        self.register_buffer("weight_scale", weight_scale.clone())
        sums = [part.to(torch.int32).sum(dim=1) for part in codes.split(list(segment_sizes), dim=1)]
        self.register_buffer("col_sums", torch.stack(sums))
        self.act = act
        self.symmetric = act.symmetric
        self.offset = 0 if act.symmetric else INT8_OFFSET
        self.spans = segment_spans(self.segment_sizes)
        self.constants = DerivedConstants()

    def codes(self) -> torch.Tensor:
        """(N, K) int8 weight codes."""
        return self.weight_t.t()

    def _apply(self, fn: Any, recurse: bool = True) -> "Int8GemmCore":
        """``.to()`` & co. also forget the folded constants: those keyed by the old device kept it alive
        (a lowered pipeline moved off the GPU held small CUDA tensors per layer)."""
        self.constants.clear()
        return super()._apply(fn, recurse)

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, shifted_zero: torch.Tensor) -> torch.Tensor:
        """int8 codes ``clamp(round(x / scale) + zero, grid) - offset`` of float32 ``x`` in four passes."""
        return quantize_codes(x, scale.float(), shifted_zero.float(), -128, 127, torch.int8)

    def _segments(self) -> list[tuple[int, int, int]]:
        return self.spans

    def _per_tensor(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Per-tensor scales (static, or dynamic from ``x2d``, whose channels are dim 1 as in the layer's
        own input): out = acc * (s_a * s_w) + (bias - (zero - offset) * colsum * s_a * s_w), in the order of
        the eager folded path, so compiled graphs give its exact values (one ulp apart, later layers rounded
        some activations to other codes: compiled images differed from eager by up to 1e-2)."""
        return self._rescaled_gemm(x2d, *self._fold(self.act.segment_qparams(x2d)), bias)

    def _fold(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, torch.Tensor]:
        """From the per-segment (activation scale, zero point) ``pairs`` (one pair: shared by the segments):
        per segment (activation scale, shifted zero point) and the (N,) rescale s_a * s_w; and the (N,)
        zero-point correction -sum over segments of (zero - offset) * colsum * s_a * s_w; all float32."""
        segments, base = [], None
        for s, _, _ in self._segments():
            scale, zero = pairs[s if len(pairs) > 1 else 0]
            shifted_zero = zero - self.offset
            combined = scale.float() * self.weight_scale[:, s].float()
            correction = shifted_zero * self.col_sums[s] * combined
            base = -correction if base is None else base - correction
            segments.append((scale.float(), shifted_zero.float(), combined))
        return segments, base

    def _fold_static(self, group: int) -> tuple[list, torch.Tensor]:
        """``_fold`` of the static scales of timestep group ``group``."""
        scales, zeros = self.act.scale[group], self.act.zero_point[group]
        return self._fold(list(zip(scales, zeros)))

    def _rescaled_gemm(self, x2d: torch.Tensor, segments: list, base: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """Per segment quantize, int8 GEMM and one fused multiply-add onto the zero-point correction ``base``
        (``_fold``); then the bias (not folded: a user may edit it through ``.data``, which no version counter
        sees)."""
        single, out = len(segments) == 1, base
        for (_, start, size), (scale, shifted_zero, combined) in zip(self._segments(), segments):
            part = x2d if single else x2d[:, start:start + size]
            weight = self.weight_t if single else self.weight_t[start:start + size]
            acc = int8_matmul(quantize_codes(part, scale, shifted_zero, -128, 127, torch.int8), weight)
            out = torch.addcmul(out, acc, combined)
        return out if bias is None else out.add_(bias)

    def _static_folded(self, act: ActQuantizer, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``_per_tensor`` for static scales with ``_fold`` done once per timestep group (eager inference).
        Buffers are read from the module dicts: four ``nn.Module.__getattr__`` lookups cost ~5 us per call,
        more than the GEMM's rescale on small layers."""
        group = act.group_index()
        own, act_buffers = self._buffers, act._buffers
        sources = (act_buffers["scale"], act_buffers["zero_point"], own["weight_scale"], own["col_sums"])
        segments, base = self.constants.get((group, x2d.device), sources, lambda: self._fold_static(group))
        return self._rescaled_gemm(x2d, segments, base, bias)

    def _dynamic(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Per-token scales (M, 1): out = (acc - zero_row * colsum) * s_row * s_w + bias."""
        scale, zero = dynamic_qparams(x2d, -1, get_format("int8"), self.symmetric)
        shifted_zero = zero - self.offset
        out = None
        for s, start, size in self._segments():
            acc = int8_matmul(self._quantize(x2d[:, start:start + size], scale, shifted_zero),
                              self.weight_t[start:start + size]).float()
            acc.sub_(shifted_zero.float() * self.col_sums[s].float()).mul_(scale.float())
            weight_scale = self.weight_scale[:, s].float()
            out = acc * weight_scale if out is None else out.addcmul_(acc, weight_scale)
        return out if bias is None else out.add_(bias.float())

    def forward(self, x2d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(M, K) float -> (M, N) float in ``x2d``'s dtype, bias added; scales, codes and the rescale are
        computed in float32 whatever ``x2d``'s dtype (``as_float32``)."""
        x_float, act = as_float32(x2d), self._modules["act"]
        if isinstance(act, ActQuantizer) and fast_path_on():
            out = self._static_folded(act, x_float, bias)
        elif isinstance(act, DynamicActQuantizer) and not act.per_tensor:
            out = self._dynamic(x_float, bias)
        else:
            out = self._per_tensor(x_float, bias)
        return out if out.dtype == x2d.dtype else out.to(x2d.dtype)


class _GemmLayer(nn.Module):
    """Shared part of the GEMM layers: the core (``core_cls``), the bias and the saved-weight view."""

    kind = "int8-gemm"
    core_cls: type[nn.Module] = Int8GemmCore

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.segment_sizes, self.weight_fmt = layer.segment_sizes, layer.weight_fmt
        self.core = self.core_cls(layer.weight_codes, layer.weight_scale, layer.segment_sizes, layer.act)
        self.bias = layer.bias

    @property
    def act(self) -> nn.Module:
        return self.core.act

    def export_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.core.codes(), self.core.weight_scale

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized (out, in) weight in ``dtype``: the simulated layer's weight (for gradients)."""
        return dequantize_weight(self.core.codes(), self.core.weight_scale, self.segment_sizes).to(dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


class Int8Linear(_GemmLayer):
    """Linear layer computed with an int8 GEMM (see ``Int8GemmCore``)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core.forward(x.reshape(-1, x.shape[-1]), self.bias)  # the core is internal: no hooks to run
        return out.reshape(*x.shape[:-1], self.out_features)

    def _simulated(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.float_weight(x.dtype), self._bias(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, x, self._kernel, self._simulated)


class Int8Conv1x1(_GemmLayer):
    """1x1, stride-1, unpadded, ungrouped Conv2d computed as an int8 GEMM over pixels."""

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__(layer)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode"):
            setattr(self, name, getattr(layer, name))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out = self.core.forward(x.permute(0, 2, 3, 1).reshape(-1, c), self.bias)
        return out.reshape(n, h, w, self.out_channels).permute(0, 3, 1, 2)

    def _simulated(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.float_weight(x.dtype).reshape(self.out_channels, self.in_channels, 1, 1)
        return F.conv2d(self.act(x), weight, self._bias(x.dtype))

    @takes_unbatched_images
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, x, self._kernel, self._simulated)


class Fp8Linear(Int8Linear):
    """Linear layer computed with an fp8 GEMM where the device has one (see ``fp8.Fp8GemmCore``)."""

    kind = "fp8-gemm"
    core_cls = Fp8GemmCore


class Fp8Conv1x1(Int8Conv1x1):
    """1x1, stride-1 Conv2d computed as an fp8 GEMM over pixels where the device has one."""

    kind = "fp8-gemm"
    core_cls = Fp8GemmCore


class StoredWeightLayer(KeepsQuantDtypes):
    """Weights stored as int8 codes or packed int4, dequantized cached (int8) or per call (int4).

    Runs the original float op on the dequantized weight; activations fake-quantized if configured.
    """

    def __init__(self, layer: QuantLayer, op: Callable[..., torch.Tensor], op_kwargs: dict[str, Any],
                 dtype: torch.dtype = torch.float32) -> None:
        """``dtype``: the float dtype the denoiser computes in, that of the cached dequantized weight (int8)."""
        super().__init__()
        for name in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                     "stride", "padding", "dilation", "groups", "padding_mode"):
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))
        self.segment_sizes, self.weight_fmt = layer.segment_sizes, layer.weight_fmt
        self.weight_shape, self.op, self.op_kwargs = layer.weight_shape, op, dict(op_kwargs)
        self.packed = layer.weight_fmt == "int4" and layer.weight_codes.shape[1] % 2 == 0
        codes = pack_int4(layer.weight_codes) if self.packed else layer.weight_codes
        self.kind = "int4-packed" if self.packed else f"dequant-{layer.weight_fmt}"
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", layer.weight_scale.clone())
        cached = None if self.packed else self._dequantize().to(dtype)
        self.register_buffer("cached_weight", cached, persistent=False)
        self.bias, self.act = layer.bias, layer.act
        self._tinygemm: TinyGemmWeight | None = None
        self._pack_tinygemm()
        self.register_load_state_dict_post_hook(_rederive_after_load)

    def _apply(self, fn: Any, recurse: bool = True) -> "StoredWeightLayer":
        super()._apply(fn, recurse)
        self._rederive()  # .to("cuda") / .cpu(): the tinygemm pack exists only on CUDA
        return self

    def _rederive(self) -> None:
        """The cached dequantized weight (cast along, but re-derived from the codes: exact after any round trip)
        and the tinygemm pack, from the codes and scales as they are now."""
        if self.cached_weight is not None:
            self.cached_weight = self._dequantize().to(self.cached_weight.dtype)
        self._pack_tinygemm()

    def _pack_tinygemm(self) -> None:
        """int4 weight-only Linear layers on CUDA run tinygemm (``tinygemm``); others dequantize per call."""
        weight_only_linear = self.packed and self.act is None and self.op is F.linear
        self._tinygemm = pack_for_cuda(unpack_int4(self.weight_codes), self.weight_scale, self.segment_sizes) \
            if weight_only_linear and self.weight_codes.is_cuda else None

    def export_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        codes = unpack_int4(self.weight_codes) if self.packed else self.weight_codes
        return codes, self.weight_scale

    def _dequantize(self) -> torch.Tensor:
        codes = unpack_int4(self.weight_codes) if self.packed else self.weight_codes
        return dequantize_weight(codes, self.weight_scale, self.segment_sizes).reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        return self.cached_weight if self.cached_weight is not None else self._dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is F.conv2d and x.dim() == 3:  # unbatched (C, H, W), as takes_unbatched_images (Linear layers
            return self.forward(x.unsqueeze(0)).squeeze(0)  # take 3-D token inputs as they are)
        if self._tinygemm is not None and x.is_cuda and x.dtype == torch.bfloat16:
            return run_kernel(self, x, lambda x: tinygemm_linear(x, self._tinygemm, self.bias), self._float_op)
        return self._float_op(x)

    def _float_op(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.act is None else self.act(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.op(x, self.weight.to(x.dtype), bias, **self.op_kwargs)


def _rederive_after_load(layer: StoredWeightLayer, incompatible_keys: Any) -> None:
    """``load_state_dict`` copies codes and scales in place: the cached weight and pack follow them."""
    layer._rederive()


def _gemm_ready(layer: QuantLayer, fmt: str = "int8") -> bool:
    """``fmt`` weights and ``fmt`` activations, the weight split at most like the activation."""
    act = layer.act
    if layer.weight_fmt != fmt or act is None or act.fmt_name != fmt:
        return False
    if len(act.segment_sizes) > 1:
        return tuple(act.segment_sizes) == tuple(layer.segment_sizes)
    return len(layer.segment_sizes) <= 2


def _is_pointwise(conv: QuantConv2d) -> bool:
    return (tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1
            and onednn.explicit_padding(conv) == (0, 0) and tuple(conv.dilation) == (1, 1))


def int8_kernels_on(device: torch.device) -> bool:
    """Whether ``device`` multiplies int8 faster than float: CUDA, or a CPU with VNNI-class int8 units.

    Elsewhere (AVX2-only or non-x86 CPUs) an int8 GEMM only adds conversions (measured 1.5x slower than
    fp32 eager on mnist-ddpm here), so such layers lower to ``dequant-int8``, the same numbers.
    """
    return device.type == "cuda" or (device.type == "cpu" and onednn.cpu_has_vnni())


def _lower_linear(layer: QuantLinear, dtype: torch.dtype) -> nn.Module | None:
    if _gemm_ready(layer) and int8_kernels_on(layer.weight_codes.device):
        return Int8Linear(layer)
    if _gemm_ready(layer, "fp8"):
        return Fp8Linear(layer)
    if layer.weight_fmt == "fp8":
        return None  # fp8 weights with other activations: no kernel anywhere, stays simulated
    return StoredWeightLayer(layer, F.linear, {}, dtype)


def _lower_conv(layer: QuantConv2d, dtype: torch.dtype) -> nn.Module | None:
    if onednn.supports(layer):
        return onednn.OneDNNInt8Conv2d(layer)
    if _gemm_ready(layer) and _is_pointwise(layer) and int8_kernels_on(layer.weight_codes.device):
        return Int8Conv1x1(layer)
    if _gemm_ready(layer, "fp8") and _is_pointwise(layer):
        return Fp8Conv1x1(layer)
    if layer.weight_fmt == "fp8":
        return None
    kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    return StoredWeightLayer(layer, F.conv2d, kwargs, dtype)


LOWERINGS: dict[type, Callable[[Any, torch.dtype], nn.Module | None]] = {QuantLinear: _lower_linear, QuantConv2d: _lower_conv}
UNLOWERED_FORMATS = (None,)  # float weights: nothing to lower


def lower_layer(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module | None:
    """The lowered replacement of a simulated layer, or None if it stays simulated. ``dtype``: the float dtype
    the denoiser computes in (float32 if None), which weights dequantized once are kept in."""
    if layer.weight_fmt in UNLOWERED_FORMATS or type(layer) not in LOWERINGS:
        return None
    return LOWERINGS[type(layer)](layer, dtype or torch.float32)


@torch.inference_mode(False)  # lowered buffers made under a caller's inference_mode could not be loaded into after it
def lower_(pipe: Any) -> Any:
    """Replace every simulated quantized layer of ``pipe``'s denoiser by its lowered form; returns ``pipe``."""
    _, denoiser = find_denoiser(pipe)
    state = get_state(denoiser)
    if state is None:
        raise ValueError("lower_ needs a quantized pipeline; call quantize_ first")
    if TECHNIQUE in applied_techniques(pipe):
        base_fingerprint(pipe)  # notes a weight change since quantize_ before the refreshed state hides it from save
    dtype = compute_dtype(denoiser)
    lowered = {name: lower_layer(denoiser.get_submodule(name), dtype) for name in state.layers
               if name not in state.lowered}
    for name, module in lowered.items():
        if module is not None:
            swap_module(denoiser, name, module)
            state.lowered[name] = module.kind
    note_lowering(state, lowered)
    if TECHNIQUE in applied_techniques(pipe):  # refresh the saved state: layers are lowered now
        mark_applied(pipe, TECHNIQUE)
    return pipe


def note_lowering(state: Any, lowered: dict[str, nn.Module | None]) -> None:
    """Add to ``state.lowering_notes`` what the kernels chosen here mean for speed (layers ``lowered`` maps
    to None stayed simulated)."""
    notes = state.lowering_notes
    kept = [name for name, module in lowered.items() if module is None]
    if kept:
        notes.append(f"{len(kept)} layers stay simulated (fp8 k x k convs, fp8 weights without fp8 "
                     "activations, or float weights: no kernel)")
    if any(kind == "fp8-gemm" for kind in state.lowered.values()):
        notes.append("fp8-gemm layers run torch._scaled_mm on GPUs with fp8 tensor cores (CUDA >= 8.9) "
                     "and the simulated fp8 math elsewhere")
    if any(kind == "dequant-int8" for kind in state.lowered.values()):
        notes.append("dequant-int8 layers (group-wise or weight-only int8; k x k convs off VNNI CPUs or with "
                     "per-token dynamic activations, which oneDNN's int8 convolution does not take; "
                     "every int8 layer on CPUs without VNNI / AMX int8 units) run the "
                     "float op on a weight dequantized once: int8 on disk, no speed-up")
    if any(kind == "int4-packed" for kind in state.lowered.values()):
        notes.append("int4-packed layers dequantize per call (no int4 CPU kernel): smaller, not faster; "
                     "weight-only int4 Linear layers on CUDA in bf16 run tinygemm instead")
    notes[:] = list(dict.fromkeys(notes))
