"""Fidelity of an accelerated pipeline's images to the unaccelerated pipeline's, same seeds.

PSNR and SSIM come from torchmetrics, per image and averaged; images are compared as uint8
0..255 (what the user saves), so identical images give PSNR = inf and SSIM = 1. torchmetrics' SSIM
(since 1.5) pads images by reflection and averages the SSIM map over every pixel, also windows that
reach into the padding; skimage and the paper average only windows inside the image. At 32 px that
makes our SSIM lower (noisy Fashion-MNIST: 0.76 vs 0.87; 256 px: 0.53 vs 0.54;
benchmarks/ssim_convention.py): compare SSIM between variants of one report, not with published values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                           structural_similarity_index_measure)

from .images import to_uint8

SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
# float64 SSIM holds ~1.7 KB per image value at once (330 MiB per 256-px RGB image: 64 of them took 21 GiB), so
# images are scored a few at a time: ~1.3 GiB at most, one image per call from 512 px up
VALUES_PER_CHUNK = 4 * 3 * 256 * 256


@dataclass
class FidelityResult:
    """PSNR (dB) and SSIM per image and mean; ``max_abs_diff`` in 0..255 units."""

    psnr: float
    ssim: float
    max_abs_diff: int
    psnr_per_image: list[float] = field(default_factory=list)
    ssim_per_image: list[float] = field(default_factory=list)


def _mean_psnr(per_image: list[float], values_per_image: int) -> float:
    """Mean of per-image PSNR (dB). An identical image (inf) counts as the best PSNR a differing image
    of its size can have (one of its ``values_per_image`` uint8 values off by one level), so the mean
    stays finite and never ranks a variant with more identical images lower; inf if all are identical.
    (Until session 27 one identical image switched the mean to the PSNR of the mean MSE, which could
    rank [26.9, inf] at 29.9 dB below [26.9, 89.0] at 57.9.)"""
    if all(math.isinf(value) for value in per_image):
        return math.inf
    best_differing = 10 * math.log10(255.0 ** 2 * values_per_image)
    return float(sum(min(value, best_differing) for value in per_image) / len(per_image))


def _ssim_sigma(height: int, width: int) -> float:
    """Gaussian SSIM window sigma: 1.5 (torchmetrics' 11-px window), scaled down so that the window
    (``2 * int(3.5 * sigma + 0.5) + 1`` px, torchmetrics' rule) fits an image smaller than 11 px;
    torchmetrics ignores ``kernel_size`` for Gaussian windows and failed on images under 6 px."""
    size = min(SSIM_KERNEL, height, width)
    size = size if size % 2 == 1 else size - 1
    return SSIM_SIGMA * size / SSIM_KERNEL


def fidelity(images: Any, reference: Any) -> FidelityResult:
    """PSNR/SSIM/max-abs-diff of ``images`` vs ``reference`` (same count and size, any image form)."""
    preds, target = to_uint8(images), to_uint8(reference)
    if preds.shape != target.shape:
        raise ValueError(f"images {tuple(preds.shape)} and reference {tuple(target.shape)} differ in shape")
    psnr_list, ssim_list = [], []
    per_chunk = max(1, VALUES_PER_CHUNK // preds[0].numel())
    for start in range(0, len(preds), per_chunk):  # per-image scores: chunks bound the memory, not the values
        chunk_psnr, chunk_ssim = _scores(preds[start:start + per_chunk], target[start:start + per_chunk])
        psnr_list += chunk_psnr
        ssim_list += chunk_ssim
    return FidelityResult(psnr=_mean_psnr(psnr_list, preds[0].numel()), ssim=sum(ssim_list) / len(ssim_list),
                          max_abs_diff=int((preds.short() - target.short()).abs().max()),
                          psnr_per_image=psnr_list, ssim_per_image=ssim_list)


def _scores(preds: Any, target: Any) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM of uint8 (N, C, H, W) tensors, computed in float64."""
    preds, target = preds.double(), target.double()
    psnr = peak_signal_noise_ratio(preds, target, data_range=255.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(preds, target, data_range=255.0, reduction="none",
                                               sigma=_ssim_sigma(*preds.shape[-2:]))
    return [float(value) for value in psnr], [float(value) for value in ssim]
