"""How far do torch.compile'd quantized images move from the eager ones, per backend?

    python benchmarks/compile_quant_drift.py [--steps 6]

Tiny SD (random weights, 32 px, CFG) eager vs compiled with dynamo's ``eager`` backend and with ``inductor``,
for fp32 and lowered W8A8 (static, dynamic per-tensor, 2 timestep groups); PSNR of the compiled images against
the eager ones, beside the quantization's own PSNR against fp32. The eager backend must match exactly (the int8
GEMM rescales in one order either way); inductor's fused float ops may move activations across an int8 rounding
boundary. Writes ``benchmarks/results/compile_quant_drift.{json,md}``.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch._dynamo
from cli_options import COUNT, RESULTS, script_parser

import diffusion_accel as da
from diffusion_accel.eval.machine import machine_info
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

CALIBRATION = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all")
VARIANTS = {"fp32": None, "w8a8 static": {}, "w8a8 dynamic per-tensor": {"act_mode": "dynamic_per_tensor"},
            "w8a8 2 timestep groups": {"timestep_groups": 2}}


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of [0, 1] images against ``reference`` (inf when identical)."""
    mse = float((images - reference).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _db(value: float) -> float | str:
    """A PSNR for the JSON record: 0.1 dB, or "inf" for identical images."""
    return round(value, 1) if math.isfinite(value) else "inf"


def variant_row(settings: dict | None, steps: int) -> dict:
    """Eager and compiled (eager / inductor backends) images of one variant, compared."""
    reference = build_tiny("sd")(**tiny_call_kwargs("sd", steps=steps)).images
    row = {}
    for backend in ("eager", "inductor"):
        pipe = build_tiny("sd")
        if settings is not None:
            da.quantize_(pipe, da.PTQConfig.preset("w8a8", **settings, **CALIBRATION))
        eager = pipe(**tiny_call_kwargs("sd", steps=steps)).images
        torch._dynamo.reset()
        pipe.unet = torch.compile(pipe.unet, backend=backend)
        with torch._dynamo.config.patch(recompile_limit=64):
            compiled = pipe(**tiny_call_kwargs("sd", steps=steps)).images
        torch._dynamo.reset()
        row[f"{backend}_psnr_vs_eager_db"] = _db(psnr(compiled, eager))
        row[f"{backend}_max_abs_diff"] = float((compiled - eager).abs().max())
        row["eager_psnr_vs_fp32_db"] = _db(psnr(eager, reference))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, RESULTS / "compile_quant_drift.json")
    parser.add_argument("--steps", type=COUNT, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {name: variant_row(settings, args.steps) for name, settings in VARIANTS.items()}
    results = {"command": f"python benchmarks/compile_quant_drift.py --steps {args.steps}", "machine": machine_info(),
               "load_average": os.getloadavg(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = [f"Measured by `{results['command']}` (tiny SD, random weights, 32 px, CFG, 1 thread).", "",
             "| variant | eager backend: PSNR vs eager dB / max \\|Δ\\| | inductor: PSNR vs eager dB / max \\|Δ\\| "
             "| eager vs fp32 PSNR dB |", "|---|---|---|---|"]
    lines += [f"| {name} | {row['eager_psnr_vs_eager_db']} / {row['eager_max_abs_diff']:.2g} | "
              f"{row['inductor_psnr_vs_eager_db']} / {row['inductor_max_abs_diff']:.2g} | {row['eager_psnr_vs_fp32_db']} |"
              for name, row in rows.items()]
    lines += ["", "**Machine:** " + ", ".join(f"{k}={v}" for k, v in results["machine"].items())]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
