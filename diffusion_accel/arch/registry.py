"""Registry from denoiser classes to adapters, and the lookup from a pipeline to its denoiser."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import DenoiserAdapter

_ADAPTERS: dict[str, type[DenoiserAdapter]] = {}

# Pipeline attributes that may hold the denoiser, in lookup order.
DENOISER_COMPONENTS = ("unet", "transformer")


class UnsupportedModelError(TypeError):
    """Raised for a pipeline or denoiser no adapter supports; the message lists the supported ones."""


def register_adapter(cls: type[DenoiserAdapter]) -> type[DenoiserAdapter]:
    """Class decorator: register ``cls`` for every class name in ``cls.denoiser_classes``."""
    if not cls.denoiser_classes:
        raise ValueError(f"adapter {cls.__name__} declares no denoiser_classes")
    for class_name in cls.denoiser_classes:
        _ADAPTERS[class_name] = cls
    return cls


def supported_denoisers() -> list[str]:
    """Class names of all supported denoisers, sorted."""
    _ensure_builtin_adapters()
    return sorted(_ADAPTERS)


def _ensure_builtin_adapters() -> None:
    # Importing the package registers the built-in adapters (decorators run at import).
    from . import families  # noqa: F401


def _adapter_class_for(denoiser: nn.Module) -> type[DenoiserAdapter] | None:
    _ensure_builtin_adapters()
    for klass in type(denoiser).__mro__:
        if klass.__name__ in _ADAPTERS:
            return _ADAPTERS[klass.__name__]
    return None


def _unsupported_message(what: str) -> str:
    return f"{what} is not supported; supported denoisers: {', '.join(supported_denoisers())}"


def _unwrap_compiled(module: Any) -> Any:
    """The original module behind a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``)."""
    return getattr(module, "_orig_mod", module)


def find_denoiser(pipe: Any) -> tuple[str, nn.Module]:
    """Return ``(component_name, denoiser)`` of a diffusers pipeline (or accept a bare denoiser).

    A ``torch.compile``d denoiser is looked through: the original module is returned.
    """
    pipe = _unwrap_compiled(pipe)
    if isinstance(pipe, nn.Module) and _adapter_class_for(pipe) is not None:
        return "", pipe
    for component in DENOISER_COMPONENTS:
        candidate = _unwrap_compiled(getattr(pipe, component, None))
        if isinstance(candidate, nn.Module):
            if _adapter_class_for(candidate) is None:
                raise UnsupportedModelError(
                    _unsupported_message(f"denoiser {type(candidate).__name__} of {type(pipe).__name__}"))
            return component, candidate
    raise UnsupportedModelError(_unsupported_message(
        f"{type(pipe).__name__} (no 'unet' or 'transformer' component found)"))


def find_any_denoiser(pipe: Any) -> tuple[str, nn.Module]:
    """``find_denoiser``, else the first standard denoiser component that is a module: calibration addresses
    modules by name and needs no adapter, so a denoiser no adapter supports yet is still found."""
    try:
        return find_denoiser(pipe)
    except UnsupportedModelError:
        for component in DENOISER_COMPONENTS:
            candidate = _unwrap_compiled(getattr(pipe, component, None))
            if isinstance(candidate, nn.Module):
                return component, candidate
        raise


def adapter_wrapped_layers(denoiser: nn.Module) -> list[str]:
    """Names of the layers of ``denoiser`` that unmerged adapters wrap (peft LoRA: modules holding a
    ``base_layer``)."""
    return [name for name, module in denoiser.named_modules()
            if isinstance(getattr(module, "base_layer", None), nn.Module)]


def modules_to_save_wrappers(denoiser: nn.Module) -> list[str]:
    """Names of peft ``modules_to_save`` wrappers in ``denoiser`` (an ``original_module`` beside trained copies, the
    active one computing; ``unload_lora_weights`` leaves them)."""
    return [name for name, module in denoiser.named_modules()
            if isinstance(getattr(module, "original_module", None), nn.Module) and hasattr(module, "modules_to_save")]


def adapter_layers(denoiser: nn.Module) -> list[str]:
    """Every layer of ``denoiser`` an adapter changes: LoRA-style wrappers and ``modules_to_save`` wrappers."""
    return adapter_wrapped_layers(denoiser) + modules_to_save_wrappers(denoiser)


def check_no_unmerged_adapters(denoiser: nn.Module, technique: str) -> None:
    """Refuse a weight-changing ``technique`` while adapter layers (peft LoRA: modules holding a
    ``base_layer``; ``modules_to_save`` copies) wrap layers of ``denoiser``: it would find only the layers peft left
    unwrapped and silently quantize or prune fewer of them, with the adapters still in float."""
    wrapped = adapter_layers(denoiser)
    if wrapped:
        raise ValueError(
            f"{technique} cannot change layers that adapters (LoRA, via peft) wrap: {len(wrapped)} in "
            f"{type(denoiser).__name__}, e.g. {wrapped[0]!r}. Merge them into the weights first with "
            f"pipe.fuse_lora() then pipe.unload_lora_weights(), and apply {technique} after that "
            f"(feature caching works with unmerged adapters).")


def check_not_prequantized(denoiser: nn.Module, technique: str) -> None:
    """Refuse a weight-changing ``technique`` on a denoiser diffusers loaded already quantized
    (``from_pretrained(..., quantization_config=TorchAoConfig/BitsAndBytesConfig/...)``): its
    weights are tensor subclasses or packed layers the solvers and quantizers cannot read."""
    if getattr(denoiser, "is_quantized", False) or getattr(denoiser, "hf_quantizer", None) is not None:
        quantizer = getattr(getattr(denoiser, "hf_quantizer", None), "quantization_config", None)
        method = getattr(getattr(quantizer, "quant_method", None), "value", None) or "a quantization_config"
        raise ValueError(
            f"{technique} needs floating-point weights, but this {type(denoiser).__name__} was loaded already "
            f"quantized by diffusers ({method}). Load it without quantization_config and apply {technique} "
            f"to the float model (feature caching works on the quantized one).")
    stored = next(((name, type(param.detach())) for name, param in denoiser.named_parameters()
                   if type(param.detach()) is not torch.Tensor), None)  # torchao's quantize_, 2:4 kernels' storage
    if stored is None:
        return
    if stored[1].__name__.startswith("SparseSemiStructured"):
        raise ValueError(f"{technique} needs dense floating-point weights, but {stored[0]!r} is stored for 2:4 sparse "
                         f"kernels ({stored[1].__name__}); to stack it on 2:4 pruning, prune with "
                         f"PruneConfig(..., sparse_kernels=False) first")
    raise ValueError(f"{technique} needs floating-point weights, but {stored[0]!r} is a {stored[1].__name__} "
                     f"(quantized with torchao's quantize_?). Apply {technique} to the float model (feature caching "
                     f"works on the quantized one).")


LAYERWISE_CASTING_HOOK = "layerwise_casting"  # diffusers' hook names (enable_layerwise_casting,
GROUP_OFFLOADING_HOOK = "group_offloading"     # enable_group_offload)


def first_diffusers_hook(denoiser: nn.Module, hook_name: str) -> tuple[str, Any] | None:
    """(module name, hook) of the first module carrying diffusers' hook ``hook_name``, else None."""
    for name, module in denoiser.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(hook_name) if registry is not None else None
        if hook is not None:
            return name or type(denoiser).__name__, hook
    return None


def check_no_grouped_offload(denoiser: nn.Module, action: str) -> None:
    """Refuse ``action`` (a cache that may skip a block while running a later one of its list) under diffusers' group
    offloading whose groups hold several blocks: the group loads its weights when its first block runs, so a skipped
    first block left the next one computing on offloaded weights (NaN from disk offload; until session 50). One
    block per group, leaf-level offloading, and the cache enabled before the offload (its hooks then load every
    group first) are fine."""
    for name, module in denoiser.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(GROUP_OFFLOADING_HOOK) if registry is not None and name else None  # the root's
        group = getattr(hook, "group", None)  # group (the modules outside block lists) loads at every call
        if group is not None and len(getattr(group, "modules", ())) > 1:
            raise ValueError(
                f"{action}: diffusers' group offloading loads {len(group.modules)} modules together (at {name!r}) "
                f"when the first of them runs, and a cache that skips it would run the others on offloaded weights; "
                f"enable the cache first and call enable_group_offload afterwards, or offload one block per group "
                f"(num_blocks_per_group=1) or at leaf level")


def check_no_layerwise_casting(denoiser: nn.Module, technique: str) -> None:
    """Refuse a weight-changing ``technique`` while diffusers' layerwise casting stores weights in a
    low-precision dtype (``enable_layerwise_casting``, e.g. float8): the solvers and quantizers would
    read the lossy stored weights and fail on the dtype (float8 times float32) or change them."""
    found = first_diffusers_hook(denoiser, LAYERWISE_CASTING_HOOK)
    if found is not None:
        raise ValueError(
            f"{technique} cannot change layers whose weights diffusers' layerwise casting stores in "
            f"{found[1].storage_dtype} (e.g. {found[0]!r}). Apply {technique} to the "
            f"model first and call enable_layerwise_casting afterwards (it then casts the layers "
            f"{technique} left in floating point).")


def check_not_offloaded(denoiser: nn.Module, technique: str) -> None:
    """Refuse a weight-changing ``technique`` while the denoiser's weights are offloaded: diffusers'
    group offloading moves the modules it hooked (layers swapped in afterwards would stay on the
    offload device, and with CUDA streams it onloads from copies taken when it was enabled, undoing
    in-place changes); sequential CPU offload (accelerate) leaves the weights on the meta device."""
    from ..hooks import check_no_cpu_offload  # imported here: diffusers.hooks pulls peft (`--help` stays light)

    check_no_cpu_offload(denoiser, technique)
    found = first_diffusers_hook(denoiser, GROUP_OFFLOADING_HOOK)
    if found is not None:
        raise ValueError(
            f"{technique} cannot change a denoiser under diffusers' group offloading (hooked at {found[0]!r}): "
            f"the layers it swaps in would not be moved between devices, and the offloaded copies would undo "
            f"its changes. Apply {technique} first and call enable_group_offload afterwards.")
    meta = next((name for name, tensor in [*denoiser.named_parameters(), *denoiser.named_buffers()]
                 if tensor.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(
            f"{technique} needs the denoiser's weights in memory, but {meta!r} is on the 'meta' device "
            f"(enable_sequential_cpu_offload keeps weights there between calls). Apply {technique} first "
            f"and enable the offload afterwards.")


def check_plain_weights(denoiser: nn.Module, technique: str) -> None:
    """Everything a weight-changing ``technique`` (quantize_, prune_) needs of the denoiser's weights:
    no unmerged adapters, not loaded pre-quantized, no layerwise casting, not offloaded; each refusal
    says the fix."""
    check_no_unmerged_adapters(denoiser, technique)
    check_not_prequantized(denoiser, technique)
    check_no_layerwise_casting(denoiser, technique)
    check_not_offloaded(denoiser, technique)
    check_finite_weights(denoiser, technique)


def check_finite_weights(denoiser: nn.Module, technique: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: the float model already gives NaN
    images, and the quantizers and solvers would fail later with errors naming no layer (or not at all)."""
    named = [(name, tensor) for name, tensor in denoiser.named_parameters() if tensor.is_floating_point()]
    if not named:
        return
    # detached: inference tensors that require grad (a pipeline loaded under inference_mode) failed isfinite's
    # autograd check outside it ("abs(): functions with out=... don't support automatic differentiation")
    finite = torch.stack([torch.isfinite(tensor.detach()).all().to(named[0][1].device) for _, tensor in named])
    if bool(finite.all()):  # one device sync for the whole denoiser
        return
    name, tensor = named[int((~finite).nonzero()[0])]
    count = int((~torch.isfinite(tensor.detach())).sum())
    raise ValueError(f"{technique} needs finite weights, but {name!r} holds {count} NaN or inf values (the float "
                     f"model already gives NaN images); check the checkpoint or the changes made to it")


def check_no_inference_weights(denoiser: nn.Module, technique: str) -> None:
    """Refuse a denoiser whose weights are inference tensors (loaded, built or moved inside torch.inference_mode())
    for a ``technique`` that trains through them with autograd: it failed part-way with "Inference tensors cannot be
    saved for backward", and restoring the frozen weights' requires_grad failed in turn (a router's hooks stayed)."""
    name = next((name for name, tensor in denoiser.named_parameters() if tensor.is_inference()), None)
    if name is not None:
        raise ValueError(f"{technique} trains with autograd through the denoiser, but its weights (e.g. {name!r}) are "
                         f"inference tensors: the pipeline was loaded or moved inside torch.inference_mode(). Load "
                         f"it outside inference_mode (torch.no_grad() is fine), or clone the weights outside it")


def get_adapter(pipe_or_denoiser: Any) -> DenoiserAdapter:
    """The adapter for a pipeline's denoiser (or for a denoiser module itself)."""
    _, denoiser = find_denoiser(pipe_or_denoiser)
    adapter_cls = _adapter_class_for(denoiser)
    if adapter_cls is None:  # pragma: no cover - find_denoiser already checked
        raise UnsupportedModelError(_unsupported_message(type(denoiser).__name__))
    return adapter_cls(denoiser)
