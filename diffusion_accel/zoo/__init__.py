"""The reference zoo: small real text-to-image pipelines trained here on Fashion-MNIST, loaded offline.

``load("fashion-sd")`` → StableDiffusionPipeline, ``load("fashion-flux")`` → FluxPipeline,
``load("fashion-clip")`` → (CLIPModel, CLIPProcessor), ``load("mnist-ddpm")`` → DDPMPipeline (an
unconditional pixel-space UNet2DModel on MNIST with a DDIM scheduler); ``path(name)`` → the model folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..paths import expand_home
from ..pipeline_defaults import set_call_defaults

MODELS_DIR = Path(__file__).resolve().parent / "models"
NATIVE_SIZE = 32  # pixels: every zoo pipeline is trained and generates at 32×32
_NAMES = ("fashion-clip", "fashion-sd", "fashion-flux", "mnist-ddpm")
# Keyword arguments each pipeline is meant to be called with (its model card's; pipeline_defaults.py).
CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion-sd": {"guidance_scale": 3.0},  # on the FID plateau (benchmarks/results/zoo_guidance_sweep_sd.md)
    "fashion-flux": {"true_cfg_scale": 3.0, "negative_prompt": "", "max_sequence_length": 32},  # T5 trained at 32
    "mnist-ddpm": {},
}


# The locally built word-level tokenizers: without tokenizer.json, transformers silently builds a 2-token
# vocabulary (fashion-clip / fashion-sd) or a 4-token one (fashion-flux's T5) and every prompt becomes
# unknown tokens: CLIP scores and prompts stop meaning anything, with no error.
TOKENIZER_FILES: dict[str, tuple[str, ...]] = {
    "fashion-clip": ("tokenizer.json",), "fashion-sd": ("tokenizer/tokenizer.json",),
    "fashion-flux": ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"), "mnist-ddpm": ()}


def _check_tokenizers(name: str, folder: Path) -> None:
    """FileNotFoundError naming a tokenizer file the zoo model ``name`` in ``folder`` lacks."""
    missing = [file for file in TOKENIZER_FILES[name] if not (folder / file).is_file()]
    if missing:
        raise FileNotFoundError(f"zoo model folder {str(folder)!r} lacks {', '.join(missing)}: its word-level "
                                f"tokenizer (without it every prompt becomes unknown tokens); copy the folder "
                                f"again or re-export it")


_NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "TokenizersBackend", "Scheduler", "Processor", "FeatureExtractor")


def _missing_parts(name: str, folder: Path) -> list[str]:
    """What the save_pretrained layout of zoo model ``name`` in ``folder`` lacks: a component folder its
    model_index.json lists, or a model component's config.json / safetensors weights (an interrupted copy was
    listed as shipped, and loading it blamed the pipeline folder's config.json; until session 49)."""
    if name == "fashion-clip":
        return [] if _has_weights(folder) else ["*.safetensors (the model's weights)"]
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["a readable model_index.json"]
    missing = []
    for component, spec in (index.items() if isinstance(index, dict) else []):
        if component.startswith("_") or not isinstance(spec, list) or None in spec:
            continue
        part = folder / component
        if not part.is_dir():
            missing.append(f"{component}/")
        elif not str(spec[-1]).endswith(_NO_WEIGHTS) and not component.startswith(("tokenizer", "scheduler")):
            missing += [f"{component}/{file}" for file, found in
                        (("config.json", (part / "config.json").is_file()),
                         ("*.safetensors", _has_weights(part))) if not found]
    return missing


def _has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a weight file (safetensors, or .bin of ``save_pretrained(safe_serialization=False)``,
    refused as an incomplete copy in a review of session 49's check)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _check_complete(name: str, folder: Path, what: str) -> None:
    """FileNotFoundError naming the parts (:func:`_missing_parts`) and the tokenizer files ``folder`` lacks."""
    missing = _missing_parts(name, folder)
    if missing:
        raise FileNotFoundError(f"{what} lacks {', '.join(missing)}: an incomplete copy; copy the folder again or "
                                f"re-export it")
    _check_tokenizers(name, folder)


def names() -> tuple[str, ...]:
    """Names of the shipped zoo models."""
    return _NAMES


def path(name: str) -> Path:
    """Folder of shipped model ``name`` (a save_pretrained layout)."""
    if name not in _NAMES:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(_NAMES)}")
    folder = MODELS_DIR / name
    marker = folder / ("config.json" if name == "fashion-clip" else "model_index.json")
    if not marker.is_file():  # a folder without it was called missing (until session 48)
        where = f"{folder} is missing" if not folder.is_dir() else f"{folder} lacks {marker.name}: an incomplete copy"
        raise FileNotFoundError(f"zoo model {name!r} is not shipped in this install ({where}); "
                                f"train it with `diffusion-accel zoo train {name} --ship`")
    _check_complete(name, folder, f"zoo model folder {str(folder)!r}")
    return folder


PIPELINE_CLASSES = {"fashion-sd": "StableDiffusionPipeline", "fashion-flux": "FluxPipeline",
                    "mnist-ddpm": "DDPMPipeline"}  # what each zoo pipeline's model_index.json names


def _export_folder(name: str, folder: Path) -> Path:
    """``folder`` if it holds a save_pretrained layout of zoo model ``name``, else a clear error."""
    if name not in _NAMES:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(_NAMES)}")
    marker = "config.json" if name == "fashion-clip" else "model_index.json"
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"folder={str(folder)!r} has no {marker}: expected a save_pretrained export of {name}")
    if name in PIPELINE_CLASSES:
        check_pipeline_class(folder, PIPELINE_CLASSES[name], f"folder={str(folder)!r}")
    _check_complete(name, folder, f"folder={str(folder)!r}")
    return folder


def check_pipeline_class(folder: Path, expected: str, what: str) -> None:
    """ValueError unless ``folder``'s model_index.json names the pipeline class ``expected`` (a DDPM export
    loaded as fashion-sd was tagged with CFG settings its call then refused)."""
    import json

    try:
        found = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != expected:
        raise ValueError(f"{what} holds a {found or 'unreadable'} pipeline (model_index.json), not the "
                         f"{expected} this model is")


ZOO_MODEL_ATTR = "_diffusion_accel_zoo_model"  # the zoo model a loaded pipeline is (shipped, a copy or an export)


def load(name: str, torch_dtype: torch.dtype | str | None = torch.float32, folder: str | Path | None = None,
         variant: str | None = None) -> Any:
    """Load zoo model ``name`` offline: a diffusers pipeline, or (CLIPModel, CLIPProcessor) for fashion-clip.

    ``torch_dtype``: a torch dtype or its name ("float32" / "fp32", "float16" / "fp16", "bfloat16" / "bf16";
    None: float32). ``folder``: another save_pretrained folder of that model (a training export, a staged
    ship, its ``save_pretrained``) to load with the same settings instead of the shipped one; ``variant``: that
    folder's weight-file variant (``save_pretrained(..., variant="fp16")``), as diffusers' ``from_pretrained``.
    """
    if not isinstance(torch_dtype, torch.dtype):  # diffusers fell back to fp32 while the source said float16
        from ..loading import parse_dtype

        torch_dtype = parse_dtype(torch_dtype) or torch.float32
    shipped = folder is None
    folder = path(name) if shipped else _export_folder(name, expand_home(folder))  # "~/x" (session 50)
    if name == "fashion-clip":
        from transformers import CLIPModel, CLIPProcessor

        extra = {} if variant is None else {"variant": variant}
        model = CLIPModel.from_pretrained(folder, dtype=torch_dtype, **extra).eval()
        return model, CLIPProcessor.from_pretrained(folder)
    from diffusers import DiffusionPipeline

    extra = {} if variant is None else {"variant": variant}
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype, local_files_only=True, **extra)
    if shipped:  # artifacts saved from it name "zoo:NAME", not this machine's install path
        from ..artifact import record_source

        record_source(pipe, f"zoo:{name}", torch_dtype)
    set_call_defaults(pipe, CALL_DEFAULTS[name])
    setattr(pipe, ZOO_MODEL_ATTR, name)  # also from a folder: its CLIP is the bundled one (evaluate's default)
    if hasattr(pipe, "default_sample_size") and hasattr(pipe, "vae_scale_factor"):
        # FluxPipeline defaults to 128 latent pixels (1024 px); the zoo's native size is 32 px, so calls
        # and calibrations without height/width generate what the model was trained for.
        pipe.default_sample_size = NATIVE_SIZE // pipe.vae_scale_factor
    return pipe


DENOISERS = {"fashion-sd": "unet", "fashion-flux": "transformer", "mnist-ddpm": "unet"}  # component names


def model_of_denoiser(config: Mapping[str, Any]) -> str | None:
    """The shipped zoo pipeline whose denoiser has this config (``_`` keys aside), else None: how a copy, a
    ``save_pretrained`` folder or a sibling pipeline of a zoo model is known without its train_info.json."""
    wanted = _plain_config(config)
    for name, component in DENOISERS.items():
        try:
            file = path(name) / component / "config.json"
        except FileNotFoundError:
            continue
        if _plain_config(json.loads(file.read_text(encoding="utf-8"))) == wanted:
            return name
    return None


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config without its ``_`` keys, in JSON's types (tuples as lists)."""
    return json.loads(json.dumps({key: value for key, value in dict(config).items() if not key.startswith("_")},
                                 default=str))


def bundled_clip() -> str | None:
    """Folder of the shipped fashion-clip (the in-domain CLIP for CLIP score), None if not installed."""
    try:
        return str(path("fashion-clip"))
    except FileNotFoundError:
        return None


DATASETS = ("fashion-mnist", "mnist")  # the zoo's training data, for FID references


def dataset_images(dataset: str, split: str = "test") -> torch.Tensor:
    """uint8 N×3×32×32 images of ``split`` of the zoo's ``dataset`` ("fashion-mnist" or "mnist"), in the
    layout zoo pipelines generate (28×28 padded to 32×32, grey replicated to RGB): an FID reference."""
    from .data import load_split, to_uint8_rgb32
    from .mnist_data import load_mnist

    loaders = {"fashion-mnist": load_split, "mnist": load_mnist}
    if dataset not in loaders:
        raise ValueError(f"unknown zoo dataset {dataset!r}; accepted: {', '.join(DATASETS)}")
    return to_uint8_rgb32(loaders[dataset](split)[0])


def clip_score_loader() -> tuple[Any, Any]:
    """(model, processor) of fashion-clip for ``torchmetrics`` ``CLIPScore(model_name_or_path=clip_score_loader)``.

    torchmetrics accepts only hub names or a callable, and expects the transformers-4 API where
    ``get_image_features``/``get_text_features`` return tensors; the model returned here does.
    """
    from ..eval.clip_score import pretrained_loader

    return pretrained_loader(str(path("fashion-clip")))()


__all__ = ["clip_score_loader", "load", "names", "path", "MODELS_DIR"]
