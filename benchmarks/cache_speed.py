"""DeepCache speed on the full-size SD 1.5 UNet (random weights) on this machine.

The pipeline is the tiny SD pipeline with its UNet replaced by the published SD 1.5 UNet
architecture and a 768-wide 2-layer CLIP text tower; the tiny VAE (scale 2) at 64x64 pixels gives
32x32 latents, i.e. the UNet works exactly as for SD 1.5 at 256x256. Baseline and every config are
timed in this process round-robin (each repeat times every config once, so load drift hits all
alike), median of repeats after a warm-up round, wall and process CPU time, CFG on (batch 2). The
deepcache package is timed side by side when installed.

    python benchmarks/cache_speed.py --steps 6 --repeats 3
    python benchmarks/cache_speed.py --device cuda --dtype bfloat16 --steps 50 --out benchmarks/results/cache_speed_cuda.json

On CUDA every call is synchronised before the clock stops; the CPU-time column is then meaningless.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from cli_options import COUNT, report_path

from diffusion_accel.cache import DeepCacheConfig, enable_cache, remove_cache
from diffusion_accel.eval.machine import machine_info
from diffusion_accel.testing.fullsize import sd15_unet
from diffusion_accel.testing.tiny import tiny_clip_text, tiny_sd_pipeline

RESULTS = Path(__file__).parent / "results"
INTERVALS = (2, 3, 5)


def build_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Tiny SD pipeline carrying the full-size SD 1.5 UNet and a 768-wide text tower, on ``device``."""
    pipe = tiny_sd_pipeline()
    pipe.unet, _ = sd15_unet()
    pipe.text_encoder = tiny_clip_text(hidden=768, projection_dim=768)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def call_kwargs(steps: int) -> Callable[[], dict[str, Any]]:
    return lambda: {"prompt": "a red bicycle", "num_inference_steps": steps, "height": 64, "width": 64,
                    "guidance_scale": 7.5, "output_type": "latent",
                    "generator": torch.Generator().manual_seed(0)}


def deepcache_helper(pipe: Any, interval: int) -> Any:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    return helper


def configs(pipe: Any) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """(name, enable, disable) for the baseline, ours and the deepcache package at each interval."""
    entries = [("baseline", lambda: None, lambda: None)]
    has_package = importlib.util.find_spec("DeepCache") is not None
    for interval in INTERVALS:
        config = DeepCacheConfig(interval=interval, branch=0)
        entries.append((f"ours_interval{interval}", lambda c=config: enable_cache(pipe, c),
                        lambda: remove_cache(pipe)))
        if has_package:
            helper = deepcache_helper(pipe, interval)
            entries.append((f"deepcache_pkg_interval{interval}", helper.enable, helper.disable))
    return entries


def timed_call(pipe: Any, kwargs: Callable[[], dict[str, Any]]) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one pipeline call (CUDA work synchronised)."""
    wall, cpu = time.perf_counter(), time.process_time()
    pipe(**kwargs())
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def run(steps: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Round-robin: every repeat times each config once, so load drift hits all configs alike."""
    pipe, kwargs = build_pipeline(device, dtype), call_kwargs(steps)
    entries = configs(pipe)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in entries}
    for round_index in range(repeats + 1):  # round 0 is the warm-up
        for name, enable, disable in entries:
            enable()
            sample = timed_call(pipe, kwargs)
            disable()
            if round_index:
                samples[name].append(sample)
    return {name: {"wall_ms": [w for w, _ in values], "cpu_ms": [c for _, c in values],
                   "median_wall_ms": statistics.median(w for w, _ in values),
                   "median_cpu_ms": statistics.median(c for _, c in values)}
            for name, values in samples.items()}


def speedups(timings: dict[str, Any]) -> dict[str, dict[str, float]]:
    base = timings["baseline"]
    return {name: {"wall": base["median_wall_ms"] / t["median_wall_ms"],
                   "cpu": base["median_cpu_ms"] / t["median_cpu_ms"]}
            for name, t in timings.items()}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# DeepCache on the SD 1.5 UNet (random weights), {result.get('device', 'cpu')}", "",
             f"{result['setup']}", "",
             f"Machine: {result['machine'].get('device', 'cpu')}, CPU {result['machine']['cpu_model']}, "
             f"{result['machine']['cpu_cores_available']} cores, torch threads "
             f"{result['machine']['torch_threads']}, load average before run {result['load_before']}, "
             f"after {result['load_after']}; no torch.compile; {result.get('dtype', 'float32')}.", "",
             "| config | pipeline median ms (wall) | median CPU ms | speed-up wall | speed-up CPU time |",
             "|---|---|---|---|---|"]
    for name, t in result["timings"].items():
        s = result["speedups"][name]
        lines.append(f"| {name} | {t['median_wall_ms']:.0f} | {t['median_cpu_ms']:.0f} | "
                     f"{s['wall']:.2f}x | {s['cpu']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "\n").splitlines()[0])
    parser.add_argument("--steps", type=COUNT, default=6)
    parser.add_argument("--repeats", type=COUNT, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--out", type=report_path, default=RESULTS / "cache_speed.json", help="JSON (Markdown beside it)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    timings = run(args.steps, args.repeats, args.device, getattr(torch, args.dtype))
    result = {"setup": f"SD 1.5 UNet (859.5M params, random weights) at 32x32 latents (256x256-pixel "
                       f"equivalent), {args.steps} DDIM steps, CFG 7.5 (batch 2), branch 0, median of "
                       f"{args.repeats} round-robin rounds after 1 warm-up round",
              "machine": machine_info(args.device), "device": args.device, "dtype": args.dtype,
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "timings": timings, "speedups": speedups(timings)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
