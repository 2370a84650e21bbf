"""diffusion_accel: make diffusers pipelines faster and smaller without retraining, measured.

Public API (the in-place functions ``quantize_`` / ``prune_`` / ``enable_cache`` / ``remove_cache`` and
``load`` return the pipeline they were given):

- ``calibrate(pipe, prompts, num_inference_steps, collectors=...)``: one trajectory pass
- ``evaluate({name: pipe}, prompts, metrics=...)``: FID / CLIP / PSNR / SSIM / latency table (an ``EvalReport``:
  ``save(dir)``, ``EvalReport.load(dir)``)
- ``save(pipe, dir)`` / ``load(base_pipe, dir)``: safetensors + JSON manifest artifacts
- ``enable_cache(pipe, DeepCacheConfig(...))`` / ``remove_cache(pipe)``: feature caching
- ``quantize_(pipe, PTQConfig.preset("w8a8"), calib=...)``: timestep-aware PTQ, lowered to int8
- ``prune_(pipe, PruneConfig(method="obs", sparsity=0.5, pattern="2:4"), calib=...)``: OBS pruning
- ``get_adapter(pipe)``: what a model family looks like (blocks, layer groups, heads, skips)
- ``zoo.load(name)`` / ``zoo.path(name)``: bundled reference pipelines; ``prompts.load(name)``
- ``call_defaults(pipe)``: the keyword arguments a pipeline is meant to be called with (zoo pipelines')
"""

from __future__ import annotations

import importlib
from typing import Any

from . import prompts
from .arch import UnsupportedModelError, get_adapter, supported_denoisers
from .artifact import ArtifactError, load, save

__version__ = "0.1.0"

# Imported on first use: they pull in torchmetrics / training code that a plain import needn't.
_LAZY_ATTRIBUTES = {
    "calibrate": ("diffusion_accel.calib", "calibrate"),
    "Calibration": ("diffusion_accel.calib", "Calibration"),
    "evaluate": ("diffusion_accel.eval", "evaluate"),
    "EvalReport": ("diffusion_accel.eval", "EvalReport"),
    "load_pipeline": ("diffusion_accel.loading", "load_pipeline"),
    "call_defaults": ("diffusion_accel.pipeline_defaults", "call_defaults"),
    # feature caching (issue 6)
    "enable_cache": ("diffusion_accel.cache", "enable_cache"),
    "remove_cache": ("diffusion_accel.cache", "remove_cache"),
    "cache_summary": ("diffusion_accel.cache", "summary"),
    "default_cache_config": ("diffusion_accel.cache", "default_cache_config"),
    "DeepCacheConfig": ("diffusion_accel.cache", "DeepCacheConfig"),
    "BlockCacheConfig": ("diffusion_accel.cache", "BlockCacheConfig"),
    "DeltaCacheConfig": ("diffusion_accel.cache", "DeltaCacheConfig"),
    "EncoderPropagationConfig": ("diffusion_accel.cache", "EncoderPropagationConfig"),
    "FirstBlockCacheConfig": ("diffusion_accel.cache", "FirstBlockCacheConfig"),
    "TeaCacheConfig": ("diffusion_accel.cache", "TeaCacheConfig"),
    "CalibratedCacheConfig": ("diffusion_accel.cache", "CalibratedCacheConfig"),
    "calibrate_schedule": ("diffusion_accel.cache", "calibrate_schedule"),
    "RouterCacheConfig": ("diffusion_accel.cache", "RouterCacheConfig"),
    "learn_router": ("diffusion_accel.cache", "learn_router"),
    "fit_teacache_coefficients": ("diffusion_accel.cache", "fit_teacache_coefficients"),
    # timestep-aware post-training quantization (issue 4)
    "quantize_": ("diffusion_accel.quant", "quantize_"),
    "PTQConfig": ("diffusion_accel.quant", "PTQConfig"),
    "lower_": ("diffusion_accel.quant", "lower_"),
    "quant_summary": ("diffusion_accel.quant", "summary"),
    # one-shot OBS pruning (issue 5)
    "prune_": ("diffusion_accel.prune", "prune_"),
    "PruneConfig": ("diffusion_accel.prune", "PruneConfig"),
    "prune_report": ("diffusion_accel.prune", "prune_report"),
    "PruneReport": ("diffusion_accel.prune", "PruneReport"),
}
_LAZY_MODULES = ("calib", "eval", "zoo", "hooks", "arch", "testing", "loading", "cache", "prune", "quant")

__all__ = ["ArtifactError", "UnsupportedModelError", "get_adapter", "load", "prompts", "save",
           "supported_denoisers", *_LAZY_ATTRIBUTES, *_LAZY_MODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        module_name, attribute = _LAZY_ATTRIBUTES[name]
        return getattr(importlib.import_module(module_name), attribute)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"diffusion_accel.{name}")
    raise AttributeError(f"module 'diffusion_accel' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too (``dir(da)`` and tab completion listed only what was already imported)."""
    return sorted(set(globals()) | set(__all__))
