"""argparse value types shared by the command lines: bad numbers fail at parse time with a usage error
naming the value, before any pipeline loads (minutes for a hub model) or training starts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

from .paths import EMPTY_PATH_PROBLEM, empty_path, expand_home, output_folder_problem

SEED_LIMIT = 2 ** 63 - 1  # the largest --seed: calibration's (call k is seeded seed + k), and far enough below torch
# generators' 2**64 - 1 that an evaluation's image seeds (seed + k) fit: checked before any pipeline loads


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type accepting an int >= ``minimum`` (and <= ``maximum`` if given)."""
    wanted = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value
    return parse


def nonnegative_float(text: str) -> float:
    """An argparse type accepting a finite float >= 0 (a guidance scale: nan ran SD without CFG silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type accepting a finite float > 0 (a time budget, a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type accepting a float in (0, 1] (an img2img strength: 1.5 failed inside diffusers after
    the text-to-image run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {value}")
    return value


def _expanded(text: str) -> Path:
    """``paths.expand_home`` with its error as argparse's (a ValueError became "invalid value", unexplained)."""
    try:
        return expand_home(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def input_path(text: str) -> str:
    """An argparse type for a path read from (``--data``, ``--init-from``, ``ship --from``): ``~`` expanded, as
    the shell does not after ``=`` (``--init-from=~/run`` was "not an exported pipeline folder")."""
    if empty_path(text):
        raise argparse.ArgumentTypeError(EMPTY_PATH_PROBLEM)
    return str(_expanded(text))


def output_folder(text: str) -> str:
    """An argparse type for ``--out`` folders: refuses a path that is, or lies under, an existing file, so
    the command does not fail only when writing its results, after the work (an evaluation, a demo)."""
    if empty_path(text):  # before Path(), which turns "" into "." (the current folder)
        raise argparse.ArgumentTypeError(EMPTY_PATH_PROBLEM)
    text = str(_expanded(text))  # --out=~/x: the shell expands no ~ after "="
    problem = output_folder_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def cache_folder(text: str) -> str:
    """An argparse type for a cache folder (``--fid-cache``): as ``output_folder``, but it may be read-only (a shared
    cache holding the statistics; refused until session 48's writability check was narrowed to outputs)."""
    if empty_path(text):
        raise argparse.ArgumentTypeError(EMPTY_PATH_PROBLEM)
    text = str(_expanded(text))
    problem = output_folder_problem(text, writable=False)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def report_folder(text: str) -> str:
    """An argparse type for a report's output folder (the examples' ``--out``): ``output_folder``, and no folders
    named like the report's files in it, checked before the work (found by ``evaluate`` after it, until s50)."""
    from .eval.report import report_folder_problem  # here: the eval package imports torch (--help stays light)

    text = output_folder(text)
    problem = report_folder_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_file(text: str) -> str:
    """An argparse type for an output file (``grid --out``): its folder must be creatable, checked before the
    work (a path under a file failed with ``[Errno 17] File exists`` after every image was generated)."""
    if empty_path(text):
        raise argparse.ArgumentTypeError(EMPTY_PATH_PROBLEM)
    path = _expanded(text)
    if path.is_dir() or text.endswith(("/", os.sep)):  # "newdir/" became a PNG file named newdir (until s50)
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give an image file path, e.g. "
                                         f"{str(path / 'grid.png')!r}")
    problem = output_folder_problem(path.parent)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return str(path)
