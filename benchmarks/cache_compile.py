"""torch.compile of a cached zoo denoiser: whole denoiser vs the unhooked regions vs eager.

For fashion-sd and fashion-flux (20 steps, the card's guidance, latent output, the project's default
cache from ``default_cache_config``; 1 thread): the first call's wall time (compilation included) and the
median of 6 further calls, for the cached pipeline run eagerly, with ``compile_denoiser(pipe)`` (the whole
denoiser; graph breaks at the cache hooks) and with ``compile_denoiser(pipe, regional=True)`` (only the
largest submodules without hooks), and the uncached pipeline eager and compiled for reference. Each
variant runs in a fresh process, so dynamo's caches start empty.

    python benchmarks/cache_compile.py [--out REPORT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cli_options import RESULTS, script_parser

VARIANTS = {"cached, eager": (True, None), "cached, whole denoiser compiled": (True, "whole"),
            "cached, regions compiled": (True, "regional"), "uncached, eager": (False, None),
            "uncached, compiled": (False, "whole")}
MODELS = ("fashion-sd", "fashion-flux")
STEPS, REPEATS = 20, 6


def measure(model: str, cached: bool, compiled: str | None) -> dict:
    """First-call and median steady-state pipeline seconds of one variant (run in this process)."""
    import torch
    torch.set_num_threads(1)
    import diffusion_accel as da
    from diffusion_accel.eval import compile_denoiser

    pipe = da.zoo.load(model)
    pipe.set_progress_bar_config(disable=True)
    if cached:
        da.enable_cache(pipe, da.default_cache_config(pipe))
    if compiled:
        compile_denoiser(pipe, regional=compiled == "regional")
    kwargs = dict(da.call_defaults(pipe), num_inference_steps=STEPS, output_type="latent")

    def call() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a sneaker", generator=torch.Generator().manual_seed(0), **kwargs)
        return time.perf_counter() - start

    first = call()
    return {"first_call_s": first, "median_call_ms": 1e3 * statistics.median(call() for _ in range(REPEATS))}


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, RESULTS / "cache_compile.json")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "CACHED", "COMPILED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        model, cached, compiled = args.one
        print(json.dumps(measure(model, cached == "1", None if compiled == "-" else compiled)))
        return {}
    import torch

    from diffusion_accel.eval.machine import machine_info, machine_summary

    torch.set_num_threads(1)  # as in every measuring process: the record names their thread count

    rows: dict[str, dict[str, dict]] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for model in MODELS:
        for label, (cached, compiled) in VARIANTS.items():
            done = subprocess.run([sys.executable, __file__, "--one", model, str(int(cached)), compiled or "-"],
                                  capture_output=True, text=True, env=env, check=True)
            rows.setdefault(label, {})[model] = json.loads(done.stdout.strip().splitlines()[-1])
            print(model, label, rows[label][model], flush=True)
    machine = machine_info()
    report = {"steps": STEPS, "repeats": REPEATS, "rows": rows, "machine": machine,
              "command": " ".join(["python", *sys.argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    lines = ["# torch.compile of a cached zoo denoiser: whole vs regions vs eager", "",
             f"{STEPS} steps, the card's guidance, latent output, default cache; first call (s, compilation "
             f"included) / median of {REPEATS} further calls (ms); each variant in a fresh process. "
             f"Machine: {machine_summary(machine)}.", "",
             "| variant | " + " | ".join(f"{model} first (s) | {model} per call (ms)" for model in MODELS) + " |",
             "|---|" + "---|---|" * len(MODELS)]
    lines += [f"| {label} | " + " | ".join(f"{row[m]['first_call_s']:.1f} | {row[m]['median_call_ms']:.0f}"
                                           for m in MODELS) + " |" for label, row in rows.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
