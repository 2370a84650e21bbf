"""The runnable programs in examples/ work end to end (tiny pipelines, few steps)."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, extra, family", [
    ("cache_swap_in.py", [], "sd"), ("comparison_grid.py", ["--out"], "sd"),
    ("stack_all_three.py", ["--out"], "sd"), ("img2img_reuse.py", [], "sd"),
    # transformers: block caching instead of DeepCache; PixArt's tiny pipeline needs its call defaults
    ("cache_swap_in.py", [], "flux"), ("stack_all_three.py", ["--out"], "pixart"),
    # unconditional DDPM (the zoo's mnist-ddpm): the prompt string was read as the batch size (session 31)
    ("cache_swap_in.py", [], "ddpm"), ("stack_all_three.py", ["--out"], "ddpm"),
    ("comparison_grid.py", ["--out"], "flux"),
])
def test_example_runs(script, extra, family, tmp_path, monkeypatch, capsys):
    argv = ["--pipe", f"tiny:{family}", "--steps", "4"] + ([*extra, str(tmp_path / "out")] if extra else [])
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
    if script == "comparison_grid.py":  # the cache row names the method it ran (it said deepcache-2 on Flux)
        assert f"| {'deepcache' if family == 'sd' else 'block_cache'}-2 |" in out


@pytest.mark.parametrize("argv, message", [
    (["--pipe", "tiny:ddpm", "--steps", "4"], "DDPMPipeline: this example needs a text-to-image pipeline"),
    (["--pipe", "tiny:sd", "--steps", "4", "--strength", "1.5"], r"must be a number in \(0, 1\], got 1.5"),
    (["--pipe", "tiny:sd", "--steps", "3", "--strength", "0.2"], "runs no img2img step"),
])
def test_img2img_example_refuses_what_it_cannot_run_before_generating(argv, message, monkeypatch, capsys):
    """Each failed inside diffusers after the text-to-image run (or read the prompt as DDPM's batch size)."""
    monkeypatch.setattr(sys, "argv", ["img2img_reuse.py", *argv])
    with pytest.raises(SystemExit):
        runpy.run_path(str(EXAMPLES / "img2img_reuse.py"), run_name="__main__")
    assert __import__("re").search(message, capsys.readouterr().err)


@pytest.mark.parametrize("script", ["stack_all_three.py", "comparison_grid.py"])
def test_report_examples_refuse_an_unusable_out_before_any_work(script, tmp_path, monkeypatch, capsys):
    """A report.json folder in --out failed with a traceback after the work, leaving the artifact without its report
    (until session 50)."""
    (tmp_path / "report.json").mkdir()
    monkeypatch.setattr("diffusion_accel.loading.load_pipeline", lambda *a, **k: pytest.fail("pipeline loaded"))
    monkeypatch.setattr(sys, "argv", [script, "--pipe", "tiny:sd", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert "holds folders named ['report.json'], where files are written" in capsys.readouterr().err


def test_a_report_into_a_folder_holding_an_earlier_runs_notes_is_refused(tmp_path):
    """eval --out into a demo's folder replaced its report and kept the demo's calibration.json beside it (until
    session 50); the demo itself, which writes its own calibration.json, may write there again."""
    from diffusion_accel.eval.report import report_folder_problem

    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "calibration.json").write_text('{"family": "unet2d_condition"}')
    assert "holds a demo's report and calibration.json" in report_folder_problem(tmp_path)
    assert report_folder_problem(tmp_path, extra_names=("calibration.json",)) is None
    # calibrate's own notes (an artifact's, a second eval into it was refused: session 50 review) do not count
    (tmp_path / "calibration.json").write_text('{"format": "diffusion_accel.calibration"}')
    assert report_folder_problem(tmp_path) is None


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python block, verbatim, with the zoo swapped for the tiny SD pipeline and two prompts."""
    import diffusion_accel as da
    from diffusion_accel.testing.tiny import build_tiny

    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(da.zoo, "load", lambda name: build_tiny("sd"))
    monkeypatch.setattr(da.prompts, "load", lambda name: ["a photo of a sneaker", "a photo of a bag"])
    evaluate = da.evaluate  # CLIP score with the bundled CLIP: the tiny pipeline names no CLIP of its own
    monkeypatch.setattr(da, "evaluate", lambda *args, **kwargs: evaluate(
        *args, clip_model=da.zoo.path("fashion-clip"), repeats=1, **kwargs))
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "fashion-sd-accel" / "manifest.json").is_file()
    assert "| accel |" in capsys.readouterr().out
