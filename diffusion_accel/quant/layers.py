"""Simulated quantized layers registered in place of Linear / Conv2d, and activation quantizers.

``QuantLinear`` / ``QuantConv2d`` hold the integer (or fp8) weight codes and per-segment scales as
buffers and dequantize on the fly; they keep the original interface (``in_features``,
``out_channels``, ``weight``, ``bias``, ...). Activations go through an ``ActQuantizer`` (static,
optionally one scale per timestep group and per channel segment) or a ``DynamicActQuantizer``.
"""

from __future__ import annotations

import abc
import functools
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import get_tracker
from .formats import get_format
from .quantizers import (dequantize_weight, dynamic_qparams, expand_segments, fake_quant_act, in_float32,
                         scale_floor, tensor_qparams)


class StepGroups:
    """Maps the denoiser call in progress to one of ``groups`` equal slices of the calibrated trajectory.

    With ``bounds`` (timestep values between consecutive groups, descending; ``timestep_bounds``) the
    group is chosen by the call's timestep, i.e. by noise level: a run whose timesteps are spread
    otherwise than the calibration's (custom ``timesteps``, PNDM's warm-up, Heun's two calls per
    step) gets the scales calibrated at its noise level. By position in the run's schedule, as before
    session 28, such runs used scales of other noise levels (custom high-noise timesteps: 2.3 dB
    below a single group). Without bounds (no timesteps recorded; artifacts saved before) or without
    a timestep argument, by position. Reading the timestep waits for the device once per call.

    Holds a plain (strong) reference to the denoiser so that ``copy.deepcopy`` of a quantized
    denoiser gives a copy whose selector reads the copy's tracker.
    """

    def __init__(self, denoiser: nn.Module, groups: int, default_steps: int,
                 bounds: Sequence[float] | None = None) -> None:
        self.denoiser = denoiser
        self.groups, self.default_steps = groups, default_steps
        self.bounds = None if bounds is None else tuple(float(bound) for bound in bounds)
        self.active = 0  # the group of the latest denoiser call (``note_call``): what compiled graphs read
        self._forced = threading.local()

    @property
    def forced(self) -> int | None:
        """The group this thread's calls take whatever their timestep (None: chosen per call): set by block
        reconstruction, which calls blocks outside any denoiser call, and around a block whose backward recomputes
        it. Per thread: shared, one thread's training call moved another's inference to its group (session 48)."""
        return getattr(self._forced, "group", None)

    @forced.setter
    def forced(self, group: int | None) -> None:
        self._forced.group = group

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        del state["_forced"]  # a threading.local: a deep copy starts with none forced
        return state

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._forced = threading.local()

    def group_of_timestep(self, timestep: float) -> int:
        """Group of a call at ``timestep``: the number of group bounds above it."""
        return sum(1 for bound in self.bounds if timestep < bound)

    def group_of(self, step_index: int, num_steps: int | None = None) -> int:
        """Group of ``step_index`` in a trajectory of ``num_steps`` (default: the calibration's)."""
        steps = max(num_steps or self.default_steps, 1)
        return min(self.groups - 1, max(step_index, 0) * self.groups // steps)

    def group_of_call(self, step_index: int, timestep: float | None, num_steps: int | None = None) -> int:
        """Group of a denoiser call: by ``timestep`` against the bounds when both exist, else by position.
        Calibration files each step's ranges with this too (``group_ranges``), so that Heun's two calls at one
        timestep share the group the run picks (by position, an edge between them filed the second call's
        ranges into the next group while the run gave it the previous group's scales)."""
        if self.bounds is not None and timestep is not None:
            return self.group_of_timestep(timestep)
        return self.group_of(step_index, num_steps)

    def current_index(self) -> int:
        """The group of the denoiser call in progress (0 without a tracker); ``forced`` when set."""
        if self.forced is not None:
            return self.forced
        tracker = get_tracker(self.denoiser)
        if tracker is None:
            return 0
        return self.group_of_call(tracker.step_index, tracker.timestep, tracker.num_inference_steps)

    def note_call(self) -> None:
        """Step-tracker callback at each denoiser call: store its group in ``active``. Compiled graphs read
        that plain int (dynamo guards on it: one graph per group) instead of calling ``current`` per layer,
        which broke the graph at every quantized layer (tiny SD W8A8, 2 groups: 102 breaks and 110
        recompiles on the first call, past dynamo's recompile limit). Eager calls keep ``current``: it is
        per thread, ``active`` is shared."""
        self.active = self.current_index()
        if torch.is_grad_enabled():
            pin_checkpointed_groups(self)

    def index_for_call(self) -> int:
        """The group of the call in progress: ``active`` inside a torch.compile graph, else ``current_index``
        (per layer call on the eager int8 path: no ``torch.compiler.disable`` wrapper there)."""
        return self.active if torch.compiler.is_compiling() else self.current_index()

    @torch.compiler.disable
    def current(self) -> int:
        """``current_index`` kept out of torch.compile graphs (the tracker's per-thread state). Until session 30
        this returned a 0-d device tensor, and indexing the scales with it read it back: on a GPU one upload
        and two device syncs per quantized layer per call (a CPU review; never measured on a GPU)."""
        return self.current_index()


def pin_checkpointed_groups(selector: StepGroups) -> None:
    """Have diffusers' gradient checkpointing recompute each block in the group of the call that ran it: backward
    recomputes after later calls moved the tracker (two calls, then one backward: the first call's gradient took
    the second call's scales, 0.06 off, until session 48). Wraps each checkpointing module's
    ``_gradient_checkpointing_func`` once (``enable_gradient_checkpointing`` may set a new one at any time)."""
    for module in selector.denoiser.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) is True and callable(function) \
                and not isinstance(function, GroupPinnedCheckpoint):
            module._gradient_checkpointing_func = GroupPinnedCheckpoint(function, selector)


class GroupPinnedCheckpoint:
    """A ``_gradient_checkpointing_func`` running its block with the timestep group of the call in progress
    forced, in the forward and in backward's recompute alike."""

    def __init__(self, checkpoint: Callable, selector: StepGroups) -> None:
        self.checkpoint, self.selector = checkpoint, selector

    def __call__(self, block: Callable, *args: object) -> object:
        return self.checkpoint(_GroupPinnedBlock(block, self.selector, self.selector.current_index()), *args)


class _GroupPinnedBlock:
    """``block`` called with ``selector.forced`` set to ``group``; other attributes are the block's."""

    def __init__(self, block: Callable, selector: StepGroups, group: int) -> None:
        self.block, self.selector, self.group = block, selector, group

    def __call__(self, *args: object, **kwargs: object) -> object:
        previous, self.selector.forced = self.selector.forced, self.group
        try:
            return self.block(*args, **kwargs)
        finally:
            self.selector.forced = previous

    def __getattr__(self, name: str) -> object:
        block = self.__dict__.get("block")  # (copy / pickle look up attributes before __init__ set it)
        if block is None:
            raise AttributeError(name)
        return getattr(block, name)


def timestep_bounds(timesteps: dict[int, float | None], groups: int, num_steps: int) -> tuple[float, ...] | None:
    """Timestep values separating the ``groups`` position slices of a calibrated trajectory of ``num_steps``
    (``timesteps``: step index -> timestep, ``Calibration.timesteps``): midway between the timesteps of
    the two steps where the group changes. None unless those steps were recorded and the timesteps
    never increase (Heun repeats each); groups are then chosen by position (``StepGroups.group_of``). An edge
    between two calls at one timestep (Heun) gives that timestep as the bound: both calls then belong to the
    earlier group, at calibration as at run time (``StepGroups.group_of_call``); the bound then sits midway to the
    next smaller timestep, so that a run timestep rounded a little below the recorded one (Flux divides it in
    the latents' dtype: bf16 after an fp32 calibration) stays in that group."""
    values = [value for _, value in sorted(timesteps.items()) if value is not None]
    if groups < 2 or any(later > earlier for earlier, later in zip(values, values[1:])):
        return None
    group = [min(groups - 1, step * groups // max(num_steps, 1)) for step in range(num_steps)]
    edges = [step for step in range(num_steps - 1) if group[step] != group[step + 1]]
    if len(edges) != groups - 1 or any(timesteps.get(s) is None or timesteps.get(s + 1) is None for s in edges):
        return None
    return tuple((timesteps[step] + _next_lower(timesteps, step, num_steps)) / 2 for step in edges)


def _next_lower(timesteps: dict[int, float | None], step: int, num_steps: int) -> float:
    """The first recorded timestep after ``step`` below ``timesteps[step]`` (Heun repeats each one once)."""
    upper = timesteps[step]
    later = (timesteps.get(k) for k in range(step + 1, num_steps))
    return next((value for value in later if value is not None and value < upper), upper - 1.0)


_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _integer_dtypes_kept(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` that never changes an integer tensor's dtype (device moves still apply): ``module.type(torch.bfloat16)``
    casts every tensor, so it turned int8 codes into bf16 numbers and the scales hidden as int32 bits into ~1e9
    (silently wrong simulated W8A8 / fp8; lowered layers crashed inside oneDNN's repack)."""
    def apply(tensor: torch.Tensor) -> torch.Tensor:
        result = fn(tensor)
        if result.dtype != tensor.dtype and not (tensor.is_floating_point() or tensor.is_complex()):
            return tensor.to(result.device)
        return result
    return apply


class KeepsQuantDtypes(nn.Module):
    """Quantization parameters (the buffers named in ``kept_dtype_buffers``) keep their own dtype through
    ``module.to(dtype)`` / ``.half()`` / ``.float()``, as torchao's quantized tensors do; device moves still
    apply. So scales stay as calibrated when a quantized pipeline is cast to bf16 (a saved artifact of it
    then reloads bit for bit), and fp8 codes, a floating-point dtype, are not widened."""

    kept_dtype_buffers: tuple[str, ...] = ("weight_codes", "weight_scale")

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        fn = _integer_dtypes_kept(fn)
        kept = {name: buffer for name in self.kept_dtype_buffers
                if (buffer := self._buffers.get(name)) is not None and buffer.is_floating_point()}
        for name, buffer in kept.items():  # dtype casts skip integer tensors: hide the floats as their bits
            self._buffers[name] = buffer.view(_SAME_SIZE_INTS[buffer.element_size()])
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, buffer in kept.items():
                moved = self._buffers[name]
                if moved.dtype == _SAME_SIZE_INTS[buffer.element_size()]:
                    self._buffers[name] = moved.view(buffer.dtype)


class _ActQuantizerBase(nn.Module, abc.ABC):
    """What lowered layers ask of an activation quantizer: its format, channel segments and, for
    per-tensor scales, ``segment_qparams(x)``: the 0-d (scale, zero_point) of each segment for this call."""

    fmt_name: str
    segment_sizes: tuple[int, ...]

    @property
    def fmt(self):
        return get_format(self.fmt_name)

    @abc.abstractmethod
    def segment_qparams(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """0-d (scale, zero_point) of each channel segment for the call on ``x`` (each subclass says how)."""


class ActQuantizer(KeepsQuantDtypes, _ActQuantizerBase):
    """Static activation fake-quantizer: scale / zero point per (timestep group, channel segment).

    ``scale`` and ``zero_point``: (G, S). ``segment_sizes``: channels per segment along
    ``channel_dim`` (S == 1: per-tensor). ``selector`` picks the group at run time when G > 1.
    """

    kept_dtype_buffers = ("scale",)

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str, symmetric: bool,
                 segment_sizes: Sequence[int] = (), channel_dim: int = -1,
                 selector: StepGroups | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.float().reshape(scale.shape[0], -1))
        self.register_buffer("zero_point", zero_point.to(torch.int32).reshape(scale.shape[0], -1))
        self.fmt_name, self.symmetric, self.channel_dim = fmt, symmetric, channel_dim
        self.segment_sizes = tuple(segment_sizes) or (0,)
        self.selector = selector

    def group_index(self) -> int:
        """Index of the current timestep group as a Python int (eager paths that key folded constants on it)."""
        if self.selector is not None and self._buffers["scale"].shape[0] > 1:  # no module lookup: per layer call
            return self.selector.index_for_call()
        return 0

    def group_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) scales and zero points of the current timestep group."""
        if self.scale.shape[0] > 1 and self.selector is not None:
            group = self.selector.index_for_call()  # a Python int: slicing needs no device sync
            return self.scale[group], self.zero_point[group]
        return self.scale[0], self.zero_point[0]

    def segment_qparams(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """0-d (scale, zero_point) of each channel segment in the current timestep group (``x`` unused)."""
        return list(zip(*self.group_qparams()))

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) broadcastable to ``x`` for the current timestep group."""
        scale, zero_point = self.group_qparams()
        if scale.numel() == 1:
            return scale.reshape(()), zero_point.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        full = lambda t: expand_segments(t.reshape(1, -1), self.segment_sizes).reshape(shape)  # noqa: E731
        return full(scale), full(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_float32(self._fake_quant, x, self.fmt)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams(x)
        scale = scale.to(x.dtype).clamp_min(scale_floor(x.dtype))  # fp8 computes in float16 too
        return fake_quant_act(x, scale, zero_point, self.fmt, self.symmetric)

    def extra_repr(self) -> str:
        groups, segments = self.scale.shape
        return f"{self.fmt_name}, {'sym' if self.symmetric else 'asym'}, groups={groups}, segments={segments}"


class DynamicActQuantizer(_ActQuantizerBase):
    """Dynamic activation fake-quantizer: scales from each call's own values, per token (one scale per
    position, over ``channel_dim``) or, with ``per_tensor``, one per channel segment of the whole tensor
    (``segment_sizes``: the split-shortcut halves; none = one scale)."""

    def __init__(self, fmt: str, symmetric: bool, channel_dim: int = -1, per_tensor: bool = False,
                 segment_sizes: Sequence[int] = ()) -> None:
        super().__init__()
        self.fmt_name, self.symmetric, self.channel_dim = fmt, symmetric, channel_dim
        self.per_tensor = per_tensor
        self.segment_sizes = tuple(segment_sizes) or (0,)

    def _parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if len(self.segment_sizes) == 1 else list(x.split(list(self.segment_sizes), dim=self.channel_dim))

    def segment_qparams(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-tensor mode: 0-d (scale, zero_point) of each channel segment of ``x``."""
        return [tensor_qparams(part, self.fmt, self.symmetric) for part in self._parts(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_float32(self._fake_quant, x, self.fmt)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        if not self.per_tensor:
            scale, zero_point = dynamic_qparams(x, self.channel_dim, fmt, self.symmetric)
            return fake_quant_act(x, scale, zero_point, fmt, self.symmetric)
        quantized = [fake_quant_act(part, scale, zero_point, fmt, self.symmetric)
                     for part, (scale, zero_point) in zip(self._parts(x), self.segment_qparams(x))]
        return quantized[0] if len(quantized) == 1 else torch.cat(quantized, dim=self.channel_dim)

    def extra_repr(self) -> str:
        kind = f"per-tensor, segments={len(self.segment_sizes)}" if self.per_tensor else "per-token"
        return f"{self.fmt_name}, {'sym' if self.symmetric else 'asym'}, {kind}"


class QuantLayer(KeepsQuantDtypes):
    """Shared weight handling: codes (out, columns) + scales (out, S), or a float weight if None."""

    def _init_weight(self, source: nn.Module, codes: torch.Tensor | None, scale: torch.Tensor | None,
                     segment_sizes: Sequence[int], fmt: str | None, act: nn.Module | None) -> None:
        self.weight_shape = tuple(source.weight.shape)
        self.segment_sizes, self.weight_fmt = tuple(segment_sizes), fmt
        if codes is None:
            self.float_weight = nn.Parameter(source.weight.detach().clone(), requires_grad=False)
        else:
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_scale", scale)
        self.bias = source.bias
        self.act = act
        self.rounding: nn.Module | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The effective (dequantized) weight, original shape."""
        if self.weight_fmt is None:
            return self.float_weight
        if self.rounding is not None:
            return self.rounding().reshape(self.weight_shape)
        return dequantize_weight(self.weight_codes, self.weight_scale, self.segment_sizes).reshape(self.weight_shape)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act is None else self.act(x)

    def describe(self) -> str:
        """Short label: weight format and segments, activation quantizer."""
        weights = "fp" if self.weight_fmt is None else f"{self.weight_fmt}x{len(self.segment_sizes)}seg"
        return f"W:{weights} A:{'fp' if self.act is None else self.act.extra_repr()}"


class QuantLinear(QuantLayer):
    """Simulated quantized ``nn.Linear``."""

    def __init__(self, source: nn.Linear, codes: torch.Tensor | None, scale: torch.Tensor | None,
                 segment_sizes: Sequence[int], fmt: str | None, act: nn.Module | None) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self._init_weight(source, codes, scale, segment_sizes, fmt, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def takes_unbatched_images(forward: Callable) -> Callable:
    """``forward`` of a quantized Conv2d, taking an unbatched (C, H, W) input as ``nn.Conv2d`` does: run as a batch
    of one (activation scales read the channels at dim 1, per-token ones took H; the int8 kernels need four dims)."""
    @functools.wraps(forward)
    def batched(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return forward(self, x.unsqueeze(0)).squeeze(0)
        return forward(self, x)
    return batched


class QuantConv2d(QuantLayer):
    """Simulated quantized ``nn.Conv2d`` (zeros padding)."""

    def __init__(self, source: nn.Conv2d, codes: torch.Tensor | None, scale: torch.Tensor | None,
                 segment_sizes: Sequence[int], fmt: str | None, act: nn.Module | None) -> None:
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode"):
            setattr(self, name, getattr(source, name))
        self._init_weight(source, codes, scale, segment_sizes, fmt, act)

    @takes_unbatched_images
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)


QUANT_LAYER_TYPES: dict[type, type[QuantLayer]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}
CHANNEL_DIMS: dict[type, int] = {nn.Linear: -1, nn.Conv2d: 1}


def float_type_of(module: nn.Module) -> type | None:
    """The supported float layer type ``module`` is (Linear / Conv2d with zeros padding), or None."""
    for klass in type(module).__mro__:
        if klass in QUANT_LAYER_TYPES:
            if klass is nn.Conv2d and module.padding_mode != "zeros":
                return None
            return klass
    return None
