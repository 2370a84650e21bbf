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
    """No collection between accelerating and ``del``: the hooks a calibration or ``remove_cache`` removed kept the
    denoiser in a cycle (their ``fn_ref``) that a collection there hid (until session 50)."""
    gc.collect()
    gc.disable()
    try:
        pipe = accelerate(build_tiny("sd"))  # built here: an argument stays referenced by the caller's frame
        denoiser = weakref.ref(pipe.unet)
        del pipe
        return denoiser() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("accelerate", [
    lambda pipe: da.quantize_(pipe, da.PTQConfig.preset("w8a8", **CALIB)),
    lambda pipe: da.quantize_(pipe, da.PTQConfig.preset("w8a16", **CALIB)),
    lambda pipe: da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.3)),
    lambda pipe: da.remove_cache(da.enable_cache(pipe, da.DeepCacheConfig(interval=2))),
    lambda pipe: da.calibrate(pipe, ["a cat"], 2, progress=False) and pipe,
], ids=["w8a8", "w8a16", "prune", "cache-removed", "calibrated"])
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
    timesteps = pipe.scheduler.timesteps
    values = timesteps.clone()
    apply(pipe)
    assert torch.equal(pipe.scheduler.timesteps, values) and pipe.scheduler.num_inference_steps == 20
    assert pipe.scheduler.timesteps is timesteps  # the same object: the step tracker sees no new trajectory


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
    assert not get_tracker(pipe.unet).client_states("cache")
    assert torch.equal(pipe(**tiny_call_kwargs("sd", steps=4)).images, first)
    assert da.cache_summary(pipe)["reused_calls"] == 2  # the last call's summary is kept
    da.remove_cache(pipe)
    assert not pipe.unet._forward_hooks


def _alternating(jobs):
    """Run ``jobs`` (two functions of a ``callback_on_step_end``) in two threads whose denoising steps
    strictly alternate (each waits for the other after every step): a deterministic stand-in for a
    server's concurrent requests."""
    import threading

    turn, lock, outputs, errors = [0], threading.Condition(), [None, None], []
    done = [False, False]

    def run(index):
        def step_end(_pipe, step, _timestep, kwargs):
            with lock:
                turn[0] = 1 - index
                lock.notify_all()
                lock.wait_for(lambda: turn[0] == index or done[1 - index], timeout=60)
            return kwargs

        try:
            with lock:
                lock.wait_for(lambda: turn[0] == index, timeout=60)
            outputs[index] = jobs[index](step_end)
        except Exception as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)
        finally:
            with lock:
                done[index] = True
                turn[0] = 1 - index
                lock.notify_all()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return outputs


def _shared_denoiser_pipelines(pipe):
    """``pipe`` and a second pipeline built from its components (its own scheduler), sharing the denoiser."""
    import copy

    return pipe, type(pipe)(**(pipe.components | {"scheduler": copy.deepcopy(pipe.scheduler)}))


def _generate(pipe, steps, seed, family="sd"):
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    return lambda step_end=None: pipe(**tiny_call_kwargs(family, steps=steps, seed=seed),
                                      callback_on_step_end=step_end).images


@pytest.mark.parametrize("family, config", [("sd", da.DeepCacheConfig(interval=3)),
                                            ("sd", da.EncoderPropagationConfig(interval=2)),
                                            ("flux", da.BlockCacheConfig(interval=2))],
                         ids=["deepcache", "encoder-propagation", "flux-block-cache"])
def test_pipelines_sharing_a_cached_denoiser_in_two_threads_give_their_serial_images(family, config):
    """Pipelines built from one pipeline's components (diffusers' way to share a denoiser) in a server's
    threads: the step tracker's state was shared, so interleaved calls reset or reused each other's cache
    (images off by up to 0.39, or a crash when the batch sizes differed). Flux passes timesteps that are no
    views of its scheduler's: the second thread was placed by the first one's live scheduler."""
    first, second = _shared_denoiser_pipelines(da.enable_cache(build_tiny(family), config))
    jobs = lambda: [_generate(first, 9, 1, family), _generate(second, 6, 2, family)]  # noqa: E731
    serial = [job() for job in jobs()]
    for output, expected in zip(_alternating(jobs()), serial):
        assert torch.equal(output, expected)


def test_calibration_ignores_another_threads_calls_of_the_shared_denoiser():
    """calibrate recorded every call of its denoiser, also another pipeline's in another thread (22 calls
    counted for 16), and the artifact built from it carried them."""
    first, second = _shared_denoiser_pipelines(build_tiny("sd"))
    settings = dict(num_inference_steps=4, progress=False, height=32, width=32)
    serial = da.calibrate(first, ["a photo", "a cat"], **settings)

    def calibration(step_end):
        return da.calibrate(first, ["a photo", "a cat"], callback_on_step_end=step_end, **settings)

    concurrent, _ = _alternating([calibration, _generate(second, 6, 2)])
    assert concurrent.denoiser_calls == serial.denoiser_calls == 8
    assert concurrent.timesteps == serial.timesteps


def test_seeded_calls_pin_samplers_that_draw_from_the_global_rng():
    """FluxPipeline's scheduler.step gets no generator: a stochastic sampler's noise came from the global RNG,
    so identical seeded calls differed (calibrated schedules were searched on noise), and calibration moved
    the user's RNG."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion_accel.cache.runs import final_outputs, planned_calls
    from diffusion_accel.eval.pipes import ImageJob, generate_images

    pipe = build_tiny("flux")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    calls = planned_calls(pipe, ["a photo"], 3, height=16, width=16)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, second = final_outputs(pipe, calls), final_outputs(pipe, calls)
    assert torch.equal(first[0], second[0])
    jobs = [ImageJob(0, 0, "a photo", 5)]
    images = [generate_images(pipe, jobs, num_inference_steps=3, call_kwargs={"height": 16, "width": 16})
              for _ in range(2)]
    assert torch.equal(images[0][0][1], images[1][0][1])
    da.calibrate(pipe, ["a photo"], num_inference_steps=3, progress=False, height=16, width=16)
    assert torch.equal(torch.get_rng_state(), state)


def test_artifacts_record_what_their_calibration_ran(tmp_path):
    """The prompts and their order change an artifact (call k is seeded seed + k), but only the CLI's
    calibration.json recorded them: the manifest of an API-built artifact could not say what built it."""
    import json

    pipe = build_tiny("sd")
    calib = da.calibrate(pipe, ["a red bicycle", "a cat"], num_inference_steps=2, progress=False, seed=7,
                         height=32, width=32)
    da.prune_(pipe, da.PruneConfig(method="obs", sparsity=0.3, **PRUNE_CALIB))
    da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib)
    da.save(pipe, tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    entries = {technique["name"]: technique["config"] for technique in manifest["techniques"]}
    ptq = entries["ptq"]["calibration"]
    assert ptq["settings"]["prompts"] == ["a red bicycle", "a cat"] and ptq["seeds"] == [7, 8]
    assert ptq["settings"]["height"] == 32 and ptq["pipeline_class"] == "StableDiffusionPipeline"
    pruned = entries["prune"]["record"]["calibrations"]
    assert len(pruned) == 1 and pruned[0]["settings"]["num_inference_steps"] == 2 and pruned[0]["seeds"] == [0]
    loaded = da.load(build_tiny("sd"), tmp_path / "art")
    da.save(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert [t["config"].get("calibration") for t in again["techniques"] if t["name"] == "ptq"] == [ptq]


def test_a_flux_pipeline_sharing_the_transformer_is_counted_before_the_original_ever_ran():
    """Flux passes timesteps that are no views: a pipeline built from the components, called before the original
    pipeline's first call, was placed by the original's never-set scheduler (every call at step 0 of 1000, so the
    cache reused nothing) and gave another image than after the original had run."""
    from diffusion_accel.hooks import get_tracker
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    first, second = _shared_denoiser_pipelines(da.enable_cache(build_tiny("flux"), da.BlockCacheConfig(interval=2)))
    tracker, steps = get_tracker(first.transformer), []
    first.transformer.register_forward_hook(lambda *args: steps.append(tracker.step_index))
    before = second(**tiny_call_kwargs("flux", steps=5)).images
    assert steps == [0, 1, 2, 3, 4] and da.cache_summary(first)["reused_calls"] == 2
    first(**tiny_call_kwargs("flux", steps=3))
    assert torch.equal(second(**tiny_call_kwargs("flux", steps=5)).images, before)


def test_remove_cache_forgets_the_features_other_threads_cached():
    """A thread whose cached call failed part-way kept its features after ``remove_cache`` from another
    thread while the tracker stayed (a timestep-grouped W8A8 denoiser also uses it), until its next call. (A call
    that ends, interrupted or not, frees them itself: diffusers resets stateful caches then.)"""
    import threading

    from diffusion_accel.hooks import get_tracker
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset("w8a8", timestep_groups=2, **CALIB))
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    removed, held_before, held_after = threading.Event(), [], []

    def fail(pipe_, step, _timestep, kwargs):
        if step >= 1:
            raise RuntimeError("stopped")
        return kwargs

    def worker():
        try:
            pipe(**tiny_call_kwargs("sd", steps=6), callback_on_step_end=fail)
        except RuntimeError:
            pass
        held_before.append(bool(get_tracker(pipe.unet).client_states("cache")))
        removed.wait(timeout=60)
        held_after.append(bool(get_tracker(pipe.unet).client_states("cache")))

    thread = threading.Thread(target=worker)
    thread.start()
    while not held_before and thread.is_alive():
        thread.join(timeout=0.05)
    da.remove_cache(pipe)
    removed.set()
    thread.join(timeout=60)
    assert held_before == [True] and held_after == [False]


def test_cache_summary_reports_the_calling_threads_last_call():
    """Two threads' calls of a shared cached denoiser went into one log: each thread's summary mixed both."""
    first, second = _shared_denoiser_pipelines(da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=3)))
    summaries = [None, None]

    def job(pipe, steps, index):
        def run(step_end):
            images = _generate(pipe, steps, index)(step_end)
            summaries[index] = da.cache_summary(pipe)
            return images
        return run

    _alternating([job(first, 9, 0), job(second, 6, 1)])
    assert [s["denoiser_calls"] for s in summaries] == [9, 6]
    assert [s["full_calls"] for s in summaries] == [3, 2]


def test_a_pipeline_sharing_the_cached_denoiser_also_drops_its_features_when_its_call_ends():
    """Features were dropped only after the last step of the watched pipeline's schedule: a pipeline built
    from the components with a scheduler of its own (or a deep copy of the denoiser placed in one) kept
    its call's features alive until its next call."""
    from diffusion_accel.hooks import get_tracker

    first, second = _shared_denoiser_pipelines(da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=2)))
    images = _generate(second, 5, 0)()
    assert not get_tracker(second.unet).client_states("cache")
    assert torch.equal(_generate(second, 5, 0)(), images)
    assert da.cache_summary(second)["denoiser_calls"] == 5


def _snapshot(pipe):
    """What a failed technique call must leave as it was: instance attributes, hooks, images."""
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    unet = pipe.unet
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), "_diffusers_hook" in vars(m))
             for name, m in unet.named_modules()}
    images = pipe(**tiny_call_kwargs("sd", 3)).images
    return unet, set(vars(unet)), set(vars(pipe)), hooks, images


def _assert_unchanged(pipe, before):
    after = _snapshot(pipe)
    assert after[0] is before[0] and after[1:4] == before[1:4] and torch.equal(after[4], before[4])
    assert da.artifact.applied_techniques(pipe) == []


QUICK_PTQ = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all", calib_kwargs={"height": 32, "width": 32})


@pytest.mark.parametrize("apply", [
    lambda pipe: da.quantize_(pipe, da.PTQConfig(**QUICK_PTQ)),
    lambda pipe: da.enable_cache(pipe, da.DeepCacheConfig(interval=2)),
    lambda pipe: da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.3)),
], ids=["quantize_", "enable_cache", "prune_"])
def test_a_ctrl_c_while_a_technique_is_being_recorded_leaves_the_pipeline_as_it_was(apply, monkeypatch):
    """Interrupted in mark_applied, quantize_ and enable_cache left their layers / hooks installed but unrecorded
    (a retry: "already quantized"), and every technique left the base fingerprint and guards (session 31)."""
    import diffusion_accel.artifact as artifact

    pipe = build_tiny("sd")
    before = _snapshot(pipe)
    guard = artifact.install_adapter_guards
    monkeypatch.setattr(artifact, "install_adapter_guards", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        apply(pipe)
    monkeypatch.setattr(artifact, "install_adapter_guards", guard)
    _assert_unchanged(pipe, before)
    apply(pipe)  # the retry works
    assert len(da.artifact.applied_techniques(pipe)) == 1


@pytest.mark.parametrize("fails", ["end_session", "start_session", "finish_session"])
def test_an_interrupted_cache_replacement_keeps_the_cache_it_replaced(fails, monkeypatch):
    """The old cache was ended before the new one's try: interrupted after that, no cache ran while the marks
    still said 'cache' (session 31)."""
    import diffusion_accel.cache.apply as cache_apply
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    pipe = build_tiny("sd")
    da.enable_cache(pipe, da.DeepCacheConfig(interval=3))
    before = pipe(**tiny_call_kwargs("sd", 4)).images
    original, calls = getattr(cache_apply, fails), []

    def first_call_interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_apply, fails, first_call_interrupted)
    with pytest.raises(KeyboardInterrupt):
        da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    assert da.cache.cache_config(pipe).interval == 3 and da.artifact.applied_techniques(pipe) == ["cache"]
    assert torch.equal(pipe(**tiny_call_kwargs("sd", 4)).images, before)


def test_a_cache_replacement_interrupted_half_way_through_removing_the_old_hooks_keeps_the_old_cache(monkeypatch):
    """The replaced session was half removed (its registries partly dropped): ending it again raised
    AttributeError, and no cache ran (session 31)."""
    from diffusers.hooks import HookRegistry

    from diffusion_accel.testing.tiny import tiny_call_kwargs

    def cache_hooked():
        return sorted(name for name, module in pipe.unet.named_modules()
                      if "diffusion_accel.cache" in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}))

    pipe = build_tiny("sd")
    da.enable_cache(pipe, da.DeepCacheConfig(interval=3))
    before, hooked = pipe(**tiny_call_kwargs("sd", 4)).images, cache_hooked()
    remove_hook, calls = HookRegistry.remove_hook, []

    def interrupted_on_the_third(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return remove_hook(self, *args, **kwargs)

    monkeypatch.setattr(HookRegistry, "remove_hook", interrupted_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    monkeypatch.setattr(HookRegistry, "remove_hook", remove_hook)
    # (half unhooked, the deep modules computed on reuse steps: same images, wasted work)
    assert da.cache.cache_config(pipe).interval == 3 and cache_hooked() == hooked
    assert torch.equal(pipe(**tiny_call_kwargs("sd", 4)).images, before)


def test_a_first_cache_interrupted_while_attaching_the_step_tracker_leaves_no_hook_registry(monkeypatch):
    """The registry was created, its first hook interrupted: with no tracker to detach, it stayed on the UNet."""
    from diffusers.hooks import HookRegistry

    pipe = build_tiny("sd")
    assert "_diffusers_hook" not in vars(pipe.unet)
    register_hook = HookRegistry.register_hook

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HookRegistry, "register_hook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    monkeypatch.setattr(HookRegistry, "register_hook", register_hook)
    assert "_diffusers_hook" not in vars(pipe.unet) and "forward" not in vars(pipe.unet)


def test_remove_cache_under_model_offload_enabled_after_it_is_refused_until_the_hooks_are_removed():
    """Removing our hooks beneath accelerate's offload wrapper deleted the wrapper (the UNet's onload hook stopped
    running) and left its saved forward pointing at the removed hooks (until session 41)."""
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    plain = build_tiny("sd")(**tiny_call_kwargs("sd", steps=4)).images
    pipe = build_tiny("sd")
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    pipe.enable_model_cpu_offload(device="cpu")
    first, second = (pipe(**tiny_call_kwargs("sd", steps=4)).images for _ in range(2))
    assert torch.equal(first, second) and not torch.equal(first, plain)  # the cache runs on every call
    with pytest.raises(ValueError, match="remove_cache: the UNet2DConditionModel is under CPU offload"):
        da.remove_cache(pipe)
    pipe.remove_all_hooks()
    da.remove_cache(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(pipe(**tiny_call_kwargs("sd", steps=4)).images, plain)
