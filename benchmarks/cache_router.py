"""Learned block router vs the calibrated schedule search vs uniform block caching, at the same budget.

    python benchmarks/cache_router.py [--held-out 20] [--epochs 20] [--threads 1]

On fashion-flux (28 steps, the calibration prompts, seed and held-out prompts of cache_blocks.py), with 10 of 28
steps' worth of block FLOPs: uniform static block caching (a full step every 3rd step: 10 of 28), the calibrated
schedule search (``calibrate_schedule``: full steps only, residual reuse, max_passes=2, as cache_blocks.py) and
``learn_router`` (which blocks run at which step; HarmoniCa's final-image error proxy, and uniform step
weights; the proxy also with twice the epochs).
Per variant: relative L2 error of the final latents vs uncached on the calibration prompts and on
held-out prompts, PSNR of the decoded held-out images vs uncached (uint8, as every table here), denoiser FLOPs
of one call vs uncached (counted), whole-pipeline speed-up over uncached (timed round-robin, median) and the
calibration's wall time. The report is rewritten after every variant; a rerun skips the variants it holds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cli_options import COUNT, NONNEGATIVE, RESULTS, script_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache_blocks as cb  # noqa: E402
from zoo_harness import time_variants, write_result  # noqa: E402
from zoo_quality import DEFAULTS  # noqa: E402

from diffusion_accel import zoo  # noqa: E402
from diffusion_accel.cache import BlockCacheConfig, calibrate_schedule, enable_cache, learn_router  # noqa: E402
from diffusion_accel.cache.configs import config_from_dict, config_to_dict  # noqa: E402
from diffusion_accel.cache.runs import final_outputs, relative_error  # noqa: E402
from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402

MODEL = "fashion-flux"
FULL_STEPS = 10  # the budget: 10 of 28 steps' worth of block FLOPs


def calibrators(epochs: int) -> dict[str, Any]:
    """Variant label -> function(pipe, context) returning its cache config."""
    steps = DEFAULTS[MODEL]["num_inference_steps"]
    budget = FULL_STEPS / steps

    def router(weights: str, epochs: int = epochs) -> Any:
        return lambda pipe, context: learn_router(pipe, context["calib"], budget=budget, num_inference_steps=steps,
                                                  epochs=epochs, step_weights=weights, **context["kwargs"])

    return {"uniform (interval 3)": lambda pipe, context: BlockCacheConfig(interval=3),
            "search (steps)": lambda pipe, context: calibrate_schedule(
                pipe, context["calib"], budget=budget, num_inference_steps=steps, max_passes=2, **context["kwargs"]),
            "router (final-error proxy)": router("final"),
            "router (uniform weights)": router("uniform"),
            f"router (final-error proxy, {2 * epochs} epochs)": router("final", 2 * epochs)}


def measure(label: str, calibrate: Any, context: dict) -> dict:
    """Calibrate one variant on a fresh pipeline and measure it (see the module doc)."""
    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    config = calibrate(pipe, context)
    calibration_s = time.perf_counter() - start
    enable_cache(pipe, config)
    errors = {name: relative_error(final_outputs(pipe, context["calls"][name]), context["references"][name])
              for name in ("calibration", "held_out")}
    return {"config": config_to_dict(config), "calibration_s": round(calibration_s, 1),
            "error_calibration": errors["calibration"], "error_held_out": errors["held_out"],
            "psnr_held_out": cb.held_out_psnr(pipe, context), "psnr": cb.PSNR_CONVENTION,
            "flops_fraction": cb.flops_of_one_call(pipe, context["calls"]["held_out"][0]) / context["base_flops"]}


def row_settings(label: str, held_out: int | None, epochs: int | None) -> dict:
    """What a variant's row was measured with: the held-out prompt count, and for routers the --epochs value."""
    return {"held_out": held_out, "epochs": epochs if label.startswith("router") else None}


def stamp_settings(report: dict) -> None:
    """Rows written before session 44 lack their settings: they hold those of the report they were written
    into (read before this run replaces them)."""
    for label, row in report.get("variants", {}).items():
        row.setdefault("settings", row_settings(label, report.get("held_out"), report.get("epochs")))


def settings_note(label: str, row: dict, report: dict) -> str:
    """Empty, or what a kept row was measured with where it differs from this report's settings."""
    if row["settings"] == row_settings(label, report["held_out"], report["epochs"]):
        return ""
    epochs = row["settings"]["epochs"]
    return f" ({row['settings']['held_out']} held-out prompts{'' if epochs is None else f', --epochs {epochs}'})"


def timing(rows: dict, repeats: int) -> dict:
    """Whole-pipeline speed-up of every variant over the uncached pipeline, timed round-robin."""
    pipes = {"uncached": zoo.load(MODEL)}
    for label, row in rows.items():
        pipes[label] = enable_cache(zoo.load(MODEL), config_from_dict(row["config"]))
    return time_variants(pipes, dict(DEFAULTS[MODEL]), cb.prompts_for(4, 7)[0], repeats=repeats)


def markdown(report: dict) -> str:
    lines = ["# Learned block router vs calibrated schedule search vs uniform block caching", "",
             f"Machine: {machine_summary(report['machine'])}. {MODEL}, 28 steps, budget {FULL_STEPS} of 28 steps' "
             f"block FLOPs; router trained {report['epochs']} epochs unless the label says otherwise. Error = "
             f"relative L2 of the final latents vs uncached (calibration prompts / {report['held_out']} held-out "
             f"prompts, seed {cb.HELD_OUT_SEED}); "
             "PSNR of held-out decoded images vs uncached; FLOPs = denoiser FLOPs of one call vs uncached (counted); "
             "speed-up = whole pipeline vs uncached, median of timed calls.", "",
             "| variant | FLOPs | error calib | error held-out | PSNR held-out (dB) | speed-up | calibration (s) |",
             "|---|---|---|---|---|---|---|"]
    for label, row in report["variants"].items():
        speed = report.get("timing", {}).get(label, {}).get("speedup")
        lines.append(f"| {label}{settings_note(label, row, report)} | {row['flops_fraction']:.3f} | "
                     f"{row['error_calibration']:.4f} | "
                     f"{row['error_held_out']:.4f} | {row['psnr_held_out']:.2f} | "
                     f"{'' if speed is None else f'{speed:.2f}×'} | {row['calibration_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, RESULTS / "cache_router.json")
    parser.add_argument("--held-out", type=COUNT, default=20, help="held-out prompts")
    parser.add_argument("--epochs", type=COUNT, default=20, help="router training epochs")
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants (labels)")
    parser.add_argument("--timing-repeats", type=NONNEGATIVE, default=5,
                        help="timed calls per variant (median); 0: no timing")
    parser.add_argument("--threads", type=COUNT, default=1, help="torch threads")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants or ()) - set(calibrators(args.epochs)))
    if unknown:  # every row was skipped and the run exited 0, measuring nothing (until session 50)
        parser.error(f"--variants {unknown}: no such variant at --epochs {args.epochs}; accepted: "
                     f"{list(calibrators(args.epochs))}")
    torch.set_num_threads(args.threads)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    stamp_settings(report)
    command = "python benchmarks/cache_router.py " + " ".join(argv or sys.argv[1:])
    report.setdefault("commands", []).append(command)
    report.update({"command": command, "machine": machine_info(), "held_out": args.held_out, "epochs": args.epochs})
    variants, context = report.setdefault("variants", {}), None
    for label, calibrate in calibrators(args.epochs).items():
        settings = row_settings(label, args.held_out, args.epochs)
        if args.variants and label not in args.variants or variants.get(label, {}).get("settings") == settings:
            continue  # rows made with other --held-out / --epochs are measured again
        context = context or cb.model_context(MODEL, args.held_out)
        variants[label] = measure(label, calibrate, context) | {"settings": settings}
        report.get("timing", {}).pop(label, None)
        print(f"{label}: held-out {variants[label]['error_held_out']:.4f}", flush=True)
        write_result(args.out, report, markdown)
    if args.timing_repeats and set(report.get("timing", {})) != {"uncached", *variants}:
        report["timing"] = timing(variants, args.timing_repeats)
        write_result(args.out, report, markdown)
    return report


if __name__ == "__main__":
    main()
