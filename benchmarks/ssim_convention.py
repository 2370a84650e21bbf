"""SSIM as the library computes it (torchmetrics: reflect padding, the map averaged over every pixel) vs the
definition of Wang et al. / skimage (only windows that lie inside the image), at several image sizes.

Fashion-MNIST test images (resized to each size), Gaussian noise of sigma 8 (0..255) as the "accelerated"
image; the same Gaussian window (11 px, sigma 1.5). The inside-only value is torchmetrics' full SSIM map
cropped by the window radius (5 px) and averaged, which is what skimage computes.

    python benchmarks/ssim_convention.py [--images N] [--out REPORT.json]

Writes benchmarks/results/ssim_convention.{json,md}.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from cli_options import COUNT, RESULTS, script_parser
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from diffusion_accel.eval.machine import machine_info, machine_summary
from diffusion_accel.zoo.data import load_split

SIZES = (32, 64, 128, 256)
RADIUS = 5  # half of the 11-px Gaussian window


def ssim_both(reference: torch.Tensor, noisy: torch.Tensor) -> tuple[float, float]:
    """(torchmetrics' mean SSIM, the mean over windows inside the image) of float images in [0, 1]."""
    value, full = ssim(noisy, reference, data_range=1.0, return_full_image=True)
    inside = full[..., RADIUS:-RADIUS, RADIUS:-RADIUS].flatten(1).mean(1).mean()
    return float(value), float(inside)


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, RESULTS / "ssim_convention.json")
    parser.add_argument("--images", type=COUNT, default=16, help="test images per size (default 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = load_split("test")[0][:args.images].float().div(255).unsqueeze(1)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in SIZES:
        reference = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        noisy = (reference + torch.randn(reference.shape, generator=generator) * 8 / 255).clamp(0, 1)
        library, inside = ssim_both(reference, noisy)
        rows.append({"size": size, "ssim_library": round(library, 4), "ssim_inside_windows": round(inside, 4)})
    report = {"images": args.images, "noise_sigma_of_255": 8, "rows": rows, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["# SSIM: torchmetrics' padded windows vs windows inside the image", "",
             f"{report['images']} Fashion-MNIST test images per size, noise sigma {report['noise_sigma_of_255']}/255; "
             f"{machine_summary(report['machine'])}.", "",
             "| size px | SSIM (library, torchmetrics) | SSIM (inside windows, skimage's) |", "|---|---|---|"]
    lines += [f"| {r['size']} | {r['ssim_library']} | {r['ssim_inside_windows']} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
