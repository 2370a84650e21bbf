"""The learned block router: running a RouterCacheConfig (per step, which blocks run) and learning one."""

import pytest
import torch

from diffusion_accel import load, save
from diffusion_accel.arch import find_denoiser
from diffusion_accel.cache import RouterCacheConfig, enable_cache, learn_router, remove_cache, summary
from diffusion_accel.cache.calibrated import schedule_error
from diffusion_accel.cache.configs import config_from_dict, config_to_dict
from diffusion_accel.cache.router import call_plan, source_steps
from diffusion_accel.cache.router_learn import cut_to_budget
from diffusion_accel.cache.runs import final_outputs, planned_calls
from diffusion_accel.cache.stack import stack_blocks
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

STEPS = 6


def _images(pipe, family, steps=STEPS):
    return torch.as_tensor(pipe(**tiny_call_kwargs(family, steps=steps)).images)


def _every(num_blocks, steps=STEPS):
    return tuple(tuple(range(num_blocks)) for _ in range(steps))


def _call_kwargs(family):
    return {key: value for key, value in tiny_call_kwargs(family, steps=STEPS).items()
            if key not in ("generator", "prompt", "num_inference_steps")}


class _Delta(torch.nn.Module):
    """A block adding a fixed delta to its input, counting its calls (an analytic block)."""

    def __init__(self, delta):
        super().__init__()
        self.delta, self.calls = delta, 0

    def forward(self, hidden_states):
        self.calls += 1
        return hidden_states + self.delta * (1 + self.calls)


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "dit"])
def test_a_router_running_every_block_equals_no_cache_and_a_mixed_one_reuses_what_it_says(family):
    pipe = build_tiny(family)
    base = _images(pipe, family)
    num_blocks = len(stack_blocks(pipe))
    enable_cache(pipe, RouterCacheConfig(_every(num_blocks), num_blocks))
    assert torch.equal(_images(pipe, family), base)
    computed = (tuple(range(num_blocks)), (0,), (), tuple(range(num_blocks)), (num_blocks - 1,), (0,))
    enable_cache(pipe, RouterCacheConfig(computed, num_blocks))
    mixed = _images(pipe, family)
    assert not torch.equal(mixed, base) and torch.equal(_images(pipe, family), mixed)  # fresh state per call
    records = [record for record in summary(pipe)["steps"] if record["context"] == summary(pipe)["steps"][0]["context"]]
    assert [record["computed_blocks"] for record in records] == [len(blocks) for blocks in computed]
    assert [record["computed"] for record in records] == [True, False, False, True, False, False]
    remove_cache(pipe)
    assert torch.equal(_images(pipe, family), base)


def test_a_skipped_block_returns_its_input_plus_its_own_delta_from_the_last_step_it_ran():
    """Analytic blocks: block k adds d_k * (1 + its call count); a skipped block adds its last recorded delta."""
    from diffusion_accel.cache.router import RouterBlockHook
    from diffusion_accel.cache.streams import BlockIO

    io = BlockIO("hidden_states", None, 0, None, ("hidden_states",))
    blocks = [_Delta(1.0), _Delta(10.0)]

    class _Session:
        def __init__(self):
            self.state_dict, self.blocks = {}, frozenset()
            self.policy = type("P", (), {"soft": None})()

        def active(self):
            return True

        def state(self):
            return self.state_dict

        def compute(self, state):
            return False

    session = _Session()
    hooks = [RouterBlockHook(session, f"b{i}", io, i, 2) for i in range(2)]
    for hook, block in zip(hooks, blocks):
        hook.fn_ref = type("F", (), {"original_forward": block.forward})()

    def run(hidden, running):
        session.state_dict["router_blocks"] = frozenset(running)
        for hook, block in zip(hooks, blocks):
            hidden = hook.new_forward(block, hidden)
        return hidden

    x = torch.zeros(1)
    assert float(run(x, {0, 1})) == 2.0 + 20.0  # both run: deltas 2 and 20 recorded
    assert float(run(x, {1})) == 2.0 + 30.0  # block 0 reused (delta 2), block 1 ran its 2nd call (delta 30)
    assert float(run(x, set())) == 2.0 + 30.0 and [block.calls for block in blocks] == [1, 2]


def test_router_config_validates_and_round_trips():
    config = RouterCacheConfig(((0, 1), (1,), ()), 2, budget=0.5, timesteps=(3.0, 2.0, 1.0))
    assert config.num_inference_steps == 3 and config.block_fraction() == 0.5
    assert config_from_dict(config_to_dict(config)) == config
    # the same count and start on other noise levels (another resolution's shift): only rows from first_step on
    timed = RouterCacheConfig(((0, 1), (), (), (0, 1), (0,), (1,)), 2, first_step=3,
                              timesteps=(1000.0, 800.0, 600.0, 400.0, 200.0, 100.0), resample=False)
    assert source_steps(timed, 6, [1000.0, 800.0, 600.0, 400.0, 200.0, 100.0]) == [0, 1, 2, 3, 4, 5]
    assert source_steps(timed.with_(resample=True), 6, [1000.0, 990.0, 980.0, 970.0, 700.0, 100.0])[3:] == [3, 3, 5]
    for bad, message in [(((0,), (1,)), "must list every block"), (((0, 1), (2,)), "outside"),
                         ((), "at least one step"), (((0, 1), (True,)), "int block indices")]:
        with pytest.raises(ValueError, match=message):
            RouterCacheConfig(bad, 2)
    with pytest.raises(ValueError, match="num_blocks"):
        RouterCacheConfig(((0,),), 0)
    with pytest.raises(ValueError, match="budget"):
        RouterCacheConfig(((0, 1),), 2, budget=1.5)
    with pytest.raises(ValueError, match="3 finite values"):
        RouterCacheConfig(((0, 1), (), ()), 2, timesteps=(1.0,))


def test_another_step_count_takes_each_steps_blocks_from_the_nearest_learned_step_or_is_refused():
    config = RouterCacheConfig(((0, 1), (0,), (1,), ()), 2)
    assert source_steps(config, 4) == [0, 1, 2, 3]
    assert source_steps(config, 7) == [0, 0, 1, 2, 2, 2, 3]  # positions 0, 0.5, .., 3 rounded
    assert call_plan(config, 7)[0] == frozenset({0, 1}) and call_plan(config, 7)[3] == frozenset({1})
    by_level = RouterCacheConfig(((0, 1), (0,), (1,), ()), 2, timesteps=(999.0, 500.0, 100.0, 0.0))
    assert source_steps(by_level, 4, [999.0, 900.0, 400.0, 0.0]) == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="resample=True"):
        source_steps(by_level.with_(resample=False), 5)
    pipe = build_tiny("flux")
    enable_cache(pipe, RouterCacheConfig(((0, 1, 2, 3), (0,), (1,), ()), 4, resample=False))
    with pytest.raises(ValueError, match="learned for 4 denoiser steps"):
        _images(pipe, "flux", steps=5)


def test_a_router_for_another_stack_or_a_unet_is_refused_before_any_hook():
    pipe = build_tiny("flux")
    with pytest.raises(ValueError, match="stack of 3 transformer blocks"):
        enable_cache(pipe, RouterCacheConfig(_every(3), 3))
    assert "_diffusers_hook" not in vars(pipe.transformer)
    with pytest.raises(ValueError, match="no transformer block stacks"):
        enable_cache(build_tiny("sd"), RouterCacheConfig(_every(2), 2))
    with pytest.raises(ValueError, match="no transformer block stacks"):
        learn_router(build_tiny("sd"), ["a cat"], num_inference_steps=STEPS)


def test_cut_to_budget_keeps_step_0_and_the_most_open_gates_that_fit():
    probabilities = torch.tensor([[0.0, 0.0], [0.9, 0.2], [0.8, 0.7], [0.1, 0.95]])
    assert cut_to_budget(probabilities, [0.5, 0.5], budget=0.5) == ((0, 1), (0,), (), (1,))
    assert cut_to_budget(probabilities, [0.9, 0.1], budget=0.55) == ((0, 1), (0, 1), (1,), (1,))  # cheap ones fill in
    assert cut_to_budget(probabilities, [0.5, 0.5], budget=0.25) == ((0, 1), (), (), ())


def test_cut_to_budget_spends_only_on_the_steps_that_run():
    probabilities = torch.tensor([[0.0, 0.0], [0.9, 0.9], [0.9, 0.9], [0.8, 0.2], [0.1, 0.7]])
    # steps 2..4 run (img2img): step 2 computes all, 0.5 of 3 steps leaves 0.5 for the gates of steps 3 and 4
    assert cut_to_budget(probabilities, [0.5, 0.5], budget=0.5, ran_steps=[2, 3, 4]) == ((0, 1), (), (0, 1), (0,), ())


def test_a_router_learned_on_img2img_keeps_its_budget_over_the_steps_that_run():
    """Strength 0.5 runs steps 4..7 of 8; until session 41 the budget covered all 8 (step 0 counted as the free
    full step, the first step that runs computed everything anyway): 0.75 of the blocks ran for a 0.4 budget."""
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**build_tiny("flux").components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), strength=0.5,
                  height=16, width=16)
    config = learn_router(pipe, ["a red bicycle"], budget=0.4, num_inference_steps=8, epochs=2, **kwargs)
    assert config.computed_blocks[1:4] == ((), (), ()) and len(config.computed_blocks[4]) == config.num_blocks
    assert config.first_step == 4
    enable_cache(pipe, config)
    pipe("a red bicycle", num_inference_steps=8, generator=torch.Generator().manual_seed(0), **kwargs)
    assert summary(pipe)["block_compute_fraction"] <= 0.4 + 1e-6
    remove_cache(pipe)
    # text-to-image on the shared transformer: steps 1-3 ran no block (step 0's deltas) until session 52
    from diffusers import FluxPipeline

    from diffusion_accel.cache.router import running_call_plan

    text_pipe = FluxPipeline(**pipe.components)
    text_pipe.set_progress_bar_config(disable=True)
    enable_cache(text_pipe, config)
    text_pipe("a red bicycle", num_inference_steps=8, height=16, width=16, generator=torch.Generator().manual_seed(0))
    computed = [record["computed_blocks"] for record in summary(text_pipe)["steps"]]
    assert computed == [len(blocks) for blocks in running_call_plan(config, 8, 0)]
    assert computed[1] == config.num_blocks  # the learned first step's row (every block), not an empty one
    remove_cache(text_pipe)


def test_a_router_learned_from_mid_schedule_maps_its_rows_over_the_steps_a_call_runs_or_is_refused():
    from diffusion_accel.cache.router import running_call_plan

    every = frozenset({0, 1})
    config = RouterCacheConfig(((0, 1), (), (), (0, 1), (0,), (1,)), 2, first_step=3)
    assert running_call_plan(config, 6, 0) == (every, every, frozenset({0}), frozenset({0}), frozenset({1}),
                                               frozenset({1}))  # rows 3..5 over the 6 steps that run
    assert running_call_plan(config, 4, 1) == (every, every, frozenset({0}), frozenset({1}))
    with pytest.raises(ValueError, match="starting at step 3 .* set resample=True"):
        running_call_plan(config.with_(resample=False), 6, 0)
    with pytest.raises(ValueError, match=r"computed_blocks\[first_step=1\] must list every block"):
        RouterCacheConfig(((0, 1), (0,)), 2, first_step=1)
    with pytest.raises(ValueError, match="first_step must be below the 2 learned steps"):
        RouterCacheConfig(((0, 1), (0,)), 2, first_step=2)
    assert config_from_dict(config_to_dict(config)) == config


def test_a_router_learned_on_custom_sigmas_has_the_steps_they_set():
    config = learn_router(build_tiny("flux"), ["a cat"], budget=0.5, num_inference_steps=8, epochs=1,
                          sigmas=[1.0, 0.75, 0.5, 0.25], **_call_kwargs("flux"))
    assert config.num_inference_steps == 4 and len(config.timesteps) == 4


def test_learn_router_meets_its_budget_beats_reusing_blindly_and_leaves_the_pipeline_as_it_was():
    pipe = build_tiny("flux")
    denoiser = find_denoiser(pipe)[1]
    kwargs = _call_kwargs("flux")
    config = learn_router(pipe, ["a cat", "a dog"], budget=0.5, num_inference_steps=STEPS, epochs=4, **kwargs)
    assert isinstance(config, RouterCacheConfig) and config.num_inference_steps == STEPS and config.num_blocks == 4
    assert config.timesteps is not None and config.budget == 0.5
    assert 0.25 < config.block_fraction() <= 0.55  # block FLOPs differ a little; the cut meets the FLOP budget
    assert "_diffusers_hook" not in vars(denoiser) and "forward" not in vars(denoiser)
    assert all(parameter.requires_grad for parameter in denoiser.parameters())
    assert all(parameter.grad is None for parameter in denoiser.parameters())
    calls = planned_calls(pipe, ["a cat", "a dog"], STEPS, seed=0, **kwargs)
    references = final_outputs(pipe, calls)
    learned = schedule_error(pipe, config, calls, references)
    late = RouterCacheConfig(_every(4, 3) + ((), (), ()), 4)  # the same count of block runs, reused at the end
    early = RouterCacheConfig(((0, 1, 2, 3), (), (), ()) + _every(4, 2), 4)  # ... or in the middle
    assert 0 < learned < min(schedule_error(pipe, late, calls, references),  # 0.0037 vs 0.0072 / 0.0061
                             schedule_error(pipe, early, calls, references))


def test_learn_router_trains_with_gradient_checkpointing_on_and_leaves_it_on():
    """diffusers' checkpointing recomputed the blocks in the backward, running the router's stateful hooks again:
    "A different number of tensors was saved during the original forward and recomputation" (session 47)."""
    plain, checkpointed = build_tiny("flux"), build_tiny("flux")
    checkpointed.transformer.enable_gradient_checkpointing()
    kwargs = dict(budget=0.5, num_inference_steps=STEPS, epochs=1, **_call_kwargs("flux"))
    assert learn_router(checkpointed, ["a cat"], **kwargs) == learn_router(plain, ["a cat"], **kwargs)
    assert checkpointed.transformer.is_gradient_checkpointing


def test_learn_router_refuses_inference_tensor_weights_and_leaves_the_pipeline_working():
    """A pipeline loaded inside torch.inference_mode failed in training, then in restoring requires_grad: every
    parameter stayed frozen, the trainer hook stayed, and every later call failed (session 47)."""
    with torch.inference_mode():
        pipe = build_tiny("flux")
    kwargs = _call_kwargs("flux")
    with pytest.raises(ValueError, match="learn_router trains with autograd .* inference tensors"):
        learn_router(pipe, ["a cat"], budget=0.5, num_inference_steps=STEPS, epochs=1, **kwargs)
    denoiser = find_denoiser(pipe)[1]
    assert "_diffusers_hook" not in vars(denoiser) and all(p.requires_grad for p in denoiser.parameters())
    pipe("a cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **kwargs)


def test_learn_router_rejects_bad_settings_and_a_cached_pipeline():
    pipe = build_tiny("flux")
    for bad, message in [({"budget": 0}, "budget"), ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                         ({"step_weights": "loss"}, "step_weights")]:
        with pytest.raises(ValueError, match=message):
            learn_router(pipe, ["a cat"], num_inference_steps=STEPS, **bad)
    enable_cache(pipe, RouterCacheConfig(_every(4), 4))
    with pytest.raises(ValueError, match="remove_cache first"):
        learn_router(pipe, ["a cat"], num_inference_steps=STEPS)


def test_learn_router_checks_resample_before_any_run(monkeypatch):
    """resample="no" was refused by the final RouterCacheConfig, after the reference runs and the training."""
    from diffusion_accel.cache import router_learn

    def ran(*args, **kwargs):
        raise AssertionError("a calibration run started")

    monkeypatch.setattr(router_learn, "planned_calls", ran)
    with pytest.raises(ValueError, match="resample must be True or False, got 'no'"):
        learn_router(build_tiny("flux"), ["a cat"], num_inference_steps=STEPS, resample="no")


def test_a_router_saves_loads_and_compiles_beneath_its_hooks(tmp_path):
    from torch._dynamo.utils import counters

    from diffusion_accel.eval import compile_denoiser
    from diffusion_accel.eval.pipes import hooked_blocks
    from diffusion_accel.uncompiled import is_compiled

    pipe = build_tiny("flux")
    config = RouterCacheConfig(((0, 1, 2, 3), (0, 2), (1,), (0, 1, 2, 3), (), (3,)), 4, budget=0.5)
    enable_cache(pipe, config)
    eager = _images(pipe, "flux")
    save(pipe, tmp_path / "art")
    loaded = load(build_tiny("flux"), tmp_path / "art")
    assert torch.equal(_images(loaded, "flux"), eager)
    torch._dynamo.reset()
    try:
        compile_denoiser(pipe, backend="eager")  # the default: regional for a router
        blocks = [module for module, _ in hooked_blocks(pipe.transformer)]
        assert len(blocks) == 4 and all(is_compiled(block) for block in blocks)
        counters.clear()
        torch.testing.assert_close(_images(pipe, "flux"), eager, atol=1e-5, rtol=1e-5)
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_sd3s_last_block_which_returns_no_text_stream_is_reused_as_the_summary_says():
    """SD3's last block (context_pre_only) returns no text stream, so its delta has none: the router asked for one
    and recomputed the block at every step it skipped, while the summary counted it reused (until session 49)."""
    pipe = build_tiny("sd3")
    ran = [0, 0]
    for index, block in enumerate(pipe.transformer.transformer_blocks):
        block.attn.register_forward_hook(lambda module, args, output, index=index: ran.__setitem__(index, ran[index] + 1))
    enable_cache(pipe, RouterCacheConfig(computed_blocks=((0, 1), (0,), (0,), (0,)), num_blocks=2))
    pipe(**tiny_call_kwargs("sd3", steps=4))
    records = summary(pipe)["steps"]
    assert ran == [4, 1] and sum(record["computed_blocks"] for record in records) == sum(ran)
