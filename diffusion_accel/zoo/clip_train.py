"""Train ``fashion-clip``: a small CLIPModel (ViT 32×32/patch 4 + 3-layer text tower), contrastive on captions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from . import _common as C
from .captions import TEMPLATES, all_captions
from .data import CLASS_NAMES, to_rgb32
from .tokenizer import CLIP_MAX_LENGTH, build_clip_tokenizer

DEFAULT_STEPS = 700
DEFAULT_BATCH = 256
N_TPL = len(TEMPLATES)


def clip_config(vocab_size: int, tok: CLIPTokenizer) -> CLIPConfig:
    """The fashion-clip architecture: ViT 4×128 (patch 4 on 32×32) and text 3×128, 128-d projection."""
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=128,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=32, patch_size=4, num_channels=3, projection_dim=128)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def build_processor(tok: CLIPTokenizer) -> CLIPProcessor:
    """CLIPProcessor at the native 32×32 size, normalising 0..255 pixels to [-1, 1]."""
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return CLIPProcessor(image_processor=image_proc, tokenizer=tok)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and ±2 px shift of a [-1, 1] batch N×3×32×32."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a positive of −log Σ_pos softmax(row); ``positive`` is a bool mask like ``logits``."""
    has_pos = positive.any(-1)
    pos = logits[has_pos].masked_fill(~positive[has_pos], float("-inf")).logsumexp(-1)
    return (logits[has_pos].logsumexp(-1) - pos).mean()


def contrastive_loss(model: CLIPModel, images: torch.Tensor, labels: torch.Tensor,
                     ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image→all-captions plus caption→in-batch-images loss; same-class pairs count as positives."""
    img = F.normalize(model.get_image_features(pixel_values=images).pooler_output.float(), dim=-1)
    txt = F.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.float(), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    cap_labels = torch.arange(len(CLASS_NAMES), device=images.device).repeat_interleave(N_TPL)
    positive = labels[:, None] == cap_labels[None, :]
    return 0.5 * (multi_positive_loss(logits, positive) + multi_positive_loss(logits.T, positive.T))


def tokenize_captions(tok: CLIPTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded input_ids and attention_mask (len(texts) × CLIP_MAX_LENGTH)."""
    enc = tok(texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tok: CLIPTokenizer, images: torch.Tensor,
                       labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of template-ensembled zero-shot classification; ``images`` in [-1, 1] N×3×32×32."""
    model.eval()
    device = next(model.parameters()).device
    ids, mask = tokenize_captions(tok, all_captions())
    txt = model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output
    classes = F.normalize(F.normalize(txt, dim=-1).view(len(CLASS_NAMES), N_TPL, -1).mean(1), dim=-1)
    correct = 0
    for i in range(0, len(images), batch):
        img = model.get_image_features(pixel_values=images[i:i + batch].to(device)).pooler_output
        pred = (F.normalize(img, dim=-1) @ classes.T).argmax(-1).cpu()
        correct += int((pred == labels[i:i + batch]).sum())
    return correct / len(images)


def export(model: CLIPModel, tok: CLIPTokenizer, folder: Path, info: dict) -> Path:
    """save_pretrained the model, tokenizer and processor into ``folder`` plus train_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_processor(tok).save_pretrained(folder)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def default_steps(name: str = "fashion-clip") -> int:
    """Default optimiser steps (batch 256) for fashion-clip."""
    return DEFAULT_STEPS


def train(cfg: C.RunConfig, name: str = "fashion-clip") -> Path:
    """Train (or resume) fashion-clip; returns the exported folder ``run_dir/final``."""
    device = C.setup_device()
    gen = C.seed_all(cfg.seed)
    tok = build_clip_tokenizer()
    model = CLIPModel(clip_config(len(tok), tok)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))
    images, labels = C.load_data(cfg, "train")
    test_x, test_y = C.load_data(cfg, "test")  # read before training: a missing split failed after it
    ids, mask = (t.to(device) for t in tokenize_captions(tok, all_captions()))
    bs = cfg.batch_size or DEFAULT_BATCH
    start, elapsed, commands = C.resume(cfg, {"model": model, "opt": opt}, gen)

    def step_fn(step: int, frac: float) -> dict:
        model.train()
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, frac, 1e-3, warmup=min(100, cfg.steps // 10 + 1))
        idx = torch.randint(0, len(images), (bs,), generator=gen)
        x = augment(to_rgb32(images[idx]), gen).to(device)
        with C.autocast(device):
            loss = contrastive_loss(model, x, labels[idx].to(device), ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    def state_fn(step: int) -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "step": step, "elapsed_s": elapsed + (time.time() - t_start), "commands": commands}

    if cfg.freeze_text:
        for module in (model.text_model, model.text_projection):
            module.requires_grad_(False)
    t_start = time.time()
    done, _ = C.run_loop(cfg, start, step_fn, state_fn, "fashion-clip")
    acc = zero_shot_accuracy(model, tok, to_rgb32(test_x), test_y)
    print(f"fashion-clip: zero-shot test accuracy {acc:.4f} after {done} steps")
    info = {**C.run_info("fashion-clip", cfg, done, bs, device, elapsed + time.time() - t_start, commands,
                         autocasts=True),
            "zero_shot_test_accuracy": acc}
    return export(model.cpu(), tok, cfg.run_dir / "final", info)
