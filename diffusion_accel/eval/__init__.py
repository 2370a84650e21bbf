"""Measurement: FID, CLIP score, PSNR/SSIM vs the base pipeline, latency, memory, FLOPs, grids.

``evaluate({name: pipe}, prompts, metrics=...)`` runs everything and returns an
:class:`EvalReport`; the building blocks are importable on their own.
"""

from .clip_score import DEFAULT_CLIP_MODEL, clip_metric, clip_score
from .cost import FlopStats, SizeStats, count_flops, denoiser_flops, model_size, parameter_count
from .distributed import gather, merge_ordered, shard
from .evaluate import DEFAULT_METRICS, evaluate
from .fid import (FIDStats, compute_fid_stats, fid_feature_extractor, fid_metric, fid_to_reference,
                  frechet_distance, reference_stats)
from .fidelity import FidelityResult, fidelity
from .grid import grid_size, make_grid, save_grid
from .images import to_pil, to_uint8
from .inception import TFInceptionFeatures, find_tf_inception
from .machine import machine_info
from .memory import MemoryStats, measure_peak_memory
from .pipes import ImageJob, compile_denoiser, default_prompt_to_kwargs, denoiser_of, generate_images, make_jobs
from .report import EvalReport
from .timing import LatencyStats, PipelineTiming, time_callable, time_pipeline, time_pipelines

__all__ = [
    "DEFAULT_CLIP_MODEL", "DEFAULT_METRICS", "EvalReport", "FIDStats", "FidelityResult", "FlopStats",
    "ImageJob", "LatencyStats", "MemoryStats", "PipelineTiming", "SizeStats", "TFInceptionFeatures",
    "clip_metric", "clip_score", "compile_denoiser", "compute_fid_stats", "count_flops", "default_prompt_to_kwargs",
    "denoiser_flops", "denoiser_of", "evaluate", "fid_feature_extractor", "fid_metric", "fid_to_reference",
    "fidelity", "find_tf_inception", "frechet_distance", "gather", "generate_images", "grid_size",
    "machine_info", "make_grid", "make_jobs", "measure_peak_memory", "merge_ordered", "model_size",
    "parameter_count", "reference_stats", "save_grid", "shard", "time_callable", "time_pipeline",
    "time_pipelines", "to_pil", "to_uint8",
]
