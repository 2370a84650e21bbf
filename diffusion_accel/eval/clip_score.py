"""CLIP score (torchmetrics ``CLIPScore``: 100 x cosine(image, text) averaged over the pairs, then clamped at 0).

torchmetrics clamps the mean, where the CLIPScore paper clamps each pair: the two differ only when some pairs'
cosines are negative (badly degraded images), and a variant whose mean cosine is negative scores 0.

``model`` is a hub id (e.g. ``"openai/clip-vit-large-patch14"``, needs the hub) or a local folder
holding a ``CLIPModel`` and a ``CLIPProcessor`` saved with ``save_pretrained`` (e.g. the zoo's
in-domain CLIP). The model is always handed to torchmetrics as a loader callable: torchmetrics 1.9
rejects folder paths given as strings, and transformers 5's ``get_*_features`` return model
outputs where torchmetrics expects tensors, which :class:`_TensorFeatures` adapts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore

from .images import to_uint8
from ..paths import expand_home, read_json_object

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


class _TensorFeatures(nn.Module):
    """Wrap a CLIPModel so ``get_image_features``/``get_text_features`` return (N, D) tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))


def _as_tensor(output: Any) -> torch.Tensor:
    """Projected embeddings from a tensor (transformers 4) or a model output (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def truncating(processor: Any) -> Any:
    """The processor with tokenizer truncation on by default: torchmetrics tokenizes with
    ``padding=True`` only, so prompts longer than the text tower's positions would otherwise be cut
    by torchmetrics after tokenizing (dropping the end token CLIP pools at), and a tokenizer that
    records a ``max_length`` warns on every call."""
    processor.tokenizer.init_kwargs["truncation"] = True
    return processor


def pretrained_loader(name_or_path: str) -> Callable[[], tuple[Any, Any]]:
    """A callable returning ``(model, CLIPProcessor)`` from a folder or hub id, in the form torchmetrics'
    ``CLIPScore(model_name_or_path=...)`` takes (tensor features, truncating tokenizer)."""
    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(name_or_path).eval()
        return _TensorFeatures(model), truncating(CLIPProcessor.from_pretrained(name_or_path))

    return load


def check_clip_model(model: str | Path) -> str:
    """``model`` as a loadable name: an existing folder, or a hub id ``org/name`` (``evaluate`` asks before
    generating). A path-like name that is no folder (``/x``, ``./x``, ``~/x``, ``a/b/c``) is an error here,
    not the hub's 'Repo id must use alphanumeric chars' after every image was generated."""
    folder = expand_home(str(model))
    if folder.is_dir():
        problem = _clip_folder_problem(folder)
        if problem is not None:  # an empty folder, a pipeline's, a text encoder's failed after every image (s50)
            raise ValueError(f"CLIP model folder {str(folder)!r} {problem}; accepted: a folder with a saved CLIPModel "
                             f"+ CLIPProcessor (save_pretrained of both), or a hub id such as {DEFAULT_CLIP_MODEL!r}")
        return str(folder)
    name = str(model)
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~")) or isinstance(model, Path):
        raise ValueError(f"CLIP model {name!r} is neither a local folder nor a hub id; accepted: a folder with a "
                         f"saved CLIPModel + CLIPProcessor, or a hub id such as {DEFAULT_CLIP_MODEL!r}")
    return name


# the names CLIPModel.from_pretrained reads without a variant: one file or a sharded index (a folder holding
# only model.fp16.safetensors passed a *.safetensors check, then failed after every image was generated)
CLIP_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def _clip_folder_problem(folder: Path) -> str | None:
    """What a folder lacks to load as a CLIPModel + CLIPProcessor (a clause), or None."""
    config = read_json_object(folder / "config.json") or {}
    if config.get("model_type") != "clip":
        found = config.get("model_type") or config.get("_class_name")
        return f"holds no CLIPModel config (config.json of model_type 'clip'{f'; found {found!r}' if found else ''})"
    if not any((folder / name).is_file() for name in CLIP_WEIGHT_FILES):
        variants = sorted(path.name for path in (*folder.glob("*.safetensors"), *folder.glob("*.bin")))
        found = f"; found only {', '.join(variants)}, which the loader (no variant) does not read" if variants else ""
        return f"holds no weights ({' or '.join(CLIP_WEIGHT_FILES)}{found})"
    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        return "holds no CLIPProcessor (processor_config.json or preprocessor_config.json)"
    return None


def check_clip_reachable(model: str | Path) -> None:
    """An OSError before any image is generated when the CLIP ``model`` (a hub id) cannot be had: its
    config is neither cached nor downloadable (offline: a missing default CLIP failed after generating
    everything, following ~46 s of hub retries). Local folders pass (``check_clip_model`` checks them)."""
    name = check_clip_model(model)
    if Path(name).is_dir():
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except OSError as error:
        raise OSError(f"the CLIP model {name!r} of the clip metric cannot be loaded (not in the local Hugging "
                      f"Face cache and the hub not reachable, or no such model): pass clip_model= / --clip-model "
                      f"a local CLIP folder (for zoo pipelines diffusion_accel.zoo.path('fashion-clip')), or "
                      f"leave clip out of the metrics") from error


def clip_metric(model: str | Path = DEFAULT_CLIP_MODEL) -> CLIPScore:
    """A torchmetrics CLIPScore for a local ``save_pretrained`` folder or a hub id. It never syncs across
    processes: evaluation scores the gathered images on the main process alone, and the sync in
    ``compute()`` waited for processes that never came (a 2-process ``eval --metrics clip`` hung)."""
    return CLIPScore(model_name_or_path=pretrained_loader(check_clip_model(model)), sync_on_compute=False)


def clip_score(images: Any, prompts: Sequence[str], *, model: str | Path | CLIPScore = DEFAULT_CLIP_MODEL,
               batch_size: int = 32, device: Any = "cpu") -> float:
    """Mean CLIP score of ``images`` (N images, any form) against their ``prompts`` (N strings).

    The CLIP model runs on ``device`` (torchmetrics follows the images' device).
    """
    pixels = to_uint8(images).to(device)
    texts = list(prompts)
    if len(texts) != len(pixels):
        raise ValueError(f"got {len(pixels)} images but {len(texts)} prompts; need one prompt per image")
    if not all(isinstance(text, str) for text in texts):
        kinds = sorted({type(text).__name__ for text in texts})
        raise TypeError(f"CLIP score needs text prompts (str); got {kinds}")
    metric = model if isinstance(model, CLIPScore) else clip_metric(model)
    metric = metric.to(pixels.device)  # torchmetrics moves the CLIP model but sums scores into the metric's states
    metric.reset()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            metric.update(pixels[start:start + batch_size], texts[start:start + batch_size])
    return float(metric.compute())
