"""``diffusion-accel`` command line: a thin argparse front over the library (no logic of its own).

User mistakes print one clear ``error:`` line and exit with status 2; unexpected failures keep
their traceback and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .arch.registry import UnsupportedModelError
from .argtypes import SEED_LIMIT, cache_folder, int_at_least, nonnegative_float, output_file, output_folder
from .paths import expand_home

# Mistakes a user can make (bad values, missing files, unsupported models): one line, exit 2.
FID_CACHE = "~/.cache/diffusion_accel/fid"
MAX_CELL = 2048  # grid cell side in pixels (eval.evaluate.MAX_GRID_CELL; not imported: the CLI starts light)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, UnsupportedModelError)  # OSError: files, hub


def _add_pipe_args(parser: argparse.ArgumentParser, many: bool) -> None:
    help_text = ("pipeline spec: zoo:NAME, tiny:FAMILY, a save_pretrained folder, a hub id, an artifact "
                 "folder (base from its manifest) or BASE+ARTIFACT; "
                 + ("repeat as NAME=SPEC to compare variants" if many else "default: the bundled demo model"))
    parser.add_argument("--pipe", action="append" if many else "store", default=None, help=help_text)
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as loaded)")
    parser.add_argument("--variant", default=None,
                        help="weight-file variant of a hub model or folder, e.g. fp16 (diffusers' variant=; "
                             "default: the standard files, or a recipe's variant; '' for the standard files)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: as loaded)")


def _add_generation_args(parser: argparse.ArgumentParser, steps: int | None) -> None:
    parser.add_argument("--prompts", default=None,
                        help="bundled prompt set (default, fashion) or a .txt/.json file")
    parser.add_argument("--num-prompts", type=int_at_least(1), default=None, help="use only the first N prompts")
    parser.add_argument("--steps", type=int_at_least(1), default=steps,
                        help=f"denoising steps (default {steps or '25, or the recipe value'})")
    parser.add_argument("--guidance", type=nonnegative_float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int_at_least(0, SEED_LIMIT), default=0,  # too large failed after loading
                        help="base seed, 0 .. 2**63 - 1 (default %(default)s)")
    parser.add_argument("--call", action="append", metavar="KEY=VALUE",
                        help="a further pipeline argument, repeatable: --call height=512 --call width=512, "
                             "--call max_sequence_length=256 (VALUE parsed as JSON, else a string)")


DESCRIPTION = ("Make diffusers pipelines faster and smaller without retraining (quantize, prune, cache) "
               "and measure the result.")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand (its description a literal: ``python -OO`` drops
    docstrings)."""
    parser = argparse.ArgumentParser(prog="diffusion-accel", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in (_add_demo, _add_calibrate, _add_eval, _add_bench, _add_grid):
        add_subcommand(sub)
    _register_optional(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="calibrate and measure the bundled reference pipeline")
    _add_pipe_args(demo, many=False)
    _add_generation_args(demo, steps=20)
    demo.add_argument("--out", type=output_folder, default="diffusion_accel_demo", help="output folder (report, grid)")
    demo.add_argument("--repeats", type=int_at_least(1), default=3, help="timed repeats for latency")
    demo.set_defaults(handler=_cmd_demo)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser(
        "calibrate", help="trajectory calibration: save statistics, or quantize/prune and save the artifact")
    _add_pipe_args(calibrate, many=False)
    _add_generation_args(calibrate, steps=None)
    calibrate.add_argument("--recipe", default=None, help="a recipe TOML from pipelines/ (sets the defaults)")
    calibrate.add_argument("--selection", default=None, help='"all", "uniform:K", "every:K" or "0,5,10" (default all)')
    calibrate.add_argument("--weighting", default=None,
                           help="per-step weights of the calibration's Hessians: uniform, linear, log-decrease or "
                                "log-increase (default uniform; pruning's default log-decrease, OBS-Diff's)")
    calibrate.add_argument("--collect", default=None,
                           help="--method stats: comma list of ranges, hessian, features (default ranges,features)")
    calibrate.add_argument("--batch-size", type=int_at_least(1), default=None, help="items per pipeline call (default 1)")
    calibrate.add_argument("--layers", default=None, help="glob over eligible layer names (e.g. 'up_blocks.*')")
    calibrate.add_argument("--method", default="stats",
                           help="stats (collector statistics), ptq (quantize), obs, wanda or magnitude "
                                "(prune), cache (enable and calibrate a cache), or a chain saved as one "
                                "artifact, in this order: e.g. obs,ptq,cache; default %(default)s")
    _add_technique_options(calibrate)
    calibrate.add_argument("--out", type=output_folder, required=True, help="output folder (statistics, or the artifact)")
    calibrate.set_defaults(handler=_cmd_calibrate)


def _add_technique_options(parser: argparse.ArgumentParser) -> None:
    """calibrate's settings of each technique: PTQ preset, pruning sparsity and pattern, cache method."""
    parser.add_argument("--preset", default=None,
                           help="PTQ preset: w8a8 (default), w4a8, w8a16, fp8, w4a16, qdiffusion, cpu-fast")
    parser.add_argument("--sparsity", type=float, default=None, help="pruning sparsity, e.g. 0.5")
    parser.add_argument("--pattern", default=None, help="pruning pattern: unstructured, 2:4, 4:8, structured")
    parser.add_argument("--scope", default=None, choices=("layer", "global"),
                           help="unstructured pruning: sparsity per layer (default) or over all pruned layers together")
    parser.add_argument("--allocation", default=None, choices=("error", "saliency"),
                           help="--scope global: per-layer shares by least output error (default; obs, wanda) "
                                "or by normalised saliency (default for magnitude)")
    parser.add_argument("--cache-method", default=None,
                           help="--method cache: deepcache, block, first_block, teacache, delta, "
                                "encoder_propagation, calibrated or router (a learned block router, transformers; "
                                "default: the recipe's [cache] method, else "
                                "da.default_cache_config: deepcache for UNets, block for transformers, "
                                "interval 3 with forecast 1)")
    parser.add_argument("--budget", type=float, default=None,
                           help="--cache-method calibrated: fraction of steps that run the full denoiser; router: "
                                "fraction of the transformer blocks' FLOPs over all steps")
    parser.add_argument("--search-blocks", action="store_const", const=True, default=None,
                           help="--cache-method calibrated: also choose partial steps, reuse steps that recompute "
                                "part of the cached blocks (leading transformer blocks; a deeper UNet branch), paid "
                                "from the budget by their share of the cached blocks' FLOPs")
    parser.add_argument("--interval", type=int_at_least(1), default=None, help="cache interval (deepcache, block, ...)")
    parser.add_argument("--forecast", type=int, default=None, choices=(0, 1),
                           help="reuse steps: 0 reuse the cached feature, 1 forecast it linearly")
    parser.add_argument("--forecast-target", default=None, choices=("residual", "output"),
                           help="transformer caches (block, calibrated): what reuse steps fill in: the block "
                                "stack's residual, or the final projection's output")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="measure pipelines side by side (table + JSON + Markdown)")
    _add_pipe_args(evaluate, many=True)
    _add_generation_args(evaluate, steps=25)
    evaluate.add_argument("--metrics", default="psnr,ssim,latency,flops",
                          help="comma list of: fid, clip, psnr, ssim, latency, memory, flops (default %(default)s)")
    evaluate.add_argument("--fid-reference", default=None,
                          help="FID reference: a stats file, an image folder, or DATASET:SPLIT of the zoo's "
                               "data (fashion-mnist:test, mnist:test); its statistics are cached")
    evaluate.add_argument("--fid-cache", type=cache_folder, default=None,  # the default is checked only for fid
                          help=f"folder caching FID reference statistics (default {FID_CACHE})")
    evaluate.add_argument("--fid-dtype", choices=["float32", "bfloat16"], default="float32",
                          help="precision of the TF-Inception network: bfloat16 (autocast) is ~1.5x faster on "
                               "CPUs with AVX-512 BF16/AMX (emulated, so slower, elsewhere); compare FIDs only "
                               "at equal precision (reference statistics are cached per precision)")
    evaluate.add_argument("--clip-model", default=None,
                          help="CLIP model name or local folder for CLIP score (default: the bundled fashion-clip "
                               "when every --pipe is a Fashion-MNIST zoo model: zoo:fashion-*, its folder or an "
                               "artifact on it; else openai/clip-vit-large-patch14 from the hub)")
    evaluate.add_argument("--out", type=output_folder, default=None, help="folder for report.json / report.md / grid.png")
    evaluate.set_defaults(handler=_cmd_eval)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="speed side by side: pipeline and denoiser latency, peak memory, "
                                         "size, FLOPs (optionally torch.compile'd)")
    _add_pipe_args(bench, many=True)
    _add_generation_args(bench, steps=25)
    bench.add_argument("--batch-size", type=int_at_least(1), default=1, help="prompts per timed pipeline call (default 1)")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile every variant's denoiser first (compiled while the images are generated, "
                            "before the timed calls; "
                            "with a First-Block-Cache or TeaCache, regionally: its blocks beneath the cache hooks)")
    bench.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed calls before timing (default %(default)s)")
    bench.add_argument("--repeats", type=int_at_least(1), default=5, help="timed calls (default %(default)s)")
    bench.add_argument("--metrics", default="latency,memory,flops",
                       help="comma list of: latency, memory, flops (default %(default)s)")
    bench.add_argument("--out", type=output_folder, default=None, help="folder for report.json / report.md / grid.png")
    bench.set_defaults(handler=_cmd_bench)


def _add_grid(sub: argparse._SubParsersAction) -> None:
    grid = sub.add_parser("grid", help="comparison grid: rows = variants, columns = prompts")
    _add_pipe_args(grid, many=True)
    _add_generation_args(grid, steps=25)
    grid.add_argument("--out", type=output_file, default="grid.png",
                      help="image path: .png, .jpg, .jpeg or .webp (no suffix: PNG; default %(default)s)")
    grid.add_argument("--cell", type=int_at_least(1, MAX_CELL), default=128,
                      help=f"cell size in pixels, at most {MAX_CELL} (default %(default)s)")
    grid.set_defaults(handler=_cmd_grid)


def _register_optional(sub: argparse._SubParsersAction) -> None:
    """Subcommand groups contributed by other packages (e.g. ``zoo``)."""
    try:
        from .zoo.cli import register as register_zoo
    except ImportError:
        return
    register_zoo(sub)


# ----- handlers ----------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .eval.pipes import check_call_kwargs
    from .recipes import check_call_table

    call_kwargs = _call_kwargs(args)
    check_call_kwargs(call_kwargs)  # before loading: what evaluation sets itself (`--call seed=3` crashed the demo)
    check_call_table(call_kwargs)  # and what calibration does
    report = run_demo(spec=args.pipe, prompts=args.prompts, num_prompts=args.num_prompts,
                      steps=args.steps, call_kwargs=call_kwargs, seed=args.seed, out=Path(args.out),
                      repeats=args.repeats, dtype=args.dtype, device=args.device, variant=args.variant)
    if _is_main_process():
        print(report.to_markdown())
        print(f"\nreport, grid and calibration summary (calibration.json) written to {args.out}/")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .recipes import calibrate_from_args

    print(calibrate_from_args(args))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate
    from .eval.evaluate import DEFAULT_METRICS, check_metrics

    requested = _split(args.metrics)
    if not requested:
        raise ValueError(f"--metrics {args.metrics!r}: name at least one of {', '.join(DEFAULT_METRICS)} (grid "
                         "images alone: diffusion-accel grid)")
    metrics = list(check_metrics(requested))
    _check_metric_options(args, metrics)
    fid_extractor = _fid_extractor(args.fid_dtype, metrics, args.device)
    fid_reference = _fid_reference(args.fid_reference)
    _check_eval_inputs(args, metrics, fid_reference, fid_extractor)  # before loading any pipeline
    _check_report_folder(args.out)
    pipes = _load_variants(args)
    report = evaluate(pipes, _prompts_for(args, next(iter(pipes.values()))),
                      metrics=metrics, num_inference_steps=args.steps, seed=args.seed,
                      fid_reference=fid_reference, fid_cache_dir=args.fid_cache or FID_CACHE,
                      fid_extractor=fid_extractor, clip_model=args.clip_model, call_kwargs=_call_kwargs(args))
    return _print_and_save(report, args.out)


def _check_metric_options(args: argparse.Namespace, metrics: list[str]) -> None:
    """Refuse options of a metric not asked for (they were ignored silently, a zoo reference loaded for nothing)."""
    idle = [flag for flag, value, metric in (("--fid-reference", args.fid_reference, "fid"),
                                             ("--fid-cache", args.fid_cache, "fid"),
                                             ("--clip-model", args.clip_model, "clip"),
                                             ("--fid-dtype", None if args.fid_dtype == "float32" else args.fid_dtype,
                                              "fid"))
            if value is not None and metric not in metrics]
    if idle:
        raise ValueError(f"{', '.join(idle)}: options of metrics that --metrics {','.join(metrics)} does not ask for "
                         f"(--fid-reference / --fid-cache / --fid-dtype: fid; --clip-model: clip); add the metric or "
                         f"drop them")


def _check_eval_inputs(args: argparse.Namespace, metrics: list[str], fid_reference: Any, fid_extractor: Any) -> None:
    """The FID reference (and its feature network) and the CLIP model, checked before the pipelines load
    (minutes for a hub model or an artifact; they were checked only after; ``_load_variants`` checks the
    prompt file and ``--call``)."""
    from .eval.clip_score import check_clip_model
    from .eval.fid import check_cache_dir, check_reference

    if "fid" in metrics and fid_reference is not None:
        check_reference(fid_reference, fid_extractor)
        check_cache_dir(args.fid_cache or FID_CACHE)  # the default only when FID is asked for
    if args.fid_cache is not None and (fid_reference is None or _is_file(fid_reference)):  # ignored silently
        raise ValueError(f"--fid-cache {args.fid_cache}: it keeps statistics computed from reference images "
                         f"(--fid-reference FOLDER or DATASET:SPLIT); "
                         + ("without --fid-reference FID compares with the baseline's images" if fid_reference is None
                            else f"{fid_reference!r} is a statistics file already") + "; drop it")
    if "clip" in metrics and args.clip_model is not None:
        check_clip_model(args.clip_model)


def _is_file(reference: Any) -> bool:
    return isinstance(reference, (str, Path)) and expand_home(reference).is_file()


def _fid_extractor(dtype_name: str, metrics: list[str], device: str | None) -> Any:
    """``--fid-dtype``: a bf16 TF-Inception on ``--device`` (where the pipelines will be); None leaves
    evaluate's default (fp32 TF-Inception) in place."""
    if dtype_name == "float32" or "fid" not in metrics:
        return None
    import torch

    from .eval.fid import fid_feature_extractor
    from .loading import check_device

    # checked: a traceback from inside torch (exit 1) until session 45; launched: this process's own GPU (s53)
    target = check_device(device) if device is not None else "cpu"
    return fid_feature_extractor(getattr(torch, dtype_name), device=target)


def _check_cpu_compiler(device: str | None) -> None:
    """``--compile`` on a CPU needs inductor's C++ compiler: without one (Windows without MSVC's ``cl``, macOS
    without the command-line tools) the first compiled call failed with a traceback, after every load."""
    if device is not None and not str(device).startswith("cpu"):
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: the compile itself reports
        return
    try:
        get_cpp_compiler()
    except Exception as error:  # torch's own "compiler not found" / InvalidCxxCompiler errors
        raise ValueError(f"--compile: torch.compile's CPU backend needs a C++ compiler and found none "
                         f"({type(error).__name__}: {error}); install one (g++ or clang; MSVC's cl on Windows) "
                         f"or run without --compile") from None


def _cmd_bench(args: argparse.Namespace) -> int:
    from .eval import compile_denoiser, evaluate
    from .eval.evaluate import SPEED_METRICS

    metrics = _split(args.metrics)
    if not metrics or set(metrics) - set(SPEED_METRICS):
        raise ValueError(f"--metrics {args.metrics!r}: bench measures {', '.join(SPEED_METRICS)} "
                         "(quality metrics are in `diffusion-accel eval`)")
    if args.compile:
        _check_cpu_compiler(args.device)
    _check_report_folder(args.out)
    pipes = _load_variants(args)
    if args.compile:
        pipes = {name: compile_denoiser(pipe) for name, pipe in pipes.items()}
    prompts = _prompts_for(args, next(iter(pipes.values())))
    if not args.num_prompts or len(prompts) < args.batch_size:  # a full timed call: cycled to --batch-size
        prompts = [prompts[index % len(prompts)] for index in range(args.batch_size)]
    report = evaluate(pipes, prompts, metrics=metrics,
                      num_inference_steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                      call_kwargs=_call_kwargs(args), warmup=args.warmup, repeats=args.repeats)
    return _print_and_save(report, args.out)


def _cmd_grid(args: argparse.Namespace) -> int:
    from .eval import evaluate, save_grid
    from .eval.grid import check_grid_fits, grid_format, grid_size

    grid_format(args.out)  # a bad --out is an error before any pipeline loads
    pipes = _load_variants(args)
    prompts = _prompts_for(args, next(iter(pipes.values())))
    check_grid_fits(args.out, grid_size(len(pipes), len(prompts), cell_size=args.cell))  # before any image
    report = evaluate(pipes, prompts, metrics=("latency",),
                      num_inference_steps=args.steps, seed=args.seed, grid_cell_size=args.cell,
                      grid_columns=None, call_kwargs=_call_kwargs(args), repeats=1)
    if not _is_main_process():  # every process holds the gathered report: one writes the PNG
        return 0
    path = save_grid(report.grid, args.out)
    print(f"grid {report.grid.width}x{report.grid.height} written to {path}")
    return 0


# ----- helpers -------------------------------------------------------------------------------
def _check_report_folder(out: str | None) -> None:
    """``--out`` holding folders named like the report's files failed after every image and metric, leaving a
    half-written report (until session 46): refused before any pipeline loads."""
    from .eval.report import report_folder_problem

    problem = None if not out else report_folder_problem(out)
    if problem is not None:
        raise ValueError(f"--out {problem}")


def _print_and_save(report: Any, out: str | None) -> int:
    """Print the report's Markdown table and, with ``--out``, save it there (on the main process only
    under a multi-process launcher: every process holds the same gathered report)."""
    if not _is_main_process():
        return 0
    print(report.to_markdown())
    if out:
        report.save(out)
        print(f"\nwritten to {out}/")
    return 0


def _is_main_process() -> bool:
    """Whether this process prints and writes (the only one, or the main one under a launcher)."""
    from .eval.distributed import process_state

    return process_state().is_main_process


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fid_reference(text: str | None) -> Any:
    """``--fid-reference``: ``DATASET:SPLIT`` of the zoo's data becomes its images; anything else (a
    statistics file or an image folder) passes through to ``evaluate``."""
    dataset, _, split = (text or "").partition(":")
    if split and not Path(text).exists():
        from .zoo import DATASETS, dataset_images

        if dataset in DATASETS:
            return dataset_images(dataset, split)
    return text


def _call_kwargs(args: argparse.Namespace) -> dict:
    """Pipeline arguments from ``--call KEY=VALUE`` and ``--guidance``."""
    from .recipes import command_line_guidance, parse_call_args

    call = parse_call_args(args.call)
    guidance = command_line_guidance(args.guidance, call)  # a --guidance that disagrees with --call: an error
    return call | ({} if guidance is None else {"guidance_scale": guidance})


def _load_variants(args: argparse.Namespace) -> dict:
    """``--pipe NAME=SPEC`` (or bare SPEC) entries loaded in order, names unique."""
    from .eval.pipes import check_call_kwargs
    from .loading import default_demo_spec, load_pipeline

    check_call_kwargs(_call_kwargs(args))  # before any load: a malformed or refused --call, a missing --prompts file
    if getattr(args, "prompts", None) is not None:
        from . import prompts

        prompts.load(args.prompts, limit=args.num_prompts)
    entries = args.pipe or [default_demo_spec()]
    named: dict[str, str] = {}
    for entry in entries:  # every name checked before the first (minutes-long) load
        bare = "=" not in entry or expand_home(entry).exists() or _equals_inside_artifact_spec(entry)
        name, _, spec = (entry, "", entry) if bare else entry.partition("=")
        if not name.strip() or not spec.strip():
            raise ValueError(f"--pipe {entry!r}: give NAME=SPEC with a non-empty name and spec, or a bare SPEC")
        if name in named:
            raise ValueError(f"variant name {name!r} given twice; use NAME=SPEC to name variants")
        named[name] = spec
    return {name: load_pipeline(spec, dtype=args.dtype, device=args.device, variant=args.variant)
            for name, spec in named.items()}


def _equals_inside_artifact_spec(entry: str) -> bool:
    """Whether ``entry`` is a bare BASE+ARTIFACT whose '=' is a path's (``lr=1e-4+art``, ``tiny:sd+art_lr=1e-4``,
    read as NAME=SPEC until session 49): an artifact folder after a '+', and a base holding no '=' or an existing
    path. ``q=tiny:sd+art`` stays NAME=SPEC."""
    from .loading import split_artifact_spec

    try:
        base, artifact = split_artifact_spec(entry)
    except OSError:
        return False
    return artifact is not None and (base is None or "=" not in base or expand_home(base).exists())


def _prompts_for(args: argparse.Namespace, pipe: object) -> list:
    """Prompts from ``--prompts`` or the default set that suits ``pipe``."""
    from . import prompts

    if args.prompts is None:
        return prompts.for_pipeline(pipe, limit=args.num_prompts)
    return prompts.load(args.prompts, limit=args.num_prompts)


@contextmanager
def _quiet_third_party_logs() -> Iterator[None]:
    """Within: import-time warnings of optional kernels (torchao .so files built for other GPUs) and
    transformers' notices are silenced; the levels are put back afterwards (``main`` called from Python, a
    notebook or a test, used to leave them silenced for the whole process)."""
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers")]
    levels, verbosity = [logger.level for logger in loggers], transformers_logging.get_verbosity()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        transformers_logging.set_verbosity(verbosity)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffusion-accel`` console script."""
    with _quiet_third_party_logs():
        return _run(argv)


def _run(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command; user errors print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None) or getattr(args, "func", None)  # a group's action is required
    try:
        status = int(handler(args) or 0)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    distributed = sys.modules.get("diffusion_accel.eval.distributed")  # loaded by the commands that shard work
    if distributed is not None:
        distributed.close_process_group()  # launched runs (torchrun): every rank finishes together
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
