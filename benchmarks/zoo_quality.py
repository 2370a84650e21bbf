"""Quality of the zoo pipelines: FID (TF-Inception) vs the test split of their dataset (Fashion-MNIST;
MNIST for the unconditional mnist-ddpm), and for the text-to-image ones the CLIP zero-shot class accuracy
of generated images for their prompted class and mean CLIP score (torchmetrics, fashion-clip).

    python benchmarks/zoo_quality.py --models fashion-sd fashion-flux --n 2000 --n-ref 10000
    python benchmarks/zoo_quality.py --models mnist-ddpm --floors --out benchmarks/results/zoo_quality_mnist_floor.json

Always reports the sample counts and the real-vs-real floor (train images vs the same test statistics)
and the VAE-reconstruction floor, because FID at n ≤ 2k is biased upward.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cli_options import COUNT, NONNEGATIVE, report_path
from torchmetrics.multimodal.clip_score import CLIPScore
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusion_accel import zoo
from diffusion_accel.artifact import fingerprint
from diffusion_accel.eval.fid import FIDStats, compute_fid_stats, fid_to_reference, frechet_distance, reference_stats
from diffusion_accel.eval.inception import TFInceptionFeatures, find_tf_inception
from diffusion_accel.eval.machine import machine_info, machine_summary
from diffusion_accel.zoo.captions import TEMPLATES, all_captions, caption
from diffusion_accel.zoo.data import CLASS_NAMES, load_split, to_rgb32, to_uint8_rgb32
from diffusion_accel.zoo.mnist_data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
# The step counts (mnist-ddpm: Q-Diffusion's CIFAR-10 setting, DDIM 100) + each model's call defaults.
BENCH_STEPS = {"fashion-sd": 50, "fashion-flux": 28, "mnist-ddpm": 100}
DEFAULTS = {name: {"num_inference_steps": steps, **zoo.CALL_DEFAULTS[name]} for name, steps in BENCH_STEPS.items()}
DATASETS = {"fashion-sd": "fashion-mnist", "fashion-flux": "fashion-mnist", "mnist-ddpm": "mnist"}


def is_unconditional(name: str) -> bool:
    """True for zoo models without prompts (their images are not scored by CLIP or class accuracy)."""
    return DATASETS[name] == "mnist"


def real_images(dataset: str, split: str) -> torch.Tensor:
    """uint8 N×28×28 images of ``split`` of ``dataset`` ("fashion-mnist" or "mnist")."""
    return (load_mnist if dataset == "mnist" else load_split)(split)[0]


def call_inputs(pipe: Any, prompts: list[str]) -> dict[str, Any]:
    """What one call of ``pipe`` takes for ``prompts`` at 32×32: the prompts, or for an unconditional
    pipeline (DDPMPipeline, which takes no prompts and no size) ``batch_size=len(prompts)``."""
    if "prompt" not in inspect.signature(pipe.__call__).parameters:
        return {"batch_size": len(prompts)}
    return {"prompt": prompts, "height": 32, "width": 32}


def pipe_images(pipe: Any, prompts: list[str], generator: torch.Generator, call_kwargs: dict) -> torch.Tensor:
    """uint8 N×3×32×32 images of one call of ``pipe`` (grayscale samples replicated to RGB)."""
    inputs = call_inputs(pipe, prompts)
    if "batch_size" in inputs:  # DDPMPipeline returns numpy N×H×W×C for output_type "np" (no "pt")
        images = pipe(**inputs, generator=generator, output_type="np", **call_kwargs).images
        images = torch.from_numpy(images).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    else:
        images = pipe(**inputs, generator=generator, output_type="pt", **call_kwargs).images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def prompts_for(n: int, seed: int) -> tuple[list[str], list[int]]:
    """n prompts cycling through the 10 classes, template drawn per prompt; returns (prompts, labels)."""
    rng = random.Random(seed)
    labels = [i % 10 for i in range(n)]
    return [caption(lab, rng.randrange(len(TEMPLATES))) for lab in labels], labels


@torch.no_grad()
def generate(name: str, prompts: list[str], batch: int, seed: int, overrides: dict,
             folder: Path | None = None) -> torch.Tensor:
    """uint8 N×3×32×32 images of zoo pipeline ``name`` (or its export in ``folder``) for ``prompts`` (seeded per batch)."""
    pipe = zoo.load(name, folder=folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**DEFAULTS[name], **overrides}
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc=f"generate {name}"):
        gen = torch.Generator().manual_seed(seed + start)
        out.append(pipe_images(pipe, prompts[start:start + batch], gen, kwargs))
    return torch.cat(out)


@torch.no_grad()
def vae_reconstructions(name: str, images: torch.Tensor, folder: Path | None = None) -> torch.Tensor:
    """uint8 N×3×32×32 round trips of uint8 N×28×28 ``images`` through the pipeline's VAE (posterior mode)."""
    vae = zoo.load(name, folder=folder).vae
    out = []
    for start in range(0, len(images), 250):
        x = to_rgb32(images[start:start + 250])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: list[int]) -> tuple[float, list[float]]:
    """fashion-clip zero-shot accuracy of uint8 images for their prompted class (overall, per class)."""
    model, processor = zoo.load("fashion-clip")
    ids = processor.tokenizer(all_captions(), padding="max_length", return_tensors="pt")
    txt = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
    classes = F.normalize(txt.view(10, len(TEMPLATES), -1).mean(1), dim=-1)
    x = images.float() / 127.5 - 1.0
    preds = torch.cat([(F.normalize(model.get_image_features(pixel_values=x[i:i + 500]).pooler_output, dim=-1)
                        @ classes.T).argmax(-1) for i in range(0, len(x), 500)])
    y = torch.tensor(labels)
    per_class = [float((preds[y == c] == c).float().mean()) for c in range(10)]
    return float((preds == y).float().mean()), per_class


def metric_clip_fingerprint() -> str:
    """Fingerprint of the fashion-clip behind CLIP score and class accuracy: reports made with another
    one cannot be extended (its scores would not compare)."""
    return fingerprint(zoo.load("fashion-clip")[0])


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str]) -> float:
    """Mean torchmetrics CLIPScore (fashion-clip) of uint8 images against their prompts."""
    metric = CLIPScore(model_name_or_path=zoo.clip_score_loader)
    for i in range(0, len(images), 250):
        metric.update(images[i:i + 250], prompts[i:i + 250])
    return float(metric.compute())


def reference(n_ref: int, cache: Path, extractor: torch.nn.Module, split: str = "test",
              dataset: str = "fashion-mnist") -> FIDStats:
    """TF-Inception statistics of the first ``n_ref`` images of ``split`` of ``dataset`` (cached in ``cache``)."""
    real = to_uint8_rgb32(real_images(dataset, split)[:n_ref])
    return reference_stats(real, cache_dir=cache, extractor=extractor, batch_size=50)


def real_floor(n: int, cache: Path, ref: FIDStats, extractor: torch.nn.Module, dataset: str = "fashion-mnist") -> float:
    """FID of the first ``n`` real train images vs ``ref`` (the small-sample floor; stats cached)."""
    train = to_uint8_rgb32(real_images(dataset, "train")[:n])
    return frechet_distance(ref, reference_stats(train, cache_dir=cache, extractor=extractor, batch_size=50))


def fid(ref: FIDStats, images: torch.Tensor, extractor: torch.nn.Module) -> float:
    """FID of uint8 images against ``ref`` with the same extractor."""
    return fid_to_reference(ref, images, extractor=extractor, batch_size=50)


def evaluate_model(name: str, args: argparse.Namespace, ref: FIDStats, extractor: torch.nn.Module,
                   train_ref: FIDStats | None = None) -> dict:
    """All metrics for one pipeline, plus its VAE-reconstruction floor; with ``train_ref``, also the FID of
    the same images against train-split statistics (for choosing between candidates)."""
    prompts, labels = prompts_for(args.n, args.seed)
    overrides = {"num_inference_steps": args.steps} if args.steps else {}
    if args.guidance is not None:
        overrides["true_cfg_scale" if name == "fashion-flux" else "guidance_scale"] = args.guidance
    t0 = time.time()
    images = generate(name, prompts, args.batch, args.seed, overrides, args.pipeline)
    gen_s = time.time() - t0
    stats = compute_fid_stats(images, extractor=extractor, batch_size=50)
    result = {"n_generated": args.n, "settings": {**DEFAULTS[name], **overrides}, "generation_s": round(gen_s, 1),
              "fid": frechet_distance(ref, stats)}
    if not is_unconditional(name):
        acc, per_class = class_accuracy(images, labels)
        result.update(class_accuracy=acc, per_class_accuracy=per_class, clip_score=clip_score(images, prompts))
    if train_ref is not None:
        result["fid_vs_train_ref"] = frechet_distance(train_ref, stats)
    if args.floors and not is_unconditional(name):
        train = load_split("train")[0][-args.n:]
        result["fid_vae_reconstruction"] = fid(ref, vae_reconstructions(name, train, args.pipeline), extractor)
    if args.save_grid:
        save_file({"images": images[:100].contiguous()}, str(samples_path(name)))
    return result


def samples_path(name: str) -> Path:
    """Where ``--save-grid`` keeps the first 100 generated images of ``name`` (10 per class, cycled)."""
    return ROOT / "zoo_runs" / f"{name}_samples.safetensors"


def write_grid(path: Path, per_class: int = 2, cell: int = 64, dataset: str = "fashion-mnist") -> Path:
    """PNG grid: columns = the ten classes, rows = real test images then ``per_class`` samples of every
    zoo pipeline of ``dataset`` whose samples were saved (``--save-grid``); each 32×32 image upscaled to
    ``cell``. The unconditional mnist-ddpm's rows are its first samples in order (no class per column)."""
    from PIL import Image

    test_x, test_y = (load_mnist if dataset == "mnist" else load_split)("test")
    rows = [[to_uint8_rgb32(test_x[test_y == c][k:k + 1])[0] for c in range(10)] for k in range(per_class)]
    labels = ["test"] * per_class
    for name in (m for m, d in DATASETS.items() if d == dataset):
        if samples_path(name).is_file():
            images = load_file(str(samples_path(name)))["images"]  # image i was prompted with class i % 10
            rows += [[images[c + 10 * k] for c in range(10)] for k in range(per_class)]
            labels += [name] * per_class
    grid = Image.new("RGB", (10 * cell, len(rows) * cell))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    columns = "digits 0-9 (test rows)" if dataset == "mnist" else ", ".join(CLASS_NAMES)
    print(f"grid: rows {labels}, columns {columns} -> {path}")
    return path


def markdown(report: dict, name: str) -> str:
    """A model-card section for ``name`` from ``report`` (sample counts and floors always included)."""
    r = report["models"][name]
    settings = ", ".join(f"{k}={v!r}" for k, v in r["settings"].items())
    what = ("unconditional samples" if is_unconditional(name)
            else "prompts cycling the 10 classes over the 10 templates")
    machine = machine_summary(report["machine"]) if "machine" in report else f"{report['device']} ({report['threads']} threads)"
    lines = [f"Measured by `{report['command']}` on {machine}, shared.\n",
             f"Sampling: {settings}, 32×32, {what}.\n",
             "| metric | value |", "|---|---|",
             f"| FID, {r['n_generated']} generated vs {report['n_ref_test']} {report.get('ref_split', 'test')} images | {r['fid']:.1f} |"]
    if "fid_vs_train_ref" in r:
        lines.append(f"| FID, the same images vs the first {report['n_train_ref']} train images (for choosing) | "
                     f"{r['fid_vs_train_ref']:.1f} |")
    if "fid_real_train_vs_test" in report:
        lines.append(f"| FID floor: {r['n_generated']} real train vs the same test stats | "
                     f"{report['fid_real_train_vs_test']:.1f} |")
    if "fid_vae_reconstruction" in r:
        lines.append(f"| FID floor: {r['n_generated']} VAE reconstructions of train images | "
                     f"{r['fid_vae_reconstruction']:.1f} |")
    if is_unconditional(name):
        lines += [f"| generation wall time ({r['n_generated']} images) | {r['generation_s']} s |",
                  "", f"FID network: {report['fid_network']}; real images: {report['dataset']}."]
        return "\n".join(lines) + "\n"
    lines += [f"| fashion-clip zero-shot accuracy on generated images (prompted class) | {r['class_accuracy']:.3f} |",
              f"| same classifier on the real test split | {report['class_accuracy_real_test']:.3f} |",
              f"| mean CLIP score (torchmetrics, fashion-clip) | {r['clip_score']:.2f} |",
              f"| generation wall time ({r['n_generated']} images) | {r['generation_s']} s |",
              "", f"FID network: {report['fid_network']}. Per-class accuracy: "
              + ", ".join(f"{a:.2f}" for a in r["per_class_accuracy"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; writes JSON to --out and prints it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["fashion-sd", "fashion-flux"], choices=sorted(DATASETS),
                   help="models of one dataset per run (mnist-ddpm is scored against MNIST)")
    p.add_argument("--n", type=COUNT, default=2000, help="generated images per model")
    p.add_argument("--n-ref", type=COUNT, default=10000, help="test images for the reference statistics")
    p.add_argument("--steps", type=COUNT, default=None, help="override sampling steps (default 50 SD / 28 Flux)")
    p.add_argument("--guidance", type=float, default=None,
                   help="override the CFG scale (defaults: fashion-sd 3.0, fashion-flux true_cfg 3.0)")
    p.add_argument("--ref-split", choices=["test", "train"], default="test",
                   help="real images of the FID reference; 'train' is for choosing sampling settings "
                        "without tuning on the test split")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="evaluate this export of the (single) --models pipeline instead of the shipped one, "
                        "e.g. a training run's final/ folder before shipping it")
    p.add_argument("--train-ref", type=NONNEGATIVE, default=0, metavar="N",
                   help="also score the same images against the first N train images (cached): choose between "
                        "candidate exports on this, report the test FID")
    p.add_argument("--batch", type=COUNT, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floors", action="store_true", help="also real-vs-real and VAE-reconstruction FID")
    p.add_argument("--save-grid", action="store_true",
                   help="keep 100 samples per model and redraw the README grid (--grid) from every saved model")
    p.add_argument("--grid", type=Path, default=None,
                   help="default docs/zoo_grid.png (Fashion-MNIST models), docs/zoo_grid_mnist.png (mnist-ddpm)")
    p.add_argument("--stats-only", action="store_true", help="only compute and cache the real statistics (floors, class accuracy), written to --out")
    p.add_argument("--inception-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 runs TF-Inception under autocast (~2x faster on AMX CPUs; labelled in the report)")
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--cache", type=Path, default=ROOT / "zoo_runs" / "fid_cache")
    p.add_argument("--out", type=report_path, default=ROOT / "benchmarks" / "results" / "zoo_quality.json")
    args = p.parse_args(argv)
    if args.pipeline is not None and len(args.models) != 1:
        p.error(f"--pipeline evaluates one model; got --models {' '.join(args.models)}")
    datasets = {DATASETS[name] for name in args.models}
    if len(datasets) != 1:
        p.error(f"--models {' '.join(args.models)} mix datasets {sorted(datasets)}: score one dataset per run")
    dataset = datasets.pop()
    torch.set_num_threads(args.threads)
    extractor = TFInceptionFeatures(find_tf_inception(), dtype=getattr(torch, args.inception_dtype))
    ref = reference(args.n_ref, args.cache, extractor, args.ref_split, dataset)
    report = {"command": "python benchmarks/zoo_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "dataset": dataset, "ref_split": args.ref_split, "n_ref_test": args.n_ref, "fid_network": extractor.fid_id,
              "device": "cpu", "threads": torch.get_num_threads(), "machine": machine_info(), "models": {}}
    if args.pipeline is not None:
        report["pipeline_folder"] = str(args.pipeline)
    if args.floors:
        report["fid_real_train_vs_test"] = real_floor(args.n, args.cache, ref, extractor, dataset)
    train_ref = reference(args.train_ref, args.cache, extractor, "train", dataset) if args.train_ref else None
    if train_ref is not None:
        report["n_train_ref"] = args.train_ref
    if dataset == "fashion-mnist":
        test_x, test_y = load_split("test")
        report["class_accuracy_real_test"] = class_accuracy(to_uint8_rgb32(test_x), test_y.tolist())[0]
    if args.stats_only:  # the floors and real-image statistics alone, written to --out like a full run
        print(json.dumps(report, indent=1))
        write_report(report, args.out)
        return report
    for name in args.models:
        report["models"][name] = evaluate_model(name, args, ref, extractor, train_ref)
        print(json.dumps({name: report["models"][name]}, indent=1))
    write_report(report, args.out)
    for name in args.models:
        args.out.with_name(f"{args.out.stem}_{name}.md").write_text(markdown(report, name))
    if args.save_grid:
        default_grid = "zoo_grid_mnist.png" if dataset == "mnist" else "zoo_grid.png"
        write_grid(args.grid or ROOT / "docs" / default_grid, dataset=dataset)
    print(json.dumps(report, indent=1))
    return report


def write_report(report: dict, path: Path) -> None:
    """The JSON report at ``path``, its folder created if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
