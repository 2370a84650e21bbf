"""Faster Diffusion encoder propagation for UNets.

On key steps the whole UNet runs and the outputs of its encoder modules (the adapter's
``encoder_cache_point()``: input conv, down blocks, mid block) are kept; on the other steps those
modules return the kept outputs — every skip tensor and the mid output — and only the decoder runs,
with the current timestep embedding. Prior-noise injection adds a fraction of the denoiser's step-0
input (the initial noise) to the prediction of non-key steps late in the trajectory.
"""

from __future__ import annotations

from functools import partial

import inspect
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.base import CachePoint
from ..hooks import PER_CALL
from .configs import EncoderPropagationConfig
from .schedules import resample_full_steps, uniform_full_steps
from .session import CacheSession
from .unet_branch import CachedOutputHook, ModelHookReady


def key_steps(config: EncoderPropagationConfig, num_steps: int) -> list[int]:
    """The key (full UNet) steps of a ``num_steps`` trajectory: uniform, or the given list resampled."""
    if config.key_steps is None:
        return uniform_full_steps(num_steps, config.interval)
    return resample_full_steps(config.key_steps, config.num_inference_steps, num_steps)


def encoder_point(pipe: Any) -> CachePoint:
    """The adapter's UNet encoder; ValueError for denoisers without one (transformers)."""
    point = get_adapter(pipe).encoder_cache_point()
    if point is None:
        raise ValueError("this denoiser has no UNet encoder; encoder propagation needs a UNet "
                         "(use DeltaCacheConfig or BlockCacheConfig for transformers)")
    return point


def install_encoder_cache(session: CacheSession, point: CachePoint, config: EncoderPropagationConfig) -> None:
    """Hook every encoder module (they follow the call's decision), the decoder's first block (cache
    complete) and, with noise injection, the denoiser's output."""
    adapter = get_adapter(session.denoiser)
    inside = tuple(f"{name}." for name in point.blocks)
    session.cached_blocks = tuple(info.name for info in adapter.blocks() if info.name.startswith(inside))
    session.total_blocks = len(adapter.blocks())
    for name in point.blocks:  # named: a LoRA wrapping conv_in (a leaf) gets the hook, as in _follow_replaced_modules
        session.hook_named(name, partial(CachedOutputHook, key=name, snapshot=True))  # the decoder is live
    session.hook(session.denoiser.get_submodule(point.up), ModelHookReady(session))
    if config.noise_injection > 0:
        injection = PriorNoiseInjection(session, config.noise_injection, config.injection_start)
        session.handles.append(session.denoiser.register_forward_hook(injection, with_kwargs=True))


class PriorNoiseInjection:
    """Forward hook on the denoiser: keeps its step-0 input per context (the prior noise) and adds
    ``strength`` times it to the output of non-key steps from ``start`` of the trajectory on. A call
    that starts mid-schedule (img2img) never sees step 0: its first input is a noised image, not
    the prior noise, so nothing is injected; nor where the scheduler shortened the schedule itself
    (LCM / TCD img2img: step 0 below the noisiest training timestep). The prior noise is kept for the whole
    call (``PER_CALL``: a batch halved mid-call by a CFG cutoff takes its last rows); of an input with more
    channels than the prediction (inpainting's mask and masked image, an upscaler's low-res image) the
    leading ones, the noise latents, are kept; a prediction with more channels (learned variance) gets it on
    its leading ones.

    Runs after the step tracker's post-forward, whose step index and context still describe the
    call that just finished.
    """

    def __init__(self, session: CacheSession, strength: float, start: float) -> None:
        self.session, self.strength, self.start = session, strength, start
        parameters = list(inspect.signature(type(session.denoiser).forward).parameters)
        self.sample_arg = parameters[1] if len(parameters) > 1 else None  # the noisy input, after self

    @torch.compiler.disable  # reads step numbers: out of compiled graphs, as the tracker (after the denoiser's graph)
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state, step = self.session.state(), self.session.tracker.step_index
        kept = state.setdefault(PER_CALL, {})
        if step == 0:
            sample = args[0] if args else kwargs.get(self.sample_arg)
            starts_from_noise = isinstance(sample, torch.Tensor) and not self._schedule_shortened()
            kept["prior_noise"] = sample.detach() if starts_from_noise else None
            return None
        if not self._injects(state, step):
            return None
        return add_to_prediction(output, self.strength * kept["prior_noise"])

    def _injects(self, state: dict, step: int) -> bool:
        """True on a reused step at or after the injection start, with the prior noise known."""
        num_steps = self.session.tracker.num_inference_steps
        reused = not self.session.compute(state)
        late = num_steps is not None and step >= self.start * num_steps
        return reused and late and state.get(PER_CALL, {}).get("prior_noise") is not None

    def _schedule_shortened(self) -> bool:
        """Whether this call's step 0 is not the start of a sampling trajectory: a scheduler that shortens its
        own schedule for img2img (``set_timesteps(strength=...)``: LCM, TCD) starting below its noisiest
        training timestep. A pipeline whose call takes no ``strength`` starts from the prior noise whatever its
        first timestep: LCM's text-to-image at ``original_inference_steps=30`` starts at 989, and injected nothing
        until session 45."""
        pipeline = self.session.tracker.pipeline
        call = getattr(type(pipeline), "__call__", None) if pipeline is not None else None
        if call is not None and "strength" not in inspect.signature(call).parameters:
            return False
        scheduler = getattr(pipeline, "scheduler", None)
        set_timesteps = getattr(scheduler, "set_timesteps", None)
        if set_timesteps is None or "strength" not in inspect.signature(set_timesteps).parameters:
            return False
        timestep, train_steps = self.session.tracker.timestep, scheduler.config.get("num_train_timesteps")
        return timestep is not None and train_steps is not None and timestep < train_steps - 1


def add_to_prediction(output: Any, delta: torch.Tensor) -> Any:
    """``output`` with ``delta`` added to its first tensor (a tensor, a tuple or a diffusers output): over their
    common leading channels (dim 1), to the last rows of a larger ``delta`` batch (a CFG batch cut to its
    conditional half); None (output unchanged) when the rest of the shapes differ."""
    first = output if isinstance(output, torch.Tensor) else output[0]
    if not isinstance(first, torch.Tensor) or first.dim() != delta.dim() or first.dim() < 2:
        return None
    channels = min(first.shape[1], delta.shape[1])
    delta = delta[-first.shape[0]:, :channels]
    if first.shape[:1] + first.shape[2:] != delta.shape[:1] + delta.shape[2:]:
        return None
    delta = delta.to(first.dtype)
    if channels == first.shape[1]:
        updated = first + delta
    else:
        updated = torch.cat([first[:, :channels] + delta, first[:, channels:]], dim=1)
    if isinstance(output, torch.Tensor):
        return updated
    if isinstance(output, tuple):
        return (updated, *output[1:])
    values = dict(output.items())
    values[next(iter(values))] = updated
    return type(output)(**values)
