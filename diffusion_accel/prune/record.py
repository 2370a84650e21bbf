"""What pruning changed in a denoiser, kept on the denoiser so ``da.save`` can export it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

RECORD_ATTR = "_diffusion_accel_prune"


@dataclass
class PruneRecord:
    """Layers with masked weights, layers replaced by smaller ones (with their base shapes), head counts
    of pruned attentions, group counts of pruned GroupNorms."""

    configs: list[dict[str, Any]] = field(default_factory=list)
    calibrations: list[dict[str, Any] | None] = field(default_factory=list)  # per config: Calibration.provenance()
    masked: list[str] = field(default_factory=list)
    base_shapes: dict[str, list[int]] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)
    norm_groups: dict[str, int] = field(default_factory=dict)

    def note_masked(self, name: str) -> None:
        """Remember that layer ``name`` holds pruned (zeroed and updated) weights."""
        if name not in self.masked:
            self.masked.append(name)

    def note_shape(self, denoiser: nn.Module, name: str) -> None:
        """Remember layer ``name``'s weight shape before its first structural change."""
        if name not in self.base_shapes:
            self.base_shapes[name] = list(denoiser.get_submodule(name).weight.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"configs": self.configs, "calibrations": self.calibrations, "masked": self.masked, "base_shapes": self.base_shapes,
                "heads": self.heads, "norm_groups": self.norm_groups}


def get_record(denoiser: nn.Module) -> PruneRecord | None:
    """The denoiser's prune record, or None if it was never pruned."""
    return getattr(denoiser, RECORD_ATTR, None)


def ensure_record(denoiser: nn.Module) -> PruneRecord:
    """The denoiser's prune record, created empty on first use."""
    record = get_record(denoiser)
    if record is None:
        record = PruneRecord()
        setattr(denoiser, RECORD_ATTR, record)
    return record
