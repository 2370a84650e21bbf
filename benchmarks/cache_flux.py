"""Feature caching on fashion-flux (issue #6, Flux half): our caches vs diffusers' cache hooks and cache-dit.

fashion-flux, 28 steps, true CFG 3.0 (the transformer runs twice per step, "cond" and "uncond"). Peers:
diffusers 0.42 FirstBlockCache, TaylorSeer, MagCache, FasterCache and PyramidAttentionBroadcast hooks
(``pipe.transformer.enable_cache(config)``) and cache-dit (DBCache, with and without its TaylorSeer
calibrator). Ours: First-Block-Cache, TeaCache (coefficients fitted here), static block cache (FORA),
the calibrated schedule (and Delta-DiT when ``diffusion_accel.cache`` has it).

Three phases, all in one process (results resume from ``--out``):

1. calibration on 4 calibration prompts drawn with their own seed (never the benchmark prompts' seeds):
   TeaCache coefficients, MagCache magnitude ratios (its documented ``calibrate=True`` pass) and, after
   the probe, our calibrated schedule for the chosen number of full steps;
2. probe: every method's candidate settings are timed round-robin against a freshly loaded baseline
   on ``--probe-prompts`` prompts (process CPU time, which other jobs on this shared 2-core machine
   disturb far less than wall time; wall time is recorded too) and scored by the relative L2 error of the final latents vs the
   uncached ones on the calibration prompts; per method the candidate with the lowest calibration
   error among those reaching ``--target`` x (1 + ``--margin``) speed-up is chosen (the fastest one
   when none does, reported as such);
3. quality (``ZooBench``: FID, CLIP, class accuracy, PSNR/SSIM vs the uncached images, same prompts and
   seeds) of every chosen setting at ``--n`` images, then a final round-robin timing of all of them
   on ``--timing-prompts`` prompts: wall clock with the harness' ``time_variants`` (the table's
   speed-up column) and process CPU time (used for the comparisons in the findings).

    python benchmarks/cache_flux.py --n 2000 --timing-prompts 50 --threads 1

Development: ``--n 40 --out /tmp/cache_flux_dev.json --methods ours-fbc diffusers-fbc``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_options import COUNT, report_path  # noqa: E402

import diffusion_accel.cache as dcache  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from diffusion_accel import zoo  # noqa: E402
from diffusion_accel.cache import (BlockCacheConfig, CalibratedCacheConfig, FirstBlockCacheConfig,  # noqa: E402
                                   TeaCacheConfig, calibrate_schedule, enable_cache, fit_teacache_coefficients,
                                   summary)
from diffusion_accel.cache.calibrated import evenly_spaced_steps  # noqa: E402
from diffusion_accel.zoo.captions import TEMPLATES, caption  # noqa: E402

from zoo_harness import RESULTS, Variant, ZooBench, made_by, markdown_table, time_variants  # noqa: E402
from zoo_quality import DEFAULTS, prompts_for  # noqa: E402

diffusers_logging.disable_progress_bar()  # the many pipeline loads would flood the log
MODEL = "fashion-flux"
STEPS = DEFAULTS[MODEL]["num_inference_steps"]
CALL = dict(DEFAULTS[MODEL])
CALIB_SEED = 7919  # calibration prompts and noise: disjoint from the benchmark (seed 0) and probe seeds
PROBE_SEED = 4242

# ----------------------------------------------------------------------------------------------------
# Settings: every builder takes (pipe, setting, calibration) and enables the cache on ``pipe``.
# ----------------------------------------------------------------------------------------------------


def _timestep_callback(pipe: Any) -> Callable[[], Any]:
    return lambda: pipe.current_timestep


def _diffusers_fbc(pipe: Any, s: dict, cal: dict) -> None:
    from diffusers.hooks import FirstBlockCacheConfig as Config

    pipe.transformer.enable_cache(Config(threshold=s["threshold"]))


def _diffusers_taylorseer(pipe: Any, s: dict, cal: dict) -> None:
    from diffusers.hooks import TaylorSeerCacheConfig as Config

    pipe.transformer.enable_cache(Config(cache_interval=s["cache_interval"],
                                         disable_cache_before_step=s["disable_cache_before_step"],
                                         max_order=s["max_order"], use_lite_mode=s["use_lite_mode"],
                                         taylor_factors_dtype=torch.float32))


def _diffusers_magcache(pipe: Any, s: dict, cal: dict) -> None:
    from diffusers.hooks import MagCacheConfig as Config

    pipe.transformer.enable_cache(Config(threshold=s["threshold"], max_skip_steps=s["max_skip_steps"],
                                         retention_ratio=s["retention_ratio"], num_inference_steps=STEPS,
                                         mag_ratios=torch.tensor(cal["magcache_ratios"])))


def _diffusers_fastercache(pipe: Any, s: dict, cal: dict) -> None:
    from diffusers.hooks import FasterCacheConfig as Config

    # Flux runs cond and uncond as two separate transformer calls, so FasterCache's CFG-Cache (which
    # splits a batch-concatenated uncond/cond input) cannot apply: diffusers' own Flux test enables it
    # with is_guidance_distilled=True, leaving the attention-output extrapolation (weight 0.5).
    pipe.transformer.enable_cache(Config(
        spatial_attention_block_skip_range=s["spatial_attention_block_skip_range"],
        spatial_attention_timestep_skip_range=tuple(s["spatial_attention_timestep_skip_range"]),
        attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
        current_timestep_callback=_timestep_callback(pipe), tensor_format="BCHW"))


def _diffusers_pab(pipe: Any, s: dict, cal: dict) -> None:
    from diffusers.hooks import PyramidAttentionBroadcastConfig as Config

    pipe.transformer.enable_cache(Config(
        spatial_attention_block_skip_range=s["spatial_attention_block_skip_range"],
        spatial_attention_timestep_skip_range=tuple(s["spatial_attention_timestep_skip_range"]),
        current_timestep_callback=_timestep_callback(pipe)))


def _cache_dit(pipe: Any, s: dict, cal: dict) -> None:
    import cache_dit
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=s["taylorseer_order"]) if s.get("taylorseer_order") else None
    # cache-dit wraps ``type(pipe).__call__`` (class level), which would route every FluxPipeline of this
    # process (baseline and other methods included) through its per-call wrapper; a private subclass of
    # the same name confines it to this pipeline.
    pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {})
    cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(
        Fn_compute_blocks=s["Fn"], Bn_compute_blocks=s["Bn"], residual_diff_threshold=s["threshold"],
        max_warmup_steps=s["max_warmup_steps"], enable_separate_cfg=True, num_inference_steps=STEPS),
        calibrator_config=calibrator)


def _ours_fbc(pipe: Any, s: dict, cal: dict) -> None:
    enable_cache(pipe, FirstBlockCacheConfig(threshold=s["threshold"]))


def _ours_teacache(pipe: Any, s: dict, cal: dict) -> None:
    enable_cache(pipe, TeaCacheConfig(threshold=s["threshold"], coefficients=tuple(cal["teacache_coefficients"])))


def _ours_block(pipe: Any, s: dict, cal: dict) -> None:
    enable_cache(pipe, BlockCacheConfig(interval=s["interval"]))


def _ours_calibrated(pipe: Any, s: dict, cal: dict, forecast: int = 0, forecast_target: str = "residual") -> None:
    steps = s.get("full_steps") or sorted(evenly_spaced_steps(STEPS, s["full_count"]))
    enable_cache(pipe, CalibratedCacheConfig(tuple(steps), STEPS, budget=s["full_count"] / STEPS, forecast=forecast,
                                             forecast_target=forecast_target))


def _ours_calibrated_forecast(pipe: Any, s: dict, cal: dict) -> None:
    _ours_calibrated(pipe, s, cal, forecast=1)


def _ours_calibrated_output(pipe: Any, s: dict, cal: dict) -> None:
    _ours_calibrated(pipe, s, cal, forecast=1, forecast_target="output")


def _ours_delta(pipe: Any, s: dict, cal: dict) -> None:
    enable_cache(pipe, dcache.DeltaCacheConfig(**s))


def _grid(**axes: Any) -> list[dict]:
    """Cartesian product of the axes, the first axis varying slowest."""
    out = [{}]
    for key, values in axes.items():
        out = [{**o, key: v} for o in out for v in values]
    return out


def delta_candidates() -> list[dict]:
    """Candidate settings of our Delta-DiT cache (only when the config exists and has an interval)."""
    config = getattr(dcache, "DeltaCacheConfig", None)
    if config is None:
        return []
    fields = getattr(config, "__dataclass_fields__", {})
    if "interval" not in fields:
        return []
    if "cached_fraction" not in fields:
        return [{"interval": i} for i in (2, 3, 4)]
    # 6 blocks: 4/6 and 5/6 of them bypassed between full steps (1.0 would be FORA, i.e. ours-blockcache)
    return _grid(interval=[2, 3, 4, 5], cached_fraction=[0.67, 0.83])


MAG_THRESHOLDS = [0.06, 0.12, 0.24, 0.5, 1.0]
METHODS: dict[str, dict[str, Any]] = {
    # label: group, builder, candidate settings (conservative → aggressive), description
    "diffusers-fbc": {"group": "peer", "build": _diffusers_fbc,
                      "grid": _grid(threshold=[0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4]),
                      "name": "diffusers FirstBlockCache"},
    "diffusers-taylorseer": {"group": "peer", "build": _diffusers_taylorseer,
                             "grid": _grid(use_lite_mode=[False, True], cache_interval=[2, 3, 4, 5, 6],
                                           disable_cache_before_step=[3], max_order=[1]),
                             "name": "diffusers TaylorSeer (attention outputs; lite = proj_out only)"},
    "diffusers-magcache": {"group": "peer", "build": _diffusers_magcache,
                           "grid": (_grid(retention_ratio=[0.2], max_skip_steps=[3], threshold=MAG_THRESHOLDS)
                                    + _grid(retention_ratio=[0.1], max_skip_steps=[4], threshold=MAG_THRESHOLDS)),
                           "name": "diffusers MagCache (ratios calibrated here)"},
    "diffusers-fastercache": {"group": "peer", "build": _diffusers_fastercache,
                              "grid": _grid(spatial_attention_timestep_skip_range=[[-1, 681], [-1, 999]],
                                            spatial_attention_block_skip_range=[2, 3, 4, 6]),
                              "name": "diffusers FasterCache"},
    "diffusers-pab": {"group": "peer", "build": _diffusers_pab,
                      "grid": _grid(spatial_attention_timestep_skip_range=[[100, 800], [-1, 1001]],
                                    spatial_attention_block_skip_range=[2, 3, 4, 6]),
                      "name": "diffusers PyramidAttentionBroadcast"},
    "cache-dit-dbcache": {"group": "peer", "build": _cache_dit,
                          "grid": _grid(Fn=[1], Bn=[0], max_warmup_steps=[4, 2],
                                        threshold=[0.08, 0.12, 0.16, 0.24, 0.32, 0.48], taylorseer_order=[0]),
                          "name": "cache-dit DBCache F1B0"},
    "cache-dit-dbcache-taylorseer": {"group": "peer", "build": _cache_dit,
                                     "grid": _grid(Fn=[1], Bn=[0], max_warmup_steps=[4, 2],
                                                   threshold=[0.08, 0.12, 0.16, 0.24, 0.32, 0.48],
                                                   taylorseer_order=[1]),
                                     "name": "cache-dit DBCache F1B0 + TaylorSeer calibrator (order 1)"},
    "ours-fbc": {"group": "ours", "build": _ours_fbc,
                 "grid": _grid(threshold=[0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4]),
                 "name": "ours FirstBlockCacheConfig"},
    "ours-teacache": {"group": "ours", "build": _ours_teacache,
                      "grid": _grid(threshold=[0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2]),
                      "name": "ours TeaCacheConfig (coefficients fitted on the calibration prompts)"},
    "ours-blockcache": {"group": "ours", "build": _ours_block, "grid": _grid(interval=[2, 3, 4]),
                        "name": "ours BlockCacheConfig (FORA)"},
    "ours-calibrated": {"group": "ours", "build": _ours_calibrated, "schedule": {"forecast": 0},
                        "grid": _grid(full_count=[14, 13, 12, 11, 10, 9]),
                        "name": "ours calibrate_schedule (refine search; probe times evenly spaced schedules "
                                "with the same number of full steps)"},
    "ours-calibrated-forecast": {"group": "ours", "build": _ours_calibrated_forecast, "schedule": {"forecast": 1},
                                 "grid": _grid(full_count=[14, 13, 12, 11, 10, 9]),
                                 "name": "ours calibrate_schedule with forecast=1 (reused steps extrapolate the "
                                         "stack residual linearly from the last two full steps)"},
    "ours-calibrated-forecast-fast": {"group": "ours", "build": _ours_calibrated_forecast,
                                      "schedule": {"forecast": 1},
                                      "grid": _grid(full_count=[11, 10]),
                                      "name": "ours calibrate_schedule with forecast=1, fewer full steps (to match "
                                              "the fastest peers' speed-up)"},
    "ours-calibrated-forecast-11": {"group": "ours", "build": _ours_calibrated_forecast, "grid": _grid(full_count=[11]),
                                    "schedule": {"forecast": 1},
                                    "name": "ours calibrate_schedule with forecast=1 at 11 full steps per branch: the "
                                            "compute of diffusers TaylorSeer's chosen setting (3 warm-up steps, then "
                                            "every 3rd), for an equal-compute comparison"},
    "ours-calibrated-output-11": {"group": "ours", "build": _ours_calibrated_output, "grid": _grid(full_count=[11]),
                                  "schedule": {"forecast": 1, "forecast_target": "output"},
                                  "name": "ours calibrate_schedule with forecast=1, forecast_target='output' (reused "
                                          "steps extrapolate the final projection's output, as TaylorSeer's lite mode) "
                                          "at 11 full steps per branch (TaylorSeer's compute)"},
    "ours-calibrated-output-10": {"group": "ours", "build": _ours_calibrated_output, "grid": _grid(full_count=[10]),
                                  "schedule": {"forecast": 1, "forecast_target": "output"},
                                  "name": "ours calibrate_schedule with forecast=1, forecast_target='output' at 10 "
                                          "full steps per branch"},
    "ours-calibrated-output-11-c16": {"group": "ours", "build": _ours_calibrated_output, "grid": _grid(full_count=[11]),
                                      "schedule": {"forecast": 1, "forecast_target": "output"}, "schedule_prompts": 16,
                                      "name": "ours calibrate_schedule, output forecast, 11 full steps, schedule searched "
                                              "on 16 calibration prompts (4 over-fit; peers choose among <= 12 settings)"},
    "ours-calibrated-output-10-c16": {"group": "ours", "build": _ours_calibrated_output, "grid": _grid(full_count=[10]),
                                      "schedule": {"forecast": 1, "forecast_target": "output"}, "schedule_prompts": 16,
                                      "name": "ours calibrate_schedule, output forecast, 10 full steps, schedule searched "
                                              "on 16 calibration prompts"},
    "ours-delta": {"group": "ours", "build": _ours_delta, "grid": delta_candidates(),
                   "name": "ours DeltaCacheConfig (Delta-DiT)"},
}

CALIBRATED_METHODS = [m for m in METHODS if "schedule" in METHODS[m]]  # schedules searched after the probe

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def load_pipe() -> Any:
    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibration_prompts(count: int) -> list[str]:
    """``count`` captions of distinct classes (while possible) drawn with ``CALIB_SEED``."""
    rng = random.Random(CALIB_SEED)
    labels = rng.sample(range(10), min(count, 10)) + [rng.randrange(10) for _ in range(max(0, count - 10))]
    return [caption(lab, rng.randrange(len(TEMPLATES))) for lab in labels]


def calib_call_kwargs(pipe: Any) -> dict[str, Any]:
    """Extra pipeline kwargs for the library's calibration helpers: CALL minus the planned ones, plus the
    32x32 size (the planned calls leave height/width to the pipeline's default, 1024 for Flux).

    True CFG's ``negative_prompt=""`` comes from the zoo pipeline's call defaults, which the helpers apply
    (this benchmark passed the empty prompt's embeddings before the pipelines carried them, and FluxPipeline
    refuses both at once; the images are bit-identical either way, calls being one prompt each)."""
    extra = {k: v for k, v in CALL.items() if k not in ("num_inference_steps", "negative_prompt")}
    return {**extra, "height": 32, "width": 32}


@torch.no_grad()
def final_latents(pipe: Any, prompts: list[str]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(CALIB_SEED)
    return pipe(prompts, height=32, width=32, generator=gen, output_type="latent", **CALL).images.float()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of ||out - ref|| / ||ref||."""
    diff = (out - ref).flatten(1).norm(dim=1)
    return float((diff / ref.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def magcache_ratios(pipe: Any, prompts: list[str]) -> dict[str, Any]:
    """MagCache's documented calibration: one run with ``MagCacheConfig(calibrate=True)``; the ratios it
    prints at the end of every context's trajectory are captured (cond and uncond) and averaged."""
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    runs: list[list[float]] = []
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = None if registry is None else registry.get_hook(_MAG_CACHE_BLOCK_HOOK)
        if hook is not None and hook.is_tail:
            original = hook._advance_step

            def advance(state: Any, original: Callable = original, hook: Any = hook) -> None:
                if state.step_index + 1 >= hook.config.num_inference_steps:
                    runs.append([float(r) for r in state.calibration_ratios])
                original(state)

            hook._advance_step = advance
    with contextlib.redirect_stdout(io.StringIO()):
        final_latents(pipe, prompts)
    pipe.transformer.disable_cache()
    if not runs:
        raise RuntimeError("MagCache calibration produced no ratios")
    return {"magcache_ratios": [float(x) for x in np.mean(np.asarray(runs), axis=0)],
            "magcache_ratios_per_context": runs}


def calibrate(report: dict, calib: list[str]) -> dict:
    """TeaCache coefficients and MagCache ratios (cached in the report)."""
    cal = report.setdefault("calibration", {})
    cal.setdefault("prompts", calib)
    cal.setdefault("seed", CALIB_SEED)
    if "teacache_coefficients" not in cal:
        t0 = time.time()
        pipe = load_pipe()
        cal["teacache_coefficients"] = list(fit_teacache_coefficients(pipe, calib, num_inference_steps=STEPS,
                                                                      seed=CALIB_SEED, **calib_call_kwargs(pipe)))
        cal["teacache_fit_s"] = round(time.time() - t0, 1)
        print(f"TeaCache coefficients {cal['teacache_coefficients']} ({cal['teacache_fit_s']} s)", flush=True)
    if "magcache_ratios" not in cal:
        t0 = time.time()
        cal.update(magcache_ratios(load_pipe(), calib))
        cal["magcache_calibration_s"] = round(time.time() - t0, 1)
        print(f"MagCache ratios {np.round(cal['magcache_ratios'], 3).tolist()}", flush=True)
    return cal


def built(method: str, setting: dict, cal: dict) -> Any:
    pipe = load_pipe()
    METHODS[method]["build"](pipe, setting, cal)
    return pipe


def compute_info(pipe: Any, method: str) -> dict:
    """What the last call computed, where the method tells (ours: full/reused denoiser calls)."""
    if method.startswith("ours"):
        s = summary(pipe)
        if s.get("enabled"):
            return {"full_calls": s["full_calls"], "reused_calls": s["reused_calls"],
                    "block_compute_fraction": s["block_compute_fraction"]}
    if method.startswith("cache-dit"):
        with contextlib.suppress(Exception):
            import cache_dit
            with contextlib.redirect_stdout(io.StringIO()):
                stats = cache_dit.summary(pipe, details=False, logging=False)
            return {"cached_steps_cond": len(stats[0].cached_steps), "cached_steps_uncond": len(stats[0].cfg_cached_steps)}
    return {}


def time_round_robin(pipes: dict[str, Any], prompts: list[str], repeats: int) -> dict[str, dict]:
    """Wall and process-CPU time per call, round-robin after one warm-up round, medians; speed-ups vs the
    first entry. With one torch thread the CPU time is the work done, little affected by other jobs
    sharing the machine, while wall time is (the median of a few calls still moves by ±20 % here)."""
    def kwargs() -> dict:
        return {"prompt": prompts, "height": 32, "width": 32, "generator": torch.Generator().manual_seed(0), **CALL}

    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pipes}
    for round_index in range(repeats + 1):
        for name, pipe in pipes.items():
            wall, cpu = time.perf_counter(), time.process_time()
            pipe(**kwargs())
            if round_index:
                samples[name].append(((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3))
    med = {name: (float(np.median([w for w, _ in v])), float(np.median([c for _, c in v]))) for name, v in samples.items()}
    base = next(iter(med.values()))
    return {name: {"wall_ms": w, "cpu_ms": c, "speedup_wall": base[0] / w, "speedup_cpu": base[1] / c}
            for name, (w, c) in med.items()}


def probe_method(method: str, cal: dict, probe_prompts: list[str], calib: list[str], ref: torch.Tensor,
                 repeats: int) -> dict:
    """Time every candidate of ``method`` round-robin with a baseline; calibration-prompt error of each."""
    candidates: list[dict] = []
    pipes: dict[str, Any] = {"baseline": load_pipe()}
    for i, setting in enumerate(METHODS[method]["grid"]):
        entry: dict[str, Any] = {"setting": setting}
        try:
            pipe = built(method, setting, cal)
            entry["calib_rel_error"] = rel_error(final_latents(pipe, calib), ref)
            entry.update(compute_info(pipe, method))
            pipes[f"c{i}"] = pipe
        except Exception as exc:  # a setting the method refuses: recorded, not fatal
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        candidates.append(entry)
    t0 = time.time()
    timing = time_round_robin(pipes, probe_prompts, repeats) if len(pipes) > 1 else {}
    for i, entry in enumerate(candidates):
        if f"c{i}" in timing:
            t = timing[f"c{i}"]
            entry.update(speedup=t["speedup_cpu"], speedup_wall=t["speedup_wall"], cpu_ms=t["cpu_ms"], wall_ms=t["wall_ms"])
    for entry in candidates:
        print(f"  [{method}] {json.dumps(entry['setting'])}: speed-up {entry.get('speedup', float('nan')):.2f}x CPU "
              f"({entry.get('speedup_wall', float('nan')):.2f}x wall), calib err "
              f"{entry.get('calib_rel_error', float('nan')):.4f} {entry.get('error', '')}", flush=True)
    base = timing.get("baseline", {})
    return {"baseline_cpu_ms": base.get("cpu_ms"), "baseline_wall_ms": base.get("wall_ms"),
            "timing_s": round(time.time() - t0, 1), "candidates": candidates,
            "probe_prompts": len(probe_prompts), "probe_repeats": repeats}


PROBE_COUNTS = ("probe_prompts", "probe_repeats")


def stamp_probe_counts(report: dict) -> None:
    """Give kept probes made before they recorded their own counts those of the run that made them (the
    report's settings, which this run overwrites): the Markdown described every probe with the last run's."""
    previous = report.get("settings", {})
    for probe in report.get("probe", {}).values():
        for key in PROBE_COUNTS:
            if key not in probe and key in previous:
                probe[key] = previous[key]


def probe_counts_match(probe: dict, settings: dict) -> bool:
    """Whether a kept probe was timed with this run's prompts per call and repeats (unknown counts: kept)."""
    return all(probe.get(key, settings[key]) == settings[key] for key in PROBE_COUNTS)


def choose(probe: dict, threshold: float) -> dict | None:
    """Lowest calibration error among candidates at >= threshold speed-up, else the fastest."""
    ok = [c for c in probe["candidates"] if "speedup" in c and "calib_rel_error" in c]
    if not ok:
        return None
    fast = [c for c in ok if c["speedup"] >= threshold]
    pick = min(fast, key=lambda c: c["calib_rel_error"]) if fast else max(ok, key=lambda c: c["speedup"])
    return {"setting": pick["setting"], "probe_speedup": pick["speedup"], "calib_rel_error": pick["calib_rel_error"],
            "reached_target": bool(fast)}


def same_candidate(chosen: dict | None, pick: dict) -> bool:
    """Whether ``chosen`` (a report's choice, with the full steps a calibrated search added) is ``pick``'s candidate:
    a rerun with another --target or --margin must choose again from the kept probe, not keep the old choice."""
    def candidate(choice: dict) -> dict:
        return {key: value for key, value in choice["setting"].items() if key != "full_steps"}

    return chosen is not None and candidate(chosen) == candidate(pick)


def forget_other_calibration(report: dict, calib: list[str]) -> None:
    """Drop fits, probes, choices and their quality rows made on other calibration prompts (--calib-prompts changed):
    the report's settings name the new count, so they must not describe results of the old one."""
    recorded = report.get("calibration", {}).get("prompts")
    if recorded is None or recorded == calib:
        return
    print(f"other calibration prompts than the report's ({len(recorded)} -> {len(calib)}): fitting, probing and "
          f"choosing again", flush=True)
    for method in report.get("chosen", {}):
        report.get("variants", {}).pop(method, None)
    for key in ("calibration", "probe", "chosen"):
        report.pop(key, None)


def not_run_reason(method: str) -> str | None:
    if method.startswith("cache-dit"):
        try:
            import cache_dit  # noqa: F401
        except Exception as exc:  # not installed or incompatible
            return f"not run: cannot import cache_dit ({type(exc).__name__}: {exc})"
    if not METHODS[method]["grid"]:
        return "not run: diffusion_accel.cache has no DeltaCacheConfig" if method == "ours-delta" else "not run: no settings"
    return None


def finalize_calibrated(report: dict, calib: list[str], passes: int, method: str = "ours-calibrated") -> None:
    """Our calibrated schedule for the chosen number of full steps (refine search on the calibration prompts)."""
    schedule = METHODS[method]["schedule"]  # the forecast settings the schedule is searched with
    chosen = report.get("chosen", {}).get(method)
    if chosen is None or chosen["setting"].get("full_steps"):
        return
    count = chosen["setting"]["full_count"]
    t0 = time.time()
    pipe = load_pipe()
    count_prompts = METHODS[method].get("schedule_prompts")  # a larger search set, where the method names one
    search_prompts = calibration_prompts(count_prompts) if count_prompts else calib
    config = calibrate_schedule(pipe, search_prompts, budget=count / STEPS, num_inference_steps=STEPS, search="refine",
                                max_passes=passes, seed=CALIB_SEED, **schedule, **calib_call_kwargs(pipe))
    chosen["setting"] = {"full_count": count, "full_steps": list(config.full_steps)}
    chosen["calibration_s"] = round(time.time() - t0, 1)
    pipe = built(method, chosen["setting"], report["calibration"])
    chosen["calib_rel_error_calibrated"] = rel_error(final_latents(pipe, calib), final_latents(load_pipe(), calib))
    print(f"calibrated schedule ({count} full steps): {config.full_steps}, calib err "
          f"{chosen['calib_rel_error_calibrated']:.4f} (evenly spaced {chosen['calib_rel_error']:.4f}), "
          f"{chosen['calibration_s']} s", flush=True)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

CFG_NOTES = {
    "diffusers-fastercache": "state not per cache_context: counts cond and uncond calls as successive iterations, "
                             "so a skipped call extrapolates attention outputs across the two branches",
    "diffusers-pab": "state not per cache_context: a skipped uncond call reuses the cond call's attention output "
                     "(and vice versa)",
}


def settings_text(method: str, chosen: dict) -> str:
    s = {k: v for k, v in chosen["setting"].items() if k != "full_steps"}
    text = ", ".join(f"{k}={v}" for k, v in s.items())
    if "full_steps" in chosen["setting"]:
        text += f"; full steps {chosen['setting']['full_steps']}"
    return text


def final_speedups(report: dict) -> tuple[dict[str, float], str]:
    """Final speed-ups per variant: CPU time when measured, else wall; and which."""
    if report.get("timing_cpu"):
        return {k: v["speedup_cpu"] for k, v in report["timing_cpu"].items()}, "CPU time"
    return {k: v["speedup"] for k, v in report.get("timing", {}).items()}, "wall"


def findings(report: dict) -> str:
    """Per variant of ours: the issue's claim (lower FID and higher PSNR than every peer whose final
    speed-up is equal or lower), with every peer's numbers, faster peers included."""
    variants = report["variants"]
    speed, kind = final_speedups(report)
    ours = [m for m in report.get("chosen", {}) if METHODS[m]["group"] == "ours" and m in variants]
    peers = [m for m in report.get("chosen", {}) if METHODS[m]["group"] == "peer" and m in variants]
    lines = [f"Speed-ups are the final {kind} ones. ✓/✗: ours lower FID / higher PSNR than the peer."]
    for m in ours:
        s_ours, row = speed.get(m), variants[m]
        if s_ours is None:
            lines.append(f"- `{m}`: not timed.")
            continue
        fails, parts = [], []
        for p in peers:
            s_peer, prow = speed.get(p), variants[p]
            if s_peer is None:
                continue
            fid_ok, psnr_ok = row["fid"] < prow["fid"], row["psnr_vs_baseline"] > prow["psnr_vs_baseline"]
            counted = s_peer <= s_ours
            if counted and not (fid_ok and psnr_ok):
                fails.append(p)
            parts.append(f"{p} {s_peer:.2f}×{'' if counted else ' (faster, not counted)'}: FID "
                         f"{prow['fid']:.2f} {'✓' if fid_ok else '✗'}, PSNR {prow['psnr_vs_baseline']:.2f} "
                         f"{'✓' if psnr_ok else '✗'}")
        verdict = ("claim holds: lower FID and higher PSNR than every peer at equal or lower speed-up" if not fails
                   else "claim fails against " + ", ".join(f"`{p}`" for p in fails))
        lines.append(f"- `{m}` ({s_ours:.2f}×, FID {row['fid']:.2f}, PSNR {row['psnr_vs_baseline']:.2f}): {verdict}. "
                     + "; ".join(parts) + ".")
    same = identical_candidates(report)
    if same:
        lines += ["", "Identical final latents on the calibration prompts (same algorithm, same decisions): "
                  + "; ".join(" = ".join(group) for group in same) + "."]
    return "\n".join(lines)


def identical_candidates(report: dict) -> list[list[str]]:
    """Groups of probed settings of different methods whose calibration errors agree to 1e-7."""
    entries = [(m, c) for m, pr in report.get("probe", {}).items() for c in pr.get("candidates", [])
               if "calib_rel_error" in c]
    groups: list[list[tuple[str, dict]]] = []
    for m, c in sorted(entries, key=lambda e: e[1]["calib_rel_error"]):
        if groups and abs(groups[-1][-1][1]["calib_rel_error"] - c["calib_rel_error"]) < 1e-7:
            groups[-1].append((m, c))
        else:
            groups.append([(m, c)])
    return [[f"{m} ({settings_text(m, {'setting': c['setting']})})" for m, c in g]
            for g in groups if len({m for m, _ in g}) > 1]


def extra_markdown(report: dict) -> str:
    st = report["settings"]
    lines = ["## Settings", "",
             f"Target: ≥ {st['target']}× whole-pipeline speed-up (probe threshold "
             f"{st['target'] * (1 + st['margin']):.2f}×). Probe: each method's candidates timed round-robin with a "
             f"freshly loaded baseline on {st['probe_prompts']} prompts per call (median process CPU time of "
             f"{st['probe_repeats']} calls after 1 warm-up); per method the candidate with the lowest relative L2 error "
             f"of the final latents vs uncached on the {len(report['calibration']['prompts'])} calibration prompts "
             f"(seed {CALIB_SEED}, disjoint from the benchmark seeds) among those over the threshold.",
             "", "| variant | method | chosen setting | probe speed-up (CPU) | final speed-up (CPU / wall) "
                 "| calib. error | candidates | note |",
             "|---|---|---|---|---|---|---|---|"]
    for m, c in report.get("chosen", {}).items():
        wall = report.get("timing", {}).get(m, {}).get("speedup")
        cpu = report.get("timing_cpu", {}).get(m, {}).get("speedup_cpu")
        final = "" if wall is None or cpu is None else f"{cpu:.2f}× / {wall:.2f}×"
        n_cand = len(report["probe"].get(m, {}).get("candidates", []))
        note = [] if c["reached_target"] else [f"no setting reached {report['settings']['target']}×: fastest shown"]
        if m in CFG_NOTES:
            note.append(CFG_NOTES[m])
        probe = report["probe"].get(m, {})
        if not probe_counts_match(probe, st):
            note.append(f"probed on {probe['probe_prompts']} prompts per call, {probe['probe_repeats']} calls")
        lines.append(f"| {m} | {METHODS[m]['name']} | {settings_text(m, c)} | {c['probe_speedup']:.2f}× | "
                     f"{final} | {c.get('calib_rel_error_calibrated', c['calib_rel_error']):.4f} "
                     f"| {n_cand} | {'; '.join(note)} |")
    for m, reason in report.get("not_run", {}).items():
        lines.append(f"| {m} | {METHODS[m]['name']} | {reason} | | | | | |")
    t = report.get("timing_info")
    if t:
        lines += ["", f"Final timing: {t['prompts']} prompts per call, median of {t['repeats']} round-robin "
                      f"repeats after 1 warm-up, once by wall clock (`time_variants`, the table's speed-up column) and "
                      f"once by process CPU time; baseline {t['baseline_ms']:.0f} ms wall, {t['baseline_cpu_ms']:.0f} ms CPU "
                      f"per call; load average {t['load_average_before']} before, {t['load_average_after']} after on "
                      f"{report['machine']['cpu_cores_available'] if 'machine' in report else '?'} cores shared with other "
                      f"jobs, so wall-clock speed-ups are noisy and the comparisons below use CPU time."]
    lines += ["", "Calibration (TeaCache fit, MagCache ratios, our schedule) uses true CFG with the empty negative "
                  "prompt's embeddings; MagCache ratios are the mean of its cond and uncond calibration runs.",
              "", "## Findings", "", findings(report) or "(no quality results yet)"]
    short = [m for m, c in report.get("chosen", {}).items() if not c["reached_target"]]
    if short:
        lines += ["", "Peers that reach no 2× setting here (fastest probed setting benchmarked instead): "
                  + "; ".join(f"`{m}` {report['chosen'][m]['probe_speedup']:.2f}×" for m in short)
                  + ". PAB and FasterCache only skip attention modules (diffusers' defaults; their MLPs always run), and "
                    "attention is a minor share of this model's per-step work, which bounds their speed-up."]
    noted = [m for m in report.get("chosen", {}) if m in CFG_NOTES]
    if noted:
        lines += ["", "True CFG (separate cond/uncond transformer calls): " + "; ".join(
            f"`{m}`: {CFG_NOTES[m]}" for m in noted) + ". The other hooks keep per-context state "
            "(diffusers `cache_context`, cache-dit `enable_separate_cfg=True`, ours per context)."]
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if report.get("variants") and "config" in report:
        out.with_suffix(".md").write_text(markdown_table(report, "Feature caching on fashion-flux (28 steps, true CFG)",
                                                         extra_markdown(report)))


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=COUNT, default=2000, help="generated images per variant")
    p.add_argument("--timing-prompts", type=COUNT, default=50, help="prompts per call in the final timing")
    p.add_argument("--timing-repeats", type=COUNT, default=3)
    p.add_argument("--probe-prompts", type=COUNT, default=20, help="prompts per call in the speed probe")
    p.add_argument("--probe-repeats", type=COUNT, default=2)
    p.add_argument("--calib-prompts", type=COUNT, default=4)
    p.add_argument("--calib-passes", type=COUNT, default=2, help="max_passes of the refine search")
    p.add_argument("--target", type=float, default=2.0, help="required whole-pipeline speed-up")
    p.add_argument("--margin", type=float, default=0.03, help="probe must show target x (1 + margin)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--reprobe", action="store_true", help="probe again even if the report has a probe")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--only-timing", action="store_true", help="only the final timing (needs a probed report)")
    p.add_argument("--threads", type=COUNT, default=1)
    p.add_argument("--out", type=report_path, default=RESULTS / "cache_flux.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    # Calibration, probe and choices do not depend on --n: they are kept in --out across runs and merged
    # into ZooBench's report (built only for the quality phase, since it loads the FID reference).
    report: dict[str, Any] = {}
    if args.out.is_file():
        report = json.loads(args.out.read_text())
    report["command"] = "python benchmarks/cache_flux.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp_probe_counts(report)
    report["settings"] = {"target": args.target, "margin": args.margin, "probe_prompts": args.probe_prompts,
                          "probe_repeats": args.probe_repeats, "calib_prompts": args.calib_prompts,
                          "calib_passes": args.calib_passes, "timing_prompts": args.timing_prompts,
                          "timing_repeats": args.timing_repeats, "steps": STEPS}
    report.setdefault("variants", {})
    calib = calibration_prompts(args.calib_prompts)
    probe_prompts = prompts_for(args.probe_prompts, PROBE_SEED)[0]
    threshold = args.target * (1 + args.margin)

    forget_other_calibration(report, calib)
    report.setdefault("probe", {})
    report.setdefault("chosen", {})
    report.setdefault("not_run", {})
    if not args.only_timing:
        cal = calibrate(report, calib)
        write(report, args.out)
        ref = None
        for method in args.methods:
            reason = not_run_reason(method)
            if reason:
                report["not_run"][method] = reason
                print(f"{method}: {reason}", flush=True)
                continue
            report["not_run"].pop(method, None)
            probed = (method in report["probe"] and not args.reprobe and choose(report["probe"][method], threshold)
                      and probe_counts_match(report["probe"][method], report["settings"]))
            if not probed:
                if ref is None:
                    ref = final_latents(load_pipe(), calib)
                print(f"probe {method} ({len(METHODS[method]['grid'])} candidates)", flush=True)
                try:
                    report["probe"][method] = probe_method(method, cal, probe_prompts, calib, ref, args.probe_repeats)
                except Exception as exc:
                    report["not_run"][method] = f"not run: {type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    continue
            pick = choose(report["probe"][method], threshold)
            if pick is None:
                errors = dict.fromkeys(c.get("error", "no error recorded") for c in report["probe"][method]["candidates"])
                report["not_run"][method] = ("not run: every candidate failed: " + "; ".join(errors))[:500]
                report["chosen"].pop(method, None)
            elif probed and same_candidate(report["chosen"].get(method), pick):
                pass  # the kept probe picks what it picked before (a calibrated schedule stays searched)
            else:
                report["chosen"][method] = pick
                # a recomputed choice invalidates an old quality row of the same label
                report["variants"].pop(method, None)
            write(report, args.out)
        for method in CALIBRATED_METHODS:
            finalize_calibrated(report, calib, args.calib_passes, method)
        write(report, args.out)

    methods = [m for m in args.methods if m in report["chosen"]]
    if not args.skip_quality and not args.only_timing:
        bench = ZooBench(MODEL, args.n, args.out)
        report = {**bench.report, **{k: v for k, v in report.items() if k not in ("config", "machine", "variants",
                                                                                  "baseline_fingerprint")}}
        bench.report = report
        bench.run_baseline()
        for method in methods:
            chosen = report["chosen"][method]

            def build(method: str = method, chosen: dict = chosen) -> Any:
                pipe = built(method, chosen["setting"], report["calibration"])
                pipe._bench_info = {"setting": chosen["setting"], "probe_speedup": chosen["probe_speedup"]}
                return pipe

            try:
                bench.run(Variant(method, build, group=METHODS[method]["group"], note=METHODS[method]["name"]))
            except Exception as exc:
                report["not_run"][method] = f"quality run failed: {type(exc).__name__}: {exc}"
                traceback.print_exc()
            write(report, args.out)

    if not args.skip_timing:
        pipes = {"baseline": load_pipe(), **{m: built(m, report["chosen"][m]["setting"], report["calibration"])
                                              for m in methods}}
        prompts = prompts_for(args.timing_prompts, 0)[0]
        t0 = time.time()
        load_before = [round(x, 2) for x in os.getloadavg()]
        # the harness' wall-clock timing (with denoiser time), then a CPU-time pass (see time_round_robin)
        timing = time_variants(pipes, CALL, prompts, repeats=args.timing_repeats)
        cpu = time_round_robin(pipes, prompts, args.timing_repeats)
        report["timing"] = {**report.get("timing", {}),
                            **{name: {**row, "made_by": made_by(report["command"])} for name, row in timing.items()}}
        report["timing_cpu"] = {**report.get("timing_cpu", {}), **cpu}
        report["timing_info"] = {"prompts": args.timing_prompts, "repeats": args.timing_repeats,
                                 "baseline_ms": timing["baseline"]["pipeline_ms"],
                                 "baseline_cpu_ms": cpu["baseline"]["cpu_ms"], "timing_s": round(time.time() - t0, 1),
                                 "load_average_before": load_before,
                                 "load_average_after": [round(x, 2) for x in os.getloadavg()]}
        for name, t in timing.items():
            print(f"timing {name}: {t['pipeline_ms']:.0f} ms wall, {t['speedup']:.2f}x wall, "
                  f"{cpu[name]['speedup_cpu']:.2f}x CPU", flush=True)
        write(report, args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
