"""``diffusion-accel zoo ...``: ``zoo list`` and ``zoo train NAME``; ``register`` plugs into any argparse CLI."""

from __future__ import annotations

import argparse


def _list(args: argparse.Namespace) -> int:
    """Print each shipped model, its folder and size (or why it cannot be loaded: missing, incomplete)."""
    from . import MODELS_DIR, names, path
    from .ship import folder_size_mb

    for name in names():
        folder = MODELS_DIR / name
        try:
            state = f"{folder_size_mb(path(name)):6.1f} MB  {folder}"
        except FileNotFoundError as error:  # a partial folder was listed with its size (until session 48)
            state = "not shipped" if not folder.is_dir() else f"incomplete: {error}"
        print(f"{name:14s} {state}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Run the trainer chosen by ``args.name``."""
    from .train import run

    run(args)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``zoo`` command group (``list``, ``train``) to ``subparsers``; each sets ``args.func``."""
    from .train import add_train_arguments

    zoo = subparsers.add_parser("zoo", help="the bundled reference models: list, train")
    actions = zoo.add_subparsers(dest="zoo_command", required=True, metavar="{list,train}")
    actions.add_parser("list", help="shipped zoo models and their sizes").set_defaults(func=_list)
    train = actions.add_parser("train", help="train (or resume) a zoo model from a seed")
    add_train_arguments(train).set_defaults(func=_train)
    return zoo


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m diffusion_accel.zoo.cli zoo list``."""
    parser = argparse.ArgumentParser(prog="diffusion-accel")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # a one-line error, as `diffusion-accel zoo` (it was a traceback)
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:  # the training loop said where the run was saved
        parser.exit(130)


if __name__ == "__main__":
    raise SystemExit(main())
