"""Feature caching on fashion-sd (issue #6): DeepCache vs the deepcache package, uniform vs calibrated
schedules, quality (FID / CLIP / PSNR vs uncached) at 2,000 images and whole-pipeline speed-up.

    python benchmarks/cache_sd.py                 # everything (resumes a killed run)
    python benchmarks/cache_sd.py --skip-quality  # parity + timing only

1. Parity: the ``deepcache`` package and ours at the same interval/branch, same seeds: max |Δ| of
   the final latents (target ≤ 1e-4).
2. Quality: uniform DeepCache at intervals 2-5, the non-uniform schedule, schedules calibrated
   (``calibrate_schedule``, refine search, on 8 captions drawn with seed 1000, noise seeded 1000 on; with 100
   captions the benchmark's 2,000 prompts hold them all, under other seeds) for
   the same numbers of full steps as the uniform ones, the same uniform and calibrated schedules with
   reuse steps filled by the linear forecast of the deep feature (``forecast=1``), and Faster
   Diffusion's encoder propagation.
3. Speed: every variant timed round-robin against the uncached pipeline on one batch of prompts.
A plot of speed-up vs FID is written next to the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from diffusion_accel import zoo
from diffusion_accel.artifact import base_fingerprint
from diffusion_accel.cache import (FASTER_DIFFUSION_KEY_STEPS, CalibratedCacheConfig, DeepCacheConfig,
                                   EncoderPropagationConfig, calibrate_schedule, enable_cache)
from diffusion_accel.cache.configs import config_to_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_options import COUNT, report_path  # noqa: E402
from zoo_harness import RESULTS, Variant, ZooBench, digest, made_by, markdown_table, time_variants  # noqa: E402
from zoo_quality import DEFAULTS, prompts_for  # noqa: E402

MODEL = "fashion-sd"
INTERVALS = (2, 3, 4, 5)
FORECAST_INTERVALS = (3, 4, 5, 6)
CALIBRATION_SEED = 1000  # calibration captions drawn, and their noise seeded, unlike the benchmark's (seed 0)


def parity(intervals: tuple[int, ...], n_prompts: int = 8) -> dict[str, float]:
    """Max |ours − deepcache package| of final latents per interval (branch 0, same seeds)."""
    from DeepCache import DeepCacheSDHelper

    prompts = prompts_for(n_prompts, CALIBRATION_SEED)[0]
    kwargs = {**DEFAULTS[MODEL], "height": 32, "width": 32, "output_type": "latent"}
    result = {}
    for interval in intervals:
        package_pipe, ours_pipe = zoo.load(MODEL), zoo.load(MODEL)
        helper = DeepCacheSDHelper(pipe=package_pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
        enable_cache(ours_pipe, DeepCacheConfig(interval=interval, branch=0))
        latents = [p(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
                   for p in (package_pipe, ours_pipe)]
        result[f"interval{interval}"] = float((latents[0] - latents[1]).abs().max())
    return result


def calibrated_config(full_steps: int, args: argparse.Namespace, forecast: int = 0) -> CalibratedCacheConfig:
    """A schedule with ``full_steps`` full steps of 50, calibrated on captions drawn with another seed than the
    benchmark's and noise seeded ``CALIBRATION_SEED`` on (until session 45 the search's default seed 0: its first
    sample was the benchmark's first image), searched with reuse steps filled as ``forecast`` says."""
    settings = [base_fingerprint(zoo.load(MODEL)), DEFAULTS[MODEL], args.calibration_prompts, args.max_passes]
    if forecast:  # keeps the digests of the plain-reuse schedules calibrated before forecasts existed
        settings.append({"forecast": forecast})
    settings.append({"calibration_seed": CALIBRATION_SEED})  # schedules searched at seed 0 are not reused
    path = args.cache_dir / f"cache_sd_schedule_{full_steps}_{digest(settings)}.json"
    if path.is_file():
        return CalibratedCacheConfig(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in json.loads(path.read_text())["params"].items()})
    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    steps = DEFAULTS[MODEL]["num_inference_steps"]
    config = calibrate_schedule(pipe, prompts_for(args.calibration_prompts, CALIBRATION_SEED)[0],
                                budget=full_steps / steps, num_inference_steps=steps, search="refine",
                                max_passes=args.max_passes, forecast=forecast, seed=CALIBRATION_SEED,
                                guidance_scale=DEFAULTS[MODEL]["guidance_scale"], height=32, width=32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(config)))
    return config


def cached_pipe(config: Any) -> Any:
    """A freshly loaded fashion-sd with ``config`` enabled."""
    pipe = zoo.load(MODEL)
    enable_cache(pipe, config)
    pipe._bench_info = {"cache_config": config_to_dict(config)}
    return pipe


def stacked_pipe(interval: int) -> Any:
    """30% structured OBS pruning, then our W8A8 (lowered), then DeepCache at ``interval``."""
    from diffusion_accel import PruneConfig, PTQConfig, prune_, quantize_

    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    calib = dict(calib_prompts=8, calib_guidance_scale=DEFAULTS[MODEL]["guidance_scale"])
    prune_(pipe, PruneConfig(sparsity=0.3, pattern="structured", calib_num_steps=50, **calib))
    quantize_(pipe, PTQConfig.preset("w8a8", act_method="mse", calib_num_steps=50, calib_steps="uniform:10",
                                     **{**calib, "calib_prompts": 16}))
    config = DeepCacheConfig(interval=interval, branch=0)
    enable_cache(pipe, config)
    pipe._bench_info = {"stack": "OBS structured 30% (heads + FFN) → W8A8 lowered → DeepCache",
                        "cache_config": config_to_dict(config)}
    return pipe


def variants(args: argparse.Namespace) -> list[Variant]:
    """Uniform DeepCache, non-uniform, and calibrated schedules with the uniform ones' full-step counts."""
    steps = DEFAULTS[MODEL]["num_inference_steps"]
    out = []
    for interval in INTERVALS:
        config = DeepCacheConfig(interval=interval, branch=0)
        out.append(Variant(f"deepcache_interval{interval}", lambda c=config: cached_pipe(c), "uniform",
                           f"{len(range(0, steps, interval))} full steps of {steps}"))
    for interval in FORECAST_INTERVALS:
        config = DeepCacheConfig(interval=interval, branch=0, forecast=1)
        out.append(Variant(f"deepcache_forecast_interval{interval}", lambda c=config: cached_pipe(c),
                           "uniform-forecast", f"{len(range(0, steps, interval))} full steps of {steps}, "
                           "reuse steps filled with the linear forecast of the deep feature"))
    for interval in (3, 5):
        config = DeepCacheConfig(interval=interval, branch=0, schedule="non-uniform")
        out.append(Variant(f"deepcache_nonuniform{interval}", lambda c=config: cached_pipe(c), "non-uniform",
                           "DeepCache's non-uniform schedule (center 0.3, power 1.4)"))
    for interval in INTERVALS[1:]:
        full = len(range(0, steps, interval))
        out.append(Variant(f"calibrated_{full}of{steps}", lambda f=full: cached_pipe(calibrated_config(f, args)),
                           "calibrated", f"refine search, {args.calibration_prompts} calibration prompts, "
                           f"{args.max_passes} passes"))
    for interval in FORECAST_INTERVALS:
        full = len(range(0, steps, interval))
        out.append(Variant(f"calibrated_forecast_{full}of{steps}",
                           lambda f=full: cached_pipe(calibrated_config(f, args, forecast=1)), "calibrated-forecast",
                           f"refine search with forecast, {args.calibration_prompts} calibration prompts, "
                           f"{args.max_passes} passes"))
    for label, config in (("encoder_propagation_paper", EncoderPropagationConfig(
            key_steps=FASTER_DIFFUSION_KEY_STEPS, num_inference_steps=steps)),
                          ("encoder_propagation_interval2", EncoderPropagationConfig(interval=2))):
        out.append(Variant(label, lambda c=config: cached_pipe(c), "encoder-propagation",
                           "Faster Diffusion: encoder reused on non-key steps, decoder always runs"))
    out.append(Variant("stacked_prune30_w8a8_deepcache3", lambda: stacked_pipe(3), "stacked",
                       "structured 30% + W8A8 + DeepCache interval 3"))
    return out


def timing(selected: list[Variant], n_prompts: int, repeats: int) -> dict:
    """Round-robin whole-pipeline timing of the baseline and every variant on one batch."""
    pipes = {"baseline": zoo.load(MODEL), **{v.label: v.build() for v in selected}}
    return time_variants(pipes, DEFAULTS[MODEL], prompts_for(n_prompts, 7)[0], repeats=repeats)


def plot(report: dict, path: Path) -> None:
    """Speed-up vs FID and vs PSNR (to the uncached images) for the uniform, non-uniform and calibrated groups;
    skipped with a note where matplotlib is not installed (no dependency of the package: the run ended in an
    ImportError after its results were written)."""
    try:
        import matplotlib
    except ImportError:
        print(f"plot {path} skipped: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for metric, ax in zip(("fid", "psnr_vs_baseline"), axes):
        for group, marker in (("uniform", "o-"), ("non-uniform", "s"), ("calibrated", "^-"),
                              ("uniform-forecast", "o--"), ("calibrated-forecast", "^--")):
            rows = sorted((report["timing"][k]["speedup"], v[metric]) for k, v in report["variants"].items()
                          if v.get("group") == group and k in report.get("timing", {}))
            if rows:
                ax.plot(*zip(*rows), marker, label=group)
        ax.set_xlabel("whole-pipeline speed-up (×)")
    axes[0].axhline(report["variants"]["baseline"]["fid"], color="gray", ls="--", label="uncached")
    axes[0].set_ylabel(f"FID ({report['config']['n_generated']} generated vs test)")
    axes[1].set_ylabel("PSNR vs uncached images (dB)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=COUNT, default=2000)
    p.add_argument("--n-ref", type=COUNT, default=10000, help="test images for the FID reference statistics")
    p.add_argument("--threads", type=COUNT, default=1)
    p.add_argument("--calibration-prompts", type=COUNT, default=8,  # was 4 while the docs (and v3's rows) said 8
                   help="captions the calibrated schedules are searched on (default %(default)s)")
    p.add_argument("--max-passes", type=COUNT, default=2)
    p.add_argument("--timing-prompts", type=COUNT, default=50)
    p.add_argument("--repeats", type=COUNT, default=3)
    p.add_argument("--only", nargs="*", default=None, help="variant labels to run (default: all)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=RESULTS.parent.parent / "zoo_runs" / "bench_cache")
    p.add_argument("--out", type=report_path, default=RESULTS / "cache_sd.json")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {variant.label for variant in variants(args)})
    if unknown:  # a typo scored the baseline alone
        p.error(f"--only {unknown} are no variants; choose from {[variant.label for variant in variants(args)]}")
    torch.set_num_threads(args.threads)
    bench = ZooBench(MODEL, args.n, args.out, n_ref=args.n_ref)
    report = bench.report
    report["command"] = "python benchmarks/cache_sd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["parity_max_abs_diff"] = parity((3, 5))
    selected = [v for v in variants(args) if args.only is None or v.label in args.only]
    if not args.skip_quality:
        bench.run_baseline()
        for variant in selected:  # a row made with other settings (its note names them: calibration) is redone
            recorded = report["variants"].get(variant.label)
            bench.run(variant, force=recorded is not None and recorded.get("note") != variant.note)
    if not args.skip_timing:
        # a partial (--only) timing keeps the other variants' rows; each speed-up is against the baseline
        # timed in its own run, so time every variant in one run for a table of one sitting
        timed = timing(selected, args.timing_prompts, args.repeats)
        report["timing"] = {**report.get("timing", {}),
                            **{name: {**row, "made_by": made_by(report["command"])} for name, row in timed.items()}}
        report["timing_setup"] = {"prompts_per_call": args.timing_prompts, "repeats": args.repeats,
                                  "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)  # only quality rows (ZooBench) create it otherwise
    args.out.write_text(json.dumps(report, indent=1))
    extra = ("Parity with the `deepcache` package (max |Δ| of final latents, 8 prompts, branch 0): "
             + ", ".join(f"{k}: {v:.1e}" for k, v in report["parity_max_abs_diff"].items()) + ".")
    args.out.with_suffix(".md").write_text(markdown_table(report, "Feature caching on fashion-sd", extra))
    if "timing" in report and "baseline" in report["variants"]:
        plot(report, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
