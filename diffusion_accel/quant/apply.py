"""``quantize_``: validate, calibrate, build every quantized layer, then swap them in (all or nothing).

A registry maps config types to handlers (a new method is one dataclass and one decorated function).
Nothing on the pipeline changes until every layer is built; a failure while swapping,
reconstructing or lowering restores the original layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..arch.registry import check_no_inference_weights, check_plain_weights, find_denoiser
from ..artifact import base_fingerprint, mark_applied, marks_restored_on_error
from ..calib import Calibration, check_given_calibration
from ..hooks import attach_tracker, detach_tracker_if_unused, get_tracker, refuse_while_cached
from ..progress import showing_progress
from ..stacklevel import user_stacklevel
from .attention import (QUANT_PROCESSORS, describe_processors, install_attention, quantizable_attention,
                        replaced_attention, restore_attention)
from .build import build_layer, weight_grid
from .calibrate import (Collected, FilterFn, LayerTarget, collect, hessian_sweep, hessian_targets,
                        keeps_float_activations, select_layers)
from .configs import PTQConfig, check_calibration_choices
from .formats import get_format
from .gptq import gptq_round_all
from .layers import StepGroups, timestep_bounds
from .lower import lower_
from .quantizers import segment_rescaler
from .reconstruct import reconstruct_blocks
from .state import TECHNIQUE, TRACKER_CLIENT, PTQState, get_state, set_state, swap_module

Handler = Callable[[Any, Any, Calibration | None, FilterFn | None], Any]
_HANDLERS: dict[type, Handler] = {}


def register_quant_method(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(pipe, config, calib, filter_fn) -> pipe`` for configs of ``config_type``."""
    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler
    return decorate


@torch.inference_mode(False)  # under a caller's inference_mode AdaRound cannot train (nor layers update)
def quantize_(pipe: Any, config: Any = None, calib: Calibration | None = None,
              filter_fn: FilterFn | None = None, *, progress: bool = False) -> Any:
    """Quantize the denoiser of ``pipe`` in place per ``config`` (default W8A8); returns ``pipe``.
    ``calib``: a ``Calibration`` from ``da.calibrate`` (its stored trajectory is replayed; default: a
    calibration run of the config's ``calib_*`` settings). ``filter_fn(module, name) -> bool``: which of
    the adapter's eligible layers to quantize (name globs: ``PTQConfig(include=..., exclude=...)``).
    ``progress``: tqdm bars for the calibration passes, GPTQ groups and reconstructed blocks."""
    config = PTQConfig() if config is None else config
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"quantize_ got a {type(config).__name__}; accepted configs: "
                        f"{', '.join(t.__name__ for t in _HANDLERS)}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a function (module, name) -> bool, got {filter_fn!r:.60}; for name "
                        f"globs use PTQConfig(include=..., exclude=...)")
    _, denoiser = find_denoiser(pipe)
    check_given_calibration(calib, denoiser)
    check_plain_weights(denoiser, "quantize_")
    refuse_while_cached(denoiser, "quantize_")
    with showing_progress(progress), marks_restored_on_error(pipe):
        return handler(pipe, config, calib, filter_fn)


@register_quant_method(PTQConfig)
def _ptq(pipe: Any, config: PTQConfig, calib: Calibration | None, filter_fn: FilterFn | None) -> Any:
    _, denoiser = find_denoiser(pipe)
    if get_state(denoiser) is not None:
        raise ValueError("this pipeline's denoiser is already quantized; quantize a fresh base pipeline")
    check_calibration_choices(config)
    if filter_fn is not None and config.weights is None and config.activations is None:  # it was never called
        raise ValueError("filter_fn selects weight and activation layers, but weights=None and activations=None "
                         "quantize none (attention quantization covers every attention module); drop it")
    if config.reconstruct:
        check_no_inference_weights(denoiser, "quantize_ with block reconstruction (reconstruct=True)")
    targets = select_layers(pipe, config, filter_fn) if config.weights or config.activations else []
    attention, others = _attention_targets(pipe, config)
    collected = collect(pipe, config, targets, calib)
    base_fingerprint(pipe)
    if config.weight_rounding == "gptq":
        collected.rounded = _gptq(pipe, denoiser, config, targets, collected, calib)
    bounds = timestep_bounds(collected.calibration.timesteps, config.timestep_groups, collected.num_steps) \
        if config.timestep_groups > 1 and collected.calibration is not None else None
    selector = StepGroups(denoiser, config.timestep_groups, collected.num_steps, bounds) \
        if config.timestep_groups > 1 else None
    layers = {t.name: build_layer(denoiser.get_submodule(t.name), t, collected, config, selector)
              for t in targets}
    state = PTQState(config.to_dict(), [t.name for t in targets], collected.num_steps,
                     calibration=collected.calibration.summary() if collected.calibration else "",
                     attention=attention, group_bounds=None if bounds is None else list(bounds),
                     calibration_record=collected.calibration.provenance() if collected.calibration else None)
    if others:
        state.notes.append(f"{sum(others.values())} attention modules stay unquantized (processors not "
                           f"replaced: {describe_processors(others)})")
    uncalibrated = _uncalibrated_groups_note(config, collected, selector)
    if uncalibrated:
        warnings.warn(uncalibrated, stacklevel=user_stacklevel())
        state.notes.append(uncalibrated)
    install(pipe, layers, state, lambda originals: _finish(pipe, config, collected, originals))
    return pipe


def _uncalibrated_groups_note(config: PTQConfig, collected: Collected, selector: StepGroups | None) -> str | None:
    """A sentence when some timestep groups hold no calibrated step (they use the range over all steps: the
    same scales as one group, so those groups buy nothing), else None."""
    if selector is None or collected.calibration is None:
        return None
    groups, steps, calibration = config.timestep_groups, collected.num_steps, collected.calibration
    calibrated = sorted(step for step in calibration.selected_steps if step in calibration.timesteps)
    step_group = collected.step_group(selector)
    observed = {step_group(step) for step in calibrated}
    empty = [group for group in range(groups) if group not in observed]
    if not empty:
        return None
    return (f"timestep groups {empty} of {groups} hold none of the calibrated steps {calibrated} (of {steps}): "
            f"they use the range over all steps; "
            f"calibrate more steps (calib_steps / calib_num_steps) or use fewer groups")


def _gptq(pipe: Any, denoiser: nn.Module, config: PTQConfig, targets: list[LayerTarget],
          collected: Collected, calib: Calibration | None) -> dict:
    """(GPTQ codes, scales, segment sizes) of every target, for ``build_layer``."""
    def grid(target: LayerTarget) -> tuple:
        module, column_weights = denoiser.get_submodule(target.name), collected.column_weights(target.name)
        w2d, scale, sizes = weight_grid(module, config, target.split, column_weights)
        fmt = get_format(config.weights)
        rescale = segment_rescaler(fmt, sizes, config.weight_scale, column_weights) \
            if config.gptq_group_scales == "lazy" else None
        return w2d, scale, sizes, fmt, rescale
    sweep = hessian_sweep(pipe, config, calib, first_pass=collected.calibration)
    hessian_layers = set(hessian_targets(pipe, targets))  # others (grouped convs) are rounded to nearest
    return gptq_round_all(denoiser, [t for t in targets if t.name in hessian_layers], config, sweep, grid)


def _attention_targets(pipe: Any, config: PTQConfig) -> tuple[list[str], dict[str, int]]:
    """Attention modules to quantize and the other processors; raises if attention finds none."""
    if config.attention is None:
        return [], {}
    attention, others = quantizable_attention(pipe)
    if not attention:
        accepted = ", ".join(cls.__name__ for cls in QUANT_PROCESSORS)
        raise ValueError(f"PTQConfig.attention={config.attention!r}: {type(find_denoiser(pipe)[1]).__name__} "
                         f"has no attention with a processor we can quantize (its processors: "
                         f"{describe_processors(others)}; accepted: {accepted})")
    return attention, others


def _finish(pipe: Any, config: PTQConfig, collected: Collected, originals: dict[str, nn.Module]) -> None:
    """Post-install steps that may fail (and then roll back): reconstruction, lowering."""
    if config.reconstruct:
        selector = _step_groups(find_denoiser(pipe)[1])
        changed = collected.calibration is not None and collected.calibration.trajectory_state_change is not None
        reconstruct_blocks(pipe, config, collected.samples, originals, selector, collected.step_group(selector),
                           float_targets=changed)
    if config.lower:
        lower_(pipe)


def install(pipe: Any, layers: dict[str, nn.Module], state: PTQState,
            finish: Callable[[dict[str, nn.Module]], None] | None = None) -> None:
    """Swap ``layers`` in, attach the step tracker, run ``finish(originals)``; roll back on error."""
    _, denoiser = find_denoiser(pipe)
    originals: dict[str, nn.Module] = {}
    processors: dict[str, Any] = {}
    try:
        for name, layer in layers.items():
            originals[name] = swap_module(denoiser, name, layer)
        set_state(denoiser, state)
        if state.attention:  # filled as it goes: interrupted part-way, the swapped ones are put back
            install_attention(denoiser, state.attention, state.config["attention"], state.config["softmax_bits"],
                              processors)
        if state.config["timestep_groups"] > 1:
            selector = _step_groups(denoiser)
            attach_tracker(denoiser, pipeline=pipe).register_client(
                TRACKER_CLIENT, on_call=None if selector is None else selector.note_call)
        if finish is not None:
            finish(originals)
        mark_applied(pipe, TECHNIQUE, replaced=_weights_replaced(layers))  # their pruned float weights dropped
    except BaseException:  # (quantize_ puts the marks back: interrupted in mark_applied, the layers stayed)
        restore_attention(denoiser, processors)
        _rollback(denoiser, originals)
        raise


def _step_groups(denoiser: nn.Module) -> StepGroups | None:
    """The timestep-group selector the quantized layers share (None without timestep groups)."""
    selectors = (getattr(module, "selector", None) for module in denoiser.modules())
    return next((found for found in selectors if isinstance(found, StepGroups)), None)


def _weights_replaced(layers: dict[str, nn.Module]) -> list[str]:
    """The layers whose quantized weights the PTQ export stores: activation-only layers (``weights=None``)
    compute with the float weight they wrapped, which only an earlier technique's export (pruning's) holds."""
    return [name for name, layer in layers.items() if getattr(layer, "weight_fmt", None) is not None]


def _rollback(denoiser: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        swap_module(denoiser, name, module)
    set_state(denoiser, None)
    tracker = get_tracker(denoiser)
    if tracker is not None:
        tracker.unregister_client(TRACKER_CLIENT)
        detach_tracker_if_unused(denoiser)


def summary(pipe: Any) -> str:
    """What PTQ did to ``pipe``: config, layer counts by kind, lowering, notes."""
    _, denoiser = find_denoiser(pipe)
    state = get_state(denoiser)
    if state is None:
        return f"{type(denoiser).__name__}: not quantized"
    config = state.config
    kinds: dict[str, int] = {}
    for name in state.layers:
        kind = state.lowered.get(name, "simulated")
        kinds[kind] = kinds.get(kind, 0) + 1
    symmetric = config["act_symmetric"] or config["activations"] == "fp8"  # fp8 has no zero point
    weights = "float" if config["weights"] is None else (
        f"{config['weights']} ({config['weight_granularity']}, scale {config['weight_scale']}, "
        f"rounding {'AdaRound' if config['reconstruct'] else config.get('weight_rounding', 'nearest')})")
    lines = [f"PTQ of {type(denoiser).__name__}: weights={weights}, "
             f"activations=" + ("float" if config["activations"] is None else
                                f"{config['activations']} ({config['act_mode']}, {config['act_method']}, "
                                f"{'sym' if symmetric else 'asym'}, timestep groups {config['timestep_groups']})"),
             f"  layers quantized: {len(state.layers)}; execution: "
             + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))]
    float_inputs = [name for name in state.layers if keeps_float_activations(name, config)]
    if float_inputs and config["activations"] is not None:
        lines.append(f"  activations kept in floating point (act_exclude {list(config['act_exclude'])}): "
                     f"{len(float_inputs)} layers")
    if state.attention:
        lines.append(f"  attention matmuls: {len(state.attention)} modules (Q/K/V {config['attention']} dynamic "
                     f"per batch row, softmax {config['softmax_bits']}-bit unsigned; simulated)")
        pag_layers = getattr(pipe, "pag_applied_layers", None)  # this pipeline's, now: not stored in the notes
        if pag_layers:  # diffusers swaps PAG's processors in per call and ours back after: counted quantized
            lines.append(f"  PAG puts its own float processors on the self-attention of its layers "
                         f"{list(pag_layers)} during calls with pag_scale > 0: those run unquantized then")
        replaced = replaced_attention(denoiser, state.attention)
        if replaced:
            lines.append(f"  warning: {len(replaced)} of them no longer run the quantizing processor (replaced "
                         f"after quantize_, e.g. by enable_attention_slicing or set_attn_processor: {replaced[0]}); "
                         "their attention runs unquantized until the pipeline is quantized or loaded again")
    lines += [f"  note: {note}" for note in state.notes + state.lowering_notes]
    return "\n".join(lines)
