"""The runnable programs in examples/ work end to end (tiny pipelines, few steps)."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, extra", [("cache_swap_in.py", []), ("comparison_grid.py", ["--out"]),
                                           ("stack_all_three.py", ["--out"]), ("img2img_reuse.py", [])])
def test_example_runs(script, extra, tmp_path, monkeypatch, capsys):
    argv = ["--pipe", "tiny:sd", "--steps", "4"] + ([*extra, str(tmp_path / "out")] if extra else [])
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    if script == "cache_swap_in.py":
        assert "after remove_cache identical to uncached: True" in out
    elif script == "img2img_reuse.py":  # strength 0.6 of 4 steps starts at step 2
        assert "StableDiffusionImg2ImgPipeline ran schedule steps 2..3 of 4" in out and "PSNR" in out
    else:
        assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "grid.png").is_file()
    if script == "stack_all_three.py":
        assert "['prune', 'ptq', 'cache']; reloaded images identical: True" in out
        assert (tmp_path / "out" / "artifact" / "manifest.json").is_file()
