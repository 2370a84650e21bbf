"""The collector contract: what a calibration pass streams into, and the step tag it carries.

A collector names the modules it wants (fully qualified names under the denoiser) and what it
wants from each call:

- ``wants = "input"``: ``observe(name, tensor, step)`` before the module runs, with the call's
  input tensor number ``tensor_index`` (positional tensors first, then keyword tensors).
- ``wants = "output"``: ``observe(name, tensor, step)`` after the module runs, with the output
  tensor number ``tensor_index`` (a tuple/list/dict output is searched in order).
- ``wants = "call"``: ``observe(name, ModuleCall(args, kwargs, output), step)`` after the module
  runs, with the whole call.

``observe`` is only called on selected steps; ``step.weight`` is that step's weight. Before a run
the runner calls ``bind(denoiser)`` so a collector can look at its modules (layer types, shapes).
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .trees import tensors_in

WANTS = ("input", "output", "call")


@dataclass(frozen=True)
class Step:
    """Tag of one denoiser call: step index (0 = noisiest), timestep value, CFG context, weight."""

    step_index: int
    timestep: float | None = None
    context: str = "default"
    weight: float = 1.0


@dataclass
class ModuleCall:
    """One module call as seen by a ``wants="call"`` collector (tensors live where the model runs)."""

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None


class Collector(ABC):
    """Base class: receives tensors of named modules on selected denoising steps."""

    wants: str = "input"

    def __init__(self, module_names: str | Iterable[str], tensor_index: int = 0) -> None:
        self.module_names: tuple[str, ...] = normalize_module_names(module_names)
        if isinstance(tensor_index, bool) or not isinstance(tensor_index, int) or tensor_index < 0:
            raise ValueError(f"tensor_index must be an int >= 0, got {tensor_index!r}")
        self.tensor_index = tensor_index

    def bind(self, denoiser: nn.Module) -> None:
        """Look at the named modules before a run; the default checks nothing beyond existence."""
        check_module_names(denoiser, self.module_names)

    def pick(self, value: Any, name: str) -> torch.Tensor:
        """The tensor of module ``name``'s inputs or output (``value``) this collector observes."""
        return pick_tensor(value, self.tensor_index, name)

    @abstractmethod
    def observe(self, name: str, value: Any, step: Step) -> None:
        """Take one tensor (or a ModuleCall for ``wants="call"``) of module ``name`` at ``step``."""

    def finish(self) -> None:
        """Called once after each run (calibrate, replay); releases transient per-run state."""
        return None

    def describe(self) -> str:
        """One line for summaries: class name and module count."""
        return f"{type(self).__name__}({len(self.module_names)} modules, wants {self.wants})"


def normalize_module_names(module_names: str | Iterable[str]) -> tuple[str, ...]:
    """Module names as a de-duplicated tuple (order kept); a single string is one name."""
    names = (module_names,) if isinstance(module_names, str) else tuple(module_names)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"module names must be strings, got {name!r} ({type(name).__name__})")
    if not names:
        raise ValueError("a collector needs at least one module name")
    if "" in names:
        raise ValueError("module name '' is the denoiser itself; its call inputs are stored by "
                         "calibrate(store_trajectory=True); name a submodule instead")
    return tuple(dict.fromkeys(names))


def check_module_names(denoiser: nn.Module, names: Iterable[str]) -> None:
    """Raise ValueError naming every name that is not a submodule of ``denoiser``."""
    known = dict(denoiser.named_modules())
    missing = [name for name in names if name not in known]
    if not missing:
        return
    hints = {name: difflib.get_close_matches(name, list(known), n=3) for name in missing}
    hint_text = "; ".join(f"{name!r}: did you mean {close}?" for name, close in hints.items() if close)
    raise ValueError(f"modules not found in {type(denoiser).__name__}: {missing}"
                     + (f" ({hint_text})" if hint_text else ""))


def pick_tensor(value: Any, index: int, module_name: str) -> torch.Tensor:
    """Tensor number ``index`` among the tensors of ``value`` (a tensor, or nested args/outputs)."""
    if isinstance(value, torch.Tensor) and index == 0:
        return value
    tensors = tensors_in(value)
    if index >= len(tensors):
        raise ValueError(f"module {module_name!r} has {len(tensors)} tensor(s) in this call; "
                         f"tensor_index {index} is out of range")
    return tensors[index]
