"""Analytic toy denoisers shared by the cache tests: each block adds an offset and scales."""

import torch
from torch import nn


class Offset(nn.Module):
    def __init__(self, offset: float, scale: float = 1.0) -> None:
        super().__init__()
        self.offset, self.scale = offset, scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return (hidden_states + self.offset) * self.scale


class Toy(nn.Module):
    """A 'denoiser' whose blocks see the timestep as their input value. ``between`` is added after
    every block by the denoiser's own loop, as Flux and SD3 add ControlNet residuals."""

    def __init__(self, *blocks: nn.Module, between: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.between = between

    def forward(self, sample: torch.Tensor, timestep: float) -> torch.Tensor:
        hidden = torch.full((1,), float(timestep))
        for block in self.blocks:
            hidden = block(hidden) + self.between
        return hidden
