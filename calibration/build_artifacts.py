"""Build accelerated artifacts for the hub pipelines named by the recipes in ``pipelines/``.

For each recipe (default: every ``pipelines/*.toml``) this runs ``diffusion-accel calibrate`` with
the recipe and a technique chain (default ``ptq``, e.g. ``obs,ptq,cache``): load the model the
recipe names (hub ids need internet and, for gated models, a Hugging Face login), one trajectory
calibration, the techniques in order, and the artifact (safetensors + manifest.json) saved to
``OUT/<recipe name>/``. Each artifact is then checked against its base on a few prompts (PSNR/SSIM
vs the base images, latency) and ``OUT/summary.json`` / ``summary.md`` list every recipe with its
calibration wall times, artifact size and check. Artifacts already in OUT are kept (the batch
resumes after an interruption) unless ``--force``; one built with other settings stops the run before
any work (exit 2, summary untouched); a recipe that fails is reported and the others go on.

    python calibration/build_artifacts.py --methods ptq --preset w8a8 --out artifacts/
    python calibration/build_artifacts.py pipelines/sdxl.toml --methods obs,ptq,cache --sparsity 0.3 \
        --pattern structured --out artifacts/
    diffusion-accel eval --pipe base=stabilityai/stable-diffusion-xl-base-1.0 --pipe accel=artifacts/sdxl \
        --dtype fp16 --variant fp16

Any calibrate flag can be passed after ``--`` (e.g. ``-- --selection uniform:10 --budget 0.4``).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from diffusion_accel.argtypes import int_at_least, output_folder
from diffusion_accel.artifact import MANIFEST
from diffusion_accel.loading import check_device

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "pipelines"
BUILD_FILE = "build.json"  # the calibrate command line an artifact was built with (resume compares it)


def calibrate_argv(recipe: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """The ``diffusion-accel calibrate`` command line this script runs for ``recipe``."""
    argv = ["calibrate", "--recipe", str(recipe), "--method", args.methods, "--out", str(out)]
    dtype, variant = _weights_of(recipe, args)
    flags = {"--pipe": args.pipe, "--dtype": dtype, "--variant": variant, "--device": args.device,
             "--preset": args.preset,
             "--sparsity": args.sparsity, "--pattern": args.pattern, "--num-prompts": args.num_prompts,
             "--steps": args.steps}
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(args.calibrate_args)


def _weights_of(recipe: Path, args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(dtype, variant) flags: the user's, else, for a ``--pipe`` local mirror of the recipe's hub model, the
    recipe's own (``calibrate --pipe`` ignores the recipe's [model] table: an SDXL mirror was calibrated in
    fp32 from the fp32 files although the recipe asks for fp16 weights); None lets calibrate read the recipe."""
    if args.pipe is None or args.pipe.startswith(("tiny:", "zoo:")):  # those have no weight-file variants
        return args.dtype, args.variant
    from diffusion_accel.recipes import load_recipe

    model = load_recipe(recipe).get("model", {})
    # --variant "" (the mirror holds the standard files) was replaced by the recipe's fp16 until session 48
    return args.dtype or model.get("dtype"), args.variant if args.variant is not None else model.get("variant")


def build_one(recipe: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate and save one artifact; returns its summary row (status, wall times, size)."""
    from diffusion_accel.cli import build_parser
    from diffusion_accel.recipes import run_calibrate

    argv = calibrate_argv(recipe, out, args)
    row: dict[str, Any] = {"recipe": recipe.stem, "command": "diffusion-accel " + " ".join(argv)}
    start = time.perf_counter()
    (out / BUILD_FILE).unlink(missing_ok=True)  # an interrupted rebuild left the old record beside the new artifact
    result = run_calibrate(build_parser().parse_args(argv))
    row.update(status="built", wall_s=round(time.perf_counter() - start, 1), technique_s=result["seconds"],
               summary=result["summary"].splitlines())
    record = {"calibrate_argv": _settings_argv(argv), "recipe_sha256": recipe_digest(recipe),
              "prompts_sha256": prompts_digest(argv)}
    (out / BUILD_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return row


def _settings_argv(argv: list[str]) -> list[str]:
    """A calibrate command line without its ``--out`` (what decides the artifact's content)."""
    index = argv.index("--out")
    return _absolute_recipe(argv[:index] + argv[index + 2:])


def _absolute_recipe(argv: list[str]) -> list[str]:
    """``argv`` with its recipe as an absolute path (the same recipe given as pipelines/x.toml and as
    ROOT/pipelines/x.toml was refused as other settings until session 41)."""
    argv = list(argv)
    if "--recipe" in argv[:-1]:
        at = argv.index("--recipe") + 1
        argv[at] = str(Path(argv[at]).resolve())
    return argv


def recipe_digest(recipe: Path) -> str:
    """SHA-256 of the recipe file's bytes: an edited recipe builds another artifact under the same path."""
    return hashlib.sha256(recipe.read_bytes()).hexdigest()


def prompts_digest(argv: list[str]) -> str | None:
    """SHA-256 of the calibration prompts a calibrate command line names (``--prompts`` or the recipe's: a file,
    a bundled set or a list), None for the pipeline's defaults: an edited prompt file was kept as built (s48)."""
    from diffusion_accel.cli import build_parser
    from diffusion_accel.recipes import given_prompts, load_recipe, merged_settings

    parsed = build_parser().parse_args(argv)
    settings = merged_settings(parsed, load_recipe(parsed.recipe))
    if settings["prompts"] is None:
        return None
    return hashlib.sha256(json.dumps(given_prompts(settings)).encode()).hexdigest()


def kept_artifact_problems(args: argparse.Namespace) -> list[str]:
    """``kept_artifact_problem`` of every recipe whose artifact already exists (none with ``--force``): a rerun
    with other settings rewrote summary.md marking those recipes failed, losing the earlier checks."""
    if args.force:
        return []
    problems = []
    for recipe in args.recipes:
        out = args.out / recipe.stem
        if (out / MANIFEST).is_file():
            try:
                problem = kept_artifact_problem(recipe, out, args)
            except (OSError, ValueError, KeyError, TypeError) as error:
                problem = f"{out} holds an artifact whose build record cannot be read ({error}); --force rebuilds it"
            problems += [problem] if problem else []
    return problems


def kept_artifact_problem(recipe: Path, out: Path, args: argparse.Namespace) -> str | None:
    """Why the artifact already in ``out`` is not what this run asks for (another method chain, preset,
    sparsity ...), or None: resuming kept it silently, so a w4a16 run reported a w8a8 artifact."""
    built = out / BUILD_FILE
    wanted = _settings_argv(calibrate_argv(recipe, out, args))
    if built.is_file():
        record = json.loads(built.read_text(encoding="utf-8"))
        found = record.get("calibrate_argv")
        found = _absolute_recipe(found) if isinstance(found, list) else found  # records before session 41
        problem = None if found == wanted else f"it was built by `diffusion-accel {' '.join(found or [])}`"
        if problem is None and record.get("recipe_sha256", recipe_digest(recipe)) != recipe_digest(recipe):
            problem = f"{recipe} was edited since it was built"  # the path alone matched (until session 41)
        if problem is None and "prompts_sha256" in record and record["prompts_sha256"] != prompts_digest(
                calibrate_argv(recipe, out, args)):
            problem = "its calibration prompts changed since it was built"
    else:  # a build interrupted before its record, or an artifact made by hand: its settings are unknown (its
        problem = f"it has no {BUILD_FILE} (an interrupted build, or made outside this script)"  # technique names
    return None if problem is None else (f"{out} holds an artifact of other settings ({problem}); this run asks for "
                                         f"`diffusion-accel {' '.join(wanted)}`: --force rebuilds it, or give "
                                         f"another --out")


def _technique_names(methods: str) -> list[str]:
    """Manifest technique names of a ``--methods`` chain (a pruning method saves as 'prune'); ValueError
    for ``stats``, which writes calibration statistics, not an artifact."""
    from diffusion_accel.recipes import parse_methods

    chain = parse_methods(methods)
    if chain == ["stats"]:
        raise ValueError("stats writes calibration statistics, not an artifact: run `diffusion-accel calibrate "
                         "--method stats` for those")
    return [method if method in ("ptq", "cache") else "prune" for method in chain]


def artifact_size_mib(folder: Path) -> float:
    """Bytes of the artifact's files (tensors + manifest + notes) in MiB."""
    return round(sum(path.stat().st_size for path in folder.iterdir() if path.is_file()) / 2**20, 3)


def check_artifact(folder: Path, recipe: Path, args: argparse.Namespace) -> dict[str, Any]:
    """PSNR/SSIM of the artifact's images against its base's (same prompts and seeds) and the latency
    ratio. The two pipelines share every component but the denoiser, so the check holds one extra
    denoiser in memory, not a second pipeline."""
    from diffusion_accel import load, prompts
    from diffusion_accel.eval import evaluate
    from diffusion_accel.loading import artifact_base, artifact_variant, load_pipeline
    from diffusion_accel.pipeline_defaults import call_defaults, set_call_defaults
    from diffusion_accel.recipes import sampling_kwargs

    spec, dtype = artifact_base(folder, args.pipe, args.dtype)
    base = load_pipeline(spec, dtype=dtype, device=args.device,  # the files the artifact was built from:
                         variant=args.variant if args.variant is not None else artifact_variant(folder, args.pipe))
    accelerated = load(sibling_pipeline(base), folder)  # its own copy of the denoiser
    if hasattr(base, "default_sample_size"):
        accelerated.default_sample_size = base.default_sample_size
    set_call_defaults(accelerated, call_defaults(base))  # a zoo base's call settings (T5 length, CFG)
    sampling = checkable_call(sampling_kwargs(_calibrated_settings(folder, recipe)))
    report = evaluate({"base": base, "accelerated": accelerated},
                      prompts.for_pipeline(base, limit=args.check_prompts), metrics=("psnr", "ssim", "latency"),
                      num_inference_steps=args.check_steps, repeats=args.check_repeats, progress=False,
                      call_kwargs=sampling)
    rows = {row["variant"]: row for row in report.rows}
    return {"psnr_db": rows["accelerated"].get("psnr_db"), "ssim": rows["accelerated"].get("ssim"),
            "speedup": rows["accelerated"].get("speedup"), "latency_ms": rows["accelerated"].get("latency_ms"),
            "base_latency_ms": rows["base"].get("latency_ms"), "check_prompts": rows["base"]["images"],
            "check_steps": args.check_steps}


def checkable_call(call: dict[str, Any]) -> dict[str, Any]:
    """The calibration call settings the check can pass to ``evaluate``: without those evaluation controls
    (``num_images_per_prompt``, ``return_dict``) or a non-image ``output_type``, which calibrate takes and
    ``evaluate`` refuses (a built artifact was reported failed at its check, until session 48)."""
    from diffusion_accel.eval.pipes import CONTROLLED_KWARGS, IMAGE_OUTPUT_TYPES

    return {key: value for key, value in call.items() if key not in CONTROLLED_KWARGS
            and not (key == "output_type" and value not in IMAGE_OUTPUT_TYPES)}


def sibling_pipeline(base: Any) -> Any:
    """A pipeline of ``base``'s class on the same components and init options (SDXL's
    ``force_zeros_for_empty_prompt``, which ``type(base)(**base.components)`` reset). Not ``from_pipe``: without a
    dtype it casts every shared component to float32, so an fp16 recipe's base and artifact were checked in fp32
    (until session 46)."""
    parameters = inspect.signature(type(base).__init__).parameters
    options = {name: base.config[name] for name in parameters
               if name in base.config and name not in base.components}
    return type(base)(**base.components, **options)


def _calibrated_settings(folder: Path, recipe: Path) -> dict[str, Any]:
    """The ``call`` and ``guidance`` settings the artifact was calibrated with (its ``calibration.json``, which
    includes calibrate flags given after ``--``: the check ran at the recipe's alone until session 41), else
    the recipe's."""
    from diffusion_accel.recipes import load_recipe

    notes = folder / "calibration.json"
    if notes.is_file():
        settings = json.loads(notes.read_text(encoding="utf-8")).get("settings", {})
        if isinstance(settings.get("call"), dict):
            return {"call": settings["call"], "guidance": settings.get("guidance")}
    table = load_recipe(recipe)
    return {"call": table.get("call", {}), "guidance": table.get("calibration", {}).get("guidance")}


def process(recipe: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build (unless already built) and check one recipe's artifact; failures become a row, not a crash."""
    out = args.out / recipe.stem
    try:
        if (out / MANIFEST).is_file() and not args.force:
            problem = kept_artifact_problem(recipe, out, args)
            if problem:
                raise ValueError(problem)
            row = {"recipe": recipe.stem, "status": "kept (already built with these settings; --force rebuilds)"}
        else:
            row = build_one(recipe, out, args)
        row["artifact_mib"] = artifact_size_mib(out)
        if args.check_prompts > 0:
            row["check"] = check_artifact(out, recipe, args)
    except Exception as error:  # one bad recipe (no network, gated model) must not stop the batch
        traceback.print_exc()
        return {"recipe": recipe.stem, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    return row


def write_summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """``summary.json`` (rows + machine) and ``summary.md`` (one line per recipe) under OUT."""
    from diffusion_accel.eval import machine_info

    machine = machine_info(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    (args.out / "summary.json").write_text(json.dumps({"methods": args.methods, "machine": machine, "rows": rows},
                                                      indent=2, default=str), encoding="utf-8")
    settings = " ".join(f"--{name} {value}" for name, value in
                        (("preset", args.preset), ("sparsity", args.sparsity), ("pattern", args.pattern)) if value)
    lines = [f"# Artifacts: {args.methods} {settings}".rstrip(), "", "| recipe | status | calibration s | artifact MiB | "
             "PSNR dB vs base | SSIM | speed-up |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        check = row.get("check", {})
        cells = [row["recipe"], row.get("error") or row["status"], row.get("wall_s", ""), row.get("artifact_mib", ""),
                 _fmt(check.get("psnr_db")), _fmt(check.get("ssim")), _fmt(check.get("speedup"))]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", "Machine: " + ", ".join(f"{key}={value}" for key, value in machine.items())]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipe TOML files (default: every pipelines/*.toml)")
    parser.add_argument("--methods", default="ptq", help="technique chain, e.g. ptq or obs,ptq,cache (default ptq)")
    parser.add_argument("--preset", default=None, help="PTQ preset (w8a8, w4a8, w8a16, w4a16, fp8, qdiffusion, cpu-fast)")
    parser.add_argument("--sparsity", type=float, default=None, help="pruning sparsity")
    parser.add_argument("--pattern", default=None, help="pruning pattern: unstructured, 2:4, 4:8, structured")
    parser.add_argument("--pipe", default=None, help="load this pipeline instead of the recipe's model id "
                        "(a local mirror of the hub model; with one recipe only)")
    parser.add_argument("--dtype", default=None, help="override the recipe's dtype (fp32, bf16, fp16)")
    parser.add_argument("--variant", default=None,
                        help="weight-file variant (e.g. fp16; default: the recipe's; '' for the standard files)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: as loaded)")
    parser.add_argument("--num-prompts", type=int_at_least(1), default=None,
                        help="calibration prompts (default: the recipe's)")
    parser.add_argument("--steps", type=int_at_least(1), default=None, help="calibration steps (default: the recipe's)")
    parser.add_argument("--check-prompts", type=int_at_least(0), default=4,
                        help="prompts of the check vs the base (0: no check)")
    parser.add_argument("--check-steps", type=int_at_least(1), default=20, help="denoising steps of the check")
    parser.add_argument("--check-repeats", type=int_at_least(1), default=2, help="timed repeats of the check")
    parser.add_argument("--force", action="store_true", help="rebuild artifacts that already exist")
    parser.add_argument("--out", type=lambda text: Path(output_folder(text)), required=True,
                        help="folder for the artifacts and the summary")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.calibrate_args = argv[split + 1:]  # after --: more diffusion-accel calibrate flags
    args.recipes = args.recipes or sorted(RECIPES.glob("*.toml"))
    missing = [str(path) for path in args.recipes if not path.is_file()]
    if missing:
        parser.error(f"recipe files not found: {missing}; the recipes are in {RECIPES}")
    if args.pipe is not None and len(args.recipes) > 1:  # every recipe's artifact came from that one model
        parser.error(f"--pipe {args.pipe!r} replaces the model of one recipe; name that recipe "
                     f"({len(args.recipes)} given), or point each recipe's [model] id at its local mirror")
    stems = [recipe.stem for recipe in args.recipes]  # each writes OUT/<stem>: one overwrote the other's artifact
    shared = sorted({stem for stem in stems if stems.count(stem) > 1})
    if shared:
        parser.error(f"recipes share the file names {shared} ({[str(r) for r in args.recipes if r.stem in shared]}), "
                     f"and each writes its artifact to --out/<name>: rename one, or build them into another --out")
    try:
        _technique_names(args.methods)
    except ValueError as error:
        parser.error(f"--methods: {error}")
    try:  # it failed in the summary's machine line, after the first recipe, with a raw torch error (until s50)
        if args.device is not None:
            check_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refused = kept_artifact_problems(args)
    if refused:  # before any work and before summary.md is rewritten: the kept artifacts' rows stay readable
        print("\n".join(f"error: {problem}" for problem in refused), file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe in args.recipes:
        print(f"== {recipe.stem}: {args.methods}", flush=True)
        rows.append(process(recipe, args))
        write_summary(rows, args)  # after every recipe, so an interrupted batch keeps its table
        print(json.dumps(rows[-1], indent=1, default=str), flush=True)
    print(f"summary written to {args.out}/summary.md")
    return 1 if any(row["status"] == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
