"""Entry point: ``python -m diffusion_accel.zoo.train NAME [--steps N] [--time-budget-min M] ...``."""

from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path

from ..argtypes import input_path, int_at_least, output_folder, positive_float
from . import _common as C

TRAINERS = {
    "fashion-clip": "clip_train",
    "fashion-sd-vae": "vae_train",
    "fashion-flux-vae": "vae_train",
    "fashion-sd-decoder": "decoder_train",
    "fashion-flux-decoder": "decoder_train",
    "fashion-sd": "sd_train",
    "fashion-flux": "flux_train",
    "mnist-ddpm": "mnist_train",
}
WARM_STARTABLE = ("fashion-sd", "fashion-flux", "fashion-sd-decoder", "fashion-flux-decoder")


def init_source_argument(text: str) -> str:
    """``--init-from``: ``zoo`` (the shipped model) or a folder, ``~`` expanded; a folder written ``./zoo`` or
    ``zoo/`` stays a folder (normalised to ``zoo`` it warm-started from the shipped model instead, silently)."""
    folder = input_path(text)
    return "./zoo" if folder == "zoo" and text != "zoo" else folder


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add NAME and the training options to ``parser``."""
    parser.add_argument("name", choices=sorted(TRAINERS), help="which zoo model (or stage) to train")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="total optimiser steps (default: a resumed run's, else per model); given without "
                             "--time-budget-min it drops a resumed run's budget")
    parser.add_argument("--time-budget-min", type=positive_float, default=None,
                        help="stop (and export) after M minutes of training (loading, latent encoding and the final "
                             "evaluation come on top)")
    parser.add_argument("--out", type=output_folder, default=None,
                        help=f"run folder (default {C.RUNS_ROOT}/NAME; set DIFFUSION_ACCEL_ZOO_RUNS to move that root, "
                             f"where later stages also find the earlier ones, e.g. fashion-sd its VAE)")
    parser.add_argument("--seed", type=int_at_least(0, 2 ** 63 - 1), default=None,
                        help="a fresh run's seed (default 0); a resumed run keeps its own")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None)
    parser.add_argument("--data", type=input_path, default=None,
                        help="folder with the Fashion-MNIST idx files (*-ubyte.gz, .xz or uncompressed; "
                             "mnist-ddpm: MNIST's, or mnist.pkl.gz)")
    parser.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from run folder's checkpoint.pt if present (default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start from scratch")
    parser.add_argument("--freeze-text", action="store_true",
                        help="fashion-clip only: keep the text tower fixed (it is already the pipelines' encoder)")
    parser.add_argument("--init-from", type=init_source_argument, default=None, metavar="zoo|FOLDER",
                        help="fashion-sd / fashion-flux (and their -decoder stages): warm-start a fresh run from the shipped "
                             "model ('zoo') or an exported pipeline folder (its denoiser, and for flux its T5, plus "
                             "its frozen parts; a decoder stage takes its VAE)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="fashion-sd / fashion-flux / -decoder stages: peak learning rate (default 3e-4; decoders 2e-4)")
    parser.add_argument("--arch", choices=("small", "large"), default=None,
                        help="fashion-flux: train a fresh transformer and T5 of this size (small: 2 double + 4 "
                             "single blocks, shipped; large: 4 + 8, 4.5M parameters); with --init-from only the "
                             "frozen parts (VAE, CLIP, tokenizers) come from there; a resumed run keeps its own")
    parser.add_argument("--ship", action="store_true",
                        help="also copy the result into diffusion_accel/zoo/models/NAME (maintainers)")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Train ``args.name`` with the parsed options; returns the exported folder."""
    from .ship import SHIPPED

    if args.ship and args.name not in SHIPPED:
        raise ValueError(f"--ship applies to {SHIPPED}, not to the stage {args.name!r}")
    for option, value in (("--init-from", args.init_from), ("--lr", args.lr)):
        if value is not None and args.name not in WARM_STARTABLE:
            raise ValueError(f"{option} applies to {WARM_STARTABLE}, not to {args.name!r}")
    if args.arch is not None and args.name != "fashion-flux":
        raise ValueError(f"--arch applies to fashion-flux, not to {args.name!r}")
    if args.freeze_text and args.name != "fashion-clip":
        raise ValueError(f"--freeze-text applies to fashion-clip, not to {args.name!r}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    module = importlib.import_module(f"{__package__}.{TRAINERS[args.name]}")
    run_dir = Path(args.out) if args.out else C.RUNS_ROOT / args.name
    budget = args.time_budget_min
    if budget is None and args.steps is not None:  # a new extent: a resumed run's spent budget does not carry over
        budget = math.inf                          # (it stopped at once: --steps 40 on a budgeted run trained nothing)
    cfg = C.RunConfig(run_dir=Path(run_dir), steps=args.steps,
                      seed=args.seed, time_budget_min=budget, resume=args.resume,
                      batch_size=args.batch_size, data_root=args.data,
                      freeze_text=args.freeze_text, init_from=args.init_from, lr=args.lr,
                      arch=getattr(args, "arch", None), stage=args.name,
                      defaults={"batch_size": module.DEFAULT_BATCH, "lr": getattr(module, "DEFAULT_LR", None)})
    C.apply_checkpoint_settings(cfg)  # resuming: unset options continue the run's, others must match
    if cfg.steps is None:  # neither given nor the resumed run's
        cfg.steps = module.default_steps(args.name)
    folder = module.train(cfg, args.name)
    if args.ship:
        from .card import write_card
        from .ship import ship

        write_card(args.name, ship(args.name, folder))
    print(f"exported {args.name} to {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and train; a bad option or missing data is a one-line error (exit 2), as in
    ``diffusion-accel zoo train``, not a traceback."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="python -m diffusion_accel.zoo.train"))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:  # the loop said where the run was saved; no traceback
        parser.exit(130)


if __name__ == "__main__":
    main()
