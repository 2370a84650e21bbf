"""The ``warnings`` stacklevel that points a warning at the user's line, however deep in the package it is raised."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_FOLDER = str(Path(__file__).parent) + os.sep  # the separator: a sibling "diffusion_accel_x/" is the user's


def user_stacklevel() -> int:
    """Stacklevel, for the function calling this one, of the first frame outside this package: the user's line
    that called ``calibrate`` / ``prune_`` / ``load``..., whichever path inside led to the warning (fixed levels
    pointed at library lines when a second path reached the same check)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _inside(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


_DECORATOR_FILES = (os.path.join("torch", "utils", "_contextlib.py"),)  # torch.inference_mode(False) on our functions


def _inside(filename: str) -> bool:
    """Whether a frame of ``filename`` is the package's own, or a decorator's wrapper around one of its functions."""
    return filename.startswith(PACKAGE_FOLDER) or filename.endswith(_DECORATOR_FILES)
