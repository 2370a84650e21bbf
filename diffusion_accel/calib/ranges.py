"""Activation range observers: per-tensor min/max, percentile and MSE-optimal clipping ranges.

Min/max are exact over everything seen. Percentile and MSE ranges are computed from a bounded
uniform reservoir sample of the values (``sample_size`` per module, ``per_step_sample_size`` per
module and step when ``per_step=True``), so memory stays fixed however long calibration runs.
Ranges are for asymmetric uniform quantization; a quantizer that needs zero exactly representable
should widen the range to include 0 itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .collectors import Collector, Step
from .reservoir import ValueReservoir

RANGE_METHODS = ("minmax", "percentile", "mse")
RANGE_SOURCES = ("input", "output")


def fake_quantize(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Asymmetric uniform quantize-dequantize of ``x`` onto ``2**bits`` levels spanning [lo, hi]."""
    levels = 2 ** bits - 1
    scale = max((hi - lo) / levels, 1e-12)
    zero_point = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def quantization_mse(x: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    """Mean squared error of ``fake_quantize(x, lo, hi, bits)`` against ``x``."""
    return float((fake_quantize(x.float(), lo, hi, bits) - x.float()).pow(2).mean())


def percentile_range(sample: torch.Tensor, percentile: float) -> tuple[float, float]:
    """(lower, upper) quantiles at ``100 - percentile`` and ``percentile`` percent of ``sample``."""
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=torch.float64)
    lo, hi = torch.quantile(sample.double(), q).tolist()
    return lo, hi


QuantError = Callable[[torch.Tensor, float, float], float]  # (sample, lo, hi) -> its quantization MSE


def mse_range(sample: torch.Tensor, lo: float, hi: float, bits: int,
              num_candidates: int = 100, quant_error: QuantError | None = None) -> tuple[float, float]:
    """Clipping range inside [lo, hi] minimizing quantization MSE of ``sample`` at ``bits`` (asymmetric integer),
    or by ``quant_error`` (the grid the range is for: symmetric, fp8).

    Candidates shrink [lo, hi] towards an anchor (0 when the range spans it, else the end nearer
    to 0) by factors from 1 down to 0.01, as Q-Diffusion's search does.
    """
    anchor = min(max(0.0, lo), hi)
    best, best_error = (lo, hi), math.inf
    for fraction in torch.linspace(1.0, 0.01, num_candidates).tolist():
        candidate = (anchor + (lo - anchor) * fraction, anchor + (hi - anchor) * fraction)
        error = quantization_mse(sample, *candidate, bits) if quant_error is None else quant_error(sample, *candidate)
        if error < best_error:
            best, best_error = candidate, error
    return best


@dataclass
class _Extremes:
    """Running min/max (0-d tensors on the input's device) and an optional reservoir."""

    lo: torch.Tensor
    hi: torch.Tensor
    reservoir: ValueReservoir | None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if self.reservoir is not None:
            self.reservoir.add(x)


class RangeObserver(Collector):
    """Per-tensor ranges of module inputs (or outputs), optionally also per denoising step."""

    def __init__(self, module_names: str | Iterable[str], method: str = "minmax",
                 percentile: float = 99.99, per_step: bool = False, bits: int = 8,
                 wants: str = "input", sample_size: int = 65536, per_step_sample_size: int = 4096,
                 tensor_index: int = 0, seed: int = 0, quant_error: QuantError | None = None) -> None:
        """``quant_error``: how method "mse" scores a range (default: asymmetric ``bits``-bit integer MSE)."""
        super().__init__(module_names, tensor_index)
        _check_range_options(method, percentile, bits, wants)
        for label, size in (("sample_size", sample_size), ("per_step_sample_size", per_step_sample_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{label} must be an int >= 1, got {size!r}")
        self.method, self.percentile, self.bits, self.wants = method, float(percentile), bits, wants
        self.per_step, self.seed, self.quant_error = per_step, seed, quant_error
        self.sample_size, self.per_step_sample_size = sample_size, per_step_sample_size
        self._totals: dict[str, _Extremes] = {}
        self._per_step: dict[str, dict[int, _Extremes]] = {name: {} for name in self.module_names}
        self.num_values: dict[str, int] = dict.fromkeys(self.module_names, 0)

    def observe(self, name: str, value: torch.Tensor, step: Step) -> None:
        """Update the running range of ``name`` with ``value`` (any shape)."""
        x = value.detach()
        if x.numel() == 0:
            return
        self.num_values[name] += x.numel()
        self._stats(self._totals, name, x, self.sample_size).update(x)
        if self.per_step:
            self._stats(self._per_step[name], step.step_index, x, self.per_step_sample_size).update(x)

    def _stats(self, table: dict, key: object, x: torch.Tensor, capacity: int) -> _Extremes:
        if key not in table:
            reservoir = None if self.method == "minmax" else ValueReservoir(capacity, self.seed)
            start = x.new_tensor(math.inf, dtype=torch.float32)
            table[key] = _Extremes(lo=start, hi=-start, reservoir=reservoir)
        return table[key]

    def minmax(self, name: str) -> tuple[float, float]:
        """Exact (min, max) of every value seen for ``name``."""
        stats = self._observed(name)
        return float(stats.lo), float(stats.hi)

    def range(self, name: str) -> tuple[float, float]:
        """(lo, hi) of ``name`` by this observer's method, over all observed steps."""
        return self._resolve(self._observed(name))

    def ranges(self) -> dict[str, tuple[float, float]]:
        """(lo, hi) of every observed module."""
        return {name: self.range(name) for name in self.module_names if name in self._totals}

    def step_ranges(self, name: str) -> dict[int, tuple[float, float]]:
        """(lo, hi) per step index of ``name`` (needs ``per_step=True``), for per-step-group scales."""
        if not self.per_step:
            raise ValueError("step_ranges needs RangeObserver(..., per_step=True)")
        self._observed(name)
        return {step: self._resolve(stats) for step, stats in sorted(self._per_step[name].items())}

    def sample(self, name: str) -> torch.Tensor:
        """The reservoir sample of ``name`` (1-D float32 CPU; empty for method "minmax")."""
        reservoir = self._observed(name).reservoir
        return reservoir.values if reservoir is not None else torch.empty(0)

    def _observed(self, name: str) -> _Extremes:
        if name not in self.num_values:
            raise KeyError(f"{name!r} is not observed by this RangeObserver; modules: {list(self.module_names)}")
        if name not in self._totals:
            raise ValueError(f"no values were observed for module {name!r}: was it called on a selected step?")
        return self._totals[name]

    def _resolve(self, stats: _Extremes) -> tuple[float, float]:
        lo, hi = float(stats.lo), float(stats.hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # no clipping search over NaN / inf: the caller names it
            return lo, hi  # (the MSE search failed in round(NaN), naming no layer, until session 53)
        if self.method == "percentile":
            p_lo, p_hi = percentile_range(stats.reservoir.values, self.percentile)
            return max(lo, p_lo), min(hi, p_hi)
        if self.method == "mse":
            return mse_range(stats.reservoir.values, lo, hi, self.bits, quant_error=self.quant_error)
        return lo, hi

    def describe(self) -> str:
        """One line: method, bits, module count."""
        extra = f", {self.percentile}%" if self.method == "percentile" else ""
        extra += f", {self.bits} bits" if self.method == "mse" else ""
        return f"RangeObserver({self.method}{extra}, {len(self.module_names)} module {self.wants}s" \
               f"{', per step' if self.per_step else ''})"


def _check_range_options(method: str, percentile: float, bits: int, wants: str) -> None:
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {method!r}; accepted: {', '.join(RANGE_METHODS)}")
    if wants not in RANGE_SOURCES:
        raise ValueError(f"RangeObserver wants must be one of {RANGE_SOURCES}, got {wants!r}")
    if not isinstance(percentile, (int, float)) or not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
