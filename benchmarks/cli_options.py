"""Command-line pieces the benchmark scripts share, checked before any work.

Every script parses its arguments before it loads a model, so ``--help`` only prints (four scripts had
no parser: ``--help`` ran them in full and overwrote their committed results), and every script takes
``--out`` for its JSON report (the Markdown goes beside it), so a trial run need not touch
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_accel.argtypes import int_at_least
from diffusion_accel.paths import output_folder_problem

RESULTS = Path(__file__).resolve().parent / "results"
COUNT = int_at_least(1)  # argparse type of image / repeat / step counts
NONNEGATIVE = int_at_least(0)


def report_path(text: str) -> Path:
    """argparse type of ``--out``: a JSON file path whose folder can exist (it is created if missing)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give the JSON report's file path "
                                         f"(the Markdown table is written beside it)")
    problem = output_folder_problem(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write the report {text!r}: {problem}")
    return path


def script_parser(doc: str, default_out: Path | None) -> argparse.ArgumentParser:
    """A parser showing the script's docstring, with ``--out`` (default ``default_out``; None: the
    script derives it from its other options)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = f"default: benchmarks/results/{default_out.name}" if default_out else "default: by the options below"
    parser.add_argument("--out", type=report_path, default=default_out,
                        help=f"JSON report path, the Markdown beside it ({where})")
    return parser


def existing_file(text: str) -> Path:
    """argparse type of an input report: a file that exists."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file" + (" (it is a folder)" if path.is_dir() else ""))
    return path
