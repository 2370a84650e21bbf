"""Weight rounding and scale search at W4A8, paired per image (issue #4, beyond Q-Diffusion).

Nearest rounding vs GPTQ (Hessian-aware column-by-column rounding) vs AdaRound block
reconstruction (ours W4A8's default), each with weight-MSE or output-MSE scales, on 40
class-cycled prompts of a zoo model (fashion-sd: 50 DDIM steps, CFG 3; fashion-flux: 28 steps,
true CFG 3), simulated (no lowering: the codes are the same). Mean PSNR against the fp32 images of
the same seeds, the paired difference to nearest rounding with weight-MSE scales (and its t
statistic), and the preparation time (calibration + rounding). Writes
benchmarks/results/ptq_rounding_<model>.{json,md}.

    python benchmarks/ptq_rounding.py --model fashion-sd
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_quality import MODELS, ours  # noqa: E402
from ptq_split_ablation import per_image_psnr  # noqa: E402
from cli_options import COUNT, RESULTS, script_parser  # noqa: E402
from zoo_harness import denoiser_attr, generate_images  # noqa: E402
from zoo_quality import DEFAULTS, prompts_for  # noqa: E402

from diffusion_accel import quantize_, zoo  # noqa: E402
from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402

N_IMAGES = 40
REFERENCE = "nearest, weight-MSE scales"
TITLE = "W4A8 weight rounding and scale search"
SETTINGS = {  # label -> changes to ours(model, "w4a8")
    REFERENCE: dict(reconstruct=False),
    "nearest, output-MSE scales": dict(reconstruct=False, weight_scale="output_mse"),
    "GPTQ, weight-MSE scales": dict(reconstruct=False, weight_rounding="gptq", gptq_groups=1),
    "GPTQ, output-MSE scales": dict(reconstruct=False, weight_rounding="gptq", gptq_groups=1,
                                    weight_scale="output_mse"),
    "AdaRound reconstruction, weight-MSE scales (ours W4A8)": {},
    "AdaRound reconstruction, output-MSE scales": dict(weight_scale="output_mse"),
}
UNET_ONLY = {  # does GPTQ, which sees the correlation of the two halves, close the split gap?
    "GPTQ, output-MSE scales, no split shortcut": dict(reconstruct=False, weight_rounding="gptq", gptq_groups=1,
                                                       weight_scale="output_mse", split_shortcut=False),
}


def images(model: str, prompts: list[str], config=None) -> tuple[torch.Tensor, float]:
    """(uint8-range images of ``prompts``, seconds spent quantizing)."""
    pipe = zoo.load(model)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    if config is not None:
        quantize_(pipe, config)
    prepare_s = time.perf_counter() - start
    return generate_images(pipe, prompts, len(prompts), 0, DEFAULTS[model]).float(), prepare_s


def row(psnr: torch.Tensor, reference: torch.Tensor, prepare_s: float) -> dict:
    diff = psnr - reference
    t = (diff.mean() / (diff.std() / len(diff) ** 0.5)).item() if diff.abs().sum() > 0 else 0.0
    return {"psnr_db": psnr.mean().item(), "diff_db": diff.mean().item(), "paired_t": t,
            "better": int((diff > 0).sum()), "n": len(diff), "prepare_s": round(prepare_s, 1)}


def write(model: str, rows: dict, stem: str = "ptq_rounding", title: str = TITLE,
          reference: str = REFERENCE, bits: str = "w4a8", out: Path | None = None) -> None:
    """``out`` (default ``benchmarks/results/<stem>_<model>.json``) and the .md beside it: each setting's
    PSNR, paired against ``reference``."""
    report = {"model": model, "n_images": N_IMAGES, "sampling": DEFAULTS[model], "bits": bits.upper(),
              "simulated": True, "machine": machine_info()["cpu_model"],
              "threads": torch.get_num_threads(), "reference": reference, "rows": rows}
    out = out or RESULTS / f"{stem}_{model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    lines = [f"# {title}, paired per image ({model}, {N_IMAGES} images)", "",
             f"PSNR against the fp32 images of the same seeds; difference and paired t against "
             f"\"{reference}\"; preparation = calibration + rounding, {torch.get_num_threads()} thread(s). "
             f"Machine: {machine_summary(report['machine'])}.", "",
             "| setting | PSNR (dB) | Δ vs reference (dB) | paired t | better | preparation (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {r['psnr_db']:.2f} | {r['diff_db']:+.2f} | {r['paired_t']:+.1f} | "
              f"{r['better']}/{r['n']} | {r['prepare_s']:.0f} |" for k, r in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def run_settings(model: str, settings: dict[str, dict], reference: str, stem: str, title: str,
                 threads: int = 1, bits: str = "w4a8", out: Path | None = None) -> dict:
    """Images of ``ours(model, bits, lower=False, **changes)`` for every setting, paired per image
    against ``reference`` (a key of ``settings``, run first); rewrites the report after each."""
    torch.set_num_threads(threads)
    prompts = prompts_for(N_IMAGES, 0)[0]
    fp32 = images(model, prompts)[0]
    psnr, rows = {}, {}
    for label in [reference, *(k for k in settings if k != reference)]:
        quantized, prepare_s = images(model, prompts, ours(model, bits, lower=False, **settings[label]))
        psnr[label] = per_image_psnr(quantized, fp32)
        rows[label] = row(psnr[label], psnr[reference], prepare_s)
        print(label, rows[label], flush=True)
        write(model, rows, stem, title, reference, bits, out)
    return rows


def settings_cli(doc: str, models: tuple[str, ...], default_model: str,
                 argv: list[str] | None = None) -> argparse.Namespace:
    """``--model``, ``--threads`` and ``--out`` (default ``benchmarks/results/<stem>_<model>.json``) of the
    scripts built on ``run_settings``, parsed before any work."""
    parser = script_parser(doc, None)
    parser.add_argument("--model", choices=models, default=default_model)
    parser.add_argument("--threads", type=COUNT, default=1)
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="run only the settings whose label contains one of these (the reference always runs); "
                             "give --out too, else the model's full report is overwritten by the subset")
    return parser.parse_args(argv)


def selected(settings: dict[str, dict], reference: str, only: list[str] | None) -> dict[str, dict]:
    """``settings`` limited to ``--only`` (labels containing one of its texts) and the reference."""
    if not only:
        return settings
    chosen = {label: changes for label, changes in settings.items()
              if label == reference or any(text in label for text in only)}
    if len(chosen) == 1:
        raise SystemExit(f"--only {only} matches no setting; labels: {list(settings)}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    args = settings_cli(__doc__, MODELS, "fashion-sd", argv)
    settings = SETTINGS | (UNET_ONLY if denoiser_attr(args.model) == "unet" else {})
    run_settings(args.model, selected(settings, REFERENCE, args.only), REFERENCE, "ptq_rounding", TITLE,
                 args.threads, out=args.out)


if __name__ == "__main__":
    main()
