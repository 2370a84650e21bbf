"""A bounded uniform sample of all values seen in a stream of tensors (reservoir by random keys).

Every value gets an independent uniform key; the reservoir keeps the ``capacity`` values with the
smallest keys, which is a uniform sample without replacement of everything seen so far. Keys are
drawn on the tensor's device; only candidates that can enter the reservoir are moved to the CPU.
"""

from __future__ import annotations

import torch


class ValueReservoir:
    """Uniform sample (at most ``capacity`` float32 values, on CPU) of all elements added."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"reservoir capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self.seed = seed
        self.values = torch.empty(0, dtype=torch.float32)
        self.keys = torch.empty(0, dtype=torch.float32)
        self.seen = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def add(self, tensor: torch.Tensor) -> None:
        """Offer every element of ``tensor`` (any shape) to the sample."""
        flat = tensor.detach().reshape(-1)
        self.seen += flat.numel()
        keys = torch.rand(flat.numel(), generator=self._generator(flat.device), device=flat.device)
        if len(self.keys) == self.capacity:
            entering = keys < self.keys.max().to(keys.device)
            flat, keys = flat[entering], keys[entering]
        values = torch.cat([self.values, flat.to("cpu", torch.float32)])
        all_keys = torch.cat([self.keys, keys.to("cpu")])
        if len(all_keys) > self.capacity:
            kept = torch.topk(all_keys, self.capacity, largest=False).indices
            values, all_keys = values[kept], all_keys[kept]
        self.values, self.keys = values, all_keys

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
