"""Compute and storage cost: FLOPs per denoiser call, parameter count, serialized size.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2). For a
pipeline, every denoiser call of one real pipeline call is counted separately (a counter is opened
in a forward pre-hook and closed in the post-hook), so cached or skipped steps show their true
cost; ``per_call`` is the mean over calls.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_model
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from .pipes import denoiser_of
from ..hooks import ModuleHooks


def _register_cpu_attention_formula() -> None:
    """Count CPU's fused attention as torch counts its CUDA kernels: it had no formula, so attention counted 0
    in every CPU FLOP count (29% of a tiny SD UNet's)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op.default not in flop_registry:
        @register_flop_formula(op)
        def _cpu_attention_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                                **kwargs: Any) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)


def _register_int4_formula() -> None:
    """Count tinygemm's int4 weight products (weight-only int4 Linear layers on CUDA) like the float matmul."""
    names = ("_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu")
    ops = [getattr(torch.ops.aten, name) for name in names if hasattr(torch.ops.aten, name)]
    ops = [op for op in ops if op.default not in flop_registry]
    if ops:
        @register_flop_formula(ops)
        def _int4_mm_flop(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return 2 * x_shape[0] * x_shape[1] * out_shape[1]  # (M, K) @ (K, N): N from the output


def _register_int8_flop_formulas() -> None:
    """Teach torch's counter the int8 kernels lowered PTQ layers run (it knows only float ops), so a
    lowered model reports the FLOPs it really does (2 per multiply-add, as torch counts float ops): ``_int_mm``
    and oneDNN's int8 conv."""
    if torch.ops.aten._int_mm.default not in flop_registry:
        @register_flop_formula(torch.ops.aten._int_mm)
        def _int_mm_flop(a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    ops = getattr(torch.ops, "onednn", None)
    if ops is not None and hasattr(ops, "qconv_pointwise") and ops.qconv_pointwise.tensor not in flop_registry:
        @register_flop_formula(ops.qconv_pointwise)
        def _qconv_flop(x_shape: Any, x_scale: Any, x_zero: Any, w_shape: Any, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
            return 2 * math.prod(out_shape) * math.prod(w_shape[1:])  # packed weight keeps (out, in, kh, kw)


_register_cpu_attention_formula()
_register_int4_formula()
_register_int8_flop_formulas()


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)`` (e.g. a module and its inputs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


@dataclass
class FlopStats:
    """FLOPs of each denoiser call in one pipeline call."""

    calls: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.calls))

    @property
    def per_call(self) -> float:
        return self.total / len(self.calls) if self.calls else 0.0


class _PerCallFlops:
    """Forward hooks opening a FlopCounterMode per call of a module and recording its total."""

    def __init__(self, stats: FlopStats) -> None:
        self.stats, self.counter = stats, None

    def pre(self, module: torch.nn.Module, args: Any) -> None:
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.counter.__exit__(None, None, None)
        self.stats.calls.append(int(self.counter.get_total_flops()))
        self.counter = None

    def close(self) -> None:
        """Exit the counter of a call that raised between ``pre`` and ``post``: until session 41 it stayed
        active for the rest of the process (every later op counted, latencies 2.5x)."""
        if self.counter is not None:
            counter, self.counter = self.counter, None
            counter.__exit__(None, None, None)


def denoiser_flops(pipe: Any, call_kwargs: dict[str, Any]) -> FlopStats:
    """FLOPs of every denoiser call during one ``pipe(**call_kwargs)``. A compiled denoiser runs eagerly
    here (the same ops): under the counting mode dynamo would compile it afresh, up to its recompile
    limit, after the timing of ``bench --compile``."""
    denoiser = denoiser_of(pipe)
    stats = FlopStats()
    recorder = _PerCallFlops(stats)
    with ModuleHooks() as hooks, torch.compiler.set_stance("force_eager"):
        hooks.pre(denoiser, recorder.pre)
        hooks.post(denoiser, recorder.post)
        try:
            pipe(**call_kwargs)
        finally:
            recorder.close()
    return stats


def module_flops(root: torch.nn.Module, names: Any, run: Callable[[], Any]) -> dict[str, int]:
    """FLOPs each named submodule of ``root`` ran during ``run()``, summed over its calls (eagerly, as in
    :func:`denoiser_flops`); the modules must not contain one another."""
    stats = {name: FlopStats() for name in names}
    recorders = [_PerCallFlops(module_stats) for module_stats in stats.values()]
    with ModuleHooks() as hooks, torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for name, recorder in zip(stats, recorders):
            module = root.get_submodule(name)
            hooks.pre(module, recorder.pre)
            hooks.post(module, recorder.post)
        try:
            run()
        finally:
            for recorder in recorders:  # at most one is open: the modules do not contain one another
                recorder.close()
    return {name: module_stats.total for name, module_stats in stats.items()}


@dataclass
class SizeStats:
    """Parameter count, bytes of all state tensors, and the safetensors file size (None if unknown)."""

    parameters: int
    state_bytes: int
    serialized_bytes: int | None


def parameter_count(module: torch.nn.Module) -> int:
    """Number of weight elements: parameters (shared ones counted once) plus quantized layers' weights, whose
    int8 / int4 / fp8 codes are buffers (a W8A8 fashion-sd UNet counted 112,900 of its 5,925,124)."""
    return int(sum(parameter.numel() for parameter in module.parameters())) + quantized_weight_count(module)


def quantized_weight_count(module: torch.nn.Module) -> int:
    """Weight elements held as quantization codes: ``weight_shape`` of simulated and stored-weight layers,
    else the codes ``export_weight`` gives (the int8 GEMM layers)."""
    count = 0
    for layer in module.modules():
        shape = getattr(layer, "weight_shape", None)
        if shape is not None and "weight_codes" in layer._buffers:
            count += math.prod(shape)
        elif shape is None and callable(getattr(layer, "export_weight", None)):
            count += layer.export_weight()[0].numel()
    return count


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers in the state dict (tied tensors counted once)."""
    unique = {id(tensor): tensor for tensor in module.state_dict(keep_vars=True).values()}
    return int(sum(tensor_bytes(tensor) for tensor in unique.values()))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of ``tensor``; a wrapper subclass (torchao's quantized weights) by the tensors it holds (its
    float32 shape counted until session 45: an int8 weight-only UNet reported its fp32 size)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in names]
        return sum(tensor_bytes(value) for value in inner if isinstance(value, torch.Tensor))
    return tensor.numel() * tensor.element_size()


def serialized_bytes(module: torch.nn.Module) -> int | None:
    """Size of ``module`` written with ``safetensors.torch.save_model``, or with ``torch.save`` when it holds tensor
    subclasses safetensors cannot write (torchao's quantized weights); None on meta or if unsavable."""
    if any(tensor.device.type == "meta" for tensor in module.state_dict().values()):
        return None
    with tempfile.TemporaryDirectory(prefix="da_size_") as folder:
        subclasses = _holds_tensor_subclasses(module)
        path = Path(folder) / ("model.pt" if subclasses else "model.safetensors")
        try:
            if subclasses:
                torch.save(module.state_dict(), path)
            else:
                save_model(module, str(path))
        except (TypeError, ValueError, RuntimeError, AttributeError) as error:
            warnings.warn(f"could not serialize {type(module).__name__} with safetensors ({error}); "
                          "serialized size not reported", stacklevel=2)
            return None
        return path.stat().st_size


def _holds_tensor_subclasses(module: torch.nn.Module) -> bool:
    return any(type(tensor) not in (torch.Tensor, torch.nn.Parameter) for tensor in module.state_dict().values())


def model_size(module: torch.nn.Module, *, serialize: bool = True) -> SizeStats:
    """Parameters, state bytes and (if ``serialize``) safetensors bytes of ``module``."""
    return SizeStats(parameter_count(module), state_bytes(module),
                     serialized_bytes(module) if serialize else None)
