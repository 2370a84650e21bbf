"""``prune_(pipe, config, calib)``: one-shot pruning of a pipeline's denoiser, all or nothing."""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Any

import torch
from torch import nn

from ..arch import find_denoiser, get_adapter
from ..arch.registry import check_plain_weights
from ..artifact import base_fingerprint, mark_applied, marks_restored_on_error, techniques_on
from ..calib import Calibration, HessianCollector, calibrate, check_given_calibration, default_calibration_items
from ..calib.hessian import UnobservedLayerError
from ..hooks import refuse_while_cached
from ..progress import showing_progress
from ..stacklevel import user_stacklevel
from ..uncompiled import runs_compiled
from .allocate import allocate_by_error, error_grid
from .configs import PruneConfig
from .plan import structured_plan, unstructured_plan
from .record import ensure_record, get_record
from .report import REPORT_ATTR, PruneReport, count_parameters, zero_fraction
from .sequential import MemoryBudget, SequentialPruner, SequentialStats, Sweep, accumulator_bytes
from .sparse import enable_sparse_kernels
from .structured import StructuredUnit, prune_structured_unit, removable, largest_sizes
from .unstructured import layer_error_curves, prune_layer_group, saliency_layer_sparsity, skip_reason

TECHNIQUE = "prune"


@torch.inference_mode(False)  # new weights made under a caller's inference_mode could not be updated after it
def prune_(pipe: Any, config: PruneConfig, calib: Calibration | None = None, *, progress: bool = False) -> Any:
    """Prune ``pipe``'s denoiser per ``config`` and return ``pipe``; on any error it is left unchanged.

    ``calib`` supplies the calibration inputs (prompts, steps, guidance, seeds); its settings are
    re-run once per group of ``config.groups`` with ``config.weighting`` / ``config.weight_range``.
    Without ``calib`` the first ``config.calib_prompts`` default prompts (class ids 0.., or
    unconditional samples) at ``config.calib_num_steps`` steps are used. Magnitude pruning needs none
    (except with ``scope="global", allocation="error"``, which measures each layer's output error on them).

    The pipeline's denoiser is replaced by a pruned copy (so a failure restores the original object):
    a pipeline that shares the old denoiser object (``from_pipe``, ``Img2ImgPipeline(**pipe.components)``)
    keeps the unpruned one; build such pipelines after pruning.
    """
    check_arguments(pipe, config, calib)
    component, original = find_denoiser(pipe)
    compiled_before = runs_compiled(pipe)
    with marks_restored_on_error(pipe):  # the base fingerprint, and guards of an interrupted mark_applied
        _prune_a_copy(pipe, component, original, config, calib, progress)
    if compiled_before:
        warnings.warn(f"prune_ replaced the compiled pipe.{component} with its pruned copy, which is not compiled; "
                      f"compile it again (pipe.{component} = torch.compile(pipe.{component}), or "
                      f"diffusion_accel.eval.compile_denoiser(pipe))", stacklevel=user_stacklevel())
    return pipe


def _prune_a_copy(pipe: Any, component: str, original: nn.Module, config: PruneConfig, calib: Calibration | None,
                  progress: bool) -> None:
    """Prune a deep copy of ``original`` and set it as ``pipe.<component>``; the original is put back on any
    error (KeyboardInterrupt included)."""
    base_fingerprint(pipe)
    attribute = getattr(pipe, component)  # a torch.compile wrapper is put back as it was (the bare module was)
    working = copy.deepcopy(original)
    setattr(pipe, component, working)
    try:
        sweep = make_sweep(pipe, config, calib, progress) if config.needs_calibration else None
        with showing_progress(progress):
            report = prune_denoiser_(working, config, sweep)
        if sweep is not None:
            report.step_weights = sweep.step_weights()
            ensure_record(working).calibrations[-1] = sweep.first_calibration()
        if report.unobserved_inputs:
            warnings.warn(f"prune_: {report.unobserved_inputs_text()}", stacklevel=user_stacklevel())
        mark_applied(pipe, TECHNIQUE)
    except BaseException:
        setattr(pipe, component, attribute)
        raise


def check_arguments(pipe: Any, config: PruneConfig, calib: Calibration | None) -> None:
    """Type and fit checks done before anything is modified."""
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    component, denoiser = find_denoiser(pipe)
    check_given_calibration(calib, denoiser)  # the class and the architecture config (SDXL's fed SD's before)
    check_prunable_weights(denoiser, "prune_")
    if not component:
        raise TypeError("prune_ needs a diffusers pipeline (it re-runs it to calibrate); for a bare "
                        "denoiser use prune_denoiser_(denoiser, config) with method='magnitude'")
    _check_calib_kwargs(config)
    check_denoiser(denoiser, get_adapter(pipe), config)


def check_prunable_weights(denoiser: nn.Module, technique: str) -> None:
    """ValueError unless ``denoiser``'s weights are plain float ones to prune: not quantized (ours or loaded so), no
    unmerged adapters, not cached, offloaded or layerwise-cast (``prune_denoiser_`` checked none of these until
    session 46: on a quantized denoiser it said "nothing to prune")."""
    check_plain_weights(denoiser, technique)
    refuse_while_cached(denoiser, technique)
    if "ptq" in techniques_on(denoiser):
        raise ValueError("this pipeline's denoiser is already quantized; prune first, then quantize_ "
                         "(the order is pruning, then PTQ, then caching)")


def check_denoiser(denoiser: nn.Module, adapter: Any, config: PruneConfig) -> None:
    """ValueError before anything changes when ``config`` cannot prune ``denoiser`` as asked: an ``exclude`` entry
    matching nothing, nothing left to prune, or structured pruning over an earlier prune's masks."""
    _check_exclude(denoiser, config)
    units, _ = structured_plan(adapter, config) if config.structured else unstructured_plan(adapter, config)
    if not config.structured:  # layers an N:M pattern (width % M) or the solver cannot take
        units = [group for group in units
                 if any(skip_reason(denoiser.get_submodule(name), config) is None for name in group.layers)]
    if not units:
        raise ValueError(f"nothing to prune in {type(denoiser).__name__} with pattern {config.pattern!r} "
                         f"(all candidates excluded, kept dense, or too narrow for the pattern)")
    if config.structured:
        _check_something_removed(units, config)
        _check_masks_survive(denoiser, units, config)


def _check_something_removed(units: list[Any], config: PruneConfig) -> None:
    """ValueError when the sparsity removes nothing (each count rounds: 0.1 of 4 heads is 0), which pruned nothing
    silently, reported as pruned, until session 52; a warning for the kinds it leaves whole while others shrink."""
    fraction, sizes = config.target_sparsity, largest_sizes(units)
    totals = {kind: sum(removable(unit, fraction)[kind] for unit in units) for kind in sizes}
    untouched = [f"{kind} (round({size} x {fraction:g}) = {round(size * fraction)} of the most {kind} one holds, "
                 f"{size})" for kind, size in sizes.items() if totals[kind] == 0]
    if not any(totals.values()):
        raise ValueError(f"structured sparsity {fraction:g} removes nothing: " + "; ".join(untouched)
                         + "; raise sparsity (counts round to whole heads, neurons and channel groups)")
    if untouched:
        warnings.warn(f"structured sparsity {fraction:g} leaves whole: " + "; ".join(untouched),
                      stacklevel=user_stacklevel())


def _check_masks_survive(denoiser: nn.Module, units: list[Any], config: PruneConfig) -> None:
    """Structured pruning rewrites the output layers of what it prunes (OBS updates every remaining weight,
    removed columns shift N:M groups): over an earlier unstructured or N:M prune it silently undid its zeros.
    Magnitude scoring updates nothing, so only earlier N:M groups break under it."""
    record = get_record(denoiser)
    if record is None:
        return
    earlier_nm = any(isinstance(entry, dict) and entry.get("pattern") not in ("unstructured", "structured")
                     for entry in record.configs)
    if config.method == "magnitude" and not earlier_nm:
        return
    outputs = {name for unit in units for name in unit.output_layers()}
    masked = [name for name in record.masked if name in outputs]
    if masked:
        raise ValueError(f"structured pruning would overwrite the zeros an earlier prune_ left in {len(masked)} "
                         f"layers it updates (e.g. {masked[0]}): prune structured first, then unstructured or N:M")


def _check_exclude(denoiser: nn.Module, config: PruneConfig) -> None:
    """Every ``exclude`` entry names a module or a prefix of module names (globs and typos matched nothing,
    silently)."""
    names = [name for name, _ in denoiser.named_modules() if name]
    for prefix in config.exclude:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ValueError(f"exclude entry {prefix!r} matches no module of {type(denoiser).__name__}; entries are "
                             f"module-name prefixes (e.g. {names[0]!r}), not globs")


# calibrate() arguments prune_'s own calibration sets from the config (calibration_kwargs, Sweep)
SELF_CALIBRATION_ARGUMENTS = frozenset({"pipe", "prompts", "num_samples", "num_inference_steps", "guidance_scale",
                                        "weighting", "weight_range", "collectors", "store_trajectory", "progress"})


def _check_calib_kwargs(config: PruneConfig) -> None:
    """``calib_kwargs`` may not set what the config sets (``num_inference_steps`` there ran 3 steps while the
    step weights were computed for ``calib_num_steps``; ``weight_range`` changed the weighting silently); other
    ``calibrate`` arguments (Flux's ``negative_prompt``, ``seed``) and pipeline arguments pass on."""
    own = sorted(set(dict(config.calib_kwargs)) & SELF_CALIBRATION_ARGUMENTS)
    if own:
        raise ValueError(f"calib_kwargs may not set {own}: prune_'s own calibration sets them; use calib_num_steps, "
                         f"calib_prompts, calib_guidance_scale, weighting and weight_range (or pass a Calibration)")


def calibration_kwargs(pipe: Any, config: PruneConfig, calib: Calibration | None) -> dict[str, Any]:
    """``calibrate`` keyword arguments of every sweep: ``calib``'s settings or the config defaults."""
    weights = {"weighting": config.weighting, "weight_range": config.weight_range}
    if calib is not None:
        return calib.settings.as_kwargs() | weights
    inputs = default_calibration_items(pipe, config.calib_prompts)
    return inputs | weights | {"num_inference_steps": config.calib_num_steps,
                               "guidance_scale": config.calib_guidance_scale} | dict(config.calib_kwargs)


def make_sweep(pipe: Any, config: PruneConfig, calib: Calibration | None, progress: bool) -> Sweep:
    """A function running one calibration pass of ``pipe`` into a HessianCollector for given layers."""
    kwargs = calibration_kwargs(pipe, config, calib)

    return _CalibrationSweep(pipe, config.method == "obs", progress, kwargs)


class _CalibrationSweep:
    """One calibration pass of the pipeline into a HessianCollector per call; remembers the first pass (for the
    artifact's provenance: every pass runs the same settings)."""

    def __init__(self, pipe: Any, full: bool, progress: bool, kwargs: dict[str, Any]) -> None:
        self.pipe, self.full, self.progress, self.kwargs = pipe, full, progress, kwargs
        self.first: Calibration | None = None

    def __call__(self, layer_names: list[str], full: bool | None = None) -> HessianCollector:
        """Collect inputs of ``layer_names``: full Hessians for OBS, input norms only otherwise or if not ``full``."""
        collector = HessianCollector(layer_names, full=self.full if full is None else full)
        calibration = calibrate(self.pipe, collectors=[collector], store_trajectory=False, progress=self.progress,
                                **self.kwargs)
        if collector.full:
            _check_weighted_steps(calibration)
        self.first = self.first or calibration
        return collector

    def step_weights(self) -> list[float]:
        """The per-step Hessian weights the passes used, one per denoiser step they ran (custom ``timesteps`` /
        ``sigmas`` in ``calib_kwargs`` included: recomputed from ``calib_num_steps``, the report listed others)."""
        return [] if self.first is None else self.first.step_weights.tolist()

    def first_calibration(self) -> dict[str, Any] | None:
        """``Calibration.provenance()`` of the first pass, or None before any."""
        return None if self.first is None else self.first.provenance()


def _check_weighted_steps(calibration: Calibration) -> None:
    """Refuse Hessians from selected steps that ran and all weigh 0 (``weight_range`` from 0; img2img runs only the
    last steps): structured pruning skipped every block as unobserved and returned, having removed nothing, with no
    warning (until session 53)."""
    ran = [step for step in calibration.selected_steps if step in calibration.timesteps]
    weights = [float(calibration.step_weights[step]) for step in ran]
    if weights and not any(weights):
        settings = calibration.settings
        raise ValueError(f"every calibrated step that ran, {ran}, has weight 0 under "
                         f"weighting={settings.weighting!r}, weight_range={tuple(settings.weight_range)}: the "
                         f"Hessians would hold nothing; select other steps or raise weight_range's first value")


@torch.inference_mode(False)  # as prune_: new layers made under a caller's inference_mode could not be updated after it
def prune_denoiser_(denoiser: nn.Module, config: PruneConfig, sweep: Sweep | None = None) -> PruneReport:
    """Prune ``denoiser`` in place (no rollback); ``sweep`` collects inputs (required unless magnitude)."""
    if config.needs_calibration and sweep is None:
        what = f"method {config.method!r}" if config.method != "magnitude" else "allocation='error'"
        raise ValueError(f"{what} needs calibration inputs; use prune_(pipe, ...), or method='magnitude' "
                         f"(with allocation='saliency' for scope='global')")
    check_prunable_weights(denoiser, "prune_denoiser_")
    adapter = get_adapter(denoiser)
    check_denoiser(denoiser, adapter, config)
    report = PruneReport(config.method, config.pattern, config.target_sparsity,
                         params_before=count_parameters(denoiser))
    if config.structured:
        _prune_structured(denoiser, adapter, config, sweep, report)
    else:
        _prune_unstructured(denoiser, adapter, config, sweep, report)
    record = ensure_record(denoiser)
    record.configs.append(config.to_dict())
    record.calibrations.append(None)  # prune_ fills in what its sweeps ran
    report.params_after = count_parameters(denoiser)
    setattr(denoiser, REPORT_ATTR, report)
    return report


def _prune_unstructured(denoiser: nn.Module, adapter: Any, config: PruneConfig, sweep: Sweep | None,
                        report: PruneReport) -> None:
    groups, report.layers_skipped = unstructured_plan(adapter, config)
    groups, unfit = _fitting_groups(denoiser, groups, config)
    report.layers_skipped |= unfit
    record = ensure_record(denoiser)
    allocation_stats = SequentialStats()
    if config.scope == "global":
        report.allocation = config.global_allocation
        report.layer_sparsity, allocation_stats = _allocate_globally(denoiser, groups, config, sweep)

    def prune_group(group: Any, collector: HessianCollector | None) -> None:
        skipped = prune_layer_group(denoiser, group, config, collector, record, report.layer_sparsity,
                                    report.unobserved_inputs)
        report.layers_skipped |= skipped
        report.layers_pruned += [name for name in group.layers if name not in skipped]

    pruning_sweep = sweep if config.method != "magnitude" else None
    stats = SequentialPruner(lambda group: [group.layers[0]], prune_group, pruning_sweep,
                             _budget(denoiser, config)).run(groups, config.groups)
    _copy_stats(report, stats, allocation_stats)
    report.achieved_sparsity = zero_fraction(denoiser, report.layers_pruned)
    if config.nm is not None and config.sparse_kernels:
        report.sparse_kernels = enable_sparse_kernels(denoiser, report.layers_pruned, config.pattern)
    else:
        report.sparse_kernels = "no sparse kernel used: unstructured zeros are stored densely (storage savings only via save)"


def _fitting_groups(denoiser: nn.Module, groups: list, config: PruneConfig) -> tuple[list, dict[str, str]]:
    """(the groups without the layers ``config``'s pattern cannot take, {such a layer: why it stays dense}): the
    sweeps read a group's Hessian at its first layer, and a grouped Conv2d there raised TypeError in the Hessian
    collector for OBS and Wanda (magnitude skipped it; until session 51)."""
    fitting, unfit = [], {}
    for group in groups:
        reasons = {name: skip_reason(denoiser.get_submodule(name), config) for name in group.layers}
        unfit |= {name: reason for name, reason in reasons.items() if reason is not None}
        layers = tuple(name for name in group.layers if reasons[name] is None)
        if layers:
            fitting.append(dataclasses.replace(group, layers=layers))
    return fitting, unfit


def _allocate_globally(denoiser: nn.Module, groups: list, config: PruneConfig,
                       sweep: Sweep | None) -> tuple[dict[str, float], SequentialStats]:
    """Per-layer sparsities of scope="global" and the sweeps they took."""
    if config.global_allocation == "saliency":
        return _saliency_allocation(denoiser, groups, config, sweep)
    return _error_allocation(denoiser, groups, config, sweep)


def _saliency_allocation(denoiser: nn.Module, groups: list, config: PruneConfig,
                         sweep: Sweep | None) -> tuple[dict[str, float], SequentialStats]:
    """allocation="saliency": one input-norm sweep of the dense model (none for magnitude)."""
    start = time.perf_counter()
    names = [group.layers[0] for group in groups]
    collector = sweep(names, False) if sweep is not None else None
    held = 0 if collector is None else accumulator_bytes(collector, names)  # every layer's norms at once
    try:
        shares = saliency_layer_sparsity(denoiser, groups, config, collector)
    finally:
        if collector is not None:
            collector.free()
    return shares, SequentialStats(sweeps=int(sweep is not None), peak_hessian_bytes=held,
                                   seconds=time.perf_counter() - start)


def _error_allocation(denoiser: nn.Module, groups: list, config: PruneConfig,
                      sweep: Sweep) -> tuple[dict[str, float], SequentialStats]:
    """allocation="error": K full-Hessian sweeps of the dense model, group by group as pruning does
    (same peak memory), measuring every layer's error curve; then the least-error split."""
    grid, curves = error_grid(config.target_sparsity), {}

    def measure(group: Any, collector: HessianCollector | None) -> None:
        curves.update(layer_error_curves(denoiser, group, config, collector, grid))

    def full_sweep(names: list[str]) -> HessianCollector:  # Wanda's sweeps default to norms only
        return sweep(names, True)

    stats = SequentialPruner(lambda group: [group.layers[0]], measure, full_sweep,
                             MemoryBudget.for_denoiser(denoiser), "allocation groups").run(groups, config.groups)
    shares = allocate_by_error({name: curve for name, (curve, _) in curves.items()},
                               {name: size for name, (_, size) in curves.items()}, config.target_sparsity, grid)
    return shares, stats


def _prune_structured(denoiser: nn.Module, adapter: Any, config: PruneConfig, sweep: Sweep | None,
                      report: PruneReport) -> None:
    units, report.layers_skipped = structured_plan(adapter, config)
    record = ensure_record(denoiser)

    def prune_unit(unit: StructuredUnit, collector: HessianCollector | None) -> None:
        hessians = _unit_hessians(unit, collector)
        if hessians is None:
            report.layers_skipped[unit.block] = "no calibration input reached its output projections"
            return
        removed, changed = prune_structured_unit(denoiser, unit, hessians, config.target_sparsity, config.damp,
                                                 record)
        report.heads_removed += removed["heads"]
        report.neurons_removed += removed["neurons"]
        report.channels_removed += removed["channels"]
        report.layers_pruned += changed

    stats = SequentialPruner(StructuredUnit.output_layers, prune_unit, sweep,
                             _budget(denoiser, config)).run(units, config.groups)
    _copy_stats(report, stats)
    report.achieved_sparsity = 1.0 - count_parameters(denoiser) / max(report.params_before, 1)
    report.sparse_kernels = "structured: layers are physically smaller and use dense kernels"


def _budget(denoiser: nn.Module, config: PruneConfig) -> MemoryBudget | None:
    """The Hessian memory budget of sweeps collecting full Hessians (OBS); Wanda's norms need none."""
    return MemoryBudget.for_denoiser(denoiser) if config.method == "obs" else None


def _unit_hessians(unit: StructuredUnit, collector: HessianCollector | None) -> dict[str, Any] | None:
    """Output-layer Hessians of ``unit`` ({} for magnitude), or None if one saw no inputs."""
    if collector is None:
        return {}
    hessians = {}
    for name in unit.output_layers():
        try:
            hessians[name] = collector.hessian(name)
        except UnobservedLayerError:
            return None
    return hessians


def _copy_stats(report: PruneReport, stats: SequentialStats,
                allocation: SequentialStats | None = None) -> None:
    """Groups, sweeps, peak Hessian bytes and seconds of pruning plus a global allocation's sweeps."""
    allocation = allocation or SequentialStats()
    report.groups, report.sweeps = stats.groups, stats.sweeps + allocation.sweeps
    report.peak_hessian_bytes = max(stats.peak_hessian_bytes, allocation.peak_hessian_bytes)
    report.seconds = stats.seconds + allocation.seconds


def prune_report(pipe: Any) -> PruneReport | None:
    """The report of the last ``prune_`` on ``pipe``'s denoiser (a pipeline or a bare denoiser), or None (also
    after ``da.load``: an artifact holds the pruned shapes and masks, not the report)."""
    _, denoiser = find_denoiser(pipe)
    return getattr(denoiser, REPORT_ATTR, None)
