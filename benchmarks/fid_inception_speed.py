"""How fast is the offline TF-Inception FID network in fp32 vs under bf16 autocast on this machine?

    python benchmarks/fid_inception_speed.py [--images 64] [--repeats 2]

32 px uint8 images (the zoo's size) through ``TFInceptionFeatures`` (TF1 bilinear resize to 299,
then the network), warmed up 3 times, best of ``repeats``; also the largest feature difference
between the two precisions. Backs ``eval --fid-dtype bfloat16``. Writes
``benchmarks/results/fid_inception_speed.{json,md}``.
"""

from __future__ import annotations

import json
import os
import time

import torch
from cli_options import COUNT, RESULTS, script_parser

from diffusion_accel.eval.inception import TFInceptionFeatures
from diffusion_accel.eval.machine import machine_info

REFERENCE_IMAGES = 10_000  # the Fashion-MNIST test split


def images_per_second(extractor: TFInceptionFeatures, images: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` throughput (images/s) and the features of the last pass."""
    for _ in range(3):
        extractor(images[:8])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        features = extractor(images)
        seconds.append(time.perf_counter() - start)
    return len(images) / min(seconds), features


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, RESULTS / "fid_inception_speed.json")
    parser.add_argument("--images", type=COUNT, default=64)
    parser.add_argument("--repeats", type=COUNT, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    rows, features = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        rate, features[dtype] = images_per_second(TFInceptionFeatures(dtype=dtype), images, args.repeats)
        rows[str(dtype).removeprefix("torch.")] = {"images_per_s": round(rate, 2),
                                                   "minutes_for_10k": round(REFERENCE_IMAGES / rate / 60, 1)}
    difference = (features[torch.bfloat16] - features[torch.float32]).abs().max() / features[torch.float32].abs().max()
    results = {"command": f"python benchmarks/fid_inception_speed.py --images {args.images} --repeats {args.repeats}",
               "machine": machine_info(), "load_average": os.getloadavg(), "rows": rows,
               "bf16_speedup": round(rows["bfloat16"]["images_per_s"] / rows["float32"]["images_per_s"], 2),
               "bf16_max_relative_feature_difference": round(float(difference), 4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = [f"Measured by `{results['command']}` (load average before: {results['load_average'][0]:.2f}).", "",
             "| precision | images/s | minutes for 10,000 images |", "|---|---|---|"]
    lines += [f"| {name} | {row['images_per_s']} | {row['minutes_for_10k']} |" for name, row in rows.items()]
    lines += ["", f"bf16 speed-up: {results['bf16_speedup']}x; largest feature difference "
                  f"{results['bf16_max_relative_feature_difference']:.2%} of the largest fp32 feature.",
              "", "**Machine:** " + ", ".join(f"{k}={v}" for k, v in results["machine"].items())]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
