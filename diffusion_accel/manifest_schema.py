"""Shape checks of an artifact's ``manifest.json``, so a damaged or hand-edited manifest is refused with
an error naming the field instead of a bare KeyError / TypeError deep inside ``load``.

Only the envelope is checked here (what ``artifact.load`` and ``loading.artifact_base`` read); each
technique's ``config`` is checked by that technique's own restore. Technique files must be plain file
names inside the artifact folder: a manifest cannot make ``load`` read tensors from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# field -> accepted JSON types, for the fields load() reads
BASE_FIELDS: dict[str, tuple[type, ...]] = {"fingerprint": (str,), "denoiser": (str,)}
OPTIONAL_BASE_FIELDS: dict[str, tuple[type, ...]] = {
    "source": (dict, type(None)), "dtype": (str, type(None)), "structure": (str,), "sample": (str,),
    "rounded_to": (str,), "config": (dict,)}
ROUNDING_DTYPE_NAMES = ("bfloat16", "float16")  # base.rounded_to (artifact.save)
TECHNIQUE_FIELDS: dict[str, tuple[type, ...]] = {"name": (str,), "config": (dict,), "tensors": (str,)}


class ManifestError(ValueError):
    """``manifest.json`` lacks a field ``load`` needs, or holds it with the wrong type."""


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Raise ManifestError naming the first missing or mistyped envelope field of ``manifest`` (read
    from ``path``), or a technique file that is not a plain name inside the artifact folder."""
    version = _field(manifest, "format_version", (int,), path, "")
    if isinstance(version, bool) or version < 1:
        _fail(path, "format_version", f"an integer >= 1, got {version!r}")
    base = _field(manifest, "base", (dict,), path, "")
    for name, kinds in BASE_FIELDS.items():
        _field(base, name, kinds, path, "base.")
    for name, kinds in OPTIONAL_BASE_FIELDS.items():
        if name in base:
            _field(base, name, kinds, path, "base.")
    if "sample" in base:
        _plain_file_name(base["sample"], path, "base.sample")
    if base.get("rounded_to", ROUNDING_DTYPE_NAMES[0]) not in ROUNDING_DTYPE_NAMES:
        _fail(path, "base.rounded_to", f"one of {ROUNDING_DTYPE_NAMES}, got {base['rounded_to']!r}")
    for name in ("spec", "dtype", "variant"):  # where the base was loaded from (loading.artifact_base reads them)
        if isinstance(base.get("source"), dict) and name in base["source"]:
            _field(base["source"], name, (str, type(None)), path, "base.source.")
    _check_dtype_names(base, path)
    techniques = _field(manifest, "techniques", (list,), path, "")
    seen: set[str] = set()
    for index, entry in enumerate(techniques):
        where = f"techniques[{index}]"
        if not isinstance(entry, dict):
            _fail(path, where, f"an object with {sorted(TECHNIQUE_FIELDS)}, got {type(entry).__name__}")
        for name, kinds in TECHNIQUE_FIELDS.items():
            _field(entry, name, kinds, path, f"{where}.")
        _plain_file_name(entry["tensors"], path, f"{where}.tensors")
        if entry["name"] in seen:
            _fail(path, f"{where}.name", f"a technique not listed before, got {entry['name']!r} a second time")
        seen.add(entry["name"])


def _check_dtype_names(base: dict[str, Any], path: Path) -> None:
    """base.dtype / base.source.dtype name a dtype ``loading`` knows (save writes torch's names) and
    base.source.variant a weight-file variant: a "float99" loaded with a warning naming torch.float99, and
    load_pipeline failed naming neither file nor field."""
    from .loading import DTYPES, _checked_variant

    source = base.get("source") if isinstance(base.get("source"), dict) else {}
    for where, value in (("base.dtype", base.get("dtype")), ("base.source.dtype", source.get("dtype"))):
        if value is not None and value not in DTYPES:
            _fail(path, where, f"one of {sorted(DTYPES)} or null, got {value!r}")
    try:
        _checked_variant(source.get("variant"))
    except ValueError:
        _fail(path, "base.source.variant", f"a weight-file variant name such as 'fp16', or null, got "
                                           f"{source.get('variant')!r}")


def _field(mapping: dict[str, Any], name: str, kinds: tuple[type, ...], path: Path, prefix: str) -> Any:
    if name not in mapping:
        _fail(path, prefix + name, "present: it is missing")
    value = mapping[name]
    if not isinstance(value, kinds):
        accepted = " or ".join("null" if kind is type(None) else _JSON_NAMES.get(kind, kind.__name__)
                               for kind in kinds)
        _fail(path, prefix + name, f"{accepted}, got {type(value).__name__} {value!r:.60}")
    return value


def _plain_file_name(name: str, path: Path, where: str) -> None:
    """Technique and sample files live in the artifact folder itself: no folders, no '..', no absolute path,
    no symbolic link to a file elsewhere."""
    if not name or Path(name).name != name or name in (".", ".."):
        _fail(path, where, f"a file name inside the artifact folder, got {name!r}")
    problem = link_problem(path.parent / name)
    if problem is not None:
        _fail(path, where, f"a file inside the artifact folder, got {name!r}, {problem}")


def link_problem(target: Path) -> str | None:
    """Why ``target``, a file named in an artifact folder, is not a file of that folder: a symbolic link to a file
    elsewhere, or a link that does not resolve (a loop: a RuntimeError traceback until session 53); else None."""
    try:
        if target.is_symlink() and target.resolve().parent != target.parent.resolve():
            return f"a link to {str(target.resolve())!r}"
    except (RuntimeError, OSError) as error:
        return f"a link that does not resolve ({type(error).__name__}: {error})"
    return None


def _fail(path: Path, field: str, expected: str) -> None:
    raise ManifestError(f"{path}: field {field!r} must be {expected}; the manifest is damaged or was edited "
                        f"by hand: save the artifact again")


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
