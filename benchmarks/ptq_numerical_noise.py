"""How far apart are numerically equivalent W8A8 realizations? (fashion-sd, the demo's settings)

One W8A8 calibration (the demo's: 10 fashion prompts, 20 DDIM steps, uniform:5, the card's CFG 3), run
three ways that agree per layer up to float summation order: lowered with constants folded once per
timestep group (eager inference, the default), lowered with the constants rebuilt per call (the form
used under autograd and torch.compile), and simulated (``lower=False``). Over 20 denoising steps, such
1e-7 differences flip activation codes, so each realization's images differ from the others'. Reported:
mean PSNR (dB) of 10 images of each vs the fp32 images and vs each other: the numerical noise floor
under which W8A8 variants cannot be told apart on this model.

    python benchmarks/ptq_numerical_noise.py [--out REPORT.json]

Writes benchmarks/results/ptq_numerical_noise.{json,md} (or ``--out`` and the .md beside it).
"""

from __future__ import annotations

import copy
import itertools
import json

import torch
from cli_options import RESULTS, script_parser

import diffusion_accel as da
from diffusion_accel.eval.machine import machine_info
from diffusion_accel.quant import lower as lower_module
from diffusion_accel.quant import onednn

STEPS = 20


def images(pipe, prompts: list[str], call: dict) -> torch.Tensor:
    return torch.cat([pipe(prompt, num_inference_steps=STEPS, output_type="pt",
                           generator=torch.Generator().manual_seed(seed), **call).images
                      for seed, prompt in enumerate(prompts)])


def psnr(first: torch.Tensor, second: torch.Tensor) -> float:
    mse = ((first - second) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def per_call_constants(pipe, prompts: list[str], call: dict) -> torch.Tensor:
    """Images of the lowered model with its folded-constant path switched off (constants per call)."""
    saved = lower_module.fast_path_on, onednn.fast_path_on
    lower_module.fast_path_on = onednn.fast_path_on = lambda: False
    try:
        return images(pipe, prompts, call)
    finally:
        lower_module.fast_path_on, onednn.fast_path_on = saved


def main(argv: list[str] | None = None) -> None:
    out = script_parser(__doc__, RESULTS / "ptq_numerical_noise.json").parse_args(argv).out
    pipe = da.zoo.load("fashion-sd")
    pipe.set_progress_bar_config(disable=True)
    prompts, call = da.prompts.load("fashion")[:10], da.call_defaults(pipe)
    calib = da.calibrate(pipe, prompts, num_inference_steps=STEPS, steps="uniform:5", progress=False, **call)
    lowered = da.quantize_(copy.deepcopy(pipe), da.PTQConfig.preset("w8a8"), calib=calib)
    simulated = da.quantize_(copy.deepcopy(pipe), da.PTQConfig.preset("w8a8", lower=False), calib=calib)
    runs = {"fp32": images(pipe, prompts, call), "lowered, folded constants": images(lowered, prompts, call),
            "lowered, per-call constants": per_call_constants(lowered, prompts, call),
            "simulated": images(simulated, prompts, call)}
    pairs = {f"{a} vs {b}": psnr(runs[a], runs[b]) for a, b in itertools.combinations(runs, 2)}
    result = {"model": "fashion-sd", "steps": STEPS, "images": len(prompts), "psnr_db": pairs,
              "machine": machine_info()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = ["# Numerical noise of W8A8 on fashion-sd (20 DDIM steps, CFG 3, 10 images)", "",
             "| pair | mean PSNR dB |", "|---|---|"]
    lines += [f"| {pair} | {value:.2f} |" for pair, value in pairs.items()]
    machine = ", ".join(f"{key}={value}" for key, value in result["machine"].items())
    lines += ["", f"**Machine:** {machine}", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
