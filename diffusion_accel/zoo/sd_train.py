"""Train ``fashion-sd``: a UNet2DConditionModel (ε-prediction, CFG dropout, EMA) on frozen fashion-clip text + VAE latents."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from . import _common as C
from .captions import TEMPLATES, all_captions
from .data import to_rgb32

DEFAULT_STEPS = 3000
DEFAULT_BATCH = 128
DEFAULT_LR = 3e-4
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
MIN_SNR_GAMMA = 5.0
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False)


def default_steps(name: str = "fashion-sd") -> int:
    """Default optimiser steps (batch 128) for the fashion-sd UNet."""
    return DEFAULT_STEPS


def build_unet(cross_attention_dim: int = 128) -> UNet2DConditionModel:
    """UNet on 8×8×4 latents: blocks (64, 128, 128), cross-attention at 8×8 and 4×4 going down and up."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=32)


def stage_folder(name: str) -> Path:
    """Exported folder of a prerequisite stage: zoo_runs/NAME/final, else the shipped model (for CLIP)."""
    run = C.RUNS_ROOT / name / "final"
    if run.is_dir():
        return run
    if name == "fashion-clip":
        from . import path
        return path(name)
    raise FileNotFoundError(f"{run} missing: train it first with `diffusion-accel zoo train {name}` (earlier stages "
                            f"are read from {C.RUNS_ROOT}/<stage>/final, the default run folders; set "
                            f"DIFFUSION_ACCEL_ZOO_RUNS to the folder holding them: --out places only this stage's run)")


def vae_folder(vae_stage: str) -> Path:
    """The VAE a pipeline ships: the decoder-fine-tuned stage (same encoder, same latents) if trained, else ``vae_stage``."""
    decoder_stage = vae_stage.replace("-vae", "-decoder")
    if (C.RUNS_ROOT / decoder_stage / "final").is_dir():
        return C.RUNS_ROOT / decoder_stage / "final"
    return stage_folder(vae_stage)


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextModel, tok: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """last_hidden_state (len(texts) × model_max_length × width), encoded exactly as the SD pipeline does."""
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of uint8 N×28×28 images, each N×C×8×8, unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_rgb32(images[i:i + batch]).to(vae.device)).latent_dist
        means.append(dist.mean.cpu()), stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def min_snr_weight(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Min-SNR-γ loss weight for ε-prediction: min(SNR, γ)/SNR per sample."""
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    return snr.clamp(max=MIN_SNR_GAMMA) / snr


def export(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
           tok: CLIPTokenizer, folder: Path, info: dict) -> Path:
    """Assemble and save_pretrained the StableDiffusionPipeline (DDIM scheduler, no safety checker)."""
    scheduler = DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def clip_text_tower(folder: Path) -> CLIPTextModel:
    """The text tower of the full ``CLIPModel`` saved in ``folder`` (fashion-clip), without transformers' load
    report listing every vision weight it skips as UNEXPECTED."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return CLIPTextModel.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_frozen(device: torch.device, source: Path | None = None) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """The frozen VAE and fashion-clip text tower + tokenizer on ``device``: from the warm-start pipeline
    ``source`` when given, else the trained stages (see ``vae_folder``)."""
    if source is not None:
        vae = AutoencoderKL.from_pretrained(source / "vae").float()
        text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder").float()
        return vae.to(device).eval(), text_encoder.to(device).eval(), CLIPTokenizer.from_pretrained(source / "tokenizer")
    vae = AutoencoderKL.from_pretrained(vae_folder("fashion-sd-vae")).to(device).eval()
    clip = stage_folder("fashion-clip")
    text_encoder = clip_text_tower(clip).to(device).eval()
    return vae, text_encoder, CLIPTokenizer.from_pretrained(clip)


def warm_start_info(cfg: C.RunConfig, name: str, init_steps: int | None, steps_done: int) -> dict:
    """train_info fields of a warm start (``init_steps``: ``C.warm_start_steps``, None without one): where it
    started (as given: "zoo" names the shipped model) and the optimiser steps behind the exported weights."""
    if init_steps is None:
        return {}
    return {"init_from": C.init_label(cfg, name), "init_steps": init_steps, "total_steps": init_steps + steps_done}


def train(cfg: C.RunConfig, name: str = "fashion-sd") -> Path:
    """Train (or resume) the fashion-sd UNet; returns the exported pipeline folder ``run_dir/final``."""
    device = C.setup_device()
    gen = C.seed_all(cfg.seed)
    source = C.init_source(cfg, name)
    vae, text_encoder, tok = load_frozen(device, source)
    images, labels = C.load_data(cfg, "train")
    mean, std = encode_latents(vae, images)
    texts = encode_captions(text_encoder, tok, all_captions() + [""])
    unet = (UNet2DConditionModel.from_pretrained(source / "unet").float() if source is not None
            else build_unet(text_encoder.config.hidden_size)).to(device)
    peak_lr = cfg.lr or DEFAULT_LR
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=peak_lr, weight_decay=0.01)
    sched = DDPMScheduler(**SCHEDULE)
    bs, scale = cfg.batch_size or DEFAULT_BATCH, vae.config.scaling_factor
    start, elapsed, commands = C.resume(cfg, {"model": unet, "ema": ema, "opt": opt}, gen)
    init_steps = C.warm_start_steps(cfg, source)
    t_start = time.time()

    def step_fn(step: int, frac: float) -> dict:
        unet.train()
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, frac, peak_lr, warmup=min(200, cfg.steps // 10 + 1), floor=0.1)
        idx = torch.randint(0, len(images), (bs,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        cap = labels[idx] * len(TEMPLATES) + torch.randint(0, len(TEMPLATES), (bs,), generator=gen)
        cap = torch.where(torch.rand(bs, generator=gen) < CAPTION_DROPOUT, len(texts) - 1, cap)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = sched.add_noise(z0, noise, t)
        zt, t, noise = zt.to(device), t.to(device), noise.to(device)
        pred = unet(zt, t, encoder_hidden_states=texts[cap.to(device)]).sample
        loss = (min_snr_weight(sched, t) * (pred - noise).pow(2).mean((1, 2, 3))).mean()
        C.ema_step(unet, ema, opt, loss, step, EMA_DECAY)
        return {"loss": loss.item()}

    def state_fn(step: int) -> dict:
        return {**C.denoiser_state(unet, ema, opt, gen, step, elapsed + (time.time() - t_start), commands),
                "init_steps": init_steps}

    done, _ = C.run_loop(cfg, start, step_fn, state_fn, name)
    info = {**C.run_info(name, cfg, done, bs, device, elapsed + time.time() - t_start, commands),
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "caption_dropout": CAPTION_DROPOUT, "ema_decay": EMA_DECAY, "peak_lr": peak_lr,
            **warm_start_info(cfg, name, init_steps, done)}
    return export(ema.cpu(), vae.cpu(), text_encoder.cpu(), tok, cfg.run_dir / "final", info)
