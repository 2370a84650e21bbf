"""The hub-model calibration job (calibration/build_artifacts.py) on the full SD 1.5 architecture.

No hub weights can be downloaded here, so this builds a ``StableDiffusionPipeline`` with the
published SD 1.5 configs and random weights (UNet 859.5M, VAE, CLIP ViT-L/14 text tower; the
locally built byte-level tokenizer stands in for OpenAI's vocabulary), saves it once as a
``save_pretrained`` folder, and runs the calibration script on ``pipelines/sd15.toml`` with
``--pipe`` pointing at it. Random weights make the images noise, but the job's wall time, memory
and artifact size are those of the real model, and PSNR vs the base still measures how closely
the accelerated pipeline follows it. The UNet's ``sample_size`` is 32 so the pipeline's default
resolution is 256 px (512 px costs ~4x the time on a 2-core CPU).

    python benchmarks/calibration_fullsize.py --methods ptq --num-prompts 4 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusion_accel.testing.fullsize import PUBLISHED_PARAMETERS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "calibration"))
from cli_options import COUNT, report_path  # noqa: E402

SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)
CLIP_VIT_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def build_sd15_pipeline(seed: int = 0) -> torch.nn.Module:
    """SD 1.5's published UNet / VAE / text-tower configs with random weights (fp32)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_accel.testing.fullsize import sd15_unet
    from diffusion_accel.testing.tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer(max_length=77)
    unet, _ = sd15_unet(seed=seed, sample_size=32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=len(tokenizer) - 2,
                                                eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
                                                **CLIP_VIT_L_TEXT))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def pipeline_folder(workdir: Path) -> tuple[Path, bool]:
    """The saved random-weight pipeline (built and saved once, fp16 on disk, ~2 GB); True if built now."""
    folder = workdir / "sd15-random"
    if (folder / "model_index.json").is_file():
        return folder, False
    build_sd15_pipeline().to(torch.float16).save_pretrained(folder)
    return folder, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "\n").splitlines()[0])
    parser.add_argument("--methods", default="ptq")
    parser.add_argument("--num-prompts", type=COUNT, default=4)
    parser.add_argument("--steps", type=COUNT, default=10, help="calibration steps (the recipe: 25)")
    parser.add_argument("--check-prompts", type=COUNT, default=2)
    parser.add_argument("--check-steps", type=COUNT, default=10)
    parser.add_argument("--threads", type=COUNT, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("zoo_runs/calibration_fullsize"))
    parser.add_argument("--out", type=report_path, default=RESULTS / "calibration_sd15_fullsize.json")
    args, calibrate_args = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    import build_artifacts

    start = time.perf_counter()
    folder, built = pipeline_folder(args.workdir)
    build_s = time.perf_counter() - start
    artifacts = args.workdir / f"artifacts-{args.methods.replace(',', '-')}"
    code = build_artifacts.main([str(ROOT / "pipelines" / "sd15.toml"), "--pipe", str(folder), "--dtype", "fp32",
                                 "--methods", args.methods, "--num-prompts", str(args.num_prompts),
                                 "--steps", str(args.steps), "--check-prompts", str(args.check_prompts),
                                 "--check-steps", str(args.check_steps), "--force", "--out", str(artifacts),
                                 *(["--", *calibrate_args] if calibrate_args else [])])
    summary = json.loads((artifacts / "summary.json").read_text())
    summary["setup"] = {"pipeline": "SD 1.5 configs, random weights, 256 px default",
                        "pipeline_folder": f"built and saved in {build_s:.0f} s" if built else "reused",
                        "unet_fp32_mib": round(PUBLISHED_PARAMETERS["sd15"] * 4 / 2**20, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    md = (artifacts / "summary.md").read_text()
    args.out.with_suffix(".md").write_text(md.replace("# Artifacts:", "# Calibration job on the full SD 1.5 "
                                                      "architecture (random weights, 256 px):", 1), encoding="utf-8")
    print(md)
    return code


if __name__ == "__main__":
    sys.exit(main())
