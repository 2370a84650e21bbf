"""Keep peft from half-wrapping an accelerated denoiser with LoRA adapters.

diffusers' ``add_adapter`` and ``load_lora_adapter`` (which ``pipe.load_lora_weights`` calls) let peft
wrap every targeted layer in turn. peft wraps only plain torch layers: on a layer a technique replaced
(an int8 GEMM layer, a simulated ``QuantLayer``) it raises, after wrapping the plain layers before it
(kept-float ones such as the time embedding). Those kept their LoRA: ``add_adapter`` left the denoiser
computing other images; ``load_lora_adapter`` deletes the adapter but leaves the wrappers.

From the first technique on, both methods are guarded on the denoiser instance: a LoRA whose targets
include a replaced layer is refused before anything changes, and any other failure unwraps the layers the
call wrapped, so the denoiser is left as it was. Flux's ``load_lora_weights`` first widens every layer
narrower than the LoRA's tensors (Control LoRAs), which swapped structured-pruned layers for zero-padded
base-size ones, and reads each targeted layer's ``weight`` (a KeyError on a replaced layer): its widening
step is guarded to check the LoRA's targets before any layer changes.

IP-Adapters are guarded too: diffusers builds their projections at the config's width and rebuilds every
other attention processor with no arguments, so one loaded after structured pruning of attention heads
computed attention over the wrong tokens, silently, and after ``quantize_(attention=...)`` its load (and
``unload_ip_adapter``, after dropping the image encoder) failed with a TypeError from our processors.

The two steps that run on the pipeline (Flux's widening, ``unload_ip_adapter``) are guarded on diffusers'
loader mixin classes, once, by pass-through wrappers that check only denoisers with a technique applied: a
pipeline built from an accelerated one's components (``FluxImg2ImgPipeline(**pipe.components)``,
``from_pipe``) shares the denoiser but not the instance guards of the pipeline that ``mark_applied`` saw,
and its ``load_lora_weights`` widened pruned layers (every later call of both pipelines failed) until
session 51.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

from .arch.registry import adapter_wrapped_layers
from .pretrained_guard import install_method

ADD_METHOD = "add_adapter"
LOAD_METHOD = "load_lora_adapter"
PIPELINE_METHOD = "load_lora_weights"
IP_LOAD_METHOD = "_load_ip_adapter_weights"  # on the denoiser: what load_ip_adapter calls after the image encoder
IP_UNLOAD_METHOD = "unload_ip_adapter"  # on the pipeline's IP-Adapter mixin
GUARDED_ADAPTER_METHODS = (ADD_METHOD, LOAD_METHOD, IP_LOAD_METHOD)  # on the denoiser
EXPAND_METHOD = "_maybe_expand_transformer_param_shape_or_error_"  # Flux's load_lora_weights: widens layers first
_CLASS_GUARD_MODULES = ("diffusers.loaders.lora_pipeline", "diffusers.loaders.ip_adapter")
_CLASS_GUARD_MARK = "__diffusion_accel_guard__"  # on a wrapper: the mixin's method is already guarded
_LORA_KEY_MARK = ".lora_"  # "<module>.lora_A.weight", "<module>.lora_B.<adapter>.weight", ...
_LOKR_KEY_MARK = ".lokr_"  # LoKr factors: "<module>.lokr_w1", ...
ALL_LINEAR = "all-linear"  # peft's target_modules shorthand


class AdapterOnReplacedLayerError(ValueError):
    """A LoRA adapter targets a layer that a technique replaced (peft cannot wrap it)."""


def install_adapter_guards(denoiser: nn.Module) -> None:
    """Guard ``denoiser.add_adapter`` / ``load_lora_adapter`` / ``_load_ip_adapter_weights`` where its class has
    them, and (once per process) the pipeline-side steps on diffusers' loader mixins."""
    for method, guarded in ((ADD_METHOD, _guarded_add_adapter), (LOAD_METHOD, _guarded_load_lora_adapter),
                            (IP_LOAD_METHOD, _guarded_load_ip_adapter)):
        install_method(denoiser, method, guarded)
    install_mixin_guards()


def install_mixin_guards() -> None:
    """Wrap Flux's widening step and every ``unload_ip_adapter`` of diffusers' loader mixins (where a class
    defines them) with checks that run only for a denoiser with a technique applied; idempotent."""
    import importlib

    for module_name in _CLASS_GUARD_MODULES:
        module = importlib.import_module(module_name)
        for owner in vars(module).values():
            if not isinstance(owner, type) or owner.__module__ != module_name:
                continue
            if isinstance(vars(owner).get(EXPAND_METHOD), classmethod):
                _wrap(owner, EXPAND_METHOD, _check_expand, classmethod)
            if callable(vars(owner).get(IP_UNLOAD_METHOD)):
                _wrap(owner, IP_UNLOAD_METHOD, _check_unload_ip_adapter, None)


def _wrap(owner: type, method: str, check: Callable[[dict[str, Any]], None], kind: type | None) -> None:
    """Replace ``owner.method`` by a wrapper calling ``check(bound arguments)`` first (pass-through wrappers:
    the checks return at once for denoisers without techniques)."""
    original = vars(owner)[method]
    function = original.__func__ if kind is classmethod else original
    if getattr(function, _CLASS_GUARD_MARK, False):
        return
    signature = inspect.signature(function)

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check(signature.bind(*args, **kwargs).arguments)
        return function(*args, **kwargs)

    setattr(guarded, _CLASS_GUARD_MARK, True)
    setattr(owner, method, kind(guarded) if kind is classmethod else guarded)


def _accelerated(denoiser: Any) -> bool:
    from .artifact import techniques_on

    return isinstance(denoiser, nn.Module) and bool(techniques_on(denoiser))


def replaced_layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """Layers of ``denoiser`` that a technique swapped for one of this package's modules, by name."""
    return {name: module for name, module in denoiser.named_modules()
            if name and type(module).__module__.startswith(f"{__package__}.")}


def _guarded_add_adapter(model: nn.Module, adapter_config: Any, *args: Any, **kwargs: Any) -> Any:
    _refuse_targets(model, ADD_METHOD, _config_targets(adapter_config, replaced_layers(model)))
    return _rolled_back_on_error(model, lambda: type(model).add_adapter(model, adapter_config, *args, **kwargs))


def _guarded_load_lora_adapter(model: nn.Module, source: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(source, dict):
        prefix, replaced = kwargs.get("prefix", args[0] if args else "transformer"), replaced_layers(model)
        targets = lora_targets(source, prefix)
        _refuse_targets(model, LOAD_METHOD, [name for name in targets if name in replaced])
        _refuse_resized_targets(model, targets, _own_lora_tensors(source, prefix))
    return _rolled_back_on_error(model, lambda: type(model).load_lora_adapter(model, source, *args, **kwargs))


def _config_targets(adapter_config: Any, replaced: dict[str, nn.Module]) -> list[str]:
    """The ``replaced`` layers a peft config targets. peft's "all-linear" expands to ``nn.Linear`` layers alone,
    which ours are not: it wrapped 2 of 83 Linears of a W8A8 UNet, silently (its regex check matches no name)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = getattr(adapter_config, "target_modules", None)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return [name for name, module in replaced.items() if hasattr(module, "in_features")]
    return [name for name in replaced if check_target_module_exists(adapter_config, name)]


def _check_expand(arguments: dict[str, Any]) -> None:
    """Flux's ``load_lora_weights`` widens every Linear narrower than the LoRA's tensors (Control LoRAs) before it
    loads anything: on a structured-pruned transformer it swapped the pruned layers for zero-padded base-size ones,
    then the ``load_lora_adapter`` guard refused "Nothing was changed" and every later call failed (until session
    46); on a quantized one it read ``<layer>.weight`` (a KeyError). The LoRA's targets are checked here, before
    any layer changes."""
    transformer, lora_state_dict = arguments.get("transformer"), arguments.get("lora_state_dict")
    if not lora_state_dict or not _accelerated(transformer):
        return
    prefix = arguments.get("prefix") or getattr(arguments.get("cls"), "transformer_name", "transformer")
    targets = lora_targets(lora_state_dict, prefix)
    replaced = replaced_layers(transformer)
    _refuse_targets(transformer, PIPELINE_METHOD, [name for name in targets if name in replaced])
    _refuse_resized_targets(transformer, targets, _own_lora_tensors(lora_state_dict, prefix), PIPELINE_METHOD)


def _check_unload_ip_adapter(arguments: dict[str, Any]) -> None:
    """``unload_ip_adapter`` drops the denoiser's image projection, then rebuilds our attention processors
    without their settings (a TypeError, the IP-Adapter gone): refused first on a quantized denoiser."""
    from .arch.registry import UnsupportedModelError, find_denoiser

    try:
        _, denoiser = find_denoiser(arguments.get("self"))
    except UnsupportedModelError:
        return
    if _accelerated(denoiser):
        _refuse_quantized_processors(denoiser, IP_UNLOAD_METHOD)


def _guarded_load_ip_adapter(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from .prune.record import get_record

    record = get_record(model)
    resized = [name for name in (record.base_shapes if record is not None else {})
               if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
    if resized:
        raise AdapterOnReplacedLayerError(
            f"load_ip_adapter() cannot add an IP-Adapter here: structured pruning removed attention heads (e.g. in "
            f"{resized[0]}), and diffusers builds the adapter's to_k_ip / to_v_ip at the base model's width, so its "
            f"attention would run over the wrong tokens. Nothing was changed. Load the IP-Adapter before prune_.")
    _refuse_quantized_processors(model, "load_ip_adapter")
    return getattr(type(model), IP_LOAD_METHOD)(model, *args, **kwargs)


def _refuse_quantized_processors(model: nn.Module, method: str) -> None:
    """diffusers rebuilds the attention processors it does not replace as ``processor.__class__()``: ours,
    quantize_'s attention processors, need their format (a TypeError after part of the pipeline changed)."""
    from .quant.attention import quantizing_processors

    quantized = quantizing_processors(model)
    if quantized:
        raise AdapterOnReplacedLayerError(
            f"{method}() cannot run on this {type(model).__name__}: quantize_(attention=...) replaced {len(quantized)} "
            f"attention processors (e.g. {quantized[0]}), which diffusers would rebuild without their settings. "
            f"Nothing was changed. Load or unload IP-Adapters before quantize_, or quantize without attention.")


def lora_targets(state_dict: dict[str, Any], prefix: str | None) -> list[str]:
    """Module names a diffusers-format LoRA (or LoKr) state dict adapts (keys ``[prefix.]<module>.lora_...``); the
    older ``<module>.lora.down.weight`` keys are converted as ``load_lora_adapter`` converts them (they passed the
    guard: peft's raw errors followed, and a long 'size mismatch' list after structured pruning)."""
    own = _own_lora_tensors(state_dict, prefix)
    names = {key.split(mark)[0] for key in own for mark in (_LORA_KEY_MARK, _LOKR_KEY_MARK) if mark in key}
    return sorted(names)


def _own_lora_tensors(state_dict: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    """The state dict's entries under ``prefix.``, prefix removed, in peft's key format."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    lead = f"{prefix}." if prefix else ""
    own = {key[len(lead):]: value for key, value in state_dict.items() if key.startswith(lead)}
    if own and "lora_A" not in next(iter(own)) and not any(_LOKR_KEY_MARK in key for key in own):
        own = convert_unet_state_dict_to_peft(own)
    return own


def _fits_layer(own: dict[str, Any], name: str, layer: nn.Module) -> bool:
    """Whether the LoRA's A / B tensors for ``name`` have ``layer``'s current input / output widths (a LoRA trained
    on the pruned model); False for other adapter types and missing tensors."""
    down = [value for key, value in own.items() if key.startswith(f"{name}.lora_A")]
    up = [value for key, value in own.items() if key.startswith(f"{name}.lora_B")]
    weight = getattr(layer, "weight", None)
    if not down or not up or weight is None or weight.dim() != 2:
        return False
    return all(tensor.shape[1] == weight.shape[1] for tensor in down) and all(
        tensor.shape[0] == weight.shape[0] for tensor in up)


def _refuse_targets(model: nn.Module, method: str, targeted: list[str]) -> None:
    if not targeted:
        return
    from .artifact import applied_techniques

    layer = model.get_submodule(targeted[0])
    raise AdapterOnReplacedLayerError(
        f"{method}() cannot put a LoRA adapter on {targeted[0]} ({type(layer).__name__})"
        f"{f' or {len(targeted) - 1} more' if len(targeted) > 1 else ''}: techniques "
        f"{applied_techniques(model)} replaced {'these layers' if len(targeted) > 1 else 'it'}, and peft "
        f"wraps only plain torch layers (it would wrap the plain ones, then fail). Nothing was changed. "
        f"Merge the LoRA into the base pipeline before applying the techniques: pipe.load_lora_weights(...), "
        f"pipe.fuse_lora(), pipe.unload_lora_weights(), then quantize_ / prune_ (feature caching alone "
        f"works with unmerged adapters).")


def _refuse_resized_targets(model: nn.Module, targets: list[str], own: dict[str, Any],
                            method: str = LOAD_METHOD) -> None:
    """A LoRA trained on the base model does not fit layers structured pruning made smaller (peft's 'size
    mismatch' listed every tensor, dozens of lines, without saying why); one whose tensors fit them (trained on the
    pruned model) loads."""
    from .prune.record import get_record

    record = get_record(model)
    resized = [name for name in targets if record is not None and name in record.base_shapes
               and not _fits_layer(own, name, model.get_submodule(name))]
    if resized:
        layer = model.get_submodule(resized[0])
        raise AdapterOnReplacedLayerError(
            f"{method}() cannot load this LoRA: it adapts {resized[0]}"
            f"{f' and {len(resized) - 1} more layers' if len(resized) > 1 else ''}, which structured pruning made "
            f"smaller (weight {record.base_shapes[resized[0]]} -> {list(layer.weight.shape)}), and its tensors have "
            f"the base model's shapes. Nothing was changed. Merge the LoRA into the base pipeline before pruning: "
            f"pipe.load_lora_weights(...), pipe.fuse_lora(), pipe.unload_lora_weights(), then prune_.")


def _rolled_back_on_error(model: nn.Module, call: Callable[[], Any]) -> Any:
    """Run ``call``; if it raises, unwrap the adapter layers it added, drop the adapters it added to layers wrapped
    before (they kept a failed adapter's lora_A / lora_B until session 49) and restore the peft bookkeeping."""
    wrapped_before = set(adapter_wrapped_layers(model))
    adapters_before = {name: _adapter_names(model.get_submodule(name)) for name in wrapped_before}
    configs_before = dict(getattr(model, "peft_config", {}) or {})
    had_configs = "peft_config" in vars(model)
    loaded_flag = getattr(model, "_hf_peft_config_loaded", None)
    try:
        return call()
    except BaseException:
        for name in adapter_wrapped_layers(model):
            layer = model.get_submodule(name)
            if name not in wrapped_before:
                _replace(model, name, layer.base_layer)
                continue
            for adapter in _adapter_names(layer) - adapters_before[name]:
                layer.delete_adapter(adapter)
        if had_configs:
            model.peft_config = configs_before
        elif "peft_config" in vars(model):
            del model.peft_config
        if loaded_flag is not None:
            model._hf_peft_config_loaded = loaded_flag
        raise


def _adapter_names(layer: nn.Module) -> set[str]:
    """The adapters a peft-wrapped layer holds (the keys of its ``adapter_layer_names`` dicts: lora_A, ...)."""
    return {key for attribute in getattr(layer, "adapter_layer_names", ()) for key in getattr(layer, attribute, {})}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
