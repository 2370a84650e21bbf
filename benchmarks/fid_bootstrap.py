"""How much of a ΔFID between two cache_flux variants is sampling noise? A paired bootstrap.

    python benchmarks/fid_bootstrap.py --report benchmarks/results/cache_flux_v3.json \
        --variants diffusers-taylorseer ours-calibrated-output-10 ours-calibrated-output-11

Regenerates the report's 2,000 images of the baseline and each variant (same prompts and seeds as
the report, so the full-sample FIDs reproduce it), extracts per-image TF-Inception features, and
resamples the *same* image indices for every variant (the images share prompts and initial noise,
so their FIDs move together): for each replicate, every variant's FID against the fixed test-split
statistics. Reports each variant's FID and ΔFID vs baseline and vs the first variant with 95%
percentile intervals. Writes JSON + Markdown at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache_flux as cf  # noqa: E402
from zoo_harness import RESULTS, ZooBench, generate_images  # noqa: E402

from diffusion_accel.eval.machine import machine_info  # noqa: E402


def features(bench: ZooBench, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """(N, 2048) float64 TF-Inception features of uint8 images."""
    with torch.inference_mode():
        return torch.cat([bench.extractor(images[i:i + batch]).double() for i in range(0, len(images), batch)])


class FixedReferenceFID:
    """FID of feature samples against fixed reference statistics; the reference's covariance square
    root is computed once, so each FID is one symmetric eigendecomposition (D × D)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        values, vectors = torch.linalg.eigh(cov.double())
        self.mean, self.cov = mean.double(), cov.double()
        self.cov_sqrt = (vectors * values.clamp_min(0).sqrt()) @ vectors.T

    def __call__(self, feats: torch.Tensor) -> float:
        mean = feats.mean(0)
        centered = feats - mean
        cov = centered.T @ centered / (len(feats) - 1)
        middle = self.cov_sqrt @ cov @ self.cov_sqrt
        trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
        return float((mean - self.mean).square().sum() + self.cov.trace() + cov.trace() - 2 * trace_sqrt)


def variant_images(bench: ZooBench, report: dict, method: str) -> torch.Tensor:
    """The report's images of ``method`` (its chosen setting, same prompts and seeds)."""
    pipe = cf.built(method, report["chosen"][method]["setting"], report["calibration"])
    return generate_images(pipe, bench.prompts, bench.batch, bench.seed, bench.call_kwargs)


def interval(values: torch.Tensor) -> list[float]:
    """[2.5%, 97.5%] percentiles."""
    return [float(values.quantile(0.025)), float(values.quantile(0.975))]


def bootstrap(fid: FixedReferenceFID, feats: dict[str, torch.Tensor], reps: int, seed: int) -> dict[str, torch.Tensor]:
    """FID per variant per replicate; every replicate resamples the same indices for all variants."""
    generator = torch.Generator().manual_seed(seed)
    n = len(next(iter(feats.values())))
    samples = {name: [] for name in feats}
    for _ in range(reps):
        index = torch.randint(0, n, (n,), generator=generator)
        for name, f in feats.items():
            samples[name].append(fid(f[index]))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in samples.items()}


def summarise(full: dict[str, float], samples: dict[str, torch.Tensor], first: str) -> dict[str, Any]:
    rows = {}
    for name, values in samples.items():
        rows[name] = {"fid": full[name], "fid_ci95": interval(values),
                      "delta_vs_baseline": full[name] - full["baseline"],
                      "delta_vs_baseline_ci95": interval(values - samples["baseline"]),
                      f"delta_vs_{first}": full[name] - full[first],
                      f"delta_vs_{first}_ci95": interval(values - samples[first])}
    return rows


def markdown(result: dict) -> str:
    first = result["variants"][0]
    lines = ["# Paired bootstrap of FID on fashion-flux (cache_flux variants)", "",
             f"{result['n']} images per variant (the report's prompts and seeds), {result['reps']} replicates "
             "resampling the same image indices for every variant; FID against the fixed test-split statistics; "
             "95% percentile intervals. A difference whose interval contains 0 is within sampling noise.", "",
             f"| variant | FID | ΔFID vs baseline [95%] | Δ vs {first} [95%] |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        low, high = row["delta_vs_baseline_ci95"]
        low2, high2 = row[f"delta_vs_{first}_ci95"]
        lines.append(f"| {name} | {row['fid']:.2f} | {row['delta_vs_baseline']:+.2f} [{low:+.2f}, {high:+.2f}] | "
                     f"{row[f'delta_vs_{first}']:+.2f} [{low2:+.2f}, {high2:+.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, default=RESULTS / "cache_flux_v3.json")
    p.add_argument("--variants", nargs="+", required=True, help="chosen methods of the report; the first is the reference")
    p.add_argument("--n", type=int, default=2000, help="images per variant, as in the report")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "fid_bootstrap_flux.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = json.loads(args.report.read_text())
    unknown = [v for v in args.variants if v not in report["chosen"]]
    if unknown:
        raise SystemExit(f"not chosen in {args.report}: {unknown}; chosen: {sorted(report['chosen'])}")
    bench = ZooBench(cf.MODEL, args.n, Path("/dev/null"))
    feats = {"baseline": features(bench, bench.baseline_images())}
    feats |= {v: features(bench, variant_images(bench, report, v)) for v in args.variants}
    fid = FixedReferenceFID(bench.ref.mean, bench.ref.cov)
    full = {name: fid(f) for name, f in feats.items()}
    print({name: round(value, 3) for name, value in full.items()}, flush=True)
    samples = bootstrap(fid, feats, args.reps, seed=0)
    result = {"report": str(args.report), "variants": args.variants, "n": len(feats["baseline"]), "reps": args.reps,
              "machine": machine_info(), "rows": summarise(full, samples, args.variants[0])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
