"""Accelerate once, reuse everywhere: an img2img pipeline built from the accelerated text-to-image
pipeline's components runs the same W8A8 + cached denoiser, on the steps it actually runs.

    python examples/img2img_reuse.py [--pipe zoo:fashion-sd] [--steps 50] [--strength 0.6]

img2img at strength 0.6 of 50 steps runs schedule steps 20..49; caches and PTQ step groups index
those same positions (not 0..29), so what was calibrated on text-to-image applies unchanged.
"""

import argparse

import torch
from diffusers import AutoPipelineForImage2Image

import diffusion_accel as da
from diffusion_accel.argtypes import fraction, int_at_least
from diffusion_accel.eval.fidelity import fidelity
from diffusion_accel.eval.pipes import is_text_conditioned
from diffusion_accel.loading import default_demo_spec, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipe", default=default_demo_spec())
    parser.add_argument("--steps", type=int_at_least(1), default=50)
    parser.add_argument("--strength", type=fraction, default=0.6)
    args = parser.parse_args()
    if int(args.steps * args.strength) < 1:  # diffusers runs int(steps * strength) of the steps
        parser.error(f"--strength {args.strength} of --steps {args.steps} runs no img2img step; raise either")

    pipe = load_pipeline(args.pipe)
    if not is_text_conditioned(pipe):
        parser.error(f"{args.pipe} is a {type(pipe).__name__}: this example needs a text-to-image pipeline "
                     f"(img2img reuses its components), e.g. zoo:fashion-sd or zoo:fashion-flux")
    pipe.set_progress_bar_config(disable=True)
    defaults = da.call_defaults(pipe)
    sneaker = pipe("a photo of a sneaker", num_inference_steps=args.steps, output_type="pt",
                   generator=torch.Generator().manual_seed(0), **defaults).images
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # shares the UNet, VAE, text encoder, scheduler
    img2img.set_progress_bar_config(disable=True)

    def boot() -> torch.Tensor:
        return img2img("a photo of an ankle boot", image=sneaker, strength=args.strength,
                       num_inference_steps=args.steps, output_type="pt",
                       generator=torch.Generator().manual_seed(1), **defaults).images

    reference = boot()
    calib = da.calibrate(pipe, da.prompts.load("fashion")[:4], num_inference_steps=args.steps,
                         steps=f"uniform:{min(5, args.steps)}", progress=False, **defaults)
    da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib)
    da.enable_cache(pipe, da.default_cache_config(pipe))  # DeepCache on UNets, block caching on transformers
    accelerated = boot()
    steps = [record["step"] for record in da.cache_summary(pipe)["steps"]]
    print(f"{type(img2img).__name__} ran schedule steps {steps[0]}..{steps[-1]} of {args.steps}")
    print(da.cache_summary(pipe, as_text=True).splitlines()[0])
    print(f"W8A8 + cache img2img vs fp32 img2img: PSNR {fidelity(accelerated, reference).psnr:.1f} dB")


if __name__ == "__main__":
    main()
