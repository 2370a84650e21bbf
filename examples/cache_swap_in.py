"""Swap a cached pipeline into existing code: same object, same call, fewer UNet evaluations.

    python examples/cache_swap_in.py [--pipe zoo:fashion-sd] [--steps 50]
"""

import argparse
import time

import torch

import diffusion_accel as da
from diffusion_accel.argtypes import int_at_least
from diffusion_accel.loading import default_demo_spec, load_pipeline


def generate(pipe, steps: int) -> tuple[torch.Tensor, float]:
    """One image of the pipeline's first default prompt (a caption, a class id, or none for DDPM) and its
    wall time in seconds."""
    prompt = da.eval.default_prompt_to_kwargs(pipe, da.prompts.for_pipeline(pipe, limit=1))
    start = time.perf_counter()
    images = pipe(**prompt, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **da.call_defaults(pipe)).images
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipe", default=default_demo_spec())
    parser.add_argument("--steps", type=int_at_least(1), default=50)
    args = parser.parse_args()

    pipe = load_pipeline(args.pipe)
    generate(pipe, min(args.steps, 2))  # warm-up: the first call's one-time costs are not the cache's gain
    baseline, baseline_s = generate(pipe, args.steps)
    da.enable_cache(pipe, da.default_cache_config(pipe))  # DeepCache (UNets) or block caching (DiTs)
    cached, cached_s = generate(pipe, args.steps)
    print(da.cache_summary(pipe, as_text=True).splitlines()[0])
    print(f"uncached {baseline_s:.2f} s, cached {cached_s:.2f} s ({baseline_s / cached_s:.2f}x), "
          f"max |diff| {(baseline - cached).abs().max():.4f}")
    da.remove_cache(pipe)
    restored, _ = generate(pipe, args.steps)
    print("after remove_cache identical to uncached:", torch.equal(restored, baseline))


if __name__ == "__main__":
    main()
