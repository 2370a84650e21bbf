"""Where does a cache's FID change come from? FID split into its mean and covariance terms, and the pixel
statistics that move with them, for the baseline and variants of a zoo benchmark report.

    python benchmarks/fid_decomposition.py --variants diffusers-taylorseer ours-calibrated-output-11

FID = ||mu_g - mu_r||^2 + [Tr S_g + Tr S_r - 2 Tr (S_r^1/2 S_g S_r^1/2)^1/2]: the first term is how far the
mean Inception feature moved, the second how the spread differs. Beside them, per image: mean intensity,
contrast (pixel std), sharpness (mean squared 4-neighbour Laplacian) and ink fraction (pixels above
10% grey), for the same 2,000 images of each variant (the report's prompts and seeds; regenerated or
reused as ``fid_bootstrap.py`` does) and for the real test split. A variant whose FID falls below the
baseline's by moving these statistics toward the real images' is closer to the data by departing from
the model, not by reproducing it. Writes JSON + Markdown at ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_options import COUNT, existing_file, report_path  # noqa: E402
from fid_bootstrap import kept_features, open_report, variant_images  # noqa: E402
from zoo_harness import RESULTS, write_result  # noqa: E402

from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402
from diffusion_accel.zoo.data import load_split, to_uint8_rgb32  # noqa: E402

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)


def fid_terms(feats: torch.Tensor, ref_mean: torch.Tensor, ref_cov: torch.Tensor) -> dict[str, float]:
    """FID of ``feats`` (N, D) against the reference statistics, as its mean and covariance terms."""
    mean = feats.mean(0)
    centered = feats - mean
    cov = centered.T @ centered / (len(feats) - 1)
    values, vectors = torch.linalg.eigh(ref_cov)
    ref_sqrt = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    middle = ref_sqrt @ cov @ ref_sqrt
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    mean_term = float((mean - ref_mean).square().sum())
    cov_term = float(ref_cov.trace() + cov.trace() - 2 * trace_sqrt)
    return {"fid": mean_term + cov_term, "mean_term": mean_term, "cov_term": cov_term, "trace_cov": float(cov.trace())}


def pixel_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image statistics of uint8 (N, 3, H, W) images, on their grey level in [0, 1]: (N,) each."""
    grey = images.float().mean(1, keepdim=True) / 255
    laplacian = F.conv2d(grey, LAPLACIAN, padding=1)[:, :, 1:-1, 1:-1]
    return {"mean": grey.mean((1, 2, 3)), "contrast": grey.std((1, 2, 3)),
            "sharpness": laplacian.square().mean((1, 2, 3)), "ink": (grey > 0.1).float().mean((1, 2, 3))}


def summary(stats: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Mean of each statistic; against the baseline's images (same prompts and seeds) also the paired
    mean difference and the fraction of images where the variant's value is higher."""
    row: dict[str, Any] = {name: float(values.mean()) for name, values in stats.items()}
    if baseline is not None:
        for name, values in stats.items():
            row[f"{name}_paired_delta"] = float((values - baseline[name]).mean())
            row[f"{name}_higher_fraction"] = float((values > baseline[name]).float().mean())
    return row


def markdown(result: dict) -> str:
    real = result["real"]
    lines = [f"# FID decomposition and pixel statistics on {result['model']}", "",
             f"Machine: {machine_summary(result['machine'])}.", "",
             f"{result['n']} images per variant ({result['report']}'s prompts and seeds); FID against the "
             f"test-split statistics, split into the mean term ||mu_g - mu_r||^2 and the covariance term; "
             f"pixel statistics on the grey level in [0, 1], mean over images (paired Δ vs the baseline's images "
             f"of the same seeds; real: {real['n']} test images).", "",
             "| images | FID | mean term | cov term | Tr Σ_g | mean | contrast | sharpness ×1e3 | ink |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        paired = name != "baseline"
        cells = [f"{row[key]:.4f}" + (f" ({row[f'{key}_paired_delta']:+.4f})" if paired else "")
                 for key in ("mean", "contrast")]
        sharp = f"{row['sharpness'] * 1e3:.2f}" + (f" ({row['sharpness_paired_delta'] * 1e3:+.2f}, higher in "
                                                   f"{row['sharpness_higher_fraction']:.0%})" if paired else "")
        ink = f"{row['ink']:.4f}" + (f" ({row['ink_paired_delta']:+.4f})" if paired else "")
        lines.append(f"| {name} | {row['fid']:.2f} | {row['mean_term']:.2f} | {row['cov_term']:.2f} | "
                     f"{row['trace_cov']:.1f} | {' | '.join(cells)} | {sharp} | {ink} |")
    lines.append(f"| real test images | — | — | — | — | {real['mean']:.4f} | {real['contrast']:.4f} | "
                 f"{real['sharpness'] * 1e3:.2f} | {real['ink']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=existing_file, default=RESULTS / "cache_flux_v3.json")
    p.add_argument("--variants", nargs="+", required=True, help="the report's variants (cache_flux: chosen methods)")
    p.add_argument("--n", type=COUNT, default=2000, help="images per variant, as in the report")
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--out", type=report_path, default=RESULTS / "fid_decomposition_flux.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report, script, bench = open_report(args.report, args.variants, args.n)
    images = {"baseline": bench.baseline_images()}
    images |= {label: variant_images(bench, script, report, label) for label in args.variants}
    ref_mean, ref_cov = bench.ref.mean.double(), bench.ref.cov.double()
    stats = {name: pixel_stats(pixels) for name, pixels in images.items()}
    rows = {}
    for name, pixels in images.items():
        feats = kept_features(bench, name, lambda pixels=pixels: pixels)
        rows[name] = fid_terms(feats, ref_mean, ref_cov) | summary(stats[name], None if name == "baseline"
                                                                  else stats["baseline"])
        print(name, {key: round(value, 4) for key, value in rows[name].items()}, flush=True)
    real_images = to_uint8_rgb32(load_split("test")[0])
    real = {"n": len(real_images), **summary(pixel_stats(real_images), None)}
    result = {"report": args.report.name, "model": report["config"]["model"], "n": args.n, "rows": rows,
              "real": real, "machine": machine_info()}
    write_result(args.out, result, markdown)
    return result


if __name__ == "__main__":
    main()
