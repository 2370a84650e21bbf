"""Fashion-MNIST loader: finds the Debian ``dataset-fashion-mnist`` files or a folder the user gives."""

from __future__ import annotations

import gzip
import lzma
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..argtypes import input_path
from ..paths import expand_home

ENV_VAR = "DIFFUSION_ACCEL_FASHION_MNIST"
DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPLITS = {"train": "train", "test": "t10k"}
# Debian ships .gz; .xz is 15% smaller (pack_xz); "" is a gunzipped download
COMPRESSIONS = {".gz": gzip.open, ".xz": lzma.open, "": open}


def idx_file(folder: Path, stem: str) -> Path:
    """``folder/stem.gz``, ``.xz`` or uncompressed, whichever exists (the .gz path when none does)."""
    for suffix in COMPRESSIONS:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return folder / f"{stem}.gz"


def find_root(root: str | os.PathLike | None = None, split: str = "train") -> Path:
    """Return the folder holding ``split``'s idx files: ``root``, else $DIFFUSION_ACCEL_FASHION_MNIST when set
    (only it: a wrong one was skipped silently for Debian's), else Debian's."""
    if root is not None:  # ~ expanded here and in the variable (a Docker ENV, a quoted export; until session 53)
        candidates = [expand_home(root)]
    elif os.environ.get(ENV_VAR):
        candidates = [expand_home(os.environ[ENV_VAR])]
    else:
        candidates = [Path(d) for d in DEFAULT_DIRS]
    stem = f"{SPLITS.get(split, 'train')}-images-idx3-ubyte"
    for folder in candidates:
        if idx_file(folder, stem).is_file():
            return folder
    partial = [folder for folder in candidates if any(folder.glob("*-ubyte*"))]
    if partial:  # e.g. `python -m diffusion_accel.zoo.data DEST`'s train-only copy: "not found" misled
        raise FileNotFoundError(f"{partial[0]} holds Fashion-MNIST files but not the {split} split's ({stem}.gz and "
                                f"its labels file, or .xz); add them, or point at a folder with all four")
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in: {tried}). Install it with "
        f"`sudo apt-get install dataset-fashion-mnist`, or download the four "
        f"*-ubyte.gz files into a FOLDER: set {ENV_VAR}=FOLDER (any command), pass root=FOLDER (Python) or "
        f"`diffusion-accel zoo train --data FOLDER`.")


MISSING_FILE_ADVICE = (f"install `dataset-fashion-mnist` or point {ENV_VAR} at a folder holding all four "
                       f"*-ubyte.gz files")


def _read_idx(path: Path, ndim: int, dataset: str = "Fashion-MNIST", advice: str = MISSING_FILE_ADVICE) -> np.ndarray:
    """Parse one gzipped (or xz) idx file of ``ndim`` dimensions into a uint8 array (images: N×28×28,
    labels: N); a clear error for another file under this name (images saved as the labels file failed
    deep in training), and for a missing one naming ``dataset`` and the ``advice`` for it."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {dataset} file {path}; {advice}")
    opener = COMPRESSIONS.get(path.suffix, open)
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if data[:3] != b"\x00\x00\x08" or data[3] != ndim:
            raise ValueError(f"idx header {data[:4].hex()} is not one of unsigned bytes in {ndim} dimension(s)")
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, IndexError) as error:  # zlib: a damaged
        # stream inside a gzip file was a traceback naming no file (until session 53)
        raise ValueError(f"dataset file {path} is damaged or not an idx file ({error}); download it "
                         "again (Fashion-MNIST: reinstall `dataset-fashion-mnist`)") from None


def load_split(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 N×28×28, labels int64 N) of ``split`` ("train" 60k or "test" 10k)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    folder = find_root(root, split)
    prefix = SPLITS[split]
    images = _read_idx(idx_file(folder, f"{prefix}-images-idx3-ubyte"), 3)
    labels = _read_idx(idx_file(folder, f"{prefix}-labels-idx1-ubyte"), 1)
    if len(images) != len(labels):  # e.g. another split's labels copied over these
        raise ValueError(f"Fashion-MNIST {split} split in {folder}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_gray32(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 → float N×1×32×32 in [-1, 1] (padded by 2 px of background)."""
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def to_rgb32(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 → float N×3×32×32 in [-1, 1] (padded by 2 px of background)."""
    return to_gray32(images).expand(-1, 3, -1, -1).contiguous()


def to_uint8_rgb32(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 → uint8 N×3×32×32 (the real-image layout for FID and CLIP score)."""
    x = torch.nn.functional.pad(images.unsqueeze(1), (2, 2, 2, 2), value=0)
    return x.expand(-1, 3, -1, -1).contiguous()


def pack_xz(dest: str | os.PathLike, split: str = "train", root: str | os.PathLike | None = None) -> list[Path]:
    """Write ``split``'s two idx files xz-compressed into ``dest`` (26.4 -> 22.6 MB for train): a copy
    small enough to travel with the repository to a lent GPU machine; ``--data DEST`` reads it."""
    folder, dest = find_root(root, split), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("images-idx3", "labels-idx1"):
        source = idx_file(folder, f"{SPLITS[split]}-{kind}-ubyte")
        with COMPRESSIONS[source.suffix](source, "rb") as f:
            raw = f.read()
        target = dest / f"{SPLITS[split]}-{kind}-ubyte.xz"
        target.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusion_accel.zoo.data DEST``: write the xz copy of a split (``--help`` was taken as DEST)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diffusion_accel.zoo.data",
                                     description="Write an xz copy of a Fashion-MNIST split (for a GPU machine's --data).")
    parser.add_argument("dest", help="folder to write the two .xz idx files into")
    parser.add_argument("--split", choices=sorted(SPLITS), default="train")
    parser.add_argument("--root", default=None, type=input_path,
                        help="where Fashion-MNIST is (default: as the loader finds it)")
    args = parser.parse_args(argv)
    try:
        written = pack_xz(args.dest, args.split, root=args.root)
    except (ValueError, OSError) as error:  # missing data: one line, as zoo.train and zoo.ship (a traceback before)
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main()
