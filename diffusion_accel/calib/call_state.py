"""What a pipeline changes in its denoiser for the length of a call, which a stored trajectory cannot replay.

A trajectory keeps the denoiser's inputs only. Some pipelines also change its modules while they call it:
the PAG pipelines swap attention processors for the perturbed branch and restore them at the end, GLIGEN
switches its gated fusers off part-way. Replayed inputs then ran through other modules than the live pass
(a PAG W8A8 lost 4 dB; GLIGEN's fuser was unobserved), silently. ``call_state`` is the denoiser's attention
processor classes and boolean ``enabled`` switches; calibration records it on observed calls and refuses to
replay when it differs from the state after the pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

CallState = tuple[tuple[str, str], ...]


def stateful_modules(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose call state ``call_state`` reads: attention modules (a ``processor``) and modules with a
    boolean ``enabled`` switch; found once per pass, read on every recorded call."""
    return [(name, module) for name, module in denoiser.named_modules()
            if getattr(module, "processor", None) is not None or isinstance(getattr(module, "enabled", None), bool)]


def call_state(modules: list[tuple[str, nn.Module]]) -> CallState:
    """(module name, processor class or ``enabled`` flag) for every module of ``stateful_modules``."""
    entries = []
    for name, module in modules:
        processor = getattr(module, "processor", None)
        if processor is not None:  # diffusers' Attention modules
            entries.append((f"{name}.processor", type(processor).__name__))
        enabled = getattr(module, "enabled", None)
        if isinstance(enabled, bool):
            entries.append((f"{name}.enabled", str(enabled)))
    return tuple(entries)


def state_change(during: set[CallState], after: CallState) -> str | None:
    """A sentence naming the first module whose state on an observed call differs from ``after``; None if none."""
    settled = dict(after)
    for state in during:
        for key, value in state:
            if settled.get(key) != value:
                return (f"the pipeline changed {key} to {value} during its calls (it is {settled.get(key)} now: "
                        f"PAG swaps attention processors, GLIGEN switches its fusers off part-way)")
    return None


@contextmanager
def processors_restored_on_error(denoiser: nn.Module) -> Iterator[None]:
    """Put the denoiser's attention processors back when the pipeline calls inside fail: a PAG pipeline swaps its
    processors in at the start of a call and restores them only at its normal end, so a Ctrl-C or an error
    part-way through calibrate or quantize_ left PAG's installed, and every later call without PAG failed on
    "not enough values to unpack" (until session 50)."""
    saved = dict(denoiser.attn_processors) if hasattr(denoiser, "set_attn_processor") else None
    try:
        yield
    except BaseException:
        current = dict(denoiser.attn_processors) if saved is not None else {}
        if saved is not None and any(current.get(name) is not processor for name, processor in saved.items()):
            denoiser.set_attn_processor(saved)
        raise
