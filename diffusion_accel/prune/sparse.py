"""2:4 semi-structured sparse kernels: used where the hardware has them, reported otherwise.

``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS) needs a CUDA GPU of compute
capability >= 8.0 and fp16/bf16 weights. On CPU, and for other patterns, no sparse kernel exists:
the pruned weights stay dense tensors with zeros (storage savings only, via ``da.save``).
"""

from __future__ import annotations

import torch
from torch import nn

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def sparse_kernel_unavailable(weight: torch.Tensor, pattern: str) -> str | None:
    """Why ``weight`` cannot use a 2:4 kernel (a sentence), or None if it can."""
    if pattern != "2:4":
        return f"pattern {pattern!r} has no sparse matmul kernel in PyTorch (only 2:4 does)"
    if weight.device.type != "cuda":
        return f"weights are on {weight.device.type}; 2:4 kernels exist only on CUDA GPUs"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "this GPU's compute capability is below 8.0 (no sparse tensor cores)"
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"weights are {weight.dtype}; 2:4 kernels need float16 or bfloat16"
    return None


def enable_sparse_kernels(denoiser: nn.Module, layer_names: list[str], pattern: str) -> str:
    """Swap 2:4-pruned Linear weights for semi-structured sparse tensors where possible; a summary line."""
    linears = [name for name in layer_names if isinstance(denoiser.get_submodule(name), nn.Linear)]
    if not linears:
        return "no sparse kernel used: no pruned Linear layers"
    reason = sparse_kernel_unavailable(denoiser.get_submodule(linears[0]).weight, pattern)
    if reason is not None:
        return f"no sparse kernel used: {reason}; zeros are stored densely (storage savings only via save)"
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for name in linears:
        layer = denoiser.get_submodule(name)
        try:
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
            converted += 1
        except (RuntimeError, ValueError):
            continue
    return f"2:4 sparse kernels enabled on {converted} of {len(linears)} pruned Linear layers"


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """A plain dense tensor of ``weight`` (undoes semi-structured sparse storage)."""
    if weight.layout != torch.strided or type(weight).__name__.startswith("SparseSemiStructured"):
        return weight.to_dense()
    return weight
