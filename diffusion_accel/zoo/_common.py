"""Shared training plumbing: device/threads, seeding, resumable checkpoints, a budgeted tqdm loop."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..paths import expand_home

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_runs_root() -> Path:
    """Where training runs go: ``zoo_runs/`` of a source checkout; for an installed package (whose parent is
    site-packages, maybe read-only) ``~/.cache/diffusion_accel/zoo_runs``."""
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "diffusion_accel").is_dir():
        return REPO_ROOT / "zoo_runs"
    return Path.home() / ".cache" / "diffusion_accel" / "zoo_runs"


RUNS_ROOT = Path(os.environ.get("DIFFUSION_ACCEL_ZOO_RUNS") or default_runs_root())


def setup_device(threads: int | None = None) -> torch.device:
    """CUDA when available (runs unchanged, faster), else CPU limited to ``threads`` threads."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's fused attention failed in its bf16 backward (mha_graph, H200, torch 2.11 + CUDA 13);
        # SDPA's flash and memory-efficient kernels train these models fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
        return torch.device("cuda")
    threads = threads or _env_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    return torch.device("cpu")


def _env_threads() -> int:
    """``DIFFUSION_ACCEL_THREADS`` (default 2); a ValueError naming the variable when it is no count."""
    text = os.environ.get("DIFFUSION_ACCEL_THREADS", "2")
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"DIFFUSION_ACCEL_THREADS must be a thread count >= 1, got {text!r}")
    return int(text)


AUTOCAST_ENV = "DIFFUSION_ACCEL_AUTOCAST"


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX-512 BF16); elsewhere oneDNN emulates it."""
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(check is not None and bool(check()) for check in checks)


def bf16_autocast_wanted(device_type: str) -> bool:
    """Whether training runs under bf16 autocast on ``device_type``: on a CPU that computes bf16 natively (AMX,
    AVX-512 BF16: ≈1.6× faster VAE steps), not on one that emulates it (a 2-core Xeon with AVX-512 VNNI only,
    2 threads: fashion-flux transformer steps 2.7× and VAE steps 3.5× *slower* in bf16), not on CUDA (these
    small models are launch-bound there: fashion-flux, batch 512 on an H200, ran 10.5 steps/s in bf16 and 20.6
    in float32 with TF32 matmuls). ``DIFFUSION_ACCEL_AUTOCAST=1`` / ``0`` forces it."""
    choice = os.environ.get(AUTOCAST_ENV)
    if choice is None:
        return device_type == "cpu" and native_bf16_cpu()
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
    return " ".join([head, shlex.join(sys.argv[1:])]).rstrip()  # the arguments quoted (a folder with a space was
    # recorded unquoted), not the head: "python -m diffusion_accel.zoo.train" is three words


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
             wall_time_s: float, commands: list[str], autocasts: bool = False) -> dict:
    """The train_info.json fields every stage records: what ran, how long (s), where and by which commands;
    ``autocasts``: whether the stage trains under :func:`autocast` (recorded as whether bf16 was on)."""
    commands = _mark_stopped(list(commands), steps_done, {"steps": cfg.steps})  # this command's, as a resume marks
    return {"name": name, "seed": cfg.seed, "steps": steps_done, "batch_size": batch_size, "device": str(device),
            "wall_time_s": round(wall_time_s, 1), "threads": torch.get_num_threads(),
            "bf16_autocast": autocasts and bf16_autocast_wanted(device.type), "command": " && ".join(commands)}


@dataclass
class RunConfig:
    """Where a run lives and how long it may go."""

    run_dir: Path
    steps: int  # None until ``apply_checkpoint_settings`` adopts a resumed run's (``train.run`` then fills the default)
    seed: int | None = None  # None: 0 for a fresh run, the checkpoint's when resuming (no "--seed 0 is ignored")
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
    stage: str = ""  # the zoo stage training in run_dir (recorded in its checkpoint)
    defaults: dict = field(default_factory=dict)  # the stage's values of options left unset (batch_size, lr)
    resumed: dict = field(default_factory=dict)  # set by resume: what run_loop restores (RNG, elapsed time)
    seed_given: bool = field(init=False, default=False)  # whether a seed was asked for (resume warns if it differs)

    def __post_init__(self) -> None:
        self.seed_given = self.seed is not None
        self.seed = 0 if self.seed is None else self.seed

    def settings(self) -> dict:
        """The options a resumed run keeps: a checkpoint continues the weights, optimiser and data order
        they made (a resumed --batch-size 32 on a batch-8 run mixed both silently); ``steps`` and ``time_budget_min``
        may be given anew (CHANGEABLE_ON_RESUME) and are the run's when left unset (a resume without them headed for
        the stage's default steps with no budget: the LR rose again); a new ``--steps`` alone drops the budget
        (``train.run`` sets it to infinity: the spent one stopped the extended run at once). fashion-flux's ``arch``
        is compared with the checkpoint's own by ``flux_train.checked_arch`` (restating the default was refused).
        The data folder (``--data``) is not kept: it says where Fashion-MNIST is, not how the run trains, and kept it
        made a moved dataset unresumable (the old path won over --data and the environment variable) and a relative
        one read another folder from another working directory (until session 51)."""
        init_from = None if self.init_from is None else str(self.init_from)
        if init_from not in (None, "zoo"):  # a warm start's source: a resumed run left unset kept its own stages
            init_from = str(expand_home(init_from).resolve())
        return {"stage": self.stage, "batch_size": self.batch_size, "lr": self.lr,
                "limit_images": self.limit_images, "freeze_text": self.freeze_text, "init_from": init_from,
                "steps": self.steps, "time_budget_min": self.time_budget_min}


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
    folder = expand_home(cfg.init_from)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--init-from {str(cfg.init_from)!r}: expected 'zoo' or an exported pipeline folder "
                         f"with a model_index.json (e.g. zoo_runs/{name}/final)")
    from . import PIPELINE_CLASSES, _check_tokenizers, check_pipeline_class

    pipeline = name.removesuffix("-decoder")  # a decoder stage warm-starts from its pipeline's export
    check_pipeline_class(folder, PIPELINE_CLASSES[pipeline], f"--init-from {str(cfg.init_from)!r}")
    _check_tokenizers(pipeline, folder)  # training on all-unknown captions, silently
    return folder


def init_label(cfg: RunConfig, name: str) -> str:
    """How a card names the warm-start source: ``zoo:NAME`` for the shipped pipeline, else the folder given."""
    return f"zoo:{name}" if str(cfg.init_from) == "zoo" else str(cfg.init_from)


def source_steps(source: Path | None) -> int:
    """Optimiser steps behind ``source`` (its train_info.json ``total_steps``, else ``steps``; 0 if unknown)."""
    info_file = None if source is None else source / "train_info.json"
    if info_file is None or not info_file.is_file():
        return 0
    info = json.loads(info_file.read_text(encoding="utf-8"))
    return int(info.get("total_steps", info.get("steps", 0)))


def warm_start_steps(cfg: RunConfig, source: Path | None) -> int | None:
    """Optimiser steps behind a warm start's ``source`` (None without one): a resumed run's checkpoint record, else
    the source's ``source_steps``. ``--init-from zoo`` resumed after ``--ship`` read the shipped model, by then the
    run's own first export (init_steps one command too high, until session 48); checkpoints keep it as
    ``init_steps``."""
    if source is None:
        return None
    recorded = cfg.resumed.get("init_steps")
    return int(recorded) if recorded is not None else source_steps(source)


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # unreadable (permissions, I/O): the file may be fine, so no advice to delete it
        raise
    except Exception as error:  # truncated zip (RuntimeError), not a checkpoint (UnpicklingError), empty (EOFError)
        raise ValueError(f"cannot resume from {str(path)!r}: it is not a readable checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); "
                         f"start over with --no-resume, or delete the file") from None


def resume(cfg: Any, stateful: dict[str, Any], generator: torch.Generator) -> tuple[int, float, list[str]]:
    """Load ``run_dir/checkpoint.pt`` into ``stateful`` (checkpoint key -> object with
    ``load_state_dict``) and ``generator`` when resuming; returns (start step, elapsed s, the
    command history with this command appended)."""
    state = load_checkpoint(cfg.run_dir / "checkpoint.pt") if cfg.resume else None
    if state is None:
        return 0, 0.0, [command_line()]
    saved_seed = state.get("seed", cfg.seed)
    if saved_seed != cfg.seed and cfg.seed_given:  # the data order and weights continue the checkpoint's
        warnings.warn(f"--seed {cfg.seed} is ignored: resuming {cfg.run_dir}, a run started with seed {saved_seed} "
                      f"(--no-resume starts over with the new seed)", stacklevel=2)
    cfg.seed = saved_seed  # recorded in its train_info
    _check_same_settings(cfg, state.get("settings", {}))
    for key, target in stateful.items():
        target.load_state_dict(state[key])
    generator.set_state(state["gen"])
    cfg.resumed = {"rng": state.get("global_rng"), "elapsed_s": float(state["elapsed_s"]),
                   "init_steps": state.get("init_steps")}
    commands = _mark_stopped(list(state.get("commands", [])), int(state["step"]), state.get("settings", {}))
    return int(state["step"]), float(state["elapsed_s"]), [*commands, command_line()]


STOPPED_MARK = re.compile(r" \(stopped at step \d+\)$")


def _mark_stopped(commands: list[str], step: int, saved: dict) -> list[str]:
    """``commands`` with the last one marked ``(stopped at step N)`` when it ended before its ``--steps`` (Ctrl-C or
    its time budget): replayed as recorded, it ran on to its own count and the card's chain gave other weights."""
    target = saved.get("steps")
    if commands and isinstance(target, int) and step < target and not STOPPED_MARK.search(commands[-1]):
        commands[-1] = f"{commands[-1]} (stopped at step {step})"
    return commands


def apply_checkpoint_settings(cfg: Any) -> None:
    """Before a resumed run reads its options: those left unset take the checkpoint's values, those given
    otherwise are a ValueError except CHANGEABLE_ON_RESUME's (``train.run`` calls it; ``resume`` checks again)."""
    state = load_checkpoint(cfg.run_dir / "checkpoint.pt") if cfg.resume else None
    if state is not None:
        _check_same_settings(cfg, state.get("settings", {}))


# options a resumed run may switch on: freezing fashion-clip's text tower changes neither the data order nor the
# optimiser's state (the documented continuation, `--freeze-text --steps N`, was refused until session 41)
# and the step count and time budget: a run is extended by resuming it with a larger --steps (or budget)
CHANGEABLE_ON_RESUME = frozenset({"freeze_text", "steps", "time_budget_min"})


def _check_same_settings(cfg: Any, saved: dict) -> None:
    """Adopt the checkpoint's value of every option left unset (None / False); a ValueError naming the options
    given with other values, CHANGEABLE_ON_RESUME's aside (checkpoints before session 30 record none: accepted)."""
    current = cfg.settings()
    if saved.get("stage") and cfg.stage and saved["stage"] != cfg.stage:
        raise ValueError(f"{cfg.run_dir} holds a checkpoint of the stage {saved['stage']!r}, not {cfg.stage!r}: "
                         f"give this stage its own --out")
    changed = {}
    for key, value in saved.items():
        if key == "stage" or key not in current or _effective(cfg, key, value) == _effective(cfg, key, current[key]):
            continue  # a value given on one command and left to the stage's default on the other is no change
        if current[key] in (None, False):
            setattr(cfg, key, value)
        elif key not in CHANGEABLE_ON_RESUME:
            changed[key] = (_effective(cfg, key, value), current[key])
    if not changed:
        return
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
    raise ValueError(f"resuming {cfg.run_dir} with other settings ({listed}): a resumed run keeps the settings it "
                     f"started with; repeat them, or start over with --no-resume")


def _effective(cfg: Any, key: str, value: Any) -> Any:
    """``value`` of the option ``key``, or the stage's default where it was left unset (None)."""
    return getattr(cfg, "defaults", {}).get(key) if value is None else value


def global_rng_state() -> dict:
    """torch's global CPU (and CUDA) RNG states and Python's: losses that sample (a VAE's latent_dist.sample())
    draw from them, so a resumed run needs them back (it re-drew step 0's numbers: weights off by 1e-3)."""
    state = {"cpu": torch.get_rng_state(), "python": _python_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_global_rng(state: dict | None) -> None:
    """Put back what ``global_rng_state`` saved (nothing for checkpoints written before session 30)."""
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def interrupts_at_step_boundaries() -> Iterator[Callable[[], bool]]:
    """Within: Ctrl-C (SIGINT) only raises a flag, read by the returned function after each step, so the
    checkpoint is the state between two steps. Saved from inside an interrupted step it held a batch or
    an optimiser step more than its step count, and the resumed run differed from an uninterrupted one.
    A second Ctrl-C interrupts at once. Main thread only (elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pending: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pending)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_loop(cfg: RunConfig, start_step: int, step_fn: Callable[[int, float], dict],
             state_fn: Callable[[int], dict], desc: str) -> tuple[int, float]:
    """Call ``step_fn(step, frac)`` from ``start_step`` to ``cfg.steps`` with tqdm, checkpoints and a time budget.

    ``frac`` is the run's progress in [0, 1]: steps done or time budget used, whichever is further. The
    budget counts the run's time over all its commands (``cfg.resumed``): before session 30 each resumed
    command got a fresh budget and restarted the cosine schedule's time at 0 (the LR rose again).
    Checkpoints record the settings (``RunConfig.settings``) and the global RNG states.
    Returns (last completed step count, seconds spent in this call).
    """
    ckpt = cfg.run_dir / "checkpoint.pt"
    if start_step > cfg.steps:  # it exported the longer run's weights without a word
        warnings.warn(f"{cfg.run_dir} has done {start_step} steps, more than --steps {cfg.steps}: nothing to train; "
                      f"its {start_step}-step weights are exported (--no-resume trains {cfg.steps} steps from "
                      f"scratch)", stacklevel=2)
    t0 = last_ckpt = time.time()
    budget_s = None if cfg.time_budget_min is None else cfg.time_budget_min * 60
    spent_before = cfg.resumed.get("elapsed_s", 0.0)  # the budget and the LR schedule's time are the run's
    if budget_s is not None and start_step < cfg.steps and spent_before > budget_s:
        warnings.warn(f"{cfg.run_dir}'s time budget of {cfg.time_budget_min} min (over all its commands) is spent: "
                      f"nothing to train; give a larger --time-budget-min to continue", stacklevel=2)
    restore_global_rng(cfg.resumed.get("rng"))
    done, interrupted = start_step, lambda: False  # steps completed; whether Ctrl-C asked to stop
    checkpoint = lambda steps_done: save_checkpoint(ckpt, {  # noqa: E731
        **state_fn(steps_done), "seed": cfg.seed, "settings": cfg.settings(), "global_rng": global_rng_state()})
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=desc,
               mininterval=10.0, dynamic_ncols=True)
    rerun = "run the same command again" if cfg.resume else "rerun the command without --no-resume"
    saved_at_boundary = False
    try:
        with interrupts_at_step_boundaries() as interrupted:
            for step in bar:
                spent = spent_before + time.time() - t0
                if budget_s is not None and spent > budget_s:
                    bar.write(f"time budget of {cfg.time_budget_min} min (this run's, over all its commands) "
                              f"reached at step {step}")
                    break
                frac = step / cfg.steps if budget_s is None else max(step / cfg.steps, spent / budget_s)
                logs = step_fn(step, frac)
                done = step + 1
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
                if interrupted():
                    checkpoint(done)
                    saved_at_boundary = True
                    bar.write(f"interrupted: {done} steps saved to {ckpt}; {rerun} to resume")
                    raise KeyboardInterrupt
                if time.time() - last_ckpt > cfg.checkpoint_every_min * 60:
                    checkpoint(done)
                    last_ckpt = time.time()
    except KeyboardInterrupt:
        if not saved_at_boundary:  # a second Ctrl-C, mid-step (interrupted() was already true: it never said so)
            bar.write(f"interrupted during step {done + 1}: {rerun} to resume from the last checkpoint in {ckpt}")
        raise
    finally:
        bar.close()
    checkpoint(done)
    return done, time.time() - t0
