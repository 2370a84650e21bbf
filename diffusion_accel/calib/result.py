"""The result of a calibration pass: its settings, step tags, collectors, stored trajectory, counts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch
from torch import nn

from ..arch.registry import find_any_denoiser
from ..hooks import refuse_while_cached
from ..uncompiled import uncompiled_module
from .collectors import Collector
from .dispatch import validate_collectors
from .replay import CallCounts, replay_records
from .trajectory import TrajectoryRecord

CollectorT = TypeVar("CollectorT", bound=Collector)


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything needed to repeat a calibration pass with ``calibrate(pipe, **settings.as_kwargs())``."""

    prompts: tuple | None
    num_inference_steps: int
    steps: str | tuple[int, ...]
    weighting: str | tuple[float, ...]
    weight_range: tuple[float, float]
    guidance_scale: float | None
    negative_prompt: str | tuple[str, ...] | None
    batch_size: int
    num_images_per_prompt: int
    num_samples: int | None
    seed: int
    max_trajectory_bytes: int
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    drop_negative_prompt: bool = False  # negative_prompt=None was given: the pipeline's default one dropped

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``calibrate`` (without collectors, store_trajectory, progress); no negative_prompt
        where none was given (the pipeline's default applies again; None would drop it)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("call_kwargs", "drop_negative_prompt")}
        if values["negative_prompt"] is None and not self.drop_negative_prompt:
            del values["negative_prompt"]
        return values | dict(self.call_kwargs)


@dataclass
class Calibration:
    """What one calibration pass saw (``calibrate``), or one replay / rerun of it.

    ``selected_steps``: step indices forwarded to collectors; ``step_weights``: (num_steps,) weight
    of every step; ``timesteps``: scheduler timestep value per step index (first trajectory);
    ``seeds``: the generator seed of each pipeline call; ``trajectory``: stored denoiser call inputs
    at selected steps; ``counts``: denoiser calls seen/observed and rows observed.
    """

    settings: CalibrationSettings
    pipeline_class: str
    denoiser_class: str
    selected_steps: list[int]
    step_weights: torch.Tensor
    collectors: list[Collector]
    seeds: list[int] = field(default_factory=list)
    timesteps: dict[int, float | None] = field(default_factory=dict)
    trajectory: list[TrajectoryRecord] = field(default_factory=list)
    trajectory_bytes: int = 0
    trajectory_truncated: bool = False
    trajectory_state_change: str | None = None  # how the pipeline changed the denoiser during its calls (call_state:
    # a trajectory then cannot be replayed, and block reconstruction fits to the float block's outputs), or None
    counts: CallCounts = field(default_factory=CallCounts)
    source: str = "pipeline"
    denoiser_config: dict[str, Any] = field(default_factory=dict)  # architecture the inputs were recorded for

    @property
    def num_steps(self) -> int:
        """Denoiser steps per pipeline call (``settings.num_inference_steps``, or 2N - 1 for Heun / KDPM2,
        N + 1 for PNDM: ``schedule.denoiser_steps``); step indices lie in [0, num_steps)."""
        return int(self.step_weights.numel())

    @property
    def denoiser_calls(self) -> int:
        """Denoiser calls seen (all steps)."""
        return self.counts.denoiser_calls

    @property
    def observed_calls(self) -> int:
        """Denoiser calls on selected steps (forwarded to collectors)."""
        return self.counts.observed_calls

    @property
    def observed_rows(self) -> int:
        """Batch rows of the observed denoiser calls (CFG halves included)."""
        return self.counts.observed_rows

    @property
    def complete_trajectory(self) -> bool:
        """True when the stored trajectory holds every observed denoiser call of the pass (not truncated by
        ``max_trajectory_bytes``) and the pipeline changed no module of the denoiser during its calls (PAG,
        GLIGEN: ``call_state``): replaying it then sees what rerunning the pass would, on the same denoiser."""
        return bool(self.trajectory) and not self.trajectory_truncated and self.trajectory_state_change is None

    def collector(self, kind: type[CollectorT]) -> CollectorT:
        """The first collector of type ``kind``."""
        for item in self.collectors:
            if isinstance(item, kind):
                return item
        raise KeyError(f"no {kind.__name__} in this calibration; collectors: "
                       f"{[type(item).__name__ for item in self.collectors]}")

    def replay(self, collectors: Sequence[Collector] | Collector, denoiser: Any,
               batch_size: int | None = None, progress: bool = True) -> "Calibration":
        """Run ``denoiser`` (a module, compiled or not, or a pipeline) on the stored trajectory into new
        collectors; refused while a feature cache is on it (replaying through it observed only the steps that
        recompute each block, silently)."""
        if not self.trajectory:
            raise ValueError(self._no_trajectory_reason())
        if self.trajectory_state_change is not None:
            raise ValueError(f"this calibration's trajectory cannot be replayed: {self.trajectory_state_change}, and "
                             f"the stored inputs hold none of that; use rerun(pipe, collectors)")
        module = denoiser if isinstance(denoiser, nn.Module) else find_any_denoiser(denoiser)[1]
        module = getattr(module, "_orig_mod", module)  # a torch.compile wrapper: replay runs the model eagerly
        refuse_while_cached(module, "replay")
        self.check_fits(module)
        bound = validate_collectors(collectors, module)
        with uncompiled_module(module):  # hooks on every layer: compiled in place, dynamo recompiled per hook
            counts = replay_records(self.trajectory, bound, module, batch_size=batch_size, progress=progress)
        return Calibration(
            settings=self.settings, pipeline_class=self.pipeline_class, denoiser_class=type(module).__name__,
            selected_steps=list(self.selected_steps), step_weights=self.step_weights, collectors=bound,
            seeds=list(self.seeds), timesteps=dict(self.timesteps), trajectory=self.trajectory,
            trajectory_bytes=self.trajectory_bytes, trajectory_truncated=self.trajectory_truncated,
            trajectory_state_change=self.trajectory_state_change, counts=counts, source="replay", denoiser_config=dict(self.denoiser_config))

    def _no_trajectory_reason(self) -> str:
        if self.trajectory_truncated:
            return (f"this calibration stored no trajectory: its first pipeline call alone needed more than "
                    f"max_trajectory_bytes={self.settings.max_trajectory_bytes}; calibrate again with a larger "
                    f"max_trajectory_bytes (or fewer selected steps)")
        return "this calibration stored no trajectory; run calibrate(..., store_trajectory=True)"

    def check_fits(self, denoiser: nn.Module) -> None:
        """ValueError unless ``denoiser`` has the class and architecture config the stored inputs were
        recorded for (its dtype, device, weights and pruned shapes may differ)."""
        mismatched = [key for key, value in architecture_config(denoiser).items()
                      if key in self.denoiser_config and self.denoiser_config[key] != value]
        if type(denoiser).__name__ == self.denoiser_class and not mismatched:
            return
        if type(denoiser).__name__ != self.denoiser_class:
            found = f"its stored inputs cannot feed a {type(denoiser).__name__}"
        else:
            found = f"this one differs in {', '.join(mismatched[:4])}"
        raise ValueError(f"this calibration was recorded on a {self.pipeline_class} ({self.denoiser_class}), and "
                         f"{found}; calibrate the pipeline you quantize or prune (a calibration fits the same "
                         f"architecture in any dtype, on any device, pruned or not)")

    def rerun(self, pipe: Any, collectors: Sequence[Collector] | Collector, *,
              store_trajectory: bool = False, progress: bool = True) -> "Calibration":
        """Run the whole pipeline again with identical settings, streaming into ``collectors``."""
        from .runner import calibrate

        return calibrate(pipe, collectors=collectors, store_trajectory=store_trajectory,
                         progress=progress, **self.settings.as_kwargs())

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record of what this pass ran (its settings and seeds), which artifacts store: the
        prompts and their order change the result (call k is seeded seed + k). Values JSON cannot hold
        (an image of img2img calls) are named by type."""
        settings = {name: json_safe(value) for name, value in self.settings.as_kwargs().items()}
        settings.setdefault("negative_prompt", None)  # null: none given, the pipeline's default ran (as before
        if self.settings.drop_negative_prompt:        # session 47); a given None says so
            settings["drop_negative_prompt"] = True
        return {"source": self.source, "pipeline_class": self.pipeline_class, "settings": settings,
                "seeds": list(self.seeds)}

    def __repr__(self) -> str:
        """One line (the dataclass repr printed every stored trajectory tensor: 130k characters on a tiny model);
        ``summary()`` says more."""
        return (f"Calibration({self.source}, {self.pipeline_class} / {self.denoiser_class}, {self.num_steps} steps, "
                f"selected {self.selected_steps}, {self.observed_calls} denoiser calls observed, "
                f"{len(self.trajectory)} stored, {len(self.collectors)} collector(s))")

    def summary(self) -> str:
        """A short human-readable report of the pass."""
        s = self.settings
        items = len(s.prompts) if s.prompts is not None else s.num_samples or 1  # None: one sample ("None x 1")
        lines = [
            f"Calibration ({self.source}) of {self.pipeline_class} / {self.denoiser_class}",
            f"  items: {items} x {s.num_images_per_prompt} image(s), batch_size {s.batch_size}, "
            f"{len(self.seeds)} pipeline call(s) seeded {_seed_text(self.seeds)}",
            f"  steps: {s.num_inference_steps} ({self.num_steps} denoiser steps), selection {s.steps!r} -> "
            f"{self.selected_steps}",
            f"  weighting: {s.weighting!r}, weights {[round(w, 3) for w in self.step_weights.tolist()]}",
            f"  guidance_scale: {_or_default(s.guidance_scale)}, negative_prompt: "
            f"{'none (the pipeline default dropped)' if s.drop_negative_prompt else _or_default(s.negative_prompt)}",
            f"  denoiser calls: {self.denoiser_calls} seen, {self.observed_calls} observed "
            f"({self.observed_rows} rows; per context {self.counts.calls_per_context})",
            f"  trajectory: {len(self.trajectory)} calls, {self.trajectory_bytes / 2**20:.1f} MiB"
            + (" (truncated by max_trajectory_bytes)" if self.trajectory_truncated else ""),
        ]
        lines += [f"  - {item.describe()}" for item in self.collectors]
        return "\n".join(lines)


def _or_default(value: Any) -> str:
    """A setting as written, or "the pipeline's default" for None (calibrate then passes nothing)."""
    return "the pipeline's default" if value is None else repr(value)


def json_safe(value: Any) -> Any:
    """``value`` with lists / tuples / dicts of JSON scalars kept, anything else as ``"<TypeName>"``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    return f"<{type(value).__name__}>"


def _seed_text(seeds: list[int]) -> str:
    if not seeds:
        return "-"
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}..{seeds[-1]}"


def architecture_config(denoiser: nn.Module) -> dict[str, Any]:
    """The denoiser's diffusers config without bookkeeping keys (``_name_or_path``, versions), as JSON
    values: a model built in code holds tuples where the same model loaded from its folder holds lists."""
    config = getattr(denoiser, "config", None) or {}
    plain = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    return json.loads(json.dumps(plain, default=str))


def check_given_calibration(calib: Any, denoiser: nn.Module) -> None:
    """Before any work: a TypeError unless ``calib`` is None or a ``Calibration``, and ``check_fits`` for one
    (``prune_`` and ``quantize_``; until session 51 quantize_ checked only when it replayed a stored trajectory:
    another model's calibration without one reran its prompts on this pipeline, and weight-only configs took any
    object)."""
    if calib is None:
        return
    if not isinstance(calib, Calibration):
        raise TypeError(f"calib must be a Calibration from da.calibrate or None, got {type(calib).__name__}")
    calib.check_fits(denoiser)

