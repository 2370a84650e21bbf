"""How much faster is GPTQ's calibration when its Hessian sweeps replay the first pass instead of rerunning it?

    python benchmarks/gptq_sweeps.py [--models fashion-sd fashion-flux] [--repeats 3] [--threads 1]

``quantize_(pipe, PTQConfig.preset("w4a8"))`` (GPTQ rounding, its default ``gptq_groups``, no ``calib``) on
each zoo model, timed with the sweeps replaying the stored inputs of the first calibration pass (the
library's behaviour since session 34) and with every sweep rerunning the whole pipeline (the behaviour
before: ``quant.calibrate.replayable`` patched to refuse), the two interleaved, median of ``repeats``.
Both must give bit-identical images (checked). Writes ``benchmarks/results/gptq_sweeps.{json,md}``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from contextlib import nullcontext
from unittest import mock

import torch
from cli_options import COUNT, RESULTS, script_parser

import diffusion_accel as da
from diffusion_accel.eval.machine import machine_info
from diffusion_accel.quant import calibrate as quant_calibrate

MODELS = ("fashion-sd", "fashion-flux")


def quantize_seconds(model: str, replay: bool) -> tuple[float, torch.Tensor]:
    """(wall seconds of ``quantize_`` with the w4a8 preset, a 4-step image of the result)."""
    pipe = da.zoo.load(model)
    pipe.set_progress_bar_config(disable=True)
    patch = mock.patch.object(quant_calibrate, "replayable", lambda calib: None) if not replay else nullcontext()
    with patch:
        start = time.perf_counter()
        da.quantize_(pipe, da.PTQConfig.preset("w4a8"))
        seconds = time.perf_counter() - start
    image = pipe("a photo of a sneaker", num_inference_steps=4, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **da.call_defaults(pipe)).images
    return seconds, image


def measure(model: str, repeats: int) -> dict:
    """Interleaved timings of both variants and whether their images are identical."""
    seconds: dict[str, list[float]] = {"replay": [], "rerun": []}
    images: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for variant in seconds:
            elapsed, images[variant] = quantize_seconds(model, replay=variant == "replay")
            seconds[variant].append(round(elapsed, 2))
    medians = {variant: statistics.median(values) for variant, values in seconds.items()}
    return {"seconds": seconds, "median_s": medians, "speedup": round(medians["rerun"] / medians["replay"], 2),
            "identical_images": bool(torch.equal(images["replay"], images["rerun"]))}


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, RESULTS / "gptq_sweeps.json")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=COUNT, default=3)
    parser.add_argument("--threads", type=COUNT, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = (f"python benchmarks/gptq_sweeps.py --models {' '.join(args.models)} --repeats {args.repeats} "
               f"--threads {args.threads}")
    load_before = os.getloadavg()
    rows = {model: measure(model, args.repeats) for model in args.models}
    results = {"command": command, "machine": machine_info(), "load_average_before": load_before, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = [f"Measured by `{command}` (load average before: {load_before[0]:.2f}); `quantize_` with "
             f"`PTQConfig.preset(\"w4a8\")` (GPTQ), no `calib`, the two variants interleaved.", "",
             "| model | sweeps replay the first pass (s) | every sweep reruns the pipeline (s) | speed-up | "
             "identical images |", "|---|---|---|---|---|"]
    lines += [f"| {model} | {row['median_s']['replay']} ({', '.join(map(str, row['seconds']['replay']))}) | "
              f"{row['median_s']['rerun']} ({', '.join(map(str, row['seconds']['rerun']))}) | "
              f"{row['speedup']}x | {row['identical_images']} |" for model, row in rows.items()]
    lines += ["", "Medians, each run's seconds in brackets.", "",
              "**Machine:** " + ", ".join(f"{k}={v}" for k, v in results["machine"].items())]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
