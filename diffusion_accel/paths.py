"""Path checks shared by the Python API and the command lines (no heavy imports: argparse types use it)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def expand_home(path: str | Path) -> Path:
    """``path`` with ``~`` / ``~user`` expanded; a ValueError naming it when that user has no home directory
    (pathlib's RuntimeError reached users as a traceback)."""
    try:
        return Path(path).expanduser()
    except RuntimeError as error:
        raise ValueError(f"cannot expand '~' in {str(path)!r}: {error}") from None


def output_folder_problem(path: str | Path, writable: bool = True) -> str | None:
    """Why ``path`` cannot become an output folder (it is, or lies under, an existing file; with ``writable``, its
    nearest existing folder takes no new entries: not asked of a cache, which a read-only one may serve), or None.

    Checked before the work (an evaluation, a demo, a training run) rather than when its results are
    written, which failed with ``[Errno 17] File exists`` after it (and, for a folder that cannot be written,
    with ``[Errno 2]`` / ``[Errno 13]`` after every image was generated, until session 48)."""
    if empty_path(path):
        return EMPTY_PATH_PROBLEM
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate.is_dir():
                return _unwritable_problem(path, candidate) if writable else None
            where = "is a file" if candidate == path else f"lies under the file {str(candidate)!r}"
            return f"{str(path)!r} {where}; give a folder (it is created if missing)"
    return None


def _unwritable_problem(path: Path, folder: Path) -> str | None:
    """Why nothing can be created in the existing ``folder`` on the way to ``path`` (probed by making and removing
    an empty folder: permissions, a read-only or virtual file system), or None."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".diffusion-accel-probe-", dir=folder))
    except OSError as error:
        subject = repr(str(path)) if folder == path else f"{str(path)!r} cannot be created: {str(folder)!r}"
        return f"{subject} takes no new entries ({error.strerror or error}); give a writable folder"
    return None


EMPTY_PATH_PROBLEM = "the path is empty (it would write into the current folder); give a folder, '.' for the current one"


def empty_path(path: str | Path) -> bool:
    """True for ``""`` or blanks: ``Path("")`` is the current folder, where reports and artifacts landed silently."""
    return isinstance(path, str) and not path.strip()


CALIBRATION_FORMAT = "diffusion_accel.calibration"  # calibration.json written by calibrate (statistics, artifacts)


def read_json_object(file: str | Path) -> dict | None:
    """The JSON object in ``file``, or None (no such file, not JSON, not an object): for the files other tools or
    commands may have written (model_index.json, train_info.json, calibration.json)."""
    import json

    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def folders_named_like(folder: Path, names: Iterable[str], pattern: str | None = None) -> str | None:
    """"holds folders named [...], where files are written" for the sub-folders of ``folder`` called like files
    written there (``names``, or matching ``pattern``), else None: a write there failed with a bare "Is a directory"
    after the work (reports, artifacts, calibrate's notes)."""
    matching = folder.glob(pattern) if pattern and folder.is_dir() else ()
    taken = sorted({name for name in names if (folder / name).is_dir()} | {path.name for path in matching
                                                                            if path.is_dir()})
    return f"holds folders named {taken}, where files are written" if taken else None

