"""Peak memory of one call: CUDA allocator peak on GPU, process peak RSS on CPU.

On Linux the process high-water mark is reset by writing "5" to ``/proc/self/clear_refs`` and read
back as ``VmHWM`` from ``/proc/self/status``, so the figure covers this call only (it includes
everything resident at the start: weights, other pipelines). Free heap pages are returned to the
OS first (``malloc_trim``) so that reused free memory does not hide the call's own allocations. Where that is impossible, the
lifetime peak from ``getrusage`` is reported and labelled as such (macOS), and where even that is missing (Windows has
no ``resource`` module) the memory is reported as not measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class MemoryStats:
    """``peak_bytes`` during the call, ``start_bytes`` before it, and how they were measured."""

    peak_bytes: int
    start_bytes: int
    kind: str  # "cuda_max_allocated", "process_peak_rss", "process_peak_rss_lifetime" or "unavailable"

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2 ** 20

    @property
    def added_bytes(self) -> int:
        """Peak minus the level at the start: what the call itself needed on top."""
        return self.peak_bytes - self.start_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"peak_mib": self.peak_mib}


def _status_bytes(field_name: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes, or None where unavailable."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process peak RSS to the current RSS (Linux); False where not supported."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def release_free_memory() -> None:
    """Collect garbage and return glibc's free heap pages to the OS (best effort).

    Otherwise garbage freed during the measured call, or allocations served from already-resident
    free heap memory, hide what the call needs.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # no glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_peak(fn: Callable[[], Any]) -> MemoryStats:
    release_free_memory()
    resettable = reset_peak_rss()
    start = _status_bytes("VmRSS") or 0
    fn()
    if resettable:
        return MemoryStats(_status_bytes("VmHWM") or 0, start, "process_peak_rss")
    lifetime = lifetime_peak_rss()
    if lifetime is None:
        return MemoryStats(0, start, "unavailable")
    return MemoryStats(lifetime, start, "process_peak_rss_lifetime")


def lifetime_peak_rss() -> int | None:
    """The process's lifetime peak resident memory in bytes (``getrusage``: KiB on Linux, bytes on macOS), or
    None without the ``resource`` module (Windows; importing it there made every evaluation fail)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> MemoryStats:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return MemoryStats(torch.cuda.max_memory_allocated(device), start, "cuda_max_allocated")


def measure_peak_memory(fn: Callable[[], Any], device: Any = None) -> MemoryStats:
    """Peak memory while running ``fn()`` on ``device`` (CUDA allocator, else process RSS)."""
    resolved = torch.device(device) if device is not None else torch.device("cpu")
    if resolved.type == "cuda":
        return _cuda_peak(fn, resolved)
    return _cpu_peak(fn)
