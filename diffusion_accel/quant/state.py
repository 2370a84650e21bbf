"""Where PTQ keeps its record on the denoiser, and in-place module swapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

STATE_ATTR = "_diffusion_accel_ptq"
TRACKER_CLIENT = "ptq"

TECHNIQUE = "ptq"  # the artifact technique name


@dataclass
class PTQState:
    """PTQ's record: config, quantized layer names, lowering per layer, notes for ``summary``."""

    config: dict[str, Any]
    layers: list[str]
    num_steps: int
    lowered: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # from quantize_ (saved with the artifact)
    lowering_notes: list[str] = field(default_factory=list)  # from the last lowering on this device (not saved)
    calibration: str = ""
    attention: list[str] = field(default_factory=list)
    group_bounds: list[float] | None = None  # timestep values between timestep groups (layers.StepGroups)
    calibration_record: dict[str, Any] | None = None  # Calibration.provenance() of the ranges' pass


def get_state(denoiser: nn.Module) -> PTQState | None:
    """The PTQ record of ``denoiser`` or None if it is not quantized."""
    return getattr(denoiser, STATE_ATTR, None)


def set_state(denoiser: nn.Module, state: PTQState | None) -> None:
    """Store (or with None, drop) the PTQ record."""
    if state is None:
        denoiser.__dict__.pop(STATE_ATTR, None)
    else:
        object.__setattr__(denoiser, STATE_ATTR, state)


def swap_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Register ``module`` at ``name`` under ``root``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
