"""Attention matmul quantization on top of W8A8, paired per image (issue #4).

W8A8 (ours, simulated) with and without Q·Kᵀ and softmax·V input quantization (Q, K, V int8 dynamic
per batch row; softmax output on an unsigned 16-, 8- or 6-bit grid: which of the two costs what), on
40 class-cycled prompts of a zoo model (fashion-sd: the UNet's attention; fashion-flux: Flux's joint
attention, double- and single-stream blocks). Mean PSNR against the fp32 images of the same seeds and
the paired difference to plain W8A8. fashion-flux uses dynamic per-token activations (its best W8A8
mode). Writes benchmarks/results/ptq_attention_<model>.{json,md}.

    python benchmarks/ptq_attention.py --model fashion-flux
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_quality import MODELS  # noqa: E402
from ptq_rounding import run_settings, selected, settings_cli  # noqa: E402
from zoo_harness import denoiser_attr  # noqa: E402

REFERENCE = "W8A8"
TITLE = "Attention matmul quantization on top of W8A8"


def settings(model: str) -> dict[str, dict]:
    """label -> changes to ours(model, "w8a8", lower=False)."""
    base = dict(act_mode="dynamic") if denoiser_attr(model) == "transformer" else {}
    return {REFERENCE: base,
            "W8A8 + attention int8, softmax 16-bit": base | dict(attention="int8", softmax_bits=16),
            "W8A8 + attention int8, softmax 8-bit": base | dict(attention="int8", softmax_bits=8),
            "W8A8 + attention int8, softmax 6-bit": base | dict(attention="int8", softmax_bits=6)}


def main(argv: list[str] | None = None) -> None:
    args = settings_cli(__doc__, MODELS, "fashion-flux", argv)
    run_settings(args.model, selected(settings(args.model), REFERENCE, args.only), REFERENCE, "ptq_attention", TITLE,
                 args.threads, bits="w8a8", out=args.out)


if __name__ == "__main__":
    main()
