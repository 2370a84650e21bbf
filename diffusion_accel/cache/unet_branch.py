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
from .forecast import linear_forecast
from .session import CacheSession
from .streams import detached


class CachedOutputHook(ModelHook):
    """Computes and stores the module's output on full steps; returns the stored one otherwise
    (DeepCache's cached modules, encoder propagation, a transformer's final projection under
    ``forecast_target="output"``).

    Only the first cached module of a call (``decides``) asks the policy; the others read its
    decision, so a compiled denoiser breaks its graph once per call, not once per module. With
    ``config.forecast=1`` the module whose output the shallow path consumes (``forecasts``; the
    others only feed cached modules) returns the linear forecast of its output from the last two
    full steps instead (see :mod:`.forecast`).

    With ``snapshot`` the stored output is a copy taken before the caller sees it, and every reuse
    step returns a fresh copy of it: for modules whose outputs live code downstream edits in place
    (the UNet adds T2I-Adapter residuals to a down block's output with ``+=``), which would otherwise
    pile up in the stored tensors, one more per reuse step.
    """

    def __init__(self, session: CacheSession, key: str, decides: bool = True, forecasts: bool = False,
                 snapshot: bool = False) -> None:
        super().__init__()
        self.session, self.key, self.decides, self.forecasts = session, key, decides, forecasts
        self.snapshot = snapshot

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        if not session.active():
            return self.fn_ref.original_forward(*args, **kwargs)
        state, step = session.state(), session.tracker.step_index
        outputs, steps = state.setdefault("outputs", {}), state.setdefault("output_steps", {})
        compute = session.decide() if self.decides else state.get("compute", True)
        forecast = self.forecasts and getattr(session.config, "forecast", 0)
        if compute or self.key not in outputs:
            if forecast and self.key in outputs:  # keep the one before only when forecasting
                state.setdefault("previous_outputs", {})[self.key] = outputs[self.key], steps[self.key]
            output = self.fn_ref.original_forward(*args, **kwargs)
            kept = detached(output)
            outputs[self.key], steps[self.key] = clone_tensors(kept) if self.snapshot else kept, step
            return output
        if not forecast:
            return clone_tensors(outputs[self.key]) if self.snapshot else outputs[self.key]
        previous, previous_step = state.get("previous_outputs", {}).get(self.key, (None, None))
        return linear_forecast(outputs[self.key], previous, steps[self.key], previous_step, step)


def clone_tensors(value: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """A copy of ``value`` (a tensor or nested tuples / lists of them) with every tensor cloned once:
    tensors that were the same object stay the same object in the copy (a down block's output sample is
    also its last skip tensor, and an in-place add must reach both, as without caching)."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.clone()
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        items = [clone_tensors(item, memo) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def branch_point(pipe: Any, branch: int) -> CachePoint:
    """The UNet cache point of ``branch``; ValueError listing the valid range otherwise."""
    points = [p for p in get_adapter(pipe).cache_points() if p.kind == "skip_branch"]
    if not points:
        raise ValueError("this denoiser has no UNet skip branches; DeepCache needs a UNet")
    if not 0 <= branch < len(points):
        raise ValueError(f"branch {branch} is out of range for this UNet: valid branch ids are "
                         f"0..{len(points) - 1} (0 = conv_in, the shallowest skip)")
    return points[branch]


def install_branch_cache(session: CacheSession, point: CachePoint) -> None:
    """Hook every module the branch's cache replaces."""
    adapter = get_adapter(session.denoiser)
    session.cached_blocks = point.blocks
    session.total_blocks = len(adapter.blocks())
    state_ready = ModelHookReady(session)
    last = len(point.blocks) - 1  # its output feeds point.up, the only live consumer on reuse steps
    for index, name in enumerate(point.blocks):
        hook = CachedOutputHook(session, name, decides=index == 0, forecasts=index == last)
        session.hook(session.denoiser.get_submodule(name), hook)
    session.hook(session.denoiser.get_submodule(point.up), state_ready)


class ModelHookReady(ModelHook):
    """On the branch's consumer resnet: after a full step the cache is complete (reuse allowed)."""

    def __init__(self, session: CacheSession) -> None:
        super().__init__()
        self.session = session

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.session.active():
            self.session.state()["ready"] = True
        return output
