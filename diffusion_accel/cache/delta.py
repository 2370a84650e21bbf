"""Δ-DiT (Δ-caching) for transformer block stacks.

On full steps every block runs and two deltas are recorded per stream: the front span's and the
rear span's (span output - span input). On reuse steps only one span is bypassed — the rear blocks
in the outline stage (before the boundary), the front blocks in the detail stage — so the blocks
that shape the current stage keep running: the span's blocks pass their input through and its last
block returns ``fresh input + cached delta``. The stack is the adapter's blocks, flattened in
execution order (Flux: double-stream then single-stream blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..arch import get_adapter
from .computing import ComputingHook
from .session import CacheSession
from .stack import check_stack
from .streams import BlockIO, add_streams, block_io, detached, sub_streams


@dataclass(frozen=True)
class Span:
    """A contiguous run ``[start, stop)`` of the flattened block stack, cached as one delta."""

    name: str
    start: int
    stop: int

    def holds(self, index: int) -> bool:
        """True if block ``index`` lies in the span."""
        return self.start <= index < self.stop


def delta_spans(num_blocks: int, fraction: float) -> dict[str, Span]:
    """The front and rear spans of ``round(fraction * num_blocks)`` blocks (at least 1)."""
    count = min(num_blocks, max(1, round(fraction * num_blocks)))
    return {"front": Span("front", 0, count), "rear": Span("rear", num_blocks - count, num_blocks)}


class DeltaBlockHook(ComputingHook):
    """One block of a Δ-cached stack (block ``index``), following the call's decision."""

    repeated_block = True

    def __init__(self, session: CacheSession, key: str, io: BlockIO, index: int, last: bool,
                 spans: dict[str, Span]) -> None:
        super().__init__()
        self.session, self.key, self.io, self.index, self.last, self.spans = session, key, io, index, last, spans

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        if not session.active():
            return self.compute(*args, **kwargs)
        state = session.state()
        compute = session.compute(state)
        if compute:
            return self._compute(state, args, kwargs)
        span = self.spans[state["span"]]
        if not span.holds(self.index) or span.name not in state.get("deltas", {}):  # none: a block of it never ran
            return self.compute(*args, **kwargs)
        return self.io.build(state["templates"][self.key], self._reuse(state, span, self.io.inputs(args, kwargs)))

    def _reuse(self, state: dict, span: Span, inputs: dict) -> dict:
        """Pass the inputs through; the span's last block returns the span's input + the cached delta
        (the input its first block received, as in ``StackBlockHook._reuse``: what the denoiser's loop
        adds between blocks, ControlNet residuals, is in the delta already)."""
        if self.index == span.start:
            state["reuse_input"] = inputs
        if self.index != span.stop - 1:
            return inputs
        return add_streams(state.pop("reuse_input", inputs), state["deltas"][span.name])

    def _compute(self, state: dict, args: tuple, kwargs: dict) -> Any:
        """Run the block; record the inputs of spans starting here and the deltas of spans ending here."""
        starts = state.setdefault("span_inputs", {})
        for span in self.spans.values():
            if span.start == self.index:
                starts[span.name] = self.io.inputs(args, kwargs)
        output = self.compute(*args, **kwargs)
        state.setdefault("templates", {})[self.key] = self.io.template(output)
        deltas = state.setdefault("deltas", {})
        for span in self.spans.values():
            if span.stop - 1 == self.index:
                start = starts.pop(span.name, None)
                if start is None:  # its first block did not run (SD3's skip-layer guidance pass): no delta, and
                    deltas.pop(span.name, None)  # reuse steps run the span's blocks
                else:
                    deltas[span.name] = detached(sub_streams(self.io.outputs(output), start))
        if self.last:
            starts.clear()  # a span whose last block did not run recorded no delta
            state["ready"] = True
        return output


def install_delta_cache(session: CacheSession, pipe: Any, fraction: float) -> None:
    """Hook every block of the stack with its role in the front and rear spans."""
    names = check_stack(pipe, uses_head=False)
    adapter = get_adapter(pipe)
    spans = delta_spans(len(names), fraction)
    covered = sorted(set(range(spans["front"].stop)) | set(range(spans["rear"].start, len(names))))
    session.cached_blocks, session.total_blocks = tuple(names[i] for i in covered), len(names)
    session.reuse_size = spans["front"].stop
    for index, name in enumerate(names):
        hook = DeltaBlockHook(session, name, block_io(adapter, name), index, index == len(names) - 1, spans)
        session.hook(session.denoiser.get_submodule(name), hook)
