"""Fashion-MNIST loader: finds the Debian ``dataset-fashion-mnist`` files or a folder the user gives."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "DIFFUSION_ACCEL_FASHION_MNIST"
DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPLITS = {"train": "train", "test": "t10k"}


def find_root(root: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the idx files: ``root``, then $DIFFUSION_ACCEL_FASHION_MNIST, then Debian's."""
    candidates = [Path(root)] if root is not None else []
    if root is None and os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    if root is None:
        candidates += [Path(d) for d in DEFAULT_DIRS]
    for folder in candidates:
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in: {tried}). Install it with "
        f"`sudo apt-get install dataset-fashion-mnist`, or download the four "
        f"*-ubyte.gz files and pass root=FOLDER (CLI: --data FOLDER) or set {ENV_VAR}=FOLDER.")


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped idx file into a uint8 array (images: N×28×28, labels: N)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing Fashion-MNIST file {path}; install `dataset-fashion-mnist` "
                                f"or point {ENV_VAR} at a folder holding all four *-ubyte.gz files")
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 N×28×28, labels int64 N) of ``split`` ("train" 60k or "test" 10k)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    folder = find_root(root)
    prefix = SPLITS[split]
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_rgb32(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 → float N×3×32×32 in [-1, 1] (padded by 2 px of background)."""
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x.expand(-1, 3, -1, -1).contiguous()


def to_uint8_rgb32(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 → uint8 N×3×32×32 (the real-image layout for FID and CLIP score)."""
    x = torch.nn.functional.pad(images.unsqueeze(1), (2, 2, 2, 2), value=0)
    return x.expand(-1, 3, -1, -1).contiguous()
