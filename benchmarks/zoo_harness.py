"""Shared harness of the quality benchmarks on the zoo (PTQ, pruning, caching).

Every variant generates the same prompts with the same seeds as the unaccelerated baseline and is
scored by FID (TF-Inception) against the Fashion-MNIST test split, mean CLIP score (torchmetrics,
fashion-clip), fashion-clip class accuracy for the prompted class, and PSNR/SSIM against the
baseline's image for the same seed. The baseline's images are generated once per model fingerprint,
sampling settings, prompt set and torch version and kept in ``zoo_runs/bench_cache`` (generation is
deterministic on CPU, so a rerun would give the same bytes). Results are written after every variant,
so a killed run resumes where it stopped; speed is timed separately (``time_variants``), round-robin.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from cli_options import COUNT, report_path
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusion_accel import zoo
from diffusion_accel.artifact import base_fingerprint
from diffusion_accel.eval.fid import FIDStats, fid_to_reference
from diffusion_accel.eval.fidelity import fidelity
from diffusion_accel.eval.inception import TFInceptionFeatures, find_tf_inception
from diffusion_accel.eval.machine import machine_info
from diffusion_accel.eval.memory import measure_peak_memory
from diffusion_accel.eval.timing import time_pipelines

from zoo_quality import (DATASETS, DEFAULTS, call_inputs, class_accuracy, clip_score, is_unconditional,
                         metric_clip_fingerprint, pipe_images, prompts_for, reference)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "zoo_runs" / "bench_cache"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Variant:
    """One benchmarked pipeline: ``build()`` returns a freshly loaded, accelerated zoo pipeline."""

    label: str
    build: Callable[[], Any]
    group: str = ""
    note: str = ""
    call_overrides: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def write_result(out: Path, result: dict, markdown: Callable[[dict], str]) -> None:
    """``result`` as JSON at ``out`` and ``markdown(result)`` beside it (.md), also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def generate_images(pipe: Any, prompts: list[str], batch: int, seed: int, call_kwargs: dict) -> torch.Tensor:
    """uint8 N×3×32×32 images of ``pipe`` for ``prompts`` (an unconditional pipeline: as many samples);
    batch ``i`` uses seed ``seed + i·batch``."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc="generate", leave=False):
        gen = torch.Generator().manual_seed(seed + start)
        out.append(pipe_images(pipe, prompts[start:start + batch], gen, call_kwargs))
    return torch.cat(out)


def sampling(model: str) -> tuple[int, float | None, dict]:
    """(num_inference_steps, guidance_scale or None, the other call kwargs) of ``model``'s benchmark
    sampling, for building calibrations that run the same trajectory as the measured images."""
    call = dict(DEFAULTS[model])
    steps = call.pop("num_inference_steps")
    size = {} if is_unconditional(model) else {"height": 32, "width": 32}
    return steps, call.pop("guidance_scale", None), {**size, **call}


def denoiser_attr(model: str) -> str:
    """"unet" or "transformer": the attribute holding ``model``'s denoiser."""
    return "transformer" if model == "fashion-flux" else "unet"


def digest(payload: Any) -> str:
    """16 hex digits of the SHA-256 of ``payload``'s JSON: a cache key for settings."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


ROW_MACHINE_KEYS = ("device", "cpu_model", "cpu_features", "torch_threads", "torch_version")  # per row


def made_by(command: str | None) -> dict:
    """A row's provenance: the command, date and machine of the run that measured it (reports grow over
    ``--only`` runs, so the report's own ``command`` is only the last run's)."""
    machine = machine_info()
    return {"command": command, "date": time.strftime("%Y-%m-%d"),
            "machine": {key: machine.get(key) for key in ROW_MACHINE_KEYS}}


class ZooBench:
    """Scores variants of zoo pipeline ``model`` on ``n`` class-cycled prompts; results in ``out``."""

    def __init__(self, model: str, n: int, out: Path, *, seed: int = 0, batch: int = 100, n_ref: int = 10000,
                 inception_dtype: str = "bfloat16", call_overrides: dict | None = None) -> None:
        self.model, self.n, self.seed, self.batch, self.out = model, n, seed, batch, out
        self.call_kwargs = {**DEFAULTS[model], **(call_overrides or {})}
        self.prompts, self.labels = prompts_for(n, seed)
        self.extractor = TFInceptionFeatures(find_tf_inception(), dtype=getattr(torch, inception_dtype))
        self.ref: FIDStats = reference(n_ref, CACHE.parent / "fid_cache", self.extractor, dataset=DATASETS[model])
        self.config = {"model": model, "base_fingerprint": base_fingerprint(zoo.load(model)), "n_generated": n,
                       "n_ref_test": n_ref, "seed": seed, "sampling": self.call_kwargs,
                       "fid_network": self.extractor.fid_id,
                       "metric_clip": metric_clip_fingerprint()}  # a retrained zoo model or CLIP starts a fresh report
        self.report = self._load_report()
        self._baseline: torch.Tensor | None = None

    def _load_report(self) -> dict:
        """The existing report at ``out`` if it was made with the same settings, else a fresh one."""
        if self.out.is_file():
            report = json.loads(self.out.read_text())
            if report.get("config") == json.loads(json.dumps(self.config)):
                return report
        return {"config": self.config, "machine": machine_info(), "variants": {}}

    def images_key(self) -> str:
        """Cache key of this benchmark's images: settings (not the scoring CLIP), torch version, batch."""
        settings = {k: v for k, v in self.config.items() if k != "metric_clip"}  # images do not depend on it
        return digest([settings, self.config["base_fingerprint"], torch.__version__, self.batch])

    def variant_images_path(self, label: str) -> Path:
        """Where ``run`` keeps variant ``label``'s images (for paired re-analysis, e.g. fid_bootstrap.py)."""
        return CACHE / "images" / f"{self.model}_{self.images_key()}_{label}.safetensors"

    def baseline_images(self) -> torch.Tensor:
        """The unaccelerated pipeline's images (generated once, cached per fingerprint and settings)."""
        if self._baseline is None:
            pipe = zoo.load(self.model)
            path = CACHE / f"{self.model}_{self.images_key()}.safetensors"
            if not path.is_file():
                t0 = time.time()
                images = generate_images(pipe, self.prompts, self.batch, self.seed, self.call_kwargs)
                CACHE.mkdir(parents=True, exist_ok=True)
                save_file({"images": images.contiguous()}, str(path), metadata={"generation_s": f"{time.time() - t0:.1f}"})
            self._baseline = load_file(str(path))["images"]
            self.report["baseline_fingerprint"] = base_fingerprint(pipe)
        return self._baseline

    def scores(self, images: torch.Tensor) -> dict[str, float]:
        """FID vs test, fidelity to the baseline images and (text-to-image models) CLIP score and class accuracy."""
        fid_ = fidelity(images, self.baseline_images())
        scores = {"fid": fid_to_reference(self.ref, images, extractor=self.extractor, batch_size=50),
                  "psnr_vs_baseline": fid_.psnr, "ssim_vs_baseline": fid_.ssim}
        if not is_unconditional(self.model):
            acc, per_class = class_accuracy(images, self.labels)
            scores.update(clip_score=clip_score(images, self.prompts), class_accuracy=acc, per_class_accuracy=per_class)
        return scores

    def run_baseline(self) -> dict:
        """Score the baseline itself (row "baseline")."""
        if "baseline" not in self.report["variants"]:
            images = self.baseline_images()
            self._record("baseline", {"group": "baseline", "note": "unaccelerated fp32", **self.scores(images)})
        return self.report["variants"]["baseline"]

    def run(self, variant: Variant, force: bool = False) -> dict:
        """Build, generate and score ``variant`` (skipped when already in the report)."""
        if variant.label in self.report["variants"] and not force:
            return self.report["variants"][variant.label]
        self.baseline_images()
        built: dict[str, Any] = {}
        t0 = time.time()
        memory = measure_peak_memory(lambda: built.setdefault("pipe", variant.build()))
        prepare_s = time.time() - t0
        t0 = time.time()
        images = generate_images(built["pipe"], self.prompts, self.batch, self.seed,
                                 {**self.call_kwargs, **variant.call_overrides})
        self.variant_images_path(variant.label).parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous()}, str(self.variant_images_path(variant.label)))
        row = {"group": variant.group, "note": variant.note, "prepare_s": round(prepare_s, 1),
               "prepare_peak_rss_mib": round(memory.peak_mib, 1), "generation_s": round(time.time() - t0, 1),
               **self.scores(images), **getattr(built["pipe"], "_bench_info", {})}
        self._record(variant.label, row)
        return row

    def _record(self, label: str, row: dict) -> None:
        """Store ``row`` with the command and machine that made it (a report grows over ``--only`` runs, whose
        top-level ``command`` is the last one's and ``machine`` the first one's) and rewrite the report."""
        row = {**row, "made_by": made_by(self.report.get("command"))}
        self.report["variants"][label] = row
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=1))
        base = self.report["variants"].get("baseline")
        delta = "" if base is None else f" (ΔFID {row['fid'] - base['fid']:+.2f})"
        clip = "" if "clip_score" not in row else f", CLIP {row['clip_score']:.2f}, acc {row['class_accuracy']:.3f}"
        print(f"[{self.model}] {label}: FID {row['fid']:.2f}{delta}{clip}, PSNR {row['psnr_vs_baseline']:.2f}", flush=True)


def time_variants(pipes: dict[str, Any], call_kwargs: dict, prompts: list[str], repeats: int = 3) -> dict:
    """Median whole-pipeline and denoiser latency (ms) per variant, timed round-robin, with the
    speed-up over the first entry (the baseline)."""
    kwargs = {name: (lambda pipe=pipe: {**call_inputs(pipe, prompts), "generator": torch.Generator().manual_seed(0),
                                        **call_kwargs}) for name, pipe in pipes.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    timings = time_pipelines(pipes, kwargs, warmup=1, repeats=repeats)
    base = next(iter(timings.values()))
    return {name: {"pipeline_ms": t.pipeline.median_ms, "denoiser_ms": t.denoiser.median_ms,
                   "speedup": base.pipeline.median_ms / t.pipeline.median_ms} for name, t in timings.items()}


def markdown_table(report: dict, title: str, extra: str = "") -> str:
    """A Markdown table of every variant with ΔFID against the baseline row."""
    cfg = report["config"]
    base = report["variants"].get("baseline", {})
    lines = [f"# {title}", "", f"Model `{cfg['model']}`, {cfg['n_generated']} generated images vs "
             f"{cfg['n_ref_test']} test images, FID network {cfg['fid_network']}; sampling "
             + ", ".join(f"{k}={v!r}" for k, v in cfg["sampling"].items())
             + f". Machine: {report['machine']['cpu_model']}, torch threads {report['machine']['torch_threads']}.",
             "", "| variant | group | FID | ΔFID | CLIP | class acc | PSNR vs base (dB) | SSIM | speed-up | prepare (s) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in report["variants"].items():
        speed = report.get("timing", {}).get(label, {}).get("speedup")
        delta = row["fid"] - base["fid"] if base else float("nan")
        clip, acc = (f"{row['clip_score']:.2f}", f"{row['class_accuracy']:.3f}") if "clip_score" in row else ("–", "–")
        lines.append(f"| {label} | {row.get('group', '')} | {row['fid']:.2f} | {delta:+.2f} | {clip} | "
                     f"{acc} | {row['psnr_vs_baseline']:.2f} | {row['ssim_vs_baseline']:.3f} | "
                     f"{'' if speed is None else f'{speed:.2f}×'} | {row.get('prepare_s', '')} | {row.get('note', '')} |")
    for label, timed in report.get("timing", {}).items():  # timed without a quality row (--skip-quality)
        if label not in report["variants"] and "speedup" in timed:
            lines.append(f"| {label} |  | – | – | – | – | – | – | {timed['speedup']:.2f}× |  | "
                         f"timed only |")
    return "\n".join(lines) + "\n" + (f"\n{extra}\n" if extra else "")


def run_variants_cli(script: str, doc: str, title: str, variants: Callable[[str], list[Variant]],
                     default_out: Path, models: tuple[str, ...] = ("fashion-sd",), extra: str = "",
                     argv: list[str] | None = None) -> dict:
    """The command line shared by the quality scripts: score the baseline, then every variant (or
    those named by ``--only``), rewriting ``--out`` (JSON) and its Markdown table after each.

    ``variants(model)`` builds the list for ``--model`` (default ``models[0]``, whose results go to
    ``default_out``; another model's to ``<stem>_<model>.json``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=models, default=models[0])
    p.add_argument("--n", type=COUNT, default=2000, help="generated images per variant")
    p.add_argument("--n-ref", type=COUNT, default=10000, help="test images for the FID reference statistics")
    p.add_argument("--threads", type=COUNT, default=1)
    p.add_argument("--inception-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="TF-Inception under bf16 autocast (fast on AVX-512 BF16/AMX CPUs) or float32 (much faster "
                        "where bf16 is emulated, e.g. AVX2-only CPUs); the report's fid_network names it")
    p.add_argument("--only", nargs="*", default=None, help="variant labels to run (default: all, in order)")
    p.add_argument("--out", type=report_path, default=None)
    args = p.parse_args(argv)
    chosen = variants(args.model)
    unknown = sorted(set(args.only or ()) - {variant.label for variant in chosen})
    if unknown:  # they were skipped silently: a typo scored the baseline alone
        p.error(f"--only {unknown} are no variants of {args.model}; choose from {[v.label for v in chosen]}")
    out = args.out or (default_out if args.model == models[0]
                       else default_out.with_name(f"{default_out.stem}_{args.model}.json"))
    torch.set_num_threads(args.threads)
    bench = ZooBench(args.model, args.n, out, n_ref=args.n_ref, inception_dtype=args.inception_dtype)
    bench.report["command"] = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    bench.run_baseline()
    write_markdown = lambda: out.with_suffix(".md").write_text(  # noqa: E731
        markdown_table(bench.report, f"{title} on {args.model}", extra))
    write_markdown()
    for variant in chosen:
        if args.only is None or variant.label in args.only:
            bench.run(variant)
            write_markdown()
    return bench.report
