"""The "ptq" artifact handler: int codes (int4 packed), scales and zero points in safetensors.

Per layer ``L`` the tensors are ``L.codes`` (int8, uint8 for packed int4, float8 for fp8),
``L.weight_scale`` (out, S), ``L.act_scale`` / ``L.act_zero_point`` (G, S) for static
activations. The JSON config holds the PTQConfig, each layer's segments and activation kind, and
which layers were lowered. Restore rebuilds the simulated layers from these exact tensors (then
lowers the same ones), so a loaded pipeline reproduces the saved one bit for bit. Biases and every
unquantized weight come from the base pipeline, whose fingerprint the framework checks.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.registry import find_denoiser
from ..hooks import refuse_while_cached
from ..scalars import is_finite_number
from ..stacklevel import user_stacklevel
from ..artifact import ArtifactError, compute_dtype, register_technique
from ..artifact_tensors import TechniqueTensors, technique_tensors
from .apply import TECHNIQUE, install
from .attention import QUANT_PROCESSORS, describe_processors, quantizable_attention, replaced_attention
from .configs import PTQConfig
from .fp8 import FP8_DTYPE
from .formats import get_format
from .layers import (CHANNEL_DIMS, QUANT_LAYER_TYPES, ActQuantizer, DynamicActQuantizer, StepGroups,
                     float_type_of)
from .lower import lower_layer, note_lowering
from .quantizers import pack_int4, unpack_int4
from .state import PTQState, get_state


def _layer_weight(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if hasattr(module, "export_weight"):
        return module.export_weight()
    if module.weight_fmt is None:
        return None, None
    return module.weight_codes, module.weight_scale


ACT_ENTRY_MODES = ("static", "dynamic")


def _act_entry(act: nn.Module | None) -> dict[str, Any] | None:
    if act is None:
        return None
    entry = {"fmt": act.fmt_name, "symmetric": act.symmetric, "channel_dim": act.channel_dim,
             "mode": "dynamic" if isinstance(act, DynamicActQuantizer) else "static",
             "segments": list(act.segment_sizes)}
    if isinstance(act, DynamicActQuantizer):
        entry["per_tensor"] = act.per_tensor
    return entry


def export_ptq(pipe: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON config, tensors) describing every quantized layer of ``pipe``'s denoiser."""
    _, denoiser = find_denoiser(pipe)
    state = get_state(denoiser)
    layers, tensors = {}, {}
    for name in state.layers:
        module = denoiser.get_submodule(name)
        codes, scale = _layer_weight(module)
        packed = module.weight_fmt == "int4" and codes.shape[1] % 2 == 0
        if codes is not None:
            tensors[f"{name}.codes"] = pack_int4(codes) if packed else codes
            tensors[f"{name}.weight_scale"] = scale
        if isinstance(module.act, ActQuantizer):
            tensors[f"{name}.act_scale"] = module.act.scale
            tensors[f"{name}.act_zero_point"] = module.act.zero_point
        layers[name] = {"segments": list(module.segment_sizes), "packed": packed,
                        "act": _act_entry(module.act), "lowered": state.lowered.get(name)}
    config = {"ptq_config": state.config, "num_steps": state.num_steps, "group_bounds": state.group_bounds,
              "layers": layers, "attention": list(state.attention), "calibration": state.calibration_record,
              "notes": list(state.notes)}
    return config, tensors


def _act_segments(entry: dict[str, Any], name: str, channels: int) -> list[int]:
    """The activation channel segments of layer ``name`` ([] for one segment), checked to cover its ``channels``
    input channels: other sizes loaded, and every call then failed in the split (or quantized the halves wrongly)."""
    segments = entry.get("segments", [0])
    if segments == [0]:
        return []
    if not _covers(segments, channels):
        raise ValueError(f"artifact layer {name!r}: act segments {segments!r} must be positive channel counts "
                         f"summing to the base layer's {channels} input channels (or [0]: one segment)")
    return segments


def _covers(sizes: Any, total: int) -> bool:
    """Whether ``sizes`` is a list of positive integers summing to ``total``."""
    return (isinstance(sizes, list) and all(isinstance(size, int) and not isinstance(size, bool) and size > 0
                                            for size in sizes) and sum(sizes) == total)


def _restore_act(entry: dict[str, Any] | None, name: str, tensors: dict[str, torch.Tensor],
                 selector: StepGroups | None, channels: int) -> nn.Module | None:
    """The activation quantizer of layer ``name`` (``channels`` input channels) from its manifest ``entry``."""
    if entry is None:
        return None
    if entry["mode"] not in ACT_ENTRY_MODES:  # anything but "dynamic" was restored as static
        raise ValueError(f"layer {name!r}: act mode must be one of {ACT_ENTRY_MODES}, got {entry['mode']!r}")
    segments = _act_segments(entry, name, channels)
    if entry["mode"] == "dynamic":
        return DynamicActQuantizer(entry["fmt"], entry["symmetric"], entry["channel_dim"],
                                   per_tensor=entry.get("per_tensor", False), segment_sizes=segments)
    shape = (selector.groups if selector is not None else 1, max(len(segments), 1))
    fmt = get_format(entry["fmt"])
    zero_points = (0, 0) if entry["symmetric"] or fmt.is_float else tuple(int(v) for v in fmt.unsigned_range())
    return ActQuantizer(tensors.take(f"{name}.act_scale", shape, "float", scales="positive"),
                        tensors.take(f"{name}.act_zero_point", shape, "int", values=zero_points), entry["fmt"],
                        entry["symmetric"], segments, entry["channel_dim"], selector)


def _restore_weight(source: nn.Module, name: str, entry: dict[str, Any], fmt: str,
                    tensors: TechniqueTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, columns), scales (out, S)) of layer ``name``, checked against the base layer and the
    saved format: a ValueError naming the tensor when a shape, dtype or code range does not fit."""
    rows, columns = source.weight.shape[0], source.weight[0].numel()
    segments = entry["segments"]
    if not _covers(segments, columns):
        raise ValueError(f"artifact layer {name!r}: segments {segments!r} must be positive column counts summing "
                         f"to the base layer's {columns} weight columns")
    if entry["packed"]:
        if fmt != "int4" or columns % 2:
            raise ValueError(f"artifact layer {name!r}: packed codes, but the weights are {fmt} with {columns} "
                             f"columns (packing holds int4 codes of an even column count)")
        codes = unpack_int4(tensors.take(f"{name}.codes", (rows, columns // 2), torch.uint8))
    else:
        grid = get_format(fmt)
        codes = tensors.take(f"{name}.codes", (rows, columns), FP8_DTYPE if grid.is_float else torch.int8,
                             values=None if grid.is_float else (int(grid.qmin), int(grid.qmax)), finite=grid.is_float)
    return codes, tensors.take(f"{name}.weight_scale", (rows, len(segments)), "float", scales="nonnegative")


def _restore_layer(source: nn.Module, name: str, entry: dict[str, Any], config: PTQConfig,
                   tensors: TechniqueTensors, selector: StepGroups | None) -> nn.Module:
    float_type = float_type_of(source)
    if float_type is None:
        raise ValueError(f"artifact layer {name!r} is a {type(source).__name__} in this base model; "
                         f"expected one of {[t.__name__ for t in QUANT_LAYER_TYPES]}")
    codes = scale = None  # activation-only quantization keeps the base's float weights
    if config.weights is not None:
        codes, scale = _restore_weight(source, name, entry, config.weights, tensors)
    act = _restore_act(entry["act"], name, tensors, selector, source.weight.shape[1])
    if act is not None and act.channel_dim != CHANNEL_DIMS[float_type]:
        raise ValueError(f"artifact layer {name!r}: activation channel dim {act.channel_dim} does not fit a "
                         f"{float_type.__name__}")
    layer = QUANT_LAYER_TYPES[float_type](source, codes, scale, entry["segments"], config.weights, act)
    return layer.to(source.weight.device)


def _check_saved_fields(config: dict[str, Any]) -> None:
    """ValueError naming a mistyped ``num_steps`` or layer ``lowered`` entry (a truthy "banana" lowered)."""
    steps = config["num_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {steps!r}")
    for name, entry in config["layers"].items():
        if entry["lowered"] is not None and not isinstance(entry["lowered"], str):
            raise ValueError(f"layer {name!r}: lowered must be a kernel name or null, got {entry['lowered']!r}")


def _valid_bounds(bounds: Any, count: int) -> bool:
    """Whether ``bounds`` lists ``count`` finite numbers, descending (NaN bounds put every step in group 0)."""
    if not isinstance(bounds, list) or len(bounds) != count:
        return False
    if not all(is_finite_number(bound)
               for bound in bounds):
        return False
    return all(earlier >= later for earlier, later in zip(bounds, bounds[1:]))


def restore_ptq(pipe: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Rebuild the saved quantized layers on ``pipe``'s denoiser (and lower the lowered ones)."""
    _, denoiser = find_denoiser(pipe)
    refuse_while_cached(denoiser, "restoring quantization")  # a manifest listing the cache first
    tensors = technique_tensors(tensors)
    ptq_config = PTQConfig.from_dict(config["ptq_config"])
    _check_saved_fields(config)
    bounds = config.get("group_bounds")  # artifacts saved before session 28: groups by position
    if bounds is not None and not _valid_bounds(bounds, ptq_config.timestep_groups - 1):
        raise ValueError(f"group_bounds must list timestep_groups - 1 = {ptq_config.timestep_groups - 1} "
                         f"finite timesteps in descending order, got {bounds!r}")
    selector = StepGroups(denoiser, ptq_config.timestep_groups, config["num_steps"], bounds) \
        if ptq_config.timestep_groups > 1 else None
    _check_attention_processors(pipe, config.get("attention", []))
    if config.get("attention") and ptq_config.attention is None:  # it loaded, then every call failed
        raise ValueError(f"attention lists {len(config['attention'])} modules, but ptq_config.attention is null: "
                         f"no format to quantize them in")
    layers = {name: _restore_layer(denoiser.get_submodule(name), name, entry, ptq_config, tensors, selector)
              for name, entry in config["layers"].items()}
    dtype = compute_dtype(denoiser)  # before any layer is swapped: the base's own float dtype
    lowered = {name: lower_layer(layers[name], dtype) for name, entry in config["layers"].items() if entry["lowered"]}
    _warn_on_other_kernels(config["layers"], lowered)
    final = {name: lowered.get(name) or layer for name, layer in layers.items()}
    state = PTQState(ptq_config.to_dict(), list(config["layers"]), config["num_steps"],
                     lowered={name: module.kind for name, module in lowered.items() if module is not None},
                     notes=list(dict.fromkeys(["restored from an artifact"] + _saved_notes(config))),  # re-saved
                     attention=list(config.get("attention", [])),
                     group_bounds=bounds, calibration_record=config.get("calibration"))
    note_lowering(state, lowered)
    install(pipe, final, state)


def _saved_notes(config: dict[str, Any]) -> list[str]:
    """quantize_'s notes for ``summary`` (unquantized attention, uncalibrated groups, reconstruction); artifacts
    saved before session 44 have none."""
    notes = config.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(note, str) for note in notes):
        raise ValueError(f"notes must list strings, got {notes!r}")
    return notes


def _check_attention_processors(pipe: Any, names: list[str]) -> None:
    """ArtifactError when the base's processors on the attention modules the artifact quantizes are ones
    attention quantization cannot wrap (attention slicing, xformers, a plain ``AttnProcessor``): the KeyError it
    gave called the artifact damaged, which saving again cannot mend."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"attention must list attention module names, got {names!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # the second install found our processor there: a KeyError naming a class (session 51 review)
        raise ValueError(f"attention names {repeated[:3]} more than once; each attention module is quantized once")
    fit, others = quantizable_attention(pipe)
    unknown = sorted(set(names) - set(fit) - {info.name for info in get_adapter(pipe).attention()})
    if unknown:  # they were reported as processors to change, listing none (session 49)
        raise ValueError(f"the artifact quantizes the attention of {unknown[:3]} ({len(unknown)} names), which are no "
                         f"attention modules of this base model")
    unfit = sorted(set(names) - set(fit))
    if unfit:
        raise ArtifactError(
            f"the artifact quantizes the attention of {len(names)} modules, but on this base {len(unfit)} of them use "
            f"processors attention quantization cannot wrap ({describe_processors(others)}; accepted: "
            f"{', '.join(cls.__name__ for cls in QUANT_PROCESSORS)}). Load onto a base with diffusers' default "
            f"processors (no attention slicing or xformers, no set_attn_processor) and change them after load")


def _warn_on_other_kernels(entries: dict[str, dict[str, Any]], lowered: dict[str, nn.Module | None]) -> None:
    """Lowering picks kernels for the device the base is on (oneDNN int8 convs need a VNNI CPU, ``_int_mm`` a
    GPU): say when this one lowers layers to other kernels than the saved pipeline ran, whose images then differ
    (within the lowering's tolerance) and whose speed may too."""
    kinds = {name: "simulated" if module is None else module.kind for name, module in lowered.items()}
    changed = Counter((entries[name]["lowered"], kind) for name, kind in kinds.items()
                      if kind != entries[name]["lowered"])
    if changed:
        moves = ", ".join(f"{count} {saved} -> {kind}" for (saved, kind), count in sorted(changed.items()))
        warnings.warn(f"this device lowers quantized layers to other kernels than the saved pipeline ran ({moves}): "
                      "its images differ slightly from the saved pipeline's; load onto a base on the device it was "
                      "saved from for a bit-exact round trip", stacklevel=user_stacklevel())


def check_attention_current(pipe: Any) -> None:
    """Refuse to save once quantized attention processors were replaced after quantize_
    (``set_attn_processor``, ``load_ip_adapter``): the artifact would restore them quantized."""
    _, denoiser = find_denoiser(pipe)
    replaced = replaced_attention(denoiser, get_state(denoiser).attention)
    if replaced:
        processor = type(denoiser.get_submodule(replaced[0]).processor).__name__
        raise ArtifactError(
            f"cannot save: {len(replaced)} attention modules that quantize_ quantized (attention="
            f"{get_state(denoiser).config['attention']!r}) now use other processors (e.g. {replaced[0]}: "
            f"{processor}), set after quantize_. The artifact would restore quantized attention, not "
            f"this pipeline's. Save before changing the processors, or quantize a base pipeline that "
            f"already has them (attention quantization replaces only "
            f"{', '.join(cls.__name__ for cls in QUANT_PROCESSORS)}).")


register_technique(TECHNIQUE, export_ptq, restore_ptq, check_attention_current)
