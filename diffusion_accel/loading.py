"""Turn a pipeline spec string into a diffusers pipeline (CLI, benchmarks, demo).

Specs: ``zoo:NAME`` (a bundled reference pipeline), ``tiny:FAMILY`` (a tiny random pipeline built
from config), a local ``save_pretrained`` folder (one holding a zoo pipeline, the shipped folder, a
copy or a training export, loads as ``zoo.load`` does: with its call settings and native size), or a
Hugging Face hub id (needs internet); and
accelerated pipelines: an artifact folder written by ``save`` / ``diffusion-accel calibrate`` (its
base is loaded from the spec its manifest records, then the artifact is applied), or
``BASE+ARTIFACT`` to name the base explicitly (e.g. ``org/model+runs/w8a8``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .paths import expand_home, read_json_object

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map "fp32"/"bf16"/"fp16" (or a torch.dtype, or None) to a torch.dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def load_pipeline(spec: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                  variant: str | None = None) -> Any:
    """Load the pipeline named by ``spec`` (see module docstring), optionally cast and moved.

    ``variant`` (e.g. "fp16") reads a hub model's or folder's variant weight files
    (``model.fp16.safetensors``), as diffusers' ``from_pretrained(variant=...)``: half the download of
    the fp32 files for a half-precision run; an artifact records it for its base. ``""`` asks for the standard
    files, also under an artifact whose base recorded a variant (None: the recorded one)."""
    from .artifact import record_source

    torch_dtype = parse_dtype(dtype)
    target = None if device is None else check_device(device)  # before minutes of loading
    spec = _checked_spec(spec)
    variant = _checked_variant(variant)
    base_spec, artifact = split_artifact_spec(spec)
    if artifact is not None:
        return _load_with_artifact(base_spec, artifact, torch_dtype, variant, target)
    variant = variant or None  # "": the standard files
    pipe = _load_by_kind(spec, torch_dtype, variant)
    if torch_dtype is not None and getattr(pipe, "dtype", None) != torch_dtype:
        pipe.to(dtype=torch_dtype)
    if torch_dtype == torch.bfloat16:
        float32_pixel_outputs(pipe)
    record_source(pipe, _portable_spec(spec), torch_dtype, variant)
    if target is not None:
        pipe.to(target)
    return pipe


def loaded_as(pipe: Any) -> dict[str, str]:
    """How ``pipe``'s denoiser is loaded, for notes beside statistics and reports: its ``dtype`` and ``device``
    (torch's names) and, when it came from variant weight files, the ``variant`` (bf16 and float32 statistics
    differ and their notes were identical until session 48)."""
    from .arch.registry import find_any_denoiser
    from .artifact import pipeline_source

    weight = next(find_any_denoiser(pipe)[1].parameters(), None)
    loaded = {} if weight is None else {"dtype": str(weight.dtype).removeprefix("torch."), "device": str(weight.device)}
    variant = (pipeline_source(pipe) or {}).get("variant")
    return loaded if variant is None else {**loaded, "variant": variant}


_FLOAT32_OUTPUTS_ATTR = "_diffusion_accel_float32_outputs"


def float32_pixel_outputs(pipe: Any) -> None:
    """For a bf16 pipeline without a VAE (DDPM), whose denoiser's samples go straight to numpy, which has no
    bf16: cast the denoiser's floating inputs to its dtype and its ``sample`` output to float32 (once; the
    denoiser still runs in bf16). ``--dtype bf16`` on DDPM failed after every image was generated (until
    session 48 outside the demo's bf16 variant)."""
    from .arch.registry import UnsupportedModelError, find_any_denoiser

    if getattr(pipe, "vae", None) is not None:
        return
    try:
        denoiser = find_any_denoiser(pipe)[1]
    except UnsupportedModelError:
        return
    if getattr(denoiser, _FLOAT32_OUTPUTS_ATTR, False):
        return

    def cast_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def cast(value: Any) -> Any:
            return value.to(module.dtype) if torch.is_tensor(value) and value.is_floating_point() else value
        return tuple(cast(value) for value in args), {key: cast(value) for key, value in kwargs.items()}

    def float_output(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0].float(), *output[1:])
        output.sample = output.sample.float()
        return output

    denoiser.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    denoiser.register_forward_hook(float_output, with_kwargs=True)
    object.__setattr__(denoiser, _FLOAT32_OUTPUTS_ATTR, True)


def _checked_variant(variant: Any) -> str | None:
    """``variant`` as given (blank: ``""``, the standard files; the CLI's ``--variant ''`` was refused in every
    command but calibrate until session 48), or a ValueError naming it."""
    if variant is None or (isinstance(variant, str) and "/" not in variant):
        return variant if variant is None or variant.strip() else ""
    raise ValueError(f"variant {variant!r} must be a weight-file variant name such as 'fp16', '' for the standard "
                     f"files, or None")


def _checked_spec(spec: Any) -> str:
    """``spec`` with ``~`` expanded, a ``pathlib.Path`` (any ``os.PathLike``) as its string; a ValueError for an
    empty or non-string one (``''`` reached the hub's 'Repo id must be ...' error)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"pipeline spec {spec!r} is empty; accepted: zoo:NAME, tiny:FAMILY, a local "
                         "save_pretrained folder, an artifact folder, BASE+ARTIFACT, or a hub id like 'org/model'")
    return str(expand_home(spec)) if spec.startswith("~") else spec


def _portable_spec(spec: str) -> str:
    """What an artifact records as its base: a local folder as an absolute path (a relative one could not
    be found from another working directory), anything else as given."""
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def process_device(device: torch.device) -> torch.device:
    """An accelerator without an index (``cuda``) as this launched process's own (``cuda:LOCAL_RANK``) when a
    launcher started several (``WORLD_SIZE`` > 1): every rank of ``torchrun ... --device cuda`` loaded onto
    cuda:0 (until session 53; accelerate picks the local device only when its state is made, after loading)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if device.type == "cpu" or device.index is not None or not launched or "LOCAL_RANK" not in os.environ:
        return device
    return torch.device(device.type, int(os.environ["LOCAL_RANK"]))


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ValueError naming it when this torch cannot use it (a CUDA
    device on a CPU-only build, or an index past the GPUs present), before anything is loaded onto it."""
    try:
        parsed = process_device(torch.device(device))
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r} ({error}); accepted: cpu, cuda, cuda:N, ...") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            found = "no CUDA device" if count == 0 else f"{count} CUDA device(s): cuda:0..cuda:{count - 1}"
            raise ValueError(f"device {device!r} is not available: torch {torch.__version__} sees {found}; "
                             f"use 'cpu'")
    elif parsed.type != "cpu":  # mps / xpu on a build without them failed in pipe.to after the load (until s49)
        try:
            torch.empty(0, device=parsed)
        except (RuntimeError, NotImplementedError, AssertionError, ImportError, AttributeError) as error:
            raise ValueError(f"device {device!r} is not available: torch {torch.__version__} cannot allocate on it "
                             f"({str(error).splitlines()[0][:80]}); use 'cpu'") from None
    return parsed


def split_artifact_spec(spec: str) -> tuple[str | None, Path | None]:
    """``(base spec or None, artifact folder)`` if ``spec`` names an artifact, else ``(None, None)``.

    An artifact is a folder with a ``manifest.json``, alone (base from the manifest) or after a ``+`` of
    ``BASE+ARTIFACT``: the last one, or an earlier one where the artifact's own name holds a ``+`` (``obs+cache``);
    a path that exists is taken as a whole, ``+`` included.
    """
    from .artifact import MANIFEST

    if Path(spec).exists():
        return (None, Path(spec)) if (Path(spec) / MANIFEST).is_file() else (None, None)
    base, plus, artifact = spec.rpartition("+")
    if not plus or not base:
        return None, None
    for split in (index for index, character in enumerate(spec) if character == "+" and index > 0):
        folder = expand_home(spec[split + 1:])
        if (folder / MANIFEST).is_file():  # the longest artifact path first: its folder name may hold a '+'
            return spec[:split], folder
    folder = expand_home(artifact)  # the shell expands no ~ after '+' (refused until session 41)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"pipeline spec {spec!r}: {artifact!r} after '+' is not an artifact folder "
                                f"(no {MANIFEST}); BASE+ARTIFACT needs a folder written by save / calibrate")
    return base, folder


def artifact_base(artifact: str | Path, base_spec: str | None = None,
                  dtype: str | torch.dtype | None = None) -> tuple[str, torch.dtype | None]:
    """``(spec, dtype)`` of the base to load ``artifact`` onto: ``base_spec`` / ``dtype`` when given,
    else what its manifest recorded (the dtype its denoiser computed in when saved, else the one its
    base was loaded in); a clear error when neither names one or the base is an artifact. The recorded
    weight variant: ``artifact_variant``."""
    from .artifact import ArtifactError, read_manifest

    base = read_manifest(artifact)["base"]
    source = base.get("source") or {}
    base_spec = base_spec or source.get("spec")
    if not base_spec:
        raise ArtifactError(f"artifact {str(artifact)!r} does not record the pipeline it was made from "
                            f"(it was built in code); name the base as BASE+{artifact}, e.g. 'org/model+{artifact}'")
    if _names_an_artifact(base_spec):
        raise ArtifactError(f"the base {base_spec!r} of artifact {str(artifact)!r} is itself an artifact; "
                            "an artifact already holds every technique applied before it was saved")
    return base_spec, parse_dtype(dtype) or parse_dtype(base.get("dtype") or source.get("dtype"))


def _names_an_artifact(spec: str) -> bool:
    """Whether ``spec`` names an artifact; a missing folder with a '+' in its name does not (a recorded base folder
    ``sd+merged`` moved away was "'merged' after '+' is not an artifact folder", a spec nobody typed, until
    session 53: loading it now says the recorded base cannot be loaded and how to name one)."""
    try:
        return split_artifact_spec(spec)[1] is not None
    except FileNotFoundError:
        return False


def artifact_variant(artifact: str | Path, base_spec: str | None = None) -> str | None:
    """The weight-file variant the artifact's base was loaded with (None: the default files), for its recorded base:
    a ``base_spec`` naming another one gets None (``tiny:sd+ART`` of an fp16-variant artifact asked tiny:sd for
    fp16 files, and no command could ask for "no variant")."""
    from .artifact import read_manifest

    source = read_manifest(artifact)["base"].get("source") or {}
    return source.get("variant") if base_spec is None or _same_spec(base_spec, source.get("spec")) else None


def _same_spec(given: str, recorded: str | None) -> bool:
    """Whether ``given`` names the recorded base spec (folders compared by their resolved paths)."""
    if recorded is None or given == recorded:
        return given == recorded
    folder = expand_home(given)
    return folder.exists() and folder.resolve() == expand_home(recorded).resolve()


def artifact_rounding(artifact: str | Path) -> torch.dtype | None:
    """The half precision the artifact's base weights were rounded to before it computed wider (techniques
    applied in bf16, then ``pipe.to(torch.float32)``), else None."""
    from .artifact import read_manifest

    return parse_dtype(read_manifest(artifact)["base"].get("rounded_to"))


def _load_with_artifact(base_spec: str | None, artifact: Path, torch_dtype: torch.dtype | None,
                        variant: str | None, device: torch.device | None) -> Any:
    """Load the base (``base_spec`` or the one the manifest records) in ``torch_dtype`` (or the
    recorded dtype) from ``variant``'s files (or the recorded variant) onto ``device``, then apply the
    artifact to it (there, so quantized layers are lowered for that device's kernels). With no dtype
    asked for, a base whose weights the saved pipeline had rounded to half precision is loaded in it and
    cast to the recorded dtype after: the saved pipeline's images, bit for bit; so is one asked for the recorded
    dtype (``--dtype fp32`` for the recorded float32 gave other images, 0.046 off) or a wider one than the rounding
    (cast after too)."""
    from .artifact import load

    spec, recorded = artifact_base(artifact, base_spec)
    dtype = parse_dtype(torch_dtype) or recorded
    rounding = artifact_rounding(artifact)
    if torch_dtype is not None and rounding is not None and dtype != recorded and dtype.itemsize <= rounding.itemsize:
        rounding = None  # another half precision asked for (or the rounding itself): loaded in it
    try:
        base = load_pipeline(spec, dtype=rounding or dtype, device=None if device is None else str(device),
                             variant=variant if variant is not None else artifact_variant(artifact, base_spec))
    except (OSError, ValueError) as error:
        if base_spec is not None:
            raise
        # a recorded base folder moved or on another machine: the error named a path the user never typed (s49)
        kind = OSError if isinstance(error, OSError) else ValueError
        raise kind(f"artifact {str(artifact)!r} was made from {spec!r}, which cannot be loaded here ({error}); "
                   f"name its base as BASE+{artifact}") from None
    if rounding is None or rounding == dtype:
        return load(base, artifact)
    with warnings.catch_warnings():  # its advice, a cast after load, follows
        warnings.filterwarnings("ignore", message=r".*after load gives the saved pipeline's images")
        loaded = load(base, artifact)
    from .arch.registry import find_denoiser
    from .prune.sparse import densify_

    densify_(find_denoiser(loaded)[1])  # 2:4 kernels a GPU base got on load take no cast; the saved pipeline ran dense
    return loaded.to(dtype=dtype)


def _load_by_kind(spec: str, torch_dtype: torch.dtype | None, variant: str | None = None) -> Any:
    if variant is not None and spec.startswith(("zoo:", "tiny:")):
        raise ValueError(f"variant={variant!r} selects weight files of a hub model or save_pretrained folder; "
                         f"{spec!r} has none")
    extra = {} if variant is None else {"variant": variant}
    if spec.startswith("zoo:"):
        from . import zoo

        if spec[4:] == "fashion-clip":
            raise ValueError("zoo:fashion-clip is a CLIP model (it scores images and encodes text for the "
                             "pipelines), not a diffusion pipeline; pipelines: zoo:fashion-sd, zoo:fashion-flux, "
                             "zoo:mnist-ddpm")
        return zoo.load(spec[4:], torch_dtype or torch.float32)  # as zoo.load: modules kept in float32 stay so
    if spec.startswith("tiny:"):
        from .testing.tiny import build_tiny

        with torch.random.fork_rng(devices=[]):  # the builders seed torch's global RNG: the user's stream is kept
            return build_tiny(spec[5:])
    from diffusers import DiffusionPipeline

    if Path(spec).is_dir():
        zoo_name = _zoo_model_name(Path(spec))
        if zoo_name is not None:  # the zoo's call settings and native size come with its folder
            from . import zoo

            if variant is not None and not _has_variant_files(Path(spec), variant):  # it loaded the standard
                # files silently and recorded the variant
                raise ValueError(f"variant={variant!r}: {spec!r} holds the zoo pipeline {zoo_name}, whose folder has "
                                 f"no {variant} weight files; load it without a variant")
            return zoo.load(zoo_name, torch_dtype or torch.float32, folder=spec, variant=variant)
        _check_pipeline_class_known(Path(spec))
        _check_tokenizer_files(Path(spec))
        return _from_folder(spec, torch_dtype, variant)
    if Path(spec).is_file():  # it went to the hub, or was "no such folder" (until session 49)
        raise ValueError(f"pipeline spec {spec!r} is a file; a local pipeline is a save_pretrained folder (with "
                         f"model_index.json), or name an artifact folder, zoo:NAME, tiny:FAMILY or a hub id")
    if _looks_like_a_path(spec):
        raise FileNotFoundError(f"pipeline spec {spec!r}: no such folder (a local pipeline is a "
                                f"save_pretrained folder; a hub id looks like 'org/model')")
    if "/" not in spec:
        raise ValueError(f"unknown pipeline spec {spec!r}; accepted: zoo:NAME, tiny:FAMILY, "
                         "a local save_pretrained folder, or a hub id like 'org/model'")
    try:
        return DiffusionPipeline.from_pretrained(spec, dtype=torch_dtype or torch.float32, **extra)
    except OSError as error:  # diffusers' text points at a stack trace the CLI does not show
        raise OSError(f"cannot load the hub model {spec!r}: {_hub_problem()} (diffusers: "
                      f"{str(error).split('. ')[0]})") from error


def _hub_problem() -> str:
    """What to check when a hub id could not be loaded."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and its files are not all in the local Hugging Face cache; unset it " \
               "to download them, or give a local save_pretrained folder"
    return "its files are not all in the local Hugging Face cache and the hub could not be reached, or " \
           "has no such model: check the network and the id (gated models need `hf auth login`), or give " \
           "a local save_pretrained folder"


def _zoo_model_name(folder: Path) -> str | None:
    """The zoo pipeline a folder holds (the shipped one, a copy or a training export), read from the
    ``train_info.json`` zoo training writes beside ``model_index.json``, else from its pipeline class and denoiser
    config (a zoo pipeline's own ``save_pretrained`` writes no train_info.json: its folder loaded without the zoo's
    call settings, a 512-px fashion-flux, until session 45); None for other pipelines."""
    from . import zoo

    index = read_json_object(folder / "model_index.json")
    if index is None:
        return None
    info = read_json_object(folder / "train_info.json")
    if info is not None:
        return info.get("name") if info.get("name") in zoo.CALL_DEFAULTS else None
    denoiser = next((name for name in ("transformer", "unet") if name in index), None)
    config = None if denoiser is None else read_json_object(folder / denoiser / "config.json")
    name = None if config is None else zoo.model_of_denoiser(config)
    return name if name is not None and index.get("_class_name") == zoo.PIPELINE_CLASSES[name] else None


def _from_folder(spec: str, torch_dtype: torch.dtype | None, variant: str | None) -> Any:
    """``DiffusionPipeline.from_pretrained`` of the folder ``spec``; a damaged weight file, or a folder holding
    only variant files loaded without a variant, is an OSError naming the folder and the way out (a truncated
    transformers component was a SafetensorError traceback, a variant-only folder "no file named
    diffusion_pytorch_model.bin" in a component folder; until session 49)."""
    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError

    extra = {} if variant is None else {"variant": variant}
    try:
        return DiffusionPipeline.from_pretrained(spec, dtype=torch_dtype or torch.float32, **extra)
    except SafetensorError as error:
        raise OSError(f"pipeline folder {spec!r}: a weight file is damaged ({str(error)[:120]}); copy or save the "
                      f"folder again") from None
    except OSError as error:
        found = _variants_only(Path(spec)) if variant is None else []
        if not found:  # the standard files are there: diffusers' own error is the one (a missing config.json)
            raise
        raise OSError(f"pipeline folder {spec!r} holds only variant weight files ({', '.join(found)}) where the "
                      f"standard ones are missing; pass --variant {found[0]} (variant={found[0]!r}) "
                      f"(diffusers: {str(error).split('. ')[0]})") from None


_WEIGHT_NAME = re.compile(r"^(?:diffusion_pytorch_model|model)(?:\.([A-Za-z0-9_]+))?(?:-\d+-of-\d+)?"
                          r"\.(?:safetensors|bin)(?:\.index\.json)?$")  # group 1: the variant, if any


def _variants_only(folder: Path) -> list[str]:
    """The weight-file variants (``model.fp16.safetensors`` -> fp16) of the component folders of ``folder`` that
    hold variant weight files and no standard ones, sorted ([] when every component has its standard files)."""
    found = set()
    for component in (path for path in folder.iterdir() if path.is_dir()):
        matches = [match for path in component.iterdir() if (match := _WEIGHT_NAME.match(path.name))]
        if matches and all(match.group(1) for match in matches):
            found |= {match.group(1) for match in matches}
    return sorted(found)


def _check_tokenizer_files(folder: Path) -> None:
    """FileNotFoundError for a tokenizer component of ``folder``'s model_index.json holding none of the vocabulary
    files its transformers class reads (``vocab_files_names``; a byte-level ByT5 has none): transformers builds a
    2-token vocabulary from nothing, and the first prompt failed (an OverflowError traceback; until session 49), as
    ``zoo._check_tokenizers`` refuses for zoo folders."""
    import transformers

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # diffusers names what it cannot read
    for component, spec in (index.items() if isinstance(index, dict) else []):
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == "transformers" and isinstance(spec[1], str)):
            continue
        files = sorted(set((getattr(getattr(transformers, spec[1], None), "vocab_files_names", None) or {}).values()))
        if "Tokenizer" in spec[1] and files and not any((folder / component / name).is_file() for name in files):
            raise FileNotFoundError(f"pipeline folder {str(folder)!r}: {component}/ holds none of the {spec[1]} "
                                    f"files ({', '.join(files)}); without them every prompt becomes unknown "
                                    f"tokens: copy or save the folder again")


def _has_variant_files(folder: Path, variant: str) -> bool:
    """Whether ``folder`` holds weight files of ``variant``: ``model.fp16.safetensors``, or shards
    ``model.fp16-00001-of-00003.safetensors``."""
    import re

    pattern = re.compile(rf"\.{re.escape(variant)}(\.|-\d+-of-\d+\.)")
    return any(pattern.search(path.name) for path in folder.rglob("*") if path.suffix in (".safetensors", ".bin"))


def _check_pipeline_class_known(folder: Path) -> None:
    """ValueError naming the pipeline class of ``folder``'s model_index.json when this diffusers has none of that
    name (a folder saved by a newer diffusers: an AttributeError traceback until session 45)."""
    import diffusers

    name = (read_json_object(folder / "model_index.json") or {}).get("_class_name")
    if isinstance(name, str) and not hasattr(diffusers, name):
        raise ValueError(f"pipeline folder {str(folder)!r} holds a {name}, which diffusers {diffusers.__version__} "
                         f"does not have (saved by a newer diffusers, or a community pipeline): upgrade diffusers")


def _looks_like_a_path(spec: str) -> bool:
    """A spec that cannot be a hub id ('org/model'): absolute, relative-dotted, home-based, deeper, or a
    Windows path (a backslash or a drive: ``C:\\models\\sd`` was an 'unknown pipeline spec', ``C:/models``
    went to the hub)."""
    from pathlib import PureWindowsPath

    return (spec.startswith(("/", ".", "~", "\\")) or spec.count("/") > 1 or "\\" in spec
            or bool(PureWindowsPath(spec).drive))


def default_demo_spec() -> str:
    """The demo's pipeline: the bundled ``fashion-sd`` if shipped, else the tiny SD pipeline. A folder that is there
    but incomplete (an interrupted copy) is the error ``zoo.path`` raises: the demo, eval, bench and grid ran on the
    random tiny pipeline instead, exit 0, with nothing naming it (until session 51)."""
    from . import zoo

    try:
        zoo.path("fashion-sd")
    except FileNotFoundError:
        if (zoo.MODELS_DIR / "fashion-sd").exists():
            raise
        return "tiny:sd"
    return "zoo:fashion-sd"
