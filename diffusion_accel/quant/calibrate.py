"""Which layers PTQ touches, and their activation ranges collected over the denoising trajectory.

Layers come from the adapter (``layer_groups``; the high-precision list is kept in fp unless the
config says otherwise), then ``include`` / ``exclude`` globs and ``filter_fn(module, fqn)``.
Layers sharing an input share one observed range. Split-shortcut layers (the adapter's *direct*
skip concatenations) get one range per channel half from :class:`SegmentRangeObserver`.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.registry import find_denoiser
from ..calib import (Calibration, Collector, HessianCollector, RangeObserver, SampleStore, Step, calibrate,
                     default_calibration_items, denoiser_steps)
from ..calib.hessian import takes_hessian
from ..progress import progress_shown
from .configs import PTQConfig
from .formats import NumberFormat, get_format
from .layers import StepGroups, float_type_of
from .quantizers import activation_qparams, fake_quant_act

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class LayerTarget:
    """A layer to quantize: its name, float type, split channel (or None) and range source name."""

    name: str
    float_type: type
    split: int | None
    representative: str


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def candidate_layers(pipe: Any, config: PTQConfig) -> tuple[list[list[str]], set[str]]:
    """Layer groups (shared input) eligible for PTQ, and the adapter's high-precision layers."""
    adapter = get_adapter(pipe)
    groups = [list(group.layers) for group in adapter.layer_groups()]
    high = set(adapter.high_precision_layers())
    if not config.keep_high_precision:
        groups += [[name] for name in adapter.high_precision_layers()]
    return groups, high if config.keep_high_precision else set()


def select_layers(pipe: Any, config: PTQConfig, filter_fn: FilterFn | None = None) -> list[LayerTarget]:
    """The layers PTQ will quantize, in execution order; raises ValueError if none is left."""
    _, denoiser = find_denoiser(pipe)
    groups, high = candidate_layers(pipe, config)
    splits = {c.layer: c.split for c in get_adapter(pipe).skip_concats() if c.direct} \
        if config.split_shortcut else {}
    quantizable = [name for group in groups for name in group if name not in high]
    _check_globs_match(quantizable, sorted(high), config, type(denoiser).__name__)
    targets: list[LayerTarget] = []
    for group in groups:
        chosen = [name for name in group if _wanted(denoiser, name, config, high, filter_fn)]
        targets += [LayerTarget(name, float_type_of(denoiser.get_submodule(name)), splits.get(name),
                                chosen[0] if name not in splits else name) for name in chosen]
    if targets:
        _check_act_exclude(targets, config, type(denoiser).__name__)
    if config.weights is None:  # an act-excluded layer would quantize nothing, and was counted quantized (s49)
        targets = [target for target in targets if not keeps_float_activations(target.name, config)]
    if not targets:
        raise ValueError(f"no layer of {type(denoiser).__name__} is selected for quantization "
                         f"(include={list(config.include)}, exclude={list(config.exclude)}, "
                         f"act_exclude={list(config.act_exclude)} with weights=None, filter_fn)")
    return targets


def keeps_float_activations(name: str, config: PTQConfig | dict[str, Any]) -> bool:
    """Whether quantized layer ``name``'s input stays in floating point (``act_exclude``; a config or its dict)."""
    patterns = config.get("act_exclude", ()) if isinstance(config, dict) else config.act_exclude
    return _matches(name, patterns)


def _check_globs_match(names: Sequence[str], high: Sequence[str], config: PTQConfig, denoiser_name: str) -> None:
    """Each ``include`` / ``exclude`` pattern must match a quantizable layer: a typo (``*to_qq``) silently
    quantized everything, or left a wanted layer out; an ``include`` one naming only layers that
    ``keep_high_precision`` keeps in floating point (``high``) was accepted and quantized nothing."""
    every = [*names, *high]
    for field_name in ("include", "exclude"):
        for pattern in getattr(config, field_name):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in every):
                raise ValueError(f"PTQConfig.{field_name} pattern {pattern!r} matches none of the {len(every)} "
                                 f"quantizable layers of {denoiser_name} (e.g. {list(every[:3])})")
            if field_name == "include" and not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                kept = [name for name in high if fnmatch.fnmatchcase(name, pattern)]
                raise ValueError(f"PTQConfig.include pattern {pattern!r} matches only {kept}, which "
                                 f"keep_high_precision=True keeps in floating point; set keep_high_precision=False "
                                 f"to quantize them")


def _check_act_exclude(targets: Sequence[LayerTarget], config: PTQConfig, denoiser_name: str) -> None:
    """Each ``act_exclude`` pattern must match a quantized layer (a typo would silently change nothing)."""
    names = [t.name for t in targets]
    for pattern in config.act_exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"PTQConfig.act_exclude pattern {pattern!r} matches none of the {len(names)} "
                             f"quantized layers of {denoiser_name} (e.g. {names[:3]})")


def _wanted(denoiser: nn.Module, name: str, config: PTQConfig, high: set[str],
            filter_fn: FilterFn | None) -> bool:
    module = denoiser.get_submodule(name)
    if name in high or float_type_of(module) is None:
        return False
    if config.include and not _matches(name, config.include):
        return False
    if _matches(name, config.exclude):
        return False
    return filter_fn is None or bool(filter_fn(module, name))


class SegmentRangeObserver(Collector):
    """Ranges of the channel halves ``[:split]`` and ``[split:]`` (dim 1) of module inputs."""

    def __init__(self, splits: dict[str, int], **range_options: Any) -> None:
        super().__init__(list(splits))
        self.splits = dict(splits)
        parts = [f"{name}[{i}]" for name in splits for i in (0, 1)]
        self.inner = RangeObserver(parts, **range_options)

    def observe(self, name: str, value: torch.Tensor, step: Step) -> None:
        split = self.splits[name]
        self.inner.observe(f"{name}[0]", value[:, :split], step)
        self.inner.observe(f"{name}[1]", value[:, split:], step)

    def finish(self) -> None:
        self.inner.finish()


@dataclass
class Collected:
    """What calibration gave PTQ: range observers, input norms, the block sample store, steps per call,
    and (GPTQ) each layer's already rounded (codes, scales, segment sizes)."""

    plain: RangeObserver | None
    split: SegmentRangeObserver | None
    samples: SampleStore | None
    num_steps: int
    calibration: Calibration | None
    input_norms: HessianCollector | None = None
    rounded: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = field(default_factory=dict)

    def column_weights(self, name: str) -> torch.Tensor | None:
        """Mean square of each weight column's input feature of layer ``name`` (for "output_mse")."""
        if self.input_norms is None or name not in self.input_norms.module_names:  # not a Hessian layer
            return None
        mean_square = self.input_norms.input_sq_norms(name) / max(self.input_norms.num_rows(name), 1)
        return mean_square + 1e-4 * mean_square.mean()  # dead inputs still break ties

    def step_group(self, selector: StepGroups | None) -> Callable[[int], int]:
        """Calibrated step index -> its timestep group, by the rule the run picks scales with
        (``StepGroups.group_of_call`` on the step's recorded timestep); 0 without groups."""
        if selector is None:
            return lambda step: 0
        timesteps = self.calibration.timesteps if self.calibration is not None else {}
        return lambda step: selector.group_of_call(step, timesteps.get(step))


def _range_options(config: PTQConfig) -> dict[str, Any]:
    """RangeObserver options; an "mse" search scores ranges on the quantizer the layers get (it scored asymmetric
    int8 for every format until session 45: symmetric int8 on fashion-sd 30.6 dB, now 33.8; fp8 is refused)."""
    quant_error = None
    if config.act_method == "mse" and config.activations is not None:
        quant_error = partial(activation_quant_error, fmt=get_format(config.activations),
                              symmetric=config.act_symmetric)
    return dict(method=config.act_method, percentile=config.act_percentile,
                per_step=config.timestep_groups > 1, bits=8, quant_error=quant_error)


def activation_quant_error(sample: torch.Tensor, lo: float, hi: float, fmt: NumberFormat, symmetric: bool) -> float:
    """Mean squared error of ``sample`` through the static activation quantizer built for range [lo, hi]."""
    scale, zero_point = activation_qparams(lo, hi, fmt, symmetric)
    values = sample.float()
    rounded = fake_quant_act(values.clone(), torch.tensor(scale), torch.tensor(zero_point), fmt, symmetric)
    return float((rounded - values).pow(2).mean())


def reconstruction_units(pipe: Any, layer_names: Sequence[str]) -> list[str]:
    """What block reconstruction fits one at a time: the adapter's blocks, then each quantized layer outside all of
    them (conv_in, the time embedding, conv_out with ``keep_high_precision=False``), alone: they kept nearest
    rounding while the note said every block was reconstructed (until session 46)."""
    blocks = [info.name for info in get_adapter(pipe).blocks()]
    outside = [name for name in layer_names if not any(name.startswith(block + ".") for block in blocks)]
    return blocks + sorted(set(outside), key=list(layer_names).index)


def build_collectors(pipe: Any, config: PTQConfig, targets: Sequence[LayerTarget]) -> list[Collector]:
    """Range observers for static activations and a SampleStore of blocks for reconstruction."""
    collectors: list[Collector] = []
    if config.activations is not None and config.act_mode == "static":
        quantized = [t for t in targets if not keeps_float_activations(t.name, config)]
        plain = sorted({t.representative for t in quantized if t.split is None})
        splits = {t.name: t.split for t in quantized if t.split is not None}
        if plain:
            collectors.append(RangeObserver(plain, **_range_options(config)))
        if splits:
            collectors.append(SegmentRangeObserver(splits, **_range_options(config)))
    names = hessian_targets(pipe, targets) if config.weights is not None and config.weight_scale == "output_mse" else []
    if names:  # none when only grouped convs are selected: they get the plain "mse" search
        collectors.append(HessianCollector(names, full=False))
    if config.reconstruct:
        units = reconstruction_units(pipe, [target.name for target in targets])
        collectors.append(SampleStore(units, max_samples=config.recon_samples, max_bytes=config.recon_max_bytes,
                                      with_outputs=True, budget_name="PTQConfig.recon_max_bytes"))
    return collectors


def hessian_targets(pipe: Any, targets: Sequence[LayerTarget]) -> list[str]:
    """The targets' names a HessianCollector takes: a grouped Conv2d (depthwise) raised TypeError there for
    weight_scale "output_mse" and GPTQ (the w4a8 preset); it gets the plain MSE search and nearest rounding."""
    denoiser = find_denoiser(pipe)[1]
    return [t.name for t in targets if takes_hessian(denoiser.get_submodule(t.name))]


def collect(pipe: Any, config: PTQConfig, targets: Sequence[LayerTarget],
            calib: Calibration | None) -> Collected:
    """Run (or replay) calibration into fresh collectors; raises ValueError if it saw nothing."""
    collectors = build_collectors(pipe, config, targets)
    result = None
    if collectors:
        result = _run(pipe, config, collectors, calib, keep_trajectory=config.weight_rounding == "gptq")
        if result.observed_calls == 0:
            raise ValueError("the calibration observed no denoiser calls (empty prompts or no selected "
                             f"steps: {result.selected_steps}); nothing to set activation ranges from")
    num_steps = result.num_steps if result is not None else denoiser_steps(pipe, config.calib_num_steps)
    by_type = {type(c): c for c in collectors}
    return Collected(by_type.get(RangeObserver), by_type.get(SegmentRangeObserver),
                     by_type.get(SampleStore), num_steps, result, by_type.get(HessianCollector))


def hessian_sweep(pipe: Any, config: PTQConfig, calib: Calibration | None,
                  first_pass: Calibration | None = None) -> Callable[[list[str]], HessianCollector]:
    """A function collecting the full input Hessians of the named layers over the calibration.

    Every sweep sees the unquantized denoiser, so without ``calib`` they replay ``first_pass`` (the pass
    ``collect`` ran) when it kept its whole trajectory, or without one the first sweep keeps its own for
    the others (replays run the selected steps only: the w4a8 preset's ``quantize_`` 1.42x faster on fashion-sd, 1.47x
    on fashion-flux, ``benchmarks/results/gptq_sweeps.md``)."""
    source = calib if calib is not None else replayable(first_pass)
    settled = calib is not None or first_pass is not None

    def sweep(names: list[str]) -> HessianCollector:
        nonlocal source, settled
        collector = HessianCollector(names, full=True)
        result = _run(pipe, config, [collector], source, keep_trajectory=not settled)
        if not settled:
            source, settled = replayable(result), True
        return collector
    return sweep


def replayable(calib: Calibration | None) -> Calibration | None:
    """``calib`` when it holds every selected denoiser call of its pass (replaying feeds just those steps:
    no text encoder, VAE or unselected steps), else None (a truncated trajectory would replay only part)."""
    return calib if calib is not None and calib.complete_trajectory else None


def _run(pipe: Any, config: PTQConfig, collectors: list[Collector], calib: Calibration | None,
         keep_trajectory: bool = False) -> Calibration:
    """Calibrate into ``collectors``: replay or rerun ``calib``, or (None) a pass with ``config``'s settings,
    storing its trajectory when ``keep_trajectory`` (for later sweeps; unstored past max_trajectory_bytes,
    silently: the sweeps then rerun the pipeline)."""
    if calib is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "calibration trajectory reached max_trajectory_bytes")
            return calibrate(pipe, num_inference_steps=config.calib_num_steps, collectors=collectors,
                             steps=config.calib_steps, guidance_scale=config.calib_guidance_scale,
                             store_trajectory=keep_trajectory, progress=progress_shown(),
                             **default_calibration_items(pipe, config.calib_prompts), **dict(config.calib_kwargs))
    if not isinstance(calib, Calibration):
        raise TypeError(f"calib must be a diffusion_accel Calibration or None, got {type(calib).__name__}")
    if calib.observed_calls == 0:
        raise ValueError("the given calibration is empty: it observed no denoiser calls")
    if calib.complete_trajectory:  # else replaying would not see the live modules, or only the stored calls
        return calib.replay(collectors, find_denoiser(pipe)[1], progress=progress_shown())
    return calib.rerun(pipe, collectors, progress=progress_shown())


def group_ranges(observer: RangeObserver, name: str, groups: int,
                 step_group: Callable[[int], int]) -> list[tuple[float, float]]:
    """(lo, hi) per timestep group: the union of the ranges of the steps ``step_group`` (step index -> group, the
    rule the run picks scales by) files in each group.

    A group with no calibrated step falls back to the range over all steps.
    """
    if groups == 1:
        return [observer.range(name)]
    overall = observer.range(name)
    merged: list[tuple[float, float] | None] = [None] * groups
    for step, (lo, hi) in observer.step_ranges(name).items():
        g = step_group(step)
        old = merged[g]
        merged[g] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return [item if item is not None else overall for item in merged]
