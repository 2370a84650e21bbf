"""Split-shortcut quantization on / off across weight and activation settings (issue #4's gap).

Paired per image: 40 class-cycled prompts on fashion-sd (50 DDIM steps, CFG 3), each quantized
pipeline (simulated, no reconstruction) vs the fp32 images of the same seeds; mean PSNR and the
paired t statistic of split minus plain. Weight scales by max, weight MSE, or output MSE (the weight
error weighted by each input feature's calibrated mean square, which sees the two halves' scales). Writes benchmarks/results/ptq_split_ablation.{json,md}.

    python benchmarks/ptq_split_ablation.py [--out REPORT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_quality import ours  # noqa: E402
from cli_options import RESULTS, script_parser  # noqa: E402
from zoo_harness import generate_images  # noqa: E402
from zoo_quality import DEFAULTS, prompts_for  # noqa: E402

from diffusion_accel import quantize_, zoo  # noqa: E402
from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402

MODEL, N_IMAGES = "fashion-sd", 40
SETTINGS = {  # label -> (bits preset, changes)
    "A8 only (weights fp32)": ("w4a8", dict(weights=None)),
    "W4 only, MSE weight scales": ("w4a8", dict(activations=None)),
    "W4 only, max weight scales": ("w4a8", dict(activations=None, weight_scale="max")),
    "W4 only, output-MSE weight scales": ("w4a8", dict(activations=None, weight_scale="output_mse")),
    "W4A8, MSE weight scales": ("w4a8", {}),
    "W4A8, max weight scales": ("w4a8", dict(weight_scale="max")),
    "W4A8, output-MSE weight scales": ("w4a8", dict(weight_scale="output_mse")),
    "W8A8, max weight scales": ("w8a8", {}),
    "W8A8, output-MSE weight scales": ("w8a8", dict(weight_scale="output_mse")),
}


def images(prompts: list[str], config=None) -> torch.Tensor:
    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        quantize_(pipe, config)
    return generate_images(pipe, prompts, len(prompts), 0, DEFAULTS[MODEL]).float()


def per_image_psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each uint8-range image against its reference."""
    return 10 * torch.log10(255 ** 2 / ((x - ref) ** 2).flatten(1).mean(1).clamp_min(1e-6))


def main(argv: list[str] | None = None) -> dict:
    out = script_parser(__doc__, RESULTS / "ptq_split_ablation.json").parse_args(argv).out
    torch.set_num_threads(1)
    prompts = prompts_for(N_IMAGES, 0)[0]
    ref = images(prompts)
    rows = {}
    for label, (bits, changes) in SETTINGS.items():
        psnr = {split: per_image_psnr(images(prompts, ours(MODEL, bits, split_shortcut=split, lower=False,
                                                             reconstruct=False, **changes)), ref)
                for split in (True, False)}
        diff = psnr[True] - psnr[False]
        rows[label] = {"psnr_split": psnr[True].mean().item(), "psnr_plain": psnr[False].mean().item(),
                       "mean_diff_db": diff.mean().item(), "paired_t": (diff.mean() / (diff.std() / len(diff) ** 0.5)).item(),
                       "split_better": int((diff > 0).sum()), "n": len(diff)}
        print(label, rows[label], flush=True)
    report = {"model": MODEL, "n_images": N_IMAGES, "sampling": DEFAULTS[MODEL], "simulated": True,
              "reconstruct": False, "machine": machine_summary(machine_info()), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    lines = ["# Split shortcut on / off, paired per image (fashion-sd, 40 images, no reconstruction)", "",
             f"PSNR against the fp32 images of the same seeds (simulated). Machine: {report['machine']}.", "",
             "| setting | PSNR split (dB) | PSNR plain (dB) | split − plain | paired t | split better |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {r['psnr_split']:.2f} | {r['psnr_plain']:.2f} | {r['mean_diff_db']:+.2f} | "
              f"{r['paired_t']:+.1f} | {r['split_better']}/{r['n']} |" for k, r in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
