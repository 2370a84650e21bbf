"""Fidelity of an accelerated pipeline's images to the unaccelerated pipeline's, same seeds.

PSNR and SSIM come from torchmetrics, per image and averaged; images are compared as uint8
0..255 (what the user saves), so identical images give PSNR = inf and SSIM = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                           structural_similarity_index_measure)

from .images import to_uint8

SSIM_KERNEL = 11


@dataclass
class FidelityResult:
    """PSNR (dB) and SSIM per image and mean; ``max_abs_diff`` in 0..255 units."""

    psnr: float
    ssim: float
    max_abs_diff: int
    psnr_per_image: list[float] = field(default_factory=list)
    ssim_per_image: list[float] = field(default_factory=list)


def _mean_psnr(per_image: list[float]) -> float:
    """Mean of per-image PSNR (dB); if any image is identical (inf), the PSNR of the mean MSE."""
    if all(math.isfinite(value) for value in per_image):
        return float(sum(per_image) / len(per_image))
    return _psnr_of_mean_mse(per_image)


def _psnr_of_mean_mse(per_image: list[float]) -> float:
    """PSNR of the average MSE over images (identical images contribute MSE 0)."""
    mses = [0.0 if math.isinf(value) else 255.0 ** 2 / 10 ** (value / 10) for value in per_image]
    mean_mse = sum(mses) / len(mses)
    return math.inf if mean_mse == 0 else 10 * math.log10(255.0 ** 2 / mean_mse)


def _ssim_kernel(height: int, width: int) -> int:
    """Gaussian SSIM window: 11, or the largest odd size that fits a small image."""
    size = min(SSIM_KERNEL, height, width)
    return size if size % 2 == 1 else size - 1


def fidelity(images: Any, reference: Any) -> FidelityResult:
    """PSNR/SSIM/max-abs-diff of ``images`` vs ``reference`` (same count and size, any image form)."""
    preds, target = to_uint8(images), to_uint8(reference)
    if preds.shape != target.shape:
        raise ValueError(f"images {tuple(preds.shape)} and reference {tuple(target.shape)} differ in shape")
    preds, target = preds.double(), target.double()
    psnr = peak_signal_noise_ratio(preds, target, data_range=255.0, reduction="none", dim=(1, 2, 3))
    kernel = _ssim_kernel(*preds.shape[-2:])
    ssim = structural_similarity_index_measure(preds, target, data_range=255.0, reduction="none",
                                               kernel_size=kernel)
    psnr_list = [float(value) for value in psnr]
    return FidelityResult(psnr=_mean_psnr(psnr_list), ssim=float(ssim.mean()),
                          max_abs_diff=int((preds - target).abs().max()),
                          psnr_per_image=psnr_list, ssim_per_image=[float(value) for value in ssim])
