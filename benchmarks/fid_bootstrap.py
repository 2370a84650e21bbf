"""How much of a ΔFID between two variants of a zoo benchmark is sampling noise? A paired bootstrap.

    python benchmarks/fid_bootstrap.py --report benchmarks/results/cache_flux_v3.json \
        --variants diffusers-taylorseer ours-calibrated-output-10 ours-calibrated-output-11
    python benchmarks/fid_bootstrap.py --report benchmarks/results/ptq_quality_fashion-flux.json \
        --variants ours_w8a8_dynamic torchao_int8_dynamic --out benchmarks/results/fid_bootstrap_ptq_w8_flux.json

Takes the report's 2,000 images of the baseline and each variant (kept by zoo_harness when the
variant was scored, else regenerated with the report's prompts and seeds, so the full-sample FIDs
reproduce it; cache_flux variants from the report's chosen settings, ptq_quality / prune_quality
variants from the script's own list; kept images are those of the variant's last scoring or
regeneration: delete them after changing a variant), extracts per-image TF-Inception features
(kept too, tagged with the images' hash), and
resamples the *same* image indices for every variant (the images share prompts and initial noise,
so their FIDs move together): for each replicate, every variant's FID against the fixed test-split
statistics. Reports each variant's FID and ΔFID vs baseline and vs the first variant with 95%
percentile intervals. Writes JSON + Markdown at ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_options import COUNT, existing_file, report_path  # noqa: E402
import cache_flux as cf  # noqa: E402
from zoo_harness import RESULTS, ZooBench, generate_images, write_result  # noqa: E402

from diffusion_accel.eval.machine import machine_info, machine_summary  # noqa: E402

QUALITY_SCRIPTS = ("ptq_quality", "prune_quality")


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


def kept_features(bench: ZooBench, label: str, images: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``features`` of ``label``'s images, kept beside its images (float32, tagged with the images'
    SHA-256) so a later bootstrap over the same images skips the Inception pass."""
    pixels = images()
    digest = hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()
    kept = bench.variant_images_path(label)
    path = kept.with_name(f"{kept.stem}_features.safetensors")
    if path.is_file():
        with safe_open(str(path), "pt") as stored:
            if (stored.metadata() or {}).get("images_sha256") == digest:
                return stored.get_tensor("features").double()
    feats = features(bench, pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.float().contiguous()}, str(path), metadata={"images_sha256": digest})
    return feats


def report_script(path: Path, report: dict) -> str:
    """Which benchmark script wrote ``report``: cache_flux (it has chosen settings) or the quality
    script named by the file (ptq_quality*, prune_quality*)."""
    if "chosen" in report:
        return "cache_flux"
    for script in QUALITY_SCRIPTS:
        if path.stem.startswith(script):
            return script
    raise SystemExit(f"{path}: not a cache_flux, {' or '.join(QUALITY_SCRIPTS)} report")


def build_variant(script: str, report: dict, label: str) -> Any:
    """A fresh pipeline of the report's variant ``label``, built as its script built it."""
    if script == "cache_flux":
        return cf.built(label, report["chosen"][label]["setting"], report["calibration"])
    module = importlib.import_module(script)
    variants = {v.label: v for v in module.variants(report["config"]["model"])}
    return variants[label].build()


def variant_images(bench: ZooBench, script: str, report: dict, label: str) -> torch.Tensor:
    """The report's images of ``label`` (same prompts and seeds): kept ones if present, else regenerated."""
    kept = bench.variant_images_path(label)
    if kept.is_file():
        return load_file(str(kept))["images"]
    pipe = build_variant(script, report, label)
    images = generate_images(pipe, bench.prompts, bench.batch, bench.seed, bench.call_kwargs)
    kept.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous()}, str(kept))
    return images


def known_labels(script: str, report: dict) -> list[str]:
    """Variant labels the report can name: cache_flux's chosen methods, or the scored rows."""
    return sorted(report["chosen"] if script == "cache_flux" else set(report["variants"]) - {"baseline"})


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
    lines = [f"# Paired bootstrap of FID on {result['model']} ({result['script']} variants)", "",
             f"Machine: {machine_summary(result['machine'])}.", "",
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


def open_report(path: Path, variants: list[str], n: int) -> tuple[dict, str, ZooBench]:
    """(report, script that wrote it, a ZooBench of its model for ``n`` images); SystemExit when a variant is
    not in the report or the installed zoo model is not the one it measured."""
    report = json.loads(path.read_text())
    script = report_script(path, report)
    unknown = [v for v in variants if v not in known_labels(script, report)]
    if unknown:
        raise SystemExit(f"not in {path}: {unknown}; available: {known_labels(script, report)}")
    config = report["config"]
    model = config["model"]
    dtype = "bfloat16" if str(config.get("fid_network", "")).endswith(" bf16") else "float32"
    bench = ZooBench(model, n, Path("/dev/null"), n_ref=config.get("n_ref_test", 10000), inception_dtype=dtype,
                     seed=config.get("seed", 0))  # the report's reference and network (until session 41 the defaults)
    if bench.config["base_fingerprint"] != config["base_fingerprint"]:
        raise SystemExit(f"{path} measured another {model} than the installed one (model fingerprint differs)")
    differing = sorted(key for key in ("n_ref_test", "fid_network", "seed", "sampling")
                       if json.loads(json.dumps(bench.config[key])) != config.get(key))
    if differing:
        raise SystemExit(f"{path} was measured with other settings than this bootstrap can reproduce: {differing}")
    return report, script, bench


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=existing_file, default=RESULTS / "cache_flux_v3.json")
    p.add_argument("--variants", nargs="+", required=True,
                   help="the report's variants (cache_flux: chosen methods); the first is the reference")
    p.add_argument("--n", type=COUNT, default=2000, help="images per variant, as in the report")
    p.add_argument("--reps", type=COUNT, default=100)
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--out", type=report_path, default=RESULTS / "fid_bootstrap_flux.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report, script, bench = open_report(args.report, args.variants, args.n)
    model = report["config"]["model"]
    feats = {"baseline": kept_features(bench, "baseline", lambda: bench.baseline_images())}
    for label in args.variants:
        feats[label] = kept_features(bench, label, lambda label=label: variant_images(bench, script, report, label))
    fid = FixedReferenceFID(bench.ref.mean, bench.ref.cov)
    full = {name: fid(f) for name, f in feats.items()}
    print({name: round(value, 3) for name, value in full.items()}, flush=True)
    samples = bootstrap(fid, feats, args.reps, seed=0)
    result = {"report": str(args.report), "script": script, "model": model, "variants": args.variants,
              "n": len(feats["baseline"]), "reps": args.reps, "machine": machine_info(),
              "rows": summarise(full, samples, args.variants[0])}
    write_result(args.out, result, markdown)
    return result


if __name__ == "__main__":
    main()
