"""Which blocks recompute: calibrated cache schedules with partial steps vs steps only, at the same budget.

    python benchmarks/cache_blocks.py [--models fashion-flux fashion-sd] [--held-out 20] [--threads 1]

For each zoo model and setting, ``calibrate_schedule`` searches twice on the same calibration prompts and
seed (cache_flux.py's prompts and seed; cache_sd.py's 8 captions, drawn with seed 1000, also the calls' seed
here; fashion-sd's 8 share one call, as in the README's ``calibrate --batch-size 8`` example): full and reuse
steps only, and with partial steps (``search_blocks=True``: reuse steps that run the leading transformer
blocks, or a deeper UNet branch). Per schedule: relative L2 error of the final latents vs uncached on the
calibration prompts and on held-out prompts (captions not among the calibration ones, seed 555), PSNR of the
decoded held-out images vs uncached (uint8, as every table here), denoiser FLOPs of one pipeline call as a
fraction of uncached (counted, so partial steps are priced by what they run), the whole-pipeline speed-up over
uncached (timed round-robin, median), and the search's wall time.
The report is rewritten after every schedule and a rerun skips the settings it holds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cli_options import COUNT, NONNEGATIVE, RESULTS, script_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache_flux as cf  # noqa: E402
from zoo_harness import time_variants  # noqa: E402
from zoo_quality import DEFAULTS, prompts_for  # noqa: E402

from diffusion_accel import zoo  # noqa: E402
from diffusion_accel.cache import calibrate_schedule, enable_cache  # noqa: E402
from diffusion_accel.cache.configs import config_to_dict  # noqa: E402
from diffusion_accel.cache.runs import final_outputs, planned_calls, relative_error  # noqa: E402
from diffusion_accel.eval.cost import denoiser_flops  # noqa: E402
from diffusion_accel.eval.fidelity import fidelity  # noqa: E402
from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402

HELD_OUT_SEED = 555
PSNR_CONVENTION = "uint8 (eval.fidelity)"  # rows without it measured float images (before the review)
SD_CALIBRATION_SEED = 1000  # draws cache_sd.py's calibration captions (and seeds the search's calls here)
HELD_OUT_RULE = "captions not among the calibration prompts"  # fashion-sd's held-out list held one until session 45
# model -> settings: label -> calibrate_schedule options (budget as full steps of the model's step count)
SETTINGS = {
    "fashion-flux": {"residual-10of28": {"full": 10, "forecast": 0},
                     "output-forecast-10of28": {"full": 10, "forecast": 1, "forecast_target": "output"}},
    "fashion-sd": {"forecast-10of50": {"full": 10, "forecast": 1, "max_candidates": 12},
                   "reuse-10of50": {"full": 10, "forecast": 0, "max_candidates": 12}},
}
CALIBRATION_BATCH = {"fashion-flux": 1, "fashion-sd": 8}  # prompts per search call (8: the README's CLI example)


def model_calls(model: str, pipe: Any, held_out: int) -> tuple[list[str], dict, dict[str, list]]:
    """(calibration prompts, extra call kwargs, planned calls by set) as the model's cache benchmark uses."""
    steps = DEFAULTS[model]["num_inference_steps"]
    if model == "fashion-flux":
        calib, kwargs, seed = cf.calibration_prompts(4), cf.calib_call_kwargs(pipe), cf.CALIB_SEED
        extra = [p for p in cf.calibration_prompts(4 + held_out) if p not in calib][:held_out]
    else:
        calib, seed = prompts_for(8, SD_CALIBRATION_SEED)[0], SD_CALIBRATION_SEED
        kwargs = {"guidance_scale": DEFAULTS[model]["guidance_scale"], "height": 32, "width": 32}
        extra = [p for p in prompts_for(held_out + len(calib), HELD_OUT_SEED)[0] if p not in calib][:held_out]
        random.Random(HELD_OUT_SEED).shuffle(extra)
    calls = {"calibration": planned_calls(pipe, calib, steps, seed=seed, batch_size=CALIBRATION_BATCH[model], **kwargs),
             "held_out": planned_calls(pipe, extra, steps, seed=HELD_OUT_SEED, **kwargs),
             "held_out_images": planned_calls(pipe, extra, steps, seed=HELD_OUT_SEED, **kwargs | {"output_type": "pt"})}
    return calib, {"seed": seed, **kwargs}, calls


def held_out_psnr(pipe: Any, context: dict) -> float:
    """Mean PSNR (dB, uint8 images as every table of the project: ``eval.fidelity``) of the cached pipeline's
    held-out images vs the uncached ones."""
    images = torch.cat(final_outputs(pipe, context["calls"]["held_out_images"]))
    return fidelity(images, torch.cat(context["references"]["held_out_images"])).psnr


def flops_of_one_call(pipe: Any, call: Any) -> int:
    """Denoiser FLOPs of one planned call."""
    kwargs = call.kwargs | {"generator": torch.Generator().manual_seed(call.seed)}
    return denoiser_flops(pipe, kwargs).total


def measure_schedule(model: str, options: dict, search_blocks: bool, context: dict) -> dict:
    """Calibrate one schedule and measure it (see the module doc)."""
    pipe = zoo.load(model)
    pipe.set_progress_bar_config(disable=True)
    steps = DEFAULTS[model]["num_inference_steps"]
    options = dict(options)
    full = options.pop("full")
    start = time.perf_counter()
    config = calibrate_schedule(pipe, context["calib"], budget=full / steps, num_inference_steps=steps,
                                max_passes=2, search_blocks=search_blocks, batch_size=CALIBRATION_BATCH[model],
                                **options, **context["kwargs"])
    search_s = time.perf_counter() - start
    enable_cache(pipe, config)
    errors = {name: relative_error(final_outputs(pipe, context["calls"][name]), context["references"][name])
              for name in ("calibration", "held_out")}
    return {"config": config_to_dict(config), "full_steps": list(config.full_steps),
            "partial_steps": [list(pair) for pair in config.partial_steps], "search_s": round(search_s, 1),
            "error_calibration": errors["calibration"], "error_held_out": errors["held_out"],
            "psnr_held_out": held_out_psnr(pipe, context), "psnr": PSNR_CONVENTION,
            "flops_fraction": flops_of_one_call(pipe, context["calls"]["held_out"][0]) / context["base_flops"],
            "held_out": context["held_out"], "held_out_rule": HELD_OUT_RULE,
            "search_machine": machine_summary(machine_info())}


def remeasure_held_out(model: str, row: dict, context: dict) -> None:
    """Measure a stored schedule on this run's held-out prompts again (its error and PSNR, by the project's
    convention): the search only saw the calibration prompts, so the schedule itself stands."""
    from diffusion_accel.cache.configs import config_from_dict

    pipe = enable_cache(zoo.load(model), config_from_dict(row["config"]))
    pipe.set_progress_bar_config(disable=True)
    row["error_held_out"] = relative_error(final_outputs(pipe, context["calls"]["held_out"]),
                                           context["references"]["held_out"])
    row["psnr_held_out"], row["psnr"] = held_out_psnr(pipe, context), PSNR_CONVENTION
    row["held_out"], row["held_out_rule"] = context["held_out"], HELD_OUT_RULE


def schedule_rows(report: dict) -> list[dict]:
    """Every measured schedule row of ``report`` (not the timing entries)."""
    return [row for settings in report.get("models", {}).values() for pair in settings.values()
            for row in pair.values() if isinstance(row, dict) and "full_steps" in row]


def stamp_held_out(report: dict) -> None:
    """Rows written before session 44 lack their held-out count, before session 45 the machine of their search:
    they hold those of the report they were written into (read before this run replaces it). fashion-flux's
    held-out prompts always left out the calibration ones."""
    for model, settings in report.get("models", {}).items():
        for pair in settings.values():
            for row in (row for row in pair.values() if isinstance(row, dict) and "full_steps" in row):
                row.setdefault("held_out", report.get("held_out"))
                row.setdefault("search_machine", machine_summary(report["machine"]))
                if model == "fashion-flux":
                    row.setdefault("held_out_rule", HELD_OUT_RULE)


def stale_held_out(row: dict, held_out: int) -> bool:
    """Whether ``row``'s held-out figures were measured another way than this run asks: PSNR of float images
    (before the review), on another number of held-out prompts, or on held-out captions the calibration shared."""
    return (row.get("psnr") != PSNR_CONVENTION or row["held_out"] != held_out
            or row.get("held_out_rule") != HELD_OUT_RULE)


def model_context(model: str, held_out: int) -> dict:
    """Calls, uncached references and uncached FLOPs of ``model``."""
    pipe = zoo.load(model)
    pipe.set_progress_bar_config(disable=True)
    calib, kwargs, calls = model_calls(model, pipe, held_out)
    seed = kwargs.pop("seed")
    return {"calib": calib, "kwargs": {"seed": seed, **kwargs}, "calls": calls, "held_out": held_out,
            "references": {name: final_outputs(pipe, c) for name, c in calls.items()},
            "base_flops": flops_of_one_call(pipe, calls["held_out"][0])}


def timing(model: str, rows: dict, repeats: int) -> dict:
    """Whole-pipeline speed-up of every schedule over the uncached pipeline, timed round-robin."""
    from diffusion_accel.cache.configs import config_from_dict

    pipes = {"uncached": zoo.load(model)}
    for label, row in rows.items():
        pipes[label] = enable_cache(zoo.load(model), config_from_dict(row["config"]))
    return time_variants(pipes, dict(DEFAULTS[model]), prompts_for(4, 7)[0], repeats=repeats)


def markdown(report: dict) -> str:
    lines = ["# Calibrated cache schedules: partial steps (which blocks recompute) vs steps only", "",
             f"Machine: {machine_summary(report['machine'])}. Same budget, prompts and seeds per pair; "
             "error = relative L2 of the final latents vs uncached (calibration prompts the search saw / "
             f"{report['held_out']} held-out prompts, {HELD_OUT_RULE}, seed {HELD_OUT_SEED}); PSNR of held-out "
             "decoded images vs "
             "uncached; FLOPs = denoiser FLOPs of one call vs uncached (counted); speed-up = whole pipeline vs "
             "uncached, median of timed calls.", "",
             "| model | setting | search | full steps | partial steps (step:level) | FLOPs | error calib | "
             "error held-out | PSNR held-out (dB) | speed-up | search (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, settings in report["models"].items():
        for setting, pair in settings.items():
            for search, row in pair.items():
                if not isinstance(row, dict) or "full_steps" not in row:
                    continue
                partial = " ".join(f"{step}:{level}" for step, level in row["partial_steps"]) or "-"
                speed = pair.get("timing", {}).get(search, {}).get("speedup")
                count = row.get("held_out", report["held_out"])
                other_count = "" if count == report["held_out"] else f" ({count} prompts)"
                lines.append(f"| {model} | {setting} | {search} | {len(row['full_steps'])} | {partial} | "
                             f"{row['flops_fraction']:.3f} | {row['error_calibration']:.4f} | "
                             f"{row['error_held_out']:.4f}{other_count} | {row['psnr_held_out']:.2f}{other_count} | "
                             f"{'' if speed is None else f'{speed:.2f}×'} | {row['search_s']} |")
    searched_on = sorted({row["search_machine"] for row in schedule_rows(report) if "search_machine" in row}
                         - {machine_summary(report["machine"])})
    if searched_on:  # a rerun that only re-measured held-out figures ran elsewhere
        lines += ["", f"Searches (their seconds) ran on: {'; '.join(searched_on)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, RESULTS / "cache_blocks.json")
    parser.add_argument("--models", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--settings", nargs="+", default=None, help="only these settings (labels of SETTINGS)")
    parser.add_argument("--held-out", type=COUNT, default=20, help="held-out prompts")
    parser.add_argument("--timing-repeats", type=NONNEGATIVE, default=5,
                        help="timed calls per variant (median); 0: no timing (FLOPs only)")
    parser.add_argument("--threads", type=COUNT, default=1, help="torch threads")
    args = parser.parse_args(argv)
    check_settings(parser, args.models, args.settings)
    torch.set_num_threads(args.threads)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    stamp_held_out(report)
    command = "python benchmarks/cache_blocks.py " + " ".join(argv or sys.argv[1:])
    report.setdefault("commands", []).append(command)  # a rerun resumes (timing, skipped settings)
    report.update({"command": command, "machine": machine_info(), "held_out": args.held_out})
    models = report.setdefault("models", {})
    for model in args.models:
        context = None
        for setting, options in SETTINGS[model].items():
            if args.settings and setting not in args.settings:
                continue
            pair = models.setdefault(model, {}).setdefault(setting, {})
            for search, blocks in (("steps", False), ("steps+blocks", True)):
                if search in pair:
                    if stale_held_out(pair[search], args.held_out):
                        context = context or model_context(model, args.held_out)
                        remeasure_held_out(model, pair[search], context)
                        write(report, args.out)
                    continue
                context = context or model_context(model, args.held_out)
                pair[search] = measure_schedule(model, options, blocks, context)
                row = pair[search]
                print(f"{model} {setting} {search}: {row['full_steps']} partial {row['partial_steps']} "
                      f"held-out {row['error_held_out']:.4f}", flush=True)
                write(report, args.out)
            if "timing" not in pair and args.timing_repeats:
                pair["timing"] = timing(model, {s: pair[s] for s in ("steps", "steps+blocks")}, args.timing_repeats)
                write(report, args.out)
    return report


def check_settings(parser: argparse.ArgumentParser, models: list[str], settings: list[str] | None) -> None:
    """Argument error for a --settings label none of the chosen models has (a typo measured nothing until
    session 52)."""
    known = {label for model in models for label in SETTINGS[model]}
    unknown = sorted(set(settings or ()) - known)
    if unknown:
        parser.error(f"--settings {' '.join(unknown)}: not a setting of {', '.join(models)}; "
                     f"choose from {', '.join(sorted(known))}")


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    path.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
