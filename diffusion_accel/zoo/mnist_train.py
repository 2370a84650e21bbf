"""Train ``mnist-ddpm``: an unconditional pixel-space UNet2DModel (ε-prediction, EMA) on MNIST 32×32.

The analog of Q-Diffusion's CIFAR-10 DDPM setting (linear betas 1e-4..0.02 over 1,000 steps, sampled
with DDIM), small enough to train on two CPU cores within an hour.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from . import _common as C
from .data import to_gray32

DEFAULT_STEPS = 3000
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3
EMA_DECAY = 0.998
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", clip_sample=True)


def default_steps(name: str = "mnist-ddpm") -> int:
    """Default optimiser steps (batch 64) for the mnist-ddpm UNet."""
    return DEFAULT_STEPS


def build_unet() -> UNet2DModel:
    """UNet on 32×32×1 pixels: blocks (16, 32, 64) at 32/16/8 px, self-attention at 8×8 (down, mid, up)."""
    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=32)


def export(unet: UNet2DModel, folder: Path, info: dict) -> Path:
    """save_pretrained a DDPMPipeline whose scheduler is DDIM (call it with ``num_inference_steps=100``)."""
    scheduler = DDIMScheduler(**SCHEDULE, set_alpha_to_one=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def train(cfg: C.RunConfig, name: str = "mnist-ddpm") -> Path:
    """Train (or resume) the mnist-ddpm UNet; returns the exported pipeline folder ``run_dir/final``."""
    device = C.setup_device()
    gen = C.seed_all(cfg.seed)
    images = to_gray32(C.load_data(cfg, "train", dataset="mnist")[0])
    unet = build_unet().to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=DEFAULT_LR, weight_decay=0.0)
    sched = DDPMScheduler(**SCHEDULE)
    bs = cfg.batch_size or DEFAULT_BATCH
    start, elapsed, commands = C.resume(cfg, {"model": unet, "ema": ema, "opt": opt}, gen)
    t_start = time.time()

    def step_fn(step: int, frac: float) -> dict:
        unet.train()
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, frac, DEFAULT_LR, warmup=min(200, cfg.steps // 10 + 1), floor=0.05)
        x0 = images[torch.randint(0, len(images), (bs,), generator=gen)]
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt, t, noise = sched.add_noise(x0, noise, t).to(device), t.to(device), noise.to(device)
        loss = (unet(xt, t).sample - noise).pow(2).mean()
        C.ema_step(unet, ema, opt, loss, step, EMA_DECAY)
        return {"loss": loss.item()}

    def state_fn(step: int) -> dict:
        return C.denoiser_state(unet, ema, opt, gen, step, elapsed + (time.time() - t_start), commands)

    done, _ = C.run_loop(cfg, start, step_fn, state_fn, name)
    info = {**C.run_info(name, cfg, done, bs, device, elapsed + time.time() - t_start, commands),
            "unet_params": sum(p.numel() for p in unet.parameters()), "ema_decay": EMA_DECAY, "peak_lr": DEFAULT_LR}
    return export(ema.cpu(), cfg.run_dir / "final", info)
