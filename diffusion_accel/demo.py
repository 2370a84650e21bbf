"""``diffusion-accel demo``: calibrate and measure the bundled reference pipeline end to end.

1. One trajectory-calibration pass: per-step activation ranges of every eligible layer and the
   step-to-step feature change of every block (what timestep-aware PTQ and caching build on).
2. ``evaluate`` of the pipeline variants on identical seeds: the base (named by its dtype: fp32 by default), a
   bf16 copy, feature
   caching, W8A8 lowered to int8, structured OBS pruning (30% of attention heads and FFN neurons
   removed) and all three stacked, with CLIP score (bundled
   CLIP), PSNR/SSIM against the base, latency and FLOPs.
3. A report (JSON + Markdown), a comparison grid and the calibration summary under ``out``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch

from . import prompts as prompt_sets
from .arch import find_denoiser, get_adapter
from .artifact import applied_techniques
from .loading import default_demo_spec, float32_pixel_outputs, load_pipeline, loaded_as

VariantBuilder = Callable[[Any, Any], Any]  # (base pipeline, Calibration) -> accelerated copy


def bf16_variant(pipe: Any, calib: Any) -> Any:
    """A bf16 copy of the pipeline (bf16 matmuls are ~4x faster than fp32 on AMX CPUs); a pixel-space one
    returns fp32 samples (``loading.float32_pixel_outputs``)."""
    variant = copy.deepcopy(pipe).to(torch.bfloat16)
    float32_pixel_outputs(variant)
    return variant


def cache_variant(pipe: Any, calib: Any) -> Any:
    """The pipeline's default cache (fashion-sd: DeepCache every 3rd step); needs no calibration (``calib``
    is taken for the variants' shared signature)."""
    from .cache import default_cache_config, enable_cache

    return enable_cache(copy.deepcopy(pipe), default_cache_config(pipe))


def w8a8_variant(pipe: Any, calib: Any) -> Any:
    """Timestep-aware W8A8 calibrated on the demo trajectory, lowered to int8 GEMMs."""
    from .quant import PTQConfig, quantize_

    return quantize_(copy.deepcopy(pipe), PTQConfig.preset("w8a8"), calib=calib)


def obs_variant(pipe: Any, calib: Any) -> Any:
    """One-shot structured OBS pruning: 30% of attention heads and FFN neurons physically removed
    (fewer FLOPs on every device; 2:4 sparsity needs GPU sparse kernels and on a model this small
    costs far more quality), log-decrease timestep weights."""
    from .prune import PruneConfig, prune_

    return prune_(copy.deepcopy(pipe), PruneConfig(method="obs", sparsity=0.3, pattern="structured"), calib=calib)


def stacked_variant(pipe: Any, calib: Any) -> Any:
    """All three stacked: structured OBS, then W8A8, then caching."""
    from .cache import default_cache_config, enable_cache

    return enable_cache(w8a8_variant(obs_variant(pipe, calib), calib), default_cache_config(pipe))


def demo_variants() -> dict[str, VariantBuilder]:
    """Variant name -> builder taking (base pipeline, calibration); each returns an accelerated copy."""
    return {"bf16": bf16_variant, "cache-every-3": cache_variant, "w8a8": w8a8_variant,
            "obs-structured-30%": obs_variant, "obs-structured+w8a8+cache": stacked_variant}


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def base_variant_name(pipe: Any) -> str:
    """The demo's name for the unaccelerated pipeline: its denoiser's dtype ("fp32", "bf16", ...); a variant of
    that name (the bf16 copy of a bf16 base) would repeat it and is left out."""
    dtype = next(find_denoiser(pipe)[1].parameters()).dtype
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def calibration_pass(pipe: Any, prompts: list, steps: int, seed: int,
                     call_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """One calibration pass that every variant reuses (stored trajectory for PTQ, settings for
    OBS sweeps), plus a summary: range drift across steps per layer, feature change per block."""
    from .calib import FeatureChangeProbe, RangeObserver, calibrate

    adapter = get_adapter(pipe)
    layers = adapter.eligible_layers()
    blocks = [block.name for block in adapter.blocks()]
    ranges = RangeObserver(layers, per_step=True)
    probe = FeatureChangeProbe.for_blocks(adapter)
    calib = calibrate(pipe, prompts, num_inference_steps=steps, collectors=[ranges, probe],
                      seed=seed, store_trajectory=True, progress=True, **call_kwargs)
    drift = {name: _range_drift(ranges.step_ranges(name)) for name in layers}
    change = {name: _mean(probe.mean_change(name)) for name in blocks}
    summary = {"family": adapter.family, "calibration": calib.summary().splitlines(),
               "layers": len(layers), "blocks": len(blocks),
               "max_range_drift": _top(drift, 5), "slowest_changing_blocks": _top(change, 5, lowest=True)}
    return calib, summary


def _range_drift(step_ranges: dict[int, tuple[float, float]]) -> float:
    """Ratio of the widest to the narrowest per-step activation range (1 = no drift)."""
    widths = [high - low for low, high in step_ranges.values() if high > low]
    return max(widths) / min(widths) if widths else 1.0


def _mean(per_step: dict[int, float]) -> float:
    return sum(per_step.values()) / len(per_step) if per_step else 0.0


def _top(values: dict[str, float], count: int, lowest: bool = False) -> dict[str, float]:
    ordered = sorted(values.items(), key=lambda item: item[1], reverse=not lowest)
    return {name: round(float(value), 4) for name, value in ordered[:count]}


def run_demo(spec: str | None = None, prompts: str | None = None, num_prompts: int | None = None,
             steps: int = 20, call_kwargs: dict[str, Any] | None = None, seed: int = 0,
             out: Path = Path("diffusion_accel_demo"), repeats: int = 3, dtype: str | None = None,
             device: str | None = None, variant: str | None = None) -> Any:
    """Run the demo (see module doc) and return the :class:`~diffusion_accel.eval.EvalReport`.

    ``call_kwargs``: further pipeline arguments (``guidance_scale``, ``height``, ...) for calibration
    and every variant, over the pipeline's own ``call_defaults``."""
    from .eval import evaluate
    from .eval.distributed import process_state

    check_demo_out(out)
    # before loading (a hub model: minutes); an empty --prompts / --pipe is refused as eval refuses it, not replaced
    # by the defaults (until session 48)
    given_prompts = prompt_sets.load(prompts, limit=num_prompts) if prompts is not None else None
    pipe = load_pipeline(default_demo_spec() if spec is None else spec, dtype=dtype, device=device, variant=variant)
    applied = applied_techniques(pipe)
    if applied:  # its replaced layers left the calibration no module to observe ("needs at least one module name")
        raise ValueError(f"the demo accelerates a base model, but {spec!r} already has {applied} applied: give the "
                         f"artifact's base instead (its manifest's base source)")
    prompt_list = given_prompts or prompt_sets.for_pipeline(pipe, limit=num_prompts)
    call_kwargs = dict(call_kwargs or {})
    base = base_variant_name(pipe)  # the base's own dtype: with --dtype bf16 it was labelled fp32
    calib, summary = calibration_pass(pipe, prompt_list, steps, seed, call_kwargs)
    summary |= {"loaded": loaded_as(pipe), "seed": seed}  # as calibrate records them (session 48)
    skipped = {base} | ({"bf16"} if base == "fp64" else set())  # fp64 noise: other values for the same seed
    variants = {base: pipe} | {name: build(pipe, calib) for name, build in demo_variants().items()
                               if name not in skipped}
    clip_folder = _demo_clip(variants)
    metrics = ("psnr", "ssim", "latency", "memory", "flops") + (("clip",) if clip_folder else ())
    report = evaluate(variants, prompt_list, metrics=metrics, num_inference_steps=steps, seed=seed,
                      clip_model=clip_folder, call_kwargs=call_kwargs, repeats=repeats)
    if clip_folder is None:
        report.notes.append("CLIP score skipped: the bundled fashion-clip judges only the Fashion-MNIST zoo "
                            "pipelines; score others with `diffusion-accel eval --metrics clip --clip-model ...`.")
    if base == "fp64":
        report.notes.append("No bf16 variant: diffusers draws other starting noise in float64 than in float32 / "
                            "bf16 for the same seed, so its PSNR would compare different images.")
    if process_state().is_main_process:  # under a launcher every process holds the report: one writes it
        # the calibration summary is staged with the report it belongs to: written first, an interrupted run left
        # a new calibration.json beside the previous run's report (session 31); written after, the new report
        # beside the previous run's calibration.json (session 48)
        report.save(out, extra_files={"calibration.json": json.dumps(summary, indent=2, default=str)})
    return report


OTHER_COMMANDS_FILES = ("manifest.json", "statistics.safetensors")  # calibrate's: its calibration.json goes with them


def check_demo_out(out: Path) -> None:
    """ValueError when ``out`` holds an artifact or statistics of ``calibrate``: the demo's calibration.json
    replaced theirs (how they were made, which build_artifacts.py reads), silently."""
    from .eval.report import report_folder_problem

    taken = [name for name in OTHER_COMMANDS_FILES if (Path(out) / name).is_file()]
    if taken:
        raise ValueError(f"--out {str(out)!r} holds {taken[0]} from diffusion-accel calibrate: the demo's "
                         f"calibration.json would replace the one beside it; write the demo to another folder")
    problem = report_folder_problem(out, extra_names=("calibration.json",))  # report-named folders: found after
    if problem is not None:                                                 # the whole demo (until s46 / s48)
        raise ValueError(f"--out {problem}")


def _demo_clip(variants: dict[str, Any]) -> str | None:
    """The bundled fashion-clip when every variant comes from the Fashion-MNIST zoo, else None: the demo
    stays offline, and a 32-px garment CLIP scored every other pipeline 0 (until session 27)."""
    from .eval.clip_score import DEFAULT_CLIP_MODEL
    from .eval.evaluate import default_clip_model

    clip_model = default_clip_model(variants)
    return None if clip_model == DEFAULT_CLIP_MODEL else clip_model
