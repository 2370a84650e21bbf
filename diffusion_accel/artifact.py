"""Save and load accelerated pipelines: safetensors + a JSON manifest, never pickles.

An artifact folder holds ``manifest.json`` (format, library version, base-model fingerprint and,
where known, the pipeline spec the base was loaded from, the dtype the denoiser computed in, the
ordered list of applied techniques with their JSON configs), one ``NN-<technique>.safetensors``
per technique and ``base-sample.safetensors`` (see ``base_match``: recognises the base in float16). Techniques plug in with :func:`register_technique`: ``export`` returns
``(config_dict, tensors)`` from an accelerated pipeline, ``restore`` re-applies them to a base one.

``load`` re-applies the techniques in order onto the base pipeline's denoiser and refuses a base
whose fingerprint differs from the one recorded at save time. It never leaves the pipeline
half-modified: techniques are restored on a copy of the denoiser that replaces the original only
when every step succeeded.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import importlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .arch.registry import UnsupportedModelError, adapter_layers, find_any_denoiser, find_denoiser
from .base_match import (SAMPLE_FILE, base_state_dict, config_items, dense, only_rounded, representable_in, rounded_to,
                         samples_match, structure_fingerprint, weight_sample)
from .adapter_guard import GUARDED_ADAPTER_METHODS, install_adapter_guards
from .artifact_files import StagedWrite
from .base_config import comparable_config, config_differences, upgraded_from
from .artifact_tensors import TechniqueTensors
from .uncompiled import runs_compiled
from .manifest_schema import ManifestError, check_manifest, link_problem
from .paths import EMPTY_PATH_PROBLEM, empty_path, expand_home, folders_named_like
from .pretrained_guard import GUARDED_MODEL_METHODS, GUARDED_PIPELINE_METHODS, install_guards, uninstall_methods
from .stacklevel import user_stacklevel

FORMAT = "diffusion_accel.artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_APPLIED_ATTR = "_diffusion_accel_applied"
_EXPORTS_ATTR = "_diffusion_accel_exports"
_FINGERPRINT_ATTR = "_diffusion_accel_base_fingerprint"
_BASE_SAMPLE_ATTR = "_diffusion_accel_base_sample"  # (structure fingerprint, weight sample)
_PLACEHOLDER_ATTR = "_diffusion_accel_placeholder"  # a restored layer a later technique must replace
_BASE_CONFIG_ATTR = "_diffusion_accel_base_config"  # the config the base fingerprint hashed (base_config)
_APPLIED_SAMPLE_ATTR = "_diffusion_accel_applied_sample"  # weight sample right after the last technique
_CHANGED_ATTR = "_diffusion_accel_changed_after"  # (a tensor, the techniques): weights changed after those
_SOURCE_ATTR = "_diffusion_accel_source"
TECHNIQUE_FILE_PATTERN = "[0-9][0-9]-*.safetensors"  # save's technique files: f"{index:02d}-{technique}.safetensors"
_SAMPLE_ELEMENTS = 2048  # per tensor: head, tail and a strided middle sample


class ArtifactError(ValueError):
    """A folder is not a valid artifact, or it does not fit the base pipeline it is loaded onto."""


@dataclass(frozen=True)
class TechniqueHandler:
    """How one technique serializes itself (``export``) and re-applies itself (``restore``)."""

    name: str
    export: Callable[[Any], tuple[dict[str, Any], dict[str, torch.Tensor]]]
    restore: Callable[[Any, dict[str, Any], dict[str, torch.Tensor]], None]
    # raises ArtifactError when the live pipeline no longer matches the export (changed after apply)
    check_current: Callable[[Any], None] | None = None
    # (config, tensors, layers a later technique replaced, its name) -> the export without what those
    # layers' restore would write only to be replaced (pruned float weights under int8 codes)
    supersede: Callable[[dict[str, Any], dict[str, torch.Tensor], set[str], str],
                        tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None


_HANDLERS: dict[str, TechniqueHandler] = {}
# Technique packages that register a handler when imported; load() imports them first.
BUILTIN_TECHNIQUE_PACKAGES = ("diffusion_accel.cache", "diffusion_accel.quant", "diffusion_accel.prune")


def _import_builtin_techniques() -> None:
    for package in BUILTIN_TECHNIQUE_PACKAGES:
        if importlib.util.find_spec(package) is not None:
            importlib.import_module(package)


def register_technique(name: str, export: Callable, restore: Callable,
                       check_current: Callable | None = None, supersede: Callable | None = None) -> TechniqueHandler:
    """Register the save/load handler of technique ``name`` (one per technique); ``check_current``
    (optional) refuses a save whose pipeline was changed after the technique so that the artifact
    would not reproduce it; ``supersede`` (optional) drops from its export what layers replaced by a
    later technique no longer need (see ``mark_applied``)."""
    handler = TechniqueHandler(name, export, restore, check_current, supersede)
    _HANDLERS[name] = handler
    return handler


def registered_techniques() -> list[str]:
    """Names of the techniques save / load know (quant, prune, cache, and any registered since), sorted."""
    return sorted(_HANDLERS)


# ----- fingerprints and the applied-techniques record -------------------------------------
def fingerprint(denoiser: torch.nn.Module, recorded_config: dict[str, Any] | None = None) -> str:
    """A dtype- and device-independent SHA-256 of class, config and sampled weight values (any
    module; diffusers configs are dicts, transformers configs give theirs by ``to_dict``). The
    library version a config names (diffusers' ``_diffusers_version``, transformers'
    ``transformers_version``) is left out: the same model must fingerprint alike after an upgrade;
    ``recorded_config`` (an artifact's, see ``base_config``) is hashed in place of the module's own."""
    digest = hashlib.sha256(type(denoiser).__name__.encode())
    config = recorded_config if recorded_config is not None else config_items(denoiser)
    if config is not None:
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in base_state_dict(denoiser).items():  # an unmerged LoRA is not the base
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(_sampled_bytes(tensor))
    return digest.hexdigest()


def _sampled_bytes(tensor: torch.Tensor) -> bytes:
    """Bytes of a bf16-rounded sample of ``tensor`` (so fp32 and bf16 copies agree; fp16 ones are
    recognised by ``base_match``), a quantized tensor subclass by its dequantized values."""
    flat = dense(tensor).reshape(-1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    if flat.numel() > 3 * _SAMPLE_ELEMENTS:
        stride = flat.numel() // _SAMPLE_ELEMENTS
        flat = torch.cat([flat[:_SAMPLE_ELEMENTS], flat[::stride], flat[-_SAMPLE_ELEMENTS:]])
    return flat.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()


def base_fingerprint(pipe: Any) -> str:
    """Fingerprint of the denoiser as it was before any technique changed it: taken afresh while no
    technique is applied, then cached. (Until session 27 it was cached by the first call, so one taken
    before a failed ``quantize_`` or a removed cache outlived a weight change — a merged LoRA — and the
    artifact named the old weights as its base.)"""
    _, denoiser = find_denoiser(pipe)
    cached = getattr(denoiser, _FINGERPRINT_ATTR, None)
    if techniques_on(denoiser):
        _note_weight_changes(denoiser)  # before the technique about to run retakes the sample save compares with
    if cached is None or not techniques_on(denoiser):
        denoiser.__dict__.pop(_CHANGED_ATTR, None)
        cached = fingerprint(denoiser)
        setattr(denoiser, _FINGERPRINT_ATTR, cached)
        setattr(denoiser, _BASE_SAMPLE_ATTR, (structure_fingerprint(denoiser), weight_sample(denoiser)))
        setattr(denoiser, _BASE_CONFIG_ATTR, comparable_config(denoiser))
    return cached


def mark_applied(pipe: Any, technique: str, replaced: Iterable[str] = ()) -> None:
    """Record that ``technique`` now modifies the pipeline (call ``base_fingerprint`` first).

    The technique's export is taken now and kept: a technique applied later may replace the layers
    this one changed (lowering swaps in int8 layers after pruning), so ``save`` must not have to
    read this technique's state back from them. ``replaced``: the layers ``technique`` swapped out;
    earlier techniques' exports drop what only those layers needed (``TechniqueHandler.supersede``:
    a pruned-then-quantized SD 1.5 UNet kept 1.7 GiB of pruned float weights alive under its int8
    codes, on the GPU for a GPU pipeline). diffusers' ``save_pretrained`` is guarded from then
    on (``pretrained_guard``): it refuses tensors ``from_pretrained`` could not read back; and so are
    ``add_adapter`` / ``load_lora_adapter`` / ``pipe.load_lora_weights`` (``adapter_guard``): no
    half-wrapped LoRA.
    """
    if technique not in _HANDLERS:
        raise ValueError(f"technique {technique!r} has no save/load handler; "
                         f"registered: {registered_techniques()}")
    _, denoiser = find_denoiser(pipe)
    install_guards(pipe, denoiser)
    install_adapter_guards(denoiser)
    applied = list(getattr(denoiser, _APPLIED_ATTR, []))
    if technique not in applied:
        applied.append(technique)
    setattr(denoiser, _APPLIED_ATTR, applied)
    exports = dict(getattr(denoiser, _EXPORTS_ATTR, {}))
    exports[technique] = _HANDLERS[technique].export(pipe)
    for earlier in applied[:applied.index(technique)]:
        supersede = _HANDLERS[earlier].supersede
        if replaced and supersede is not None and earlier in exports:
            exports[earlier] = supersede(*exports[earlier], set(replaced), technique)
    setattr(denoiser, _EXPORTS_ATTR, exports)
    setattr(denoiser, _APPLIED_SAMPLE_ATTR, weight_sample(denoiser))  # what save checks the weights against


_MARK_ATTRS = (_APPLIED_ATTR, _EXPORTS_ATTR, _APPLIED_SAMPLE_ATTR, _FINGERPRINT_ATTR, _BASE_SAMPLE_ATTR,
               _BASE_CONFIG_ATTR, _CHANGED_ATTR)


@contextmanager
def marks_restored_on_error(pipe: Any) -> Iterator[None]:
    """Put this package's marks and guards on ``pipe`` and its denoiser (as found on entry) back as they were
    when the block raises, KeyboardInterrupt included: a technique interrupted in ``mark_applied`` stayed
    installed but unrecorded, or its rollback left the base fingerprint and the guards behind (session 31)."""
    _, denoiser = find_denoiser(pipe)
    names = [(denoiser, _MARK_ATTRS + GUARDED_MODEL_METHODS + GUARDED_ADAPTER_METHODS)]
    if pipe is not denoiser:
        names.append((pipe, GUARDED_PIPELINE_METHODS))
    saved = [(owner, {name: vars(owner)[name] for name in keys if name in vars(owner)}, keys) for owner, keys in names]
    try:
        yield
    except BaseException:
        for owner, values, keys in saved:
            for name in keys:
                if name in values:
                    owner.__dict__[name] = values[name]
                else:
                    owner.__dict__.pop(name, None)
        raise


def unmark_applied(pipe: Any, technique: str) -> None:
    """Forget ``technique`` (after it was removed from the pipeline); with none left, the pipeline and its
    denoiser lose every mark and guard of this package (``calibrate_schedule`` left them after its
    trial caches: the object was not as it had been)."""
    _, denoiser = find_denoiser(pipe)
    applied = [t for t in getattr(denoiser, _APPLIED_ATTR, []) if t != technique]
    exports = dict(getattr(denoiser, _EXPORTS_ATTR, {}))
    exports.pop(technique, None)
    if applied:
        setattr(denoiser, _APPLIED_ATTR, applied)
        setattr(denoiser, _EXPORTS_ATTR, exports)
        return
    for attribute in _MARK_ATTRS:
        denoiser.__dict__.pop(attribute, None)
    uninstall_methods(denoiser, GUARDED_MODEL_METHODS + GUARDED_ADAPTER_METHODS)
    if pipe is not denoiser:
        uninstall_methods(pipe, GUARDED_PIPELINE_METHODS)


def applied_techniques(pipe: Any) -> list[str]:
    """Techniques applied to the pipeline's denoiser, in order."""
    return techniques_on(find_denoiser(pipe)[1])


def techniques_on(denoiser: torch.nn.Module) -> list[str]:
    """Techniques applied to ``denoiser`` itself, in order (any module; [] if none)."""
    return list(getattr(denoiser, _APPLIED_ATTR, []))


def record_source(pipe: Any, spec: str, dtype: torch.dtype | None, variant: str | None = None) -> None:
    """Remember the pipeline spec (``zoo:NAME``, a hub id, a folder), dtype and weight-file variant
    ``pipe`` was loaded with, so an artifact saved from it can name its base (``loading.load_pipeline``
    reads it back)."""
    dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
    source = {"spec": spec, "dtype": dtype_name}
    source = source if variant is None else {**source, "variant": variant}
    setattr(pipe, _SOURCE_ATTR, source)
    denoiser = _any_denoiser(pipe)
    if denoiser is not None:  # pipelines built from its components (from_pipe, Img2Img(**components)) share it
        object.__setattr__(denoiser, _SOURCE_ATTR, source)


def _any_denoiser(pipe: Any) -> torch.nn.Module | None:
    try:
        return find_any_denoiser(pipe)[1]
    except UnsupportedModelError:
        return None


def pipeline_source(pipe: Any) -> dict[str, Any] | None:
    """``{"spec", "dtype"}`` of where ``pipe`` came from: what diffusion_accel loaded it (or the pipeline whose
    denoiser it shares) from, else diffusers' ``_name_or_path`` (hub id or folder; dtype unknown); None for
    pipelines built in code. (A sibling of a zoo pipeline recorded this machine's install folder, not
    ``zoo:NAME``, until session 44.)"""
    denoiser = _any_denoiser(pipe)
    source = getattr(pipe, _SOURCE_ATTR, None) or getattr(denoiser, _SOURCE_ATTR, None)
    if source is not None:
        return dict(source)
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if name and Path(str(name)).is_dir():  # a relative folder would not be found from elsewhere
        name = Path(str(name)).resolve()
    return {"spec": str(name), "dtype": None} if name else None


# ----- save / load ---------------------------------------------------------------------
def save_folder_problem(directory: str | Path) -> str | None:
    """Why ``directory`` cannot take an artifact, or None: a file; a diffusers pipeline folder (it would
    then load as the artifact, by spec); another tool's ``manifest.json`` (it would be overwritten)."""
    if empty_path(directory):
        return EMPTY_PATH_PROBLEM
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder; give a new folder or an earlier artifact's folder"
    if (folder / "model_index.json").is_file():
        return "it holds a diffusers pipeline (model_index.json), which would then load as this artifact; " \
               "give another folder"
    if (folder / MANIFEST).is_file() and not _is_artifact_manifest(folder / MANIFEST) and not _damaged_artifact(folder):
        return f"its {MANIFEST} is not a diffusion_accel artifact's and would be overwritten; give another folder"
    taken = folders_named_like(folder, (MANIFEST, SAMPLE_FILE), TECHNIQUE_FILE_PATTERN)  # after the tensors were
    return f"it {taken}; give another folder" if taken else None  # moved into place (until session 51)


def _damaged_artifact(folder: Path) -> bool:
    """Whether ``folder``'s manifest is not JSON beside technique files of ours: a damaged artifact, which ``load``
    says to save again (save refused it as another tool's manifest until session 43)."""
    try:
        json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return any(folder.glob(TECHNIQUE_FILE_PATTERN))
    return False


def _artifact_folder(directory: str | Path) -> Path:
    """``directory`` as a folder, created if missing; an ArtifactError naming it when it cannot be one
    (a file of that name, a parent that is a file, no permission) or holds something an artifact would
    break or overwrite (a diffusers pipeline: its folder would then load as this artifact; another tool's
    ``manifest.json``)."""
    folder = Path(directory)
    problem = save_folder_problem(directory)
    if problem:
        raise ArtifactError(f"cannot save the artifact to {str(directory)!r}: {problem}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArtifactError(f"cannot create the artifact folder {str(folder)!r}: {error.strerror or error}") from error
    return folder


def save(pipe: Any, directory: str | Path) -> Path:
    """Write the techniques applied to ``pipe`` as safetensors + ``manifest.json``; returns the folder."""
    from . import __version__

    directory = _folder_argument("save(pipe, directory)", pipe, directory)
    _check_has_weights(pipe, "save")
    _check_no_weight_hooks(pipe)
    for technique in applied_techniques(pipe):
        if _HANDLERS[technique].check_current is not None:
            _HANDLERS[technique].check_current(pipe)
    _check_weights_unchanged(pipe)
    folder = _artifact_folder(directory)
    previous_files = _listed_files(folder)
    component, denoiser = find_denoiser(pipe)
    if not applied_techniques(pipe):
        warnings.warn(f"saving an artifact of a pipeline with no technique applied: {folder} will hold only the "
                      f"base's fingerprint, and load() will return the base unchanged (apply prune_, quantize_ "
                      f"or enable_cache first)", stacklevel=user_stacklevel())
    _warn_on_adapters(denoiser, component)
    exports = getattr(denoiser, _EXPORTS_ATTR, {})
    exported = [(technique, *(exports.get(technique) or _HANDLERS[technique].export(pipe)))
                for technique in applied_techniques(pipe)]
    _check_json_configs(exported)  # before any file is written: a failure left tensors without a manifest
    with StagedWrite(folder) as files:  # interrupted: the old artifact whole, none, or the new one whole
        entries = [{"name": technique, "config": config,
                    "tensors": files.write(f"{index:02d}-{technique}.safetensors", _tensor_writer(tensors))}
                   for index, (technique, config, tensors) in enumerate(exported)]
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
            "base": {"pipeline": type(pipe).__name__, "denoiser": type(denoiser).__name__,
                     "component": component, "fingerprint": base_fingerprint(pipe), **_config_entry(denoiser),
                     "source": pipeline_source(pipe), "dtype": _dtype_name(compute_dtype(denoiser)),
                     **_rounding_entry(denoiser), **_write_base_sample(denoiser, files)},
            "techniques": entries,
        }
        manifest_text = json.dumps(manifest, indent=2)
        files.commit(MANIFEST, manifest_text, stale=previous_files)  # stale: an earlier artifact's
    return folder


def _tensor_writer(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    """A writer of ``tensors`` as one safetensors file (on the CPU, contiguous)."""
    return lambda path: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _check_has_weights(pipe: Any, call: str) -> None:
    """ArtifactError when the denoiser's weights are on the meta device (no data to save, or to check a base by)."""
    component, denoiser = find_denoiser(pipe)
    if any(tensor.is_meta for tensor in denoiser.state_dict().values()):
        whose = "the base's" if call == "load" else "the pipeline's"
        raise ArtifactError(f"{call}: {whose} {component or type(denoiser).__name__} has weights on the meta device "
                            f"(created without them, moved with .to('meta'), or offloaded?): {call} needs a "
                            f"{component or 'denoiser'} with its weights")


def _folder_argument(call: str, pipe: Any, directory: Any) -> str | Path:
    """``directory`` with ``~`` expanded ("~/art" made a folder named "~" in the working directory until session
    51; an empty string is kept for the checks that refuse it); TypeError for a folder that is no path (None; the
    arguments swapped), before any work."""
    if isinstance(directory, (str, os.PathLike)) and not isinstance(pipe, (str, os.PathLike)):
        return directory if empty_path(directory) else expand_home(directory)
    raise TypeError(f"{call} takes the pipeline first and a folder path (str or os.PathLike) second; got "
                    f"{type(pipe).__name__} and {type(directory).__name__}")


def _check_no_weight_hooks(pipe: Any) -> None:
    """ArtifactError for a denoiser whose weights diffusers' hooks hold in another form than it computes with:
    under layerwise casting ``save`` recorded the float8 storage dtype as the base's dtype, and the artifact could
    never load (until session 50); under group offloading to disk the offloaded weights are placeholders between
    calls, refused as "changed after the techniques" (training?)."""
    from .arch.registry import GROUP_OFFLOADING_HOOK, LAYERWISE_CASTING_HOOK, first_diffusers_hook

    component, denoiser = find_denoiser(pipe)
    casting = first_diffusers_hook(denoiser, LAYERWISE_CASTING_HOOK)
    if casting is not None:
        raise ArtifactError(f"save: diffusers' layerwise casting stores the {component or 'denoiser'}'s weights in "
                            f"{casting[1].storage_dtype} (e.g. {casting[0]!r}), not as computed; save before "
                            f"enable_layerwise_casting (its hook cannot be removed: load the base again, apply or load "
                            f"the techniques, save, then enable it)")
    offload = first_diffusers_hook(denoiser, GROUP_OFFLOADING_HOOK)
    if offload is not None and getattr(offload[1].group, "offload_to_disk_path", None):
        raise ArtifactError(f"save: diffusers' group offloading keeps the {component or 'denoiser'}'s weights on disk "
                            f"(at {offload[0]!r}) and placeholders in memory between calls; save before "
                            f"enable_group_offload, or offload without offload_to_disk_path")


def _check_weights_unchanged(pipe: Any) -> None:
    """ArtifactError when the denoiser's weights changed after a technique was applied (``fuse_lora``,
    ``load_state_dict``, an optimizer step): the exports taken then would be saved, and ``load`` would
    rebuild the old weights (a LoRA fused into a pruned UNet vanished silently). A change followed by another
    technique (or a ``calibrate_schedule``, whose trial caches apply one) counts too: that technique retook the
    sample compared with, and the artifact reloaded the old weights until session 45. Layers an unmerged adapter
    wraps are compared by their base weights; the adapters themselves are not (``save`` warns about those)."""
    _, denoiser = find_denoiser(pipe)
    if not techniques_on(denoiser):
        return
    # noted when a later technique retook the sample; a change since is compared, not noted: weights restored
    # exactly after a refused save stayed refused until session 51
    noted = getattr(denoiser, _CHANGED_ATTR, None) or _weight_change(denoiser)
    if noted is not None:
        tensor, techniques = noted
        raise ArtifactError(f"cannot save: tensors of the {type(denoiser).__name__} changed after {techniques} were "
                            f"applied (e.g. {tensor}; fuse_lora, load_state_dict or training?), and the artifact would "
                            f"restore them as they were then; change the weights first and apply the techniques to "
                            f"the result")


def _note_weight_changes(denoiser: torch.nn.Module) -> None:
    """Remember a change of the weights since the last technique was applied, for ``save`` (before a technique
    retakes the sample it is compared with)."""
    if getattr(denoiser, _CHANGED_ATTR, None) is None:
        change = _weight_change(denoiser)
        if change is not None:
            setattr(denoiser, _CHANGED_ATTR, change)


def _weight_change(denoiser: torch.nn.Module) -> tuple[str, list[str]] | None:
    """(the first tensor changed since the last technique was applied, the techniques), or None."""
    applied_sample = getattr(denoiser, _APPLIED_SAMPLE_ATTR, None)
    if applied_sample is None:
        return None
    current = weight_sample(denoiser)
    changed = [name for name in applied_sample.keys() & current.keys()
               if not samples_match({name: applied_sample[name]}, {name: current[name]}, strict=True)]
    if changed and not only_rounded(applied_sample, current, changed):  # a cast there and back rounds, no more
        return sorted(changed)[0], techniques_on(denoiser)
    return None


def _check_json_configs(exported: list[tuple[str, Any, Any]]) -> None:
    """ArtifactError naming the technique whose config JSON cannot hold."""
    for technique, config, _ in exported:
        try:
            json.dumps(config)
        except (TypeError, ValueError) as error:
            raise ArtifactError(f"cannot save: the {technique!r} config holds a value JSON cannot store "
                                f"({error}); nothing was written") from error


def _rounding_entry(denoiser: torch.nn.Module) -> dict[str, str]:
    """``{"rounded_to": "bfloat16"}`` when the denoiser computes in another dtype than the half precision its float
    weights were rounded to (techniques applied in bf16, then ``pipe.to(torch.float32)`` or ``torch.float16``; a
    cast there and back; techniques applied in fp16, then ``pipe.to(torch.bfloat16)``, read from the base sample
    taken in fp16): a base loaded in the saved dtype lacks that rounding, so ``load_pipeline`` loads it in the
    rounding dtype and ``load`` says how to get the saved images. Empty otherwise (half-to-half casts were not
    recorded until session 44: such artifacts reloaded other images without a word)."""
    dtype = compute_dtype(denoiser)
    base_sample = getattr(denoiser, _BASE_SAMPLE_ATTR, (None, None))[1] or {}
    sample = {name: tensor for name, tensor in weight_sample(denoiser).items()
              if not base_sample or name in base_sample}
    rounded = rounded_to(sample) or _half_dtype_of(base_sample)  # the base's own tensors: scales stay float32
    if rounded is None or dtype is None or rounded == dtype:
        return {}
    return {"rounded_to": _dtype_name(rounded)}


def _half_dtype_of(sample: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The half precision of the base sample's float tensors (the dtype techniques were applied in), or None."""
    dtypes = {tensor.dtype for tensor in sample.values() if tensor.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16} else None


def _config_entry(denoiser: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """``{"config": ...}``: the config the base fingerprint hashed, so a load after a diffusers upgrade that added
    ``__init__`` arguments can hash it again (``base_config``); empty for a denoiser without a config."""
    config = getattr(denoiser, _BASE_CONFIG_ATTR, None)
    return {"config": config} if isinstance(config, dict) else {}


def _write_base_sample(denoiser: torch.nn.Module, files: StagedWrite) -> dict[str, str]:
    """Stage the base's weight sample beside the technique files; the manifest entries naming it
    (none for a denoiser whose base sample was not taken)."""
    structure, sample = getattr(denoiser, _BASE_SAMPLE_ATTR, (None, None))
    if sample is None:
        return {}
    return {"structure": structure, "sample": files.write(SAMPLE_FILE, _tensor_writer(sample))}


def _is_artifact_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _listed_files(folder: Path) -> set[str]:
    """The technique files an artifact already in ``folder`` lists (none if there is no readable one); with no
    manifest beside our base sample, the technique files a save interrupted in its commit left (the old
    manifest removed: they stayed beside every later artifact until session 44)."""
    if not (folder / MANIFEST).exists() and (folder / SAMPLE_FILE).is_file():
        return {path.name for path in folder.glob(TECHNIQUE_FILE_PATTERN)}
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = {Path(entry["tensors"]).name for entry in manifest["techniques"]} if manifest.get("format") == FORMAT \
            else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return set()
    # only names save writes: an edited manifest listing "manifest.json" or "../notes.txt" had save delete the manifest
    # it had just written, or the user's notes.txt beside it (until session 49)
    return {name for name in listed if fnmatch.fnmatchcase(name, TECHNIQUE_FILE_PATTERN)}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` of an artifact folder."""
    _import_builtin_techniques()
    path = Path(directory) / MANIFEST
    if not path.is_file():
        interrupted = any(Path(directory).glob(TECHNIQUE_FILE_PATTERN)) if Path(directory).is_dir() else False
        raise ArtifactError(f"{directory} is not a diffusion_accel artifact: no {MANIFEST}" + (
            " (it holds technique files without one: a save into it was interrupted; save the artifact again)"
            if interrupted else ""))
    problem = link_problem(path)  # a manifest linked from elsewhere was read as this folder's (session 53)
    if problem is not None:
        raise ArtifactError(f"{path} must be a file inside the artifact folder, got {problem}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: bad JSON or UTF-8, an integer past 4,300 digits
        raise ArtifactError(f"{path} is not valid JSON ({type(error).__name__}: {str(error):.200}); the artifact "
                            f"is damaged: save it again") from None
    found = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
    if found != FORMAT:
        raise ArtifactError(f"{path}: format {found!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {version} is newer than this library reads "
                            f"({FORMAT_VERSION}); upgrade diffusion-accel")  # before its envelope may differ
    try:
        check_manifest(manifest, path)
    except ManifestError as error:
        raise ArtifactError(str(error)) from None
    unknown = [t["name"] for t in manifest.get("techniques", []) if t["name"] not in _HANDLERS]
    if unknown:
        raise ArtifactError(f"{path}: unknown techniques {unknown}; registered: {registered_techniques()}")
    return manifest


@torch.inference_mode(False)  # a copy of the denoiser made under a caller's inference_mode: no later update
def load(base_pipe: Any, directory: str | Path) -> Any:
    """Re-apply a saved artifact onto ``base_pipe`` (same object returned); all or nothing: it works on a copy of
    the denoiser and sets that on ``base_pipe``, so pipelines sharing the old denoiser (``from_pipe``) built
    before keep it: build them after."""
    directory = _folder_argument("load(base_pipe, directory)", base_pipe, directory)
    manifest = read_manifest(directory)
    _check_base(base_pipe, manifest, directory)
    component, original = find_denoiser(base_pipe)
    _warn_on_dtype_change(manifest, original, component, directory)
    if not manifest["techniques"]:
        warnings.warn(f"artifact {directory} holds no technique (saved from a pipeline with none applied): "
                      f"load() returns the base unchanged", stacklevel=user_stacklevel())
        return base_pipe  # the same denoiser (a copy swapped in would drop a compiled wrapper for nothing)
    if not component:  # a bare denoiser has no pipeline to swap a copy into
        raise ArtifactError("load() needs a pipeline (with a 'unet' or 'transformer'), not a bare denoiser")
    _check_superseded(manifest, directory)
    _check_loadable_base(original, component, manifest)  # before the copy, which would copy the hooks' state
    attribute = getattr(base_pipe, component)  # the denoiser, or a torch.compile wrapper around it
    compiled = runs_compiled(base_pipe)
    with marks_restored_on_error(base_pipe):  # the pipeline's guards an earlier technique of the manifest installed
        _set_denoiser(base_pipe, component, copy.deepcopy(original))
        try:
            for entry in manifest["techniques"]:
                _restore_technique(base_pipe, entry, Path(directory))
            _check_placeholders_replaced(find_denoiser(base_pipe)[1], manifest, directory)
            _keep_base_identity(find_denoiser(base_pipe)[1], original, manifest)
        except BaseException:
            _set_denoiser(base_pipe, component, attribute)
            raise
    if compiled:  # a wrapper, or module.compile() / compile_denoiser (in place: not deep-copied)
        warnings.warn(f"load() replaced the compiled pipe.{component} with the accelerated "
                      f"{type(original).__name__} (applied to a copy, so a failed load changes nothing), which is "
                      f"not compiled; compile it again (pipe.{component} = torch.compile(pipe.{component}), or "
                      f"diffusion_accel.eval.compile_denoiser(pipe))", stacklevel=user_stacklevel())
    return base_pipe


def _check_loadable_base(denoiser: torch.nn.Module, component: str, manifest: dict[str, Any]) -> None:
    """Refuse a base whose diffusers / accelerate hooks a copy cannot take, naming them and the fix: layerwise
    casting's copy ran the original's closures (every later call failed on float8 weights), group offloading's
    copy was a raw "cannot pickle 'module' object", diffusers' own cache was called a damaged artifact; and, for
    techniques that change weights, unmerged adapters and pre-quantized weights, as quantize_ / prune_ do."""
    from .arch.registry import check_no_layerwise_casting, check_not_offloaded, check_not_prequantized
    from .hooks import diffusers_cache_problem  # here: the hook engine imports diffusers (the CLI's --help must not)

    check_not_offloaded(denoiser, "load")
    check_no_layerwise_casting(denoiser, "load")
    problem = diffusers_cache_problem(denoiser, f"pipe.{component}")
    if problem is not None:
        raise ArtifactError(f"load() needs a base without diffusers' own cache, but {problem}, load, then enable it "
                            f"again")
    changing = [entry["name"] for entry in manifest["techniques"] if entry["name"] != "cache"]  # of the weights
    wrapped = adapter_layers(denoiser)
    if changing and wrapped:
        raise ArtifactError(f"load() cannot apply {changing} to layers that unmerged adapters (LoRA, via peft) wrap: "
                            f"{len(wrapped)} in pipe.{component}, e.g. {wrapped[0]!r}; load onto the base without "
                            f"them (pipe.unload_lora_weights()). To run a LoRA with {changing}, fuse it into the "
                            f"base (fuse_lora, unload_lora_weights) before applying them, and save that")
    if changing:
        check_not_prequantized(denoiser, "load")


def _keep_base_identity(loaded: torch.nn.Module, original: torch.nn.Module, manifest: dict[str, Any]) -> None:
    """Record on the loaded denoiser that its base is the artifact's (the manifest's fingerprint, the base's
    weight sample): ``base_fingerprint`` took them afresh from the accelerated weights, so a loaded pipeline
    saved again (another technique stacked on it, ``calibrate --pipe ARTIFACT``) named them as its base and
    could not be loaded."""
    if techniques_on(loaded):  # none: the base is unchanged and fingerprints itself
        recorded = _recorded_config(manifest, original)
        setattr(loaded, _FINGERPRINT_ATTR, manifest["base"]["fingerprint"])
        setattr(loaded, _BASE_SAMPLE_ATTR, (structure_fingerprint(original, recorded), weight_sample(original)))
        setattr(loaded, _BASE_CONFIG_ATTR, recorded if recorded is not None else comparable_config(original))


def _check_superseded(manifest: dict[str, Any], directory: str | Path) -> None:
    """An entry whose export left out what a later technique replaces (``superseded_by``) needs that
    technique after it: without it the layers would keep placeholder weights."""
    names = [entry["name"] for entry in manifest["techniques"]]
    for index, entry in enumerate(manifest["techniques"]):
        later = entry["config"].get("superseded_by")
        if later is not None and later not in names[index + 1:]:
            raise ArtifactError(f"artifact {directory}: technique {entry['name']!r} saved no weights for the "
                                f"layers {later!r} replaces, but no {later!r} follows in the manifest; the artifact "
                                f"is damaged or edited by hand: save it again")


def mark_placeholder(module: torch.nn.Module) -> None:
    """Mark ``module`` as holding no real weights: a restored layer whose export left them to a later technique
    (``superseded_by``), which must replace it (:func:`_check_placeholders_replaced`)."""
    setattr(module, _PLACEHOLDER_ATTR, True)


def _check_placeholders_replaced(denoiser: torch.nn.Module, manifest: dict[str, Any], directory: str | Path) -> None:
    """ArtifactError for a superseded layer still a placeholder after every technique restored: an entry of the
    later technique that no longer covers it loaded all-zero weights there (0.09 off, until session 49)."""
    for entry in manifest["techniques"]:
        names = entry["config"].get("superseded")
        for name in names if isinstance(names, list) else []:
            try:
                module = denoiser.get_submodule(name)
            except (AttributeError, TypeError):
                continue  # the technique's own restore judged its names
            if getattr(module, _PLACEHOLDER_ATTR, False):
                raise ArtifactError(f"artifact {directory}: technique {entry['name']!r} left layer {name!r} to "
                                    f"{entry['config'].get('superseded_by')!r}, which did not restore it; the "
                                    f"artifact is damaged or edited by hand: save it again")


def _restore_technique(pipe: Any, entry: dict[str, Any], folder: Path) -> None:
    """Re-apply one manifest entry. A config field or tensor the technique needs but the artifact lacks
    (a damaged or hand-edited artifact, or one from another version) is an ArtifactError naming both."""
    tensors = TechniqueTensors(_read_tensors(folder / entry["tensors"]), entry["tensors"])
    damaged = ("the artifact is damaged, edited by hand or written by another version of diffusion-accel: "
               "save it again")
    try:
        _HANDLERS[entry["name"]].restore(pipe, entry["config"], tensors)
    except ArtifactError:
        raise
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError, NotImplementedError, AttributeError,
            ArithmeticError) as error:
        raise ArtifactError(
            f"artifact {folder}: technique {entry['name']!r} cannot be restored from its manifest config and "
            f"{entry['tensors']} ({type(error).__name__}: {error}); {damaged}") from error
    if tensors.unread():
        raise ArtifactError(f"artifact {folder}: {entry['tensors']} holds {len(tensors.unread())} tensors the "
                            f"{entry['name']!r} config does not use (e.g. {tensors.unread()[0]!r}); {damaged}")
    mark_applied(pipe, entry["name"])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one technique file; ArtifactError naming the file when missing or damaged.

    Copied out of the memory-mapped file: tensors viewing the mapping kept the file mapped for the life of
    the pipeline, and Windows refuses to replace a mapped file, so saving back into the artifact's own
    folder would fail part-way."""
    if not path.is_file():
        raise ArtifactError(f"artifact file {path} is missing (manifest.json lists it); save the artifact again")
    try:
        return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
    except Exception as error:  # safetensors raises its own SafetensorError for damaged headers
        raise ArtifactError(f"artifact file {path} is not readable safetensors ({error}); "
                            f"save the artifact again") from None


def _check_base(base_pipe: Any, manifest: dict[str, Any], directory: str | Path) -> None:
    if applied_techniques(base_pipe):
        raise ArtifactError(f"load() needs an unmodified base pipeline; this one already has "
                            f"{applied_techniques(base_pipe)} applied")
    _check_has_weights(base_pipe, "load")
    component, denoiser = find_denoiser(base_pipe)
    _check_unfused_base(denoiser, component)
    expected = manifest["base"]["fingerprint"]
    recorded = _recorded_config(manifest, denoiser)
    actual = fingerprint(denoiser, recorded)  # not base_fingerprint: a refused load left its cache on the denoiser
    if actual != expected and not _same_base_in_another_dtype(denoiser, manifest, directory, recorded):
        differences = config_differences(manifest["base"].get("config"), denoiser)
        raise ArtifactError(
            f"artifact {directory} was made for a different base model "
            f"({manifest['base']['denoiser']} fingerprint {expected[:12]}…), this pipeline's "
            f"{type(denoiser).__name__} has fingerprint {actual[:12]}…"
            + (f"; its config differs ({'; '.join(differences)})" if differences else ""))


def _check_unfused_base(denoiser: torch.nn.Module, component: str) -> None:
    """ArtifactError naming ``unfuse_qkv_projections`` for a base whose attention runs fused projections: their
    weights changed its fingerprint, and load said "made for a different base model" (before session 44)."""
    from .arch.families._common import uses_fused_projections

    fused = next((name for name, module in denoiser.named_modules() if uses_fused_projections(module)), None)
    if fused is not None:
        raise ArtifactError(f"load() needs a base with separate to_q/to_k/to_v projections, but pipe.{component}'s "
                            f"attention {fused!r} runs fused ones (fuse_qkv_projections()): call "
                            f"pipe.{component}.unfuse_qkv_projections() (or pipe.unfuse_qkv_projections()) before "
                            f"load; a cache-only artifact's pipeline may fuse them again after it")


def _recorded_config(manifest: dict[str, Any], denoiser: torch.nn.Module) -> dict[str, Any] | None:
    """The artifact's recorded base config when ``denoiser``'s is that one plus arguments a newer diffusers added
    at their defaults (hash it in place of the denoiser's own); None otherwise."""
    recorded = manifest["base"].get("config")
    return recorded if upgraded_from(recorded, denoiser) else None


def _same_base_in_another_dtype(denoiser: torch.nn.Module, manifest: dict[str, Any], directory: str | Path,
                                recorded_config: dict[str, Any] | None) -> bool:
    """Whether ``denoiser`` is the artifact's base cast to another dtype (the bf16-rounded
    fingerprint cannot tell for float16): same architecture and the saved weight sample matches."""
    sample_file = manifest["base"].get("sample")
    if not sample_file or manifest["base"].get("structure") != structure_fingerprint(denoiser, recorded_config):
        return False
    return samples_match(_read_tensors(Path(directory) / sample_file), weight_sample(denoiser))


def _warn_on_adapters(denoiser: torch.nn.Module, component: str) -> None:
    """Unmerged LoRA adapters change the images but are not a technique of this library: the artifact
    cannot hold them, so say that a load needs them loaded again."""
    wrapped = adapter_layers(denoiser)  # modules_to_save copies too: their images were lost silently (until s46)
    fused = [name for name in wrapped if getattr(denoiser.get_submodule(name), "merged", False)]
    unmerged = [name for name in wrapped if name not in fused]
    if unmerged:
        warnings.warn(f"pipe.{component} holds unmerged adapters (LoRA, via peft) on {len(unmerged)} layers, e.g. "
                      f"{unmerged[0]!r}; the artifact holds only {techniques_on(denoiser)}, not them: after "
                      f"load(), load the adapters again (pipe.load_lora_weights) to get this pipeline's images",
                      stacklevel=user_stacklevel())
    if fused:  # their base layers hold W + BA: the artifact's base is the fused model (until s46: "load them again")
        warnings.warn(f"pipe.{component} holds adapters fused into its weights but not unloaded (fuse_lora without "
                      f"unload_lora_weights) on {len(fused)} layers, e.g. {fused[0]!r}: the artifact's base is the "
                      f"fused model; load it onto a base with the same LoRA fused (load_lora_weights, fuse_lora, "
                      f"unload_lora_weights), not onto the plain base with the LoRA loaded again",
                      stacklevel=user_stacklevel())


def compute_dtype(denoiser: torch.nn.Module) -> torch.dtype | None:
    """The floating dtype ``denoiser`` computes in: that of its first floating-point parameter."""
    return next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), None)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _warn_on_dtype_change(manifest: dict[str, Any], denoiser: torch.nn.Module, component: str,
                          directory: str | Path) -> None:
    """Loading onto a base in another dtype works (artifacts are dtype-independent) but cannot
    reproduce the saved pipeline's images: say so, and how to get the exact round trip."""
    saved, actual = manifest["base"].get("dtype"), _dtype_name(compute_dtype(denoiser))
    rounded = manifest["base"].get("rounded_to")
    if rounded and saved and actual:
        _warn_on_rounding(directory, component, saved, rounded, actual, denoiser)
    elif saved and actual and saved != actual:
        warnings.warn(f"artifact {directory} was saved from a {saved} {component}; this base's {component} "
                      f"is {actual}: it runs, but its images will differ from the saved pipeline's. For a "
                      f"bit-exact round trip load the base in {saved} (from_pretrained(..., dtype=torch.{saved}), "
                      f"or pipe.to(torch.{saved}) before load)", stacklevel=user_stacklevel())


def _warn_on_rounding(directory: str | Path, component: str, saved: str, rounded: str, actual: str,
                      denoiser: torch.nn.Module) -> None:
    """The artifact's pipeline computed in ``saved`` on weights rounded to ``rounded``: a base whose weights lack
    that rounding cannot give its images; one that has it needs only the cast to ``saved`` after load."""
    if actual != rounded and not representable_in(weight_sample(denoiser), getattr(torch, rounded)):
        warnings.warn(f"artifact {directory} was saved from a {saved} {component} whose float weights were rounded to "
                      f"{rounded} (techniques applied in {rounded}, cast to {saved} after); this base's {actual} "
                      f"weights are not: it runs, but its images will differ from the saved pipeline's. For those, "
                      f"load the base in {rounded} (or pipe.to(torch.{rounded}) before load) and call "
                      f"pipe.to(torch.{saved}) after load", stacklevel=user_stacklevel())
    elif actual != saved:
        warnings.warn(f"artifact {directory} was saved from a {saved} {component} (its weights rounded to {rounded}); "
                      f"this base's {component} is {actual}: pipe.to(torch.{saved}) after load gives the saved "
                      f"pipeline's images", stacklevel=user_stacklevel())


def _set_denoiser(pipe: Any, component: str, denoiser: torch.nn.Module) -> None:
    setattr(pipe, component, denoiser)
