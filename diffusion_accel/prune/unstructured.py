"""Unstructured and N:M pruning of one group of layers that share an input (OBS, Wanda, magnitude)."""

from __future__ import annotations

import torch
from torch import nn

from ..arch.base import LayerGroup
from ..calib import HessianCollector
from ..calib.hessian import UnobservedLayerError
from .allocate import SaliencyProfile, allocate_sparsity, error_curve, normalized_saliency
from .configs import PruneConfig
from .masks import magnitude_mask, wanda_mask
from .obs import no_tf32, obs_prune, upper_inverse_factor
from .record import PruneRecord
from .surgery import weight_matrix, write_weight_matrix


def skip_reason(layer: nn.Module, config: PruneConfig) -> str | None:
    """Why ``layer`` cannot take ``config``'s pattern, or None if it can."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"grouped Conv2d (groups={layer.groups})"
    nm = config.nm
    width = weight_matrix(layer).shape[1]
    if nm is not None and width % nm[1]:
        return f"input width {width} is not a multiple of M={nm[1]}"
    return None


def prune_matrix(weight: torch.Tensor, config: PruneConfig, hessian: torch.Tensor | None,
                 sq_norms: torch.Tensor | None, sparsity: float | None = None,
                 inverse_factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new 2-D weight, pruned mask) of ``weight`` (rows, d) by ``config.method``, at ``sparsity``
    (default ``config.target_sparsity``; global scope passes each layer's allocated share).
    ``inverse_factor``: OBS's factor of ``hessian`` from ``shared_inverse_factor``, reused."""
    nm = config.nm
    sparsity = config.target_sparsity if sparsity is None else sparsity
    if config.method == "obs":
        return obs_prune(weight, hessian, sparsity, nm=nm, blocksize=config.blocksize, damp=config.damp,
                         inverse_factor=inverse_factor)
    if config.method == "wanda":
        mask = wanda_mask(weight, sq_norms, sparsity, nm)
    else:
        mask = magnitude_mask(weight, sparsity, nm)
    return weight.masked_fill(mask, 0), mask


def shared_inverse_factor(config: PruneConfig,
                          hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """OBS's upper Cholesky factor of the damped H^-1 (and dead-input mask) of a group's shared
    Hessian, computed once for all its layers and sparsities; None for Wanda and magnitude."""
    if config.method != "obs" or hessian is None:
        return None
    with no_tf32():
        return upper_inverse_factor(hessian, config.damp)


def observed_inputs(collector: HessianCollector | None, name: str,
                    full: bool) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """(Hessian or None, squared input norms or None) of ``name``; None if it saw no inputs."""
    if collector is None:
        return None, None
    try:
        sq_norms = collector.input_sq_norms(name)
    except UnobservedLayerError:
        return None
    return (collector.hessian(name) if full else None), sq_norms


def prune_layer_group(denoiser: nn.Module, group: LayerGroup, config: PruneConfig,
                      collector: HessianCollector | None, record: PruneRecord,
                      layer_sparsity: dict[str, float] | None = None,
                      unobserved: dict[str, int] | None = None) -> dict[str, str]:
    """Prune every layer of ``group`` (one Hessian: its first layer's input) at its sparsity in
    ``layer_sparsity`` (global scope) or the config's; returns skipped reasons. ``unobserved`` gets
    {first layer: input columns zero on every calibration input}."""
    inputs = observed_inputs(collector, group.layers[0], config.method == "obs")
    if inputs is None:
        return {name: "no calibration input reached it" for name in group.layers}
    norms = inputs[1] if inputs[1] is not None else (None if inputs[0] is None else torch.diagonal(inputs[0]))
    silent = 0 if norms is None else int((norms == 0).sum())
    if silent and unobserved is not None:
        unobserved[group.layers[0]] = silent
    skipped: dict[str, str] = {}
    factor = shared_inverse_factor(config, inputs[0])
    for name in group.layers:
        layer = denoiser.get_submodule(name)
        reason = skip_reason(layer, config)
        if reason is not None:
            skipped[name] = reason
            continue
        new_weight, _ = prune_matrix(weight_matrix(layer), config, *inputs,
                                     sparsity=(layer_sparsity or {}).get(name), inverse_factor=factor)
        write_weight_matrix(layer, new_weight)
        record.note_masked(name)
    return skipped


def layer_error_curves(denoiser: nn.Module, group: LayerGroup, config: PruneConfig,
                       collector: HessianCollector, grid: list[float]) -> dict[str, tuple[list[float], int]]:
    """{layer: (relative output error at every ``grid`` sparsity, weight count)} of ``group``'s
    prunable layers, each pruned by ``config.method`` on a copy (``collector`` holds full Hessians)."""
    inputs = observed_inputs(collector, group.layers[0], True)
    if inputs is None:
        return {}
    curves, factor = {}, shared_inverse_factor(config, inputs[0])
    for name in group.layers:
        layer = denoiser.get_submodule(name)
        if skip_reason(layer, config) is None:
            weight = weight_matrix(layer)
            curve = error_curve(weight, inputs[0], lambda s: prune_matrix(
                weight, config, *inputs, sparsity=s, inverse_factor=factor)[0], grid)
            curves[name] = (curve, weight.numel())
    return curves


def saliency_layer_sparsity(denoiser: nn.Module, groups: list[LayerGroup], config: PruneConfig,
                            collector: HessianCollector | None) -> dict[str, float]:
    """{layer: sparsity} for allocation="saliency" from the dense weights and, unless magnitude, the
    input norms in ``collector`` (one diagonal-only sweep of the dense model)."""
    profiles = {}
    for group in groups:
        inputs = observed_inputs(collector, group.layers[0], full=False)
        if inputs is None:
            continue
        for name in group.layers:
            layer = denoiser.get_submodule(name)
            if skip_reason(layer, config) is None:
                saliency = normalized_saliency(weight_matrix(layer), inputs[1])
                profiles[name] = SaliencyProfile(saliency)
    return allocate_sparsity(profiles, config.target_sparsity)
