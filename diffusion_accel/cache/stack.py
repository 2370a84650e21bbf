"""Transformer block caching: on reuse steps the cached blocks are bypassed and their stacked
residual (output - input of the run of blocks, per stream, from the last full step) is added.

Blocks between the first and last cached block pass their inputs through, so the last one returns
``input + residual``. With a head policy (First-Block-Cache, TeaCache) block 0 always runs and
supplies the decision signal before the remaining blocks are reached.

With ``forecast_target="output"`` the denoiser's final projection (the adapter's ``output_layer``)
is cached like a DeepCache module (``CachedOutputHook``): on reuse steps it returns its last output
or its linear forecast without computing (TaylorSeer's lite mode), so what the bypassed stack hands
to ``norm_out`` no longer matters (its residual path still runs; two elementwise ops per step).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from ..arch import BlockStreams, get_adapter
from .computing import ComputingHook
from .forecast import linear_forecast
from .session import CacheSession
from .streams import BlockIO, add_streams, block_io, detached, rel_l1, sub_streams
from .unet_branch import CachedOutputHook


def stack_blocks(pipe: Any) -> list[str]:
    """All transformer blocks of the denoiser's block stacks, in execution order."""
    points = [p for p in get_adapter(pipe).cache_points() if p.kind == "block_stack"]
    if not points:
        raise ValueError("this denoiser has no transformer block stacks; use DeepCacheConfig for UNets "
                         "(the CLI's --cache-method deepcache)")
    return [name for point in points for name in point.blocks]


class StackBlockHook(ComputingHook):
    """Cached block ``index``: block 0 (``first``) records the stack input, the ``last`` the residual; others
    pass through. A block whose index is in ``splits`` also records its input on full steps, so that a
    partial step of that level (blocks before it run) can add the delta of the blocks from it on."""

    repeated_block = True

    def __init__(self, session: CacheSession, key: str, io: BlockIO, index: int, last: bool,
                 splits: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.session, self.key, self.io, self.index, self.last = session, key, io, index, last
        self.first, self.splits = index == 0, splits

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        if not session.active():
            return self.compute(*args, **kwargs)
        state = session.state()
        compute = session.compute(state)
        inputs = self.io.inputs(args, kwargs)
        if compute:
            return self._compute(state, inputs, args, kwargs)
        level = session.partial(state)
        if level is not None and self.index < level:  # a partial step runs the blocks before its level
            return self.compute(*args, **kwargs)
        return self.io.build(state["templates"][self.key], self._reuse(state, inputs, level))

    def _reuse(self, state: dict, inputs: dict, level: int | None = None) -> dict:
        """Pass the inputs through; the last block returns the input of the first bypassed block (block 0,
        or a partial step's ``level``) + the residual of the bypassed blocks.

        That input is the one the first bypassed block received: anything the denoiser's own loop
        adds between blocks (ControlNet residuals) was part of the cached residual already, so adding the
        residual to the last block's input would count it twice."""
        if self.index == (level or 0):
            state["reuse_input"] = inputs
        if not self.last:
            return inputs
        residual = self._residual(state) if level is None else self._suffix_delta(state, level)
        return add_streams(state.pop("reuse_input", inputs), residual)

    def _residual(self, state: dict) -> dict:
        """The residual to add on a reuse step: the cached one, or its linear forecast."""
        if not getattr(self.session.config, "forecast", 0):
            return state["residual"]
        return forecast_residual(state, self.session.forecast_scale(state))

    def _suffix_delta(self, state: dict, level: int) -> dict:
        """The delta of blocks ``level`` onwards from the last full step (or its linear forecast)."""
        if not getattr(self.session.config, "forecast", 0):
            return state["suffix"][level]
        previous = state.get("previous_suffix", {}).get(level)
        return linear_forecast(state["suffix"][level], previous, self.session.forecast_scale(state))

    def _compute(self, state: dict, inputs: dict, args: tuple, kwargs: dict) -> Any:
        if self.first:
            state["stack_input"] = inputs
        if self.index in self.splits:
            state.setdefault("split_inputs", {})[self.index] = inputs
        output = self.compute(*args, **kwargs)
        state.setdefault("templates", {})[self.key] = self.io.template(output)
        if self.last:
            stack_input, split_inputs = state.pop("stack_input", None), state.pop("split_inputs", {})
            if stack_input is None:  # the first cached block did not run (SD3's skip-layer guidance pass): no
                return output        # residual to record, and with no decision made every block computes
            outputs = self.io.outputs(output)
            residual = sub_streams(outputs, stack_input)
            if self.session.record_residuals:
                self._note_residual_change(state, residual["hidden"])
            if getattr(self.session.config, "forecast", 0):  # keep the one before only when forecasting
                state["previous_residual"] = state.get("residual")
                state["previous_suffix"] = state.get("suffix", {})
            state["residual"], state["ready"] = detached(residual), True
            if self.splits:
                self._record_suffixes(state, outputs, split_inputs)
        return output

    def _record_suffixes(self, state: dict, outputs: dict, split_inputs: dict) -> None:
        """Deltas (stack output minus block input) of the split blocks that ran; their levels may be partial."""
        state["suffix"] = {level: detached(sub_streams(outputs, inputs)) for level, inputs in split_inputs.items()}
        state["partial_levels"] = frozenset(state["suffix"])

    def _note_residual_change(self, state: dict, residual: torch.Tensor | None) -> None:
        previous = state.get("residual", {}).get("hidden")
        if residual is not None and previous is not None:
            self.session.start_records_if_fresh()
            change = rel_l1(residual, previous)
            self.session.residual_changes.append((self.session.tracker.step_index,
                                                  self.session.tracker.context, change))


def forecast_residual(state: dict, scale: torch.Tensor | None) -> dict:
    """First-order forecast of the stack residual, r1 + (r1 - r0) * scale per stream (``scale`` from
    ``forecast.forecast_scale``); the cached residual if only one full step exists."""
    return linear_forecast(state["residual"], state.get("previous_residual"), scale)


def output_layer(pipe: Any, config: Any) -> str | None:
    """The final projection an output-forecasting ``config`` hooks (None for residual caches);
    ValueError when the denoiser's adapter knows none."""
    if getattr(config, "forecast_target", "residual") != "output":
        return None
    name = get_adapter(pipe).output_layer()
    if name is None:
        raise ValueError(f"forecast_target='output' needs a transformer denoiser with a known final projection; "
                         f"{type(get_adapter(pipe).denoiser).__name__} has none (use forecast_target='residual')")
    return name


class HeadBlockHook(ComputingHook):
    """Block 0 under a head policy: always computed; its signal decides for the other blocks."""

    repeated_block = True

    def __init__(self, session: CacheSession, io: BlockIO) -> None:
        super().__init__()
        self.session, self.io = session, io

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        output = self.compute(*args, **kwargs)
        if session.active():
            state = session.state()
            session.decide(self._signal(state, args, kwargs, output))
        return output

    def _signal(self, state: dict, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        if self.session.policy.signal == "modulated" and "modulated" in state:
            return state.pop("modulated")
        hidden_in = self.io.inputs(args, kwargs)["hidden"]
        if self.session.policy.signal == "modulated":
            return hidden_in
        return self.io.outputs(output)["hidden"] - hidden_in


def partial_levels(config: Any) -> list[int]:
    """The partial-step levels a config uses (a calibrated schedule's; none for the other methods)."""
    return sorted({level for _, level in getattr(config, "partial_steps", ())})


def check_stack(pipe: Any, uses_head: bool) -> list[str]:
    """Validate that the block stack can be cached (known block outputs, enough blocks)."""
    names = stack_blocks(pipe)
    adapter = get_adapter(pipe)
    for name in names:
        block_io(adapter, name)
    if uses_head and len(names) < 2:
        raise ValueError(f"a head-block policy needs at least 2 transformer blocks; this denoiser has {len(names)}")
    return names


def install_stack_cache(session: CacheSession, pipe: Any) -> None:
    """Hook the block stack for ``session.policy`` (with a computed head block if it uses one; a calibrated
    schedule's partial levels split it)."""
    names = check_stack(pipe, session.policy.uses_head)
    adapter = get_adapter(pipe)
    modules = [session.denoiser.get_submodule(name) for name in names]
    cached = names[1:] if session.policy.uses_head else names
    ios = [block_io(adapter, name) for name in names]
    session.cached_blocks, session.total_blocks = tuple(cached), len(names)
    if session.policy.uses_head:
        session.hook(modules[0], HeadBlockHook(session, ios[0]))
        if session.policy.signal == "modulated":
            _capture_modulation(session, modules[0], adapter.block_streams(names[0]))
    offset = len(names) - len(cached)
    splits = frozenset(partial_levels(session.config))
    session.partial_reused = {level: len(cached) - level for level in splits}
    for index, name in enumerate(cached):
        hook = StackBlockHook(session, name, ios[offset + index], index, index == len(cached) - 1, splits)
        session.hook(modules[offset + index], hook)
    final = output_layer(pipe, session.config)
    if final is not None:  # a leaf layer peft may wrap: the hook follows it
        session.hook_named(final, partial(CachedOutputHook, key=final, forecasts=True))


class ModulationKeeper:
    """Torch hooks for TeaCache: store the head block's timestep-modulated input in the state."""

    def __init__(self, session: CacheSession) -> None:
        self.session = session

    def keep(self, value: Any) -> None:
        """Store ``value`` (a tensor) for the head block hook to pick up in this call."""
        if self.session.active() and isinstance(value, torch.Tensor):
            self.session.state()["modulated"] = value.detach()

    def from_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.keep(output if isinstance(output, torch.Tensor) else output[0])

    def from_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.keep(kwargs.get("hidden_states", args[0] if args else None))


def _capture_modulation(session: CacheSession, head: nn.Module, streams: BlockStreams) -> None:
    """Hook the submodule the adapter names as carrying the modulated input (output or input side)."""
    if streams.modulated is None:
        return  # no modulated input known: the policy falls back to the block's input
    source, keeper = head.get_submodule(streams.modulated), ModulationKeeper(session)
    if streams.modulated_from == "output":
        handle = source.register_forward_hook(keeper.from_output)
    else:
        handle = source.register_forward_pre_hook(keeper.from_input, with_kwargs=True)
    session.handles.append(handle)
