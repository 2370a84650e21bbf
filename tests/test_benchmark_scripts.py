"""Benchmark scripts: the GPU speed benchmark's code paths on CPU at tiny shapes (slow: compiles several models), and the FID bootstrap's math."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_device_speed_smoke_runs_every_variant(tmp_path):
    import device_speed

    out = tmp_path / "speed.json"
    device_speed.main(["--device", "cpu", "--smoke", "--repeats", "1", "--out", str(out)])
    variants = json.loads(out.read_text())["variants"]
    timed = {name for name, item in variants.items() if "median_ms" in item}
    assert {"fp32_eager", "bf16_compiled", "w8a8_bf16_compiled", "w8a8_bf16_compiled_fused_rescale",
            "w8a8_linear_bf16_compiled", "fp8_linear_bf16_compiled",
            "w4a16_linear_bf16_compiled", "structured30_bf16_compiled", "2of4_bf16_eager"} <= timed
    assert "fp8-gemm" in variants["fp8_linear_bf16_compiled"]["summary"]
    assert "no sparse kernel used" in variants["2of4_bf16_eager"]["sparse_kernels"]
    assert out.with_suffix(".md").read_text().count("|") > 20


def test_a_smoke_run_never_writes_a_full_runs_report(monkeypatch):
    """`device_speed.py --smoke` without --out wrote its tiny-shape timings over the committed
    device_speed_cuda_sd15.json (on a GPU machine, where --device defaults to cuda)."""
    import device_speed

    from diffusion_accel.quant import fp8

    monkeypatch.setattr(fp8, "fp8_kernel_available", fp8.fp8_kernel_available)  # --smoke forces it: put it back
    targets = []
    monkeypatch.setattr(device_speed, "run", lambda args: targets.append(args.out) or {})
    monkeypatch.setattr(device_speed, "markdown", lambda report: "")
    for argv in (["--device", "cuda", "--smoke"], ["--device", "cuda:0", "--model", "dit", "--smoke"],
                 ["--device", "cuda"]):
        device_speed.main(argv)
    assert [path.name for path in targets] == ["device_speed_cuda_sd15_smoke.json", "device_speed_cuda_dit_smoke.json",
                                               "device_speed_cuda_sd15.json"]


def test_fid_bootstrap_formula_matches_torchmetrics_and_pairs_resamples():
    import torch
    from fid_bootstrap import FixedReferenceFID, bootstrap

    from diffusion_accel.eval.fid import _compute_fid

    torch.manual_seed(0)
    ref = torch.randn(400, 32).double() @ torch.randn(32, 32).double()
    other = torch.randn(300, 32).double() * 1.3 + 0.2
    fid = FixedReferenceFID(ref.mean(0), torch.cov(ref.T))
    expected = float(_compute_fid(ref.mean(0), torch.cov(ref.T), other.mean(0), torch.cov(other.T)))
    assert abs(fid(other) - expected) < 1e-6 * expected
    samples = bootstrap(fid, {"a": other, "b": other.clone()}, reps=3, seed=0)
    assert torch.equal(samples["a"], samples["b"])  # the same indices for every variant


def test_fid_decomposition_terms_sum_to_fid_and_pixel_statistics_follow_the_images():
    import torch
    from fid_decomposition import fid_terms, pixel_stats, summary

    from diffusion_accel.eval.fid import _compute_fid

    torch.manual_seed(0)
    ref = torch.randn(400, 32).double() @ torch.randn(32, 32).double()
    other = torch.randn(300, 32).double() * 1.3 + 0.2
    terms = fid_terms(other, ref.mean(0), torch.cov(ref.T))
    expected = float(_compute_fid(ref.mean(0), torch.cov(ref.T), other.mean(0), torch.cov(other.T)))
    assert abs(terms["fid"] - expected) < 1e-6 * expected
    assert abs(terms["mean_term"] - float((other.mean(0) - ref.mean(0)).square().sum())) < 1e-9
    flat = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)
    edges = flat.clone()
    edges[:, :, :, ::2] = 255
    soft, sharp = pixel_stats(flat), pixel_stats(edges)
    assert float(soft["sharpness"].max()) == 0 and float(sharp["sharpness"].min()) > 0
    assert summary(sharp, soft)["sharpness_higher_fraction"] == 1.0 and soft["contrast"].max() == 0


def test_fid_bootstrap_reads_cache_flux_and_quality_reports(tmp_path):
    from fid_bootstrap import known_labels, report_script

    cache = {"chosen": {"ours-a": {}, "peer-b": {}}, "variants": {"baseline": {}, "x": {}}}
    assert report_script(tmp_path / "cache_flux_v3.json", cache) == "cache_flux"
    assert known_labels("cache_flux", cache) == ["ours-a", "peer-b"]
    ptq = {"config": {"model": "fashion-flux"}, "variants": {"baseline": {}, "ours_w8a8": {}, "naive_w8a8": {}}}
    assert report_script(tmp_path / "ptq_quality_fashion-flux.json", ptq) == "ptq_quality"
    assert known_labels("ptq_quality", ptq) == ["naive_w8a8", "ours_w8a8"]
    assert report_script(tmp_path / "prune_quality.json", ptq) == "prune_quality"
    with pytest.raises(SystemExit, match="not a cache_flux"):
        report_script(tmp_path / "zoo_quality_sd.json", ptq)


def test_fid_bootstrap_reuses_kept_features_only_for_the_same_images(tmp_path, monkeypatch):
    import fid_bootstrap
    import torch

    class Bench:
        def variant_images_path(self, label):
            return tmp_path / f"images_{label}.safetensors"

    passes = []

    def fake_features(bench, images):
        passes.append(1)
        return images.float().reshape(len(images), -1)[:, :4].double()

    monkeypatch.setattr(fid_bootstrap, "features", fake_features)
    images = torch.randint(0, 255, (3, 3, 4, 4), dtype=torch.uint8)
    first = fid_bootstrap.kept_features(Bench(), "v", lambda: images)
    assert torch.equal(fid_bootstrap.kept_features(Bench(), "v", lambda: images), first) and len(passes) == 1
    changed = images.clone()
    changed[0, 0, 0, 0] += 1  # regenerated images: the kept features are stale
    fid_bootstrap.kept_features(Bench(), "v", lambda: changed)
    assert len(passes) == 2


def test_zoo_benchmarks_drive_the_unconditional_mnist_ddpm():
    """The shared harness calls DDPMPipeline with batch_size (no prompts, no size) and calibrates it
    on 64 samples over 20 of its 100 DDIM steps without height/width."""
    import torch

    from diffusion_accel import zoo
    from ptq_quality import calib_fields, naive
    from zoo_harness import sampling
    from zoo_quality import call_inputs, is_unconditional, pipe_images

    assert is_unconditional("mnist-ddpm") and not is_unconditional("fashion-sd")
    assert sampling("mnist-ddpm") == (100, None, {})
    assert sampling("fashion-sd")[2] == {"height": 32, "width": 32}
    fields = calib_fields("mnist-ddpm")
    assert (fields["calib_prompts"], fields["calib_steps"], fields["calib_kwargs"]) == (64, "uniform:20", ())
    assert naive("mnist-ddpm", "w8a8").calib_steps == (99,)
    pipe = zoo.load("mnist-ddpm")
    pipe.set_progress_bar_config(disable=True)
    assert call_inputs(pipe, ["", "", ""]) == {"batch_size": 3}
    images = pipe_images(pipe, ["", "", ""], torch.Generator().manual_seed(0), {"num_inference_steps": 2})
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 2])  # grayscale replicated to RGB


def test_ptq_act_modes_settings_are_valid_w8a8_configs():
    import ptq_act_modes
    from ptq_quality import ours

    settings = ptq_act_modes.SETTINGS | ptq_act_modes.UNET_ONLY
    configs = {label: ours("fashion-sd", "w8a8", lower=False, **changes) for label, changes in settings.items()}
    assert {c.act_mode for c in configs.values()} == {"static", "dynamic", "dynamic_per_tensor"}
    assert all(c.weights == "int8" and c.activations == "int8" for c in configs.values())
    assert configs["dynamic per-tensor, shortcut convs' activations in float"].act_exclude == ("*conv_shortcut",)


SCRIPTS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                 if path.stem not in ("cli_options", "zoo_harness"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_prints_help_without_running(script, capsys):
    """Four scripts had no parser: --help ran them in full and overwrote their committed results."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.parametrize("script, argv, message", [
    ("ptq_quality", ["--n", "-5"], "--n: must be an int >= 1, got -5"),
    ("prune_speed", ["--repeats", "0"], "--repeats: must be an int >= 1, got 0"),
    ("calib_schedulers", ["--steps", "-1"], "--steps: must be an int >= 1, got -1"),
    ("fid_bootstrap", ["--report", "missing.json"], "'missing.json' is not a file"),
    ("ptq_conv_unfold", ["--out", "."], "is a folder; give the JSON report's file path"),
    ("prune_quality", ["--only", "bogus"], "--only ['bogus'] are no variants of fashion-sd"),
    ("cache_sd", ["--only", "deepcache_interval_3"], "--only ['deepcache_interval_3'] are no variants"),
    ("cache_compile", ["--rounds", "0"], "--rounds: must be an int >= 1, got 0"),
    ("device_speed", ["--model", "dit", "--only", "w8a8", "--smoke"], "--only ['w8a8'] time the SD 1.5 UNet only"),
])
def test_benchmark_arguments_are_checked_before_any_work(script, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_every_zoo_report_row_records_the_command_and_machine_that_made_it(tmp_path, capsys):
    """Reports grow over --only runs, whose top-level command is the last run's: rows of earlier runs
    (FIDs computed by other commands) named no command or machine."""
    from zoo_harness import ZooBench

    bench = object.__new__(ZooBench)  # _record needs only these; the full harness loads Inception and data
    bench.model, bench.out = "fashion-sd", tmp_path / "report.json"
    bench.report = {"config": {}, "machine": {}, "variants": {}, "command": "python benchmarks/x.py --only a"}
    bench._record("a", {"fid": 30.0, "psnr_vs_baseline": 40.0})
    bench.report["command"] = "python benchmarks/x.py --only b --skip-quality"
    bench._record("b", {"fid": 31.0, "psnr_vs_baseline": 41.0})
    rows = json.loads(bench.out.read_text())["variants"]
    assert rows["a"]["made_by"]["command"] == "python benchmarks/x.py --only a"
    assert rows["b"]["made_by"]["command"].endswith("--skip-quality")
    assert {"cpu_model", "torch_threads"} <= set(rows["a"]["made_by"]["machine"])


TEXTS = ("W8A8 +", "group 64", "act_order", "per-token", "nearest, output")  # one or two labels of each script


@pytest.mark.parametrize("script", ["ptq_rounding", "ptq_act_order", "ptq_act_modes", "ptq_group_scales",
                                    "ptq_attention"])
def test_only_limits_every_settings_script_to_the_matching_labels_and_the_reference(script, tmp_path, monkeypatch):
    """Four of these accepted --only and ran every setting (hours, over the committed report) until session 41."""
    import importlib

    module = importlib.import_module(script)
    ran = []
    monkeypatch.setattr(module, "run_settings", lambda model, settings, reference, *a, **k: ran.append(
        (list(settings), reference)))
    module.main(["--only", *TEXTS, "--out", str(tmp_path / "r.json")])
    labels, reference = ran[0]
    assert reference in labels and all(label == reference or any(
        text in label for text in TEXTS) for label in labels) and len(labels) < 5
    with pytest.raises(SystemExit, match="matches no setting"):
        module.main(["--only", "no such label", "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("modes", [[""], ["_dynamic_per_tensor"], ["", "_dynamic_per_tensor"]])
def test_ptq_speed_markdown_shows_the_activation_modes_that_ran(modes):
    """`ptq_speed.py --act-modes dynamic_per_tensor` alone failed writing its table (KeyError 'quantize_s')."""
    import ptq_speed

    results = {"latency": {"fp32_eager": {"median_ms": 100.0}}, "model": "fashion-sd", "inputs": {"sample": [4, 4]},
               "resolution": 32, "batch": 2, "repeats": 1, "compiled_repeats": 1, "load_average_start": (0, 0, 0),
               "load_average_end": (0, 0, 0), "machine": {"cpu_model": "cpu", "cpu_cores_available": 2,
                                                          "torch_threads": 2},
               "size": {"w8a8": {"fp32_mb": 4.0, "artifact_mb": 1.0, "standalone_mb": 1.2, "standalone_ratio": 0.3}}}
    for suffix in modes:
        results[f"quantize_s{suffix}"], results[f"summary{suffix}"] = 7.0, f"summary{suffix or '_static'}"
    text = ptq_speed.markdown(results)
    assert all(f"summary{suffix or '_static'}" in text for suffix in modes)
    assert ("Static activations" in text) == ("" in modes)
    assert "2 prompts per call (denoiser batch 4)" in text and "(no compiled variants)" in text  # "batch 2" and
    # "(compiled: 1)" before session 47


def _probed_flux_report():
    import cache_flux

    probe = {"candidates": [{"setting": {"threshold": 0.05}, "calib_rel_error": 0.01, "speedup": 1.6},
                            {"setting": {"threshold": 0.2}, "calib_rel_error": 0.05, "speedup": 2.2}]}
    return {"calibration": {"prompts": cache_flux.calibration_prompts(4), "teacache_coefficients": [1.0],
                            "magcache_ratios": [1.0]},
            "probe": {"ours-fbc": probe}, "chosen": {"ours-fbc": cache_flux.choose(probe, 2.0 * 1.03)},
            "variants": {"baseline": {"fid": 1.0}, "ours-fbc": {"fid": 2.0}}, "not_run": {}}


def test_cache_flux_chooses_again_for_a_new_target_and_forgets_other_calibration_prompts(tmp_path):
    """A rerun with another --target kept the old choice (and its quality row) under the new target's settings;
    one with another --calib-prompts kept fits and probes of the old prompts."""
    import cache_flux

    out = tmp_path / "flux.json"
    out.write_text(json.dumps(_probed_flux_report()))
    report = cache_flux.main(["--methods", "ours-fbc", "--skip-quality", "--skip-timing", "--target", "1.5",
                              "--out", str(out)])
    assert report["chosen"]["ours-fbc"]["setting"] == {"threshold": 0.05} and "ours-fbc" not in report["variants"]
    report = _probed_flux_report()
    cache_flux.forget_other_calibration(report, cache_flux.calibration_prompts(4))
    assert report["chosen"] and "ours-fbc" in report["variants"]  # the same prompts: all kept
    cache_flux.forget_other_calibration(report, cache_flux.calibration_prompts(8))
    assert not {"calibration", "probe", "chosen"} & set(report) and list(report["variants"]) == ["baseline"]


def test_cache_flux_probes_again_with_other_probe_counts_and_labels_kept_probes_with_their_own(tmp_path, monkeypatch):
    """A kept probe was described with the last run's --probe-prompts / --probe-repeats, whatever it was timed with."""
    import cache_flux

    probed = []

    def probe_method(method, cal, probe_prompts, calib, ref, repeats):
        probed.append((len(probe_prompts), repeats))
        return {**_probed_flux_report()["probe"]["ours-fbc"], "probe_prompts": len(probe_prompts),
                "probe_repeats": repeats}

    monkeypatch.setattr(cache_flux, "probe_method", probe_method)
    monkeypatch.setattr(cache_flux, "final_latents", lambda pipe, prompts: None)
    monkeypatch.setattr(cache_flux, "load_pipe", lambda: None)
    out = tmp_path / "flux.json"
    out.write_text(json.dumps({**_probed_flux_report(), "settings": {"probe_prompts": 20, "probe_repeats": 3}}))
    argv = ["--methods", "ours-fbc", "--skip-quality", "--skip-timing", "--out", str(out)]
    report = cache_flux.main(argv + ["--probe-prompts", "20", "--probe-repeats", "3"])
    assert not probed and report["probe"]["ours-fbc"]["probe_prompts"] == 20  # stamped from the old settings
    report = cache_flux.main(argv + ["--probe-prompts", "5", "--probe-repeats", "3"])
    assert probed == [(5, 3)]
    report["settings"]["probe_prompts"] = 20
    assert "probed on 5 prompts per call, 3 calls" in cache_flux.extra_markdown(report)


def test_cache_sd_redoes_rows_made_with_other_calibration_settings(tmp_path, monkeypatch):
    """Rows were kept by label: a rerun with --calibration-prompts 8 kept the row calibrated on 1 prompt."""
    import cache_sd

    forced = {}

    class Bench:
        def __init__(self, *args, **kwargs):
            self.report = {"config": {"model": "fashion-sd", "n_generated": 1, "n_ref_test": 1, "fid_network": "x",
                                      "sampling": {}}, "machine": {"cpu_model": "cpu", "torch_threads": 1},
                           "variants": {"calibrated_17of50": {"note": "refine search, 1 calibration prompts"},
                                        "deepcache_interval3": {"note": "17 full steps of 50"}}}

        def run_baseline(self):
            pass

        def run(self, variant, force=False):
            forced[variant.label] = force

    monkeypatch.setattr(cache_sd, "ZooBench", Bench)
    monkeypatch.setattr(cache_sd, "markdown_table", lambda *args: "")
    monkeypatch.setattr(cache_sd, "parity", lambda steps: {})
    cache_sd.main(["--only", "calibrated_17of50", "deepcache_interval3", "--calibration-prompts", "8", "--skip-timing",
                   "--out", str(tmp_path / "r.json")])
    assert forced == {"calibrated_17of50": True, "deepcache_interval3": False}


def test_cache_blocks_measures_kept_schedules_again_on_other_held_out_prompts(tmp_path, monkeypatch):
    """A rerun with --held-out 5 kept the rows measured on 20 prompts and headed them "5 held-out prompts"."""
    import cache_blocks

    row = {"config": {}, "full_steps": [0], "partial_steps": [], "search_s": 1.0, "error_calibration": 0.1,
           "error_held_out": 0.2, "psnr_held_out": 30.0, "psnr": cache_blocks.PSNR_CONVENTION, "flops_fraction": 0.5}
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"held_out": 20, "machine": {"cpu_model": "cpu", "torch_threads": 1}, "models": {
        model: {setting: {"steps": dict(row), "steps+blocks": dict(row)} for setting in settings}
        for model, settings in cache_blocks.SETTINGS.items()}}))
    remeasured = []

    def remeasure(model, stored, context):  # as the real one: the held-out count and rule it measured with
        remeasured.append(model)
        stored["held_out"], stored["held_out_rule"] = context["held_out"], cache_blocks.HELD_OUT_RULE

    monkeypatch.setattr(cache_blocks, "model_context", lambda model, held_out: {"held_out": held_out})
    monkeypatch.setattr(cache_blocks, "remeasure_held_out", remeasure)
    cache_blocks.main(["--models", "fashion-sd", "--held-out", "5", "--timing-repeats", "0", "--out", str(out)])
    assert remeasured == ["fashion-sd"] * 4
    table = out.with_suffix(".md").read_text()
    assert "5 held-out prompts" in table and table.count("(20 prompts)") == 2 * 4  # fashion-flux's kept rows
    cache_blocks.main(["--models", "fashion-sd", "--held-out", "5", "--timing-repeats", "0", "--out", str(out)])
    assert remeasured == ["fashion-sd"] * 4  # measured on 5 now: kept
    rows = json.loads(out.read_text())["models"]
    assert all(row["held_out_rule"] == cache_blocks.HELD_OUT_RULE for pair in rows["fashion-flux"].values()
               for row in pair.values())  # fashion-flux's held-out set always left the calibration prompts out
    sd_row = rows["fashion-sd"]["forecast-10of50"]["steps"]
    del sd_row["held_out_rule"]  # a row measured before session 45 (one calibration caption held out): again
    out.write_text(json.dumps({**json.loads(out.read_text()), "models": rows}))
    cache_blocks.main(["--models", "fashion-sd", "--held-out", "5", "--timing-repeats", "0", "--out", str(out)])
    assert remeasured == ["fashion-sd"] * 5


def test_cache_router_measures_kept_variants_again_with_other_epochs_or_held_out_prompts(tmp_path, monkeypatch):
    """Rows were kept by label: a rerun with --epochs 40 kept the 20-epoch routers under "trained 40 epochs"."""
    import cache_router

    row = {"config": {}, "calibration_s": 1.0, "error_calibration": 0.1, "error_held_out": 0.2, "psnr_held_out": 30.0,
           "flops_fraction": 0.5}
    labels = list(cache_router.calibrators(20))
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"held_out": 20, "epochs": 20, "machine": {"cpu_model": "cpu", "torch_threads": 1},
                               "variants": {label: dict(row) for label in labels}}))
    measured = []
    monkeypatch.setattr(cache_router.cb, "model_context", lambda model, held_out: {})
    monkeypatch.setattr(cache_router, "measure", lambda label, calibrate, context: measured.append(label) or dict(row))
    cache_router.main(["--epochs", "40", "--timing-repeats", "0", "--variants", *labels[:3], "--out", str(out)])
    assert measured == labels[2:3]  # the uniform and searched schedules do not depend on --epochs
    table = out.with_suffix(".md").read_text()
    assert table.count("(20 held-out prompts, --epochs 20)") == 2  # the routers left out by --variants
    cache_router.main(["--epochs", "40", "--held-out", "5", "--timing-repeats", "0", "--out", str(out)])
    assert measured[1:] == [label for label in cache_router.calibrators(40)]


def test_cache_router_refuses_unknown_variant_labels(tmp_path, capsys):
    """A typo, or a label that exists only at other --epochs, skipped every row and exited 0 (until session 50)."""
    import cache_router

    with pytest.raises(SystemExit):
        cache_router.main(["--epochs", "10", "--variants", "router (final)", "--out", str(tmp_path / "r.json")])
    assert "--variants ['router (final)']: no such variant at --epochs 10; accepted:" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_timing_only_run_lists_its_speed_ups_in_the_markdown_table():
    """cache_sd.py --skip-quality wrote the speed-ups to JSON and a table without rows."""
    from zoo_harness import markdown_table

    report = {"config": {"model": "fashion-sd", "n_generated": 1, "n_ref_test": 1, "fid_network": "x", "sampling": {}},
              "machine": {"cpu_model": "cpu", "torch_threads": 1}, "variants": {},
              "timing": {"baseline": {"speedup": 1.0}, "deepcache_interval3": {"speedup": 2.33}}}
    table = markdown_table(report, "t")
    assert "| deepcache_interval3 |" in table and "2.33×" in table and "| baseline |" in table


def test_cache_flux_heldout_leaves_out_every_prompt_a_setting_was_searched_on():
    """Three of the 20 held-out prompts were among the "-c16" rows' 16 search prompts until session 45."""
    import cache_flux as cf
    import cache_flux_heldout

    report = {"calibration": {"prompts": cf.calibration_prompts(4)},
              "chosen": {"ours-calibrated-output-11": {}, "ours-calibrated-output-11-c16": {}}}
    searched = cache_flux_heldout.search_prompts(report)
    assert set(cf.calibration_prompts(16)) <= set(searched) and set(cf.calibration_prompts(4)) <= set(searched)
    held_out = cache_flux_heldout.held_out_prompts(report, 20)
    assert len(held_out) == 20 and not set(held_out) & set(searched)


def test_cache_sd_skips_its_plot_where_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    """No dependency installs matplotlib: the documented full run ended in an ImportError after writing its tables."""
    import sys

    import cache_sd

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    cache_sd.plot({"timing": {}, "variants": {}}, tmp_path / "plot.png")
    assert "skipped: matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "plot.png").exists()


def test_cache_blocks_refuses_unknown_settings_before_any_work(capsys):
    """A misspelt --settings label (forecast_10of50) measured nothing, wrote nothing and exited 0."""
    import cache_blocks

    with pytest.raises(SystemExit) as exit_info:
        cache_blocks.main(["--models", "fashion-sd", "--settings", "forecast_10of50"])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--settings forecast_10of50: not a setting of fashion-sd" in message


def test_cache_blocks_and_cache_sd_create_a_missing_out_folder(tmp_path, monkeypatch):
    """Both wrote --out without creating its folder: the run died after its search / parity work."""
    import cache_blocks
    import cache_sd

    out = tmp_path / "new" / "sub" / "report.json"
    monkeypatch.setattr(cache_blocks, "markdown", lambda report: "")
    cache_blocks.write({"models": {}}, out)
    assert out.is_file() and out.with_suffix(".md").is_file()
    monkeypatch.setattr(cache_sd, "markdown_table", lambda *args: "")
    monkeypatch.setattr(cache_sd, "parity", lambda steps: {})
    sd_out = tmp_path / "sd" / "cache_sd.json"
    cache_sd.main(["--skip-quality", "--skip-timing", "--out", str(sd_out)])
    assert json.loads(sd_out.read_text())["parity_max_abs_diff"] == {}


def test_ptq_speed_sizes_count_the_ptq_file_and_manifest_not_the_base_sample():
    """Since session 51's base-sample file the "artifact = PTQ file only" size counted it as well; the tensors-alone
    ratio (no safetensors header, no manifest) is the payload's."""
    import ptq_speed

    from diffusion_accel.quant import PTQConfig, quantize_
    from diffusion_accel.testing.tiny import build_tiny

    pipe = build_tiny("sd")
    base_state = ptq_speed.state_bytes(pipe.unet)
    quantize_(pipe, PTQConfig(weights="int8", activations=None))
    size = ptq_speed.artifact_size(pipe, base_state)
    files = size["files"]
    assert set(files) == {"00-ptq.safetensors", "manifest.json", "base-sample.safetensors"}
    fp32 = sum(base_state.values())
    assert size["artifact_ratio"] * fp32 == files["00-ptq.safetensors"] + files["manifest.json"]
    assert size["tensors_ratio"] < size["standalone_ratio"]
    codes = sum(module.weight_codes.numel() for module in pipe.unet.modules() if hasattr(module, "weight_codes"))
    assert size["tensors_ratio"] * fp32 > codes  # at least the int8 codes
