"""Width checks of a structurally pruned denoiser: the layers of every pruned unit still fit together.

An artifact restores head counts and smaller layers one by one from its manifest; a hand-edited or damaged
one (a head count that does not split the projections, a to_q narrower than to_k, a GEGLU projection one row
short) loaded without complaint and failed at the first pipeline call, or ran with heads of the wrong width.
``BaseGeometry`` reads the units from the adapter before any layer is resized, and ``check`` compares the
restored widths: rows of a Linear / Conv2d weight are its outputs, columns its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import get_adapter
from ..arch.base import AttentionInfo, FFNInfo, ResnetInfo


@dataclass
class BaseGeometry:
    """The base denoiser's attention, FFN and ResNet units (names and head widths), before restoring."""

    attentions: list[AttentionInfo]
    ffns: list[FFNInfo]
    resnets: list[ResnetInfo]

    @classmethod
    def of(cls, denoiser: nn.Module) -> "BaseGeometry":
        adapter = get_adapter(denoiser)
        return cls(adapter.attention(), adapter.ffns(), adapter.resnets())

    def check(self, denoiser: nn.Module, heads: dict[str, int], resized: set[str]) -> None:
        """ValueError naming the unit whose restored widths disagree (units the artifact left alone are skipped)."""
        for info in self.attentions:
            if info.name in heads or resized & set(_projections(info)):
                _check_attention(denoiser, info, heads.get(info.name, info.heads))
        shared = {info.shared_out: info for info in self.attentions if info.shared_out is not None}
        for info in self.ffns:
            if not resized & {*info.proj_in, info.proj_out}:
                continue
            if info.proj_out_offset == 0:
                _check_ffn(denoiser, info)
            elif info.proj_out in shared:  # Flux single-stream: proj_out reads cat([attention, MLP hidden])
                attention = shared[info.proj_out]
                _check_shared_out(denoiser, info, heads.get(attention.name, attention.heads) * attention.head_dim)
        for info in self.resnets:
            if resized & {info.conv1, info.norm2, info.conv2}:
                _check_resnet(denoiser, info)


def _projections(info: AttentionInfo) -> list[str]:
    names = [info.to_q, info.to_k, info.to_v, info.to_out, info.added_q, info.added_k, info.added_v, info.added_out]
    return [name for name in names if name is not None]


def _widths(denoiser: nn.Module, names: list[str | None], axis: int) -> dict[str, int]:
    """Output (``axis`` 0) or input (1) width of each named layer."""
    return {name: denoiser.get_submodule(name).weight.shape[axis] for name in names if name is not None}


def _refuse(unit: str, expected: str, widths: dict[str, int]) -> None:
    raise ValueError(f"pruned artifact leaves {unit} with widths {widths}, expected {expected}: the manifest "
                     f"or its tensors are edited by hand or damaged")


def _check_attention(denoiser: nn.Module, info: AttentionInfo, heads: int) -> None:
    width = heads * info.head_dim
    outputs = _widths(denoiser, [info.to_q, info.to_k, info.to_v, info.added_q, info.added_k, info.added_v], 0)
    inputs = _widths(denoiser, [info.to_out, info.added_out], 1)
    if any(size != width for size in [*outputs.values(), *inputs.values()]):
        _refuse(f"attention {info.name!r}", f"{heads} heads x {info.head_dim} = {width}", {**outputs, **inputs})


def _check_ffn(denoiser: nn.Module, info: FFNInfo) -> None:
    outputs = _widths(denoiser, list(info.proj_in), 0)
    hidden = _widths(denoiser, [info.proj_out], 1)[info.proj_out]
    expected = 2 * hidden if info.gated else hidden
    if any(size != expected for size in outputs.values()):
        _refuse(f"feed-forward {info.name!r}", f"{expected} outputs for {info.proj_out!r}'s {hidden} inputs",
                {**outputs, info.proj_out: hidden})


def _check_shared_out(denoiser: nn.Module, info: FFNInfo, attention_width: int) -> None:
    outputs = _widths(denoiser, list(info.proj_in), 0)
    hidden = next(iter(outputs.values())) // (2 if info.gated else 1)
    columns = _widths(denoiser, [info.proj_out], 1)[info.proj_out]
    if columns != attention_width + hidden or any(size != next(iter(outputs.values())) for size in outputs.values()):
        _refuse(f"feed-forward {info.name!r}", f"{info.proj_out!r} reading the attention's {attention_width} and the "
                f"MLP's {hidden} columns", {**outputs, info.proj_out: columns})


def _check_resnet(denoiser: nn.Module, info: ResnetInfo) -> None:
    channels = _widths(denoiser, [info.conv1], 0)[info.conv1]
    norm = denoiser.get_submodule(info.norm2)
    widths = {info.conv2: _widths(denoiser, [info.conv2], 1)[info.conv2], info.norm2: norm.num_channels}
    if info.time_emb_proj is not None:
        rows = _widths(denoiser, [info.time_emb_proj], 0)[info.time_emb_proj]
        widths[info.time_emb_proj] = rows // 2 if info.scale_shift else rows
    if any(size != channels for size in widths.values()) or norm.weight is not None and norm.weight.numel() != channels:
        _refuse(f"ResNet {info.name!r}", f"{channels} channels (conv1's outputs) throughout",
                {info.conv1: channels, **widths})
