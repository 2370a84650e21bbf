"""Fine-tune a zoo VAE's decoder with its encoder frozen (``fashion-sd-decoder`` / ``fashion-flux-decoder``).

The latent space stays bit-identical (same encoder, same scaling/shift factors), so a denoiser trained
on the VAE stage's latents stays valid; only decoding gets sharper. Like SD's ft-MSE/ft-EMA decoders,
plus a small hinge-loss PatchGAN (no pretrained perceptual network exists offline): reconstruction
losses alone give blurry 32×32 images, which Inception-based FID punishes far more than PSNR does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import _common as C
from .data import to_rgb32

SOURCE_STAGE = {"fashion-sd-decoder": "fashion-sd-vae", "fashion-flux-decoder": "fashion-flux-vae"}
DEFAULT_STEPS = 3000
DEFAULT_BATCH = 64
ADV_WEIGHT = 0.2
ADV_START = 200
DEFAULT_LR = 2e-4


def default_steps(name: str) -> int:
    """Default optimiser steps (batch 64) of a decoder fine-tuning stage."""
    _check(name)
    return DEFAULT_STEPS


def _check(name: str) -> str:
    """Return ``name`` if it is a decoder stage, else raise ValueError."""
    if name not in SOURCE_STAGE:
        raise ValueError(f"decoder stage must be one of {sorted(SOURCE_STAGE)}, got {name!r}")
    return name


def vae_source(cfg: C.RunConfig, name: str) -> tuple[Path, str]:
    """(VAE folder to fine-tune, its label): the warm-start pipeline's ``vae`` (``--init-from zoo|FOLDER``),
    else the VAE stage's export. Either way the encoder, and so the latent space, is kept."""
    from .sd_train import stage_folder

    pipeline_name = name.removesuffix("-decoder")
    pipeline = C.init_source(cfg, pipeline_name)
    if pipeline is None:
        return stage_folder(SOURCE_STAGE[name]), SOURCE_STAGE[name]
    return pipeline / "vae", C.init_label(cfg, pipeline_name)


def build_discriminator(channels: int = 64) -> torch.nn.Sequential:
    """PatchGAN for 32×32×3 inputs: 3 strided convs → a 4×4 map of real/fake logits."""
    def block(cin: int, cout: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(cin, cout, 4, 2, 1), torch.nn.GroupNorm(8, cout), torch.nn.LeakyReLU(0.2)]

    return torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, 1, 1), torch.nn.LeakyReLU(0.2),
                               *block(channels, channels * 2), *block(channels * 2, channels * 4),
                               *block(channels * 4, channels * 4), torch.nn.Conv2d(channels * 4, 1, 3, 1, 1))


def decoder_parameters(vae: AutoencoderKL) -> list[torch.nn.Parameter]:
    """The trainable part: decoder and post_quant_conv (encoder and quant_conv stay frozen)."""
    vae.requires_grad_(False)
    modules = [vae.decoder] + ([vae.post_quant_conv] if vae.post_quant_conv is not None else [])
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_weight: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ‖∇rec‖ / ‖∇adv‖ at the decoder's last layer, so ADV_WEIGHT is scale-free."""
    rec_grad = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_weight, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def generator_loss(vae: AutoencoderKL, disc: torch.nn.Module, x: torch.Tensor,
                   adv_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L1 + MSE + adv_weight·balance·hinge-G, reconstruction, MSE) for a [-1, 1] batch N×3×32×32.

    Decodes a posterior *sample*, like the denoiser's training targets, so the decoder is robust
    to the latents a sampler produces.
    """
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample()
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec.float(), x)
    rec_loss = F.l1_loss(rec.float(), x) + mse
    if adv_weight <= 0:
        return rec_loss, rec, mse
    adv_loss = -disc(rec).float().mean()
    balance = adaptive_weight(rec_loss, adv_loss, vae.decoder.conv_out.weight)
    return rec_loss + adv_weight * balance * adv_loss, rec, mse


def discriminator_loss(disc: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss: mean relu(1 − D(real)) + mean relu(1 + D(fake))."""
    return F.relu(1 - disc(real).float()).mean() + F.relu(1 + disc(fake.detach()).float()).mean()


def train(cfg: C.RunConfig, name: str) -> Path:
    """Fine-tune (or resume) the decoder of ``vae_source``; exports the VAE to ``run_dir/final``."""
    from .vae_train import evaluate

    device = C.setup_device()
    gen = C.seed_all(cfg.seed)
    source, source_label = vae_source(cfg, _check(name))
    vae = AutoencoderKL.from_pretrained(source).float().to(device)
    disc = build_discriminator().to(device)
    peak_lr = cfg.lr or DEFAULT_LR
    opt_g = torch.optim.AdamW(decoder_parameters(vae), lr=peak_lr, weight_decay=0.0, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=peak_lr, weight_decay=0.0, betas=(0.5, 0.9))
    images, _ = C.load_data(cfg, "train")
    test_images = C.load_data(cfg, "test")[0]  # read before training: a missing split failed after it
    bs = cfg.batch_size or DEFAULT_BATCH
    start, elapsed, commands = C.resume(cfg, {"model": vae, "disc": disc, "opt_g": opt_g, "opt_d": opt_d}, gen)
    t_start = time.time()

    def step_fn(step: int, frac: float) -> dict:
        vae.decoder.train()
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = C.lr_at(step, frac, peak_lr, warmup=min(100, cfg.steps // 10 + 1), floor=0.05)
        x = to_rgb32(images[torch.randint(0, len(images), (bs,), generator=gen)]).to(device)
        adv = ADV_WEIGHT if step >= ADV_START else 0.0
        with C.autocast(device):
            loss, rec, mse = generator_loss(vae, disc, x, adv)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt_g.step()
        with C.autocast(device):
            d_loss = discriminator_loss(disc, x, rec)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        return {"loss": loss.item(), "d_loss": d_loss.item(), "psnr": 10 * torch.log10(4.0 / mse.detach()).item()}

    def state_fn(step: int) -> dict:
        return {"model": vae.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(), "gen": gen.get_state(), "step": step,
                "elapsed_s": elapsed + (time.time() - t_start), "commands": commands}

    done, _ = C.run_loop(cfg, start, step_fn, state_fn, name)
    metrics = {"test_psnr_db": evaluate(vae, test_images)["psnr_db"]}  # the factors stay the source's
    print(f"{name}: test PSNR {metrics['test_psnr_db']:.2f} dB after {done} steps")
    origin = {"init_from": source_label} if cfg.init_from is not None else {"source": source_label}
    info = {**C.run_info(name, cfg, done, bs, device, elapsed + time.time() - t_start, commands,
                         autocasts=True), **origin,
            "adv_weight": ADV_WEIGHT, "adv_start": ADV_START, "peak_lr": peak_lr, **metrics}
    folder = cfg.run_dir / "final"
    vae.cpu().save_pretrained(folder)  # scaling/shift factors unchanged: the latent space is the source's
    (folder / "train_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder
