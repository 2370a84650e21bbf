"""Recognise an artifact's base model after a diffusers upgrade.

Fingerprints hash the denoiser's config, and diffusers records every ``__init__`` argument there, so a release
that adds one (``qk_norm`` on SD3's transformer, ``out_channels`` on Flux's) changes the config of the same
weights, and every artifact saved before it was refused as "made for a different base model". An artifact
therefore records its base's config; a base whose config is that one plus only arguments its class has gained
since, at their defaults, is fingerprinted with the recorded config (weights and all other values must agree).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch

from .base_match import config_items


def comparable_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """``config_items`` as JSON gives it back (tuples as lists, other objects by ``str``): what a manifest
    records, hashing to the same bytes as the config itself."""
    config = config_items(module)
    return None if config is None else _as_json(config)


def upgraded_from(recorded: Any, module: torch.nn.Module) -> bool:
    """Whether ``module``'s config is ``recorded`` plus only ``__init__`` arguments at their defaults (a
    library upgrade that added them), every recorded value unchanged."""
    current = comparable_config(module)
    if not isinstance(recorded, dict) or current is None or set(recorded) - set(current):
        return False
    defaults = init_defaults(type(module))
    added = set(current) - set(recorded)
    return (all(current[key] == recorded[key] for key in recorded)
            and all(key in defaults and current[key] == defaults[key] for key in added))


def config_differences(recorded: Any, module: torch.nn.Module, limit: int = 3) -> list[str]:
    """Up to ``limit`` lines ``key: recorded -> current`` where ``module``'s config differs from ``recorded``."""
    current = comparable_config(module)
    if not isinstance(recorded, dict) or current is None:
        return []
    keys = sorted(key for key in set(recorded) | set(current)
                  if key not in recorded or key not in current or recorded[key] != current[key])
    return [f"{key}: {_shown(recorded, key)} -> {_shown(current, key)}" for key in keys[:limit]]


def _shown(config: dict[str, Any], key: str) -> str:
    return repr(config[key]) if key in config else "(absent)"


def init_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls.__init__``'s arguments as a config records them (JSON values)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {parameter.name: _as_json(parameter.default) for parameter in parameters
            if parameter.default is not inspect.Parameter.empty}


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
