"""GPTQ with weight groups: lazy vs static group scales at W4A8, paired per image (issue #4).

GPTQ folds each column's rounding error into the columns not yet rounded, so by the time the sweep
reaches a later weight group its weights have moved. "static" fits every group's scale to the
original weights first (what a scale search alone would do); "lazy" (the default, as in GPTQ's
reference) fits each group's scale when the sweep reaches it. Per-channel scales (one segment) are
the same either way. Also: group-wise nearest rounding and naive PTQ for scale. fashion-flux uses
dynamic per-token activations (its best W8A8 mode), fashion-sd static ranges and the split shortcut
(whose two halves are two scale segments). Writes benchmarks/results/ptq_group_scales_<model>.{json,md}.

    python benchmarks/ptq_group_scales.py --model fashion-flux
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_quality import GPTQ, MODELS, naive  # noqa: E402
from ptq_rounding import run_settings, selected, settings_cli  # noqa: E402
from zoo_harness import denoiser_attr  # noqa: E402

REFERENCE = "GPTQ, per-channel"
TITLE = "W4A8 GPTQ with weight groups: lazy vs static group scales"


def settings(model: str) -> dict[str, dict]:
    """label -> changes to ours(model, "w4a8", lower=False)."""
    base = GPTQ | (dict(act_mode="dynamic") if denoiser_attr(model) == "transformer" else {})
    rows = {REFERENCE: base}
    if denoiser_attr(model) == "unet":  # the split shortcut's second half is a later segment too
        rows["GPTQ, per-channel, static split-half scales"] = base | dict(gptq_group_scales="static")
    for size in (64, 32):
        group = dict(weight_granularity="group", group_size=size)
        rows[f"GPTQ, group {size}, lazy scales"] = base | group
        rows[f"GPTQ, group {size}, static scales"] = base | group | dict(gptq_group_scales="static")
    rows["nearest, group 32"] = base | dict(weight_granularity="group", group_size=32, weight_rounding="nearest")
    plain = naive(model, "w4a8")
    rows["naive, group 32"] = dict(weight_scale=plain.weight_scale, weight_rounding=plain.weight_rounding,
                                   act_method=plain.act_method, split_shortcut=plain.split_shortcut,
                                   calib_steps=plain.calib_steps, weight_granularity="group", group_size=32,
                                   reconstruct=False)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = settings_cli(__doc__, MODELS, "fashion-flux", argv)
    run_settings(args.model, selected(settings(args.model), REFERENCE, args.only), REFERENCE, "ptq_group_scales",
                 TITLE, args.threads, out=args.out)


if __name__ == "__main__":
    main()
