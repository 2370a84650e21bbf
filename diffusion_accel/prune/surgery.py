"""Replacing Linear / Conv2d / GroupNorm layers by smaller ones (structured pruning); 2-D weight views."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` under ``root`` (works inside ModuleList / Sequential)."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _filled(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
    """``layer`` with ``weight`` / ``bias`` copied in and ``like``'s train/eval mode and requires_grad flags."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return _like(layer, like)


def _like(layer: nn.Module, like: nn.Module) -> nn.Module:
    """``layer`` in ``like``'s train/eval mode, each parameter requiring grad as ``like``'s of that name does (a
    frozen base's pruned layers came back trainable: an optimiser over requires_grad parameters trained them)."""
    layer.train(like.training)
    for name, parameter in layer.named_parameters(recurse=False):
        source = getattr(like, name, None)
        if isinstance(source, torch.Tensor):
            parameter.requires_grad_(source.requires_grad)
    return layer


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An nn.Linear holding ``weight`` (out, in) and ``bias`` (out,), on ``like``'s device and dtype."""
    layer = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=like.weight.device, dtype=like.weight.dtype)  # no random init: it drew from
    return _filled(layer, weight, bias, like)  # the global RNG, moving the user's torch.manual_seed stream


def new_conv(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Conv2d) -> nn.Conv2d:
    """An nn.Conv2d holding ``weight`` (out, in, kh, kw) with ``like``'s stride, padding, ... and dtype."""
    layer = skip_init(nn.Conv2d, weight.shape[1], weight.shape[0], like.kernel_size, like.stride, like.padding,
                      like.dilation, groups=1, bias=bias is not None, padding_mode=like.padding_mode,
                      device=like.weight.device, dtype=like.weight.dtype)
    return _filled(layer, weight, bias, like)


def new_layer(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
    """A Linear or (ungrouped) Conv2d like ``like`` holding ``weight`` / ``bias`` in their own shapes."""
    if isinstance(like, nn.Conv2d):
        return new_conv(weight, bias, like)
    return new_linear(weight, bias, like)


def keep_rows(root: nn.Module, name: str, rows: torch.Tensor) -> None:
    """Replace Linear / Conv2d ``name`` by one holding only output rows (channels) ``rows``."""
    layer = _prunable(root, name)
    bias = layer.bias.detach()[rows] if layer.bias is not None else None
    replace_module(root, name, new_layer(layer.weight.detach()[rows], bias, layer))


def set_columns(root: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Replace Linear / Conv2d ``name`` by one with 2-D ``weight`` (out, fewer in[*kh*kw]), keeping its bias."""
    layer = _prunable(root, name)
    bias = layer.bias.detach() if layer.bias is not None else None
    if isinstance(layer, nn.Conv2d):
        weight = weight.reshape(weight.shape[0], -1, *layer.kernel_size)
    replace_module(root, name, new_layer(weight, bias, layer))


def new_group_norm(num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   like: nn.GroupNorm, channels: int) -> nn.GroupNorm:
    """A GroupNorm of ``num_groups`` over ``channels`` with ``like``'s eps / affine and the given entries."""
    norm = nn.GroupNorm(num_groups, channels, eps=like.eps, affine=like.affine,
                        device=like.weight.device if like.affine else None,
                        dtype=like.weight.dtype if like.affine else None)
    if like.affine:
        with torch.no_grad():
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
    return _like(norm, like)


def keep_groups(root: nn.Module, name: str, groups: torch.Tensor) -> None:
    """Replace GroupNorm ``name`` by one over only its groups ``groups`` (long indices, sorted)."""
    norm = root.get_submodule(name)
    if not isinstance(norm, nn.GroupNorm):
        raise TypeError(f"structured pruning expects {name!r} to be nn.GroupNorm, got {type(norm).__name__}")
    size = norm.num_channels // norm.num_groups
    channels = (groups[:, None] * size + torch.arange(size, device=groups.device)).flatten()
    weight = norm.weight.detach()[channels] if norm.affine else None
    bias = norm.bias.detach()[channels] if norm.affine else None
    replace_module(root, name, new_group_norm(len(groups), weight, bias, norm, len(channels)))


def _prunable(root: nn.Module, name: str) -> nn.Module:
    layer = root.get_submodule(name)
    if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1):
        return layer
    raise TypeError(f"structured pruning expects {name!r} to be nn.Linear or an ungrouped nn.Conv2d, "
                    f"got {type(layer).__name__}")


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a 2-D view (out, in * kh * kw) (Conv2d flattened like nn.Unfold)."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def write_weight_matrix(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Copy ``matrix`` (out, d) into the layer's weight, in its own shape and dtype."""
    with torch.no_grad():
        layer.weight.copy_(matrix.reshape(layer.weight.shape).to(layer.weight.dtype))
