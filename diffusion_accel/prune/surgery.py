"""Replacing Linear layers by smaller ones (structured pruning) and reading/writing 2-D weights."""

from __future__ import annotations

import torch
from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` under ``root`` (works inside ModuleList / Sequential)."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An nn.Linear holding ``weight`` (out, in) and ``bias`` (out,), on ``like``'s device and dtype."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.train(like.training)
    return layer


def keep_rows(root: nn.Module, name: str, rows: torch.Tensor) -> None:
    """Replace Linear ``name`` by one holding only output rows ``rows`` (long indices)."""
    layer = _linear(root, name)
    bias = layer.bias.detach()[rows] if layer.bias is not None else None
    replace_module(root, name, new_linear(layer.weight.detach()[rows], bias, layer))


def set_columns(root: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Replace Linear ``name`` by one with ``weight`` (out, fewer in), keeping its bias."""
    layer = _linear(root, name)
    bias = layer.bias.detach() if layer.bias is not None else None
    replace_module(root, name, new_linear(weight, bias, layer))


def _linear(root: nn.Module, name: str) -> nn.Linear:
    layer = root.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"structured pruning expects {name!r} to be nn.Linear, got {type(layer).__name__}")
    return layer


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a 2-D view (out, in * kh * kw) (Conv2d flattened like nn.Unfold)."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def write_weight_matrix(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Copy ``matrix`` (out, d) into the layer's weight, in its own shape and dtype."""
    with torch.no_grad():
        layer.weight.copy_(matrix.reshape(layer.weight.shape).to(layer.weight.dtype))
