"""The evaluation report: one row per variant, machine info, settings, notes; JSON/Markdown/PNG.

Row keys (present when the metric was requested; units in the names):
``variant``, ``baseline`` (bool), ``images``; ``fid`` (vs the reference set) or
``fid_vs_baseline`` (vs the baseline variant's images when no reference was given);
``clip_score``; ``psnr_db``, ``ssim``, ``max_abs_diff`` (0..255, vs the baseline's images, same
seeds); ``latency_ms`` (+ ``_p10``/``_p90``), ``speedup`` (baseline median / this median),
``denoiser_ms`` (denoiser time per pipeline call), ``denoiser_speedup``, ``denoiser_calls``;
``peak_memory_mib``, ``call_memory_mib`` (the peak minus the level at the call's start; None where the
peak is the process's lifetime one), ``memory_kind``, ``params``, ``state_mib``, ``serialized_mib``;
``gflops_per_denoiser_call``, ``gflops_per_image``; ``device``, ``dtype``, ``compiled``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..artifact_files import StagedWrite
from ..paths import (CALIBRATION_FORMAT, empty_path, expand_home, folders_named_like, output_folder_problem,
                     read_json_object)

MARKDOWN_COLUMNS = (
    ("variant", "variant"), ("images", "images"), ("fid", "FID"), ("fid_vs_baseline", "FID vs base"),
    ("clip_score", "CLIP"), ("psnr_db", "PSNR dB"), ("ssim", "SSIM"), ("max_abs_diff", r"max \|diff\|"),
    ("latency_ms", "latency ms"), ("speedup", "speedup"), ("denoiser_ms", "denoiser ms"),
    ("denoiser_speedup", "denoiser speedup"), ("peak_memory_mib", "peak MiB"), ("call_memory_mib", "call MiB"),
    ("params", "params"), ("serialized_mib", "size MiB"), ("gflops_per_denoiser_call", "GFLOPs/call"), ("dtype", "dtype"),
    ("compiled", "compiled"),
)


REPORT_FILES = ("report.json", "report.md", "grid.png")  # what EvalReport.save writes into its folder


def report_folder_problem(output_dir: str | Path, extra_names: tuple[str, ...] = ()) -> str | None:
    """Why a report (and ``extra_names`` files saved with it) cannot be saved into ``output_dir`` (a file in its path,
    folders named like the report's files: found when the grid was saved, after every image and metric and the old
    report.json), or None."""
    problem = output_folder_problem(output_dir)
    taken = None if problem is not None else folders_named_like(Path(output_dir), (*REPORT_FILES, *extra_names))
    if taken:
        problem = f"{str(output_dir)!r} {taken}"
    if problem is None and "calibration.json" not in extra_names and _holds_demo_notes(Path(output_dir)):
        problem = (f"{str(output_dir)!r} holds a demo's report and calibration.json: this report would replace that "
                   f"report and leave the demo's calibration.json beside it; write to another folder")
    return problem


def _holds_demo_notes(folder: Path) -> bool:
    """Whether ``folder`` holds a demo's report with its calibration.json (eval there kept the notes beside the new
    report, until session 50); calibrate's own calibration.json (of its artifact or statistics) does not count."""
    notes = folder / "calibration.json"
    if not (notes.is_file() and (folder / "report.json").is_file()):
        return False
    return (read_json_object(notes) or {}).get("format") != CALIBRATION_FORMAT


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by strings ("inf", "-inf", "nan") so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


TEXT_ROW_KEYS = ("variant", "dtype", "device", "memory_kind")
NON_FINITE_TEXT = ("inf", "-inf", "nan")


def _from_json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A saved row with its metrics' "inf" / "-inf" / "nan" strings (see ``_json_safe``) read back as floats."""
    return {key: float(value) if key not in TEXT_ROW_KEYS and value in NON_FINITE_TEXT else value
            for key, value in row.items()}


def _from_json_details(value: Any) -> Any:
    """Saved details with their "inf" / "-inf" / "nan" strings read back as floats, at any depth (per-image PSNR
    lists: identical images are inf; until session 41 they stayed strings, so sums of them failed)."""
    if isinstance(value, dict):
        return {key: _from_json_details(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json_details(item) for item in value]
    return float(value) if isinstance(value, str) and value in NON_FINITE_TEXT else value


def _cell(value: Any) -> str:
    """Markdown text of one value: 4 significant digits for floats, thousands separators for ints."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else _float_text(value)
    return str(value)


def _float_text(value: float) -> str:
    """4 significant digits; whole numbers from 10,000 up (not 1.235e+04), and more digits where 4 would show
    0, 1 or -1 for a value that is not (SSIM 0.99997 printed as 1, the mark of identical images)."""
    if 1e4 <= abs(float(f"{value:.4g}")) and abs(value) < 1e15:  # 9,999.7 rounds to 4 digits as 1e+04
        return f"{value:,.0f}"
    text, digits = f"{value:.4g}", 4
    while float(text) in (0.0, 1.0, -1.0) and float(text) != value and digits < 12:
        digits += 1
        text = f"{value:.{digits}g}"
    return text


def _table_cell(value: Any) -> str:
    """``_cell`` made safe inside a Markdown table row: ``|`` escaped, line breaks as spaces (a variant
    named ``a|b`` added a column, one with a newline split the row)."""
    return " ".join(_cell(value).split()).replace("|", "\\|")


@dataclass
class EvalReport:
    """Result of :func:`diffusion_accel.evaluate`: ``rows`` (one dict per variant) and context."""

    rows: list[dict[str, Any]]
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: Image.Image | None = field(default=None, repr=False)
    images: dict[str, Any] = field(default_factory=dict, repr=False)

    def row(self, variant: str) -> dict[str, Any]:
        """The row of ``variant``."""
        for row in self.rows:
            if row["variant"] == variant:
                return row
        raise KeyError(f"no variant {variant!r}; variants: {[row['variant'] for row in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        """Everything except images and the grid, JSON-safe."""
        return _json_safe({"rows": self.rows, "machine": self.machine, "settings": self.settings,
                           "notes": self.notes, "details": self.details})

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            path = expand_home(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
        return text

    def to_markdown(self) -> str:
        """A Markdown table of the rows, then machine, settings and notes."""
        columns = [(key, title) for key, title in MARKDOWN_COLUMNS if any(key in row for row in self.rows)]
        lines = ["| " + " | ".join(title for _, title in columns) + " |",
                 "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(_table_cell(row.get(key)) for key, _ in columns) + " |" for row in self.rows]
        lines += ["", "**Machine:** " + ", ".join(f"{k}={_cell(v)}" for k, v in self.machine.items()),
                  "", "**Settings:** " + ", ".join(f"{k}={_cell(v)}" for k, v in self.settings.items())]
        if self.notes:
            lines += ["", "**Notes:**"] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path, extra_files: dict[str, str] | None = None) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and (if made) ``grid.png`` into ``directory``, with ``extra_files``
        (name -> text: the demo's ``calibration.json``); a ``grid.png`` an earlier report left there is removed when
        this one has no grid (it showed other images).

        Staged and swapped in as an artifact is (``artifact_files.StagedWrite``, ``report.json`` last): a
        failure part-way left the new rows beside the old grid, which ``load`` read as one report."""
        folder = directory if empty_path(directory) else expand_home(directory)  # "~/x" made a folder named "~"
        extra_files = dict(extra_files or {})
        problem = report_folder_problem(folder, tuple(extra_files))  # after the old report.json was removed
        if problem is not None:
            raise ValueError(f"EvalReport.save: {problem}")
        folder.mkdir(parents=True, exist_ok=True)
        with StagedWrite(folder) as staged:
            for name, text in extra_files.items():
                staged.write(name, lambda path, text=text: path.write_text(text, encoding="utf-8"))
            staged.write("report.md", lambda path: path.write_text(self.to_markdown(), encoding="utf-8"))
            if self.grid is not None:
                grid = self.grid
                staged.write("grid.png", lambda path: grid.save(path, format="PNG"))
            staged.commit("report.json", self.to_json() + "\n", stale=["grid.png"])
        paths = {"json": folder / "report.json", "markdown": folder / "report.md"}
        return paths | ({"grid": folder / "grid.png"} if self.grid is not None else {}) | {
            name: folder / name for name in extra_files}

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """The report :meth:`save` wrote: ``path`` is its folder or its ``report.json``; the grid is read
        when ``grid.png`` is beside it (images are not saved, so ``images`` is empty)."""
        path = expand_home(path)
        json_path = path / "report.json" if path.is_dir() else path
        if not json_path.is_file():
            raise FileNotFoundError(f"no report at {str(path)!r}: expected a folder holding report.json "
                                    f"(as EvalReport.save / evaluate(output_dir=...) write) or the JSON file itself")
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{str(json_path)!r} is not an evaluation report: not JSON text ({error})") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(isinstance(row, dict) and "variant" in row for row in rows):
            raise ValueError(f"{str(json_path)!r} is not an evaluation report: no 'rows' list of variant rows")
        return cls(rows=[_from_json_row(row) for row in rows], machine=data.get("machine", {}),
                   settings=data.get("settings", {}), notes=data.get("notes", []),
                   details=_from_json_details(data.get("details", {})), grid=_read_grid(json_path.parent / "grid.png"))


def _read_grid(path: Path) -> Image.Image | None:
    """The saved grid as an RGB image in memory (file closed), or None without one."""
    if not path.is_file():
        return None
    with Image.open(path) as image:
        return image.convert("RGB")
