"""fp8 (e4m3) GEMMs for lowered layers whose weights *and* activations are fp8 (``fp8-gemm``).

On GPUs with fp8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, Blackwell) activations
are cast to fp8 once and multiplied by ``torch._scaled_mm`` (fp8 x fp8, fp32 accumulation); the
per-tensor (or per-token) activation scale and the per-channel weight scale are applied to the fp32
product in one expression. Everywhere else the same layer runs the simulated math (fake-quantized
activations times the dequantized weight), because torch 2.13's CPU ``_scaled_mm`` is exact but
slower than an fp32 matmul on this CPU (59 vs 46 ms at 1024x1280x1280, 1 thread). So one lowered,
saved artifact keeps fp8 weights (1 byte each) and runs the fp8 kernel wherever the device has one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .formats import get_format
from .layers import DynamicActQuantizer, KeepsQuantDtypes
from .quantizers import dequantize_weight, dynamic_qparams, segment_spans

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_CAPABILITY = (8, 9)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fp8_kernel_available(device: torch.device) -> bool:
    """Whether ``device`` has fp8 tensor cores for ``torch._scaled_mm`` (CUDA capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def kernel_shapes_ok(device: torch.device, columns: int, rows: int) -> bool:
    """cuBLASLt's fp8 GEMM needs the reduction and output widths to be multiples of 16."""
    return device.type != "cuda" or (columns % 16 == 0 and rows % 16 == 0)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 codes of ``x / scale`` (saturated at ±448), computed in fp32."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class Fp8GemmCore(KeepsQuantDtypes):
    """fp8 GEMM of activations (M, K) with a weight split in column segments, rescaled to float.

    ``codes``: (N, K) fp8 weight codes; ``weight_scale``: (N, S); ``act``: a symmetric fp8
    ``ActQuantizer`` (static per-tensor scale per segment and timestep group) or a per-token
    ``DynamicActQuantizer``.
    """

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, segment_sizes: Sequence[int],
                 act: nn.Module) -> None:
        super().__init__()
        self.segment_sizes = tuple(segment_sizes)
        self.register_buffer("weight_codes", codes.contiguous())
        self.register_buffer("weight_scale", weight_scale.clone())
        self.act = act

    def codes(self) -> torch.Tensor:
        """(N, K) fp8 weight codes."""
        return self.weight_codes

    def _segments(self) -> list[tuple[int, int, int]]:
        return segment_spans(self.segment_sizes)

    def _act_scales(self, x2d: torch.Tensor) -> list[torch.Tensor]:
        """Per segment: the activation scale, () static or dynamic per tensor, or (M, 1) per token (over
        all K columns, as the simulated ``DynamicActQuantizer`` does)."""
        if isinstance(self.act, DynamicActQuantizer) and not self.act.per_tensor:
            per_token = dynamic_qparams(x2d, -1, get_format("fp8"), True)[0].float()
            return [per_token] * len(self.segment_sizes)
        scales = [scale.float() for scale, _ in self.act.segment_qparams(x2d)]
        return scales if len(scales) > 1 else scales * len(self.segment_sizes)

    def _kernel(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """out = Σ_segments _scaled_mm(fp8(x / s_a), W8ᵀ) · s_a · s_w + bias, in fp32."""
        unit = torch.ones((), device=x2d.device)
        out = None
        for (s, start, size), act_scale in zip(self._segments(), self._act_scales(x2d)):
            weight = self.weight_codes[:, start:start + size]
            weight = weight if len(self.segment_sizes) == 1 else weight.contiguous()
            acc = torch._scaled_mm(to_fp8(x2d[:, start:start + size], act_scale), weight.t(),
                                   scale_a=unit, scale_b=unit, out_dtype=torch.float32)
            combined = act_scale.reshape(-1, 1) * self.weight_scale[:, s].float()
            out = acc * combined if out is None else out.addcmul_(acc, combined)
        if bias is not None:
            out = out + bias.float()
        return out.to(x2d.dtype)

    def _simulated(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The same math without fp8 kernels: fake-quantized activations times the dequantized weight."""
        weight = dequantize_weight(self.weight_codes, self.weight_scale, self.segment_sizes)
        x = self.act(x2d)  # channels are x2d's last dim, which is also dim 1 of a conv quantizer
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def use_kernel(self, x2d: torch.Tensor) -> bool:
        """fp8 tensor cores present, a supported input dtype and kernel-compatible shapes."""
        rows = self.weight_codes.shape[0]
        return (fp8_kernel_available(x2d.device) and x2d.dtype in KERNEL_DTYPES
                and all(kernel_shapes_ok(x2d.device, size, rows) for size in self.segment_sizes))

    def forward(self, x2d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(M, K) float -> (M, N) float in ``x2d``'s dtype, bias added."""
        if self.use_kernel(x2d):
            return self._kernel(x2d, bias)
        return self._simulated(x2d, bias)
