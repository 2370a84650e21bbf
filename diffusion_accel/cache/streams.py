"""The hidden/encoder streams that enter and leave a transformer block.

Which argument and which positional output hold ``hidden_states`` or ``encoder_hidden_states`` is
the model family's knowledge: the adapter's ``block_streams(name)`` says it, so no module or class
names are matched here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..arch import DenoiserAdapter

STREAMS = ("hidden", "encoder")


@dataclass(frozen=True)
class BlockIO:
    """How to read a block class's stream inputs and outputs."""

    hidden_arg: str
    encoder_arg: str | None
    hidden_out: int
    encoder_out: int | None
    parameters: tuple[str, ...]

    def inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor | None]:
        """{"hidden": tensor, "encoder": tensor or None} from a block call's arguments."""
        return {"hidden": self._argument(self.hidden_arg, args, kwargs),
                "encoder": self._argument(self.encoder_arg, args, kwargs)}

    def _argument(self, name: str | None, args: tuple, kwargs: dict) -> Any:
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        index = self.parameters.index(name) if name in self.parameters else len(args)
        return args[index] if index < len(args) else None

    def outputs(self, output: Any) -> dict[str, torch.Tensor | None]:
        """{"hidden": ..., "encoder": ...} from a block's return value."""
        if isinstance(output, torch.Tensor):
            return {"hidden": output, "encoder": None}
        encoder = output[self.encoder_out] if self.encoder_out is not None else None
        return {"hidden": output[self.hidden_out], "encoder": encoder}

    def template(self, output: Any) -> Any:
        """A light description of a return value's structure: "tensor" or which slots were None."""
        if isinstance(output, torch.Tensor):
            return "tensor"
        return tuple(value is None for value in output)

    def returned_streams(self, template: Any) -> set[str]:
        """The streams a return value of structure ``template`` holds (None: no template recorded, no stream)."""
        if template is None:
            return set()
        if template == "tensor" or self.encoder_out is None or template[self.encoder_out]:
            return {"hidden"}
        return {"hidden", "encoder"}

    def build(self, template: Any, streams: dict[str, torch.Tensor | None]) -> Any:
        """A return value with the structure ``template`` holding ``streams``."""
        if template == "tensor":
            return streams["hidden"]
        values: list[Any] = [None] * len(template)
        values[self.hidden_out] = streams["hidden"]
        if self.encoder_out is not None and not template[self.encoder_out]:
            values[self.encoder_out] = streams["encoder"]
        return tuple(values)


def block_io(adapter: DenoiserAdapter, name: str) -> BlockIO:
    """The stream layout of block ``name`` from its adapter (TypeError if the adapter has none)."""
    spec = adapter.block_streams(name)
    parameters = tuple(inspect.signature(type(adapter.module(name)).forward).parameters)[1:]
    return BlockIO(spec.hidden_arg, spec.encoder_arg, spec.hidden_out, spec.encoder_out, parameters)


def add_streams(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Element-wise ``base + delta`` per stream (None where either is None)."""
    return {k: None if base[k] is None or delta.get(k) is None else base[k] + delta[k] for k in STREAMS}


def sub_streams(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Element-wise ``after - before`` per stream (None where either is None or ``before`` does not
    broadcast to ``after``: Flux's uncond text stream enters with batch 1 and leaves with batch B)."""
    out = {}
    for k in STREAMS:
        a, b = after.get(k), before.get(k)
        out[k] = a - b if a is not None and b is not None and _broadcasts_to(b.shape, a.shape) else None
    return out


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """True if a tensor of ``shape`` broadcasts to ``target`` without changing it."""
    if shape == target:  # the usual case, per block call: broadcast_shapes costs ~13 us
        return True
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def detached(value: Any) -> Any:
    """``value`` (a tensor, or a dict / tuple / list of them) without autograd history, for storing across
    steps: a reused feature is a constant at the later step. Stored with its graph, a second backward
    through the cached denoiser failed ('backward through the graph a second time'), and the graph's
    memory stayed alive. Unchanged when nothing records gradients."""
    if not torch.is_grad_enabled():
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {key: detached(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(detached(item) for item in value)
    return value


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous| (inf if shapes differ)."""
    if current.shape != previous.shape:
        return float("inf")
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))
