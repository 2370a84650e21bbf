"""calibration/build_artifacts.py: recipes -> artifacts + a summary, resumable, failures isolated."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))

import build_artifacts  # noqa: E402


def _recipe(tmp_path: Path, name: str, model: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[model]\nid = "{model}"\n[calibration]\nsteps = 3\nnum_prompts = 2\nguidance = 4.0\n'
                    '[cache]\nmethod = "deepcache"\ninterval = 2\n')
    return path


def test_builds_checks_and_resumes(tmp_path):
    recipe, out = _recipe(tmp_path, "small", "tiny:sd"), tmp_path / "out"
    argv = [str(recipe), "--methods", "ptq,cache", "--check-prompts", "1", "--check-steps", "2",
            "--check-repeats", "1", "--out", str(out), "--", "--selection", "uniform:2"]
    assert build_artifacts.main(argv) == 0
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["status"] == "built" and set(row["technique_s"]) == {"ptq", "cache"}
    assert "--selection uniform:2" in row["command"] and row["artifact_mib"] > 0
    assert 10 < row["check"]["psnr_db"] < float("inf")  # quantized: close to the base, not identical
    manifest = json.loads((out / "small" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["techniques"]] == ["ptq", "cache"]
    again = argv[:argv.index("--")] + ["--check-prompts", "0", "--", "--selection", "uniform:2"]
    assert build_artifacts.main(again) == 0  # the same settings: the second run keeps the artifact
    assert json.loads((out / "summary.json").read_text())["rows"][0]["status"].startswith("kept")
    assert "| small |" in (out / "summary.md").read_text()


def test_resuming_with_other_settings_refuses_the_kept_artifact(tmp_path, capsys):
    """A w4a16 run over a w8a8 artifact said 'kept' and exit 0: the user thought they had w4a16. Then (until
    session 31) the refusal rewrote summary.md with the recipe marked failed, losing the kept artifact's row."""
    recipe, out = _recipe(tmp_path, "small", "tiny:sd"), tmp_path / "out"
    base = [str(recipe), "--methods", "ptq", "--check-prompts", "0", "--out", str(out)]
    assert build_artifacts.main(base + ["--preset", "w8a8"]) == 0
    summary = (out / "summary.json").read_text(), (out / "summary.md").read_text()
    capsys.readouterr()
    assert build_artifacts.main(base + ["--preset", "w4a16"]) == 2
    error = capsys.readouterr().err
    assert "holds an artifact of other settings" in error and "--preset w8a8" in error and "--force rebuilds it" in error
    assert ((out / "summary.json").read_text(), (out / "summary.md").read_text()) == summary
    assert build_artifacts.main(base + ["--preset", "w4a16", "--force"]) == 0
    assert json.loads((out / "small" / "manifest.json").read_text())["techniques"][0]["config"]["ptq_config"][
        "weights"] == "int4"


def test_an_artifact_without_its_build_record_is_not_kept_as_built_with_these_settings(tmp_path, capsys):
    """A first build interrupted after its save, or an artifact made by hand with calibrate, has no build.json: only
    its technique names were compared, and a w8a8 one was 'kept' for a w4a16 run; a --force rebuild interrupted
    before its record kept the old record beside the new artifact (until session 50)."""
    recipe, out = _recipe(tmp_path, "small", "tiny:sd"), tmp_path / "out"
    base = [str(recipe), "--methods", "ptq", "--check-prompts", "0", "--out", str(out)]
    assert build_artifacts.main(base + ["--preset", "w8a8"]) == 0
    (out / "small" / build_artifacts.BUILD_FILE).unlink()
    capsys.readouterr()
    assert build_artifacts.main(base + ["--preset", "w4a16"]) == 2
    assert "has no build.json (an interrupted build, or made outside this script)" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    build_artifacts.main(base + ["--preset", "w8a8", "--force"])
    import diffusion_accel.recipes as recipes

    real = recipes.run_calibrate
    recipes.run_calibrate = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            build_artifacts.build_one(recipe, out / "small", build_artifacts.parse_args(base + ["--preset", "w4a16"]))
    finally:
        recipes.run_calibrate = real
    assert not (out / "small" / build_artifacts.BUILD_FILE).exists()


@pytest.mark.parametrize("extra, message", [
    (["--device", "cdua"], "--device: unknown device 'cdua'"),
    (["--device", "cuda:7"], "--device: device 'cuda:7' is not available"),
])
def test_a_bad_device_is_an_argument_error(extra, message, tmp_path, capsys):
    """It failed in the summary's machine line after the first recipe, with a raw torch error (until session 50)."""
    with pytest.raises(SystemExit):
        build_artifacts.parse_args([str(_recipe(tmp_path, "small", "tiny:sd")), "--out", str(tmp_path / "o"), *extra])
    assert message in capsys.readouterr().err


def test_recipes_sharing_a_file_name_are_refused(tmp_path, capsys):
    """Both wrote --out/<name>: the second overwrote the first's artifact, and both rows said built (until s50)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _recipe(tmp_path / "a", "sd", "tiny:sd"), _recipe(tmp_path / "b", "sd", "tiny:sd")
    with pytest.raises(SystemExit):
        build_artifacts.parse_args([str(first), str(second), "--out", str(tmp_path / "o")])
    assert "recipes share the file names ['sd']" in capsys.readouterr().err


def test_resuming_reads_the_recipes_content_not_the_path_it_was_given_by(tmp_path, capsys, monkeypatch):
    """Until session 41 an edited recipe was 'kept' (its path unchanged) and the same recipe by another path was
    refused."""
    recipe, out = _recipe(tmp_path, "small", "tiny:sd"), tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    run = ["--methods", "ptq", "--check-prompts", "0", "--out", str(out)]
    assert build_artifacts.main(["small.toml", *run]) == 0
    assert build_artifacts.main([str(recipe), *run]) == 0  # the same recipe, given by its absolute path
    assert json.loads((out / "summary.json").read_text())["rows"][0]["status"].startswith("kept")
    recipe.write_text(recipe.read_text().replace("steps = 3", "steps = 2"))
    capsys.readouterr()
    assert build_artifacts.main(["small.toml", *run]) == 2
    assert "small.toml was edited since it was built" in capsys.readouterr().err


def test_the_check_samples_with_the_settings_the_artifact_was_calibrated_with(tmp_path, monkeypatch):
    """Calibrate flags after -- (--guidance, --call) were left out of the check, which ran at the recipe's."""
    import diffusion_accel.eval as eval_package

    seen = []
    real = eval_package.evaluate
    monkeypatch.setattr(eval_package, "evaluate", lambda *a, **k: seen.append(k["call_kwargs"]) or real(*a, **k))
    recipe, out = _recipe(tmp_path, "small", "tiny:sd"), tmp_path / "out"
    assert build_artifacts.main([str(recipe), "--methods", "ptq", "--check-prompts", "1", "--check-steps", "2",
                                 "--check-repeats", "1", "--out", str(out), "--", "--guidance", "1.5",
                                 "--call", "height=16", "--call", "width=16"]) == 0
    assert seen == [{"height": 16, "width": 16, "guidance_scale": 1.5}]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "bogus"], "--methods: --method 'bogus': accepted methods are"),
    (["--methods", "stats"], "writes calibration statistics, not an artifact"),
    (["--check-repeats", "-2"], "--check-repeats: must be an int >= 1"),
    (["--pipe", "tiny:sd", "A", "B"], "replaces the model of one recipe"),
])
def test_arguments_are_checked_before_any_recipe_runs(tmp_path, capsys, argv, message):
    recipes = {"A": _recipe(tmp_path, "a", "tiny:sd"), "B": _recipe(tmp_path, "b", "tiny:sd")}
    argv = [str(recipes.get(item, item)) for item in argv]
    with pytest.raises(SystemExit) as exit_info:
        build_artifacts.main(argv + ["--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failing_recipe_is_reported_and_the_batch_goes_on(tmp_path):
    bad, good, out = _recipe(tmp_path, "bad", "tiny:nope"), _recipe(tmp_path, "good", "tiny:sd"), tmp_path / "o"
    assert build_artifacts.main([str(bad), str(good), "--methods", "cache", "--check-prompts", "0",
                                 "--out", str(out)]) == 1
    rows = {row["recipe"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["bad"]["status"] == "failed" and "unknown tiny family" in rows["bad"]["error"]
    assert rows["good"]["status"] == "built"


def test_missing_recipe_files_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_artifacts.main([str(tmp_path / "nope.toml"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "nope.toml" in capsys.readouterr().err


def test_default_recipes_are_the_shipped_ones(tmp_path):
    args = build_artifacts.parse_args(["--out", str(tmp_path)])
    assert {path.stem for path in args.recipes} >= {"sd15", "sdxl", "sd3", "flux", "pixart"}
    assert build_artifacts.calibrate_argv(args.recipes[0], tmp_path / "a", args)[:3] == [
        "calibrate", "--recipe", str(args.recipes[0])]


@pytest.mark.parametrize("recipe, family", [("sd15", "sd"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux-dev"),
                                            ("pixart", "pixart")])
def test_shipped_recipes_build_on_tiny_stand_ins(recipe, family, tmp_path):
    """The hub recipes themselves (their guidance, selection, weighting, [cache] table) drive the job;
    --pipe swaps the hub model for a tiny pipeline of the same family."""
    out = tmp_path / "out"
    assert build_artifacts.main([str(build_artifacts.RECIPES / f"{recipe}.toml"), "--pipe", f"tiny:{family}",
                                 "--methods", "ptq,cache", "--num-prompts", "1", "--steps", "3",
                                 "--check-prompts", "1", "--check-steps", "3", "--check-repeats", "1",
                                 "--out", str(out)]) == 0
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["status"] == "built" and row["check"]["psnr_db"] > 20


def test_the_check_calls_both_pipelines_with_a_zoo_bases_call_settings(tmp_path):
    """fashion-flux needs its 32-token T5 and true CFG (da.call_defaults): the accelerated sibling
    pipeline must get them too, or base and artifact are sampled differently. Caching every step
    (interval 1) computes everything, so the images must be identical."""
    recipe = tmp_path / "flux.toml"
    recipe.write_text('[model]\nid = "zoo:fashion-flux"\n[calibration]\nsteps = 2\nnum_prompts = 1\n'
                      '[cache]\nmethod = "block"\ninterval = 1\n')
    out = tmp_path / "out"
    assert build_artifacts.main([str(recipe), "--methods", "cache", "--check-prompts", "1", "--check-steps", "3",
                                 "--check-repeats", "1", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["rows"][0]["check"]["psnr_db"] == float("inf")


def test_a_mirror_holding_only_variant_files_is_built_and_checked_from_them(tmp_path):
    """The check loaded the base without the recipe's variant: a folder of *.fp16 files failed ('no file named
    ...'), and with --pipe the recipe's dtype and variant were dropped (an fp16 recipe calibrated in fp32)."""
    from diffusion_accel.testing.tiny import build_tiny

    folder = tmp_path / "mirror"
    build_tiny("sd").save_pretrained(folder, variant="fp16")
    assert not list(folder.glob("unet/*model.safetensors"))  # only the variant's files
    recipe = tmp_path / "mirrored.toml"
    recipe.write_text(f'[model]\nid = "{folder}"\nvariant = "fp16"\ndtype = "bf16"\n[calibration]\nsteps = 2\n'
                      'num_prompts = 1\n')
    for extra in ([], ["--pipe", str(folder)]):
        out = tmp_path / f"out{len(extra)}"
        argv = [str(recipe), "--methods", "ptq", "--check-prompts", "1", "--check-steps", "2",
                "--check-repeats", "1", "--out", str(out), *extra]
        assert build_artifacts.main(argv) == 0
        row = json.loads((out / "summary.json").read_text())["rows"][0]
        assert row["status"] == "built" and row["check"]["psnr_db"] > 10
        source = json.loads((out / "mirrored" / "manifest.json").read_text())["base"]["source"]
        assert source["variant"] == "fp16" and source["dtype"] == "bfloat16"


def test_an_out_path_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    """It ended in a FileExistsError traceback (exit 1) after parsing."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        build_artifacts.main([str(_recipe(tmp_path, "small", "tiny:sd")), "--out", str(tmp_path / "afile")])
    assert exit_info.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err


def test_the_check_pipeline_shares_the_base_components_in_their_dtype_and_keeps_its_options():
    """from_pipe, which built it, casts every shared component to float32 without a dtype: an fp16 recipe's base
    and artifact were compared in float32 (and a FLUX.1-dev check held a 48 GB transformer)."""
    import torch

    from diffusion_accel.testing.tiny import build_tiny

    base = build_tiny("sdxl").to(torch.float16)
    base.register_to_config(force_zeros_for_empty_prompt=False)
    sibling = build_artifacts.sibling_pipeline(base)
    assert sibling.unet is base.unet and sibling.vae is base.vae
    assert base.unet.dtype == base.text_encoder.dtype == torch.float16
    assert sibling.config.force_zeros_for_empty_prompt is False


def test_a_recipe_calling_with_images_per_prompt_is_built_and_checked(tmp_path):
    """calibrate takes num_images_per_prompt / return_dict in [call], evaluate refuses them: the check failed
    and the built artifact was reported 'failed' (until session 48)."""
    recipe, out = _recipe(tmp_path, "small", "tiny:sd"), tmp_path / "out"
    recipe.write_text(recipe.read_text() + "[call]\nnum_images_per_prompt = 2\noutput_type = \"latent\"\n")
    assert build_artifacts.main([str(recipe), "--methods", "ptq", "--check-prompts", "1", "--check-steps", "2",
                                 "--check-repeats", "1", "--out", str(out)]) == 0
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["status"] == "built" and row["check"]["psnr_db"] > 10


def test_a_prompt_file_beside_the_recipe_is_found_and_its_edits_rebuild(tmp_path, capsys, monkeypatch):
    """A recipe's relative prompt file was looked up from the current folder only, and an edited prompt file
    kept the artifact calibrated on the old prompts (until session 48)."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = _recipe(folder, "small", "tiny:sd")
    recipe.write_text(recipe.read_text().replace("num_prompts = 2", 'prompts = "mine.txt"'))
    (folder / "mine.txt").write_text("a red cube\na blue ball\n")
    monkeypatch.chdir(tmp_path)
    run = [str(recipe), "--methods", "ptq", "--check-prompts", "0", "--out", str(tmp_path / "out")]
    assert build_artifacts.main(run) == 0
    notes = json.loads((tmp_path / "out" / "small" / "calibration.json").read_text())
    assert notes["settings"]["prompts"] == str((folder / "mine.txt").resolve()) and notes["num_prompts"] == 2
    assert build_artifacts.main(run) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"][0]["status"].startswith("kept")
    (folder / "mine.txt").write_text("a green cone\n")
    capsys.readouterr()
    assert build_artifacts.main(run) == 2
    assert "calibration prompts changed since it was built" in capsys.readouterr().err


def test_an_empty_variant_builds_a_mirror_of_the_standard_files(tmp_path):
    """--variant '' was replaced by the recipe's fp16: a plain save_pretrained mirror of an fp16 recipe's model
    could not be built (until session 48)."""
    from diffusion_accel.testing.tiny import build_tiny

    folder = tmp_path / "mirror"
    build_tiny("sd").save_pretrained(folder)
    recipe = tmp_path / "fp16.toml"
    recipe.write_text(f'[model]\nid = "{folder}"\nvariant = "fp16"\n[calibration]\nsteps = 2\nnum_prompts = 1\n')
    out = tmp_path / "out"
    assert build_artifacts.main([str(recipe), "--methods", "ptq", "--check-prompts", "1", "--check-steps", "2",
                                 "--check-repeats", "1", "--pipe", str(folder), "--variant", "", "--out",
                                 str(out)]) == 0
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["status"] == "built" and row["check"]["psnr_db"] > 10
