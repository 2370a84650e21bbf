"""Structured pruning: remove FFN hidden neurons, attention heads and ResNet inner channels.

FFN neuron j is scored by the single-column OBS error of its ``proj_out`` input column,
sum_rows W[:, c]^2 / [H^-1]_cc; the lowest are removed with group-OBS compensation of the remaining
columns, then dropped from every ``proj_in`` (GEGLU/SwiGLU: rows j and j + hidden) and from
``proj_out`` (Flux single-stream: column ``proj_out_offset + j``). An attention head is scored by
the joint OBS error of its ``head_dim`` input columns of every output projection (``to_out``,
``to_add_out``, or the shared ``proj_out`` of Flux single-stream blocks), removed likewise from
q/k/v (and added q/k/v) and the output projections; ``heads`` is updated. A ResNet block's inner
channels go by whole GroupNorm groups (so the kept groups' statistics are unchanged), scored by the
joint OBS error of their ``conv2`` input columns (channels x kh x kw), removed from ``conv2`` with
compensation and from ``conv1`` / ``time_emb_proj`` rows and ``norm2``. Units are grouped per block
so sequential pruning can calibrate a block's output projections once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..arch.base import AttentionInfo, DenoiserAdapter, FFNInfo, ResnetInfo
from .columns import ColumnPruner
from .record import PruneRecord
from .surgery import keep_groups, keep_rows, set_columns, weight_matrix

HEAD_COUNT_ATTRIBUTES = ("heads", "sliceable_head_dim")
WIDTH_ATTRIBUTES = ("inner_dim", "inner_kv_dim")


@dataclass(frozen=True)
class StructuredUnit:
    """The attentions, FFNs and ResNet blocks of one block, pruned together."""

    block: str
    attentions: tuple[AttentionInfo, ...]
    ffns: tuple[FFNInfo, ...]
    resnets: tuple[ResnetInfo, ...] = ()

    def output_layers(self) -> list[str]:
        """Layers whose input Hessians score this unit (ResNet conv2, FFN proj_out, attention outputs)."""
        names = [resnet.conv2 for resnet in self.resnets] + [ffn.proj_out for ffn in self.ffns]
        names += [name for attn in self.attentions for name, _ in attention_outputs(attn)]
        return list(dict.fromkeys(names))


def attention_outputs(attn: AttentionInfo) -> list[tuple[str, int]]:
    """(layer, first input column) of every output projection reading this attention's heads."""
    outputs = [(name, 0) for name in (attn.to_out, attn.added_out) if name is not None]
    if attn.shared_out is not None and attn.shared_out_columns is not None:
        outputs.append((attn.shared_out, attn.shared_out_columns[0]))
    return outputs


def _owner(name: str, blocks: list[str]) -> str:
    """The longest block name that is a prefix of module ``name``."""
    owners = [block for block in blocks if name.startswith(block + ".")]
    return max(owners, key=len) if owners else name


def structured_units(adapter: DenoiserAdapter, prune_heads: bool, prune_ffn: bool,
                     skip: Callable[[str], bool], prune_resnets: bool = False) -> list[StructuredUnit]:
    """Units in depth order; ``skip(module_name)`` drops attentions/FFNs/ResNets left dense by the config."""
    blocks = [info.name for info in adapter.blocks()]
    attentions = [a for a in adapter.attention() if prune_heads and a.heads > 1 and not _skipped(a, skip)]
    ffns = [f for f in adapter.ffns() if prune_ffn and f.hidden > 1 and not _skipped(f, skip)]
    resnets = [r for r in adapter.resnets() if prune_resnets and r.groups > 1 and not _skipped(r, skip)]
    units = []
    for block in blocks:
        own_attn = tuple(a for a in attentions if _owner(a.name, blocks) == block)
        own_ffn = tuple(f for f in ffns if _owner(f.name, blocks) == block)
        own_resnets = tuple(r for r in resnets if _owner(r.name, blocks) == block)
        if own_attn or own_ffn or own_resnets:
            units.append(StructuredUnit(block, own_attn, own_ffn, own_resnets))
    return units


def _skipped(info: Any, skip: Callable[[str], bool]) -> bool:
    """True if the attention / FFN / ResNet ``info`` or any layer it reshapes stays dense: excluding one
    projection (``exclude=("...attn1.to_q",)``) shrank it anyway until session 27."""
    layers = [getattr(info, f.name) for f in fields(info) if f.name != "name"]
    layers += [name for value in layers if isinstance(value, tuple) for name in value]
    return skip(info.name) or any(skip(layer) for layer in layers if isinstance(layer, str) and layer)


def _removal_count(total: int, fraction: float) -> int:
    return min(round(total * fraction), total - 1)


def removable(unit: StructuredUnit, fraction: float) -> dict[str, int]:
    """Of each kind in ``unit`` (heads, FFN neurons, ResNet channel groups), how many ``fraction`` removes: the
    count rounds, so 0.1 of 4 heads removes none."""
    return {"heads": sum(_removal_count(attn.heads, fraction) for attn in unit.attentions),
            "neurons": sum(_removal_count(ffn.hidden, fraction) for ffn in unit.ffns),
            "channel groups": sum(_removal_count(resnet.groups, fraction) for resnet in unit.resnets)}


def largest_sizes(units: list[StructuredUnit]) -> dict[str, int]:
    """Of each kind present in ``units``, the largest count one attention / FFN / ResNet holds."""
    sizes = {"heads": [attn.heads for unit in units for attn in unit.attentions],
             "neurons": [ffn.hidden for unit in units for ffn in unit.ffns],
             "channel groups": [resnet.groups for unit in units for resnet in unit.resnets]}
    return {kind: max(values) for kind, values in sizes.items() if values}


def remove_ffn_neurons(denoiser: nn.Module, ffn: FFNInfo, pruner: ColumnPruner, fraction: float,
                       record: PruneRecord) -> int:
    """Remove the lowest-scoring ``fraction`` of ``ffn``'s hidden neurons; returns how many."""
    count = _removal_count(ffn.hidden, fraction)
    if count <= 0:
        return 0
    neurons = torch.arange(ffn.hidden, device=pruner.weight.device)
    scores = pruner.column_scores(ffn.proj_out_offset + neurons)
    dropped = torch.zeros(ffn.hidden, dtype=torch.bool, device=neurons.device)
    dropped[torch.topk(scores, count, largest=False).indices] = True
    pruner.remove(ffn.proj_out_offset + neurons[dropped])
    kept = neurons[~dropped]
    rows = torch.cat([kept, kept + ffn.hidden]) if ffn.gated else kept
    for name in ffn.proj_in:
        record.note_shape(denoiser, name)
        keep_rows(denoiser, name, rows.to(denoiser.get_submodule(name).weight.device))
    return count


def remove_resnet_channels(denoiser: nn.Module, resnet: ResnetInfo, pruner: ColumnPruner, fraction: float,
                           record: PruneRecord) -> int:
    """Remove the lowest-scoring ``fraction`` of ``resnet``'s GroupNorm groups of inner channels;
    returns how many channels went."""
    count = _removal_count(resnet.groups, fraction)
    if count <= 0:
        return 0
    size = resnet.channels // resnet.groups
    kernel = pruner.weight.shape[1] // resnet.channels  # kh * kw columns per channel
    group_columns = torch.arange(resnet.channels * kernel, device=pruner.weight.device).reshape(resnet.groups, -1)
    dropped = torch.zeros(resnet.groups, dtype=torch.bool, device=group_columns.device)
    dropped[torch.topk(pruner.block_scores(group_columns), count, largest=False).indices] = True
    pruner.remove(group_columns[dropped].flatten())
    kept_groups = torch.arange(resnet.groups, device=dropped.device)[~dropped]
    channels = (kept_groups[:, None] * size + torch.arange(size, device=dropped.device)).flatten()
    rows = {resnet.conv1: channels}
    if resnet.time_emb_proj is not None:
        rows[resnet.time_emb_proj] = torch.cat([channels, channels + resnet.channels]) if resnet.scale_shift else channels
    for name, keep in rows.items():
        record.note_shape(denoiser, name)
        keep_rows(denoiser, name, keep.to(denoiser.get_submodule(name).weight.device))
    record.note_shape(denoiser, resnet.norm2)
    keep_groups(denoiser, resnet.norm2, kept_groups)
    record.norm_groups[resnet.norm2] = resnet.groups - count
    return count * size


def remove_heads(denoiser: nn.Module, attn: AttentionInfo, pruners: dict[str, ColumnPruner],
                 fraction: float, record: PruneRecord) -> int:
    """Remove the lowest-scoring ``fraction`` of ``attn``'s heads; returns how many."""
    count = _removal_count(attn.heads, fraction)
    if count <= 0:
        return 0
    head_columns = torch.arange(attn.heads * attn.head_dim).reshape(attn.heads, attn.head_dim)
    outputs = attention_outputs(attn)
    scores = sum(pruners[name].block_scores(head_columns + start) for name, start in outputs).cpu()  # CUDA
    dropped = torch.zeros(attn.heads, dtype=torch.bool)  # scores indexed this CPU mask (untested on a GPU)
    dropped[torch.topk(scores, count, largest=False).indices] = True
    for name, start in outputs:
        pruners[name].remove((head_columns[dropped] + start).flatten())
    rows = head_columns[~dropped].flatten()
    for name in (attn.to_q, attn.to_k, attn.to_v, attn.added_q, attn.added_k, attn.added_v):
        if name is not None:
            record.note_shape(denoiser, name)
            keep_rows(denoiser, name, rows.to(denoiser.get_submodule(name).weight.device))
    set_head_count(denoiser.get_submodule(attn.name), attn.heads - count, attn.head_dim)
    record.heads[attn.name] = attn.heads - count
    return count


def set_head_count(module: nn.Module, heads: int, head_dim: int) -> None:
    """Update an attention module's head count and derived widths after head removal."""
    for attribute in HEAD_COUNT_ATTRIBUTES:
        if hasattr(module, attribute):
            setattr(module, attribute, heads)
    for attribute in WIDTH_ATTRIBUTES:
        if isinstance(getattr(module, attribute, None), int):
            setattr(module, attribute, heads * head_dim)


def prune_structured_unit(denoiser: nn.Module, unit: StructuredUnit, hessians: dict[str, torch.Tensor | None],
                          fraction: float, damp: float, record: PruneRecord) -> tuple[dict[str, int], list[str]]:
    """Prune one unit's ResNet channels, FFNs then heads (FFN columns follow attention columns in
    shared layers); returns the counts removed and the output layers that lost columns (only those are rewritten:
    a unit removing nothing was reported pruned, its layers rewritten unchanged, until session 52)."""
    pruners = {name: ColumnPruner(weight_matrix(denoiser.get_submodule(name)), hessians.get(name), damp)
               for name in unit.output_layers()}
    removed = {"neurons": 0, "heads": 0, "channels": 0}
    for resnet in unit.resnets:
        removed["channels"] += remove_resnet_channels(denoiser, resnet, pruners[resnet.conv2], fraction, record)
    for ffn in unit.ffns:
        removed["neurons"] += remove_ffn_neurons(denoiser, ffn, pruners[ffn.proj_out], fraction, record)
    for attn in unit.attentions:
        removed["heads"] += remove_heads(denoiser, attn, pruners, fraction, record)
    changed = [name for name, pruner in pruners.items() if pruner.removed]
    for name in changed:
        record.note_shape(denoiser, name)
        set_columns(denoiser, name, pruners[name].weight)
    return removed, changed
