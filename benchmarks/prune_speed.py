"""Structured-pruning speed and unstructured storage on full-size architectures (random weights), CPU.

Structured 30% (FFN hidden neurons + attention heads, last block dense, magnitude criterion — the
criterion does not change shapes, so speed equals OBS-Diff's; for the UNet also with
``prune_resnets=True``: 30% of every ResNet's inner GroupNorm groups) vs the dense denoiser, both timed in
this process, interleaved (dense, pruned, dense, ...), median of repeats after a warm-up:
SD 1.5 UNet at 256x256 (32x32 latents), batch 2 (CFG), and DiT-XL/2 at 256x256, batch 2.
50% unstructured pruning of the SD 1.5 UNet reports storage only (no sparse CPU kernel exists).

    python benchmarks/prune_speed.py --repeats 5 [--out benchmarks/results/prune_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from cli_options import COUNT, report_path
from safetensors.torch import save_file

from diffusion_accel.eval.machine import machine_info
from diffusion_accel.prune import PruneConfig, prune_denoiser_
from diffusion_accel.prune.serialize import export_prune
from diffusion_accel.testing.fullsize import build_fullsize

RESULTS = Path(__file__).parent / "results"
MODELS = {"dit": {"batch_size": 2, "resolution": 256}, "sd15": {"batch_size": 2, "resolution": 256}}


def time_forward_ms(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one no-grad forward; CPU time is less hurt by a shared machine."""
    with torch.inference_mode():
        start, cpu_start = time.perf_counter(), time.process_time()
        model(**inputs)
        return (time.perf_counter() - start) * 1000.0, (time.process_time() - cpu_start) * 1000.0


def interleaved_medians(dense: torch.nn.Module, pruned: torch.nn.Module, inputs: dict[str, Any],
                        repeats: int) -> dict[str, Any]:
    """Median latency (ms) of both models, one warm-up each, then alternating timed calls."""
    time_forward_ms(dense, inputs), time_forward_ms(pruned, inputs)
    samples: dict[str, list[tuple[float, float]]] = {"dense": [], "pruned": []}
    for _ in range(repeats):
        samples["dense"].append(time_forward_ms(dense, inputs))
        samples["pruned"].append(time_forward_ms(pruned, inputs))
    wall = {k: statistics.median(w for w, _ in v) for k, v in samples.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
    return {"dense_ms": wall["dense"], "pruned_ms": wall["pruned"], "speedup": wall["dense"] / wall["pruned"],
            "dense_cpu_ms": cpu["dense"], "pruned_cpu_ms": cpu["pruned"],
            "cpu_speedup": cpu["dense"] / cpu["pruned"], "samples_wall_cpu_ms": samples}


def structured_speed(name: str, sparsity: float, repeats: int, resnets: bool = False) -> dict[str, Any]:
    """Dense vs structured-pruned latency of full-size model ``name`` (``resnets``: also ResNet channels)."""
    dense, make_inputs = build_fullsize(name)
    pruned = copy.deepcopy(dense)
    report = prune_denoiser_(pruned, PruneConfig(method="magnitude", sparsity=sparsity, pattern="structured",
                                                 prune_resnets=resnets))
    inputs = make_inputs(**MODELS[name])
    result = interleaved_medians(dense, pruned, inputs, repeats)
    print(f"{name}: wall {result['dense_ms']:.0f} -> {result['pruned_ms']:.0f} ms, "
          f"cpu {result['dense_cpu_ms']:.0f} -> {result['pruned_cpu_ms']:.0f} ms", flush=True)
    result |= {"model": name, **MODELS[name], "sparsity": sparsity, "params_dense": report.params_before,
               "params_pruned": report.params_after, "heads_removed": report.heads_removed,
               "neurons_removed": report.neurons_removed, "resnets": resnets,
               "channels_removed": report.channels_removed}
    del dense, pruned
    return result


def unstructured_storage(sparsity: float) -> dict[str, Any]:
    """Artifact bytes of 50% unstructured SD 1.5 UNet vs the dense bytes of the same layers."""
    unet, _ = build_fullsize("sd15")
    report = prune_denoiser_(unet, PruneConfig(method="magnitude", sparsity=sparsity))
    _, tensors = export_prune(unet)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prune.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        stored = path.stat().st_size
    dense = sum(unet.get_submodule(n).weight.numel() * 4 for n in report.layers_pruned)
    return {"model": "sd15", "sparsity": sparsity, "pruned_layers": len(report.layers_pruned),
            "dense_bytes_of_pruned_layers": dense, "artifact_bytes": stored, "ratio": stored / dense,
            "note": "no sparse CPU kernel: latency unchanged; storage only"}


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    info = results["machine"]
    lines = [f"# Structured pruning speed ({info['cpu_model']}, {info['cpu_cores_available']} cores, "
             f"{info['torch_threads']} torch threads, fp32, eager, no torch.compile)", "",
             f"Load average before/after: {results['load_before']} / {results['load_after']} (a high load average means the cores were shared).", "",
             "| model | batch | res | sparsity | units | params dense → pruned | heads / neurons / ResNet channels removed | dense ms | pruned ms | speed-up (wall) | speed-up (CPU time) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["structured"]:
        units = "heads + FFN" + (" + ResNet channels" if r.get("resnets") else "")
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['resolution']} | {r['sparsity']:.0%} | {units} | "
                     f"{r['params_dense'] / 1e6:.1f}M → {r['params_pruned'] / 1e6:.1f}M | {r['heads_removed']} / "
                     f"{r['neurons_removed']} / {r.get('channels_removed', 0)} | {r['dense_ms']:.0f} | "
                     f"{r['pruned_ms']:.0f} | {r['speedup']:.2f}× | {r['cpu_speedup']:.2f}× |")
    s = results.get("unstructured_storage")
    if s:
        lines += ["", f"Unstructured {s['sparsity']:.0%} (SD 1.5 UNet, {s['pruned_layers']} layers): artifact "
                  f"{s['artifact_bytes'] / 2**20:.0f} MiB vs {s['dense_bytes_of_pruned_layers'] / 2**20:.0f} MiB dense "
                  f"({s['ratio']:.2f}×). {s['note']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "\n").splitlines()[0])
    parser.add_argument("--repeats", type=COUNT, default=5)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--skip-storage", action="store_true")
    parser.add_argument("--out", type=report_path, default=RESULTS / "prune_speed.json", help="JSON (Markdown beside it)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine_info(), "load_before": os.getloadavg()[0]}
    results["structured"] = []
    for name in args.models:
        for resnets in ((False, True) if name == "sd15" else (False,)):
            results["structured"].append(structured_speed(name, args.sparsity, args.repeats, resnets))
            write(results, args.out)
    if not args.skip_storage:
        results["unstructured_storage"] = unstructured_storage(0.5)
    write(results, args.out)
    print(markdown(results))


def write(results: dict[str, Any], out: Path) -> None:
    """Write the results so far: JSON to ``out``, Markdown beside it."""
    results["load_after"] = os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")


if __name__ == "__main__":
    main()
