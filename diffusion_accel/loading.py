"""Turn a pipeline spec string into a diffusers pipeline (CLI, benchmarks, demo).

Specs: ``zoo:NAME`` (a bundled reference pipeline), ``tiny:FAMILY`` (a tiny random pipeline built
from config), a local ``save_pretrained`` folder, or a Hugging Face hub id (needs internet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map "fp32"/"bf16"/"fp16" (or a torch.dtype, or None) to a torch.dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def load_pipeline(spec: str, dtype: str | torch.dtype | None = None, device: str | None = None) -> Any:
    """Load the pipeline named by ``spec`` (see module docstring), optionally cast and moved."""
    torch_dtype = parse_dtype(dtype)
    pipe = _load_by_kind(spec, torch_dtype)
    if torch_dtype is not None and getattr(pipe, "dtype", None) != torch_dtype:
        pipe.to(dtype=torch_dtype)
    if device is not None:
        pipe.to(device)
    return pipe


def _load_by_kind(spec: str, torch_dtype: torch.dtype | None) -> Any:
    if spec.startswith("zoo:"):
        from . import zoo

        return zoo.load(spec[4:])
    if spec.startswith("tiny:"):
        from .testing.tiny import build_tiny

        return build_tiny(spec[5:])
    from diffusers import DiffusionPipeline

    if Path(spec).is_dir():
        return DiffusionPipeline.from_pretrained(spec, torch_dtype=torch_dtype or torch.float32)
    if "/" not in spec:
        raise ValueError(f"unknown pipeline spec {spec!r}; accepted: zoo:NAME, tiny:FAMILY, "
                         "a local save_pretrained folder, or a hub id like 'org/model'")
    return DiffusionPipeline.from_pretrained(spec, torch_dtype=torch_dtype or torch.float32)


def default_demo_spec() -> str:
    """The demo's pipeline: the bundled ``fashion-sd`` if shipped, else the tiny SD pipeline."""
    from . import zoo

    try:
        zoo.path("fashion-sd")
    except FileNotFoundError:
        return "tiny:sd"
    return "zoo:fashion-sd"
