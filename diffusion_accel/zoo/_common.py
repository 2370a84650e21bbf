"""Shared training plumbing: device/threads, seeding, resumable checkpoints, a budgeted tqdm loop."""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS_ROOT = Path(os.environ.get("DIFFUSION_ACCEL_ZOO_RUNS", REPO_ROOT / "zoo_runs"))


def setup_device(threads: int | None = None) -> torch.device:
    """CUDA when available (runs unchanged, faster), else CPU limited to ``threads`` threads."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's fused attention failed in its bf16 backward (mha_graph, H200, torch 2.11 + CUDA 13);
        # SDPA's flash and memory-efficient kernels train these models fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
        return torch.device("cuda")
    threads = threads or int(os.environ.get("DIFFUSION_ACCEL_THREADS", "2"))
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    return torch.device("cpu")


AUTOCAST_ENV = "DIFFUSION_ACCEL_AUTOCAST"


def bf16_autocast_wanted(device_type: str) -> bool:
    """Whether training runs under bf16 autocast on ``device_type``: on CPU yes (≈1.6× faster VAE steps),
    on CUDA no (these small models are launch-bound there: fashion-flux, batch 512 on an H200, ran 10.5
    steps/s in bf16 and 20.6 in float32 with TF32 matmuls). ``DIFFUSION_ACCEL_AUTOCAST=1`` / ``0`` forces it."""
    choice = os.environ.get(AUTOCAST_ENV)
    if choice is None:
        return device_type == "cpu"
    if choice not in ("0", "1"):
        raise ValueError(f"{AUTOCAST_ENV} must be '0' or '1', got {choice!r}")
    return choice == "1"


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on ``device`` where ``bf16_autocast_wanted`` says so; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bf16_autocast_wanted(device.type))


def command_line() -> str:
    """The command that started this process, as a user would type it."""
    import sys

    head = sys.argv[0]
    if head.endswith(("zoo/train.py", "zoo/cli.py")):
        head = "python -m diffusion_accel.zoo." + Path(head).stem
    elif Path(head).name == "diffusion-accel":  # the console script's absolute path in a virtualenv
        head = "diffusion-accel"
    return " ".join([head, *sys.argv[1:]])


def seed_all(seed: int) -> torch.Generator:
    """Seed python/torch RNGs and return a CPU generator for data sampling."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, frac: float, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor``·peak as ``frac`` goes 0 → 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, frac))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def ema_step(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor,
             step: int, decay: float) -> None:
    """One optimiser step on ``loss`` with the gradient norm clipped to 1, then the EMA update with the
    warm-up decay min(``decay``, (1+step)/(10+step)) used by every zoo denoiser."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema_update(ema, model, min(decay, (1 + step) / (10 + step)))


def denoiser_state(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                   gen: torch.Generator, step: int, elapsed_s: float, commands: list[str]) -> dict:
    """The checkpoint of a denoiser run (model, EMA, optimiser, data RNG, progress, command history)."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "gen": gen.get_state(), "step": step, "elapsed_s": elapsed_s, "commands": commands}


def run_info(name: str, cfg: "RunConfig", steps_done: int, batch_size: int, device: torch.device,
             wall_time_s: float, commands: list[str]) -> dict:
    """The train_info.json fields every stage records: what ran, how long (s), where and by which commands."""
    return {"name": name, "seed": cfg.seed, "steps": steps_done, "batch_size": batch_size, "device": str(device),
            "wall_time_s": round(wall_time_s, 1), "threads": torch.get_num_threads(), "command": " && ".join(commands)}


@dataclass
class RunConfig:
    """Where a run lives and how long it may go."""

    run_dir: Path
    steps: int
    seed: int = 0
    time_budget_min: float | None = None
    resume: bool = True
    checkpoint_every_min: float = 3.0
    batch_size: int | None = None
    data_root: str | None = None
    limit_images: int | None = None
    freeze_text: bool = False
    init_from: Path | None = None
    lr: float | None = None
    arch: str | None = None  # fashion-flux: a flux_train.ARCHS name


def init_source(cfg: RunConfig, name: str) -> Path | None:
    """The exported pipeline folder a fresh run warm-starts from (``--init-from``), or None.

    ``"zoo"`` means the shipped model ``name``; any other value is a ``save_pretrained`` folder of the
    same pipeline class. A checkpoint in the run folder still wins (``resume``): warm start only sets
    the weights that step 0 begins with.
    """
    if cfg.init_from is None:
        return None
    if str(cfg.init_from) == "zoo":
        from . import path

        return path(name)
    folder = Path(cfg.init_from)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--init-from {str(cfg.init_from)!r}: expected 'zoo' or an exported pipeline folder "
                         f"with a model_index.json (e.g. zoo_runs/{name}/final)")
    from . import PIPELINE_CLASSES, check_pipeline_class

    pipeline = name.removesuffix("-decoder")  # a decoder stage warm-starts from its pipeline's export
    check_pipeline_class(folder, PIPELINE_CLASSES[pipeline], f"--init-from {str(cfg.init_from)!r}")
    return folder


def init_label(cfg: RunConfig, name: str) -> str:
    """How a card names the warm-start source: ``zoo:NAME`` for the shipped pipeline, else the folder given."""
    return f"zoo:{name}" if str(cfg.init_from) == "zoo" else str(cfg.init_from)


def source_steps(source: Path | None) -> int:
    """Optimiser steps behind ``source`` (its train_info.json ``total_steps``, else ``steps``; 0 if unknown)."""
    info_file = None if source is None else source / "train_info.json"
    if info_file is None or not info_file.is_file():
        return 0
    info = json.loads(info_file.read_text())
    return int(info.get("total_steps", info.get("steps", 0)))


def load_data(cfg: RunConfig, split: str, dataset: str = "fashion-mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """``dataset`` ("fashion-mnist" or "mnist") ``split`` as (uint8 N×28×28, int64 N), cut to
    ``cfg.limit_images`` (smoke runs)."""
    from .data import load_split
    from .mnist_data import load_mnist

    loaders = {"fashion-mnist": load_split, "mnist": load_mnist}
    if dataset not in loaders:
        raise ValueError(f"dataset must be one of {sorted(loaders)}, got {dataset!r}")
    images, labels = loaders[dataset](split, cfg.data_root)
    return images[:cfg.limit_images], labels[:cfg.limit_images]


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, ints, floats, nested dicts) atomically with torch.save."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """Load a checkpoint written by ``save_checkpoint`` (weights_only=True), or None if absent."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resume(cfg: Any, stateful: dict[str, Any], generator: torch.Generator) -> tuple[int, float, list[str]]:
    """Load ``run_dir/checkpoint.pt`` into ``stateful`` (checkpoint key -> object with
    ``load_state_dict``) and ``generator`` when resuming; returns (start step, elapsed s, the
    command history with this command appended)."""
    state = load_checkpoint(cfg.run_dir / "checkpoint.pt") if cfg.resume else None
    if state is None:
        return 0, 0.0, [command_line()]
    saved_seed = state.get("seed", cfg.seed)
    if saved_seed != cfg.seed:  # the data order and weights continue the checkpoint's: record its seed
        warnings.warn(f"--seed {cfg.seed} is ignored: resuming {cfg.run_dir}, a run started with seed {saved_seed} "
                      f"(--no-resume starts over with the new seed)", stacklevel=2)
        cfg.seed = saved_seed
    for key, target in stateful.items():
        target.load_state_dict(state[key])
    generator.set_state(state["gen"])
    return int(state["step"]), float(state["elapsed_s"]), [*state.get("commands", []), command_line()]


def run_loop(cfg: RunConfig, start_step: int, step_fn: Callable[[int, float], dict],
             state_fn: Callable[[int], dict], desc: str) -> tuple[int, float]:
    """Call ``step_fn(step, frac)`` from ``start_step`` to ``cfg.steps`` with tqdm, checkpoints and a time budget.

    ``frac`` is the run's progress in [0, 1]: steps done or time budget used, whichever is further.
    Returns (last completed step count, seconds spent in this call).
    """
    ckpt = cfg.run_dir / "checkpoint.pt"
    t0 = last_ckpt = time.time()
    budget_s = None if cfg.time_budget_min is None else cfg.time_budget_min * 60
    step = start_step
    checkpoint = lambda steps_done: save_checkpoint(ckpt, {**state_fn(steps_done), "seed": cfg.seed})  # noqa: E731
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=desc,
               mininterval=10.0, dynamic_ncols=True)
    try:
        for step in bar:
            frac = step / cfg.steps if budget_s is None else max(step / cfg.steps, (time.time() - t0) / budget_s)
            logs = step_fn(step, frac)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
            now = time.time()
            if now - last_ckpt > cfg.checkpoint_every_min * 60:
                checkpoint(step + 1)
                last_ckpt = now
            if budget_s is not None and now - t0 > budget_s:
                bar.write(f"time budget of {cfg.time_budget_min} min reached at step {step + 1}")
                break
        else:
            step = cfg.steps - 1
    except KeyboardInterrupt:  # up to checkpoint_every_min of work was lost: keep the steps completed
        checkpoint(step)
        bar.write(f"interrupted: {step} steps saved to {ckpt}; run the same command again to resume")
        raise
    finally:
        bar.close()
    done = min(step + 1, cfg.steps) if cfg.steps > start_step else start_step
    checkpoint(done)
    return done, time.time() - t0
