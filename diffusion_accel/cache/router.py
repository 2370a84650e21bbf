"""Running a learned block router (:class:`RouterCacheConfig`): per step, which blocks of a transformer stack run.

Learning-to-Cache's layer caching: a block the router skips at a step returns its fresh input plus its own
delta (output minus input, per stream) from the last step it ran, so each block is reused or recomputed on
its own rather than the whole stack at once. The policy tells the session whether a step runs every block
(a full step) and leaves the step's block set in the context's state for the block hooks; :mod:`.router_learn`
trains the decisions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from .computing import ComputingHook
from .configs import RouterCacheConfig
from .partial import few_values, scaled_timesteps
from .policies import plan_from_other_start
from .session import CacheSession
from .stack import check_stack
from .streams import STREAMS, BlockIO, add_streams, block_io, detached, sub_streams

BLOCKS_KEY = "router_blocks"  # the state entry holding the blocks that run in this call
DELTAS_KEY = "block_deltas"  # block index -> its delta streams from the last step it ran


def source_steps(config: RouterCacheConfig, num_steps: int, timesteps: list[float] | None = None) -> list[int]:
    """For each step of a ``num_steps`` call, the learned step whose decisions it takes: the one at the nearest
    noise level when ``timesteps`` (the call's) and the config's are known, else the nearest relative position
    (the same step when the schedules agree). ValueError when they differ and ``config.resample`` is False."""
    learned, start = config.num_inference_steps, config.first_step
    if timesteps is not None and config.timesteps is not None and len(timesteps) == num_steps:
        levels, wanted = scaled_timesteps(timesteps), scaled_timesteps(config.timesteps)
        relative = [step * (learned - 1) / max(num_steps - 1, 1) for step in range(num_steps)]
        # from a mid-schedule start (img2img) only the rows learned from it on: the earlier ones never ran (empty),
        # and another resolution's shift put running steps on them until session 52; earlier steps never run
        sources = [step if step < start else
                   min(range(start, learned), key=lambda source: (abs(wanted[source] - levels[step]),
                                                                  abs(source - relative[step])))
                   for step in range(num_steps)]
    else:
        sources = [round(step * (learned - 1) / max(num_steps - 1, 1)) for step in range(num_steps)]
    if sources != list(range(learned)) and not config.resample:
        raise ValueError(f"this block router was learned for {learned} denoiser steps per call on timesteps "
                         f"{few_values(config.timesteps)}; this call runs {num_steps} steps at "
                         f"{few_values(timesteps)}: learn it again for this schedule, or set resample=True to take "
                         f"each step's blocks from the nearest learned step")
    return sources


def call_plan(config: RouterCacheConfig, num_steps: int, timesteps: list[float] | None = None
              ) -> tuple[frozenset[int], ...]:
    """The blocks that run at each step of a ``num_steps`` call (step 0: every block)."""
    every = frozenset(range(config.num_blocks))
    plan = [frozenset(config.computed_blocks[source]) for source in source_steps(config, num_steps, timesteps)]
    plan[0] = every
    return tuple(plan)


def running_call_plan(config: RouterCacheConfig, num_steps: int, first_step: int) -> tuple[frozenset[int], ...]:
    """The plan of a ``num_steps`` call that runs from ``first_step``, for a router learned on calls starting at
    ``config.first_step`` > 0 (img2img) and a call of another step count or start: the learned rows from
    ``config.first_step`` on, mapped by relative position over the steps the call runs (its first: every block;
    the steps before it never run). ValueError when ``config.resample`` is False."""
    if not config.resample:
        raise ValueError(f"this block router was learned for {config.num_inference_steps} denoiser steps per call "
                         f"starting at step {config.first_step} (img2img at that strength); this call runs "
                         f"{num_steps} from step {first_step}: learn it again for these calls, or set resample=True "
                         f"to map its decisions over the steps this call runs")
    every = frozenset(range(config.num_blocks))
    view = RouterCacheConfig(config.computed_blocks[config.first_step:], config.num_blocks)
    return (every,) * first_step + call_plan(view, num_steps - first_step)


class RouterPolicy:
    """The session's policy for a router: a step computes (runs the whole stack) when it runs every block; the
    step's block set goes to ``state[BLOCKS_KEY]``. ``soft``: the trainer's gates while learning (else None)."""

    uses_head = False
    signal = None
    decides_per_block = True  # regional compilation compiles the blocks beneath their hooks (eval.compile_denoiser)

    def __init__(self, config: RouterCacheConfig) -> None:
        self.config, self.tracker, self.soft = config, None, None
        self._plan: tuple[Any, tuple[frozenset[int], ...]] | None = None  # ((steps, timesteps), plan)
        self._running: dict[tuple[int, int], tuple[frozenset[int], ...]] = {}  # (steps, first step): plan

    def bind(self, tracker: Any) -> None:
        """The session's step tracker, which knows the timesteps of the call in progress."""
        self.tracker = tracker

    def plan(self, num_steps: int | None) -> tuple[frozenset[int], ...]:
        """This call's plan; a call of unknown length (a bare denoiser) follows the learned steps as they are."""
        steps = self.config.num_inference_steps if num_steps is None else num_steps
        timesteps = self.tracker.placing_timesteps() if self.tracker is not None and num_steps is not None else None
        cached = self._plan  # read once: another thread's call may replace it meanwhile
        if cached is None or cached[0][0] != steps or cached[0][1] is not timesteps:
            values = None if timesteps is None else timesteps.tolist()
            cached = self._plan = ((steps, timesteps), call_plan(self.config, steps, values))
        return cached[1]

    def running_plan(self, step: int, num_steps: int | None, state: dict) -> tuple[frozenset[int], ...] | None:
        """``running_call_plan`` for this call when the router was learned on calls starting mid-schedule and this
        one runs another step count or starts at another step (its first step kept per context and call), else
        None (the plan over the whole trajectory)."""
        return plan_from_other_start(self.config, step, num_steps, state, self._running,
                                     lambda steps, first: running_call_plan(self.config, steps, first))

    def blocks_at(self, step: int, num_steps: int | None, state: dict | None = None) -> frozenset[int]:
        """The blocks that run at ``step`` (all of them past the plan's end); ``state``: the context's, which
        knows where the call started."""
        running = None if state is None else self.running_plan(step, num_steps, state)
        plan = self.plan(num_steps) if running is None else running
        return plan[step] if step < len(plan) else frozenset(range(self.config.num_blocks))

    def should_compute(self, step: int, num_steps: int | None, state: dict, signal: Any = None) -> bool:
        blocks = self.blocks_at(step, num_steps, state)
        state[BLOCKS_KEY] = blocks
        return len(blocks) == self.config.num_blocks

    def reused_count(self, state: dict) -> int:
        """Blocks this call reuses (for the session's step records)."""
        return self.config.num_blocks - len(state.get(BLOCKS_KEY, ()))


def _usable(delta: dict | None, inputs: dict, returned: set[str]) -> bool:
    """Whether ``delta`` can be added to ``inputs``: recorded, for every stream the block receives and returns
    (``returned``; SD3's last block returns no text stream, so it has no text delta, and it recomputed at every
    step the router skipped it while the summary counted it reused; until session 49)."""
    return delta is not None and all(inputs[name] is None or name not in returned or delta.get(name) is not None
                                     for name in STREAMS)


class RouterBlockHook(ComputingHook):
    """Block ``index`` of a routed stack: runs when the step's plan lists it (or nothing is cached for it yet)
    and records its delta; otherwise returns its inputs plus that delta."""

    repeated_block = True

    def __init__(self, session: CacheSession, key: str, io: BlockIO, index: int, num_blocks: int) -> None:
        super().__init__()
        self.session, self.key, self.io, self.index, self.num_blocks = session, key, io, index, num_blocks

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        if not session.active():
            return self.compute(*args, **kwargs)
        state = session.state()
        if session.policy.soft is not None:  # learning: the trainer mixes computed and reused outputs
            return session.policy.soft.block_forward(self, state, args, kwargs)
        inputs, deltas = self.io.inputs(args, kwargs), state.setdefault(DELTAS_KEY, {})
        delta = deltas.get(self.index)
        runs = session.compute(state) or self.index in state.get(BLOCKS_KEY, (self.index,))
        if runs or not _usable(delta, inputs, self.io.returned_streams(state.get("templates", {}).get(self.key))):
            return self._compute(state, deltas, inputs, args, kwargs)
        return self.io.build(state["templates"][self.key], add_streams(inputs, delta))

    def _compute(self, state: dict, deltas: dict, inputs: dict, args: tuple, kwargs: dict) -> Any:
        """Run the block and record its delta; the last block marks the cache ready once every block has one."""
        output = self.compute(*args, **kwargs)
        state.setdefault("templates", {})[self.key] = self.io.template(output)
        deltas[self.index] = detached(sub_streams(self.io.outputs(output), inputs))
        if self.index == self.num_blocks - 1 and len(deltas) == self.num_blocks:
            state["ready"] = True
        return output


def check_router(pipe: Any, config: RouterCacheConfig) -> list[str]:
    """The stack's block names; ValueError when the stack's length is not the router's."""
    names = check_stack(pipe, uses_head=False)
    if len(names) != config.num_blocks:
        raise ValueError(f"this block router was learned for a stack of {config.num_blocks} transformer blocks; "
                         f"{type(get_adapter(pipe).denoiser).__name__} here has {len(names)}: learn it for this model")
    return names


def install_router_cache(session: CacheSession, pipe: Any) -> None:
    """Hook every block of the stack with a :class:`RouterBlockHook`."""
    names = check_router(pipe, session.config)
    adapter = get_adapter(pipe)
    session.cached_blocks, session.total_blocks = tuple(names), len(names)
    for index, name in enumerate(names):
        hook = RouterBlockHook(session, name, block_io(adapter, name), index, len(names))
        session.hook(session.denoiser.get_submodule(name), hook)


def block_mix(gate: torch.Tensor, fresh: dict, cached: dict) -> dict:
    """``gate * fresh + (1 - gate) * cached`` per stream (the fresh stream where nothing is cached)."""
    return {name: fresh[name] if fresh[name] is None or cached.get(name) is None
            else gate * fresh[name] + (1 - gate) * cached[name] for name in STREAMS}
