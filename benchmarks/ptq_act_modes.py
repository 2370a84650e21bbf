"""W8A8 activation scales, paired per image (issue #4): calibrated static per-tensor ranges (ours W8A8,
Q-Diffusion's setting) vs dynamic per-tensor (one scale per layer call and split half, from that call's
min / max: no range calibration, still int8 kernels) vs dynamic per-token, and float activations for
the UNets' 1x1 shortcut convs (``act_exclude``).

40 class-cycled prompts of a zoo model (fashion-sd: 50 DDIM steps, CFG 3; fashion-flux: 28 steps, true
CFG 3), simulated (lowering gives the same numbers up to summation order), mean PSNR against the fp32
images of the same seeds, paired difference and t statistic against the static ranges. Writes
benchmarks/results/ptq_act_modes_<model>.{json,md}.

    python benchmarks/ptq_act_modes.py --model fashion-flux
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_quality import SHORTCUTS  # noqa: E402
from ptq_rounding import run_settings, selected, settings_cli  # noqa: E402
from zoo_harness import denoiser_attr  # noqa: E402

REFERENCE = "static per-tensor ranges (ours W8A8)"
TITLE = "W8A8 activation scales"
SETTINGS = {  # label -> changes to ours(model, "w8a8")
    REFERENCE: {},
    "dynamic per-tensor": dict(act_mode="dynamic_per_tensor"),
    "dynamic per-token": dict(act_mode="dynamic"),
}
UNET_ONLY = {
    "static, shortcut convs' activations in float": dict(act_exclude=SHORTCUTS),
    "dynamic per-tensor, shortcut convs' activations in float": dict(act_mode="dynamic_per_tensor",
                                                                     act_exclude=SHORTCUTS),
}


def main(argv: list[str] | None = None) -> None:
    args = settings_cli(__doc__, ("fashion-sd", "fashion-flux"), "fashion-sd", argv)  # text-to-image
    settings = SETTINGS | (UNET_ONLY if denoiser_attr(args.model) == "unet" else {})
    run_settings(args.model, selected(settings, REFERENCE, args.only), REFERENCE, "ptq_act_modes", TITLE, args.threads,
                 bits="w8a8", out=args.out)


if __name__ == "__main__":
    main()
