"""Accelerated pipelines are freed by ``del`` like plain ones (a server swapping models frees GPU memory with
``del pipe; torch.cuda.empty_cache()``): the methods we bind on instances hold their owner weakly."""

import copy
import gc
import pickle
import weakref

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.pretrained_guard import GuardedMethod
from diffusion_accel.testing.tiny import build_tiny

CALIB = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all")
PRUNE_CALIB = dict(calib_prompts=1, calib_num_steps=2)


def _freed_without_the_cycle_collector(accelerate=lambda pipe: pipe) -> bool:
    pipe = accelerate(build_tiny("sd"))  # built here: an argument stays referenced by the caller's frame
    denoiser = weakref.ref(pipe.unet)
    gc.collect()
    gc.disable()
    try:
        del pipe
        return denoiser() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("accelerate", [
    lambda pipe: da.quantize_(pipe, da.PTQConfig.preset("w8a8", **CALIB)),
    lambda pipe: da.quantize_(pipe, da.PTQConfig.preset("w8a16", **CALIB)),
    lambda pipe: da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.3)),
    lambda pipe: da.remove_cache(da.enable_cache(pipe, da.DeepCacheConfig(interval=2))),
], ids=["w8a8", "w8a16", "prune", "cache-removed"])
def test_accelerated_pipelines_are_freed_by_del(accelerate):
    assert _freed_without_the_cycle_collector()  # as diffusers' own
    assert _freed_without_the_cycle_collector(accelerate)


def _owned_by(module: torch.nn.Module) -> str:
    return f"owned by {id(module)}"


def test_guarded_methods_bind_to_copies_and_refuse_once_their_owner_is_gone():
    owner = torch.nn.Linear(2, 2)
    object.__setattr__(owner, "extra_repr", GuardedMethod(_owned_by, owner))
    copied = copy.deepcopy(owner)
    assert copied.extra_repr() == f"owned by {id(copied)}" and owner.extra_repr() == f"owned by {id(owner)}"
    restored = pickle.loads(pickle.dumps(owner))
    assert restored.extra_repr() == f"owned by {id(restored)}"
    method = owner.extra_repr
    del owner, copied, restored
    gc.collect()
    with pytest.raises(ReferenceError, match="no longer exists"):
        method()


def test_moving_a_lowered_layer_forgets_constants_folded_for_its_old_device(int8_kernels):
    from diffusion_accel.quant.lower import Int8GemmCore

    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset("w8a8", **CALIB))
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    pipe(**tiny_call_kwargs("sd"))
    cores = [module for module in pipe.unet.modules() if isinstance(module, Int8GemmCore)]
    assert cores and any(core.constants._entries for core in cores)
    pipe.unet.to(torch.float32)  # any _apply: a move to another device takes the same path
    assert not any(core.constants._entries for core in cores)


@pytest.mark.parametrize("apply", [
    lambda pipe: da.prune_(pipe, da.PruneConfig(method="obs", sparsity=0.3, pattern="structured", **PRUNE_CALIB)),
    lambda pipe: da.prune_(pipe, da.PruneConfig(method="obs", pattern="2:4", **PRUNE_CALIB)),
    lambda pipe: da.quantize_(pipe, da.PTQConfig.preset("w8a8", **CALIB)),
    lambda pipe: da.calibrate(pipe, ["a photo"], num_inference_steps=2, progress=False),
], ids=["structured", "2:4", "w8a8", "calibrate"])
def test_techniques_leave_the_global_random_stream_alone(apply):
    """Structured pruning built its smaller layers with random init (then overwrote it), drawing from the
    global RNG: a user's ``torch.manual_seed(0)`` before it no longer gave the same later draws."""
    pipe = build_tiny("sd")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    apply(pipe)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("apply", [
    lambda pipe: da.calibrate(pipe, ["a photo"], num_inference_steps=3, progress=False),
    lambda pipe: da.quantize_(pipe, da.PTQConfig.preset("w8a8", **CALIB)),
    lambda pipe: da.calibrate_schedule(pipe, ["a photo"], budget=0.5, num_inference_steps=4, height=32, width=32),
], ids=["calibrate", "quantize", "calibrate_schedule"])
def test_calibration_runs_leave_the_scheduler_as_they_found_it(apply):
    """They left it set for their own step count: a user's ``set_timesteps(20)`` (a hand-written denoising
    loop) found 3 steps after ``calibrate``."""
    pipe = build_tiny("sd")
    pipe.scheduler.set_timesteps(20)
    timesteps = pipe.scheduler.timesteps.clone()
    apply(pipe)
    assert torch.equal(pipe.scheduler.timesteps, timesteps) and pipe.scheduler.num_inference_steps == 20


def test_loading_a_structured_artifact_leaves_the_global_random_stream_alone(tmp_path):
    pruned = da.prune_(build_tiny("sd"), da.PruneConfig(method="obs", sparsity=0.3, pattern="structured",
                                                        **PRUNE_CALIB))
    da.save(pruned, tmp_path / "art")
    base = build_tiny("sd")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    da.load(base, tmp_path / "art")
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("config", [da.DeepCacheConfig(interval=2, forecast=1),
                                    da.EncoderPropagationConfig(interval=2, noise_injection=0.1)],
                         ids=["deepcache", "encoder-propagation"])
def test_unet_caches_drop_their_features_when_the_call_ends(config):
    """The last call's cached features stayed on the device after it returned (until the next call)."""
    from diffusion_accel.hooks import get_tracker
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    pipe = da.enable_cache(build_tiny("sd"), config)
    first = pipe(**tiny_call_kwargs("sd", steps=4)).images
    assert not get_tracker(pipe.unet)._clients["cache"].states
    assert torch.equal(pipe(**tiny_call_kwargs("sd", steps=4)).images, first)
    assert da.cache_summary(pipe)["reused_calls"] == 2  # the last call's summary is kept
    da.remove_cache(pipe)
    assert not pipe.unet._forward_hooks
