"""Sharding evaluation work across launched processes (``torchrun``; ``accelerate launch`` on GPUs) and
gathering it back.

``shard`` gives this process its contiguous slice (accelerate's ``split_between_processes``),
``gather`` collects every process's ``(index, item)`` pairs (accelerate's ``gather_object``) and
``merge_ordered`` restores the global order. With one process all three are identities, so the
same code runs on one CPU and on many GPUs or machines.
"""

from __future__ import annotations

import atexit
import functools
import os
from datetime import timedelta
from typing import Any, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from .pipes import chunks


# The other processes wait in one collective while the main one scores every metric (an FID reference of
# 10,000 images takes 30-40 min on 2 CPU cores): past gloo's 30-min / NCCL's 10-min default they crashed.
COLLECTIVE_TIMEOUT = timedelta(hours=4)


def process_state() -> PartialState:
    """accelerate's shared ``PartialState``. On a machine without an accelerator, processes started by
    a launcher (``torchrun``, ``accelerate launch``) join one CPU process group (gloo): with accelerate's
    default ``cpu=False`` each saw ``DistributedType.NO`` and ran the whole evaluation alone. A process
    group this creates waits ``COLLECTIVE_TIMEOUT`` in a collective (one made before keeps its own)."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    state = PartialState(cpu=not has_accelerator, timeout=COLLECTIVE_TIMEOUT)
    _check_joined(state)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _tear_down_at_exit()
    return state


@functools.cache
def _tear_down_at_exit() -> None:
    """Destroy the process group when the process exits (once): destroyed at the end of a CLI command, it left
    accelerate's shared state naming 2 processes of a group that no longer existed, so a second command or
    ``evaluate`` in the same launched process failed ("Default process group has not been initialized")."""
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    """No barrier: a rank leaving on an error would wait in it for peers stuck in another collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _check_joined(state: PartialState) -> None:
    """RuntimeError when a launcher started several processes (``WORLD_SIZE``) but accelerate's state, shared
    per process and created before with its defaults (``PartialState()`` / ``Accelerator()`` on a CPU
    machine), joined no process group: every process then ran the whole evaluation and wrote the same
    output folder, and the report said one process (session 31)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and state.num_processes == 1:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate's state in this one runs "
            f"alone ({state.distributed_type}): it was created before, without a process group (on a machine "
            f"without an accelerator, PartialState() / Accelerator() need cpu=True). Create it with "
            f"PartialState(cpu=True) (or Accelerator(cpu=True)), or let diffusion_accel create it")


def close_process_group() -> None:
    """Wait for every process at the end of a command (no-op without a process group); the group itself is torn
    down at exit (``process_state``). Launched processes exited with it live: a rank done first sometimes aborted
    in the group's teardown ("terminate called without an active exception") while the main one still scored."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shard(items: Sequence[Any], state: Any = None) -> list[Any]:
    """This process's contiguous share of ``items`` (all of them on a single process)."""
    state = state if state is not None else process_state()
    with state.split_between_processes(list(items)) as mine:
        return list(mine)


def shard_batches(items: Sequence[Any], batch_size: int, state: Any = None) -> list[Any]:
    """This process's share of ``items`` in whole batches of ``batch_size``: a share of single items regrouped into
    its own batches, so images (and FID, PSNR) differed from one process at the same batch size (1/255; whole
    images with samplers drawing from the global RNG; until session 50)."""
    return [item for batch in shard(chunks(items, batch_size), state) for item in batch]


def gather(pairs: list[tuple[int, Any]], state: Any = None) -> list[tuple[int, Any]]:
    """Every process's ``(index, item)`` pairs, on every process."""
    state = state if state is not None else process_state()
    if state.num_processes == 1:
        return list(pairs)
    return list(gather_object(list(pairs)))


def merge_ordered(pairs: list[tuple[int, Any]], expected: int) -> list[Any]:
    """Items ordered by index; raises if any index in ``range(expected)`` is missing or repeated."""
    by_index: dict[int, Any] = {}
    for index, item in pairs:
        if index in by_index:
            raise ValueError(f"index {index} was produced twice while gathering results")
        by_index[index] = item
    missing = sorted(set(range(expected)) - set(by_index))
    if missing or len(by_index) != expected:
        raise ValueError(f"gathered {len(by_index)} results, expected {expected}; missing indices {missing[:10]}")
    return [by_index[index] for index in range(expected)]


def share_from_main(value: Any, state: Any = None) -> Any:
    """The main process's ``value`` on every process."""
    state = state if state is not None else process_state()
    if state.num_processes == 1:
        return value
    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]
