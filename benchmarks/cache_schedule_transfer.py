"""A calibrated cache schedule used under another schedule of the same length: reused positions, the full
steps mapped by noise level (``CalibratedCacheConfig.timesteps``, the default since session 29), or a
schedule recalibrated under the new scheduler.

fashion-sd (DDIM calibration, 10 steps, budget 0.4, 32 px) under DDIM "trailing" spacing, Euler with Karras
sigmas and DPM++ 2M; fashion-flux (default FlowMatch sigmas, 10 steps, budget 0.4) under Karras sigmas.
Schedules are searched on 2 calibration prompts; scored on 4 other prompts (seeds 100..103) by mean PSNR
(dB) against the uncached images of the same scheduler, with the steps each variant computed.

    python benchmarks/cache_schedule_transfer.py [--out REPORT.json]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from cli_options import RESULTS, script_parser
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

import diffusion_accel as da
from diffusion_accel.eval.machine import machine_info, machine_summary

STEPS, BUDGET = 10, 0.4
TARGETS = {"fashion-sd": {"DDIM trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}),
                          "Euler, Karras sigmas": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
                          "DPM++ 2M": (DPMSolverMultistepScheduler, {})},
           "fashion-flux": {"FlowMatch Euler, Karras sigmas": (FlowMatchEulerDiscreteScheduler, {"use_karras_sigmas": True})}}
SIZE = {"fashion-sd": {"height": 32, "width": 32}, "fashion-flux": {}}


def images(pipe, model: str, prompts: list[str]) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1], seeds 100.."""
    return np.concatenate([pipe(prompt, num_inference_steps=STEPS, output_type="np",
                                generator=torch.Generator().manual_seed(100 + index),
                                **da.call_defaults(pipe), **SIZE[model]).images
                           for index, prompt in enumerate(prompts)])


def score(pipe, model: str, config, prompts: list[str], reference: np.ndarray) -> dict:
    """Mean PSNR vs ``reference`` and the computed steps of the last call, with ``config`` enabled."""
    da.enable_cache(pipe, config)
    try:
        out = images(pipe, model, prompts)
        computed = [record["step"] for record in da.cache_summary(pipe)["steps"] if record["computed"]]
    finally:
        da.remove_cache(pipe)
    psnr = float(np.mean([10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in zip(out, reference)]))
    return {"psnr_db": psnr, "computed_steps": sorted(set(computed))}


def main(argv: list[str] | None = None) -> dict:
    args = script_parser(__doc__, RESULTS / "cache_schedule_transfer.json").parse_args(argv)
    torch.set_num_threads(1)
    prompts = list(da.prompts.load("fashion"))
    calibration, held_out = prompts[:2], prompts[2:6]  # the set holds one prompt per class (10)
    rows = {}
    for model, targets in TARGETS.items():
        pipe = da.zoo.load(model)
        pipe.set_progress_bar_config(disable=True)
        base = pipe.scheduler
        config = da.calibrate_schedule(pipe, calibration, budget=BUDGET, num_inference_steps=STEPS,
                                       **da.call_defaults(pipe), **SIZE[model])
        for label, (cls, options) in targets.items():
            pipe.scheduler = cls.from_config(base.config, **options)
            reference = images(pipe, model, held_out)
            recalibrated = da.calibrate_schedule(pipe, calibration, budget=BUDGET, num_inference_steps=STEPS,
                                                 **da.call_defaults(pipe), **SIZE[model])
            rows[f"{model}: {label}"] = {
                "calibrated_steps": list(config.full_steps),
                "positions reused": score(pipe, model, config.with_(timesteps=None), held_out, reference),
                "mapped by noise level": score(pipe, model, config, held_out, reference),
                "recalibrated": score(pipe, model, recalibrated, held_out, reference)}
            print(label, rows[f"{model}: {label}"], flush=True)
            pipe.scheduler = base
    machine = machine_info()
    report = {"steps": STEPS, "budget": BUDGET, "calibration_prompts": calibration, "held_out_prompts": held_out,
              "rows": rows, "machine": machine, "command": " ".join(["python", *sys.argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    variants = ("positions reused", "mapped by noise level", "recalibrated")
    lines = ["# A calibrated cache schedule under another schedule of the same length", "",
             f"{STEPS} steps, budget {BUDGET}; schedules searched on 2 prompts, mean PSNR (dB) of 4 held-out prompts "
             f"vs the uncached images of the same scheduler; computed steps in brackets. "
             f"Machine: {machine_summary(machine)}.", "",
             "| model: scheduler used | calibrated on default | " + " | ".join(variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    lines += [f"| {name} | {row['calibrated_steps']} | " + " | ".join(
        f"{row[v]['psnr_db']:.2f} {row[v]['computed_steps']}" for v in variants) + " |" for name, row in rows.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
