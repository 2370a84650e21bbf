"""Image conversions shared by the metrics: everything becomes a uint8 NCHW tensor.

Accepted inputs: a torch tensor (N, C, H, W) or (C, H, W), uint8 in 0..255 or float in [0, 1];
a numpy array (N, H, W, C) or (H, W, C) (diffusers' ``output_type="np"``), uint8 or float in
[0, 1]; a PIL image (16-bit grayscale rescaled, float mode "F" in [0, 1]; 32-bit integer mode "I" refused);
or a list of any of these with equal sizes. Grayscale (C = 1) becomes RGB.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_uint8(images: Any) -> torch.Tensor:
    """Convert images (see module doc) to a uint8 RGB tensor of shape (N, 3, H, W)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images; need at least one image")
        parts = [to_uint8(image) for image in images]
        shapes = {tuple(part.shape[1:]) for part in parts}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)}; resize them to one size first")
        return torch.cat(parts)
    if isinstance(images, Image.Image):
        return _from_pil(images)
    if isinstance(images, np.ndarray):
        return _from_hwc(images)
    if isinstance(images, torch.Tensor):
        return _from_chw(images)
    raise TypeError(f"unsupported image type {type(images).__name__}; accepted: torch.Tensor "
                    "(N,C,H,W), numpy array (N,H,W,C), PIL.Image, or a list of these")


def _from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image -> uint8 (1, 3, H, W). PIL's ``convert("RGB")`` clips wider modes at 255: 16-bit grayscale is
    rescaled (older Pillow opens 16-bit PNGs as "I"), float ("F") read as [0, 1] like numpy floats, and other
    32-bit integer images (whose range nothing says) refused: they loaded clipped, silently."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        return _from_hwc((np.array(image).astype(np.int64).clip(0, 65535) * 255 // 65535).astype(np.uint8))
    if image.mode == "F":
        return _from_hwc(np.array(image))
    if image.mode == "I":
        raise ValueError("PIL image of mode 'I' (32-bit integers) has no known value range; convert it to 8-bit "
                         "('L' / 'RGB'), 16-bit ('I;16') or a float array in [0, 1] first")
    return _from_hwc(np.array(image.convert("RGB")))


def _from_hwc(array: np.ndarray) -> torch.Tensor:
    """numpy (H, W, C) / (N, H, W, C) / (H, W) -> uint8 (N, 3, H, W)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"numpy images must have 2-4 dims (N,H,W,C); got shape {array.shape}")
    return _from_chw(torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2))


def _from_chw(tensor: torch.Tensor) -> torch.Tensor:
    """torch (C, H, W) / (N, C, H, W), uint8 or float in [0, 1] -> uint8 (N, 3, H, W)."""
    tensor = check_pixel_dtype(as_nchw(tensor).detach().cpu())
    if tensor.dtype != torch.uint8:
        tensor = (checked_unit_range(tensor.float()) * 255).round().clamp(0, 255).to(torch.uint8)
    return to_rgb(tensor)


def check_pixel_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if its pixels are uint8 or float, else a TypeError (int64 0..255 was read as [0, 1] floats)."""
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise TypeError(f"image tensor dtype {tensor.dtype} unsupported; accepted: uint8 or float in [0, 1]")
    return tensor


def as_nchw(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) from one (C, H, W) image or a batch; a ValueError for other shapes (a grayscale batch
    (N, H, W) with N not 1, 3 or 4 reached the FID network and crashed there)."""
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3, 4):
        raise ValueError(f"image tensors must be (N,C,H,W) with C in (1, 3, 4), or one (C,H,W) image; got shape "
                         f"{tuple(tensor.shape)} (a grayscale batch (N,H,W): pass images[:, None])")
    return tensor


FLOAT_RANGE_SLACK = 0.01  # float images may overshoot [0, 1] by rounding; beyond this they are not [0, 1] images


def checked_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``images`` if every value is finite and within [0, 1] (± ``FLOAT_RANGE_SLACK``), else a ValueError:
    0..255 or [-1, 1] floats were clamped silently, NaNs became black pixels."""
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(dim=1).sum())
        raise ValueError(f"{bad} of {len(images)} images hold NaN or infinite values: the pipeline produced "
                         "non-finite outputs (e.g. fp16 overflow), which no metric can score")
    low, high = float(images.min()), float(images.max())
    if low < -FLOAT_RANGE_SLACK or high > 1 + FLOAT_RANGE_SLACK:
        raise ValueError(f"float images must hold values in [0, 1]; got [{low:.4g}, {high:.4g}] "
                         "(0..255 floats: pass uint8 or divide by 255; [-1, 1]: map with (x + 1) / 2)")
    return images


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C = 1 (gray), 3 or 4 (RGBA, alpha dropped) -> (N, 3, H, W)."""
    channels = images.shape[1]
    if channels == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 4:
        return images[:, :3].contiguous()
    return images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (N, 3, H, W) tensor -> list of RGB PIL images."""
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in to_uint8(images)]


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images in {str(root)!r}; accepted suffixes: {', '.join(IMAGE_SUFFIXES)}")
    return files


def load_image(path: str | Path) -> torch.Tensor:
    """Read one image file as uint8 (3, H, W)."""
    with Image.open(path) as image:
        return to_uint8(image)[0]


IMAGE_KEYS = ("image", "img", "pixel_values")  # the image column of a dict row (Hugging Face ``datasets``)


def iter_dataset_images(dataset: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Yield uint8 (3, H, W) images from a dataset of images, (image, label, ...) tuples or dict rows with an
    ``IMAGE_KEYS`` column (a Hugging Face ``datasets.Dataset``), or of batches of them (a ``DataLoader``: each yields
    every image of its batch; until session 41 only the first)."""
    for item in dataset:
        yield from dataset_images(item)


def dataset_images(item: Any) -> list[torch.Tensor]:
    """The uint8 (3, H, W) images of one dataset item (see ``dataset_image``); a list batch (a DataLoader with
    ``collate_fn=list``, often of images of several sizes) converted image by image."""
    parts = dataset_image(item)
    parts = parts if isinstance(item, list) and isinstance(parts, list) else [parts]
    return [image for part in parts for image in to_uint8(part)]


def dataset_image(item: Any) -> Any:
    """The image (or batch) of one dataset item: a tuple's first element, a dict row's image column, else itself; a
    list batch of images or of rows (a DataLoader with ``collate_fn=list``) gives the list of its images (until
    session 53 only the first: 2 of 6 images counted into an FID reference, silently)."""
    if isinstance(item, list) and item and all(isinstance(element, (tuple, list, Mapping)) for element in item):
        return [dataset_image(element) for element in item]
    if isinstance(item, list) and len(item) > 1 and all(_single_image(element) for element in item) \
            and len({_image_kind(element) for element in item}) == 1:
        return item  # one kind of image throughout: an [image, mask] row stays a row
    if isinstance(item, (tuple, list)):
        return item[0]
    if isinstance(item, Mapping):
        key = next((key for key in IMAGE_KEYS if key in item), None)
        if key is None:
            raise ValueError(f"a dataset row with keys {sorted(item)[:8]} has no image column; accepted: "
                             f"{', '.join(IMAGE_KEYS)}")
        return item[key]
    return item


def _single_image(value: Any) -> bool:
    """Whether ``value`` is one image: a PIL image, a (C, H, W) tensor or an (H, W, C) / (H, W) array (not a label,
    not a batch)."""
    if isinstance(value, np.ndarray):
        return value.ndim in (2, 3)
    return isinstance(value, Image.Image) or (isinstance(value, torch.Tensor) and value.ndim == 3)


def _image_kind(image: Any) -> tuple:
    """What tells an image from a mask beside it: type, PIL mode, array rank and channels, tensor channels."""
    if isinstance(image, Image.Image):
        return ("pil", image.mode)
    if isinstance(image, np.ndarray):
        return ("array", image.ndim, image.shape[-1] if image.ndim == 3 else 1)
    return ("tensor", image.shape[0])


def hash_tensor(tensor: torch.Tensor) -> str:
    """SHA-256 hex digest of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hash_files(files: Sequence[Path], root: Path) -> str:
    """SHA-256 hex digest over (relative path, bytes) of every file."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
