"""Train ``fashion-flux``: a FluxTransformer2DModel (rectified flow) + jointly trained small T5, on the 16-ch VAE."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from . import _common as C
from .captions import TEMPLATES, all_captions
from .sd_train import clip_text_tower, encode_latents, stage_folder, vae_folder, warm_start_info
from .tokenizer import T5_MAX_LENGTH, build_t5_tokenizer

DEFAULT_STEPS = 3000
DEFAULT_BATCH = 128
DEFAULT_LR = 3e-4
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999


def default_steps(name: str = "fashion-flux") -> int:
    """Default optimiser steps (batch 128) for the fashion-flux transformer."""
    return DEFAULT_STEPS


def build_t5(vocab_size: int) -> T5EncoderModel:
    """A 2-layer T5 encoder, d_model 128, 4 heads (the sequence-embedding text tower)."""
    cfg = T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


# (double-stream, single-stream) blocks, 4 heads x 32 each: "small" is the shipped v2 (2.33M parameters,
# 4.4 MiB in fp16); "large" (4.50M, 8.6 MiB) is the largest that keeps the zoo's weights within 40 MB
ARCHS = {"small": (2, 4), "large": (4, 8)}
DEFAULT_ARCH = "small"


def build_transformer(pooled_dim: int = 128, joint_dim: int = 128, arch: str = DEFAULT_ARCH) -> FluxTransformer2DModel:
    """Flux transformer of ``arch`` (``ARCHS``: double- + single-stream blocks), 4 heads × 32 (inner 128),
    16-ch latents."""
    double, single = ARCHS[arch]
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=joint_dim,
                                  pooled_projection_dim=pooled_dim, guidance_embeds=False,
                                  axes_dims_rope=(8, 12, 12))


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler scheduler, no resolution-dependent shift (16 image tokens)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


@torch.no_grad()
def clip_pooled(text_encoder: CLIPTextModel, tok: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """CLIP pooler_output (len(texts) × width), encoded as FluxPipeline does."""
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device), output_hidden_states=False).pooler_output.float()


def t5_ids(tok: Any, texts: list[str]) -> torch.Tensor:
    """T5 input_ids padded to T5_MAX_LENGTH (len(texts) × 32), as FluxPipeline pads them."""
    return tok(texts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
               return_tensors="pt").input_ids


def pack(z: torch.Tensor) -> torch.Tensor:
    """B×16×8×8 latents → B×16 tokens×64, FluxPipeline's 2×2 packing."""
    return FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])


def flow_loss(model: FluxTransformer2DModel, t5: T5EncoderModel, batch: dict, ids: dict) -> torch.Tensor:
    """Rectified-flow MSE: x_σ = (1−σ)x0 + σε, target ε − x0, σ ~ logit-normal."""
    x0, noise, sigma = batch["x0"], batch["noise"], batch["sigma"]
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    seq = t5(ids["t5"])[0][batch["cap"]]
    pred = model(hidden_states=xt, timestep=sigma, pooled_projections=ids["pooled"][batch["cap"]],
                 encoder_hidden_states=seq, txt_ids=ids["txt_ids"], img_ids=ids["img_ids"]).sample
    return (pred.float() - (noise - x0)).pow(2).mean()


def export(parts: dict, folder: Path, info: dict) -> Path:
    """Assemble and save_pretrained the FluxPipeline from ``parts`` (transformer, t5, vae, clip, tokenizers)."""
    pipe = FluxPipeline(scheduler=build_scheduler(), vae=parts["vae"], text_encoder=parts["clip"],
                        tokenizer=parts["clip_tok"], text_encoder_2=parts["t5"], tokenizer_2=parts["t5_tok"],
                        transformer=parts["transformer"])
    pipe.save_pretrained(folder)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def frozen_parts(device: torch.device, source: Path | None = None) -> dict:
    """VAE, CLIP text tower and both tokenizers: from the warm-start pipeline ``source`` when given, else
    the trained stages (T5 tokenizer built locally, identical to the shipped one)."""
    if source is not None:
        return {"vae": AutoencoderKL.from_pretrained(source / "vae").float().to(device).eval(),
                "clip": CLIPTextModel.from_pretrained(source / "text_encoder").float().to(device).eval(),
                "clip_tok": CLIPTokenizer.from_pretrained(source / "tokenizer"),
                "t5_tok": AutoTokenizer.from_pretrained(source / "tokenizer_2")}  # T5Tokenizer before session 42
    clip = stage_folder("fashion-clip")
    return {"vae": AutoencoderKL.from_pretrained(vae_folder("fashion-flux-vae")).to(device).eval(),
            "clip": clip_text_tower(clip).to(device).eval(),
            "clip_tok": CLIPTokenizer.from_pretrained(clip), "t5_tok": build_t5_tokenizer()}


def conditioning(device: torch.device, source: Path | None = None) -> tuple[dict, dict]:
    """Frozen parts (see ``frozen_parts``) and per-caption tensors (pooled, T5 ids, rope ids)."""
    parts = frozen_parts(device, source)
    texts = all_captions() + [""]
    ids = {"pooled": clip_pooled(parts["clip"], parts["clip_tok"], texts),
           "t5": t5_ids(parts["t5_tok"], texts).to(device),
           "txt_ids": torch.zeros(T5_MAX_LENGTH, 3, device=device),
           "img_ids": FluxPipeline._prepare_latent_image_ids(1, 4, 4, device, torch.float32)}
    return parts, ids


def trainable(source: Path | None, pooled_dim: int, vocab_size: int,
              arch: str | None = None) -> tuple[FluxTransformer2DModel, T5EncoderModel]:
    """(transformer, T5): the warm-start pipeline's when ``source`` is given without ``arch``, else freshly
    built (``arch``, default ``DEFAULT_ARCH``; with a ``source`` only its frozen parts are used)."""
    if source is None or arch is not None:
        return build_transformer(pooled_dim, 128, arch or DEFAULT_ARCH), build_t5(vocab_size)
    return (FluxTransformer2DModel.from_pretrained(source / "transformer").float(),
            T5EncoderModel.from_pretrained(source / "text_encoder_2").float())


def arch_of(model: FluxTransformer2DModel) -> str:
    """The ``ARCHS`` name of ``model``'s block counts ("custom" for others)."""
    blocks = (model.config.num_layers, model.config.num_single_layers)
    return next((name for name, counts in ARCHS.items() if counts == blocks), "custom")


def checked_arch(cfg: C.RunConfig) -> tuple[str, bool]:
    """(the run's transformer architecture, whether an ``--arch`` chose it): ``cfg.arch``, else the
    checkpoint's (a resumed run keeps its own, and a fresh one stays fresh under ``--init-from``), else
    ``DEFAULT_ARCH``; a ValueError when ``cfg.arch`` differs from the checkpoint's or names none of ARCHS."""
    if cfg.arch is not None and cfg.arch not in ARCHS:
        raise ValueError(f"--arch {cfg.arch!r} is not a fashion-flux architecture; accepted: {sorted(ARCHS)}")
    state = C.load_checkpoint(cfg.run_dir / "checkpoint.pt") if cfg.resume else None
    saved = None if state is None else state.get("arch", DEFAULT_ARCH)  # checkpoints before --arch: small
    if cfg.arch is not None and saved is not None and cfg.arch != saved:
        raise ValueError(f"{cfg.run_dir}/checkpoint.pt holds a {saved!r} transformer, not {cfg.arch!r}: resume "
                         f"without --arch, or start over with --no-resume (or another --out)")
    # a resumed run keeps the checkpoint's answer: restating a warm start's own --arch made it "fresh" (its card
    # recorded no init_from / init_steps, and the checkpoint kept that; until session 49)
    chosen = cfg.arch is not None if state is None else bool(state.get("arch_chosen", cfg.arch is not None))
    return cfg.arch or saved or DEFAULT_ARCH, chosen


def training_batch(data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int, num_captions: int,
                   vae_config: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch on the CPU: packed latents ``x0`` drawn from each image's encoder posterior (``data``: posterior
    means, stds, labels), noise, caption ids (the last, empty caption with CAPTION_DROPOUT) and logit-normal
    sigmas."""
    mean, std, labels = data
    idx = torch.randint(0, len(mean), (batch_size,), generator=gen)
    z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - vae_config.shift_factor)
    cap = labels[idx] * len(TEMPLATES) + torch.randint(0, len(TEMPLATES), (batch_size,), generator=gen)
    cap = torch.where(torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT, num_captions - 1, cap)
    x0 = pack(z * vae_config.scaling_factor)
    return {"x0": x0, "noise": torch.randn(x0.shape, generator=gen), "cap": cap,
            "sigma": torch.sigmoid(torch.randn(batch_size, generator=gen))}


def train(cfg: C.RunConfig, name: str = "fashion-flux") -> Path:
    """Train (or resume) the fashion-flux transformer and T5; returns the exported folder ``run_dir/final``."""
    arch, arch_chosen = checked_arch(cfg)  # before loading anything: a mismatch with the checkpoint is refused
    device = C.setup_device()
    gen = C.seed_all(cfg.seed)
    source = C.init_source(cfg, name)
    parts, ids = conditioning(device, source)
    images, labels = C.load_data(cfg, "train")
    mean, std = encode_latents(parts["vae"], images)
    vcfg = parts["vae"].config
    fresh = source is None or arch_chosen  # --arch with --init-from: only the frozen parts come from the source
    model, t5 = trainable(source, ids["pooled"].shape[1], len(parts["t5_tok"]), arch if fresh else None)
    arch = arch_of(model)  # a warm start trains the source's architecture
    model, t5, peak_lr = model.to(device), t5.to(device), cfg.lr or DEFAULT_LR
    trained = torch.nn.ModuleList([model, t5])  # trained jointly: one optimiser, one EMA
    ema = copy.deepcopy(trained).requires_grad_(False)
    opt = torch.optim.AdamW(trained.parameters(), lr=peak_lr, weight_decay=0.01)
    bs, n_caps = cfg.batch_size or DEFAULT_BATCH, len(ids["pooled"])
    start, elapsed, commands = C.resume(cfg, {"model": model, "t5": t5, "ema": ema, "opt": opt}, gen)
    init_steps = None if fresh else C.warm_start_steps(cfg, source)
    t_start = time.time()

    def step_fn(step: int, frac: float) -> dict:
        model.train(), t5.train()
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, frac, peak_lr, warmup=min(200, cfg.steps // 10 + 1), floor=0.1)
        batch = training_batch((mean, std, labels), bs, n_caps, vcfg, gen)
        with C.autocast(device):
            loss = flow_loss(model, t5, {k: v.to(device) for k, v in batch.items()}, ids)
        C.ema_step(trained, ema, opt, loss, step, EMA_DECAY)
        return {"loss": loss.item()}

    def state_fn(step: int) -> dict:
        return {"model": model.state_dict(), "t5": t5.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                "elapsed_s": elapsed + (time.time() - t_start), "commands": commands, "arch": arch,
                "arch_chosen": arch_chosen, "init_steps": init_steps}

    done, _ = C.run_loop(cfg, start, step_fn, state_fn, name)
    info = {**C.run_info(name, cfg, done, bs, device, elapsed + time.time() - t_start, commands,
                         autocasts=True),
            "transformer_params": sum(p.numel() for p in model.parameters()),
            "t5_params": sum(p.numel() for p in t5.parameters()), "caption_dropout": CAPTION_DROPOUT,
            "ema_decay": EMA_DECAY, "t5_max_sequence_length": T5_MAX_LENGTH, "peak_lr": peak_lr,
            "arch": arch,
            **(warm_start_info(cfg, name, init_steps, done) if not fresh
               else {"frozen_parts_from": C.init_label(cfg, name)} if source is not None else {})}
    parts.update(transformer=ema[0].cpu(), t5=ema[1].cpu(), vae=parts["vae"].cpu(), clip=parts["clip"].cpu())
    return export(parts, cfg.run_dir / "final", info)
