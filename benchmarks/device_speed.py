"""Denoiser speed of every technique on one device, for the GPU runs the issues ask for "when a GPU is
available" (#4 W8A8 vs bf16 compiled, fp8; #5 structured and 2:4 sparse kernels).

    python benchmarks/device_speed.py --device cuda                      # SD 1.5 UNet, all variants
    python benchmarks/device_speed.py --device cuda --model dit --only dense structured
    python benchmarks/device_speed.py --device cpu --smoke               # tiny shapes: the script end to end

Each run writes its own report, ``results/device_speed_<device>_<model>[_<N>px][_smoke].json`` (an ``--only``
run holds only its groups: give ``--out`` to keep a committed report whole). ``--smoke`` also forces the fp8
kernel path (torch's CPU ``_scaled_mm`` is exact, just slow) so that every code path runs on a machine without a
GPU.

Full-size published architectures with random weights (speed does not depend on weight values), 256 px,
batch 2 (CFG). Every variant is timed in this process on the same inputs: median of ``--repeats`` after
one warm-up (compilation included in the warm-up; CUDA events on GPU). Ratios are against bf16
compiled, the GPU baseline users run. Variants (``--only`` picks groups):

- ``dense``: fp32 eager, bf16 eager, bf16 compiled.
- ``w8a8``: our W8A8, calibrated through a real pipeline (1 prompt, 2 steps, CFG) and lowered, run in
  bf16: int8 ``torch._int_mm`` for Linear and 1x1 layers; k x k convs use oneDNN's int8 conv on CPU and
  a dequantized bf16 conv elsewhere (``summary`` in the JSON says which layer runs what). Compiled
  also with inductor's ``force_fuse_int_mm_with_mul`` (the rescale fused into the int8 GEMM, as
  torchao recommends), and W8A8 on the Linear layers only (convs bf16), to see where the GPU time goes.
- ``fp8``: fp8 weights and activations on the Linear layers (``torch._scaled_mm``), CUDA >= 8.9 only.
- ``w4a16``: int4 weight-only, group 128, on the Linear layers: tinygemm (``torch._weight_int4pack_mm``) on
  CUDA in bf16, dequantized per call elsewhere.
- ``structured``: 30% of heads + FFN neurons (+ ResNet channel groups on UNets), bf16 compiled.
- ``2of4``: 2:4 magnitude pruning of the Linear layers with PyTorch semi-structured sparse kernels
  (CUDA >= 8.0, bf16), through its default library (cuSPARSELt) and through CUTLASS (compute
  capability 8.x only); elsewhere the JSON records that no sparse kernel ran.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from diffusion_accel.eval.machine import machine_info
from diffusion_accel.eval.timing import time_callable
from diffusion_accel.prune import PruneConfig, prune_denoiser_
from diffusion_accel.prune.sparse import enable_sparse_kernels
from diffusion_accel.quant import PTQConfig, quantize_, summary
from diffusion_accel.quant import fp8
from diffusion_accel.testing.fullsize import build_fullsize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_options import COUNT, report_path  # noqa: E402
from ptq_speed import sd15_pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("dense", "w8a8", "fp8", "w4a16", "structured", "2of4")
SMOKE = {"sd15": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=4,
                      cross_attention_dim=64, norm_num_groups=8),
         "dit": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8)}


def as_dtype(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``inputs`` with floating tensors cast to ``dtype`` (timesteps included, as pipelines pass them)."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


class Timer:
    """Times denoisers on fixed inputs and keeps the results (ms) by variant name."""

    def __init__(self, inputs: dict[str, Any], device: torch.device, repeats: int, compile_mode: str | None) -> None:
        self.inputs, self.device, self.repeats, self.compile_mode = inputs, device, repeats, compile_mode
        self.results: dict[str, Any] = {}

    def time(self, name: str, module: nn.Module, dtype: torch.dtype, compiled: bool, **extra: Any) -> None:
        """Median latency of ``module`` on the inputs cast to ``dtype`` (compiled if asked)."""
        model = torch.compile(module, mode=self.compile_mode) if compiled else module
        inputs = as_dtype(self.inputs, dtype)
        with torch.inference_mode():
            stats = time_callable(lambda: model(**inputs), warmup=1, repeats=self.repeats, device=self.device)
        self.results[name] = {"median_ms": stats.median_ms, "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms,
                              "dtype": str(dtype).replace("torch.", ""), "compiled": compiled, **extra}
        print(name, f"{stats.median_ms:.1f} ms", flush=True)
        if compiled:
            torch._dynamo.reset()


def dense_variants(timer: Timer, denoiser: nn.Module) -> None:
    timer.time("fp32_eager", denoiser, torch.float32, False)
    bf16 = copy.deepcopy(denoiser).to(torch.bfloat16)
    timer.time("bf16_eager", bf16, torch.bfloat16, False)
    timer.time("bf16_compiled", bf16, torch.bfloat16, True)


def quantized_unet(model: str, device: torch.device, config: PTQConfig, smoke: bool,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None) -> tuple[nn.Module, str]:
    """The SD 1.5 UNet quantized through a real pipeline on ``device``; (denoiser, layer summary)."""
    if model != "sd15":
        raise ValueError(f"PTQ variants calibrate through a pipeline, which only 'sd15' has here; got {model!r}")
    pipe = sd15_pipeline(**(SMOKE["sd15"] if smoke else {}))[0].to(device)
    start = time.perf_counter()
    quantize_(pipe, config, filter_fn=filter_fn)
    return pipe.unet, f"{summary(pipe)}\n  calibration + quantization wall time: {time.perf_counter() - start:.1f} s"


def ptq_config(fmt: str, resolution: int) -> PTQConfig:
    """``fmt`` weights and activations, calibrated on 1 prompt x 2 steps with CFG at ``resolution`` px, lowered."""
    return PTQConfig(weights=fmt, activations=fmt, calib_prompts=1, calib_num_steps=2, calib_steps="all",
                     calib_guidance_scale=7.5, calib_kwargs=(("height", resolution), ("width", resolution)),
                     lower=True)


def w8a8_variants(timer: Timer, model: str, smoke: bool, resolution: int) -> None:
    unet, text = quantized_unet(model, timer.device, ptq_config("int8", resolution), smoke)
    unet.to(torch.bfloat16)
    timer.time("w8a8_bf16_eager", unet, torch.bfloat16, False, summary=text)
    timer.time("w8a8_bf16_compiled", unet, torch.bfloat16, True)
    with torch._inductor.config.patch(force_fuse_int_mm_with_mul=True):  # torchao's recommended setting
        timer.time("w8a8_bf16_compiled_fused_rescale", unet, torch.bfloat16, True,
                   note="inductor force_fuse_int_mm_with_mul: the int8 product's rescale fused into the GEMM")
    del unet
    gc.collect()
    linear_only, text = quantized_unet(model, timer.device, ptq_config("int8", resolution), smoke,
                                       filter_fn=lambda module, name: isinstance(module, nn.Linear))
    linear_only.to(torch.bfloat16)
    timer.time("w8a8_linear_bf16_compiled", linear_only, torch.bfloat16, True, summary=text,
               note="Linear layers only: convs stay bf16 (no int8 conv kernel off CPU)")


def fp8_variants(timer: Timer, model: str, smoke: bool, resolution: int) -> None:
    """fp8 on the Linear layers only: fp8 k x k convs have no kernel and would stay simulated."""
    if not fp8.fp8_kernel_available(timer.device):
        timer.results["fp8"] = {"skipped": f"no fp8 tensor cores on {timer.device} (needs CUDA capability >= 8.9)"}
        return
    unet, text = quantized_unet(model, timer.device, ptq_config("fp8", resolution), smoke,
                                filter_fn=lambda module, name: isinstance(module, nn.Linear))
    unet.to(torch.bfloat16)
    timer.time("fp8_linear_bf16_compiled", unet, torch.bfloat16, True, summary=text)


def w4a16_variants(timer: Timer, model: str, smoke: bool, resolution: int) -> None:
    """int4 weight-only (group 128) on the Linear layers: tinygemm on CUDA in bf16 (``quant.tinygemm``);
    int4 k x k convs have no kernel and would dequantize per call."""
    config = ptq_config("int8", resolution).with_(weights="int4", activations=None, weight_granularity="group",
                                                  group_size=128)
    unet, text = quantized_unet(model, timer.device, config, smoke,
                                filter_fn=lambda module, name: isinstance(module, nn.Linear))
    unet.to(torch.bfloat16)
    timer.time("w4a16_linear_bf16_eager", unet, torch.bfloat16, False, summary=text)
    timer.time("w4a16_linear_bf16_compiled", unet, torch.bfloat16, True)


def structured_variants(timer: Timer, denoiser: nn.Module, model: str) -> None:
    pruned = copy.deepcopy(denoiser)
    report = prune_denoiser_(pruned, PruneConfig(method="magnitude", sparsity=0.3, pattern="structured",
                                                 prune_resnets=model == "sd15"))
    pruned.to(torch.bfloat16)
    timer.time("structured30_bf16_compiled", pruned, torch.bfloat16, True,
               params_before=report.params_before, params_after=report.params_after)


def two_four_variants(timer: Timer, denoiser: nn.Module) -> None:
    """2:4 magnitude pruning of every prunable Linear, then semi-structured sparse kernels in bf16, through
    PyTorch's default library (cuSPARSELt where built in) and through CUTLASS."""
    pruned = copy.deepcopy(denoiser)
    report = prune_denoiser_(pruned, PruneConfig(method="magnitude", sparsity=None, pattern="2:4",
                                                 sparse_kernels=False))
    pruned.to(torch.bfloat16)
    for backend, label in (("auto", "2of4"), ("cutlass", "2of4_cutlass")):
        model = copy.deepcopy(pruned)
        kernels = enable_sparse_kernels(model, report.layers_pruned, "2:4", backend=backend)
        if backend != "auto" and "enabled" not in kernels:  # the dense model was timed above already
            timer.results[f"{label}_bf16"] = {"skipped": kernels}
            continue
        timer.time(f"{label}_bf16_eager", model, torch.bfloat16, False, sparse_kernels=kernels)
        try:
            timer.time(f"{label}_bf16_compiled", model, torch.bfloat16, True, sparse_kernels=kernels)
        except Exception as error:  # semi-structured tensors under torch.compile vary by torch build
            timer.results[f"{label}_bf16_compiled"] = {"failed": f"{type(error).__name__}: {error}"[:300]}


def ratios(results: dict[str, Any]) -> None:
    """Add speed-up vs bf16 compiled and vs fp32 eager to every timed variant."""
    base = results.get("bf16_compiled", {}).get("median_ms")
    fp32 = results.get("fp32_eager", {}).get("median_ms")
    for item in results.values():
        if "median_ms" in item:
            item["vs_bf16_compiled"] = base / item["median_ms"] if base else None
            item["vs_fp32_eager"] = fp32 / item["median_ms"] if fp32 else None


def markdown(report: dict[str, Any]) -> str:
    """A Markdown table of the variants of ``report``."""
    m = report["machine"]
    lines = [f"# Denoiser speed on {m.get('device', report['device'])}: {report['model']}"
             + (" (smoke shapes)" if report["smoke"] else "") + f", {report['resolution']} px, batch 2", "",
             f"torch {m.get('torch_version')}; CPU {m.get('cpu_model')}; median of {report['repeats']} after one warm-up "
             f"(compilation in the warm-up); torch.compile mode: {report.get('compile_mode') or 'default'}; "
             "random weights.", "",
             "| variant | median ms | vs bf16 compiled | vs fp32 eager | note |", "|---|---|---|---|---|"]
    for name, item in report["variants"].items():
        if "median_ms" not in item:
            lines.append(f"| {name} | | | | {item.get('skipped') or item.get('failed')} |")
            continue
        note = item.get("sparse_kernels") or item.get("note") or (
            f"{item['params_before'] / 1e6:.0f}M → {item['params_after'] / 1e6:.0f}M params" if "params_after" in item else "")
        fmt = lambda r: f"{r:.2f}×" if r else ""  # noqa: E731
        lines.append(f"| {name} | {item['median_ms']:.1f} | {fmt(item['vs_bf16_compiled'])} | "
                     f"{fmt(item['vs_fp32_eager'])} | {note} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    overrides = SMOKE[args.model] if args.smoke else {}
    denoiser, make_inputs = build_fullsize(args.model, device=device, **overrides)
    resolution = args.resolution or (64 if args.smoke else 256)
    timer = Timer(make_inputs(batch_size=2, resolution=resolution), device, args.repeats, args.compile_mode)
    report = {"machine": machine_info(device), "device": str(device), "model": args.model, "smoke": args.smoke,
              "resolution": resolution, "repeats": args.repeats, "compile_mode": args.compile_mode,
              "variants": timer.results}
    steps: dict[str, Callable[[], None]] = {
        "dense": lambda: dense_variants(timer, denoiser),
        "w8a8": lambda: w8a8_variants(timer, args.model, args.smoke, resolution),
        "fp8": lambda: fp8_variants(timer, args.model, args.smoke, resolution),
        "w4a16": lambda: w4a16_variants(timer, args.model, args.smoke, resolution),
        "structured": lambda: structured_variants(timer, denoiser, args.model),
        "2of4": lambda: two_four_variants(timer, denoiser)}
    for group in args.only:
        steps[group]()
        gc.collect()
        ratios(timer.results)
        write(report, args.out)
    return report


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(SMOKE), default="sd15")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--repeats", type=COUNT, default=10)
    parser.add_argument("--resolution", type=COUNT, default=None, help="pixels (default 256; 64 with --smoke)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes of the same architectures")
    parser.add_argument("--out", type=report_path, default=None)
    args = parser.parse_args(argv)
    if args.model != "sd15":  # the PTQ groups quantize the SD 1.5 UNet only
        skipped = [g for g in args.only if g in ("w8a8", "fp8", "w4a16")]
        args.only = [g for g in args.only if g not in skipped]
        if not args.only:  # timed nothing and exited 0
            parser.error(f"--only {skipped} time the SD 1.5 UNet only; --model {args.model} takes "
                         f"{[g for g in GROUPS if g not in ('w8a8', 'fp8', 'w4a16')]}")
        if skipped:
            print(f"--model {args.model}: skipping {skipped} (SD 1.5 only)", flush=True)
    size = f"_{args.resolution}px" if args.resolution else ""
    smoke = "_smoke" if args.smoke else ""  # tiny shapes never land on a full run's committed report
    args.out = args.out or RESULTS / f"device_speed_{args.device.split(':')[0]}_{args.model}{size}{smoke}.json"
    if args.smoke:
        fp8.fp8_kernel_available = lambda device: True  # exercise the kernel path (see the module doc)
    report = run(args)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
