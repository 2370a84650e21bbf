"""argparse value types shared by the command lines: bad numbers fail at parse time with a usage error
naming the value, before any pipeline loads (minutes for a hub model) or training starts."""

from __future__ import annotations

import argparse
from typing import Callable

from .paths import output_folder_problem


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type accepting an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """An argparse type accepting a finite float > 0 (a time budget, a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def output_folder(text: str) -> str:
    """An argparse type for ``--out`` folders: refuses a path that is, or lies under, an existing file, so
    the command does not fail only when writing its results, after the work (an evaluation, a demo)."""
    problem = output_folder_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text
