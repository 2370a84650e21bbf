"""The "prune" artifact handler: masked layers as packed bitmasks + non-zero values, resized layers whole.

Config JSON: the prune record (configs applied, masked layers with their shapes, base shapes of
resized layers, head counts, GroupNorm group counts). Tensors: ``<layer>.mask`` (uint8, 8 mask bits per byte) and
``<layer>.values`` (the non-zero weights in order) for masked layers; ``<layer>.weight`` /
``<layer>.bias`` for layers made smaller. ``restore`` checks every base shape and raises a
ValueError naming the layer on any mismatch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch import find_denoiser, get_adapter
from ..artifact import mark_placeholder, register_technique
from ..artifact_tensors import TechniqueTensors, technique_tensors
from ..hooks import refuse_while_cached
from .apply import TECHNIQUE
from .geometry import BaseGeometry
from .record import ensure_record, get_record
from .sparse import dense_weight, enable_sparse_kernels
from .structured import set_head_count
from .surgery import new_group_norm, new_layer, replace_module

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 (ceil(numel / 8),), most significant bit first."""
    flat = mask.detach().flatten().to(torch.uint8).cpu()
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).reshape(-1, 8)
    return (padded * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Inverse of ``pack_bits``: bool tensor of ``shape``."""
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS) != 0
    numel = int(torch.tensor(shape).prod()) if shape else 1
    return bits.flatten()[:numel].reshape(shape)


def export_prune(pipe: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(record JSON, tensors) of the pruned denoiser."""
    _, denoiser = find_denoiser(pipe)
    record = get_record(denoiser)
    if record is None:
        raise ValueError("the pipeline is marked as pruned but its denoiser has no prune record")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name in record.masked:
        if name in record.base_shapes:
            continue
        weight = dense_weight(denoiser.get_submodule(name).weight.detach())
        tensors[f"{name}.mask"] = pack_bits(weight != 0)
        tensors[f"{name}.values"] = weight[weight != 0].cpu()  # kept until saved: not in the GPU's memory
        shapes[name] = list(weight.shape)
    for name in record.base_shapes:
        layer = denoiser.get_submodule(name)
        tensors[f"{name}.weight"] = dense_weight(layer.weight.detach())
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
    return {"record": record.to_dict(), "masked_shapes": shapes}, tensors


def supersede_prune(config: dict[str, Any], tensors: dict[str, torch.Tensor], replaced: set[str],
                    technique: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The export without the float weights of layers ``technique`` (quantization) replaced: their masks
    and resized shapes stay (restore needs them to rebuild the layer that technique then replaces), their
    values would only be overwritten (and kept ~0.5x of the model alive for the pipeline's life)."""
    names = [name for name in sorted(replaced) if f"{name}.values" in tensors or f"{name}.weight" in tensors]
    if not names:
        return config, tensors
    kept = dict(tensors)
    shapes = dict(config.get("superseded_shapes", {}))
    for name in names:
        kept.pop(f"{name}.values", None)
        resized = kept.pop(f"{name}.weight", None)
        if resized is not None:
            shapes[name] = list(resized.shape)
    config = {**config, "superseded": sorted({*config.get("superseded", []), *names}),
              "superseded_by": technique, "superseded_shapes": shapes}
    return config, kept


def restore_prune(pipe: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor] | TechniqueTensors) -> None:
    """Re-apply an exported prune onto ``pipe``'s (base) denoiser; ValueError on any shape mismatch."""
    _, denoiser = find_denoiser(pipe)
    refuse_while_cached(denoiser, "restoring pruning")  # a manifest listing the cache first
    tensors = technique_tensors(tensors)
    saved = config["record"]
    superseded = set(config.get("superseded", []))  # layers the artifact's quantization replaces
    _check_masked_names(saved, config["masked_shapes"])
    structured = bool(saved["heads"] or saved["base_shapes"])  # unstructured artifacts resize nothing
    geometry = BaseGeometry.of(denoiser) if structured else None  # the base's units, read before any resize
    _restore_heads(denoiser, saved["heads"])
    norm_groups = _checked_norm_groups(saved.get("norm_groups", {}), saved["base_shapes"])
    for name, base_shape in saved["base_shapes"].items():
        shape = config.get("superseded_shapes", {}).get(name) if name in superseded else None
        _restore_resized(denoiser, name, base_shape, tensors, norm_groups.get(name), shape)
    for name, shape in config["masked_shapes"].items():
        _restore_masked(denoiser, name, shape, tensors, name in superseded)
    if geometry is not None:
        geometry.check(denoiser, saved["heads"], set(saved["base_shapes"]))
    record = ensure_record(denoiser)
    record.configs += saved["configs"]
    record.calibrations += saved.get("calibrations", [None] * len(saved["configs"]))  # older artifacts: none
    for name in saved["masked"]:
        record.note_masked(name)
    record.base_shapes |= saved["base_shapes"]
    record.heads |= saved["heads"]
    record.norm_groups |= norm_groups
    _restore_sparse_kernels(denoiser, saved["configs"], [name for name in config["masked_shapes"]
                                                        if name not in superseded])


def _checked_norm_groups(norm_groups: Any, base_shapes: dict[str, Any]) -> dict[str, int]:
    """The record's GroupNorm group counts, each an int >= 1 for a resized layer: -2 or 6.0 loaded, and every call
    then failed inside torch's group_norm (until session 49)."""
    if not isinstance(norm_groups, dict):
        raise ValueError(f"pruned artifact's record.norm_groups must map layer names to group counts, "
                         f"got {norm_groups!r:.80}")
    for name, groups in norm_groups.items():
        if name not in base_shapes:
            raise ValueError(f"pruned artifact gives GroupNorm {name!r} a group count, but resizes no such layer")
        _check_count(f"GroupNorm {name!r}", groups, "group")
    return norm_groups


def _check_count(what: str, count: Any, unit: str) -> None:
    """ValueError unless ``count`` (of ``what``'s heads or groups) is an integer >= 1."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"pruned artifact gives {what} {count!r} {unit}s; a {unit} count is an integer >= 1")


def _restore_sparse_kernels(denoiser: nn.Module, configs: list[Any], masked: list[str]) -> None:
    """2:4 sparse kernels on the restored masked layers where the last prune asked for them and the device has
    them (a pipeline saved with them came back dense: other GEMMs, no speed-up); nothing on a CPU."""
    last = configs[-1] if configs and isinstance(configs[-1], dict) else {}
    if last.get("pattern") == "2:4" and last.get("sparse_kernels", True) and masked:
        enable_sparse_kernels(denoiser, masked, "2:4")


def _check_masked_names(saved: dict[str, Any], masked_shapes: dict[str, Any]) -> None:
    """The record's masked layers hold every layer restored with a mask and name only restored layers: an
    unknown name failed only at the next save (a raw AttributeError), a dropped one left its mask out of it."""
    listed = saved["masked"]
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise ValueError(f"pruned artifact's record.masked must list layer names, got {listed!r:.80}")
    odd = sorted((set(listed) - set(masked_shapes) - set(saved["base_shapes"])) | (set(masked_shapes) - set(listed)))
    if odd:
        raise ValueError(f"pruned artifact's record.masked and its restored layers differ on {odd[:3]} "
                         f"({len(odd)} names): the manifest is edited by hand or damaged")


def _layer(denoiser: nn.Module, name: str, shape: list[int]) -> nn.Module:
    try:
        layer = denoiser.get_submodule(name)
    except AttributeError:
        raise ValueError(f"pruned artifact names layer {name!r}, which this base model does not have") from None
    if list(layer.weight.shape) != list(shape):
        raise ValueError(f"pruned artifact expects layer {name!r} with weight shape {list(shape)}; "
                         f"the base model has {list(layer.weight.shape)}")
    return layer


def _restore_heads(denoiser: nn.Module, heads: dict[str, int]) -> None:
    """Set saved head counts (head_dim from the adapter's view of the base layers, before they are resized)."""
    if not heads:
        return
    head_dims = {info.name: info.head_dim for info in get_adapter(denoiser).attention()}
    for name, count in heads.items():
        if name not in head_dims:
            raise ValueError(f"pruned artifact names attention {name!r}, which this base model does not have")
        _check_count(f"attention {name!r}", count, "head")
        set_head_count(denoiser.get_submodule(name), count, head_dims[name])


def _restore_resized(denoiser: nn.Module, name: str, base_shape: list[int], tensors: TechniqueTensors,
                     norm_groups: int | None, superseded_shape: list[int] | None = None) -> None:
    """Swap in the saved smaller Linear / Conv2d (or GroupNorm over ``norm_groups`` groups); a layer the
    artifact's quantization replaces gets its saved shape with zero weights (``supersede_prune``)."""
    layer = _layer(denoiser, name, base_shape)
    weight = tensors.take(f"{name}.weight", dtype="float", finite=True) if superseded_shape is None else \
        torch.zeros(superseded_shape, dtype=layer.weight.dtype, device=layer.weight.device)
    if weight.dim() != len(base_shape) or any(size > base for size, base in zip(weight.shape, base_shape)):
        raise ValueError(f"pruned artifact holds a weight of shape {list(weight.shape)} for {name!r}, whose "
                         f"base weight is {list(base_shape)}: a pruned layer is never larger")
    bias = None if layer.bias is None else tensors.take(f"{name}.bias", (weight.shape[0],), "float", finite=True)
    if isinstance(layer, nn.GroupNorm) and norm_groups is not None:
        new = new_group_norm(norm_groups, weight, bias, layer, weight.shape[0])
    elif isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1):
        new = new_layer(weight, bias, layer)
    else:
        raise ValueError(f"pruned artifact resized {name!r}, a {type(layer).__name__} in the base model; "
                         "only Linear, Conv2d and GroupNorm layers can be restored smaller")
    if superseded_shape is not None:
        mark_placeholder(new)
    replace_module(denoiser, name, new)


def _restore_masked(denoiser: nn.Module, name: str, shape: list[int], tensors: TechniqueTensors,
                    superseded: bool = False) -> None:
    """Write the saved pruned weight; a layer the artifact's quantization replaces only gets its mask."""
    layer = _layer(denoiser, name, shape)
    numel = layer.weight.numel()
    mask = unpack_bits(tensors.take(f"{name}.mask", (-(-numel // 8),), torch.uint8), shape).to(layer.weight.device)
    if superseded:
        with torch.no_grad():
            layer.weight.mul_(mask)
        mark_placeholder(layer)
        return
    values = tensors.take(f"{name}.values", (int(mask.sum()),), "float", finite=True)
    weight = torch.zeros(shape, dtype=layer.weight.dtype, device=layer.weight.device)
    weight[mask] = values.to(weight)
    with torch.no_grad():
        layer.weight.copy_(weight)


register_technique(TECHNIQUE, export_prune, restore_prune, supersede=supersede_prune)
