"""Keep diffusers' ``save_pretrained`` from writing a denoiser that ``from_pretrained`` cannot read.

diffusers saves whatever ``state_dict`` holds beside the model's unchanged config. After PTQ the
state dict holds int8 codes and scales instead of ``weight`` tensors, and after structured pruning
smaller shapes: ``from_pretrained`` then fails on shapes or, worse, silently re-initialises every
missing weight at random. Once a technique is applied (``artifact.mark_applied``) the denoiser's and
the pipeline's ``save_pretrained`` check the state dict against the config first and, if they
differ, raise before anything is written, pointing to ``da.save``. Weight-preserving techniques
(feature caching, unstructured pruning) pass the check and save as diffusers would.

A pipeline built from the accelerated one's components (``from_pipe``, ``Img2ImgPipeline(**pipe.
components)``) shares the denoiser but not the pipeline guard, and diffusers saves component by
component: the text encoder, tokenizer and VAE are written before the denoiser's guard refuses.
Guarding every pipeline would mean patching ``DiffusionPipeline`` itself, which the project does
not do; the error then names the folders already written instead.

The denoiser's ``fuse_qkv_projections`` is guarded the same way: diffusers concatenates
``to_q/to_k/to_v.weight`` into one float layer, which fails on an int8 GEMM layer (no ``weight``)
and silently dequantizes a simulated or weight-only one. It refuses while any attention projection
is not a plain ``nn.Linear`` with a dense weight; pruned plain layers fuse as diffusers would.
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base_match import base_state_dict
from .stacklevel import user_stacklevel

SAVE_METHOD = "save_pretrained"
FUSE_METHOD = "fuse_qkv_projections"
GUARDED_MODEL_METHODS = (SAVE_METHOD, FUSE_METHOD)  # on the denoiser
GUARDED_PIPELINE_METHODS = (SAVE_METHOD,)  # on the pipeline
PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_EXAMPLES = 3  # mismatched tensor names quoted in the error


class UnsavableModelError(ValueError):
    """``save_pretrained`` was called on a denoiser whose tensors diffusers could not load back."""


class UnfusableModelError(ValueError):
    """``fuse_qkv_projections`` was called on a denoiser whose projections diffusers cannot fuse."""


def install_guards(pipe: Any, denoiser: nn.Module) -> None:
    """Guard ``denoiser.save_pretrained`` / ``fuse_qkv_projections`` and, when ``pipe`` is a pipeline,
    ``pipe.save_pretrained`` (``pipe.fuse_qkv_projections`` calls the denoiser's).

    Bound methods on the instances (not the classes): a deep copy of the denoiser carries its own.
    """
    install_method(denoiser, SAVE_METHOD, _guarded_model_save)
    install_method(denoiser, FUSE_METHOD, _guarded_model_fuse)
    if pipe is not denoiser:
        install_method(pipe, SAVE_METHOD, _guarded_pipeline_save)


class GuardedMethod:
    """``guarded`` bound to ``owner`` as ``types.MethodType`` would, but picklable: a bound method pickles
    as ``getattr(owner, name)``, which the owner's class lacks, so ``torch.save`` of a quantized UNet
    wrote a file ``torch.load`` could not read. It holds its owner weakly: it lives in the owner's own
    ``__dict__``, and a strong reference made every accelerated pipeline a reference cycle that ``del
    pipe`` did not free (its GPU memory waited for Python's cycle collector)."""

    def __init__(self, guarded: Any, owner: Any) -> None:
        self.guarded = guarded
        try:
            self._owner = weakref.ref(owner)
        except TypeError:  # an owner without weak references (none of diffusers' types)
            self._owner = lambda: owner

    @property
    def owner(self) -> Any:
        """The object this method is bound to (ReferenceError once it was freed)."""
        owner = self._owner()
        if owner is None:
            raise ReferenceError(f"{getattr(self.guarded, '__name__', 'method')} was bound to an object that "
                                 f"no longer exists")
        return owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.guarded(self.owner, *args, **kwargs)

    def __reduce__(self) -> tuple:
        """Copies and pickles rebind to the copied owner (deepcopy's memo, pickle's own references)."""
        return GuardedMethod, (self.guarded, self.owner)

    @property
    def __self__(self) -> Any:
        """The owner, as on a bound method."""
        return self.owner

    @property
    def __func__(self) -> Any:
        """The guarded function, as on a bound method."""
        return self.guarded

    @property
    def __signature__(self) -> inspect.Signature:
        """The guarded function's signature without its owner (diffusers inspects save methods)."""
        signature = inspect.signature(self.guarded)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


def uninstall_methods(owner: Any, methods: Sequence[str]) -> None:
    """Remove the ``methods`` ``install_method`` set on ``owner``: its class's own methods apply again."""
    for method in methods:
        if isinstance(vars(owner).get(method), GuardedMethod):
            del vars(owner)[method]


def install_method(owner: Any, method: str, guarded: Any) -> None:
    """Set ``guarded`` bound to ``owner`` as ``owner.method`` (on the instance, not the class) where the
    class has that method and the instance has no own one yet."""
    if callable(getattr(type(owner), method, None)) and method not in vars(owner):
        object.__setattr__(owner, method, GuardedMethod(guarded, owner))



def _guarded_model_fuse(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    check_fusable(model)
    return type(model).fuse_qkv_projections(model, *args, **kwargs)


def check_fusable(denoiser: nn.Module) -> None:
    """Raise ``UnfusableModelError`` naming the first attention projection that is not a plain
    ``nn.Linear`` with a dense weight (quantized, or a sparse-kernel weight)."""
    from .artifact import applied_techniques

    _refuse_quantized_attention(denoiser, "fuse_qkv_projections() cannot fuse its attention", UnfusableModelError)
    for name, module in denoiser.named_modules():
        for attribute in PROJECTIONS:
            projection = getattr(module, attribute, None)
            if projection is None or _plain_linear(projection):
                continue
            raise UnfusableModelError(
                f"fuse_qkv_projections() cannot fuse {name}.{attribute} ({type(projection).__name__}): "
                f"techniques {applied_techniques(denoiser)} replaced it, and diffusers fuses only plain "
                f"nn.Linear projections (it would fail, or dequantize the layer into a float fused one). "
                f"Keep the projections unfused: quantized ones already run as separate low-precision "
                f"layers. Pruned plain layers fuse normally.")


def _refuse_quantized_attention(denoiser: nn.Module, what: str, error: type[ValueError]) -> None:
    """Refuse an operation on ``denoiser`` while quantize_(attention=...) processors are on it: their quantization
    lives in no tensor, so fusing replaced them with float ones and save_pretrained wrote the float model, silently
    (until session 53)."""
    from .artifact import applied_techniques
    from .quant.attention import quantizing_processors

    quantized = quantizing_processors(denoiser)
    if not quantized:
        return
    raise error(f"{what}: techniques {applied_techniques(denoiser)} quantize {len(quantized)} attention processors "
                f"(e.g. {quantized[0]}), which hold no tensors: diffusers would drop them (fusing swaps in float "
                f"processors; from_pretrained rebuilds float attention). Save with diffusion_accel.save(pipe, DIR) "
                f"and keep the projections unfused; nothing was changed.")


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and type(module.weight.data) is torch.Tensor


def _guarded_model_save(model: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        check_savable(model)
    except UnsavableModelError as error:
        written = _written_by_pipeline_save(save_directory)
        if not written:
            raise
        raise UnsavableModelError(
            f"{error} This pipeline shares the accelerated denoiser but is not the pipeline the "
            f"techniques were applied to (from_pipe, or built from its components), so its "
            f"save_pretrained had already written {written} to {Path(save_directory).parent} before "
            f"reaching the denoiser; delete them, or save with diffusion_accel.save(pipe, DIR), which "
            f"works from either pipeline.") from None
    return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def _written_by_pipeline_save(save_directory: Any) -> list[str]:
    """The component folders a ``DiffusionPipeline.save_pretrained`` on the call stack has written
    beside ``save_directory`` (empty when no pipeline save is calling)."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not DiffusionPipeline.save_pretrained.__code__:
        frame = frame.f_back
    if frame is None:
        return []
    parent = Path(save_directory).parent
    names = [name for name in frame.f_locals["self"].components if name != Path(save_directory).name]
    return [name for name in names if (parent / name).exists()]


def _guarded_pipeline_save(pipe: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    from .arch.registry import find_denoiser

    check_savable(find_denoiser(pipe)[1])
    return type(pipe).save_pretrained(pipe, save_directory, *args, **kwargs)


def check_savable(denoiser: nn.Module) -> None:
    """Raise ``UnsavableModelError`` if ``from_pretrained`` could not rebuild ``denoiser`` from its
    ``state_dict`` and config (tensor names or shapes differ from a model built from the config), or while
    quantized attention processors are on it."""
    _refuse_quantized_attention(denoiser, f"diffusers' save_pretrained cannot save this {type(denoiser).__name__}",
                                UnsavableModelError)
    mismatched = mismatched_tensors(denoiser)
    if not mismatched:
        return
    from .arch.registry import adapter_layers
    from .artifact import applied_techniques

    wrapped = adapter_layers(denoiser)  # modules_to_save copies too (blamed on the techniques until s46)
    if wrapped:  # peft renames the layers it wraps: those tensors are the adapters', not the techniques'
        mismatched = mismatched_tensors(denoiser, without_adapters=True)
    if wrapped and not mismatched:
        raise UnsavableModelError(
            f"diffusers' save_pretrained cannot save this {type(denoiser).__name__}: unmerged adapters (LoRA, via "
            f"peft) wrap {len(wrapped)} of its layers (e.g. {wrapped[0]!r}), whose tensors from_pretrained would not "
            f"read back. Merge them first (pipe.fuse_lora(), pipe.unload_lora_weights()) or save the LoRA with "
            f"save_lora_weights; diffusion_accel.save(pipe, DIR) saves {applied_techniques(denoiser)} without them.")
    examples = ", ".join(mismatched[:_EXAMPLES]) + (", ..." if len(mismatched) > _EXAMPLES else "")
    raise UnsavableModelError(
        f"diffusers' save_pretrained cannot save this {type(denoiser).__name__}: techniques "
        f"{applied_techniques(denoiser)} changed {len(mismatched)} of its tensors ({examples}), which "
        f"from_pretrained would reject or silently re-initialise at random. Save the accelerated "
        f"pipeline as an artifact with diffusion_accel.save(pipe, DIR) and reload it with "
        f"diffusion_accel.load(base_pipe, DIR) (or pass DIR as the --pipe of the CLI); the base "
        f"model itself can be saved with save_pretrained before the techniques are applied.")


def mismatched_tensors(denoiser: nn.Module, without_adapters: bool = False) -> list[str]:
    """State-dict entries of ``denoiser`` (``without_adapters``: as its base has them, ``base_state_dict``) that are
    missing, extra or differently shaped compared with a model built from ``denoiser.config`` (built on the meta
    device: no memory, no weights)."""
    config = getattr(denoiser, "config", None)
    if config is None or not hasattr(type(denoiser), "from_config"):
        return []
    try:
        with torch.device("meta"):
            reference = type(denoiser).from_config(config)
    except Exception as error:  # a model whose __init__ cannot run on meta: save unchecked, say so
        warnings.warn(f"could not check that from_pretrained can read this {type(denoiser).__name__} "
                      f"back ({type(error).__name__}: {error}); saving it unchecked", stacklevel=user_stacklevel())
        return []
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    state = base_state_dict(denoiser) if without_adapters else denoiser.state_dict()
    actual = {name: tuple(tensor.shape) for name, tensor in state.items()}
    names = sorted(expected.keys() | actual.keys())
    return [name for name in names if expected.get(name) != actual.get(name)]
