"""Learning a block router: which transformer blocks run at which step (Learning-to-Cache's router, trained the
way HarmoniCa trains it), for a budget of block FLOPs.

Each (step, block) pair has a gate ``sigmoid((logit + shift) / temperature)`` that mixes the block's fresh delta
(output minus input) with its cached one, ``gate * fresh + (1 - gate) * cached``; the mixture is the block's
output (added to its input) and its cache from then on (a gate of 1 refreshes it, 0 keeps it), so the soft
router runs the hard router's recurrence. Training follows HarmoniCa:

- *step-wise denoising training*: the pipeline samples its own trajectory with the soft router in the loop (the
  inputs of later steps carry the router's earlier errors, as at inference) and every denoiser call is compared
  with the uncached denoiser on the same input. The latents are cut between calls, the caches are not: a step's
  decision is credited with the later steps' errors its stale or fresh cache causes;
- *an image-error proxy*: each step's error is weighted by how far the final outputs move when that step's
  decision flips in the current hard router (first the uncached model, then remeasured every PROXY_EPOCHS
  epochs), so steps whose reuse the image feels weigh more than the per-step noise error says.

The shared ``shift`` holds the gates' expected block FLOPs at the budget after every update, so training only
moves compute between (step, block) pairs; a gradient step moves the logit with the largest gradient by ``lr``
and the others in proportion (per-parameter normalisers such as Adam's moved every gate pushed the same way
alike, and the shift undid it). The temperature falls to FINAL_TEMPERATURE, so the gates end near 0 or 1, and
the hard router takes the most open gates that fit the budget.

Development probes on fashion-flux (10 of 28 steps' block FLOPs, the benchmark's 4 calibration and 20 held-out
prompts; final-latent error vs uncached, calibration / held-out; session 37): this recipe 0.095 / 0.096 (the
benchmark's row; 40 epochs 0.084 / 0.087; uniform block caching 0.163 / 0.185, the schedule search
0.048 / 0.053). Worse: Adam on the
logits with a dual-ascent FLOP price 0.23 / 0.25 (Adam moved every consistently pushed gate alike); sampled
straight-through hard decisions 0.29-0.47; without temperature decay 0.12 / 0.14, and with the proxy measured
once as well 0.10 / 0.11; a final temperature of 0.05 0.099 / 0.105; ``lr`` 1.0 0.095 / 0.101; the weighted errors
summed over the trajectory before squaring (a linearised final error) 0.15 / 0.17; uniform step weights
0.12 / 0.15 (probe) and 0.108 / 0.139 (benchmark). Warm-started from the search's schedule (its full steps'
logits at +m, the rest at -m; m = 0.3, 1 or 3; 10 epochs; session 38) the training kept that schedule exactly
(0.048 / 0.053): the gradient moves no block across it, so a warm start adds nothing over the search itself.

Only transformer block stacks are routed (UNets: use :func:`calibrate_schedule`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..arch import find_denoiser
from ..arch.registry import check_no_inference_weights
from ..calib import denoiser_steps
from ..hooks import get_tracker, remove_hook_keeping_later
from ..progress import progress_counter, progress_shown, showing_progress
from ..scalars import plain_number
from .apply import enable_cache, remove_cache
from .calibrated import cached_outputs, recorded_timesteps, steps_that_run
from .configs import RouterCacheConfig, _check_float, check_int
from .partial import flop_shares
from .router import block_mix
from .runs import final_outputs, planned_calls
from .session import drop_empty_registry, get_session
from .stack import check_stack
from .streams import add_streams, sub_streams

TRAINER_HOOK_NAME = "diffusion_accel.cache.router_trainer"
STEP_WEIGHTS = ("final", "uniform")
FINAL_TEMPERATURE = 0.2  # the gates' temperature at the last epoch (1 at the first, geometric in between)
PROXY_EPOCHS = 5  # epochs between measurements of the image-error proxy


class SoftGates(nn.Module):
    """The trainable router: ``logits`` (steps x blocks), the ``shift`` holding the gates' expected block FLOPs at
    ``budget`` and the ``temperature``; the blocks' forward while learning and the pipeline call's loss."""

    def __init__(self, num_steps: int, block_costs: list[float], budget: float,
                 ran_steps: list[int] | None = None) -> None:
        super().__init__()
        ran_steps = sorted(ran_steps) if ran_steps else list(range(num_steps))
        learned = torch.zeros(num_steps)
        learned[ran_steps[1:]] = 1.0  # the first step that runs computes every block (nothing is cached yet)
        self.logits = nn.Parameter(torch.zeros(num_steps, len(block_costs)))
        self.register_buffer("block_costs", torch.tensor(block_costs))
        self.register_buffer("learned_steps", learned)  # 1 at the steps whose gates are learned
        self.register_buffer("step_weights", learned.clone())
        self.running_steps = len(ran_steps)
        self.budget, self.teacher_pass, self.shift, self.temperature = budget, False, 0.0, 1.0
        self.losses: list[torch.Tensor] = []  # this pipeline call's weighted step errors, backpropagated together
        self.fit_shift()

    def probabilities(self, shift: float | None = None) -> torch.Tensor:
        """Every gate's value (steps x blocks), step 0's included (it always runs)."""
        return torch.sigmoid((self.logits + (self.shift if shift is None else shift)) / self.temperature)

    def expected_budget(self, shift: float | None = None) -> float:
        """Block FLOPs of the gates (the first step that runs computes all) as a fraction of every block at every
        step that runs."""
        with torch.no_grad():
            open_share = (self.probabilities(shift) * self.block_costs * self.learned_steps[:, None]).sum()
            return float((1.0 + open_share) / self.running_steps)

    def fit_shift(self) -> None:
        """Bisect the shared shift so that the gates' expected FLOPs equal the budget."""
        low, high = -60.0, 60.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if self.expected_budget(middle) < self.budget else (low, middle)
        self.shift = (low + high) / 2

    def gate(self, step: int, index: int) -> torch.Tensor | None:
        """The gate of block ``index`` at ``step`` (None at the first step that runs, at steps that never run and
        past the learned steps: the block runs)."""
        if not 0 <= step < self.logits.shape[0] or not self.learned_steps[step]:
            return None
        return torch.sigmoid((self.logits[step, index] + self.shift) / self.temperature)

    def block_forward(self, hook: Any, state: dict, args: tuple, kwargs: dict) -> Any:
        """A routed block while learning: the teacher pass computes plainly; the student's output is the block's
        input plus the gate's mixture of its fresh and cached deltas, which becomes the block's cache (kept with
        its graph until the pipeline call ends)."""
        output = hook.compute(*args, **kwargs)
        if self.teacher_pass:
            return output
        inputs = hook.io.inputs(args, kwargs)
        fresh = sub_streams(hook.io.outputs(output), inputs)
        deltas = state.setdefault("soft_deltas", {})
        gate = self.gate(hook.session.tracker.step_index, hook.index)
        cached = deltas.get(hook.index)
        mixed = fresh if gate is None or cached is None else block_mix(gate, fresh, cached)
        deltas[hook.index] = mixed
        return hook.io.build(hook.io.template(output), add_streams(inputs, mixed))

    def add_call_loss(self, step: int, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Keep one denoiser call's relative squared error, weighted by its step's image-error proxy."""
        weight = self.step_weights[step] if step < len(self.step_weights) else 0.0
        error = (student.float() - teacher.float()).pow(2).sum() / teacher.float().pow(2).sum().clamp_min(1e-12)
        if error.requires_grad:
            self.losses.append(weight * error)

    def backward(self) -> None:
        """Backpropagate the pipeline call's losses into the logits."""
        if self.losses:
            with torch.enable_grad():  # called between pipeline calls, inside the runs' no_grad
                torch.stack(self.losses).sum().backward()
        self.losses = []

    def descend(self, lr: float) -> None:
        """A gradient step moving the logit with the largest gradient by ``lr``, the others in proportion."""
        grad = self.logits.grad
        if grad is not None:
            with torch.no_grad():
                self.logits -= lr * grad / grad.abs().max().clamp_min(1e-30)
            self.logits.grad = None


def _first_tensor(output: Any) -> torch.Tensor:
    """The denoiser's prediction in ``output`` (a tensor, a tuple's first item, or an output dataclass's)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return next(iter(output.values()))


def _detached_output(output: Any) -> Any:
    """``output`` with its tensors detached, in its own type (a diffusers output dataclass stays one)."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detached_output(item) for item in output)
    if isinstance(output, dict):
        return type(output)(**{key: _detached_output(value) for key, value in output.items()})
    return output


class TrainerHook(ModelHook):
    """On the denoiser, beneath the step tracker (which places each call): runs the uncached teacher and the
    soft student on the call's input, backpropagates the call's loss into the gates and hands the pipeline
    the student's prediction, so that the trajectory is the router's own."""

    def __init__(self, gates: SoftGates) -> None:
        super().__init__()
        self.gates = gates

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        gates, tracker = self.gates, get_tracker(module)
        with torch.no_grad():
            gates.teacher_pass = True
            try:
                teacher = self.fn_ref.original_forward(*args, **kwargs)
            finally:
                gates.teacher_pass = False
        with torch.enable_grad():
            student = self.fn_ref.original_forward(*args, **kwargs)
            gates.add_call_loss(tracker.step_index, _first_tensor(student), _first_tensor(teacher))
        return _detached_output(student)


@contextmanager
def training_hooks(pipe: Any, denoiser: nn.Module, gates: SoftGates, num_steps: int, num_blocks: int
                   ) -> Iterator[None]:
    """The trainer hook (registered before the cache attaches the tracker, so the tracker wraps it) and a
    router computing every block with ``gates`` in charge; the denoiser's parameters frozen and diffusers' gradient
    checkpointing off (its recomputation ran the router's stateful block hooks again: "A different number of tensors
    was saved during the original forward and recomputation"). All undone after."""
    trainable = [parameter for parameter in denoiser.parameters() if parameter.requires_grad]
    checkpointing = [module for module in denoiser.modules()
                     if getattr(module, "gradient_checkpointing", False) is True]
    HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(TrainerHook(gates), TRAINER_HOOK_NAME)
    try:
        for module in checkpointing:
            module.gradient_checkpointing = False
        for parameter in trainable:
            parameter.requires_grad_(False)
        every = RouterCacheConfig(tuple(tuple(range(num_blocks)) for _ in range(num_steps)), num_blocks)
        enable_cache(pipe, every)
        get_session(denoiser).policy.soft = gates
        yield
    finally:
        remove_cache(pipe)
        for parameter in trainable:
            parameter.requires_grad_(True)
        for module in checkpointing:
            module.gradient_checkpointing = True
        registry = getattr(denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(TRAINER_HOOK_NAME) is not None:
            remove_hook_keeping_later(registry, TRAINER_HOOK_NAME)
            drop_empty_registry(denoiser)


def image_error_weights(pipe: Any, routed: tuple[tuple[int, ...], ...], num_blocks: int, calls: list,
                        references: list, learned_steps: list[int]) -> list[float]:
    """HarmoniCa's image-error proxy for the hard router ``routed`` (per step, the blocks that run): per learned
    step, how far the final outputs move when that step's decision flips (every block runs where some were
    reused, none where all ran), relative to the uncached outputs; scaled to mean 1 over ``learned_steps`` (the
    first step that runs, and steps that never run: 0). All zero (no step moves the output): uniform weights."""
    every = tuple(range(num_blocks))
    base = cached_outputs(pipe, RouterCacheConfig(routed, num_blocks), calls)
    weights = [0.0] * len(routed)
    for step in learned_steps:
        flipped = routed[:step] + (() if routed[step] == every else every,) + routed[step + 1:]
        outputs = cached_outputs(pipe, RouterCacheConfig(flipped, num_blocks), calls)
        weights[step] = sum(float(torch.linalg.vector_norm(out - ref_base) / torch.linalg.vector_norm(ref)
                                  .clamp_min(1e-12)) for out, ref_base, ref in zip(outputs, base, references)
                            ) / len(calls)
    mean = sum(weights) / max(len(learned_steps), 1)
    if mean > 0:
        return [weight / mean for weight in weights]
    return [1.0 if step in learned_steps else 0.0 for step in range(len(routed))]


def cut_to_budget(probabilities: torch.Tensor, costs: list[float], budget: float,
                  ran_steps: list[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """Hard decisions from learned gate ``probabilities`` (steps x blocks): step 0 and the first of ``ran_steps``
    (the steps a call runs; default all) run every block, then (step, block) pairs of the other steps that run
    in order of decreasing probability while their FLOPs fit in ``budget`` (a fraction of every block at every
    step that runs). Steps that never run (before an img2img call's start) reuse every block."""
    num_steps, num_blocks = probabilities.shape
    ran_steps = sorted(ran_steps) if ran_steps else list(range(num_steps))
    allowance = budget * len(ran_steps) - 1.0
    chosen: list[set[int]] = [set() for _ in range(num_steps)]
    chosen[0], chosen[ran_steps[0]] = set(range(num_blocks)), set(range(num_blocks))
    order = sorted(((float(probabilities[step, index]), -step, index) for step in ran_steps[1:]
                    for index in range(num_blocks)), reverse=True)
    for _, negative_step, index in order:
        if costs[index] <= allowance + 1e-9:
            chosen[-negative_step].add(index)
            allowance -= costs[index]
    return tuple(tuple(sorted(blocks)) for blocks in chosen)


def check_learning_settings(**settings: Any) -> None:
    """ValueError naming the first bad one of the given ``learn_router`` settings (``budget``, ``epochs``, ``lr``,
    ``step_weights``, ``resample``); settings not given are not checked."""
    if "budget" in settings:
        _check_float("budget", settings["budget"], 0.0, inclusive=False)
        if settings["budget"] > 1.0:
            raise ValueError(f"budget is a fraction of the stack's block FLOPs in (0, 1], got {settings['budget']!r}")
    if "epochs" in settings:
        check_int("epochs", settings["epochs"], 1)
    if "lr" in settings:
        _check_float("lr", settings["lr"], 0.0, inclusive=False)
    if "resample" in settings:  # checked by RouterCacheConfig too, but only after the training
        RouterCacheConfig(((0,),), 1, resample=settings["resample"])
    if settings.get("step_weights", "final") not in STEP_WEIGHTS:
        raise ValueError(f"step_weights must be one of {STEP_WEIGHTS} ('final': HarmoniCa's final-image error "
                         f"proxy, 'uniform': every step alike), got {settings['step_weights']!r}")


@torch.inference_mode(False)  # it trains gates with autograd, which inference_mode forbids
def learn_router(pipe: Any, prompts: Any, budget: float = 0.4, num_inference_steps: int = 28, *, epochs: int = 20,
                 lr: float = 0.3, seed: int = 0, batch_size: int = 1, step_weights: str = "final",
                 resample: bool = True, progress: bool = False, **call_kwargs: Any) -> RouterCacheConfig:
    """A :class:`RouterCacheConfig` for ``pipe``'s transformer stack, learned on ``prompts`` (see the module doc)
    for ``budget``: block FLOPs as a fraction of every block at every step a call runs (the first included, which
    runs them all; an img2img call's skipped early steps are not counted).

    ``epochs``: passes over the calibration calls (a gradient step per pipeline call; each call costs about four
    uncached ones: teacher, student and its backward); ``lr``: how far the logit with the largest gradient moves
    per step (the others in proportion); ``step_weights``: "final" weighs each step's error by HarmoniCa's
    image-error proxy (measured before every PROXY_EPOCHS epochs: one pipeline run per step and calibration
    call each time), "uniform" weighs all steps alike; ``seed``, ``batch_size`` and ``call_kwargs`` as in
    :func:`calibrate_schedule`; ``resample``: whether another step count or schedule may use it; ``progress``: a
    bar counting the training calls. The trained denoiser's parameters are left as they were (frozen while
    learning, no gradients kept). Memory: the blocks' autograd graphs of one pipeline call are kept until it
    ends (the caches carry them across steps), about what training through the whole trajectory would keep:
    small for the zoo, many GB for a FLUX-size model at full resolution (use fewer steps or a smaller size)."""
    budget, num_inference_steps, epochs, lr, seed, batch_size = (
        plain_number(value) for value in (budget, num_inference_steps, epochs, lr, seed, batch_size))
    check_learning_settings(budget=budget, epochs=epochs, lr=lr, step_weights=step_weights, resample=resample)
    denoiser = find_denoiser(pipe)[1]
    if get_session(denoiser) is not None:
        raise ValueError("learn_router needs a pipeline without a cache; call remove_cache first")
    check_no_inference_weights(denoiser, "learn_router")
    names = check_stack(pipe, uses_head=False)  # UNets: a clear error, before anything runs
    num_steps = denoiser_steps(pipe, num_inference_steps, call_kwargs.get("timesteps"),  # Heun: 2N - 1 calls
                               call_kwargs.get("sigmas"))  # custom schedules set their own length
    calls = planned_calls(pipe, prompts, num_inference_steps, seed=seed, batch_size=batch_size, **call_kwargs)
    with recorded_timesteps(pipe) as timesteps:
        references = final_outputs(pipe, calls)
    costs = list(flop_shares(pipe, names, lambda: final_outputs(pipe, calls[:1])).values())
    routed = tuple(tuple(range(len(names))) for _ in range(num_steps))  # the proxy starts from the uncached model
    ran = steps_that_run(pipe, RouterCacheConfig(routed, len(names)), calls)  # img2img: from its start
    gates = SoftGates(num_steps, costs, budget, ran)
    for first in range(0, epochs, PROXY_EPOCHS):
        if step_weights == "final":
            gates.step_weights = torch.tensor(image_error_weights(pipe, routed, len(names), calls, references,
                                                                  ran[1:]))
        _train(pipe, denoiser, gates, calls, range(first, min(first + PROXY_EPOCHS, epochs)), epochs, lr, progress)
        routed = cut_to_budget(gates.probabilities().detach(), costs, budget, ran)
    return RouterCacheConfig(routed, len(names), budget=budget, resample=resample, first_step=ran[0],
                             timesteps=tuple(timesteps) if len(timesteps) == num_steps else None)


def _train(pipe: Any, denoiser: nn.Module, gates: SoftGates, calls: list, epochs: range, total_epochs: int, lr: float,
           progress: bool) -> None:
    """The ``epochs`` (of ``total_epochs``) over ``calls`` with the soft router in the loop; a gradient step on the
    gates after each call."""

    def step_gates() -> None:
        gates.backward()
        gates.descend(lr)
        gates.fit_shift()

    with (showing_progress(progress or progress_shown()), progress_counter("router training", "call") as trained,
          training_hooks(pipe, denoiser, gates, *gates.logits.shape)):
        for epoch in epochs:
            gates.temperature = FINAL_TEMPERATURE ** (epoch / max(total_epochs - 1, 1))
            gates.fit_shift()
            final_outputs(pipe, calls, before_call=lambda index: (step_gates(), trained()) if index else None)
            step_gates()
            trained()
