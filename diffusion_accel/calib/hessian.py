"""Timestep-weighted input Hessians for OBS/GPTQ-style solvers, and Wanda's input norms.

For a layer with input rows X_k (n_k rows of ``d`` features at step k) the collector keeps
``S = sum_k w_k X_k^T X_k`` (fp32, d x d) and ``N = sum_k w_k n_k``; the OBS-Diff Hessian is
``H = 2 S / N``. Linear inputs are flattened over their leading dims (rows = tokens x batch);
Conv2d inputs are unfolded into kernel patches like GPTQ's ``nn.Unfold`` path, so ``d`` is
``in_channels * kh * kw`` in the order of ``conv.weight.reshape(out_channels, -1)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..stacklevel import user_stacklevel
from .collectors import Collector, Step

SUPPORTED_LAYERS = ("torch.nn.Linear", "torch.nn.Conv2d with groups=1")


def linear_rows(x: torch.Tensor) -> torch.Tensor:
    """Input of a Linear (..., in_features) as rows (n, in_features)."""
    return x.reshape(-1, x.shape[-1])


def conv2d_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input (B, C, H, W) of ``conv`` as patch rows (B * L, C * kh * kw), L output positions."""
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def takes_hessian(module: nn.Module) -> bool:
    """Whether a ``HessianCollector`` can take ``module`` (a Linear, or a Conv2d without groups)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def row_function(module: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function turning ``module``'s input into Hessian rows; TypeError for other layer types."""
    if isinstance(module, nn.Linear):
        return linear_rows
    if takes_hessian(module):
        return lambda x: conv2d_rows(module, x)
    detail = f" (groups={module.groups})" if isinstance(module, nn.Conv2d) else ""
    raise TypeError(f"HessianCollector cannot take module {name!r} of type {type(module).__name__}{detail}; "
                    f"supported: {', '.join(SUPPORTED_LAYERS)}")


class UnobservedLayerError(ValueError):
    """A layer the collector saw no (weighted) inputs for: callers skip it, unlike other errors."""


@dataclass
class _HessianSums:
    """Accumulators of one layer: weighted X^T X, squared input norms and row counts."""

    xtx: torch.Tensor | None
    sq_norms: torch.Tensor
    weighted_rows: float = 0.0
    rows: int = 0
    rows_per_step: dict[int, int] = field(default_factory=dict)

    def add(self, rows: torch.Tensor, step: Step) -> None:
        if self.xtx is not None:
            self.xtx.addmm_(rows.T, rows, alpha=step.weight)
        self.sq_norms += rows.pow(2).sum(0)
        self.weighted_rows += step.weight * rows.shape[0]
        self.rows += rows.shape[0]
        self.rows_per_step[step.step_index] = self.rows_per_step.get(step.step_index, 0) + rows.shape[0]


def hessian_bytes(denoiser: nn.Module, names: Iterable[str]) -> int:
    """Bytes of the fp32 input Hessians (d x d, plus d sums) of the named layers, d = weight columns."""
    total = 0
    for name in dict.fromkeys(names):
        weight = getattr(denoiser.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            columns = weight[0].numel()
            total += 4 * (columns * columns + columns)
    return total


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, else the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def hessian_memory_budget(denoiser: nn.Module) -> int:
    """Bytes of full input Hessians one calibration pass may hold: a quarter of the memory of the
    device of ``denoiser``'s weights (full-size SD 1.5 has 26.3 GiB of them over all layers)."""
    parameter = next(denoiser.parameters(), None)
    return device_memory_bytes(parameter.device if parameter is not None else torch.device("cpu")) // 4


def warn_if_hessians_large(denoiser: nn.Module, names: Iterable[str]) -> None:
    """Warn before a pass whose full input Hessians alone exceed ``hessian_memory_budget``: pruning and
    GPTQ split their groups to fit it, so this is a single layer too large, or a hand-made collector
    (memory ran out without a word before)."""
    size, budget = hessian_bytes(denoiser, names), hessian_memory_budget(denoiser)
    if size > budget:
        warnings.warn(f"this calibration pass collects {_size_text(size)} of input Hessians (fp32, d x d per "
                      f"layer) at once, over a quarter of this device's {_size_text(4 * budget)}: collect fewer "
                      f"layers per HessianCollector (pruning and GPTQ already split their groups to fit, down "
                      f"to one layer group per pass)", stacklevel=user_stacklevel())


def _size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


class HessianCollector(Collector):
    """Accumulates H = 2 sum_k w_k X_k X_k^T / sum_k w_k n_k per Linear/Conv2d layer (fp32).

    ``full=False`` keeps only the per-channel squared norms (d values instead of d x d), which is
    all Wanda needs. ``device`` moves the accumulators (default: the device of the inputs).
    """

    wants = "input"

    def __init__(self, module_names: str | Iterable[str], full: bool = True,
                 device: str | torch.device | None = None) -> None:
        super().__init__(module_names)
        self.full = bool(full)
        self.device = torch.device(device) if device is not None else None
        self._row_functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._sums: dict[str, _HessianSums] = {}

    def bind(self, denoiser: nn.Module) -> None:
        """Check every named module is a supported layer and remember how to read its input."""
        super().bind(denoiser)
        for name in self.module_names:
            self._row_functions[name] = row_function(denoiser.get_submodule(name), name)
        if self.full:
            warn_if_hessians_large(denoiser, self.module_names)

    def observe(self, name: str, value: torch.Tensor, step: Step) -> None:
        """Add the rows of one input tensor of layer ``name`` with weight ``step.weight``."""
        if name not in self._row_functions:
            raise ValueError(f"HessianCollector does not know the layer type of {name!r}; "
                             f"call bind(denoiser) first (calibrate and replay do)")
        rows = self._row_functions[name](value.detach()).float()
        if self.device is not None:
            rows = rows.to(self.device)
        self._sums_for(name, rows).add(rows, step)

    def _sums_for(self, name: str, rows: torch.Tensor) -> _HessianSums:
        width = rows.shape[1]
        if name not in self._sums:
            # float32 whatever torch's default dtype (a float64 default failed every OBS prune and GPTQ: s53)
            xtx = torch.zeros(width, width, device=rows.device, dtype=torch.float32) if self.full else None
            self._sums[name] = _HessianSums(xtx=xtx, sq_norms=torch.zeros(width, device=rows.device,
                                                                          dtype=torch.float32))
        sums = self._sums[name]
        if sums.sq_norms.shape[0] != width:
            raise ValueError(f"layer {name!r} received inputs with {width} features after "
                             f"{sums.sq_norms.shape[0]} before")
        return sums

    def hessian(self, name: str) -> torch.Tensor:
        """Normalized Hessian 2 * sum_k w_k X_k X_k^T / sum_k w_k n_k, shape (d, d), fp32."""
        sums = self._finite(name)
        if sums.xtx is None:
            raise ValueError("this HessianCollector was built with full=False; only input_sq_norms exist")
        if sums.weighted_rows <= 0:
            raise UnobservedLayerError(f"layer {name!r} was only observed on steps of weight 0")
        return sums.xtx * (2.0 / sums.weighted_rows)

    def input_sq_norms(self, name: str) -> torch.Tensor:
        """Unweighted squared L2 norm of each input feature over all rows, ||X_j||^2, shape (d,)."""
        return self._finite(name).sq_norms

    def input_width(self, name: str) -> int:
        """Input features d of ``name`` (its Hessian is d x d); no device sync."""
        return self._observed(name).sq_norms.numel()

    def num_rows(self, name: str) -> int:
        """Total rows n = sum_k n_k seen for ``name``."""
        return self._observed(name).rows

    def weighted_rows(self, name: str) -> float:
        """Normalizer sum_k w_k n_k of ``name``."""
        return self._observed(name).weighted_rows

    def rows_per_step(self, name: str) -> dict[int, int]:
        """Rows n_k per step index of ``name``."""
        return dict(sorted(self._observed(name).rows_per_step.items()))

    def free(self, name: str | None = None) -> None:
        """Drop the accumulators of ``name`` (all layers when None) to release memory."""
        for key in ([name] if name is not None else list(self._sums)):
            self._sums.pop(key, None)

    def _observed(self, name: str) -> _HessianSums:
        if name not in self.module_names:
            raise KeyError(f"{name!r} is not collected by this HessianCollector; modules: {list(self.module_names)}")
        if name not in self._sums:
            raise UnobservedLayerError(f"no inputs were observed for layer {name!r} (freed, or not called on a "
                                       f"selected step)")
        return self._sums[name]

    def _finite(self, name: str) -> _HessianSums:
        """``name``'s sums; raises if its inputs held NaN or inf (their squares, summed, do too)."""
        sums = self._observed(name)
        if not bool(torch.isfinite(sums.sq_norms).all()):
            raise ValueError(f"the calibration inputs of layer {name!r} hold NaN or inf values (the float model "
                             f"overflows or its weights are not finite); calibrate in float32 or bfloat16")
        return sums

    def describe(self) -> str:
        """One line: layer count and mode."""
        mode = "full X^T X" if self.full else "input norms only"
        return f"HessianCollector({len(self.module_names)} layers, {mode})"
