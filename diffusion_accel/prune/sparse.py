"""2:4 semi-structured sparse kernels: used where the hardware has them, reported otherwise.

``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS) needs a CUDA GPU of compute
capability >= 8.0 and fp16/bf16 weights. On CPU, and for other patterns, no sparse kernel exists:
the pruned weights stay dense tensors with zeros (storage savings only, via ``da.save``).
"""

from __future__ import annotations

import torch
from torch import nn

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
SPARSE_BACKENDS = ("auto", "cusparselt", "cutlass")


def sparse_kernel_unavailable(weight: torch.Tensor, pattern: str, backend: str = "auto") -> str | None:
    """Why ``weight`` cannot use a 2:4 kernel of ``backend`` (a sentence), or None if it can."""
    if pattern != "2:4":
        return f"pattern {pattern!r} has no sparse matmul kernel in PyTorch (only 2:4 does)"
    if weight.device.type != "cuda":
        return f"weights are on {weight.device.type}; 2:4 kernels exist only on CUDA GPUs"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "this GPU's compute capability is below 8.0 (no sparse tensor cores)"
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"weights are {weight.dtype}; 2:4 kernels need float16 or bfloat16"
    if backend == "cutlass" and torch.cuda.get_device_capability(weight.device)[0] != 8:
        return "PyTorch's CUTLASS 2:4 kernels run only on compute capability 8.x GPUs (cuSPARSELt covers newer ones)"
    return None


def _semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``weight`` as a semi-structured sparse tensor of ``backend`` ("auto": cuSPARSELt if PyTorch has it)."""
    from torch.sparse import (SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS,
                              to_sparse_semi_structured)

    if backend == "cutlass":
        return SparseSemiStructuredTensorCUTLASS.from_dense(weight)
    if backend == "cusparselt":
        return SparseSemiStructuredTensorCUSPARSELT.from_dense(weight)
    return to_sparse_semi_structured(weight)


def enable_sparse_kernels(denoiser: nn.Module, layer_names: list[str], pattern: str, backend: str = "auto") -> str:
    """Swap 2:4-pruned Linear weights for semi-structured sparse tensors where possible; a summary line.

    ``backend``: "auto" (PyTorch's choice), "cusparselt" or "cutlass" (PyTorch's two 2:4 GEMM libraries).
    """
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse backend {backend!r} is not one of {SPARSE_BACKENDS}")
    linears = [name for name in layer_names if isinstance(denoiser.get_submodule(name), nn.Linear)]
    if not linears:
        return "no sparse kernel used: no pruned Linear layers"
    reason = sparse_kernel_unavailable(denoiser.get_submodule(linears[0]).weight, pattern, backend)
    if reason is not None:
        return f"no sparse kernel used: {reason}; zeros are stored densely (storage savings only via save)"
    converted = 0
    for name in linears:
        layer = denoiser.get_submodule(name)
        if not follows_2_4(layer.weight):  # the kernels would compute with the wrong values, silently
            continue
        try:
            layer.weight = nn.Parameter(_semi_structured(layer.weight.detach(), backend), requires_grad=False)
            converted += 1
        except (RuntimeError, ValueError):
            continue
    where = "" if backend == "auto" else f" ({backend})"
    return f"2:4 sparse kernels{where} enabled on {converted} of {len(linears)} pruned Linear layers"


def follows_2_4(weight: torch.Tensor) -> bool:
    """Whether a (out, in) weight has at most 2 nonzeros in every group of 4 along its input dimension (a layer
    pruned by an earlier, other pattern does not; an artifact of two prunes restores both's layers)."""
    rows, columns = weight.shape
    return columns % 4 == 0 and int((weight.detach().reshape(rows, -1, 4) != 0).sum(-1).max()) <= 2


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """A plain dense tensor of ``weight`` (undoes semi-structured sparse storage)."""
    if weight.layout != torch.strided or type(weight).__name__.startswith("SparseSemiStructured"):
        return weight.to_dense()
    return weight


def densify_(module: nn.Module) -> int:
    """Give every Linear of ``module`` holding a semi-structured 2:4 weight a dense one again (torch casts such
    weights to no other dtype: ``pipe.to(torch.float32)`` raised NotImplementedError); returns how many."""
    layers = [layer for layer in module.modules()
              if isinstance(layer, nn.Linear) and type(layer.weight).__name__.startswith("SparseSemiStructured")]
    for layer in layers:
        layer.weight = nn.Parameter(dense_weight(layer.weight.detach()), requires_grad=False)
    return len(layers)
