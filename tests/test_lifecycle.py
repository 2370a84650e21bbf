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
