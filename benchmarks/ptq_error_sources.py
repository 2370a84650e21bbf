"""Where mnist-ddpm's W8A8 error comes from: one change of ours W8A8 at a time, PSNR vs fp32 (issue #4).

16 images (seed 123, 100 DDIM steps) of the quantized model (lowered) against the fp32 model's, for
ours W8A8 (32 calibration samples, 20 uniform steps, MSE ranges, split shortcut) and variants that
change one thing: weight-only (W8A16), layers kept in fp32 by glob, timestep groups, range method,
symmetric activations, AdaRound reconstruction, float activations for the shortcut convs (``act_exclude``),
dynamic per-token / per-tensor activations. A quick ablation, not an FID measurement; results
are appended to benchmarks/results/ptq_error_sources_mnist-ddpm.json (or ``--out``; Markdown beside it).

    python benchmarks/ptq_error_sources.py [--threads 1] [--only "w8a8" "w8a16" ...]
"""

from __future__ import annotations

import json
import time

import torch
from cli_options import COUNT, RESULTS, script_parser

import diffusion_accel as da
from diffusion_accel import zoo
from diffusion_accel.eval.machine import machine_info

OUT = RESULTS / "ptq_error_sources_mnist-ddpm.json"
N_IMAGES, STEPS, SEED = 16, 100, 123
BASE = dict(calib_prompts=32, calib_num_steps=STEPS, calib_steps="uniform:20", act_method="mse")
CHANGES = {
    "w8a8": {},
    "w8a16": dict(activations=None),
    "w8a8 no-attn": dict(exclude=("*attentions*",)),
    "w8a8 no-shortcut": dict(exclude=("*conv_shortcut*",)),
    "w8a8 groups4": dict(timestep_groups=4),
    "w8a8 minmax": dict(act_method="minmax"),
    "w8a8 sym": dict(act_symmetric=True),
    "w8a8 recon": dict(reconstruct=True, recon_iters=300, recon_samples=64, recon_batch=8),
    "w8a8 shortcut-a16": dict(act_exclude=("*conv_shortcut",)),  # int8 weights, fp activations there
    "w8a8 dynamic": dict(act_mode="dynamic"),
    "w8a8 dynamic-tensor": dict(act_mode="dynamic_per_tensor"),
    "w8a8 dynamic-tensor shortcut-a16": dict(act_mode="dynamic_per_tensor", act_exclude=("*conv_shortcut",)),
}


def generate(pipe) -> torch.Tensor:
    """(N, H, W, 1) images in [0, 1]."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=N_IMAGES, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
               output_type="np")
    return torch.from_numpy(out.images)


def mean_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((images - reference) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, OUT)
    parser.add_argument("--threads", type=COUNT, default=1)
    parser.add_argument("--only", nargs="*", default=list(CHANGES), choices=list(CHANGES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    report = json.loads(out.read_text()) if out.is_file() else {"machine": machine_info(), "rows": {}}
    reference = generate(zoo.load("mnist-ddpm"))
    for label in args.only:
        pipe, start = zoo.load("mnist-ddpm"), time.perf_counter()
        da.quantize_(pipe, da.PTQConfig.preset("w8a8", **{**BASE, **CHANGES[label]}))
        report["rows"][label] = {"psnr_db": mean_psnr(generate(pipe), reference),
                                 "seconds": time.perf_counter() - start, "changes": repr(CHANGES[label]),
                                 "cpu": machine_label()}
        print(label, report["rows"][label], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(markdown(report))


def machine_label() -> str:
    """CPU model and int8-relevant features: lowering (and so summation order) differs with them."""
    info = machine_info()
    return f"{info['cpu_model']} ({info.get('cpu_features', '')})"


def markdown(report: dict) -> str:
    lines = ["# mnist-ddpm W8A8: one change at a time", "",
             f"{N_IMAGES} images, {STEPS} DDIM steps, seed {SEED}; mean PSNR vs the fp32 model's images. "
             f"Rows without a CPU of their own ran on {report['machine']['cpu_model']} "
             f"({report['machine'].get('cpu_features', '')}).", "",
             "| setting | change | PSNR dB | quantize + generate (s) | CPU |", "|---|---|---|---|---|"]
    for label, row in report["rows"].items():
        lines.append(f"| {label} | `{row['changes']}` | {row['psnr_db']:.2f} | {row['seconds']:.0f} "
                     f"| {row.get('cpu', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
