"""Recognise an artifact's base model in another floating dtype, exactly.

The fingerprint hashes bf16-rounded weight samples, so float32 and bfloat16 copies of a model agree.
A float16 copy does not: rounding to float16 first and then to bfloat16 lands on a bfloat16 tie for
about 1 value in 8 and rounds the other way for half of those, so float16 bases (the usual GPU
setting) never matched an artifact saved from float32. An artifact therefore also keeps a few weight
values per tensor in the saved dtype (``weight_sample``) and a hash of the architecture alone
(``structure_fingerprint``); ``samples_match`` casts the finer of two samples to the coarser dtype and
compares exactly: the same model cast with round-to-nearest matches bit for bit, a fine-tune does not. Samples
rounded along different paths (float16 vs bfloat16; fp16 variant files loaded in bfloat16, rounded twice) match
when they lie within one bfloat16 step of each other.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .arch.registry import adapter_layers

SAMPLE_FILE = "base-sample.safetensors"
_VALUES_PER_TENSOR = 16
LIBRARY_KEYS = frozenset({"transformers_version"})  # not underscored, unlike diffusers' _diffusers_version


def config_items(module: torch.nn.Module) -> dict[str, Any] | None:
    """The module's config without private or library-version keys (diffusers dicts, transformers
    configs through ``to_dict``); None when it has no config."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    values = dict(config) if isinstance(config, dict) else config.to_dict()
    return {key: value for key, value in values.items() if not key.startswith("_") and key not in LIBRARY_KEYS}


_PEFT_BASE_LAYER = "base_layer."  # the layer a peft wrapper holds: "<layer>.base_layer.weight"
_PEFT_ORIGINAL = "original_module."  # the layer a modules_to_save wrapper holds beside its trained copies


def base_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``denoiser.state_dict()`` as its base model has it: unmerged peft adapters (a LoRA loaded with
    ``load_lora_weights``, LoKr, LoHa, DoRA) left out, the layers they wrap under their own names, so an artifact
    names the base without them (one saved beside an unmerged LoRA was refused on the plain base the save told to
    use). Adapters are known by structure, a module holding a ``base_layer`` (or, for ``modules_to_save``, an
    ``original_module``): a ".lora_" mark in tensor names kept LoKr's and LoHa's factors (until session 46)."""
    state = denoiser.state_dict()
    wrappers = set(adapter_layers(denoiser))
    if not wrappers:
        return dict(state)
    kept = {}
    for name, tensor in state.items():
        wrapper = _wrapper_of(name, wrappers)
        if wrapper is None:
            kept[name] = tensor
            continue
        inner = name[len(wrapper) + 1:]
        for mark in (_PEFT_BASE_LAYER, _PEFT_ORIGINAL):  # the wrapped layer's own tensors, renamed
            if inner.startswith(mark):
                kept[f"{wrapper}.{inner[len(mark):]}"] = tensor
    return kept


def _wrapper_of(tensor_name: str, wrappers: set[str]) -> str | None:
    """The adapter wrapper ``tensor_name`` lies in, if any (its shortest module prefix in ``wrappers``)."""
    parts = tensor_name.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if prefix in wrappers:
            return prefix
    return None


def structure_fingerprint(denoiser: torch.nn.Module, recorded_config: dict[str, Any] | None = None) -> str:
    """SHA-256 of class, config (``recorded_config`` in place of its own: see ``base_config``) and tensor names and
    shapes: the architecture, not the weights."""
    digest = hashlib.sha256(type(denoiser).__name__.encode())
    config = recorded_config if recorded_config is not None else config_items(denoiser)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in base_state_dict(denoiser).items():
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
    return digest.hexdigest()


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached; a quantized tensor subclass (torchao's, loaded through diffusers'
    ``quantization_config``) by its dequantized values (it implements no ``view``), a 2:4 semi-structured one
    by its dense values."""
    tensor = tensor.detach()
    if type(tensor).__name__.startswith("SparseSemiStructured"):  # 2:4 kernels' storage (no view / reshape)
        return tensor.to_dense()  # first: every tensor has a dequantize, which 2:4 classes refuse (prune_ failed)
    if type(tensor) is not torch.Tensor and type(tensor).dequantize is not torch.Tensor.dequantize:
        return tensor.dequantize()
    return tensor


def weight_sample(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Up to 16 evenly spaced values of every base state-dict tensor, in its own dtype, on the CPU."""
    sample = {}
    for name, tensor in base_state_dict(denoiser).items():
        flat = dense(tensor).reshape(-1)
        last = max(flat.numel() - 1, 0)
        positions = torch.linspace(0, last, min(_VALUES_PER_TENSOR, flat.numel()))
        # float32 positions past 2**24 elements can round beyond the end (an SD 1.5 up-block conv1 of
        # 29,491,200 weights gave 29491200: IndexError in every technique): clamped, so samples of
        # smaller tensors, and the base samples saved with them, keep their positions
        sample[name] = flat[positions.long().clamp_(max=last).to(flat.device)].cpu().clone()
    return sample


def samples_match(saved: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], strict: bool = False) -> bool:
    """Whether two ``weight_sample``s come from the same weights, possibly cast to another dtype (rounded along
    another path: within one bfloat16 step). ``strict``: one model's weights before and after, which only a cast
    may change (``save``'s check that nothing changed them after a technique): no step of tolerance within a
    dtype or from float32 (a 0.3% change in a float16 model passed that check in session 44's first version)."""
    return saved.keys() == actual.keys() and all(_values_match(saved[name], actual[name], strict) for name in saved)


def _values_match(saved: torch.Tensor, actual: torch.Tensor, strict: bool = False) -> bool:
    if saved.shape != actual.shape:
        return False
    if saved.dtype == actual.dtype and torch.equal(saved, actual):
        return True
    if not (saved.is_floating_point() and actual.is_floating_point()) or (strict and saved.dtype == actual.dtype):
        return False
    if saved.dtype == torch.float32 and actual.dtype != torch.float32:  # a float32 value rounds to one half value
        return torch.equal(saved.to(actual.dtype), actual) or (not strict and _one_rounding_apart(saved, actual))
    if actual.dtype == torch.float32 and saved.dtype != torch.float32:
        return torch.equal(actual.to(saved.dtype), saved) or (not strict and _one_rounding_apart(saved, actual))
    return _one_rounding_apart(saved, actual)


def _one_rounding_apart(saved: torch.Tensor, actual: torch.Tensor) -> bool:
    """Whether two samples, one of them rounded to a half precision on the way (a half dtype, or float32 values
    that all are float16 / bfloat16 values), differ by at most one bfloat16 step (2^-24 absolute where float16
    is subnormal): the same weights rounded along different paths. float16 vs bfloat16 (an fp16 recipe's artifact
    on a bf16 pipeline) is neither a rounding of the other, and fp16 variant files loaded in bf16 round twice
    (bf16(fp16(w)) differs from bf16(w) by one step in ~7% of values): both were refused as "a different base
    model" (until sessions 30 / 44). Another model's weights differ far more; so does a fine-tune (1% moves)."""
    if not (_rounded_to_half(saved) or _rounded_to_half(actual)):
        return False  # two float32 samples that differ: other weights
    first, second = saved.float(), actual.float()
    magnitude = torch.maximum(first.abs(), second.abs())
    _, exponent = torch.frexp(magnitude)
    bfloat16_step = torch.where(magnitude > 0, torch.ldexp(torch.ones_like(magnitude), exponent - 8), 0.0)
    return bool(((first - second).abs() <= bfloat16_step + 2 ** -24).all())


def _rounded_to_half(values: torch.Tensor) -> bool:
    """Whether ``values`` are all float16 or all bfloat16 values (a half dtype, or a half model widened)."""
    return any(torch.equal(values.to(dtype).to(values.dtype), values) for dtype in (torch.bfloat16, torch.float16))


ROUNDING_DTYPES = (torch.bfloat16, torch.float16)


def representable_in(sample: dict[str, torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether every value of the sample's float tensors of finer precision than ``dtype`` is exactly a ``dtype``
    value (a model made or cast in ``dtype``, cast to a finer dtype after: float32, or float16 after bfloat16; a
    float32 model's weights never are), with at least one such tensor."""
    finer = [tensor for tensor in sample.values()
             if tensor.is_floating_point() and torch.finfo(tensor.dtype).eps < torch.finfo(dtype).eps]
    return bool(finer) and all(torch.equal(tensor.to(dtype).to(tensor.dtype), tensor) for tensor in finer)


def rounded_to(sample: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The half precision the sample's wider float values were all rounded to (bfloat16 first), or None."""
    return next((dtype for dtype in ROUNDING_DTYPES if representable_in(sample, dtype)), None)


def only_rounded(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], names: list[str]) -> bool:
    """Whether the ``names`` tensors of ``after`` are those of ``before`` rounded through one half precision and
    back (``pipe.to(torch.bfloat16).to(torch.float32)``), so nothing but the cast changed them."""
    return any(all(torch.equal(before[name].to(dtype).to(after[name].dtype), after[name]) for name in names)
               for dtype in ROUNDING_DTYPES)
