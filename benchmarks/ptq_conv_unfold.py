"""Is a 3x3 conv faster as unfold + int8 GEMM (torch._int_mm) than as an fp32 / bf16 conv on this CPU?

    python benchmarks/ptq_conv_unfold.py [--out REPORT.json]

SD 1.5 UNet conv shapes at 256 px, batch 2; median of 5 after warm-up, eager and compiled unfold
path. Decides whether ``lower.py`` lowers k x k convs to int8 GEMMs (it does not: mixed by shape, and a bf16
conv beats it at two of the three shapes; lowered k x k convs run oneDNN's int8 convolution where it exists).
Writes ``benchmarks/results/ptq_conv_unfold.{json,md}``.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from cli_options import RESULTS, script_parser

from diffusion_accel.eval.machine import machine_info, machine_summary

SHAPES = [(320, 32), (640, 16), (1280, 8)]  # (channels, latent side) of SD 1.5 resnet convs at 256 px


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def unfold_int8(x: torch.Tensor, w_t: torch.Tensor, scale: float, out_scale: torch.Tensor) -> torch.Tensor:
    """3x3 conv as unfold + quantize + int8 GEMM + rescale; x (N, C, H, W), w_t (C*9, O) int8."""
    n, c, h, w = x.shape
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, c * 9)
    q = torch.clamp(torch.round(cols / scale), -128, 127).to(torch.int8)
    out = torch._int_mm(q, w_t).to(torch.float32) * out_scale
    return out.reshape(n, h * w, -1).transpose(1, 2).reshape(n, -1, h, w)


def measure(channels: int, side: int) -> dict[str, float]:
    x = torch.randn(2, channels, side, side)
    weight = torch.randn(channels, channels, 3, 3) * 0.02
    w_t = torch.randint(-127, 128, (channels * 9, channels), dtype=torch.int8)
    out_scale = torch.rand(channels) * 1e-3
    x_bf16, weight_bf16 = x.bfloat16(), weight.bfloat16()  # a bf16 model holds bf16 weights: casting inside the
    compiled = torch.compile(unfold_int8)                      # timed call made bf16 look up to 2.7x slower
    with torch.inference_mode():
        return {"fp32_conv_ms": median_ms(lambda: F.conv2d(x, weight, padding=1)),
                "bf16_conv_ms": median_ms(lambda: F.conv2d(x_bf16, weight_bf16, padding=1)),
                "unfold_int8_eager_ms": median_ms(lambda: unfold_int8(x, w_t, 0.05, out_scale)),
                "unfold_int8_compiled_ms": median_ms(lambda: compiled(x, w_t, 0.05, out_scale))}


def main(argv: list[str] | None = None) -> None:
    out = script_parser(__doc__, RESULTS / "ptq_conv_unfold.json").parse_args(argv).out
    torch.set_num_threads(2)
    results = {"machine": machine_info(), "load_average": os.getloadavg(),
               "shapes": {f"{c}ch_{s}x{s}": measure(c, s) for c, s in SHAPES}}
    lines = ["# 3x3 conv: fp32 / bf16 conv vs unfold + int8 GEMM (batch 2)", "",
             f"Machine: {machine_summary(results['machine'])}; threads 2, load average {results['load_average']}", "",
             "| shape | fp32 conv | bf16 conv | unfold+int8 eager | unfold+int8 compiled |", "|---|---|---|---|---|"]
    for name, r in results["shapes"].items():
        lines.append(f"| {name} | {r['fp32_conv_ms']:.1f} | {r['bf16_conv_ms']:.1f} | "
                     f"{r['unfold_int8_eager_ms']:.1f} | {r['unfold_int8_compiled_ms']:.1f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
