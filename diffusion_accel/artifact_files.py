"""Writing an artifact folder so that an interrupted save never leaves a mixed artifact.

``save`` used to overwrite the technique files in place and write ``manifest.json`` last: a save
interrupted (Ctrl-C, a killed job) after the new tensors but before the new manifest left the old
manifest over the new tensors, which ``load`` accepted when names and shapes matched (the same technique
recalibrated): images of one run, provenance of another. Now every file is first written under a hidden
staging name, the old manifest is removed, the staged files are renamed into place (``os.replace``,
atomic per file) and the new manifest is written last, also by rename. An interruption leaves either the
old artifact whole, or a folder without a manifest (``load`` refuses it, naming an interrupted save), or
the new artifact whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

STAGING_SUFFIX = ".diffusion_accel.partial"  # ours alone: a user's ".notes.partial" was deleted by every save


def staging_path(folder: Path, name: str) -> Path:
    """Where ``name`` is written before ``commit`` renames it into place (hidden: a dot file)."""
    return folder / f".{name}{STAGING_SUFFIX}"


def remove_staged(folder: Path) -> None:
    """Delete staging files an interrupted earlier save left in ``folder``."""
    for leftover in folder.glob(f".*{STAGING_SUFFIX}"):
        leftover.unlink(missing_ok=True)


class StagedWrite:
    """The files of one save: ``write(name, writer)`` stages a file, ``commit(manifest, text)`` swaps them in."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.names = folder, []
        remove_staged(folder)

    def write(self, name: str, writer: Callable[[Path], None]) -> str:
        """Stage ``name`` by calling ``writer(path)``; returns ``name``."""
        writer(staging_path(self.folder, name))
        self.names.append(name)
        return name

    def discard(self) -> None:
        """Remove every staged file (the save failed before its commit)."""
        remove_staged(self.folder)

    def __enter__(self) -> "StagedWrite":
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        """Any exception in the block (KeyboardInterrupt too) discards what it staged; it propagates."""
        if kind is not None:
            self.discard()

    def commit(self, manifest_name: str, manifest_text: str, stale: Iterable[str] = ()) -> None:
        """Remove the old manifest, rename the staged files into place, write the manifest, delete ``stale``."""
        (self.folder / manifest_name).unlink(missing_ok=True)
        for name in self.names:
            os.replace(staging_path(self.folder, name), self.folder / name)
        staged_manifest = staging_path(self.folder, manifest_name)
        staged_manifest.write_text(manifest_text, encoding="utf-8")
        os.replace(staged_manifest, self.folder / manifest_name)
        for name in set(stale) - set(self.names):
            (self.folder / name).unlink(missing_ok=True)
