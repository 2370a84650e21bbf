"""Whether the technique call in progress shows progress bars, without threading a flag everywhere.

``quantize_`` / ``prune_`` take ``progress=``; their calibration passes, GPTQ / OBS solving and
block reconstruction read it here (a context variable, so handlers registered by other packages
keep their signature). The CLI turns it on: a full-size model's sweeps run for many minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from tqdm.auto import tqdm

ItemT = TypeVar("ItemT")
_SHOW: ContextVar[bool] = ContextVar("diffusion_accel_progress", default=False)


@contextmanager
def showing_progress(show: bool) -> Iterator[None]:
    """Within the block, ``progress_shown()`` is ``show``."""
    token = _SHOW.set(bool(show))
    try:
        yield
    finally:
        _SHOW.reset(token)


def progress_shown() -> bool:
    """True inside ``showing_progress(True)``."""
    return _SHOW.get()


def progress_bar(items: Iterable[ItemT], desc: str, total: int | None = None) -> Iterable[ItemT]:
    """``items`` wrapped in a tqdm bar named ``desc`` when progress is shown, else ``items`` as they are."""
    if not progress_shown():
        return items
    return tqdm(items, desc=desc, total=total, leave=False)


@contextmanager
def progress_counter(desc: str, unit: str) -> Iterator[Callable[[], None]]:
    """A function that advances a tqdm counter named ``desc`` (count, rate and time so far, for work whose
    total is not known ahead) when progress is shown; a no-op otherwise."""
    if not progress_shown():
        yield lambda: None
        return
    bar = tqdm(desc=desc, unit=unit, leave=False)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
