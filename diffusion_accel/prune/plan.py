"""Which units a config prunes: layer groups (unstructured, N:M) or blocks (structured)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..arch.base import DenoiserAdapter, LayerGroup
from .configs import PruneConfig
from .structured import StructuredUnit, structured_units


def excluded(adapter: DenoiserAdapter, config: PruneConfig) -> Callable[[str], bool]:
    """Predicate: module ``name`` stays dense (high-precision layer, or under an ``exclude`` prefix)."""
    high_precision = set(adapter.high_precision_layers())
    prefixes = tuple(config.exclude)

    def is_excluded(name: str) -> bool:
        return name in high_precision or any(name == p or name.startswith(p + ".") for p in prefixes)

    return is_excluded


def unstructured_plan(adapter: DenoiserAdapter, config: PruneConfig) -> tuple[list[LayerGroup], dict[str, str]]:
    """(layer groups to prune in depth order, {layer: why it stays dense})."""
    is_excluded = excluded(adapter, config)
    skipped: dict[str, str] = {}
    groups: list[LayerGroup] = []
    high_precision = set(adapter.high_precision_layers())
    prunable_blocks = []  # blocks with layers any config could prune: config.exclude does not move the last one
    for group in adapter.layer_groups():
        kept = tuple(name for name in group.layers if not is_excluded(name))
        skipped |= {name: "excluded (high precision or config.exclude)" for name in group.layers if is_excluded(name)}
        if kept:
            groups.append(LayerGroup(kept, group.block, group.role, group.input_key))
        if any(name not in high_precision for name in group.layers):
            prunable_blocks.append(group.block)
    if config.keep_last_block_dense and prunable_blocks:  # excluding the last block kept the one before it dense too
        last = prunable_blocks[-1]
        skipped |= {name: "last block kept dense" for g in groups if g.block == last for name in g.layers}
        groups = [g for g in groups if g.block != last]
    return groups, skipped


def structured_plan(adapter: DenoiserAdapter, config: PruneConfig) -> tuple[list[StructuredUnit], dict[str, str]]:
    """(blocks whose heads / FFN neurons / ResNet channels are pruned, in depth order, {block: why it stays dense})."""
    weighted = processors_with_weights(adapter)
    is_excluded = excluded(adapter, config)
    units = structured_units(adapter, config.prune_heads, config.prune_ffn,
                             lambda name: is_excluded(name) or name in weighted, config.prune_resnets)
    skipped: dict[str, str] = {name: f"heads kept: its {kind} holds projections of its own (IP-Adapter's image "
                                     f"key/value) that head removal would not resize" for name, kind in weighted.items()}
    candidates = structured_units(adapter, config.prune_heads, config.prune_ffn, lambda name: name in weighted,
                                  config.prune_resnets)
    pruned = {member.name for unit in units for member in (*unit.attentions, *unit.ffns, *unit.resnets)}
    skipped |= {member.name: "excluded (high precision or config.exclude)" for unit in candidates
                for member in (*unit.attentions, *unit.ffns, *unit.resnets) if member.name not in pruned}
    if config.keep_last_block_dense and units:  # the model's last block with units, whatever config.exclude says
        high_precision = set(adapter.high_precision_layers())
        every_unit = structured_units(adapter, config.prune_heads, config.prune_ffn,
                                      lambda name: name in high_precision or name in weighted, config.prune_resnets)
        if units[-1].block == every_unit[-1].block:
            skipped[units[-1].block] = "last block kept dense"
            units = units[:-1]
    return units, skipped


def processors_with_weights(adapter: DenoiserAdapter) -> dict[str, str]:
    """{attention module: processor class} for attention processors holding parameters of their own
    (diffusers' IP-Adapter processors: ``to_k_ip`` / ``to_v_ip`` read the heads too); removing heads there
    crashed the next calibration sweep with a shape error."""
    found = {}
    for info in adapter.attention():
        processor = getattr(adapter.module(info.name), "processor", None)
        if isinstance(processor, nn.Module) and any(True for _ in processor.parameters()):
            found[info.name] = type(processor).__name__
    return found
