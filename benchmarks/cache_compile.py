"""torch.compile of a cached zoo denoiser: whole denoiser vs regions vs eager.

For fashion-sd and fashion-flux with the project's default cache (``default_cache_config``), and fashion-flux
with First-Block-Cache (threshold 0.16) and TeaCache (threshold 0.4, coefficients fitted here on 4 prompts),
the settings that reached 2x in ``cache_flux.md`` (20 steps, the card's guidance, latent output; 1 thread):
the first call's wall time (compilation included) and the median of 6 further calls, for the cached pipeline
run eagerly, with ``compile_denoiser(pipe, regional=False)`` (the whole denoiser with its hooks) and
``regional=True`` (the largest submodules without hooks, and every cache-hooked transformer block beneath its
hook), and the uncached pipeline eager and compiled for reference. Each variant runs in a fresh process, so
dynamo's caches start empty; each cell is the median of ``--rounds`` sweeps over all variants.

    python benchmarks/cache_compile.py [--rounds 3] [--out REPORT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cli_options import COUNT, RESULTS, script_parser

VARIANTS = {"cached, eager": (True, None), "cached, whole denoiser compiled": (True, "whole"),
            "cached, regions compiled": (True, "regional"), "uncached, eager": (False, None),
            "uncached, compiled": (False, "whole")}
COLUMNS = (("fashion-sd", "default"), ("fashion-flux", "default"), ("fashion-flux", "first-block"),
           ("fashion-flux", "teacache"))
STEPS, REPEATS = 20, 6
FIRST_BLOCK_THRESHOLD, TEACACHE_THRESHOLD = 0.16, 0.4
FIT_PROMPTS = ["a small picture of a sneaker", "a photo of a pullover", "a photo of a sandal",
               "a product photo of a dress"]


def cache_config(pipe, cache: str, coefficients: list[float] | None):
    """The cache a column names."""
    import diffusion_accel as da

    if cache == "default":
        return da.default_cache_config(pipe)
    if cache == "first-block":
        return da.FirstBlockCacheConfig(threshold=FIRST_BLOCK_THRESHOLD)
    return da.TeaCacheConfig(threshold=TEACACHE_THRESHOLD, coefficients=tuple(coefficients))


def measure(model: str, cache: str | None, compiled: str | None, coefficients: list[float] | None = None) -> dict:
    """First-call and median steady-state pipeline seconds of one variant (run in this process)."""
    import torch
    torch.set_num_threads(1)
    import diffusion_accel as da
    from diffusion_accel.eval import compile_denoiser

    pipe = da.zoo.load(model)
    pipe.set_progress_bar_config(disable=True)
    if cache:
        da.enable_cache(pipe, cache_config(pipe, cache, coefficients))
    if compiled:
        compile_denoiser(pipe, regional=compiled == "regional")
    kwargs = dict(da.call_defaults(pipe), num_inference_steps=STEPS, output_type="latent")

    def call() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a sneaker", generator=torch.Generator().manual_seed(0), **kwargs)
        return time.perf_counter() - start

    first = call()
    record = da.cache.summary(pipe) if cache else {"reused_calls": 0, "steps": []}
    return {"first_call_s": first, "median_call_ms": 1e3 * statistics.median(call() for _ in range(REPEATS)),
            "reused_calls": record["reused_calls"], "calls": len(record["steps"])}


def median_row(runs: list[dict]) -> dict:
    """Per field, the median over a cell's rounds."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def fitted_coefficients() -> list[float]:
    """TeaCache's rescaling polynomial for fashion-flux, fitted on uncached runs of ``FIT_PROMPTS``."""
    import diffusion_accel as da

    pipe = da.zoo.load("fashion-flux")
    pipe.set_progress_bar_config(disable=True)
    return list(da.fit_teacache_coefficients(pipe, FIT_PROMPTS, num_inference_steps=STEPS, seed=0,
                                             **da.call_defaults(pipe)))


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, RESULTS / "cache_compile.json")
    parser.add_argument("--rounds", type=COUNT, default=3,
                        help="sweeps over every variant; the table shows each cell's median over them (default 3)")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "CACHE", "COMPILED", "COEFFICIENTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        model, cache, compiled, coefficients = args.one
        print(json.dumps(measure(model, None if cache == "-" else cache, None if compiled == "-" else compiled,
                                 json.loads(coefficients))))
        return {}
    import torch

    from diffusion_accel.eval.machine import machine_info, machine_summary

    torch.set_num_threads(1)  # as in every measuring process: the record names their thread count
    coefficients = fitted_coefficients()
    runs: dict[str, dict[str, list[dict]]] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(args.rounds):  # whole sweeps, so that a slow spell of a shared machine hits every variant
        uncached: dict[tuple[str, str | None], dict] = {}  # the uncached rows, once per model and round
        for model, cache in COLUMNS:
            for label, (cached, compiled) in VARIANTS.items():
                if cached or (model, compiled) not in uncached:
                    done = subprocess.run([sys.executable, __file__, "--one", model, cache if cached else "-",
                                           compiled or "-", json.dumps(coefficients)],
                                          capture_output=True, text=True, env=env, check=True)
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    if not cached:
                        uncached[model, compiled] = row
                run = row if cached else uncached[model, compiled]
                runs.setdefault(label, {}).setdefault(f"{model} {cache}", []).append(run)
                print(model, cache, label, run, flush=True)
    rows = {label: {column: median_row(values) for column, values in row.items()} for label, row in runs.items()}
    machine = machine_info()
    report = {"steps": STEPS, "repeats": REPEATS, "rounds": args.rounds, "rows": rows, "runs": runs,
              "machine": machine,
              "teacache_coefficients": coefficients,
              "thresholds": {"first-block": FIRST_BLOCK_THRESHOLD, "teacache": TEACACHE_THRESHOLD},
              "command": " ".join(["python", *sys.argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    columns = [f"{model} {cache}" for model, cache in COLUMNS]
    lines = ["# torch.compile of a cached zoo denoiser: whole vs regions vs eager", "",
             f"{STEPS} steps, the card's guidance, latent output; caches: each model's default, and on fashion-flux "
             f"First-Block-Cache (threshold {FIRST_BLOCK_THRESHOLD}) and TeaCache (threshold {TEACACHE_THRESHOLD}, "
             f"fitted coefficients); first call (s, compilation included) / median of {REPEATS} further calls (ms), "
             f"each cell the median over {args.rounds} rounds of the whole sweep, each variant in a fresh process. "
             "Reused / all denoiser calls of the last call per column: "
             + ", ".join(f"{c} {rows['cached, eager'][c]['reused_calls']}/{rows['cached, eager'][c]['calls']}"
                         for c in columns)
             + f". Machine: {machine_summary(machine)}.", "",
             "| variant | " + " | ".join(f"{c} first (s) | {c} per call (ms)" for c in columns) + " |",
             "|---|" + "---|---|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(f"{row[c]['first_call_s']:.1f} | {row[c]['median_call_ms']:.0f}"
                                           for c in columns) + " |" for label, row in rows.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
