"""Recipes (``pipelines/*.toml``) and the ``diffusion-accel calibrate`` job built on them.

A recipe has a ``[model]`` table (``id``: any pipeline spec, ``dtype``, ``variant``: weight files such as
"fp16") and a ``[calibration]``
table (``prompts``, ``num_prompts``, ``steps``, ``guidance``, ``selection``, ``weighting``,
``batch_size``), an optional ``[call]`` table of further pipeline arguments (``height``, ``width``,
``max_sequence_length``, ...); technique tables (``[cache]``, ...) are read by their techniques.
Command-line flags override the recipe (``--call KEY=VALUE`` the ``[call]`` table). A relative prompt-file
path in ``prompts`` is found beside the recipe first, then in the current folder; a relative ``[model] id``
is a path from the current folder or a hub id, as in ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from . import prompts as prompt_sets
from .arch import get_adapter
from .artifact import base_fingerprint, save_folder_problem
from .artifact_files import StagedWrite
from .loading import check_device, default_demo_spec, load_pipeline, loaded_as
from .paths import CALIBRATION_FORMAT, expand_home, folders_named_like, read_json_object
from .scalars import is_finite_number


COLLECTOR_KINDS = ("ranges", "hessian", "features")
PRUNE_METHODS = ("obs", "wanda", "magnitude")
METHODS = ("stats", *PRUNE_METHODS, "ptq", "cache")
_STAGES = {"stats": -1, "obs": 0, "wanda": 0, "magnitude": 0, "ptq": 1, "cache": 2}  # chain order
CALIBRATION_KEYS = ("prompts", "num_prompts", "steps", "guidance", "selection", "weighting", "batch_size")
MODEL_KEYS = ("id", "dtype", "variant")
# [quant] / [prune] / [cache] keys are checked by the configs they build; [call] keys by check_call_table
RECIPE_TABLES = ("model", "calibration", "call", "quant", "prune", "cache")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a recipe TOML file; unknown tables, unknown [model] / [calibration] keys and values of the
    wrong type are errors naming them."""
    recipe_path = expand_home(path)  # --recipe=~/r.toml: the shell expands no ~ after "="
    if not recipe_path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        recipe = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, RecursionError) as error:  # RecursionError: arrays nested thousands deep
        raise ValueError(f"recipe {str(path)!r} is not valid TOML: {type(error).__name__}: {error}") from None
    _check_tables(path, recipe)
    for key, value in recipe.get("calibration", {}).items():
        _check_calibration_value(path, key, value)
    for key, value in recipe.get("model", {}).items():
        if not isinstance(value, str) or not value.strip():  # id = "" calibrated the demo model (until s45)
            raise ValueError(f"{path}: [model] {key} = {value!r} must be a non-empty string (a pipeline spec such as "
                             f"'zoo:fashion-sd' / a dtype such as 'bf16')")
    in_call = checked_guidance(recipe.get("call", {}).get("guidance_scale"), f"{path}: [call] guidance_scale")
    in_calibration = recipe.get("calibration", {}).get("guidance")
    if None not in (in_call, in_calibration) and in_call != in_calibration:  # calibration silently ran at one
        raise ValueError(f"{path}: [call] guidance_scale = {in_call!r} and [calibration] guidance = {in_calibration!r} "
                         f"disagree: give one of them")
    _find_prompt_file_beside(recipe_path, recipe)
    return recipe


def _find_prompt_file_beside(recipe_path: Path, recipe: dict[str, Any]) -> None:
    """Make a ``[calibration] prompts`` file path relative to the recipe absolute when the file is there (it was
    looked up from the current folder only: the recipe failed when run from elsewhere, until session 48)."""
    calibration = recipe.get("calibration", {})
    value = calibration.get("prompts")
    if not isinstance(value, str) or value in prompt_sets.names() or value.startswith("~"):
        return
    beside = recipe_path.parent / value
    if beside.is_file():
        calibration["prompts"] = str(beside.resolve())


def _check_tables(path: str | Path, recipe: dict[str, Any]) -> None:
    """Unknown tables, non-table entries where a table belongs, and unknown [model] / [calibration] keys
    are errors: a misspelt ``[quantization]`` used to be ignored, quantizing with the defaults."""
    unknown = sorted(set(recipe) - set(RECIPE_TABLES))
    if unknown:
        raise ValueError(f"{path}: unknown recipe tables or keys {unknown}; accepted tables: {list(RECIPE_TABLES)}")
    for table, value in recipe.items():
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {table} = {value!r} must be a table ([{table}] with key = value lines)")
    for table, accepted in (("model", MODEL_KEYS), ("calibration", CALIBRATION_KEYS)):
        unknown = sorted(set(recipe.get(table, {})) - set(accepted))
        if unknown:
            raise ValueError(f"{path}: unknown [{table}] keys {unknown}; accepted: {list(accepted)}")


_POSITIVE_INTS = ("num_prompts", "steps", "batch_size")


def _check_calibration_value(path: str | Path, key: str, value: Any) -> None:
    """A clear error for a [calibration] value of the wrong type (a TOML string where a count belongs)."""
    if key in _POSITIVE_INTS:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1"
    elif key == "guidance":
        ok, wanted = is_finite_number(value) \
            and value >= 0, "a finite number >= 0"  # a negative one was refused only after loading (until s46)
    elif key in ("prompts", "selection"):
        ok = isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(item, str if key == "prompts" else int) and not isinstance(item, bool) for item in value))
        wanted = "a prompt-set name or path, or a list of strings" if key == "prompts" else \
            "a selection string (e.g. 'uniform:5') or a list of step indices"
    else:
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise ValueError(f"{path}: [calibration] {key} = {value!r} must be {wanted}")


def given_prompts(settings: dict[str, Any]) -> list[str]:
    """The calibration prompts ``settings["prompts"]`` names (a set name or file, or a recipe's list of strings:
    a TypeError traceback until session 41), the first ``num_prompts`` of them."""
    value, limit = settings["prompts"], settings["num_prompts"]
    if isinstance(value, list):
        prompts = [prompt.strip() for prompt in value if prompt.strip()]
        if not prompts:
            raise ValueError("[calibration] prompts is an empty list: name at least one prompt")
        return prompts[:limit] if limit else prompts
    return prompt_sets.load(value, limit=limit)


def parse_call_args(pairs: list[str] | None) -> dict[str, Any]:
    """``--call KEY=VALUE`` flags -> pipeline keyword arguments; a VALUE that parses as JSON becomes
    that value (``512``, ``3.5``, ``true``, ``[1, 2]``), anything else stays a string."""
    kwargs: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--call {pair!r}: expected KEY=VALUE with a keyword-argument name, "
                             "e.g. --call height=512 or --call negative_prompt=")
        try:
            kwargs[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key.strip()] = text
    refuse_tensor_arguments(kwargs, "--call")
    if "true_cfg_scale" in kwargs:  # before any loading (guidance_scale: command_line_guidance)
        checked_guidance(kwargs["true_cfg_scale"], "--call true_cfg_scale")
    return kwargs


def is_tensor_argument(name: str, value: Any) -> bool:
    """Whether pipeline argument ``name`` takes only a tensor, which ``value`` from a command line or a TOML table
    cannot be: ``latents`` and ``*_embeds`` (``prompt_embeds``, ...) always, ``*_latents`` (``image_latents``) for a
    text or list value (diffusers has flags and numbers of such names: ``add_noise_to_image_latents: bool``)."""
    if name == "latents" or name.endswith("_embeds"):
        return value is not None
    return name.endswith("_latents") and isinstance(value, (str, list))


def refuse_tensor_arguments(call: dict[str, Any], where: str) -> None:
    """ValueError for a tensor-only argument given a text or number value (``--call latents=1`` failed with a
    traceback after the pipeline had loaded, session 48); ``null`` (the pipeline's default) passes."""
    given = sorted(key for key, value in call.items() if is_tensor_argument(key, value))
    if given:
        raise ValueError(f"{where} {given[0]}={call[given[0]]!r}: {given} take tensors, which {where} cannot give; "
                         "pass them from Python (call_kwargs / the pipeline call) or leave them out")


def command_line_guidance(guidance_flag: float | None, command_line_call: dict[str, Any]) -> Any:
    """The guidance the command line asks for, ``--guidance`` or ``--call guidance_scale=X`` (None: neither);
    ValueError when both are given and disagree."""
    if "guidance_scale" not in command_line_call:
        return guidance_flag
    value = checked_guidance(command_line_call["guidance_scale"], "--call guidance_scale")
    if guidance_flag is not None and guidance_flag != value:
        raise ValueError(f"--guidance {guidance_flag} and --call guidance_scale={value!r} disagree: give one of them")
    return value


def checked_guidance(value: Any, where: str) -> Any:
    """``value`` unless it is a non-finite or negative number (NaN ran SD without CFG silently, as ``--guidance nan``
    did before the flag refused it; session 45); other values are the pipeline's to judge."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and not (is_finite_number(value) and value >= 0):
        raise ValueError(f"{where}={value!r} must be a finite number >= 0")
    return value


def sampling_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """The pipeline arguments every calibration call gets: the ``[call]`` table + flags, the guidance."""
    guidance = {} if settings["guidance"] is None else {"guidance_scale": settings["guidance"]}
    return dict(settings["call"]) | guidance


def merged_settings(args: argparse.Namespace, recipe: dict[str, Any]) -> dict[str, Any]:
    """Calibration settings: recipe values overridden by flags the user gave. A recipe's
    ``uniform:K`` means at most K steps: with ``--steps`` below K it takes every step."""
    settings = {"steps": 25, "selection": "all", "weighting": "uniform", "batch_size": 1,
                "prompts": None, "num_prompts": None, "guidance": None}
    settings.update(recipe.get("calibration", {}))
    command_line_call = parse_call_args(getattr(args, "call", None))
    settings["call"] = dict(recipe.get("call", {})) | command_line_call
    check_call_table(settings["call"])
    for key in CALIBRATION_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    guidance = command_line_guidance(getattr(args, "guidance", None), command_line_call)
    if guidance is not None:  # --call guidance_scale=X beats the recipe too (its guidance replaced it, session 41)
        settings["guidance"] = guidance
    selection = str(settings["selection"])
    if getattr(args, "selection", None) is None and selection.startswith("uniform:"):
        count = selection.removeprefix("uniform:")
        if count.isdigit() and int(count) > settings["steps"]:
            settings["selection"] = "all"
    return settings


_OWN_SETTINGS = {"num_inference_steps": "--steps / [calibration] steps", "generator": "--seed",
                 "prompt": "--prompts / [calibration] prompts", "class_labels": "--prompts / [calibration] prompts",
                 "batch_size": "--batch-size / [calibration] batch_size"}


# calibrate() parameters that are pipeline arguments it passes on (with its own handling): fine in --call
_PIPELINE_ARGUMENTS_CALIBRATE_TAKES = ("guidance_scale", "negative_prompt", "num_images_per_prompt")


def check_call_table(call: dict[str, Any]) -> None:
    """Refuse ``--call`` / ``[call]`` keys that calibration sets from its own settings, and tensor-only ones."""
    refuse_tensor_arguments(call, "--call / [call]")
    clashes = sorted(set(call) & set(_OWN_SETTINGS))
    if clashes:
        raise ValueError(f"--call / [call] may not set {clashes}: calibration sets them from "
                         f"{', '.join(_OWN_SETTINGS[key] for key in clashes)}")
    own = sorted(set(call) & _calibrate_parameters())
    if own:  # they reached calibrate() itself: 'multiple values' crashes, or silently changed its settings
        raise ValueError(f"--call / [call] may not set {own}: these are settings of the calibration itself, "
                         "not pipeline arguments (use the calibrate flags or the [calibration] table)")


def _calibrate_parameters() -> set[str]:
    """``calibrate``'s own parameters that are no pipeline arguments it passes on."""
    from .calib import calibrate_parameters

    return calibrate_parameters() - set(_PIPELINE_ARGUMENTS_CALIBRATE_TAKES)


def build_collectors(pipe: Any, kinds: list[str], layer_glob: str | None) -> list[Any]:
    """Collectors for ``kinds`` over the adapter's eligible layers (optionally glob-filtered)."""
    from .calib import FeatureChangeProbe, HessianCollector, RangeObserver

    unknown = sorted(set(kinds) - set(COLLECTOR_KINDS))
    if unknown or not kinds:
        raise ValueError(f"--collect {','.join(kinds)!r}: accepted kinds are {', '.join(COLLECTOR_KINDS)}")
    if layer_glob is not None and not set(kinds) & {"ranges", "hessian"}:  # ignored silently (until session 48)
        raise ValueError(f"--layers {layer_glob!r} selects the layers of --collect ranges / hessian; "
                         f"--collect {','.join(kinds)} probes every block: drop --layers or add ranges / hessian")
    adapter = get_adapter(pipe)
    layers = [name for name in adapter.eligible_layers() if fnmatch.fnmatch(name, layer_glob or "*")]
    if not layers and set(kinds) & {"ranges", "hessian"}:  # features read blocks, not layers
        from .artifact import applied_techniques

        why = (f"--layers {layer_glob!r} matches no eligible (Linear / Conv2d) layer of {adapter.family}"
               if layer_glob else f"{adapter.family} has no eligible (Linear / Conv2d) layer")
        applied = applied_techniques(pipe)
        raise ValueError(why + (f"; its layers were replaced by {applied}: collect statistics on the base model"
                                if applied else ""))
    factories = {"ranges": lambda: RangeObserver(layers, per_step=True),
                 "hessian": lambda: HessianCollector(layers),
                 "features": lambda: FeatureChangeProbe.for_blocks(adapter)}
    return [factories[kind]() for kind in kinds]


def statistics_tensors(collectors: list[Any]) -> dict[str, torch.Tensor]:
    """Flatten collector results into named tensors for a safetensors file."""
    from .calib import FeatureChangeProbe, HessianCollector, RangeObserver

    tensors: dict[str, torch.Tensor] = {}
    for collector in collectors:
        for name in collector.module_names:
            if isinstance(collector, RangeObserver):
                tensors[f"range/{name}"] = torch.tensor(collector.range(name))
                per_step = collector.step_ranges(name)
                tensors[f"step_range/{name}"] = torch.tensor([[s, lo, hi] for s, (lo, hi) in per_step.items()],
                                                             dtype=torch.float32).reshape(-1, 3)
            elif isinstance(collector, HessianCollector):
                tensors[f"hessian/{name}"] = collector.hessian(name)
            elif isinstance(collector, FeatureChangeProbe):
                change = collector.mean_change(name)
                # (steps, 2) also when empty (one selected step: shape (0,) until session 48)
                tensors[f"feature_change/{name}"] = torch.tensor([[s, c] for s, c in change.items()],
                                                                 dtype=torch.float32).reshape(-1, 2)
    return tensors


def parse_methods(text: str) -> list[str]:
    """``--method``: ``stats``, or a chain of techniques applied in order to one pipeline and saved as
    one artifact: at most one pruning method, then ``ptq``, then ``cache`` (e.g. ``obs,ptq,cache``)."""
    methods = [method.strip() for method in text.split(",") if method.strip()]
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--method {text!r}: accepted methods are {', '.join(METHODS)}, "
                         "or a chain of them such as obs,ptq,cache")
    stages = [_STAGES[method] for method in methods]
    if len(methods) > 1 and ("stats" in methods or stages != sorted(set(stages))):
        raise ValueError(f"--method {text!r}: a chain applies at most one of {', '.join(PRUNE_METHODS)}, then "
                         "ptq, then cache, in that order, each once (stats is not chained)")
    return methods


def calibrate_from_args(args: argparse.Namespace) -> str:
    """Run ``diffusion-accel calibrate`` and return its printed summary (see :func:`run_calibrate`)."""
    return run_calibrate(args)["summary"]


def run_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Statistics (``--method stats``) or an artifact of the technique chain in ``--method``.

    Returns ``{"summary": text, "methods", "seconds": {method: wall s}, "out": folder}``; an artifact
    folder also gets ``calibration.json`` (base spec, settings, prompts, wall times).
    """
    methods = parse_methods(args.method)
    _check_flags_apply(args, methods)
    recipe = load_recipe(args.recipe) if args.recipe else {}
    configs = technique_configs(methods, args, recipe)  # bad presets/options fail before any loading
    settings = merged_settings(args, recipe)  # and bad --call keys
    cache_table = _cache_table(args, recipe) if "cache" in methods else {}
    if "cache" in methods:
        _check_cache_table(cache_table)
    runs_pipeline = _check_calibration_flags_read(args, methods, configs, cache_table)
    _check_calibration_settings(settings, args.seed)
    _check_teacache_fit_steps(cache_table, settings["steps"])
    model = recipe.get("model", {})
    spec = args.pipe if args.pipe is not None else (model.get("id") or default_demo_spec())
    _check_out_is_not_the_base(args.out, spec, methods)
    if args.device is not None:
        check_device(args.device)  # before the (minutes-long) load, whichever loader runs
    dtype = args.dtype or (model.get("dtype") if args.pipe is None else None)  # the recipe's dtype is its model's
    # so are its weight files; --variant "" asks for the standard files (it fell back to the recipe's, until s48)
    variant = args.variant if args.variant is not None else (model.get("variant") if args.pipe is None else None)
    pipe = load_pipeline(spec, dtype=dtype, device=args.device, variant=variant)
    _check_chain_fits(pipe, methods)
    if "cache" in methods:  # a method-less table meets --cache-method naming the pipeline's default (until s45: lost)
        cache_table = _cache_table(args, recipe, pipe)
        if cache_table.get("method"):
            _check_cache_table(cache_table)
            _check_cache_fits(pipe, cache_table)
        else:
            _check_default_cache_table(pipe, cache_table)
    prompt_list = (given_prompts(settings) if settings["prompts"] is not None  # [] ran the defaults (until s45)
                   else prompt_sets.for_pipeline(pipe, limit=settings["num_prompts"]))
    if "cache" in methods:
        _check_teacache_fit_points(pipe, cache_table, settings, len(prompt_list))
    noted_settings = {**settings, "seed": args.seed}  # calibration.json records the seed (none until session 48)
    if methods == ["stats"]:
        collectors = build_collectors(pipe, [k.strip() for k in (args.collect or DEFAULT_COLLECT).split(",")
                                             if k.strip()], args.layers)
        calib = _run_calibration(pipe, prompt_list, settings, args.seed, collectors, store_trajectory=False)
        _write_statistics(Path(args.out), spec, pipe, noted_settings, calib, collectors)
        return {"summary": calib.summary() + f"\nstatistics written to {args.out}/", "methods": methods,
                "seconds": {}, "out": args.out}
    summaries, seconds = _apply_chain(pipe, methods, configs, args, recipe, prompt_list, settings)
    noted_settings["step_weighting"] = _step_weightings(methods, configs, settings["weighting"])
    from .artifact import save

    base_notes = _artifact_notes_of(spec)  # read first: --out may be that artifact's folder
    save(pipe, args.out)  # a failed save leaves the older artifact whole, and its calibration.json with it
    _write_artifact_notes(Path(args.out), spec, methods, noted_settings, prompt_list, seconds, base_notes,
                          runs_pipeline)
    summary = "\n".join(summaries) + f"\nartifact (safetensors + manifest.json) written to {args.out}/"
    return {"summary": summary, "methods": methods, "seconds": seconds, "out": args.out}


DEFAULT_COLLECT = "ranges,features"
# calibrate flags -> the --method entries that read them (a flag for a method not run was ignored silently)
_FLAG_METHODS = {"layers": ("stats",), "collect": ("stats",), "preset": ("ptq",),
                 "sparsity": PRUNE_METHODS, "pattern": PRUNE_METHODS, "scope": PRUNE_METHODS,
                 "allocation": PRUNE_METHODS, "cache_method": ("cache",), "budget": ("cache",),
                 "interval": ("cache",), "forecast": ("cache",), "forecast_target": ("cache",),
                 "search_blocks": ("cache",),
                 # the calibration's (a cache method draws its own steps and weights none; batches: a search's)
                 "selection": ("stats", "ptq", *PRUNE_METHODS), "weighting": ("stats", "ptq", *PRUNE_METHODS),
                 "batch_size": ("stats", "ptq", *PRUNE_METHODS, "cache")}


def _check_flags_apply(args: argparse.Namespace, methods: list[str]) -> None:
    """Refuse technique flags that no method of this run reads (``--layers`` looked like it limited
    quantization; it only filters ``--method stats``)."""
    idle = [f"--{flag.replace('_', '-')}" for flag, readers in _FLAG_METHODS.items()
            if getattr(args, flag, None) is not None and not set(readers) & set(methods)]
    if idle:
        users = {f"--{flag.replace('_', '-')}": "/".join(readers) for flag, readers in _FLAG_METHODS.items()}
        readers = "; ".join(f"{flag} is read by --method {users[flag]}" for flag in idle)
        raise ValueError(f"{', '.join(idle)} not used by --method {','.join(methods)} ({readers}); drop them or "
                         f"add the method")


def _check_calibration_flags_read(args: argparse.Namespace, methods: list[str], configs: dict[str, Any],
                                  cache_table: dict[str, Any]) -> bool:
    """Refuse ``--selection`` / ``--weighting`` / ``--batch-size`` when no method of the chain calibrates: magnitude
    pruning (layer scope, saliency allocation) and the static caches read no inputs, yet the flags were recorded
    in calibration.json and the manifest as if they had shaped the artifact. Returns whether anything in the chain
    runs the pipeline: calibration.json says so (``--steps``, ``--prompts``, ``--guidance``, ``--call`` of a run
    that samples nothing were recorded as its calibration settings until session 45; build_artifacts.py's check
    still samples at them)."""
    calibrating = [method for method in methods if method == "stats"  # a weight-only PTQ reads none (until s49 it ran
                   or (method in configs and getattr(configs[method], "needs_calibration", True))]  # a pass anyway)
    searching = "cache" in methods and cache_table.get("method") in ("calibrated", "router")  # a TeaCache fit: one
    # prompt per call (its samples are per call and step), --batch-size was recorded and ignored until session 45
    fitting = "cache" in methods and cache_table.get("method") == "teacache" and cache_table.get("coefficients") is None
    idle = [flag for flag in ("selection", "weighting") if getattr(args, flag, None) is not None and not calibrating]
    if getattr(args, "batch_size", None) is not None and not calibrating and not searching:
        idle.append("batch_size")
    if getattr(args, "weighting", None) is not None and calibrating and not _weighs_steps(calibrating, configs):
        raise ValueError(f"--weighting not used by --method {','.join(methods)}: no method of it weighs calibration "
                         f"steps (pruning's OBS / Wanda Hessians, PTQ's output_mse scales and GPTQ do); drop it")
    if idle:
        names = ", ".join(f"--{flag.replace('_', '-')}" for flag in idle)
        raise ValueError(f"{names} not used by --method {','.join(methods)}: nothing in it calibrates (weight-only "
                         f"PTQ with max scales and nearest rounding, magnitude "
                         f"pruning by layer or saliency and the deepcache / block / first_block / delta / "
                         f"encoder_propagation caches read no inputs; a calibrated or router cache reads "
                         f"--batch-size, a fitted TeaCache runs one prompt per call); drop them")
    return bool(calibrating or searching or fitting)


def _weighs_steps(calibrating: list[str], configs: dict[str, Any]) -> bool:
    """Whether a calibrating method of the chain reads the steps' weights (W8A8's ranges do not: --weighting was
    recorded and changed nothing until session 49)."""
    return any(method == "stats" or method in PRUNE_METHODS or getattr(configs.get(method), "reads_step_weights", False)
               for method in calibrating)


def _step_weightings(methods: list[str], configs: dict[str, Any], weighting: Any) -> dict[str, Any]:
    """The per-step weighting each method of the chain applied, for calibration.json: pruning re-weights its Hessians
    with its own config's (OBS-Diff's log-decrease by default), PTQ's output-MSE scales and GPTQ read the pass's
    ``weighting``; methods that weigh no step are left out (the pass's "uniform" was the only one recorded, beside
    OBS's log-decrease, until session 50)."""
    weightings = {}
    for method in methods:
        config = configs.get(method)
        if method in PRUNE_METHODS and config.needs_calibration:
            weightings[method] = config.weighting
        elif getattr(config, "reads_step_weights", False):
            weightings[method] = weighting
    return weightings


def _check_calibration_settings(settings: dict[str, Any], seed: int) -> None:
    """Selection, weighting, seed and prompt file checked before the pipeline loads (each failed after it).
    The selection is checked against the most calls a scheduler makes: Heun-like ones run 2N - 1, PNDM with PRK
    steps N + 9 (13 at N = 4, which 2N refused until session 46); ``calibrate`` checks the real count."""
    from .calib import resolve_weights, select_steps

    selection = settings["selection"]
    chosen = _selection(selection)
    try:
        select_steps(max(2 * settings["steps"], settings["steps"] + 9), chosen)
    except (TypeError, ValueError) as error:  # TypeError: a non-int index (a traceback until s46)
        raise ValueError(f"--selection / [calibration] selection {selection!r}: {error}") from None
    resolve_weights(settings["steps"], settings["weighting"])
    if seed < 0:
        raise ValueError(f"--seed must be an int >= 0, got {seed}")
    if settings["prompts"] is not None:
        given_prompts(settings)


def _check_out_is_not_the_base(out: str, spec: str, methods: list[str]) -> None:
    """Writing the artifact into the base model's folder left neither loadable by spec; a folder ``save``
    refuses (a diffusers pipeline, another tool's manifest.json) is refused before the calibration."""
    base = expand_home(spec.rpartition("+")[0] if "+" in spec and not Path(spec).exists() else spec)
    same = base.is_dir() and expand_home(out).resolve() == base.resolve()
    if same and not (base / "manifest.json").is_file():  # an artifact given as --pipe may be replaced, as save allows
        raise ValueError(f"--out {out!r} is the base pipeline's folder; write the artifact to another folder")
    written = ("calibration.json", "statistics.safetensors") if methods == ["stats"] else ("calibration.json",)
    problem = (None if methods == ["stats"] else save_folder_problem(expand_home(out))) or folders_named_like(
        expand_home(out), written)
    if problem:
        raise ValueError(f"--out {out!r}: {problem}")
    # statistics into an artifact's folder replaced the artifact's calibration.json (how it was made)
    if methods == ["stats"] and (expand_home(out) / "manifest.json").is_file():
        raise ValueError(f"--out {out!r} holds an artifact (manifest.json): statistics would replace its "
                         f"calibration.json and sit beside it; write them to another folder")
    other = _other_commands_output(expand_home(out), methods)
    if other:  # until session 45 an artifact replaced the statistics' calibration.json, or the demo's
        raise ValueError(f"--out {out!r} holds {other}: this run's calibration.json would replace the one beside it; "
                         f"write to another folder")


def _other_commands_output(folder: Path, methods: list[str]) -> str | None:
    """What another command left in ``folder`` whose calibration.json this run would replace: statistics (for an
    artifact), or a calibration.json not of ``calibrate`` (the demo's), else None."""
    if methods != ["stats"] and (folder / "statistics.safetensors").is_file():
        return "statistics.safetensors from diffusion-accel calibrate --method stats"
    notes = folder / "calibration.json"
    if not notes.is_file():
        return None
    kind = (read_json_object(notes) or {}).get("format")
    return None if kind == CALIBRATION_FORMAT else "a calibration.json of another command (the demo's)"


def _artifact_notes_of(spec: str) -> dict[str, Any] | None:
    """The ``calibration.json`` of the artifact folder ``spec`` names (``ARTIFACT`` or ``BASE+ARTIFACT``), or None."""
    folder = expand_home(spec.rpartition("+")[2] if "+" in spec and not Path(spec).exists() else spec)
    if not (folder / "manifest.json").is_file():
        return None
    return read_json_object(folder / "calibration.json")


def _rebuilding_chain(applied: list[str], observing: list[str]) -> str:
    """The ``--method`` chain that rebuilds an artifact's techniques (``applied``) with ``observing`` from its base,
    ending in the cache: advising ``ptq,cache`` for an artifact holding pruning and a cache dropped its pruning."""
    pruning = "<its pruning method: obs, wanda or magnitude>"
    earlier = [pruning if technique == "prune" else technique for technique in applied if technique != "cache"]
    if any(_STAGES[method] == 0 for method in observing):
        earlier = [method for method in earlier if method != pruning]
    chain = sorted(dict.fromkeys(observing + earlier), key=lambda method: 0 if method == pruning else _STAGES[method])
    return ",".join(chain + ["cache"])


def _check_chain_fits(pipe: Any, methods: list[str]) -> None:
    """An artifact loaded as the base already holds techniques: a method that must come before them in
    the chain (pruning or PTQ after PTQ) fails after the calibration pass otherwise."""
    from .artifact import applied_techniques

    observing = [method for method in methods if method != "cache"]
    if "cache" in applied_techniques(pipe) and observing:  # calibrate refused it after loading, with Python advice
        advice = ("run it on that artifact's own base (its manifest's base source)" if methods == ["stats"] else
                  f"give that artifact's own base (its manifest's base source) and --method "
                  f"{_rebuilding_chain(applied_techniques(pipe), observing)}")  # stats,cache was refused (s48)
        raise ValueError(f"the base pipeline is an artifact with a feature cache; --method {','.join(observing)} "
                         f"observes the uncached denoiser: {advice}")
    applied = [technique for technique in applied_techniques(pipe) if technique != "cache"]
    late = {"prune": 0, "ptq": 1}
    done = max((late[technique] for technique in applied if technique in late), default=-1)
    blocked = [method for method in methods if method != "stats" and _STAGES[method] <= done and method != "cache"]
    if blocked:
        raise ValueError(f"the base pipeline already has {applied} applied; --method {','.join(blocked)} must come "
                         "before them (the order is pruning, then ptq, then cache): start from the original model")


def _cache_table(args: argparse.Namespace, recipe: dict[str, Any], pipe: Any = None) -> dict[str, Any]:
    """The ``[cache]`` table with the cache flags over it (the recipe's keys only for its own method: a table naming
    none is for ``pipe``'s default method, and kept when ``--cache-method`` names that one; before the pipeline is
    loaded it is left out of the checks)."""
    from .cache.recipe import default_cache_table

    table = dict(recipe.get("cache", {}))
    if args.cache_method is not None and args.cache_method != table.get("method"):
        default = None if table.get("method") or pipe is None else default_cache_table(pipe)["method"]
        if args.cache_method != default:
            table = {}  # the recipe's keys belong to its own method
    flags = (("method", args.cache_method), ("budget", args.budget), ("interval", args.interval),
             ("forecast", args.forecast), ("forecast_target", args.forecast_target),
             ("search_blocks", args.search_blocks))
    return table | {key: value for key, value in flags if value is not None}


def _check_cache_table(table: dict[str, Any]) -> None:
    """A ``[cache]`` table naming its method is checked before loading (it failed after the chain's
    calibration, pruning and quantization); one without a method gets the pipeline's default later, and keys
    no default method takes are refused now."""
    from .cache.recipe import check_table, check_table_without_method

    if table.get("method"):
        check_table(table)
    else:
        check_table_without_method(table)


def _check_teacache_fit_steps(table: dict[str, Any], steps: Any) -> None:
    """A TeaCache whose coefficients are fitted needs changes between steps: ``--steps 1`` was refused only after
    the chain's calibration, pruning and PTQ had run (session 49 review)."""
    fitted = table.get("method") == "teacache" and table.get("coefficients") is None
    if fitted and isinstance(steps, int) and steps < 2:
        raise ValueError(f"--steps {steps}: fitting TeaCache's coefficients needs at least 2 denoising steps (the "
                         f"changes between steps); raise --steps or give [cache] coefficients")


def _check_teacache_fit_points(pipe: Any, table: dict[str, Any], settings: dict[str, Any], num_prompts: int) -> None:
    """A TeaCache fit that cannot get the points its degree needs, refused before the chain runs (it was refused after
    the chain's pruning and PTQ, session 49 review): at most one change per denoiser call after the first, per
    prompt and separate CFG call (two only for Flux's true CFG: batched CFG and FLUX-dev's embedded guidance give
    one, and counting two let a 5-point run reach the chain, session 50 review)."""
    from .cache.teacache_fit import POINTS_PER_COEFFICIENT
    from .calib.schedule import denoiser_steps

    if table.get("method") != "teacache" or table.get("coefficients") is not None:
        return
    degree, call = table.get("degree", 4), settings["call"]
    calls = denoiser_steps(pipe, settings["steps"], call.get("timesteps"), call.get("sigmas"))
    branches = _separate_cfg_calls(pipe, call)
    most, needed = num_prompts * (calls - 1) * branches, POINTS_PER_COEFFICIENT * (degree + 1)
    if most < needed:
        raise ValueError(f"fitting TeaCache's degree-{degree} polynomial needs at least {needed} calibration points; "
                         f"{num_prompts} prompt(s) x {calls} denoiser calls{' x 2 CFG calls' if branches == 2 else ''} "
                         f"give at most {most}: raise --num-prompts or --steps, lower [cache] degree, or give [cache] "
                         f"coefficients")


def _separate_cfg_calls(pipe: Any, call: dict[str, Any]) -> int:
    """Denoiser calls per step and prompt: 2 where the pipeline runs true CFG as separate calls (Flux's
    ``true_cfg_scale`` > 1 with a negative prompt, from ``call`` over its call defaults), else 1."""
    import inspect

    from .pipeline_defaults import call_defaults

    parameters = inspect.signature(type(pipe).__call__).parameters
    if "true_cfg_scale" not in parameters:
        return 1
    arguments = {**call_defaults(pipe), **call}
    scale = arguments.get("true_cfg_scale", parameters["true_cfg_scale"].default)
    negative = arguments.get("negative_prompt", arguments.get("negative_prompt_embeds"))
    return 2 if isinstance(scale, (int, float)) and scale > 1 and negative is not None else 1


def _check_cache_fits(pipe: Any, table: dict[str, Any]) -> None:
    """The method a ``[cache]`` table names, checked against the loaded pipeline's denoiser before the chain runs:
    DeepCache on a transformer, a router or TeaCache on a UNet failed after the calibration, pruning and PTQ."""
    from .cache.recipe import check_table_fits

    check_table_fits(pipe, table)


def _check_default_cache_table(pipe: Any, table: dict[str, Any]) -> None:
    """A ``[cache]`` table naming no method, checked against the default method of the loaded pipeline before the
    chain runs: a key only the other default takes (``forecast_target`` on a UNet, ``branch`` on a transformer)
    was refused after the chain's calibration, pruning and quantization."""
    from .cache.recipe import check_table, check_table_fits, default_cache_table

    check_table(default_cache_table(pipe) | table)
    check_table_fits(pipe, default_cache_table(pipe) | table)  # a branch out of range (until s46: after the chain)


def _apply_chain(pipe: Any, methods: list[str], configs: dict[str, Any], args: argparse.Namespace,
                 recipe: dict[str, Any], prompt_list: list,
                 settings: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
    """Apply ``methods`` in order; one calibration pass serves pruning and PTQ (PTQ replays its stored
    trajectory when it comes first, else re-runs it through the pruned pipeline). ``seconds`` per
    method: wall time, the shared pass counted in the first method that needs it."""
    summaries, seconds, calib = [], {}, None
    for method in methods:
        start = time.perf_counter()
        if method == "cache":
            summaries.append(_apply_cache(pipe, args, recipe, prompt_list, settings))
        else:
            if calib is None and getattr(configs[method], "needs_calibration", True):  # magnitude reads no inputs
                calib = _run_calibration(pipe, prompt_list, settings, args.seed, [],
                                         store_trajectory=method == "ptq")
            summaries.append(_apply_technique(pipe, configs[method], calib))
        seconds[method] = round(time.perf_counter() - start, 2)
    return summaries, seconds


def _run_calibration(pipe: Any, prompt_list: list, settings: dict[str, Any], seed: int,
                     collectors: list[Any], store_trajectory: bool) -> Any:
    from .calib import calibrate

    return calibrate(pipe, prompt_list, num_inference_steps=settings["steps"], collectors=collectors,
                     steps=_selection(settings["selection"]), weighting=settings["weighting"],
                     batch_size=settings["batch_size"], seed=seed, store_trajectory=store_trajectory,
                     **sampling_kwargs(settings))


def technique_configs(methods: list[str], args: argparse.Namespace, recipe: dict[str, Any]) -> dict[str, Any]:
    """The ``PTQConfig`` / ``PruneConfig`` of each quantization or pruning method in ``methods``, from
    the recipe's ``[quant]`` / ``[prune]`` table + flags; building them validates them."""
    from .prune import PruneConfig
    from .prune.configs import parse_nm
    from .quant import PTQConfig
    from .quant.configs import check_calibration_choices

    configs: dict[str, Any] = {}
    for table in ("quant", "prune"):
        _refuse_calibration_options(table, recipe.get(table, {}))
    for method in methods:
        if method == "ptq":
            options = dict(recipe.get("quant", {}))
            recipe_preset = options.pop("preset", "w8a8")  # popped always: with --preset it reached PTQConfig
            preset = args.preset or recipe_preset
            if args.preset is not None and str(args.preset).lower() != str(recipe_preset).lower():
                options = _without_preset_keys(options, args.preset)  # the recipe's tweaks of its own preset stay
            configs[method] = _built("quant", PTQConfig.preset, preset, **options)
            check_calibration_choices(configs[method])  # before the chain's calibration, not after it
        elif method not in ("cache", "stats"):
            options = {**_calibration_weighting(recipe), **recipe.get("prune", {})}
            if options.pop("method", method) != method:  # --method decided silently (until s46)
                raise ValueError(f"recipe [prune] method {recipe['prune']['method']!r} differs from --method's "
                                 f"{method!r}: --method names the pruning method; drop the key or make them equal")
            options["method"] = method
            if args.pattern is not None and args.sparsity is None and parse_nm(str(args.pattern)) is not None:
                options.pop("sparsity", None)  # an N:M --pattern sets it: the recipe's sparsity conflicted
            flags = (("sparsity", args.sparsity), ("pattern", args.pattern), ("weighting", args.weighting),
                     ("scope", getattr(args, "scope", None)), ("allocation", getattr(args, "allocation", None)))
            configs[method] = _built("prune", PruneConfig, **options | {k: v for k, v in flags if v is not None})
    return configs


def _without_preset_keys(options: dict[str, Any], preset: Any) -> dict[str, Any]:
    """The recipe's ``[quant]`` keys without those ``--preset`` sets, with a warning naming them: the flag wins, as
    every flag does over the recipe (``weights = "int8"`` turned ``--preset w4a16`` into int8 weights, silently,
    until session 50). Keys the preset leaves alone (``exclude``, ``act_method`` ...) still apply."""
    from .quant.configs import PRESETS

    preset_fields = PRESETS.get(preset.lower(), {}) if isinstance(preset, str) else {}
    overridden = sorted(key for key in options if key in preset_fields  # TOML lists against the preset's tuples
                        and _as_tuples(options[key]) != _as_tuples(preset_fields[key]))
    if overridden:
        warnings.warn(f"--preset {preset} sets {', '.join(f'{key}={preset_fields[key]!r}' for key in overridden)}: the "
                      f"recipe's [quant] {', '.join(f'{key} = {options[key]!r}' for key in overridden)} "
                      f"{'is' if len(overridden) == 1 else 'are'} ignored", stacklevel=2)
    return {key: value for key, value in options.items() if key not in overridden}


def _as_tuples(value: Any) -> Any:
    """``value`` with lists as tuples, at every depth (a TOML array against a preset's tuple compared unequal)."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


# where the command takes what a config's own calibration options set (the chain calibrates once, for all)
CALIBRATION_OPTIONS = {"calib_prompts": "[calibration] num_prompts / prompts", "calib_num_steps": "[calibration] steps",
                       "calib_steps": "[calibration] selection", "calib_guidance_scale": "[calibration] guidance",
                       "calib_kwargs": "[call]"}


def _refuse_calibration_options(table: str, options: dict[str, Any]) -> None:
    """A ``[quant]`` / ``[prune]`` ``calib_*`` key: the command's one calibration ignored it while the manifest
    recorded it as used (until session 45)."""
    given = sorted(key for key in options if key.startswith("calib_"))
    if given:
        instead = "; ".join(f"{key}: {CALIBRATION_OPTIONS.get(key, '[calibration]')}" for key in given)
        raise ValueError(f"[{table}] {given}: the command calibrates once for every technique of its chain, from "
                         f"the [calibration] and [call] tables and their flags; use {instead}")


def _calibration_weighting(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``[calibration] weighting`` as a PruneConfig option: pruning re-weights its Hessians
    over the steps with its own ``weighting``, so ``--weighting`` and the recipe's were ignored there (a
    ``[prune] weighting`` still wins over it)."""
    weighting = recipe.get("calibration", {}).get("weighting")
    return {} if weighting is None else {"weighting": weighting}


def _built(table: str, factory: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """``factory(*args, **options)`` for a recipe table: a wrong type or unknown key (TypeError, e.g.
    ``sparsity = "0.5"``) becomes a ValueError naming the table, which the CLI prints as one line."""
    try:
        return factory(*args, **options)
    except TypeError as error:
        raise ValueError(f"recipe [{table}] / flags: {error}") from None


def _apply_technique(pipe: Any, config: Any, calib: Any) -> str:
    """Quantize (a ``PTQConfig``) or prune (a ``PruneConfig``) with the shared calibration."""
    from .prune import PruneConfig, prune_, prune_report
    from .quant import quantize_, summary

    if isinstance(config, PruneConfig):
        prune_(pipe, config, calib=calib, progress=True)
        return prune_report(pipe).summary()
    quantize_(pipe, config, calib=calib, progress=True)
    return summary(pipe)


def _apply_cache(pipe: Any, args: argparse.Namespace, recipe: dict[str, Any], prompt_list: list,
                 settings: dict[str, Any]) -> str:
    """Enable the cache of the recipe's ``[cache]`` table (+ flags), calibrating it on the prompts
    first where the method needs it (a calibrated schedule, TeaCache's polynomial)."""
    from .cache import enable_cache, remove_cache
    from .cache.configs import config_to_dict
    from .cache.recipe import config_from_table, default_cache_table

    table = _cache_table(args, recipe, pipe)
    remove_cache(pipe)  # an artifact's cache is replaced; calibrating a schedule needs the uncached model
    if not table.get("method"):
        table = default_cache_table(pipe) | table
    config = config_from_table(pipe, table, prompt_list, settings["steps"], seed=args.seed,
                               batch_size=settings["batch_size"], progress=True, **sampling_kwargs(settings))
    enable_cache(pipe, config)
    return f"cache: {json.dumps(config_to_dict(config))}"


def _selection(value: Any) -> Any:
    """``"0,5,10"`` -> [0, 5, 10]; names such as "all" or "uniform:K" pass through; ``"0,,3"`` is a
    ValueError naming it (it was int()'s "invalid literal ... ''")."""
    if isinstance(value, str) and value.replace(",", "").replace(" ", "").isdigit():
        parts = [part.strip() for part in value.split(",")]
        if not all(parts):
            raise ValueError(f"--selection {value!r}: expected comma-separated step indices such as '0,5,10'")
        return [int(part) for part in parts]
    return value


def _write_statistics(out: Path, spec: str, pipe: Any, settings: dict[str, Any], calib: Any,
                      collectors: list[Any]) -> None:
    """``statistics.safetensors`` and its ``calibration.json``, staged and swapped in together (the JSON
    last, as an artifact's manifest): a failure between them left new statistics under the old settings."""
    tensors = {k: v.contiguous() for k, v in statistics_tensors(collectors).items()}
    manifest = {"format": CALIBRATION_FORMAT, "model": spec, "pipeline": type(pipe).__name__,
                "base_fingerprint": base_fingerprint(pipe), "loaded": loaded_as(pipe), "settings": settings,
                "selected_steps": list(calib.selected_steps), "collectors": [c.describe() for c in collectors],
                "summary": calib.summary().splitlines()}
    out.mkdir(parents=True, exist_ok=True)
    with StagedWrite(out) as staged:
        staged.write("statistics.safetensors", lambda path: save_file(tensors, str(path)))
        staged.commit("calibration.json", json.dumps(manifest, indent=2, default=str))


def _write_artifact_notes(out: Path, spec: str, methods: list[str], settings: dict[str, Any], prompt_list: list,
                          seconds: dict[str, float], base_notes: dict[str, Any] | None = None,
                          calibrated: bool = True) -> None:
    """``calibration.json`` beside the artifact: how it was made (not read by ``load``); on an artifact base, that
    artifact's own notes under ``base_artifact`` (a cache overlaid into its folder replaced them). ``calibrated``:
    whether anything in the chain ran the pipeline with ``settings`` and the prompts."""
    notes = {"format": CALIBRATION_FORMAT, "model": spec, "methods": methods, "settings": settings,
             "num_prompts": len(prompt_list), "calibrated": calibrated, "seconds": seconds}
    if base_notes is not None:
        notes["base_artifact"] = base_notes
    StagedWrite(out).commit("calibration.json", json.dumps(notes, indent=2, default=str))  # old notes out first
