"""Source checks for other operating systems (the suite runs on Linux only): text files are read and
written as UTF-8 explicitly (Windows' default cp1252 failed on the model cards' arrows and Greek letters),
and no POSIX-only module is imported at module level (``import resource`` made every evaluation fail to
import on Windows)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_accel"
SOURCES = sorted(PACKAGE.rglob("*.py"))
POSIX_ONLY = {"resource", "fcntl", "termios", "pwd", "grp", "posix"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _unencoded_text_io(path: Path) -> list[str]:
    """``read_text`` / ``write_text`` / text-mode ``open`` calls without ``encoding=`` (reads of /proc, Linux
    only and ASCII, are exempt)."""
    source, found = path.read_text(encoding="utf-8"), []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.Call) or any(keyword.arg == "encoding" for keyword in node.keywords):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("read_text", "write_text"):
            receiver = ast.get_source_segment(source, node.func.value) or ""
            if "proc" not in receiver.lower():
                found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node.func, ast.Name) and node.func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next(
                (keyword.value for keyword in node.keywords if keyword.arg == "mode"), None)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                found.append(f"{path.name}:{node.lineno}")
    return found


def _top_level_imports(path: Path) -> set[str]:
    top_level = [node for node in _tree(path).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name.split(".")[0] for node in top_level if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module.split(".")[0] for node in top_level if isinstance(node, ast.ImportFrom) and node.module}


def test_text_files_are_read_and_written_as_utf8():
    assert len(SOURCES) > 100 and [call for path in SOURCES for call in _unencoded_text_io(path)] == []


def test_no_posix_only_module_is_imported_at_module_level():
    assert {path.name: sorted(_top_level_imports(path) & POSIX_ONLY) for path in SOURCES
            if _top_level_imports(path) & POSIX_ONLY} == {}


def test_the_checks_find_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import resource\nfrom pathlib import Path\nPath("x").write_text("é")\nopen("y", "w")\n'
                   'Path("/proc/cpuinfo").read_text()\nopen("z", "rb")\n', encoding="utf-8")
    assert _unencoded_text_io(bad) == ["bad.py:3", "bad.py:4"] and _top_level_imports(bad) & POSIX_ONLY == {"resource"}
