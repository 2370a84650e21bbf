"""Transformer block caching: on reuse steps the cached blocks are bypassed and their stacked
residual (output - input of the run of blocks, per stream, from the last full step) is added.

Blocks between the first and last cached block pass their inputs through, so the last one returns
``input + residual``. With a head policy (First-Block-Cache, TeaCache) block 0 always runs and
supplies the decision signal before the remaining blocks are reached.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..arch import get_adapter
from .session import CacheSession
from .streams import BlockIO, add_streams, block_io, rel_l1, sub_streams


def stack_blocks(pipe: Any) -> list[str]:
    """All transformer blocks of the denoiser's block stacks, in execution order."""
    points = [p for p in get_adapter(pipe).cache_points() if p.kind == "block_stack"]
    if not points:
        raise ValueError("this denoiser has no transformer block stacks; use DeepCacheConfig for UNets")
    return [name for point in points for name in point.blocks]


class StackBlockHook(ModelHook):
    """One cached block: ``first`` records the stack input, ``last`` the residual; others pass through."""

    def __init__(self, session: CacheSession, key: str, io: BlockIO, first: bool, last: bool) -> None:
        super().__init__()
        self.session, self.key, self.io, self.first, self.last = session, key, io, first, last

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        if not session.active():
            return self.fn_ref.original_forward(*args, **kwargs)
        state = session.state()
        compute = session.decide() if self.first and not session.policy.uses_head else state.get("compute", True)
        inputs = self.io.inputs(args, kwargs)
        if compute:
            return self._compute(state, inputs, args, kwargs)
        streams = add_streams(inputs, state["residual"]) if self.last else inputs
        return self.io.build(state["templates"][self.key], streams)

    def _compute(self, state: dict, inputs: dict, args: tuple, kwargs: dict) -> Any:
        if self.first:
            state["stack_input"] = inputs
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.setdefault("templates", {})[self.key] = self.io.template(output)
        if self.last:
            residual = sub_streams(self.io.outputs(output), state.pop("stack_input"))
            self._note_residual_change(state, residual["hidden"])
            state["residual"], state["ready"] = residual, True
        return output

    def _note_residual_change(self, state: dict, residual: torch.Tensor | None) -> None:
        previous = state.get("residual", {}).get("hidden")
        if residual is not None and previous is not None:
            self.session.start_records_if_fresh()
            change = rel_l1(residual, previous)
            self.session.residual_changes.append((self.session.tracker.step_index,
                                                  self.session.tracker.context, change))


class HeadBlockHook(ModelHook):
    """Block 0 under a head policy: always computed; its signal decides for the other blocks."""

    def __init__(self, session: CacheSession, io: BlockIO) -> None:
        super().__init__()
        self.session, self.io = session, io

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        output = self.fn_ref.original_forward(*args, **kwargs)
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


def modulation_norm(block: nn.Module) -> nn.Module | None:
    """The block's first normalisation child (adaptive LayerNorm in Flux/SD3/DiT), or None."""
    for child in block.children():
        if "Norm" in type(child).__name__:
            return child
    return None


def check_stack(pipe: Any, uses_head: bool) -> list[str]:
    """Validate that the block stack can be cached (known block outputs, enough blocks)."""
    names = stack_blocks(pipe)
    adapter = get_adapter(pipe)
    for name in names:
        block_io(adapter.module(name))
    if uses_head and len(names) < 2:
        raise ValueError(f"a head-block policy needs at least 2 transformer blocks; this denoiser has {len(names)}")
    return names


def install_stack_cache(session: CacheSession, pipe: Any) -> None:
    """Hook the block stack for ``session.policy`` (with a computed head block if it uses one)."""
    names = check_stack(pipe, session.policy.uses_head)
    modules = [session.denoiser.get_submodule(name) for name in names]
    cached = names[1:] if session.policy.uses_head else names
    ios = [block_io(module) for module in modules]
    session.cached_blocks, session.total_blocks = tuple(cached), len(names)
    if session.policy.uses_head:
        session.hook(modules[0], HeadBlockHook(session, ios[0]))
        _capture_modulation(session, modules[0])
    offset = len(names) - len(cached)
    for index, name in enumerate(cached):
        hook = StackBlockHook(session, name, ios[offset + index], first=index == 0, last=index == len(cached) - 1)
        session.hook(modules[offset + index], hook)


def _capture_modulation(session: CacheSession, head: nn.Module) -> None:
    """For TeaCache: keep the first output tensor of the head block's first norm in the state."""
    norm = modulation_norm(head)
    if session.policy.signal != "modulated" or norm is None:
        return

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        if session.active():
            value = output if isinstance(output, torch.Tensor) else output[0]
            session.state()["modulated"] = value.detach()

    session.handles.append(norm.register_forward_hook(keep))
