"""Compare pipeline variants on the same seeds: a metrics table plus a PNG grid.

    python examples/comparison_grid.py [--pipe zoo:fashion-sd] [--out comparison/]
"""

import argparse
import copy

import diffusion_accel as da
from diffusion_accel.argtypes import int_at_least, report_folder
from diffusion_accel.loading import default_demo_spec, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipe", default=default_demo_spec())
    parser.add_argument("--steps", type=int_at_least(1), default=25)
    parser.add_argument("--out", type=report_folder, default="comparison")
    args = parser.parse_args()

    base = load_pipeline(args.pipe)
    cached = da.enable_cache(copy.deepcopy(base), da.default_cache_config(base, interval=2))
    pruned = da.prune_(copy.deepcopy(base), da.PruneConfig(method="magnitude", sparsity=0.3))
    prompts = da.prompts.for_pipeline(base, limit=6)
    cache_name = f"{da.cache_summary(cached)['method']}-2"  # deepcache on UNets, block caching on transformers
    report = da.evaluate({"base": base, cache_name: cached, "magnitude-30%": pruned}, prompts,
                         metrics=("psnr", "ssim", "latency"), num_inference_steps=args.steps,
                         output_dir=args.out)
    print(report.to_markdown())
    print(f"grid and report written to {args.out}/")


if __name__ == "__main__":
    main()
