"""Bundled prompt sets: ``load("default")``, ``load("fashion")`` or ``load(path_to_txt_or_json)``."""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import expand_home
from ..scalars import plain_number

_HERE = Path(__file__).parent


def names() -> list[str]:
    """Names of the bundled prompt sets."""
    return sorted(path.stem for path in _HERE.glob("*.txt"))


def load(name_or_path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a bundled set or of a file (``.txt`` one per line, ``#`` comments; ``.json`` list)."""
    limit = _check_limit(limit)
    path = _resolve(name_or_path)
    if path.suffix.lower() == ".json":
        try:  # utf-8-sig: a byte-order mark is no part of the text
            prompts = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a JSON list of strings: {error}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path} must hold a JSON list of strings")
        prompts = [prompt.strip() for prompt in prompts if prompt.strip()]  # as blank .txt lines are
    else:
        try:
            lines = path.read_text(encoding="utf-8-sig").split("\n")  # read_text made \r\n and \r "\n"; splitlines
            # also broke prompts at U+2028, U+0085, form feeds
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not a UTF-8 text file of prompts, one per line: {error}") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt set {str(name_or_path)!r} is empty")
    return prompts[:limit] if limit else prompts


def _check_limit(limit: object) -> int | None:
    """``limit`` (a numpy integer as a Python int) checked to be None or an int >= 1 (floats, strings and bools
    were bare TypeErrors or taken as 1)."""
    limit = plain_number(limit)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    return limit


def _resolve(name_or_path: str | Path) -> Path:
    """A bundled set by its bare name, else the file: an absolute path string was joined onto the bundled folder as
    itself plus ".txt", so "/data/captions" read "/data/captions.txt" beside it (until session 49)."""
    if isinstance(name_or_path, str) and name_or_path in names():
        return _HERE / f"{name_or_path}.txt"
    path = expand_home(name_or_path)  # a recipe's "~/prompts.txt" never passes through a shell
    if path.is_file():
        return path
    raise ValueError(f"unknown prompt set {str(name_or_path)!r}: not a bundled set "
                     f"({', '.join(names())}) nor an existing .txt/.json file")


def for_pipeline(pipe: object, limit: int | None = None) -> list:
    """Default prompts that suit ``pipe``: captions, DiT class ids, or one ``None`` per sample.

    Text pipelines from the bundled zoo get the ``fashion`` set, others ``default``; class-label
    pipelines (DiT) get ids ``0..n-1``; unconditional pipelines (DDPM) get ``None`` per image.
    """
    import inspect

    limit = _check_limit(limit)
    parameters = inspect.signature(type(pipe).__call__).parameters
    count = limit or 8
    if "prompt" in parameters:
        return load("fashion" if _is_fashion_pipeline(pipe) else "default", limit=limit)
    if "class_labels" in parameters:
        return list(range(min(count, _class_count(pipe) or count)))
    return [None] * count


def _class_count(pipe: object) -> int | None:
    """The classes the denoiser was trained on (the adapter's ``num_classes``), else the label names' count.
    DiT splits ImageNet labels on commas ("tench, Tinca tinca"), so names outnumber classes: ids past the class
    count raised IndexError, or hit the null (unconditional) class, until session 41."""
    from ..arch import get_adapter

    try:
        classes = getattr(get_adapter(pipe), "num_classes", lambda: None)()
    except (ValueError, TypeError):  # no supported denoiser (UnsupportedModelError is a ValueError)
        classes = None
    return classes or len(getattr(pipe, "labels", None) or {}) or None


def _is_fashion_pipeline(pipe: object) -> bool:
    """Whether ``pipe`` is a zoo fashion model: tagged with its call settings by ``zoo.load`` (a training export
    of another size too), or running its denoiser (by config). A folder's name said so until session 45, so a
    copy in ``my-run/`` got the generic set and any ``*fashion*`` folder the zoo's captions."""
    from .. import zoo
    from ..arch.registry import find_denoiser
    from ..pipeline_defaults import call_defaults

    fashion = ("fashion-sd", "fashion-flux")
    if call_defaults(pipe) in [zoo.CALL_DEFAULTS[name] for name in fashion]:
        return True
    try:
        denoiser = find_denoiser(pipe)[1]
    except (ValueError, TypeError):
        return False
    config = getattr(denoiser, "config", None)
    return config is not None and zoo.model_of_denoiser(config) in fashion
