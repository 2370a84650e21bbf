"""Train the zoo VAEs: AutoencoderKL 32×32×3 → 8×8×4 (``fashion-sd-vae``) or 8×8×16 (``fashion-flux-vae``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import _common as C
from .data import to_rgb32

LATENT_CHANNELS = {"fashion-sd-vae": 4, "fashion-flux-vae": 16}
DEFAULT_STEPS = {"fashion-sd-vae": 2500, "fashion-flux-vae": 1200}
DEFAULT_BATCH = 64
KL_WEIGHT = 1e-4


def default_steps(name: str) -> int:
    """Default optimiser steps (batch 64) for VAE stage ``name``."""
    return DEFAULT_STEPS[_check(name)]


def _check(name: str) -> str:
    """Return ``name`` if it is a VAE stage, else raise ValueError."""
    if name not in LATENT_CHANNELS:
        raise ValueError(f"VAE stage must be one of {sorted(LATENT_CHANNELS)}, got {name!r}")
    return name


def build_vae(latent_channels: int) -> AutoencoderKL:
    """AutoencoderKL with blocks (32, 64, 128): 32×32 → 8×8 (vae_scale_factor 4)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16, sample_size=32)


def init_from(vae: AutoencoderKL, folder: Path) -> int:
    """Copy every same-shaped parameter from the VAE saved in ``folder``; returns how many were copied."""
    donor = AutoencoderKL.from_pretrained(folder).state_dict()
    own = vae.state_dict()
    shared = {k: v for k, v in donor.items() if k in own and own[k].shape == v.shape}
    vae.load_state_dict(shared, strict=False)
    return len(shared)


def vae_loss(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 + L2 + KL_WEIGHT·KL, MSE) for a [-1, 1] batch N×3×32×32."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    mse = F.mse_loss(rec, x)
    kl = post.kl().mean() / post.mean[0].numel()
    return F.l1_loss(rec, x) + mse + KL_WEIGHT * kl, mse


LATENT_STAT_IMAGES = 10000  # training images the scaling / shift factors are measured on (as many as the test split)


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images: torch.Tensor, batch: int = 500) -> dict:
    """PSNR (dB, mean over images, range [-1,1] → peak 2) and latent mean/std of the posterior mode."""
    vae.eval()
    device = next(vae.parameters()).device
    psnrs, lat = [], []
    for i in range(0, len(images), batch):
        x = to_rgb32(images[i:i + batch]).to(device)
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample.clamp(-1, 1)
        mse = (rec - x).pow(2).flatten(1).mean(1)
        psnrs.append(10 * torch.log10(4.0 / mse.clamp_min(1e-10)))
        lat.append(z.cpu())
    z = torch.cat(lat)
    return {"psnr_db": float(torch.cat(psnrs).mean()), "latent_mean": float(z.mean()), "latent_std": float(z.std())}


def final_metrics(vae: AutoencoderKL, train_images: torch.Tensor, test_images: torch.Tensor) -> dict:
    """Test PSNR, and the latent statistics the scaling / shift factors come from, measured on the first
    LATENT_STAT_IMAGES training images: they came from the test split until session 43 (the FID reference)."""
    train = evaluate(vae, train_images[:LATENT_STAT_IMAGES])
    return {"test_psnr_db": evaluate(vae, test_images)["psnr_db"], "latent_mean": train["latent_mean"],
            "latent_std": train["latent_std"]}


def export(vae: AutoencoderKL, folder: Path, metrics: dict, shift: bool, info: dict) -> Path:
    """Set scaling (and for Flux shift) factors from latent stats, save_pretrained, write train_info.json."""
    vae.register_to_config(scaling_factor=round(1.0 / metrics["latent_std"], 5))
    if shift:
        vae.register_to_config(shift_factor=round(metrics["latent_mean"], 5))
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder)
    (folder / "train_info.json").write_text(json.dumps({**info, **metrics}, indent=2), encoding="utf-8")
    return folder


def warm_start_donor(cfg: C.RunConfig, name: str) -> Path | None:
    """The fashion-sd VAE export fashion-flux-vae starts from (its same-shaped tensors), or None. A resumed run keeps
    its checkpoint's answer: decided anew, a donor exported after the run began was named on its card though the
    checkpoint's weights replaced it, and one moved away dropped from the card (until session 51)."""
    state = C.load_checkpoint(cfg.run_dir / "checkpoint.pt") if cfg.resume else None
    if state is not None and "donor" in state:
        return None if state["donor"] is None else Path(state["donor"])
    donor = C.RUNS_ROOT / "fashion-sd-vae" / "final"
    return donor if name == "fashion-flux-vae" and donor.is_dir() else None


def train(cfg: C.RunConfig, name: str) -> Path:
    """Train (or resume) VAE stage ``name``; returns the exported folder ``run_dir/final``."""
    device = C.setup_device()
    gen = C.seed_all(cfg.seed)
    vae = build_vae(LATENT_CHANNELS[_check(name)])
    donor = warm_start_donor(cfg, name)
    resuming = cfg.resume and (cfg.run_dir / "checkpoint.pt").is_file()  # its weights replace a donor's
    if donor is not None and not resuming:  # recorded below: the same command gives other weights without that run
        print(f"initialised {init_from(vae, donor)} tensors from {donor}")
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
    images, _ = C.load_data(cfg, "train")
    test_images = C.load_data(cfg, "test")[0]  # read before training: a missing split failed after it
    bs = cfg.batch_size or DEFAULT_BATCH
    start, elapsed, commands = C.resume(cfg, {"model": vae, "opt": opt}, gen)
    t_start = time.time()

    def step_fn(step: int, frac: float) -> dict:
        vae.train()
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, frac, 1e-3, warmup=min(100, cfg.steps // 10 + 1), floor=0.05)
        x = to_rgb32(images[torch.randint(0, len(images), (bs,), generator=gen)]).to(device)
        with C.autocast(device):
            loss, mse = vae_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "psnr": 10 * torch.log10(4.0 / mse.detach()).item()}

    def state_fn(step: int) -> dict:
        return {"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "step": step, "elapsed_s": elapsed + (time.time() - t_start), "commands": commands,
                "donor": None if donor is None else str(donor)}

    done, _ = C.run_loop(cfg, start, step_fn, state_fn, name)
    metrics = final_metrics(vae, images, test_images)
    print(f"{name}: test PSNR {metrics['test_psnr_db']:.2f} dB after {done} steps")
    info = {**C.run_info(name, cfg, done, bs, device, elapsed + time.time() - t_start, commands,
                         autocasts=True),
            "params": sum(p.numel() for p in vae.parameters()),
            **({"init_from": f"{donor} (same-shaped tensors)"} if donor is not None else {})}
    return export(vae.cpu(), cfg.run_dir / "final", metrics, name == "fashion-flux-vae", info)
