"""Side-by-side samples of fashion-sd dense vs 50% unstructured pruning (OBS, magnitude, ...), to see
what FID and PSNR disagree about (``prune_quality.md``): one row per method, the ten classes as columns.

    python benchmarks/prune_samples.py --methods obs obs:global magnitude --out benchmarks/results/prune_50_samples_fashion-sd.png

A method may carry a scope: ``obs:global`` prunes 50% of the denoiser with global per-layer allocation.

Same calibration and sampling as ``prune_quality.py``; prompts are its first ten (one per class), seed 0.
Also prints each row's mean / std pixel value and the share of near-white pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffusion_accel import PruneConfig, prune_, zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_options import COUNT, report_path  # noqa: E402
from prune_quality import calib_fields  # noqa: E402
from zoo_quality import DEFAULTS, prompts_for  # noqa: E402

MODEL = "fashion-sd"


@torch.no_grad()
def samples(method: str | None, sparsity: float, prompts: list[str]) -> torch.Tensor:
    """N×3×32×32 images in [0, 1] of fashion-sd, pruned by ``method`` ("obs", "obs:global", ...; None: dense)."""
    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    if method is not None:
        name, _, scope = method.partition(":")
        prune_(pipe, PruneConfig(**calib_fields(MODEL), method=name, sparsity=sparsity, scope=scope or "layer"))
    return pipe(prompts, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="pt",
                **DEFAULTS[MODEL]).images.clamp(0, 1)


def draw(rows: list[tuple[str, torch.Tensor]], path: Path, cell: int = 64, label_width: int = 110) -> None:
    """A labelled PNG: one row per (label, images)."""
    grid = Image.new("RGB", (label_width + rows[0][1].shape[0] * cell, len(rows) * cell), "white")
    pen = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        pen.text((6, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())
            grid.paste(tile.resize((cell, cell), Image.NEAREST), (label_width + c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["obs", "obs:global", "magnitude"],
                   choices=[f"{m}{scope}" for m in ("obs", "wanda", "magnitude") for scope in ("", ":global")])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=COUNT, default=1)
    p.add_argument("--out", type=report_path, default=Path(__file__).resolve().parent / "results"
                   / "prune_50_samples_fashion-sd.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = prompts_for(10, 0)[0]
    rows = [("dense", samples(None, args.sparsity, prompts))]
    rows += [(f"{m.replace(':', ' ')} {args.sparsity:.0%}", samples(m, args.sparsity, prompts)) for m in args.methods]
    for label, images in rows:
        print(f"{label}: mean {images.mean():.3f}, std {images.std():.3f}, "
              f"near-white share {(images > 0.9).float().mean():.4f}")
    draw(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
