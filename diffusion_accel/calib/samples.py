"""A capped, uniformly subsampled store of module calls, one batch row each, for reconstruction.

Each batch row of each observed call is a candidate sample holding that row of the call's inputs
(all positional and keyword arguments: for a transformer block the hidden states, the encoder
states, the embedding, ...) and optionally of its output, tagged with the denoising step. Rows
get uniform random keys and each module keeps the rows with the smallest keys, at most ``max_samples``:
a uniform sample without replacement over all steps, prompts and CFG branches. While all modules
together hold more than ``max_bytes``, the module holding the most samples gives up its largest key
(and takes no later row above it), so the budget is shared by sample count, not bytes: an equal byte
share (until session 46) left a full-size SD 1.5 UNet's 64x64 blocks 1-2 samples at 512 px while its
8x8 blocks kept dozens. Samples live on the CPU.

A tensor counts as batched when its first dimension equals the call's batch size (that of the
call's first tensor), unless a keyword argument every image shares holds it (``arch.base.BATCH_SHARED_ARGUMENTS``:
Flux's rotary tables, whose first dimension is a token count, were cut into rows at a batch of that count until
session 52); other tensors (rotary embeddings, ids) are kept whole in every sample.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .collectors import Collector, ModuleCall, Step
from .trees import (batched_leaf_indices, call_batch_size, flatten, merge_rows, nbytes, same_layout,
                    shared_leaf_indices, take_row, tensors_in, to_cpu_copy)


@dataclass
class Sample:
    """One stored batch row: the call's inputs (batch dim kept, size 1), its output, its step."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any
    step: Step
    nbytes: int = 0
    _input_batched: frozenset[int] = field(default=frozenset(), repr=False)
    _output_batched: frozenset[int] = field(default=frozenset(), repr=False)

    @property
    def input(self) -> torch.Tensor:
        """The first input tensor of the call (what a Linear or Conv2d receives)."""
        return tensors_in((self.args, self.kwargs))[0]


@dataclass
class _ModuleSamples:
    """Max-heap (by key) of one module's samples and their total bytes."""

    heap: list[tuple[float, int, Sample]] = field(default_factory=list)
    bytes: int = 0
    threshold: float = float("inf")  # the smallest key given up: a later row at or above it is not taken

    def largest_key(self) -> float:
        return -self.heap[0][0]


class SampleStore(Collector):
    """Uniform subsample (at most ``max_samples`` rows per module, ``max_bytes`` in all) of module calls;
    ``budget_name``: what errors call ``max_bytes`` (the option a caller set it from)."""

    wants = "call"

    def __init__(self, module_names: str | Iterable[str], max_samples: int = 256,
                 max_bytes: int = 1 << 30, with_outputs: bool = False, seed: int = 0,
                 budget_name: str = "max_bytes") -> None:
        super().__init__(module_names)
        for label, value in (("max_samples", max_samples), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        self.max_samples, self.max_bytes, self.with_outputs = max_samples, max_bytes, bool(with_outputs)
        self.budget_name = budget_name  # quantize_'s error said "raise max_bytes", an option it has not (s53)
        self.total_bytes = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._order = itertools.count()
        self._stores: dict[str, _ModuleSamples] = {name: _ModuleSamples() for name in self.module_names}
        self.rows_seen: dict[str, int] = dict.fromkeys(self.module_names, 0)

    def observe(self, name: str, value: ModuleCall, step: Step) -> None:
        """Offer every batch row of one call of ``name`` to the store."""
        batch = call_batch_size(value.args, value.kwargs)
        in_leaves, in_rebuild = flatten((value.args, value.kwargs))
        in_batched = batched_leaf_indices(in_leaves, batch, shared_leaf_indices(value.args, value.kwargs))
        out_leaves, out_rebuild = flatten(value.output if self.with_outputs else None)
        out_batched = batched_leaf_indices(out_leaves, batch)
        self.rows_seen[name] += batch
        for row, key in enumerate(torch.rand(batch, generator=self._generator).tolist()):
            store = self._stores[name]
            if key >= store.threshold or (len(store.heap) >= self.max_samples and key >= store.largest_key()):
                continue
            args, kwargs = in_rebuild(_copy_leaves(take_row(in_leaves, in_batched, row)))
            output = out_rebuild(_copy_leaves(take_row(out_leaves, out_batched, row)))
            sample = Sample(args, kwargs, output, step, 0, in_batched, out_batched)
            sample.nbytes = nbytes((args, kwargs, output))
            self._insert(name, key, sample)

    def _insert(self, name: str, key: float, sample: Sample) -> None:
        store = self._stores[name]
        heapq.heappush(store.heap, (-key, next(self._order), sample))
        store.bytes += sample.nbytes
        self.total_bytes += sample.nbytes
        if len(store.heap) > self.max_samples:
            self._give_up(store)
        while self.total_bytes > self.max_bytes:
            self._give_up(self._fullest())

    def _fullest(self) -> _ModuleSamples:
        """The module holding the most samples (the most bytes among equals); ValueError when that is one sample:
        ``max_bytes`` cannot hold a sample of every module called so far."""
        store = max(self._stores.values(), key=lambda held: (len(held.heap), held.bytes))
        if len(store.heap) <= 1:
            called = sum(1 for held in self._stores.values() if held.heap)
            raise ValueError(f"{self.budget_name}={self.max_bytes} cannot hold one sample of each of the {called} "
                             f"modules called so far ({self.total_bytes} bytes); raise {self.budget_name}")
        return store

    def _give_up(self, store: _ModuleSamples) -> None:
        """Drop ``store``'s sample of the largest key; later rows at or above that key are not taken."""
        negative_key, _, dropped = heapq.heappop(store.heap)
        store.bytes -= dropped.nbytes
        self.total_bytes -= dropped.nbytes
        store.threshold = min(store.threshold, -negative_key)

    def samples(self, name: str) -> list[Sample]:
        """Stored samples of ``name`` in the order they were taken."""
        if name not in self._stores:
            raise KeyError(f"{name!r} is not stored; modules: {list(self.module_names)}")
        return [sample for _, _, sample in sorted(self._stores[name].heap, key=lambda item: item[1])]

    def inputs(self, name: str) -> torch.Tensor:
        """First input tensors of all samples of ``name``, concatenated: (num_samples, ...)."""
        return torch.cat([sample.input for sample in self._non_empty(name)])

    def batch(self, name: str, indices: Sequence[int] | None = None) -> ModuleCall:
        """Samples of ``name`` (all, or those at ``indices``) merged into one batched call."""
        chosen = self._non_empty(name)
        chosen = chosen if indices is None else [chosen[i] for i in indices]
        first = chosen[0]
        in_lists = [flatten((s.args, s.kwargs))[0] for s in chosen]
        out_lists = [flatten(s.output)[0] for s in chosen]
        if not all(same_layout(in_lists[0], leaves, first._input_batched) for leaves in in_lists):
            raise ValueError(f"samples of {name!r} have different input layouts and cannot be batched")
        args, kwargs = flatten((first.args, first.kwargs))[1](merge_rows(in_lists, first._input_batched))
        output = flatten(first.output)[1](merge_rows(out_lists, first._output_batched))
        return ModuleCall(args=args, kwargs=kwargs, output=output)

    def layout_classes(self, name: str) -> list[int]:
        """Per sample of ``name``, the index of its class of samples ``batch`` can merge (``same_layout``: one shape,
        and the same tensors every row shares, such as Flux Kontext's position ids per reference-image shape)."""
        representatives: list[tuple[list[Any], frozenset[int]]] = []
        classes = []
        for sample in self.samples(name):
            leaves = flatten((sample.args, sample.kwargs))[0]
            found = next((index for index, (first, batched) in enumerate(representatives)
                          if batched == sample._input_batched and same_layout(first, leaves, batched)), None)
            if found is None:
                found = len(representatives)
                representatives.append((leaves, sample._input_batched))
            classes.append(found)
        return classes

    def steps(self, name: str) -> list[Step]:
        """Step tags of the samples of ``name``, in sample order."""
        return [sample.step for sample in self.samples(name)]

    def _non_empty(self, name: str) -> list[Sample]:
        samples = self.samples(name)
        if not samples:
            raise ValueError(f"no samples were stored for {name!r}: was it called on a selected step?")
        return samples

    def describe(self) -> str:
        """One line: module count, samples held and bytes."""
        held = sum(len(store.heap) for store in self._stores.values())
        used = sum(store.bytes for store in self._stores.values())
        return f"SampleStore({len(self.module_names)} modules, {held} samples, {used / 2**20:.1f} MiB)"


def _copy_leaves(leaves: list[Any]) -> list[Any]:
    return [to_cpu_copy(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
