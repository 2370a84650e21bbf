"""PTQ timestep groups chosen by the call's timestep (noise level) vs by its position in the schedule.

fashion-sd W8A8 with 4 activation-scale groups over the trajectory, calibrated on DDIM at 10 steps (the
card's CFG 3, 4 prompts, every step), then run where the schedule differs from the calibration's: PNDM at
10 steps (its warm-up calls the UNet extra times), Euler on custom high-noise timesteps (999..800, all
in the calibration's first group) and on custom low-noise ones. Mean PSNR (dB) of 8 class-cycled images
against the fp32 images of the same seeds and schedule, for 1 group, 4 groups picked by position (before
session 28) and 4 groups picked by timestep (``StepGroups`` with ``group_bounds``, the default since).

    python benchmarks/ptq_group_selection.py [--out REPORT.json]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from cli_options import RESULTS, script_parser
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

import diffusion_accel as da
from diffusion_accel.eval.machine import machine_info
from diffusion_accel.quant.layers import ActQuantizer

RUNS = {"DDIM, 10 steps (as calibrated)": (DDIMScheduler, dict(num_inference_steps=10)),
        "PNDM, 10 steps": (PNDMScheduler, dict(num_inference_steps=10)),
        "Euler, timesteps 999..800": (EulerDiscreteScheduler, dict(timesteps=[999, 960, 920, 880, 840, 800])),
        "Euler, timesteps 999, 300..20": (EulerDiscreteScheduler, dict(timesteps=[999, 300, 200, 150, 100, 50, 20]))}
N_IMAGES = 8


def images(pipe, scheduler_cls, config, settings) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1] of the 8 class-cycled prompts, seeds 0..7, under ``scheduler_cls``."""
    pipe.scheduler = scheduler_cls.from_config(config)
    prompts = da.prompts.load("fashion")[:N_IMAGES]
    generators = [torch.Generator().manual_seed(seed) for seed in range(N_IMAGES)]
    return pipe(prompts, generator=generators, output_type="np", **da.call_defaults(pipe), **settings).images


def quantized(groups: int, by_timestep: bool):
    pipe = da.zoo.load("fashion-sd")
    pipe.set_progress_bar_config(disable=True)
    config = da.PTQConfig.preset("w8a8", timestep_groups=groups, calib_prompts=4, calib_num_steps=10,
                                 calib_steps="all")
    da.quantize_(pipe, config)
    if not by_timestep:  # the selection before session 28: the position in the run's schedule
        for module in pipe.unet.modules():
            if isinstance(module, ActQuantizer) and module.selector is not None:
                module.selector.bounds = None
    return pipe


def main(argv: list[str] | None = None) -> dict:
    out = script_parser(__doc__, RESULTS / "ptq_group_selection.json").parse_args(argv).out
    torch.set_num_threads(1)
    base = da.zoo.load("fashion-sd")
    base.set_progress_bar_config(disable=True)
    config = base.scheduler.config
    references = {run: images(base, cls, config, settings) for run, (cls, settings) in RUNS.items()}
    rows = {}
    for label, groups, by_timestep in (("1 group", 1, True), ("4 groups by position", 4, False),
                                       ("4 groups by timestep", 4, True)):
        pipe = quantized(groups, by_timestep)
        rows[label] = {run: float(np.mean([10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in
                                           zip(images(pipe, cls, config, settings), references[run])]))
                       for run, (cls, settings) in RUNS.items()}
        print(label, rows[label], flush=True)
    report = {"model": "fashion-sd", "images": N_IMAGES, "calibration": "DDIM, 10 steps, 4 prompts, every step",
              "rows": rows, "machine": machine_info(), "command": " ".join(["python", *sys.argv])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    lines = ["# PTQ timestep groups: by timestep vs by position (fashion-sd W8A8)", "",
             f"Mean PSNR (dB) of {N_IMAGES} images vs the fp32 images of the same seeds and schedule; calibrated on "
             f"{report['calibration']}. Machine: {report['machine'].get('cpu_model')}, 1 thread.", "",
             "| variant | " + " | ".join(RUNS) + " |", "|---|" + "---|" * len(RUNS)]
    lines += [f"| {label} | " + " | ".join(f"{row[run]:.2f}" for run in RUNS) + " |" for label, row in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
