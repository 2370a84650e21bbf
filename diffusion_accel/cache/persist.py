"""Save/load support: the "cache" technique stores its config (and any calibrated schedule) as JSON."""

from __future__ import annotations

from typing import Any

import torch

from ..artifact import ArtifactError, register_technique
from .apply import TECHNIQUE, cache_config, enable_cache
from .configs import config_from_dict, config_to_dict
from .session import map_reading_name


def export_cache(pipe: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The enabled cache's config as JSON; no tensors (caches are rebuilt at run time)."""
    config = cache_config(pipe)
    if config is None:
        raise ValueError("the pipeline is marked as cached but has no cache enabled")
    return config_to_dict(config), {}


def restore_cache(pipe: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Re-enable the saved cache on ``pipe``; an ArtifactError for a pipeline that cannot cache (enable_cache's
    ValueError was reported as a damaged artifact)."""
    name = map_reading_name(pipe)
    if name is not None:
        raise ArtifactError(f"this artifact enables a feature cache, which {name} cannot take (it reads attention "
                            f"maps inside the denoiser that a cache skips); load it onto a pipeline of another class "
                            f"built from the same components, e.g. StableDiffusionPipeline(**pipe.components)")
    enable_cache(pipe, config_from_dict(config))


register_technique(TECHNIQUE, export_cache, restore_cache)
