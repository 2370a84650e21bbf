"""A bounded uniform sample of all values seen in a stream of tensors (reservoir by random keys).

Every value gets an independent uniform float64 key (float32 keys tie often: they take only 2**24
values, and a calibration offers millions); the reservoir keeps the ``capacity`` values with the
smallest keys, which is a uniform sample without replacement of everything seen so far. Keys are
drawn on the tensor's device; only candidates that can enter the reservoir are moved to the CPU.
Candidates wait in a pending list and are merged by one top-k once ``capacity`` of them gather (or
when the sample is read), so a long calibration pays ~1 + ln(seen / capacity) top-k calls instead of
one per tensor; the kept set and its order are the same as merging after every tensor.
"""

from __future__ import annotations

import math

import torch


class ValueReservoir:
    """Uniform sample (at most ``capacity`` float32 values, on CPU) of all elements added."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"reservoir capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self.seed = seed
        self.seen = 0
        self._values = torch.empty(0, dtype=torch.float32)
        self._keys = torch.empty(0, dtype=torch.float64)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_count = 0
        self._threshold = math.inf  # once full: the largest kept key; larger keys can never enter
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def values(self) -> torch.Tensor:
        """The sample: 1-D float32 CPU tensor of at most ``capacity`` values."""
        self._merge()
        return self._values

    @property
    def keys(self) -> torch.Tensor:
        """The random keys of ``values`` (same order)."""
        self._merge()
        return self._keys

    def add(self, tensor: torch.Tensor) -> None:
        """Offer every element of ``tensor`` (any shape) to the sample."""
        flat = tensor.detach().reshape(-1)
        self.seen += flat.numel()
        keys = torch.rand(flat.numel(), generator=self._generator(flat.device), device=flat.device,
                          dtype=torch.float64)
        if self._threshold < math.inf:
            entering = keys < self._threshold
            flat, keys = flat[entering], keys[entering]
        if flat.numel() == 0:
            return
        self._pending.append((flat.to("cpu", torch.float32), keys.to("cpu")))
        self._pending_count += flat.numel()
        if self._pending_count >= self.capacity:
            self._merge()

    def _merge(self) -> None:
        """Fold the pending candidates into the sample, keeping the ``capacity`` smallest keys."""
        if not self._pending:
            return
        values = torch.cat([self._values] + [v for v, _ in self._pending])
        keys = torch.cat([self._keys] + [k for _, k in self._pending])
        self._pending, self._pending_count = [], 0
        if len(keys) > self.capacity:
            kept = torch.topk(keys, self.capacity, largest=False).indices
            values, keys = values[kept], keys[kept]
        self._values, self._keys = values, keys
        if len(keys) == self.capacity:
            self._threshold = float(keys.max())

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
