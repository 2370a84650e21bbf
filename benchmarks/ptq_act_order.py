"""GPTQ's act_order at W4A8, paired per image (issue #4): does rounding the loudest inputs first help?

GPTQ on output-MSE scales fitted lazily as the sweep reaches each segment, in one Hessian group (the ``"w4a8"``
preset's rounding, which now defaults to 4 groups and min-max activation ranges; this run: MSE ranges) against
the same with static scales (every scale fitted to the original weights first, which act_order needs) and
with static scales plus ``gptq_act_order=True`` (columns swept by decreasing Hessian diagonal), on 40
class-cycled prompts of a zoo model (fashion-sd: 50 DDIM steps, CFG 3; fashion-flux: 28 steps, true CFG 3),
simulated. Mean PSNR against the fp32 images of the same seeds, paired against that reference. Writes
benchmarks/results/ptq_act_order_<model>.{json,md}.

    python benchmarks/ptq_act_order.py --model fashion-sd
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ptq_quality import MODELS  # noqa: E402
from ptq_rounding import run_settings, selected, settings_cli  # noqa: E402

REFERENCE = "GPTQ, lazy output-MSE scales, one Hessian group"
GPTQ = dict(reconstruct=False, weight_rounding="gptq", gptq_groups=1, weight_scale="output_mse")  # as ptq_rounding.py
SETTINGS = {
    REFERENCE: GPTQ,
    "GPTQ, static output-MSE scales": GPTQ | dict(gptq_group_scales="static"),
    "GPTQ act_order, static output-MSE scales": GPTQ | dict(gptq_group_scales="static", gptq_act_order=True),
}


def main(argv: list[str] | None = None) -> None:
    args = settings_cli(__doc__, MODELS, "fashion-sd", argv)
    run_settings(args.model, selected(SETTINGS, REFERENCE, args.only), REFERENCE, "ptq_act_order",
                 "GPTQ act_order at W4A8", args.threads, out=args.out)


if __name__ == "__main__":
    main()
