"""DeepCache for UNets: on reuse steps the modules between skip ``branch`` and its decoder consumer
return their outputs from the last full step; the shallow path runs as usual.

The adapter's ``CachePoint`` for the branch lists exactly those modules (deeper down units, the mid
block, deeper up units). Replacing each with its cached output reproduces the ``deepcache`` package
numerically (it wraps the same modules) while the UNet's own forward stays untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..arch import get_adapter
from ..arch.base import CachePoint
from .computing import ComputingHook
from .forecast import linear_forecast
from .session import CacheSession
from .streams import detached


class CachedOutputHook(ComputingHook):
    """Computes and stores the module's output on full steps; returns the stored one otherwise
    (DeepCache's cached modules, encoder propagation, a transformer's final projection under
    ``forecast_target="output"``).

    The modules read the call's decision, taken when the step tracker placed the call (a step policy)
    or by the head block (a threshold policy), so a compiled denoiser breaks its graph once per call
    (in the tracker), not once per module. With
    ``config.forecast=1`` the module whose output the shallow path consumes (``forecasts``; the
    others only feed cached modules) returns the linear forecast of its output from the last two
    full steps instead (see :mod:`.forecast`).

    With ``snapshot`` the stored output is a copy taken before the caller sees it, and every reuse
    step returns a fresh copy of it: for modules whose outputs live code downstream edits in place
    (the UNet adds T2I-Adapter residuals to a down block's output with ``+=``), which would otherwise
    pile up in the stored tensors, one more per reuse step.
    """

    def __init__(self, session: CacheSession, key: str, forecasts: bool = False, snapshot: bool = False,
                 reused_levels: frozenset[int] = frozenset(), forecast_levels: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.session, self.key, self.forecasts = session, key, forecasts
        self.snapshot = snapshot
        self.reused_levels, self.forecast_levels = reused_levels, forecast_levels

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        if not session.active():
            return self.compute(*args, **kwargs)
        state = session.state()
        outputs = state.setdefault("outputs", {})
        compute = session.compute(state)
        level = None if compute else session.partial(state)
        if level is not None and level not in self.reused_levels:  # a partial step recomputes this module;
            return self.compute(*args, **kwargs)   # its store keeps the last full step's output
        enabled = getattr(session.config, "forecast", 0)
        forecast = enabled and (self.forecasts if level is None else level in self.forecast_levels)
        if compute or self.key not in outputs:
            if enabled and (self.forecasts or self.forecast_levels):  # keep the one before (None at first: the
                # state keeps one layout, one graph fewer)
                state.setdefault("previous_outputs", {})[self.key] = outputs.get(self.key)
            output = self.compute(*args, **kwargs)
            kept = detached(output)
            outputs[self.key] = clone_tensors(kept) if self.snapshot else kept
            return output
        if not forecast:
            return clone_tensors(outputs[self.key]) if self.snapshot else outputs[self.key]
        previous = state.get("previous_outputs", {}).get(self.key)
        return linear_forecast(outputs[self.key], previous, session.forecast_scale(state))


def clone_tensors(value: Any, copies: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """A copy of ``value`` (a tensor or nested tuples / lists of them) with every tensor cloned once:
    tensors that were the same object stay the same object in the copy (a down block's output sample is
    also its last skip tensor, and an in-place add must reach both, as without caching). Originals are
    matched with ``is``, not ``id()``: under torch.compile an ``id()`` becomes a guard on the object,
    which every new full step replaces (a recompile per step)."""
    copies = [] if copies is None else copies
    if isinstance(value, torch.Tensor):
        for original, copy in copies:
            if original is value:
                return copy
        copies.append((value, value.clone()))
        return copies[-1][1]
    if isinstance(value, (tuple, list)):
        items = [clone_tensors(item, copies) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def skip_branches(pipe: Any) -> list[CachePoint]:
    """The denoiser's DeepCache skip branches, shallowest first (none for a transformer)."""
    return [point for point in get_adapter(pipe).cache_points() if point.kind == "skip_branch"]


def branch_point(pipe: Any, branch: int) -> CachePoint:
    """The UNet cache point of ``branch``; ValueError listing the valid range otherwise."""
    points = skip_branches(pipe)
    if not points:
        raise ValueError("this denoiser has no UNet skip branches; DeepCache needs a UNet")
    if not 0 <= branch < len(points):
        raise ValueError(f"branch {branch} is out of range for this UNet: valid branch ids are "
                         f"0..{len(points) - 1} (0 = conv_in, the shallowest skip)")
    if not points[branch].blocks:  # the deepest skip of a UNet without a mid block: its summary said "reused"
        raise ValueError(f"branch {branch} caches nothing in this UNet: no block runs between {points[branch].down} "
                         f"and {points[branch].up} (it has no mid block); choose a shallower branch (0..{branch - 1})")
    return points[branch]


def install_branch_cache(session: CacheSession, point: CachePoint,
                         partial_points: dict[int, CachePoint] | None = None) -> None:
    """Hook every module the branch's cache replaces. ``partial_points``: the deeper branches partial steps
    reuse, by level (their modules are among the branch's; a module reused at a level whose last module it is
    feeds the shallow path there, so it forecasts on those steps)."""
    adapter = get_adapter(session.denoiser)
    partial_points = partial_points or {}
    session.cached_blocks = point.blocks
    session.total_blocks = len(adapter.blocks())
    session.partial_reused = {level: len(deeper.blocks) for level, deeper in partial_points.items()}
    state_ready = ModelHookReady(session, frozenset(partial_points))
    last = len(point.blocks) - 1  # its output feeds point.up, the only live consumer on reuse steps
    for index, name in enumerate(point.blocks):
        reused = frozenset(level for level, deeper in partial_points.items() if name in deeper.blocks)
        feeding = frozenset(level for level, deeper in partial_points.items() if name == deeper.blocks[-1])
        hook = CachedOutputHook(session, name, forecasts=index == last, reused_levels=reused,
                                forecast_levels=feeding)
        session.hook(session.denoiser.get_submodule(name), hook)
    session.hook(session.denoiser.get_submodule(point.up), state_ready)


class ModelHookReady(ModelHook):
    """On the branch's consumer resnet: after a full step the cache is complete (reuse allowed, and partial
    steps of ``partial_levels``)."""

    def __init__(self, session: CacheSession, partial_levels: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.session, self.partial_levels = session, partial_levels

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.session.active():
            state = self.session.state()
            state["ready"] = True
            if self.partial_levels and self.session.compute(state):
                state["partial_levels"] = self.partial_levels
        return output
