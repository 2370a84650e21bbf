"""Do cache_flux's calibrated schedules generalise? Final-latent error of every chosen setting on the
calibration prompts vs on held-out prompts, plus our forecasts on diffusers TaylorSeer's own schedule.

    python benchmarks/cache_flux_heldout.py --report benchmarks/results/cache_flux_v2c.json

Reads the chosen settings from a cache_flux report (no timing, no FID): each setting's relative L2
error of the final latents vs uncached, on the report's calibration prompts (seed 7919) and on
``--held-out`` other prompts with their own seed. Writes JSON + Markdown at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_options import COUNT, existing_file, report_path  # noqa: E402
import cache_flux as cf  # noqa: E402
from zoo_harness import RESULTS  # noqa: E402

from diffusion_accel.cache.runs import final_outputs, planned_calls, relative_error  # noqa: E402
from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402

HELD_OUT_SEED = 555


def taylorseer_schedule(setting: dict[str, Any]) -> list[int]:
    """The full steps diffusers TaylorSeer computes per branch for ``setting`` (its hook's own rule)."""
    warmup, interval = setting["disable_cache_before_step"], setting["cache_interval"]
    return [s for s in range(cf.STEPS) if s < warmup or (s - warmup - 1) % interval == 0]


def settings_to_check(report: dict) -> dict[str, tuple[str, dict]]:
    """Label -> (cache_flux method whose builder to use, setting): every chosen setting of the
    report, plus our residual and output forecasts on TaylorSeer's chosen schedule."""
    rows = {m: (m, c["setting"]) for m, c in report["chosen"].items()}
    taylor = report["chosen"].get("diffusers-taylorseer")
    if taylor is not None:
        steps = taylorseer_schedule(taylor["setting"])
        fixed = {"full_count": len(steps), "full_steps": steps}
        rows["TaylorSeer's schedule, ours residual forecast"] = ("ours-calibrated-forecast", fixed)
        rows["TaylorSeer's schedule, ours output forecast"] = ("ours-calibrated-output-11", fixed)
    return rows


def search_prompts(report: dict) -> list[str]:
    """Every prompt a setting of the report was chosen or searched on: its calibration prompts and the larger
    search sets of methods naming one (``schedule_prompts``: the "-c16" rows; until session 45 three of their 16
    were among the held-out prompts)."""
    searched = list(report["calibration"]["prompts"])
    for method in report["chosen"]:
        count = cf.METHODS.get(method, {}).get("schedule_prompts")
        searched += [p for p in cf.calibration_prompts(count) if p not in searched] if count else []
    return searched


def held_out_prompts(report: dict, count: int) -> list[str]:
    """``count`` prompts no setting of the report was searched on."""
    searched = search_prompts(report)
    return [p for p in cf.calibration_prompts(len(searched) + count) if p not in searched][:count]


def call_sets(pipe: Any, report: dict, held_out: int) -> dict[str, list]:
    """The calibration calls of the report and ``held_out`` calls on prompts no setting was searched on, other
    seeds."""
    calib, extra = report["calibration"]["prompts"], held_out_prompts(report, held_out)
    kwargs = cf.calib_call_kwargs(pipe)
    return {"calibration": planned_calls(pipe, calib, cf.STEPS, seed=cf.CALIB_SEED, **kwargs),
            "held_out": planned_calls(pipe, extra, cf.STEPS, seed=HELD_OUT_SEED, **kwargs)}


def evaluate(report: dict, held_out: int) -> dict[str, Any]:
    """Both errors for every setting of :func:`settings_to_check`."""
    pipe = cf.load_pipe()
    calls = call_sets(pipe, report, held_out)
    references = {name: final_outputs(pipe, c) for name, c in calls.items()}
    rows = {}
    for label, (method, setting) in settings_to_check(report).items():
        cached = cf.built(method, setting, report["calibration"])
        errors = {name: relative_error(final_outputs(cached, c), references[name]) for name, c in calls.items()}
        rows[label] = {"method": method, "setting": setting, **errors}
        print(f"{label}: calibration {errors['calibration']:.4f}, held-out {errors['held_out']:.4f}", flush=True)
    return {"report": report.get("command"), "held_out_prompts": len(calls["held_out"]),
            "calibration_prompts": len(calls["calibration"]), "held_out_seed": HELD_OUT_SEED,
            "searched_prompts": len(search_prompts(report)), "machine": machine_info(), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Calibration vs held-out error of cache_flux's chosen settings", "",
             f"Machine: {machine_summary(result['machine'])}.", "",
             f"Relative L2 error of the final latents vs uncached (fashion-flux, 28 steps, true CFG 3), mean "
             f"over calls: on the report's {result['calibration_prompts']} calibration prompts, on which every setting "
             f"was chosen or searched (the \"-c16\" rows' schedules on a set of 16 prompts of their own), and "
             f"on {result['held_out_prompts']} held-out prompts (seed {result['held_out_seed']}), none of the "
             f"{result.get('searched_prompts', result['calibration_prompts'])} prompts any setting was searched on.",
             "", "| setting | calibration | held-out | full steps |", "|---|---|---|---|"]
    for label, row in sorted(result["rows"].items(), key=lambda item: item[1]["held_out"]):
        steps = row["setting"].get("full_steps", "")
        lines.append(f"| {label} | {row['calibration']:.4f} | {row['held_out']:.4f} | {steps} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=existing_file, default=RESULTS / "cache_flux_v2c.json")
    p.add_argument("--held-out", type=COUNT, default=20, help="held-out prompts")
    p.add_argument("--threads", type=COUNT, default=1)
    p.add_argument("--out", type=report_path, default=RESULTS / "cache_flux_heldout.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(json.loads(args.report.read_text()), args.held_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
