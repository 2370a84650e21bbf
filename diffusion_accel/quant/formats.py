"""Number formats: integer grids (signed / unsigned) and fp8 (e4m3), looked up by name.

Integer codes are stored as int8 (int4 values lie in [-8, 7]; wider test grids as int32); fp8
codes as ``torch.float8_e4m3fn``.
fp8 is simulated as a cast round trip; lowered fp8 GEMMs (``fp8.py``) use fp8 kernels where the device has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_FORMATS = ("int8", "int4", "fp8", None)
ACTIVATION_FORMATS = ("int8", "fp8", None)


@dataclass(frozen=True)
class NumberFormat:
    """A quantization grid: ``bits``, integer or fp8, signed range [qmin, qmax] of the codes."""

    name: str
    bits: int
    is_float: bool = False

    @property
    def qmax(self) -> float:
        """Largest positive code of the signed grid (448 for fp8 e4m3)."""
        return 448.0 if self.is_float else float(2 ** (self.bits - 1) - 1)

    @property
    def qmin(self) -> float:
        """Smallest code of the signed grid."""
        return -448.0 if self.is_float else float(-(2 ** (self.bits - 1)))

    def unsigned_range(self) -> tuple[float, float]:
        """(0, 2**bits - 1): the grid of asymmetric (zero-point) quantization."""
        if self.is_float:
            raise ValueError("fp8 has no unsigned grid; fp8 activations are symmetric")
        return 0.0, float(2 ** self.bits - 1)

    def to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """Codes of ``scaled`` (= x / scale): rounded and clamped ints (int8) or fp8 values."""
        if self.is_float:
            return scaled.clamp(self.qmin, self.qmax).to(torch.float8_e4m3fn)
        dtype = torch.int8 if self.bits <= 8 else torch.int32
        return torch.clamp(torch.round(scaled), self.qmin, self.qmax).to(dtype)

    def round(self, scaled: torch.Tensor) -> torch.Tensor:
        """``to_codes`` kept in the input's float dtype (for simulation)."""
        if self.is_float:
            return scaled.clamp(self.qmin, self.qmax).to(torch.float8_e4m3fn).to(scaled.dtype)
        return torch.clamp(torch.round(scaled), self.qmin, self.qmax)


def get_format(name: str | int) -> NumberFormat:
    """The format called ``name`` ("int8", "int4", "fp8", "intN"), or a signed int grid of ``name`` bits."""
    if isinstance(name, int) and not isinstance(name, bool):
        if not 2 <= name <= 16:
            raise ValueError(f"integer formats have 2..16 bits, got {name}")
        return NumberFormat(f"int{name}", name)
    if isinstance(name, str) and name not in _FORMATS and name.startswith("int") and name[3:].isdigit():
        return get_format(int(name[3:]))
    if name not in _FORMATS:
        raise ValueError(f"unknown number format {name!r}; accepted: {', '.join(_FORMATS)}")
    return _FORMATS[name]


_FORMATS = {"int8": NumberFormat("int8", 8), "int4": NumberFormat("int4", 4),
            "fp8": NumberFormat("fp8", 8, is_float=True)}
