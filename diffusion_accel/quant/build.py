"""Build simulated quantized layers from float layers, calibrated ranges and the config."""

from __future__ import annotations

import math

import torch
from torch import nn

from .calibrate import Collected, LayerTarget, group_ranges, keeps_float_activations
from .configs import PTQConfig
from .formats import get_format
from .layers import CHANNEL_DIMS, QUANT_LAYER_TYPES, ActQuantizer, DynamicActQuantizer, QuantLayer, StepGroups
from .quantizers import activation_qparams, quantize_weight, segment_sizes, weight_scales


def weight_grid(module: nn.Module, config: PTQConfig, split: int | None,
                column_weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """(flattened weight (out, columns), scales (out, S) or None if fp, segment sizes) of ``module``.

    ``column_weights`` (columns,): per-column input mean squares, used by weight_scale "output_mse" (a layer without
    them, a grouped Conv2d, gets the plain "mse" search).
    """
    weight = module.weight.detach()
    w2d = weight.reshape(weight.shape[0], -1)
    unit = w2d.shape[1] // weight.shape[1]  # kh * kw for convs, 1 for Linear
    sizes = segment_sizes(w2d.shape[1], config.weight_granularity, config.group_size, split, unit)
    if config.weights is None:
        return w2d, None, sizes
    method = "mse" if config.weight_scale == "output_mse" and column_weights is None else config.weight_scale
    return w2d, weight_scales(w2d, get_format(config.weights), sizes, method, column_weights), sizes


def weight_codes(module: nn.Module, config: PTQConfig, split: int | None,
                 column_weights: torch.Tensor | None = None,
                 rounded: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, ...]]:
    """(codes (out, columns), scales (out, S), segment sizes) of ``module``'s weight; Nones if fp.

    ``rounded``: (codes, scales, sizes) already chosen (GPTQ), used as they are; default: the scale
    search of ``config`` and round to nearest.
    """
    if rounded is not None:
        codes, scale, sizes = rounded
        return codes, scale.float(), sizes
    w2d, scale, sizes = weight_grid(module, config, split, column_weights)
    if scale is None:
        return None, None, sizes
    return quantize_weight(w2d, scale, get_format(config.weights), sizes), scale.float(), sizes


def qparam_table(ranges: list[list[tuple[float, float]]], config: PTQConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, S) scales and zero points from ``ranges[segment][group] = (lo, hi)``."""
    fmt = get_format(config.activations)
    pairs = [[activation_qparams(lo, hi, fmt, config.act_symmetric) for lo, hi in per_group]
             for per_group in ranges]
    scale = torch.tensor([[p[0] for p in seg] for seg in pairs], dtype=torch.float32).T.contiguous()
    zero = torch.tensor([[p[1] for p in seg] for seg in pairs], dtype=torch.int32).T.contiguous()
    return scale, zero


def activation_quantizer(target: LayerTarget, collected: Collected, config: PTQConfig,
                         selector: StepGroups | None, channels: int) -> nn.Module | None:
    """The activation quantizer of ``target`` (None for weight-only configs)."""
    if config.activations is None or keeps_float_activations(target.name, config):
        return None
    channel_dim = CHANNEL_DIMS[target.float_type]
    if config.act_mode == "dynamic":
        return DynamicActQuantizer(config.activations, config.act_symmetric, channel_dim)
    if config.act_mode == "dynamic_per_tensor":
        halves = () if target.split is None else (target.split, channels - target.split)
        return DynamicActQuantizer(config.activations, config.act_symmetric, channel_dim, per_tensor=True,
                                   segment_sizes=halves)
    groups, step_group = config.timestep_groups, collected.step_group(selector)
    if target.split is None:
        ranges = [group_ranges(collected.plain, target.representative, groups, step_group)]
        sizes: tuple[int, ...] = ()
    else:
        inner = collected.split.inner
        ranges = [group_ranges(inner, f"{target.name}[{i}]", groups, step_group) for i in (0, 1)]
        sizes = (target.split, channels - target.split)
    _check_finite_ranges(target.name, ranges)
    scale, zero = qparam_table(ranges, config)
    return ActQuantizer(scale, zero, config.activations, config.act_symmetric or config.activations == "fp8",
                        sizes, channel_dim, selector)


def _check_finite_ranges(name: str, ranges: list[list[tuple[float, float]]]) -> None:
    """Refuse activation ranges holding NaN or inf, naming the layer (they have no scale)."""
    bad = next(((lo, hi) for per_group in ranges for lo, hi in per_group
                if not (math.isfinite(lo) and math.isfinite(hi))), None)
    if bad is not None:
        raise ValueError(f"the calibration inputs of layer {name!r} range over {bad}: NaN or inf values (the float "
                         f"model overflows or its weights are not finite); calibrate in float32 or bfloat16")


def build_layer(module: nn.Module, target: LayerTarget, collected: Collected, config: PTQConfig,
                selector: StepGroups | None) -> QuantLayer:
    """A QuantLinear / QuantConv2d replacing ``module``."""
    codes, scale, sizes = weight_codes(module, config, target.split, collected.column_weights(target.name),
                                       collected.rounded.get(target.name))
    channels = module.weight.shape[1]
    act = activation_quantizer(target, collected, config, selector, channels)
    layer_cls = QUANT_LAYER_TYPES[target.float_type]
    layer = layer_cls(module, codes, scale, sizes, config.weights, act)
    return layer.to(module.weight.device)
