"""One-shot pruning quality on the zoo (issue #5): OBS-Diff vs Wanda vs magnitude at 50%
unstructured (every layer at 50%, and 50% of the denoiser with global per-layer allocation) and 2:4, structured 20% / 30% (heads + FFN neurons), and ablations of the timestep
weighting and of the number of sequential groups K (quality, calibration time, peak memory).

    python benchmarks/prune_quality.py                    # fashion-sd: everything, headline first
    python benchmarks/prune_quality.py --model fashion-flux   # results in prune_quality_fashion-flux.json
    python benchmarks/prune_quality.py --only obs_50 wanda_50 magnitude_50

Every method gets the same calibration: 8 prompts over the benchmark's own trajectory (fashion-sd
50 DDIM steps with CFG 3, fashion-flux 28 steps with true CFG 3; both branches).
Same 2,000 prompts and seeds for every variant; the dense baseline's images are the PSNR reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from diffusion_accel import PruneConfig, prune_, prune_report, zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_harness import RESULTS, Variant, denoiser_attr, run_variants_cli, sampling  # noqa: E402

MODELS = ("fashion-sd", "fashion-flux")


def calib_fields(model: str) -> dict[str, Any]:
    """PruneConfig calibration fields: 8 prompts over the benchmark's trajectory (all steps)."""
    steps, guidance, call = sampling(model)
    return dict(calib_prompts=8, calib_num_steps=steps, calib_guidance_scale=guidance, calib_kwargs=call)


def pruned(model: str, **fields: Any) -> Callable[[], Any]:
    """A builder pruning a fresh ``model`` with ``PruneConfig(**calib_fields(model), **fields)``."""
    config = PruneConfig(**{**calib_fields(model), **fields})

    def build() -> Any:
        pipe = zoo.load(model)
        pipe.set_progress_bar_config(disable=True)
        prune_(pipe, config)
        report = prune_report(pipe)
        pipe._bench_info = {"prune_config": config.to_dict(), "layer_sparsity": report.layer_sparsity,
                            "achieved_sparsity": report.achieved_sparsity, "sweeps": report.sweeps,
                            "peak_hessian_mib": round(report.peak_hessian_bytes / 2 ** 20, 1),
                            "denoiser_params": sum(p.numel() for p in getattr(pipe, denoiser_attr(model)).parameters())}
        return pipe
    return build


def variants(model: str) -> list[Variant]:
    """Headline comparisons first, then structured, then ablations."""
    out = []
    for method in ("obs", "wanda", "magnitude"):
        out.append(Variant(f"{method}_50", pruned(model, method=method, sparsity=0.5), "50% unstructured"))
    for method in ("obs", "wanda", "magnitude"):
        how = "least summed layer output error" if method != "magnitude" else "one threshold on layer-normalised saliency"
        out.append(Variant(f"{method}_50_global", pruned(model, method=method, sparsity=0.5, scope="global"),
                           "50% unstructured, global", f"per-layer sparsity by {how} (default allocation)"))
    for method in ("obs", "wanda"):
        out.append(Variant(f"{method}_50_global_saliency",
                           pruned(model, method=method, sparsity=0.5, scope="global", allocation="saliency"),
                           "50% unstructured, global", "per-layer sparsity by one threshold on layer-normalised saliency"))
    out.append(Variant("magnitude_50_global_error",
                       pruned(model, method="magnitude", sparsity=0.5, scope="global", allocation="error"),
                       "50% unstructured, global", "magnitude masks, per-layer sparsity by least output error (reads data)"))
    for method in ("obs", "wanda", "magnitude"):
        out.append(Variant(f"{method}_2of4", pruned(model, method=method, sparsity=None, pattern="2:4"), "2:4"))
    for fraction in (0.2, 0.3):
        out.append(Variant(f"obs_structured_{int(fraction * 100)}", pruned(model, sparsity=fraction, pattern="structured"),
                           "structured", "heads + FFN neurons removed"))
    if denoiser_attr(model) == "unet":
        for fraction in (0.2, 0.3):
            out.append(Variant(f"obs_structured_{int(fraction * 100)}_resnets",
                               pruned(model, sparsity=fraction, pattern="structured", prune_resnets=True),
                               "structured", "heads + FFN neurons + ResNet channel groups removed"))
    for weighting in ("uniform", "log-increase"):
        out.append(Variant(f"ablation_obs_50_{weighting}", pruned(model, sparsity=0.5, weighting=weighting), "ablation",
                           f"weighting {weighting} (default log-decrease)"))
    for groups in (1, "all"):
        out.append(Variant(f"ablation_obs_50_K{groups}", pruned(model, sparsity=0.5, groups=groups), "ablation",
                           f"K={groups} sequential groups (default 4)"))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run_variants_cli("prune_quality.py", __doc__, "One-shot pruning quality", variants,
                            RESULTS / "prune_quality.json", MODELS, argv=argv,
                            extra="`prepare (s)` is the calibration + pruning wall time; peak RSS of that step, "
                                  "Hessian memory and sweeps are in the JSON.")


if __name__ == "__main__":
    main()
