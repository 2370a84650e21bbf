"""One-shot pruning quality on fashion-sd (issue #5): OBS-Diff vs Wanda vs magnitude at 50%
unstructured and 2:4, structured 20% / 30% (heads + FFN neurons), and ablations of the timestep
weighting and of the number of sequential groups K (quality, calibration time, peak memory).

    python benchmarks/prune_quality.py                    # everything, headline first
    python benchmarks/prune_quality.py --only obs_50 wanda_50 magnitude_50

Every method gets the same calibration: 8 prompts × 50 DDIM steps with CFG 5 (both branches).
Same 2,000 prompts and seeds for every variant; the dense baseline's images are the PSNR reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from diffusion_accel import PruneConfig, prune_, prune_report, zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_harness import RESULTS, Variant, ZooBench, markdown_table  # noqa: E402

MODEL = "fashion-sd"
CALIB = dict(calib_prompts=8, calib_steps=50, calib_guidance_scale=5.0)


def pruned(**fields: Any) -> Callable[[], Any]:
    """A builder pruning a fresh fashion-sd with ``PruneConfig(**CALIB, **fields)``."""
    config = PruneConfig(**{**CALIB, **fields})

    def build() -> Any:
        pipe = zoo.load(MODEL)
        pipe.set_progress_bar_config(disable=True)
        prune_(pipe, config)
        report = prune_report(pipe)
        pipe._bench_info = {"prune_config": {k: v for k, v in vars(config).items()},
                            "achieved_sparsity": report.achieved_sparsity, "sweeps": report.sweeps,
                            "peak_hessian_mib": round(report.peak_hessian_bytes / 2 ** 20, 1),
                            "denoiser_params": sum(p.numel() for p in pipe.unet.parameters())}
        return pipe
    return build


def variants() -> list[Variant]:
    """Headline comparisons first, then structured, then ablations."""
    out = []
    for method in ("obs", "wanda", "magnitude"):
        out.append(Variant(f"{method}_50", pruned(method=method, sparsity=0.5), "50% unstructured"))
    for method in ("obs", "wanda", "magnitude"):
        out.append(Variant(f"{method}_2of4", pruned(method=method, sparsity=None, pattern="2:4"), "2:4"))
    for fraction in (0.2, 0.3):
        out.append(Variant(f"obs_structured_{int(fraction * 100)}", pruned(sparsity=fraction, pattern="structured"),
                           "structured", "heads + FFN neurons removed"))
    for weighting in ("uniform", "log-increase"):
        out.append(Variant(f"ablation_obs_50_{weighting}", pruned(sparsity=0.5, weighting=weighting), "ablation",
                           f"weighting {weighting} (default log-decrease)"))
    for groups in (1, "all"):
        out.append(Variant(f"ablation_obs_50_K{groups}", pruned(sparsity=0.5, groups=groups), "ablation",
                           f"K={groups} sequential groups (default 4)"))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--n-ref", type=int, default=10000, help="test images for the FID reference statistics")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="variant labels to run (default: all, in order)")
    p.add_argument("--out", type=Path, default=RESULTS / "prune_quality.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = ZooBench(MODEL, args.n, args.out, n_ref=args.n_ref)
    bench.report["command"] = "python benchmarks/prune_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    bench.run_baseline()
    for variant in variants():
        if args.only is None or variant.label in args.only:
            bench.run(variant)
            args.out.with_suffix(".md").write_text(markdown_table(
                bench.report, "One-shot pruning quality on fashion-sd",
                "`prepare (s)` is the calibration + pruning wall time; peak RSS of that step is in the JSON."))
    return bench.report


if __name__ == "__main__":
    main()
