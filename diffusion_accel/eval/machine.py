"""Where a measurement ran: device, CPU model, threads, library versions, dtype, compilation."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..quant.onednn import cpu_capabilities
from ..uncompiled import is_compiled
from .pipes import denoiser_of

LIBRARIES = ("torch", "diffusers", "transformers", "torchmetrics", "accelerate")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    with contextlib.suppress(OSError):  # not Linux: fall back to platform
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


SPEED_FEATURES = ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_features() -> str:
    """The CPU's instruction sets that decide low-precision speed (int8 VNNI/AMX, bf16), space-separated.

    An AVX2-only CPU has no int8 dot-product units and emulates bf16, so its speed rows differ in kind.
    """
    capabilities = cpu_capabilities()
    return " ".join(name for name in SPEED_FEATURES if capabilities.get(name)) or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: Any = None) -> str:
    """Human-readable accelerator name (e.g. "NVIDIA H100 80GB HBM3") or "cpu"."""
    resolved = torch.device(device) if device is not None else torch.device("cpu")
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    return resolved.type


def machine_info(device: Any = None) -> dict[str, Any]:
    """Device, CPU model and speed-relevant features, core and thread counts, Python/platform and library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": device_name(device), "cpu_model": cpu_model(), "cpu_features": cpu_features(),
            "cpu_cores_available": cores,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "cuda_available": torch.cuda.is_available(),
            **{f"{name}_version": _version(name) for name in LIBRARIES}}


def denoiser_runtime(pipe: Any) -> dict[str, Any]:
    """Device, dtype and compilation state of the pipeline's denoiser (compiled: whole, or in regions)."""
    denoiser = denoiser_of(pipe)
    parameter = next(denoiser.parameters(), None)
    return {"denoiser_class": type(getattr(denoiser, "_orig_mod", denoiser)).__name__,
            "device": str(parameter.device) if parameter is not None else "cpu",
            "dtype": str(parameter.dtype).replace("torch.", "") if parameter is not None else "unknown",
            "compiled": any(is_compiled(module) for module in denoiser.modules())}


def machine_summary(machine: dict[str, Any] | str) -> str:
    """One line naming the machine of a ``machine_info()`` record (or an older record's plain string), for
    benchmark Markdown: every result names its machine."""
    if isinstance(machine, str):
        return machine
    parts = [str(machine.get("device", "cpu")), str(machine.get("cpu_model", "unknown CPU"))]
    if machine.get("cpu_features"):
        parts.append(f"features {machine['cpu_features']}")
    if machine.get("cpu_cores_available"):
        parts.append(f"{machine['cpu_cores_available']} cores available")
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} torch thread(s)")
    return ", ".join(parts)
