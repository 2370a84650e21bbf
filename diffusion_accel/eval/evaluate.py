"""``evaluate``: generate with every variant on identical seeds, measure, report.

Quality: FID (against a reference set, or against the baseline variant's images when none is
given), CLIP score, and PSNR/SSIM/max-abs-diff of each image against the baseline variant's image
for the same seed. Speed: pipeline and denoiser latency (median of repeats after warm-up, every
variant timed in this process), peak memory with parameter count and serialized size, FLOPs per
denoiser call. How prompts become pipeline arguments for text, class-label and unconditional
pipelines is described in :mod:`diffusion_accel.eval.pipes`.

Under a launcher (``torchrun --nproc_per_node N``; on GPUs also ``accelerate launch``, which starts a
single process on a CPU-only machine; move each pipeline to ``PartialState().device`` first) the images
are sharded across processes and gathered on the main process, which computes every metric (speed,
memory and FLOPs are measured there only, while the others wait); all processes return the same report. On a single process (plain
``python``) nothing changes. Images are kept in memory as uint8 (N, 3, H, W) per variant.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifact import pipeline_source, techniques_on
from ..paths import empty_path, expand_home
from ..pipeline_defaults import OTHER_PROMPTS, call_defaults, check_call_arguments, odd_image_list
from ..scalars import plain_number
from ..seeding import seeded_global_rng
from .clip_score import DEFAULT_CLIP_MODEL, check_clip_reachable, clip_metric, clip_score
from .cost import denoiser_flops, model_size
from .distributed import gather, merge_ordered, process_state, shard_batches, share_from_main
from .fid import (FIDStats, check_cache_dir, check_reference, compute_fid_stats, fid_feature_extractor,
                  frechet_distance, reference_stats)
from .fidelity import fidelity
from .grid import make_grid
from .machine import denoiser_runtime, machine_info
from .memory import measure_peak_memory
from .pipes import (ImageJob, PromptToKwargs, build_call_kwargs, check_call_kwargs, default_prompt_to_kwargs,
                    denoiser_of, generate_images, is_text_conditioned, make_jobs, per_prompt_image_arguments,
                    quiet_progress, whole_number)
from .report import EvalReport, report_folder_problem
from .timing import PipelineTiming, pipeline_device, time_pipelines

DEFAULT_METRICS = ("fid", "clip", "psnr", "ssim", "latency", "memory", "flops")
SPEED_METRICS = ("latency", "memory", "flops")
GRID_COLUMNS = 8
NO_GAIN_BAND = 0.05  # a speedup below 1.05x is reported as "not measurably faster"
MIB = 2 ** 20
CALL_MEMORY_KINDS = ("cuda_max_allocated", "process_peak_rss")  # kinds whose peak is of the call alone
MEMORY_KINDS = {  # memory.MemoryStats.kind -> what "peak MiB" means
    "cuda_max_allocated": "the CUDA allocator's peak during one call",
    "process_peak_rss": "the whole process's peak resident memory during one call (CPU: weights of every "
                        "loaded pipeline, libraries and the call's own allocations), so compare variants by "
                        "differences",
    "process_peak_rss_lifetime": "the whole process's lifetime peak resident memory (this OS cannot reset it), "
                                 "not one call's",
    "unavailable": "not measured (this OS offers no peak resident memory to Python: Windows)",
}


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """``metrics`` in report order; a ValueError naming unknown ones and the accepted names."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    try:  # an iterator was used up by the check below: every image generated, no metric measured (until s50)
        metrics = tuple(metrics)
    except TypeError:
        raise TypeError(f"metrics must be a metric name or a sequence of them, got {metrics!r}; accepted: "
                        f"{list(DEFAULT_METRICS)}") from None
    if not metrics:
        raise ValueError(f"metrics is empty: nothing to measure; accepted: {list(DEFAULT_METRICS)}")
    unknown = sorted(set(metrics) - set(DEFAULT_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; accepted: {list(DEFAULT_METRICS)}")
    return tuple(metric for metric in DEFAULT_METRICS if metric in metrics)


def _check_variants(pipelines: Mapping[str, Any], baseline: str | None) -> str:
    if not isinstance(pipelines, Mapping) or not pipelines:
        raise TypeError("pipelines must be a non-empty dict {variant name: pipeline}")
    unnamed = [name for name in pipelines if not isinstance(name, str)]
    if unnamed:
        raise TypeError(f"variant names must be strings (they label report rows and grid rows); got {unnamed!r}")
    uncallable = [name for name, pipe in pipelines.items() if not callable(pipe)]
    if uncallable:
        raise TypeError(f"variants {uncallable} are no pipelines (got {type(pipelines[uncallable[0]]).__name__}); "
                        f"pass {{name: diffusers pipeline}}")
    labels: dict[str, list[str]] = {}
    for name in pipelines:  # report.md and grid.png show names with runs of blanks and line breaks as one space
        labels.setdefault(" ".join(name.split()), []).append(name)
    clashes = [names for names in labels.values() if len(names) > 1]
    if clashes or "" in labels:
        raise ValueError(f"variant names {clashes[0] if clashes else ['']!r} print as the same label "
                         f"{' '.join(clashes[0][0].split()) if clashes else ''!r} in the report and grid; "
                         f"give distinct, non-blank names")
    baseline = baseline if baseline is not None else next(iter(pipelines))
    if baseline not in pipelines:
        raise ValueError(f"baseline {baseline!r} is not a variant; variants: {list(pipelines)}")
    return baseline


def _plain(value: Any) -> Any:
    """A call argument for the JSON report: numbers, strings, booleans and None as they are (guidance 3.0
    was written as the string "3.0"), lists and tuples item by item, tensors and arrays by type, shape and dtype,
    images by mode and size (a tensor's whole repr filled the settings line), anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == 0 and hasattr(value, "item"):  # np.float32(3.0), tensor(0.3): the value
        return _plain(value.item())
    if shape is not None and hasattr(value, "dtype"):
        return f"<{type(value).__name__} {tuple(shape)} {value.dtype}>"
    if type(value).__module__.startswith("PIL."):
        return f"<PIL image {value.mode} {value.width}x{value.height}>"
    return repr(value)


@dataclass
class _Run:
    """Everything one evaluation needs besides the pipelines and their images."""

    requested: tuple[str, ...]
    baseline: str
    jobs: list[ImageJob]
    images_per_prompt: int
    num_inference_steps: int
    seed: int
    batch_size: int
    call_kwargs: dict[str, Any] | None
    prompt_to_kwargs: PromptToKwargs | None
    fid_reference: Any
    fid_cache_dir: Any
    fid_extractor: Any
    clip_model: Any
    warmup: int
    repeats: int
    grid_cell_size: int
    grid_columns: int | None

    def call_kwargs_for(self, pipe: Any, jobs: Sequence[ImageJob]) -> dict[str, Any]:
        """Pipeline kwargs generating ``jobs`` (fresh seeded generators every time)."""
        return build_call_kwargs(pipe, jobs, num_inference_steps=self.num_inference_steps,
                                 call_kwargs=self.call_kwargs, prompt_to_kwargs=self.prompt_to_kwargs,
                                 num_prompts=self.num_prompts)

    @property
    def num_prompts(self) -> int:
        """The run's prompt count."""
        return len(self.jobs) // self.images_per_prompt

    def settings(self, num_processes: int, pipelines: Mapping[str, Any]) -> dict[str, Any]:
        """The run's settings as plain values for the report (with each pipeline's own call defaults)."""
        defaults = {name: {key: _plain(value) for key, value in call_defaults(pipe).items()}
                    for name, pipe in pipelines.items() if call_defaults(pipe)}
        return {"metrics": list(self.requested), "baseline": self.baseline,
                "prompts": len(self.jobs) // self.images_per_prompt, "images_per_prompt": self.images_per_prompt,
                "num_inference_steps": self.num_inference_steps, "seed": self.seed, "batch_size": self.batch_size,
                "call_kwargs": {key: _plain(value) for key, value in (self.call_kwargs or {}).items()},
                "pipeline_call_defaults": defaults,
                "timing_warmup": self.warmup, "timing_repeats": self.repeats, "num_processes": num_processes,
                "clip_model": str(self.clip_model or DEFAULT_CLIP_MODEL) if "clip" in self.requested else None}


def _generate_all(pipelines: Mapping[str, Any], run: _Run, state: Any, progress: bool) -> dict[str, torch.Tensor]:
    """uint8 (N, 3, H, W) images per variant, in job order, on every process."""
    mine = shard_batches(run.jobs, run.batch_size, state)
    bar = tqdm(total=len(mine) * len(pipelines), desc="generating", unit="img",
               disable=not (progress and state.is_main_process))
    images = {}
    for name, pipe in pipelines.items():
        try:
            local = generate_images(pipe, mine, num_inference_steps=run.num_inference_steps,
                                    batch_size=run.batch_size, call_kwargs=run.call_kwargs,
                                    prompt_to_kwargs=run.prompt_to_kwargs, progress=bar.update,
                                    total=len(run.jobs), num_prompts=run.num_prompts)
        except ValueError as error:
            raise ValueError(f"variant {name!r}: {error}") from error
        images[name] = torch.stack(merge_ordered(gather(local, state), len(run.jobs)))
    bar.close()
    return images


def default_clip_model(pipelines: Mapping[str, Any]) -> str:
    """The CLIP that scores ``pipelines``: the bundled in-domain fashion-clip when every one was loaded
    from the Fashion-MNIST zoo (``zoo:fashion-*``, or its folder, a copy or a training export of it: those were
    scored with nothing until session 48; a general CLIP knows nothing of 32-px garments and needs the hub), else
    ``DEFAULT_CLIP_MODEL``."""
    from ..zoo import ZOO_MODEL_ATTR, bundled_clip

    def from_fashion_zoo(pipe: Any) -> bool:
        spec = (pipeline_source(pipe) or {}).get("spec", "")
        return spec.startswith("zoo:fashion-") or str(getattr(pipe, ZOO_MODEL_ATTR, "")).startswith("fashion-")

    if pipelines and all(from_fashion_zoo(pipe) for pipe in pipelines.values()):
        return bundled_clip() or DEFAULT_CLIP_MODEL  # None: an install without the zoo's weights
    return DEFAULT_CLIP_MODEL


def evaluate(pipelines: Mapping[str, Any], prompts: Sequence[Any], metrics: Sequence[str] = DEFAULT_METRICS, *,
             num_inference_steps: int = 25, seed: int = 0, baseline: str | None = None,
             fid_reference: Any = None, fid_cache_dir: str | Path | None = None,
             fid_extractor: nn.Module | None = None, clip_model: str | Path | None = None,
             batch_size: int = 1, images_per_prompt: int = 1,
             call_kwargs: dict[str, Any] | None = None, prompt_to_kwargs: PromptToKwargs | None = None,
             output_dir: str | Path | None = None, progress: bool = True, warmup: int = 1,
             repeats: int = 3, grid_cell_size: int = 128, grid_columns: int | None = GRID_COLUMNS) -> EvalReport:
    """Compare pipeline variants ({name: pipe}) on ``prompts`` with identical seeds; see module doc.

    ``metrics``: any of fid, clip, psnr, ssim, latency, memory, flops (default all; fid scores against
    ``fid_reference``, or without one against the baseline's images, ``fid_vs_baseline``; clip needs a CLIP
    model: offline, only zoo pipelines have one bundled, so name the metrics for others). ``baseline``:
    the variant psnr / ssim / speed-ups compare against (default: the first). Image ``k`` of prompt ``p``
    is seeded ``seed + p * images_per_prompt + k`` in every variant; ``num_inference_steps`` steps,
    ``batch_size`` images per pipeline call, ``call_kwargs`` further pipeline arguments (over each
    pipeline's ``call_defaults``), ``prompt_to_kwargs(pipe, prompts)`` how prompts become call arguments
    (default: ``prompt`` / ``class_labels`` / ``batch_size``). Latency: ``warmup`` untimed then ``repeats``
    timed calls per variant, interleaved. ``output_dir``: also save report.json / report.md / grid.png.
    ``fid_reference``: FIDStats, a ``.safetensors`` stats file, an image folder, a uint8 tensor or a
    dataset (cached under ``fid_cache_dir``); ``fid_extractor``: feature network (default: offline
    TF-Inception). ``clip_model``: hub id or local CLIP folder (default: ``default_clip_model``).
    ``grid_cell_size``: grid cell side in pixels; ``grid_columns``: prompts shown in the grid (None: all).
    """
    check_call_kwargs(call_kwargs)
    if prompt_to_kwargs is not None and not callable(prompt_to_kwargs):
        raise TypeError(f"prompt_to_kwargs must be a function (pipe, prompts) -> call arguments, or None; got "
                        f"{type(prompt_to_kwargs).__name__}")
    _check_counts(images_per_prompt=images_per_prompt, batch_size=batch_size, warmup=warmup, repeats=repeats,
                  grid_cell_size=grid_cell_size, **({} if grid_columns is None else {"grid_columns": grid_columns}))
    # numpy counts as Python ints: a numpy images_per_prompt seeded no generator, report.json held "3" strings
    images_per_prompt, batch_size, warmup, repeats, grid_cell_size, grid_columns, seed, num_inference_steps = (
        plain_number(value) for value in (images_per_prompt, batch_size, warmup, repeats, grid_cell_size,
                                          grid_columns, seed, num_inference_steps))
    run = _Run(requested=check_metrics(metrics), baseline=_check_variants(pipelines, baseline),
               jobs=make_jobs(prompts, images_per_prompt, seed), images_per_prompt=images_per_prompt,
               num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size, call_kwargs=call_kwargs,
               prompt_to_kwargs=prompt_to_kwargs, fid_reference=fid_reference, fid_cache_dir=fid_cache_dir,
               fid_extractor=fid_extractor, clip_model=clip_model or default_clip_model(pipelines), warmup=warmup,
               repeats=repeats, grid_cell_size=grid_cell_size, grid_columns=grid_columns)
    if output_dir is not None and not empty_path(output_dir):
        output_dir = expand_home(output_dir)  # "~/x" made a folder named "~"
    _check_inputs(run, pipelines, output_dir)
    shared = shared_denoiser_notes(pipelines)
    for note in shared:
        warnings.warn(note, stacklevel=2)
    state = process_state()
    images = _generate_all(pipelines, run, state, progress)
    report = _report(pipelines, images, run, state) if state.is_main_process else None
    if report is not None:
        report.notes.extend(shared)
    if report is not None and output_dir is not None:
        report.save(output_dir)
    return share_from_main(report, state)


MAX_GRID_CELL = 2048  # pixels per grid cell: 100,000 exhausted memory (a killed process, no message)
COUNT_MINIMA = {"images_per_prompt": 1, "batch_size": 1, "warmup": 0, "repeats": 1, "grid_cell_size": 1,
                "grid_columns": 1}


def _check_counts(**counts: Any) -> None:
    """Each count an int at or above its ``COUNT_MINIMA`` bound, before any image is generated (repeats and
    the grid's cell size were checked only after generation, a float images_per_prompt was a TypeError)."""
    for name, value in counts.items():
        whole_number(name, value, minimum=COUNT_MINIMA[name])
    if counts.get("grid_cell_size", 1) > MAX_GRID_CELL:  # checked only when the grid was drawn, after everything
        raise ValueError(f"grid_cell_size must be at most {MAX_GRID_CELL} pixels, got {counts['grid_cell_size']}")


def _check_inputs(run: _Run, pipelines: Mapping[str, Any], output_dir: str | Path | None) -> None:
    """A missing FID reference (or one of another feature network), a CLIP model, prompts or a call
    argument a pipeline cannot take, or an output folder that is a file, is an error before generation,
    not after it (hours for 2,000 images of a hub model)."""
    problem = None if output_dir is None else report_folder_problem(output_dir)
    if problem is not None:
        raise ValueError(f"output_dir {problem}")
    if "fid" in run.requested and run.fid_reference is not None:
        check_reference(run.fid_reference, run.fid_extractor)
        check_cache_dir(run.fid_cache_dir)
    if "clip" in run.requested and _clip_scored(pipelines, run):  # else not scored
        check_clip_reachable(run.clip_model or DEFAULT_CLIP_MODEL)
    _check_per_prompt_lists(run.call_kwargs or {}, len(run.jobs) // run.images_per_prompt)
    for name, pipe in pipelines.items():
        check_call_arguments(pipe, run.call_kwargs or {}, "evaluate")
        _check_image_lists(name, pipe, run.call_kwargs or {}, len(run.jobs) // run.images_per_prompt)
        if run.prompt_to_kwargs is None:  # a user's function may be costly (text encoding): not run twice
            _check_prompts_fit(name, pipe, [job.prompt for job in run.jobs])


def _check_per_prompt_lists(call_kwargs: Mapping[str, Any], num_prompts: int) -> None:
    """A list negative_prompt (or prompt_2 ...) holds one text per prompt of the run, as calibrate requires: one
    of another length went whole to every call (a list of one: every prompt got it; of two for three prompts:
    diffusers failed after two images)."""
    for key in ("negative_prompt", *OTHER_PROMPTS):
        value = call_kwargs.get(key)
        if isinstance(value, (list, tuple)) and len(value) != num_prompts:
            raise ValueError(f"call_kwargs {key} must be a string or a list of {num_prompts} strings (one per "
                             f"prompt), got a list of {len(value)}")


def _check_image_lists(name: str, pipe: Any, call_kwargs: Mapping[str, Any], num_prompts: int) -> None:
    """A list of input images holds one image, or one per prompt (a list of another length went whole to every
    call); a MultiControlNet pipeline's ``image`` list holds one per ControlNet instead."""
    odd = odd_image_list(call_kwargs, num_prompts, per_prompt_image_arguments(pipe))
    if odd is not None:
        raise ValueError(f"call_kwargs {odd[0]} must be one image or a list of {num_prompts} (one per prompt) for "
                         f"variant {name!r}, got a list of {odd[1]}")


def _check_prompts_fit(name: str, pipe: Any, prompts: list[Any]) -> None:
    """The prompts suit ``pipe`` (text for text-to-image, class ids or label names for DiT): comparing
    families generated the first variant's images before the second refused its prompts."""
    try:
        default_prompt_to_kwargs(pipe, prompts)
    except (TypeError, ValueError, KeyError) as error:  # a mismatch of values: ValueError (the CLI printed a
        # TypeError's traceback, for one order of --pipe tiny:dit --pipe tiny:sd, until session 45)
        raise ValueError(f"variant {name!r} ({type(pipe).__name__}) cannot take these prompts: {error}") from error


def shared_denoiser_notes(pipelines: Mapping[str, Any]) -> list[str]:
    """One sentence per denoiser object that several variants share with techniques applied: a
    pipeline built with ``from_pipe`` or from another's components runs the same (accelerated) model,
    so a "base" sharing it is no baseline."""
    groups: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, pipe in pipelines.items():
        denoiser = denoiser_of(pipe)
        denoiser = getattr(denoiser, "_orig_mod", denoiser)
        groups.setdefault(id(denoiser), (denoiser, []))[1].append(name)
    notes = []
    for denoiser, names in groups.values():
        techniques = techniques_on(denoiser)
        if len(names) > 1 and techniques:
            notes.append(f"variants {names} share one {type(denoiser).__name__} object with {techniques} "
                         f"applied, so all of them run it; load the baseline separately to compare "
                         f"against the unaccelerated model")
    return notes


def _report(pipelines: Mapping[str, Any], images: dict[str, torch.Tensor], run: _Run, state: Any) -> EvalReport:
    """Measure every requested metric on the main process and assemble the report."""
    report = EvalReport(rows=[], settings=run.settings(state.num_processes, pipelines), images=images,
                        details={name: {} for name in pipelines})
    rows = {name: {"variant": name, "baseline": name == run.baseline, "images": len(images[name]),
                   **denoiser_runtime(pipe)} for name, pipe in pipelines.items()}
    if "psnr" in run.requested or "ssim" in run.requested:
        _add_fidelity(report, rows, run)
    if "fid" in run.requested:
        _add_fid(report, rows, pipelines, run)
    if "clip" in run.requested:
        _add_clip(report, rows, pipelines, run)
    if any(metric in run.requested for metric in SPEED_METRICS):
        _add_speed(report, rows, pipelines, run)
        _add_speedups(report, rows, run.baseline)
    report.rows = list(rows.values())
    report.machine = machine_info(pipeline_device(pipelines[run.baseline]))
    report.grid = _grid(report, run)
    return report


def _add_fidelity(report: EvalReport, rows: dict[str, dict[str, Any]], run: _Run) -> None:
    """PSNR (dB), SSIM and max |diff| of each variant's images vs the baseline's, same seeds."""
    reference = report.images[run.baseline]
    for name, row in rows.items():
        if report.images[name].shape != reference.shape:
            _skip_fidelity(report, row, run, name)
            continue
        result = fidelity(report.images[name], reference)
        is_base = name == run.baseline
        if "psnr" in run.requested:
            row["psnr_db"] = None if is_base else result.psnr
            report.details[name]["psnr_per_image_db"] = result.psnr_per_image
        if "ssim" in run.requested:
            row["ssim"] = None if is_base else result.ssim
            report.details[name]["ssim_per_image"] = result.ssim_per_image
        row["max_abs_diff"] = None if is_base else result.max_abs_diff
    report.notes.append(f"PSNR/SSIM/max |diff| compare each image with the baseline {run.baseline!r} image of "
                        "the same seed, as uint8 0..255 (identical images: PSNR inf, SSIM 1).")


def _skip_fidelity(report: EvalReport, row: dict[str, Any], run: _Run, name: str) -> None:
    """No PSNR/SSIM for a variant whose images differ in size from the baseline's (another family or
    resolution): a note, not an error after every image was generated."""
    row.update({key: None for key, metric in (("psnr_db", "psnr"), ("ssim", "ssim"), ("max_abs_diff", None))
                if metric is None or metric in run.requested})
    size, base_size = (tuple(report.images[key].shape[-2:]) for key in (name, run.baseline))
    report.notes.append(f"PSNR/SSIM not computed for {name!r}: its images are {size[0]}x{size[1]}, the baseline "
                        f"{run.baseline!r} makes {base_size[0]}x{base_size[1]}.")


def _fid_reference(report: EvalReport, run: _Run, extractor: Any) -> tuple[str, FIDStats]:
    """(row key, reference statistics): the given reference set, else the baseline's images."""
    if run.fid_reference is not None:
        return "fid", reference_stats(run.fid_reference, cache_dir=run.fid_cache_dir, extractor=extractor)
    report.notes.append(f"No fid_reference given: FID is measured against the baseline {run.baseline!r} "
                        "variant's images (column fid_vs_baseline), not against a dataset.")
    return "fid_vs_baseline", compute_fid_stats(report.images[run.baseline], extractor=extractor,
                                                source=f"variant {run.baseline}")


def _add_fid(report: EvalReport, rows: dict[str, dict[str, Any]], pipelines: Mapping[str, Any],
             run: _Run) -> None:
    """FID of each variant vs the reference set (or vs the baseline's images when none given)."""
    if len(run.jobs) < 2:
        report.notes.append("FID skipped: it needs at least 2 images per variant.")
        return
    extractor = run.fid_extractor if run.fid_extractor is not None else fid_feature_extractor(
        device=pipeline_device(pipelines[run.baseline]))
    key, reference = _fid_reference(report, run, extractor)
    for name, row in rows.items():
        skip = key == "fid_vs_baseline" and name == run.baseline
        row[key] = None if skip else frechet_distance(
            reference, compute_fid_stats(report.images[name], extractor=extractor))
    size = None if reference.image_size is None else list(reference.image_size)  # as report.json holds it
    report.settings["fid_reference"] = {"n": reference.n, "extractor": reference.extractor,
                                        "source": reference.source, "image_size": size}
    _note_fid_sizes(report, reference)
    report.notes.append(f"FID: {len(run.jobs)} generated vs {reference.n} reference images; FID at small n is "
                        "biased upward, so compare variants only at equal n.")


def _note_fid_sizes(report: EvalReport, reference: FIDStats) -> None:
    """A note when generated images are of another size than the FID reference's: the feature network
    resizes both, so FID then also measures the resize (the same 40 test images at 32 px and upscaled
    to 64 px moved a variant's FID from 262.5 to 276.1)."""
    if reference.image_size is None:
        return
    other = sorted({tuple(images.shape[-2:]) for images in report.images.values()} - {tuple(reference.image_size)})
    if other:
        sizes = ", ".join(f"{h}x{w}" for h, w in other)
        report.notes.append(f"FID reference images are {reference.image_size[0]}x{reference.image_size[1]}, generated "
                            f"ones {sizes}: FID also measures that difference; compare at the reference's size.")


def _add_clip(report: EvalReport, rows: dict[str, dict[str, Any]], pipelines: Mapping[str, Any],
              run: _Run) -> None:
    """Mean CLIP score of each variant's images against their prompts; None for a variant that takes no
    prompt (an unconditional pipeline's placeholder names scored as captions gave a CLIP score of 0.0)."""
    texts = [job.prompt for job in run.jobs]
    scored = _clip_scored(pipelines, run)
    for name in set(rows) - set(scored):
        rows[name]["clip_score"] = None
    if not scored:
        report.notes.append("CLIP score not computed: the prompts are not text (class ids or placeholders).")
        return
    if len(scored) < len(rows):
        report.notes.append(f"CLIP score not computed for {sorted(set(rows) - set(scored))}: they take no text prompt "
                            f"(the prompts only name their images).")
    metric, device = clip_metric(run.clip_model or DEFAULT_CLIP_MODEL), pipeline_device(pipelines[run.baseline])
    for name in scored:
        rows[name]["clip_score"] = clip_score(report.images[name], texts, model=metric, device=device)


def _clip_scored(pipelines: Mapping[str, Any], run: _Run) -> list[str]:
    """The variants whose images have a caption to score: text prompts, given to a pipeline taking them."""
    if not all(isinstance(job.prompt, str) for job in run.jobs):
        return []
    return [name for name, pipe in pipelines.items() if is_text_conditioned(pipe)]


def _add_speed(report: EvalReport, rows: dict[str, dict[str, Any]], pipelines: Mapping[str, Any],
               run: _Run) -> None:
    """Latency (variants interleaved), memory (+ size) and FLOPs on the first batch of prompts."""
    batch = run.jobs[:run.batch_size]
    factories = {name: partial(run.call_kwargs_for, pipe, batch) for name, pipe in pipelines.items()}
    with ExitStack() as stack:
        for pipe in pipelines.values():
            stack.enter_context(quiet_progress(pipe))
        # samplers that draw from the global RNG (stochastic flow matching) leave the user's stream as it was,
        # as generation does (until session 41 the speed calls advanced it)
        stack.enter_context(seeded_global_rng(batch[0].seed))
        if "latency" in run.requested:
            timings = time_pipelines(pipelines, factories, warmup=run.warmup, repeats=run.repeats)
            for name, timing in timings.items():
                rows[name].update(_latency_fields(timing))
                report.details[name]["timing"] = timing.to_dict()
        for name, pipe in pipelines.items():
            if "memory" in run.requested:
                rows[name].update(_memory_fields(pipe, factories[name]))
            if "flops" in run.requested:
                flops = denoiser_flops(pipe, factories[name]())
                rows[name].update(gflops_per_denoiser_call=flops.per_call / 1e9,
                                  gflops_per_image=flops.total / len(batch) / 1e9)
                report.details[name]["gflops_per_call"] = [calls / 1e9 for calls in flops.calls]
    report.notes.append(f"Speed, memory and FLOPs: calls of {len(batch)} image(s) in this process; latency = "
                        f"median of {run.repeats} after {run.warmup} warm-up, variants interleaved per repeat; "
                        "denoiser_ms = denoiser time summed over one pipeline call.")
    kinds = sorted({row["memory_kind"] for row in rows.values() if "memory_kind" in row})
    if kinds:
        report.notes.append("peak MiB: " + "; ".join(MEMORY_KINDS.get(kind, kind) for kind in kinds) + ".")
    if set(kinds) & set(CALL_MEMORY_KINDS):
        report.notes.append("call MiB: the peak minus the level when the call started, what the call itself "
                            "needed on top of what was resident (activations, cached features, dequantized "
                            "weights); compare variants by it.")


def _latency_fields(timing: PipelineTiming) -> dict[str, Any]:
    pipeline, denoiser = timing.pipeline, timing.denoiser
    return {"latency_ms": pipeline.median_ms, "latency_p10_ms": pipeline.p10_ms, "latency_p90_ms": pipeline.p90_ms,
            "denoiser_ms": denoiser.median_ms, "denoiser_p10_ms": denoiser.p10_ms,
            "denoiser_p90_ms": denoiser.p90_ms, "denoiser_calls": timing.denoiser_calls,
            "denoiser_call_ms": timing.per_call_ms, "timer": pipeline.timer}


def _memory_fields(pipe: Any, make_kwargs: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    memory = measure_peak_memory(lambda: pipe(**make_kwargs()), pipeline_device(pipe))
    size = model_size(denoiser_of(pipe))
    serialized = None if size.serialized_bytes is None else size.serialized_bytes / MIB
    call = memory.added_bytes / MIB if memory.kind in CALL_MEMORY_KINDS else None  # a lifetime peak has no start
    peak = memory.peak_mib if memory.kind != "unavailable" else None
    return {"peak_memory_mib": peak, "call_memory_mib": call, "memory_kind": memory.kind,
            "params": size.parameters, "state_mib": size.state_bytes / MIB, "serialized_mib": serialized}


def _add_speedups(report: EvalReport, rows: dict[str, dict[str, Any]], baseline: str) -> None:
    """Baseline median / variant median for pipeline and denoiser latency (> 1 is faster); variants
    without a speed-up beyond NO_GAIN_BAND are named in the notes."""
    base = rows[baseline]
    for row in rows.values():
        for key, ratio in (("latency_ms", "speedup"), ("denoiser_ms", "denoiser_speedup")):
            if row.get(key) and base.get(key):
                row[ratio] = base[key] / row[key]
        if row["variant"] != baseline and row.get("speedup") is not None and row["speedup"] < 1 + NO_GAIN_BAND:
            report.notes.append(f"{row['variant']!r} is not measurably faster than {baseline!r} on this device "
                                f"(pipeline speedup {row['speedup']:.3f}x, below the {1 + NO_GAIN_BAND:.2f}x a gain "
                                f"needs).")


def _grid(report: EvalReport, run: _Run) -> Any:
    """Grid of the first image of up to ``grid_columns`` prompts per variant (all with None), labelled
    with latency; a note says when prompts were left out."""
    first_copies = [job for job in run.jobs if job.index % run.images_per_prompt == 0]
    if run.grid_columns is not None and len(first_copies) > run.grid_columns:
        report.notes.append(f"The grid shows the first {run.grid_columns} of {len(first_copies)} prompts "
                            "(grid_columns).")
        first_copies = first_copies[:run.grid_columns]
    columns = [f"#{job.prompt_index}" if job.prompt is None else str(job.prompt) for job in first_copies]
    indices = [job.index for job in first_copies]
    rows = {name: images[indices] for name, images in report.images.items()}
    labels = {row["variant"]: row["variant"] + (f"\n{row['latency_ms']:.1f} ms" if row.get("latency_ms") else "")
              for row in report.rows}
    return make_grid(rows, column_labels=columns, row_labels=labels, cell_size=run.grid_cell_size)
