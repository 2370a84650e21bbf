"""Calibration with swapped-in schedulers: W8A8 and a calibrated cache schedule on fashion-sd.

For each diffusers scheduler (DDIM, PNDM as SD 1.5 ships it, Heun, KDPM2, DPM++ 2M) the zoo pipeline
gets that scheduler, is calibrated at ``--steps`` steps (8 prompts, every denoiser step), quantized
(W8A8, 2 timestep groups, lowered) and separately cached with a schedule calibrated for ``--budget``
of its denoiser calls (4 prompts). Reported per scheduler: denoiser calls per image (2N - 1 for Heun
and KDPM2), the full calls the cache ran, and mean PSNR of 16 images (class-cycled prompts, seeds
100..115, the card's CFG) against the fp32 images of the same scheduler and seeds. A bf16 copy of the
pipeline, no calibration, is the reference perturbation: how much the scheduler itself amplifies small
changes of the denoiser's output (multistep methods such as PNDM's combine four past outputs with
coefficients summing in magnitude to 6.7).

    python benchmarks/calib_schedulers.py [--steps 10] [--budget 0.4]

Writes benchmarks/results/calib_schedulers.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import diffusers
import torch
from cli_options import COUNT, report_path

import diffusion_accel as da
from diffusion_accel.eval.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULERS = {"DDIM": ("DDIMScheduler", {}), "PNDM (SD 1.5's)": ("PNDMScheduler", {"skip_prk_steps": True}),
              "Heun": ("HeunDiscreteScheduler", {}), "KDPM2": ("KDPM2DiscreteScheduler", {}),
              "DPM++ 2M": ("DPMSolverMultistepScheduler", {})}


def images(pipe, prompts: list[str], steps: int, call: dict) -> torch.Tensor:
    """(16, 3, H, W) images in [0, 1] of the class-cycled prompts, seeds 100.."""
    out = [pipe(prompts[i % len(prompts)], num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(100 + i), **call).images for i in range(16)]
    return torch.cat(out)


def psnr(images_: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR in dB (range 1)."""
    mse = ((images_ - reference) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def run_scheduler(label: str, steps: int, budget: float) -> dict:
    name, overrides = SCHEDULERS[label]
    pipe = da.zoo.load("fashion-sd")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    call, prompts = da.call_defaults(pipe), da.prompts.load("fashion")
    started = time.perf_counter()
    calib = da.calibrate(pipe, prompts[:8], num_inference_steps=steps, progress=False, **call)
    quantized = da.quantize_(copy.deepcopy(pipe), da.PTQConfig.preset("w8a8", timestep_groups=2), calib=calib)
    schedule = da.calibrate_schedule(pipe, prompts[:4], budget=budget, num_inference_steps=steps, **call)
    cached = da.enable_cache(copy.deepcopy(pipe), schedule)
    prepare = time.perf_counter() - started
    reference = images(pipe, prompts, steps, call)
    row = {"scheduler": label, "class": name, "denoiser_steps": calib.num_steps,
           "bf16_psnr": psnr(images(copy.deepcopy(pipe).to(torch.bfloat16), prompts, steps, call).float(), reference),
           "w8a8_psnr": psnr(images(quantized, prompts, steps, call), reference)}
    row["cache_psnr"] = psnr(images(cached, prompts, steps, call), reference)
    info = da.cache.summary(cached)
    row |= {"cache_full_calls": info["full_calls"], "cache_calls": info["denoiser_calls"],
            "prepare_s": round(prepare, 1)}
    print(row, flush=True)
    return row


def to_markdown(result: dict) -> str:
    lines = [f"# Calibration with swapped-in schedulers (fashion-sd, {result['steps']} steps, CFG 3)", "",
             "| scheduler | denoiser calls / image | bf16 PSNR dB | W8A8 PSNR dB | cache full calls / calls | cache PSNR dB |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['scheduler']} | {row['denoiser_steps']} | {row['bf16_psnr']:.2f} | {row['w8a8_psnr']:.2f} | "
                     f"{row['cache_full_calls']} / {row['cache_calls']} | {row['cache_psnr']:.2f} |")
    machine = ", ".join(f"{key}={value}" for key, value in result["machine"].items())
    return "\n".join(lines + ["", f"Cache budget {result['budget']} of the denoiser calls (CFG batched: one call per "
                              "step; the last call's counts). PSNR: mean of 16 images vs the fp32 images of the "
                              f"same scheduler and seeds. **Machine:** {machine}", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=COUNT, default=10)
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--schedulers", nargs="+", choices=list(SCHEDULERS), default=list(SCHEDULERS))
    parser.add_argument("--out", type=report_path, default=RESULTS / "calib_schedulers.json")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "budget": args.budget, "rows": [], "machine": machine_info()}
    for label in args.schedulers:  # written after every scheduler: a stopped run keeps what it measured
        result["rows"].append(run_scheduler(label, args.steps, args.budget))
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
