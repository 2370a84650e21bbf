"""Stack all three on one pipeline (prune, quantize, cache), save it, reload it, measure it.

One trajectory calibration serves pruning and quantization; the artifact (safetensors + manifest)
re-applied to a fresh base reproduces the stacked pipeline's images exactly.

    python examples/stack_all_three.py [--pipe zoo:fashion-sd] [--steps 20] [--out stacked/]
"""

import argparse
import copy

import torch

import diffusion_accel as da
from diffusion_accel.argtypes import int_at_least, report_folder
from diffusion_accel.loading import default_demo_spec, load_pipeline


def stack(base, steps: int):
    """A copy of ``base`` with 30% of attention heads and FFN neurons removed (OBS), W8A8 lowered to
    int8 kernels, and DeepCache (or block caching for transformers) with linear forecasting."""
    prompts = da.prompts.for_pipeline(base, limit=4)
    calib = da.calibrate(base, prompts, num_inference_steps=steps, store_trajectory=True)
    pipe = copy.deepcopy(base)
    da.prune_(pipe, da.PruneConfig(method="obs", sparsity=0.3, pattern="structured"), calib=calib)
    da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib)
    return da.enable_cache(pipe, da.default_cache_config(pipe))  # DeepCache, or block caching for DiTs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipe", default=default_demo_spec())
    parser.add_argument("--steps", type=int_at_least(1), default=20)
    parser.add_argument("--out", type=report_folder, default="stacked")
    args = parser.parse_args(argv)

    base = load_pipeline(args.pipe)
    stacked = stack(base, args.steps)
    da.save(stacked, f"{args.out}/artifact")
    reloaded = da.load(load_pipeline(args.pipe), f"{args.out}/artifact")
    call = {"num_inference_steps": args.steps, "output_type": "pt", **da.call_defaults(base)}
    prompt = da.eval.default_prompt_to_kwargs(base, da.prompts.for_pipeline(base, limit=1))  # none for DDPM
    first = stacked(**prompt, generator=torch.Generator().manual_seed(0), **call).images
    again = reloaded(**prompt, generator=torch.Generator().manual_seed(0), **call).images
    print(f"techniques: {da.artifact.applied_techniques(reloaded)}; reloaded images identical: "
          f"{torch.equal(first, again)}")
    report = da.evaluate({"base": base, "stacked": stacked}, da.prompts.for_pipeline(base, limit=4),
                         metrics=("psnr", "ssim", "latency", "flops"), num_inference_steps=args.steps,
                         output_dir=args.out)
    print(report.to_markdown())
    print(f"artifact, grid and report written to {args.out}/")


if __name__ == "__main__":
    main()
