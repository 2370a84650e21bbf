"""Copy a trained model folder into the package (``diffusion_accel/zoo/models/NAME``), weights in fp16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODELS_DIR = Path(__file__).resolve().parent / "models"
SHIPPED = ("fashion-clip", "fashion-sd", "fashion-flux", "mnist-ddpm")


def to_fp16_safetensors(path: Path) -> None:
    """Rewrite one .safetensors file with every floating tensor stored as float16 (configs keep float32)."""
    tensors = load_file(str(path))
    halved = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(halved, str(path), metadata={"format": "pt"})


LATENT_KEYS = ("encoder.", "quant_conv.")
DECODER_ONLY_CONFIG = ("up_block_types", "out_channels", "use_post_quant_conv", "force_upcast", "sample_size")


def check_same_latent_space(pipeline_vae: Path, vae: Path) -> None:
    """Raise ValueError unless ``vae`` encodes exactly like ``pipeline_vae`` (same encoder and quant_conv
    weights at float16, same config but for the decoder-only keys: scaling / shift factors, and the
    encoder's groups and activation, whose change kept the weights and moved latents by 1.76 until session 53):
    only then does the denoiser stay valid with it."""
    configs = [json.loads((folder / "config.json").read_text(encoding="utf-8")) for folder in (pipeline_vae, vae)]
    encoding = sorted(key for key in set(configs[0]) | set(configs[1])
                      if not key.startswith("_") and key not in DECODER_ONLY_CONFIG)
    differing = [key for key in encoding if configs[0].get(key) != configs[1].get(key)]
    if differing:
        raise ValueError(f"--vae {vae}: its config differs from the pipeline's in " + ", ".join(
            f"{key} ({configs[1].get(key)} vs {configs[0].get(key)})" for key in differing) + ": another latent space")
    old, new = (load_file(str(folder / "diffusion_pytorch_model.safetensors")) for folder in (pipeline_vae, vae))
    changed = [key for key, tensor in old.items() if key.startswith(LATENT_KEYS)
               and (key not in new or not torch.equal(tensor.half(), new[key].half()))]
    if changed:
        raise ValueError(f"--vae {vae}: its encoder differs from the pipeline's (e.g. {changed[0]}); only a decoder "
                         f"fine-tuned from this pipeline's VAE (`zoo train NAME-decoder --init-from ...`) fits")


def ship(name: str, folder: Path, dest_root: Path = MODELS_DIR, vae: Path | None = None) -> Path:
    """Copy exported ``folder`` to ``dest_root/name`` (replacing it), halving weights; returns the new folder.

    ``vae``: a decoder stage's export to ship in place of the folder's VAE (checked to keep the latent space).
    """
    if name not in SHIPPED:
        raise ValueError(f"only {SHIPPED} are shipped, got {name!r} (VAE stages live inside the pipelines)")
    from . import _export_folder

    _export_folder(name, Path(folder))  # another model's export shipped under this name until session 41
    if vae is not None:
        if name not in ("fashion-sd", "fashion-flux"):
            raise ValueError(f"--vae applies to fashion-sd and fashion-flux, not to {name}")
        check_same_latent_space(folder / "vae", vae)
    dest = dest_root / name
    staged = dest_root / f".{name}.staging"  # built beside dest, swapped in last: ``folder`` may be ``dest``
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(folder, staged, ignore=shutil.ignore_patterns("*.pt", "*.tmp"))
    if vae is not None:
        shutil.rmtree(staged / "vae")
        # its train_info.json goes along: the card names the decoder run that ships, wherever it was trained
        shutil.copytree(vae, staged / "vae", ignore=shutil.ignore_patterns("*.pt", "*.tmp"))
    for path in staged.rglob("*.safetensors"):
        to_fp16_safetensors(path)
    if (dest / "README.md").is_file():  # the card's recorded stages outlive the weights
        shutil.copyfile(dest / "README.md", staged / "README.md")
    if dest.exists():
        shutil.rmtree(dest)
    staged.rename(dest)
    return dest


def folder_size_mb(folder: Path) -> float:
    """Total size of the files under ``folder`` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusion_accel.zoo.ship NAME [--from DIR] [--dest ROOT] [--vae DIR] [--metrics FILE.md]``: copy in,
    fp16, write card."""
    import argparse

    from ..argtypes import input_path, output_folder
    from . import _common as C
    from .card import write_card

    parser = argparse.ArgumentParser(prog="python -m diffusion_accel.zoo.ship")
    parser.add_argument("name", choices=SHIPPED)
    parser.add_argument("--from", dest="source", type=input_path, default=None, help="default zoo_runs/NAME/final")
    parser.add_argument("--dest", type=output_folder, default=MODELS_DIR,
                        help="folder to ship into (default: the package's models/; e.g. a staging folder on a GPU machine)")
    parser.add_argument("--metrics", type=input_path, default=None, help="markdown with measured quality")
    parser.add_argument("--vae", type=input_path, default=None,
                        help="a decoder stage's export (e.g. zoo_runs/fashion-sd-decoder/final) to ship in place of "
                             "the pipeline's VAE; its encoder must be the pipeline's")
    args = parser.parse_args(argv)
    try:  # the metrics are read first: a missing file failed after the weights had shipped under the old card
        metrics = Path(args.metrics).read_text(encoding="utf-8") if args.metrics else ""
        dest = ship(args.name, Path(args.source or C.RUNS_ROOT / args.name / "final"), Path(args.dest),
                    None if args.vae is None else Path(args.vae))
        write_card(args.name, dest, metrics)
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"shipped {args.name} to {dest} ({folder_size_mb(dest):.1f} MB)")


if __name__ == "__main__":
    main()
