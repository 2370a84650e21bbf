"""prune_ on real tiny pipelines: every family, atomicity, weighting, groups, save/load, drop-in."""

import warnings

import pytest
import torch

import diffusion_accel as da
import diffusion_accel.prune.apply as prune_apply
from diffusion_accel.artifact import applied_techniques
from diffusion_accel.calib import step_weights
from diffusion_accel.prune import PruneConfig, prune_, prune_report
from diffusion_accel.prune.serialize import export_prune, restore_prune
from diffusion_accel.testing.contract import check_drop_in
from diffusion_accel.testing.tiny import TINY_BUILDERS, build_tiny

from prune_helpers import generate, tiny_calibration

FAMILIES = sorted(TINY_BUILDERS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "structured"])
def test_every_family_prunes_and_generates(family, pattern):
    pipe = build_tiny(family)
    calib = tiny_calibration(pipe, family)
    sparsity = 0.5 if pattern == "unstructured" else 0.3
    prune_(pipe, PruneConfig(method="obs", sparsity=sparsity, pattern=pattern, groups=2), calib=calib)
    report = prune_report(pipe)
    assert report.sweeps == report.groups and 1 <= report.groups <= 2
    if pattern == "unstructured":
        assert abs(report.achieved_sparsity - 0.5) < 0.01
    else:
        assert report.params_after < report.params_before
    assert torch.isfinite(generate(pipe, family)).all()
    assert applied_techniques(pipe) == ["prune"]


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("magnitude", "4:8"), ("wanda", "unstructured")])
def test_baselines_and_nm_on_sd(method, pattern):
    pipe = build_tiny("sd")
    sparsity = 0.5 if pattern == "unstructured" else None
    prune_(pipe, PruneConfig(method=method, sparsity=sparsity, pattern=pattern), calib=tiny_calibration(pipe, "sd"))
    report = prune_report(pipe)
    assert abs(report.achieved_sparsity - 0.5) < 0.01
    assert report.sweeps == (0 if method == "magnitude" else report.groups)
    assert "no sparse kernel" in report.sparse_kernels


@pytest.mark.parametrize("method, allocation", [("obs", None), ("wanda", None), ("magnitude", None),
                                                ("obs", "saliency"), ("magnitude", "error")])
def test_global_scope_spreads_the_target_over_layers(method, allocation):
    pipe = build_tiny("sd")
    config = PruneConfig(method=method, sparsity=0.6, scope="global", allocation=allocation)
    calib = tiny_calibration(pipe, "sd") if config.needs_calibration else None
    prune_(pipe, config, calib=calib)
    report = prune_report(pipe)
    shares = report.layer_sparsity
    assert set(shares) == set(report.layers_pruned)
    assert abs(report.achieved_sparsity - 0.6) < 0.01
    assert max(shares.values()) - min(shares.values()) > 0.05 and max(shares.values()) <= 0.95
    for name, share in shares.items():
        weight = pipe.unet.get_submodule(name).weight
        assert abs(float((weight == 0).float().mean()) - share) < 2 / weight[0].numel() + 1e-6
    pruning_sweeps = 0 if method == "magnitude" else report.groups
    allocation_sweeps = {"error": report.groups, "saliency": int(method != "magnitude")}[config.global_allocation]
    assert report.sweeps == pruning_sweeps + allocation_sweeps
    assert f"global scope ({config.global_allocation} allocation)" in report.summary()
    assert torch.isfinite(generate(pipe, "sd")).all()


def test_error_allocation_beats_saliency_allocation_on_summed_layer_error():
    """The error allocation minimises the summed relative output error, so measured on the same
    calibration Hessians it is no worse than the saliency allocation's."""
    from diffusion_accel.calib import HessianCollector, calibrate
    from diffusion_accel.prune.allocate import relative_output_error
    from diffusion_accel.prune.surgery import weight_matrix

    totals = {}
    for allocation in ("error", "saliency"):
        pipe = build_tiny("sd")
        dense = {name: weight_matrix(module).clone() for name, module in pipe.unet.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
        calib = tiny_calibration(pipe, "sd")
        prune_(pipe, PruneConfig(method="obs", sparsity=0.6, scope="global", allocation=allocation, groups=1), calib=calib)
        pruned = list(prune_report(pipe).layer_sparsity)
        pipe.unet, pruned_unet = build_tiny("sd").unet, pipe.unet
        collector = HessianCollector(pruned, full=True)
        calibrate(pipe, collectors=[collector], store_trajectory=False, **calib.settings.as_kwargs())
        totals[allocation] = sum(relative_output_error(dense[name], weight_matrix(pruned_unet.get_submodule(name)),
                                                       collector.hessian(name)) for name in pruned)
    assert totals["error"] < totals["saliency"]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sparsity=1.0), ValueError, "sparsity must be in"),
    (dict(sparsity=-0.1), ValueError, "sparsity must be in"),
    (dict(pattern="4:4", sparsity=None), ValueError, "0 < N < M"),
    (dict(pattern="5:4", sparsity=None), ValueError, "0 < N < M"),
    (dict(pattern="blocky"), ValueError, "unknown pattern 'blocky'"),
    (dict(method="random"), ValueError, "unknown method 'random'"),
    (dict(pattern="2:4", sparsity=0.3), ValueError, "implies sparsity 0.5"),
    (dict(method="wanda", pattern="structured"), ValueError, "structured pruning supports"),
    (dict(groups=0), ValueError, "groups must be"),
    (dict(weighting="cosine"), ValueError, "unknown weighting"),
    (dict(scope="model"), ValueError, "unknown scope 'model'"),
    (dict(scope="global", pattern="2:4", sparsity=None), ValueError, "scope='global' needs pattern='unstructured'"),
    (dict(scope="global", allocation="greedy"), ValueError, "unknown allocation 'greedy'"),
    (dict(allocation="error"), ValueError, "it needs scope='global'"),
    (dict(calib_kwargs=(("height",),)), TypeError, "calib_kwargs must be"),
    (dict(calib_kwargs={1: 2}), TypeError, "calib_kwargs keys must be strings"),
    (dict(calib_kwargs=(("height", 16), ("height", 32))), ValueError, r"calib_kwargs sets \['height'\] more than once"),
    (dict(calib_num_steps="all"), ValueError, "as PTQConfig.s calib_num_steps"),
    # session 27: each was accepted and misbehaved, or a bare Python error at prune time
    (dict(exclude="down_blocks"), ValueError, "got the string 'down_blocks'; write \\('down_blocks',\\)"),
    (dict(exclude=(1,)), ValueError, "exclude holds module-name prefixes"),
    (dict(exclude=None), ValueError, "exclude takes a tuple"),
    (dict(prune_heads="false"), ValueError, "prune_heads must be True or False, got 'false'"),
    (dict(weight_range=None), ValueError, "weight_range must be \\(w_min, w_max\\), two finite numbers"),
    (dict(weight_range="ab"), ValueError, "weight_range must be"),
    (dict(calib_guidance_scale="7"), ValueError, "calib_guidance_scale must be a finite number >= 0 or None"),
    # session 31: accepted (a negative guidance calibrated without CFG; damp=True damped by 1.0)
    (dict(calib_guidance_scale=-1), ValueError, "calib_guidance_scale must be a finite number >= 0 or None, got -1"),
    (dict(damp=True), ValueError, "damp must be a finite float > 0, got True"),
    (dict(method="obs", pattern="1:3"), ValueError, "blocksize 128 must be a multiple of M=3 .* with method 'obs'"),
    (dict(calib_kwargs={"height": torch.tensor(32)}), ValueError, "cannot be stored in the artifact manifest"),
])
def test_bad_configs_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("written", [" 2:4 ", "2 : 4", "02:04"])
def test_an_nm_pattern_is_stored_in_its_canonical_form(written):
    """They pruned 2:4 but the sparse-kernel check compared the raw string with "2:4" (session 31)."""
    assert PruneConfig(method="magnitude", pattern=written).pattern == "2:4"


def test_bad_arguments_leave_pipeline_unchanged():
    pipe = build_tiny("sd")
    unet, before = pipe.unet, generate(pipe, "sd")
    with pytest.raises(TypeError, match="PruneConfig"):
        prune_(pipe, {"method": "obs"})
    with pytest.raises(ValueError, match="nothing to prune"):
        prune_(pipe, PruneConfig(method="magnitude", exclude=("down_blocks", "mid_block", "up_blocks")))
    assert pipe.unet is unet and applied_techniques(pipe) == []
    assert torch.equal(generate(pipe, "sd"), before)


def test_pruning_a_quantized_pipeline_names_the_order():
    import diffusion_accel as da

    pipe = build_tiny("sd")
    da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=da.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False))
    unet = pipe.unet
    with pytest.raises(ValueError, match="already quantized; prune first, then quantize_"):
        prune_(pipe, PruneConfig(method="magnitude", sparsity=0.3))
    assert pipe.unet is unet and applied_techniques(pipe) == ["ptq"]


def test_failure_midway_rolls_back(monkeypatch):
    pipe = build_tiny("sd")
    unet, before = pipe.unet, generate(pipe, "sd")
    calls = []
    real = prune_apply.prune_layer_group

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_apply, "prune_layer_group", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        prune_(pipe, PruneConfig(method="magnitude", sparsity=0.5))
    assert pipe.unet is unet and applied_techniques(pipe) == []
    assert torch.equal(generate(pipe, "sd"), before)


def test_weighting_reaches_the_hessians(monkeypatch):
    pipe = build_tiny("sd")
    calib = tiny_calibration(pipe, "sd", steps=3)   # made with uniform weights
    seen = []
    real = prune_apply.calibrate

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        collector = kwargs["collectors"][0]
        name = collector.module_names[0]
        weights = result.step_weights.tolist()
        expected = sum(weights[k] * n for k, n in collector.rows_per_step(name).items())
        seen.append((kwargs["weighting"], weights, collector.weighted_rows(name), expected))
        return result

    monkeypatch.setattr(prune_apply, "calibrate", spy)
    config = PruneConfig(method="obs", sparsity=0.5, weighting="log-decrease", weight_range=(0.5, 1.5), groups=1)
    prune_(pipe, config, calib=calib)
    formula = step_weights(3, "log-decrease", 0.5, 1.5).tolist()
    assert len(seen) == 1 and seen[0][0] == "log-decrease"
    assert seen[0][1] == pytest.approx(formula) and seen[0][2] == pytest.approx(seen[0][3])
    assert prune_report(pipe).step_weights == pytest.approx(formula)


def test_the_report_lists_the_weights_of_the_steps_a_custom_schedule_ran():
    """calib_kwargs' ``timesteps`` ran 3 steps, but the report listed calib_num_steps' 10 weights (until session 45)."""
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny("sd")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = PruneConfig(method="obs", sparsity=0.5, groups=1, calib_prompts=1, calib_num_steps=10,
                         weighting="log-decrease", calib_kwargs=(("height", 32), ("width", 32),
                                                                 ("timesteps", [900, 500, 100])))
    prune_(pipe, config)
    assert prune_report(pipe).step_weights == pytest.approx(step_weights(3, "log-decrease").tolist())


def test_a_saliency_allocations_norm_sweep_counts_in_the_peak_memory(monkeypatch):
    """It held every layer's input norms at once and was left out of peak_hessian_bytes until session 41 (14,976
    bytes reported, 43,072 held on tiny SD)."""
    from diffusion_accel.prune.sequential import accumulator_bytes

    held, sweep = [], prune_apply._CalibrationSweep.__call__

    def measured(self, names, *args, **kwargs):
        collector = sweep(self, names, *args, **kwargs)
        held.append(accumulator_bytes(collector, names))
        return collector

    monkeypatch.setattr(prune_apply._CalibrationSweep, "__call__", measured)
    pipe = build_tiny("sd")
    prune_(pipe, PruneConfig(method="wanda", sparsity=0.4, scope="global", allocation="saliency"),
           calib=tiny_calibration(pipe, "sd"))
    assert prune_report(pipe).peak_hessian_bytes == max(held) > 0


def test_fully_sequential_and_single_group_both_run():
    reports = {}
    for groups in ("all", 1):
        pipe = build_tiny("dit")
        prune_(pipe, PruneConfig(method="obs", sparsity=0.5, groups=groups), calib=tiny_calibration(pipe, "dit"))
        reports[groups] = prune_report(pipe)
    assert reports[1].sweeps == 1 and reports["all"].sweeps == reports["all"].groups > 1
    assert reports["all"].peak_hessian_bytes < reports[1].peak_hessian_bytes


@pytest.mark.parametrize("family,config", [
    ("sd", PruneConfig(method="obs", sparsity=0.5)),
    ("sd", PruneConfig(method="wanda", sparsity=0.5, scope="global")),
    ("flux", PruneConfig(method="obs", sparsity=0.3, pattern="structured")),
    ("sd", PruneConfig(method="obs", sparsity=0.3, pattern="structured")),
    ("sd", PruneConfig(method="obs", sparsity=0.3, pattern="structured", prune_resnets=True)),
])
def test_save_load_round_trip_is_exact(tmp_path, family, config):
    pipe = build_tiny(family)
    prune_(pipe, config, calib=tiny_calibration(pipe, family))
    expected = generate(pipe, family)
    da.save(pipe, tmp_path / "pruned")
    base = build_tiny(family)
    loaded = da.load(base, tmp_path / "pruned")
    assert loaded is base and applied_techniques(base) == ["prune"]
    assert torch.equal(generate(base, family), expected)


def test_a_2_4_artifact_asks_for_sparse_kernels_on_load_as_prune_did(tmp_path, monkeypatch):
    """Loading put 2:4 layers back dense: on a GPU the saved pipeline ran sparse kernels and the loaded one not
    (tests/test_cuda.py checks the kernels there; a CPU has none, so here the request is what is checked)."""
    import diffusion_accel.prune.serialize as serialize

    pipe = prune_(build_tiny("sd"), PruneConfig(method="magnitude", pattern="2:4"))
    da.save(pipe, tmp_path)
    asked = []
    monkeypatch.setattr(serialize, "enable_sparse_kernels", lambda denoiser, names, pattern: asked.append(names))
    da.load(build_tiny("sd"), tmp_path)
    assert asked and sorted(asked[0]) == sorted(name for name in prune_report(pipe).layers_pruned)
    da.save(prune_(build_tiny("sd"), PruneConfig(method="magnitude", pattern="2:4", sparse_kernels=False)),
            tmp_path / "dense")
    da.load(build_tiny("sd"), tmp_path / "dense")
    assert len(asked) == 1


def test_unstructured_artifact_is_smaller_than_dense(tmp_path):
    pipe = build_tiny("sd")
    prune_(pipe, PruneConfig(method="magnitude", sparsity=0.5))
    da.save(pipe, tmp_path / "pruned")
    stored = (tmp_path / "pruned" / "00-prune.safetensors").stat().st_size
    dense = sum(pipe.unet.get_submodule(n).weight.numel() * 4 for n in prune_report(pipe).layers_pruned)
    assert stored < 0.6 * dense


def test_restore_onto_wrong_shapes_names_the_layer(tmp_path):
    pipe = build_tiny("sd")
    prune_(pipe, PruneConfig(method="magnitude", sparsity=0.3, pattern="structured"))
    config, tensors = export_prune(pipe)
    name = next(iter(config["record"]["base_shapes"]))
    config["record"]["base_shapes"][name] = [1, 1]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        restore_prune(build_tiny("sd"), config, tensors)


DROP_IN_CONFIGS = {"sd": PruneConfig(method="obs", sparsity=None, pattern="2:4", groups=1),
                   "flux": PruneConfig(method="obs", sparsity=0.3, pattern="structured", groups=1)}


@pytest.mark.parametrize("family", sorted(DROP_IN_CONFIGS))
def test_drop_in_contract(family):
    check_drop_in(family, lambda pipe: prune_(pipe, DROP_IN_CONFIGS[family], calib=tiny_calibration(pipe, family)))


def test_self_calibration_passes_calib_kwargs_to_the_pipeline():
    """Without a Calibration, prune_ calibrates itself at the call settings given in calib_kwargs."""
    from prune_helpers import PIPELINE_ONLY_KWARGS
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    pipe = build_tiny("flux")
    extra = {k: v for k, v in tiny_call_kwargs("flux").items() if k in PIPELINE_ONLY_KWARGS}
    extra |= {"negative_prompt": "", "true_cfg_scale": 3.0}  # Flux's true CFG: refused as calibrate's (session 31)
    config = PruneConfig(method="obs", sparsity=0.5, groups=1, calib_prompts=1, calib_num_steps=2, calib_kwargs=extra)
    seen, original = [], prune_apply.calibrate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prune_apply, "calibrate", lambda *a, **kw: seen.append(kw) or original(*a, **kw))
        prune_(pipe, config)
    assert seen and all(kw[k] == v for kw in seen for k, v in extra.items())
    assert PruneConfig.from_dict(config.to_dict()) == config


def test_nm_patterns_take_their_implied_sparsity_by_default():
    """PruneConfig(pattern="1:4") said 'implies sparsity 0.75; got sparsity=0.5', a value never passed; so did
    PruneConfig().with_(pattern="1:4"), whose 0.5 was the default's."""
    assert PruneConfig(pattern="1:4").target_sparsity == 0.75 and PruneConfig().sparsity == 0.5
    assert PruneConfig.from_dict(PruneConfig(pattern="3:4").to_dict()).target_sparsity == 0.25
    assert PruneConfig().with_(pattern="1:4").target_sparsity == 0.75
    assert PruneConfig(pattern="1:4").with_(pattern="unstructured").target_sparsity == 0.5
    with pytest.raises(ValueError, match="implies sparsity 0.75"):
        PruneConfig().with_(pattern="1:4", sparsity=0.5)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_patterns_whose_m_does_not_divide_obs_blocksize_work_for_the_other_methods(method):
    """Only OBS sweeps columns in blocks; 1:3 was refused for magnitude and Wanda over a blocksize they never read."""
    assert PruneConfig(method=method, pattern="1:3").nm == (1, 3)


def test_excluding_the_last_block_does_not_keep_the_one_before_it_dense():
    pipe = build_tiny("dit")
    report = prune_(pipe, PruneConfig(method="magnitude", exclude=("transformer_blocks.1",)))
    assert any(name.startswith("transformer_blocks.0.") for name in prune_report(pipe).layers_pruned), report


@pytest.mark.parametrize("config, match", [
    (PruneConfig(method="magnitude", exclude=("down_blocks.*",)), "exclude entry 'down_blocks.\\*' matches no module"),
    (PruneConfig(method="magnitude", pattern="1:7", blocksize=126), "nothing to prune"),  # no width % 7 == 0
    (PruneConfig(calib_kwargs={"num_inference_steps": 3}), "calib_kwargs may not set \\['num_inference_steps'\\]"),
    (PruneConfig(calib_kwargs={"weight_range": (0, 1)}), "calib_kwargs may not set \\['weight_range'\\]"),
])
def test_configs_that_cannot_act_as_asked_are_refused_before_pruning(config, match):
    pipe = build_tiny("sd")
    unet = pipe.unet
    with pytest.raises(ValueError, match=match):
        prune_(pipe, config)
    assert pipe.unet is unet and applied_techniques(pipe) == []


@pytest.mark.parametrize("config, match", [
    (PruneConfig(method="magnitude", exclude=("down_blocks.*",)), "exclude entry 'down_blocks.\\*' matches no module"),
    (PruneConfig(method="magnitude", pattern="1:7", blocksize=126), "nothing to prune"),
])
def test_prune_denoiser_refuses_what_prune_refuses(config, match):
    """The bare-denoiser entry point skipped the checks: a glob in exclude excluded nothing, silently."""
    from diffusion_accel.prune import prune_denoiser_

    unet = build_tiny("sd").unet
    before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_denoiser_(unet, config)
    assert all(torch.equal(before[name], tensor) for name, tensor in unet.state_dict().items())


def test_prune_denoiser_refuses_quantized_and_non_finite_denoisers_as_prune_does():
    """The bare-denoiser entry point checked no weights: a quantized denoiser was "nothing to prune", NaN weights
    and unmerged adapters went through."""
    from diffusion_accel.prune import prune_denoiser_
    from diffusion_accel.quant import PTQConfig, quantize_

    quantized = quantize_(build_tiny("sd"), PTQConfig(weights="int8", activations=None, calib_prompts=1,
                                                      calib_num_steps=2, calib_steps="all")).unet
    with pytest.raises(ValueError, match="already quantized; prune first"):
        prune_denoiser_(quantized, PruneConfig(method="magnitude", sparsity=0.5))
    broken = build_tiny("sd").unet
    with torch.no_grad():
        broken.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="prune_denoiser_ needs finite weights"):
        prune_denoiser_(broken, PruneConfig(method="magnitude", sparsity=0.5))


def test_structured_pruning_keeps_a_frozen_denoiser_frozen_also_through_load(tmp_path):
    """The rebuilt Linear / Conv / GroupNorm layers came back with requires_grad=True on a frozen base (84 of 324
    parameters on tiny SD): an optimiser over the trainable parameters (LoRA on a frozen base) trained them."""
    config = PruneConfig(method="magnitude", sparsity=0.3, pattern="structured")
    pipe = build_tiny("sd")
    pipe.unet.requires_grad_(False)
    prune_(pipe, config)
    assert not any(parameter.requires_grad for parameter in pipe.unet.parameters())
    da.save(pipe, tmp_path)
    base = build_tiny("sd")
    base.unet.requires_grad_(False)
    assert not any(parameter.requires_grad for parameter in da.load(base, tmp_path).unet.parameters())
    trainable = prune_(build_tiny("sd"), config)
    assert all(parameter.requires_grad for parameter in trainable.unet.parameters())


def test_prune_denoiser_under_inference_mode_makes_no_inference_tensors():
    """Its new structured layers were inference tensors: a backward through the denoiser and a later quantize_
    failed (prune_ had the guard, prune_denoiser_ not; session 47)."""
    from diffusion_accel.prune.apply import prune_denoiser_

    pipe = build_tiny("sd")
    with torch.inference_mode():
        prune_denoiser_(pipe.unet, PruneConfig(method="magnitude", sparsity=0.3, pattern="structured"))
    assert not any(tensor.is_inference() for tensor in pipe.unet.state_dict().values())


def test_structured_pruning_over_an_earlier_prunes_zeros_is_refused():
    """OBS compensation refilled the 2:4 zeros of the layers structured pruning updates (ff.net.2 kept none),
    silently, while the record still listed them as masked. The other order works."""
    pipe = build_tiny("sd")
    calib = tiny_calibration(pipe, "sd")
    prune_(pipe, PruneConfig(method="obs", pattern="2:4"), calib=calib)
    unet = pipe.unet
    with pytest.raises(ValueError, match="prune structured first, then unstructured or N:M"):
        prune_(pipe, PruneConfig(method="obs", pattern="structured", sparsity=0.3), calib=calib)
    assert pipe.unet is unet
    pipe = build_tiny("sd")
    prune_(pipe, PruneConfig(method="obs", pattern="structured", sparsity=0.3), calib=calib)
    prune_(pipe, PruneConfig(method="obs", pattern="2:4"), calib=calib)
    pipe = build_tiny("sd")  # magnitude scoring updates no weight: an unstructured prune's zeros survive it
    prune_(pipe, PruneConfig(method="magnitude", sparsity=0.5))
    zeros = {name: int((pipe.unet.get_submodule(name).weight == 0).sum()) for name in prune_report(pipe).layers_pruned}
    prune_(pipe, PruneConfig(method="magnitude", pattern="structured", sparsity=0.3))
    assert all(int((pipe.unet.get_submodule(name).weight == 0).sum()) > 0 for name in zeros)


def test_structured_pruning_leaves_a_unit_with_an_excluded_projection_whole():
    """exclude=(...attn1.to_q,) still shrank to_q from 16 to 8 rows."""
    pipe = build_tiny("sd")
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    before = {name: tuple(p.shape) for name, p in pipe.unet.named_parameters() if name.startswith(attention)}
    prune_(pipe, PruneConfig(method="magnitude", pattern="structured", sparsity=0.5, exclude=(f"{attention}.to_q",)))
    after = {name: tuple(p.shape) for name, p in pipe.unet.named_parameters() if name.startswith(attention)}
    assert after == before and prune_report(pipe).params_after < prune_report(pipe).params_before


def test_sparsity_zero_changes_nothing_when_calibrated_below_the_generation_size():
    """Calibrating at 8x8 left the 1x1 deepest level's 3x3 convs with only padding off-centre: their
    'dead' inputs were zeroed (29% of the weights at sparsity 0; images off by 0.18)."""
    pipe = build_tiny("sd")
    before = generate(pipe, "sd")
    with pytest.warns(UserWarning, match="had input columns no calibration input reached .*calibrate at the "
                                         "generation size"):
        prune_(pipe, PruneConfig(method="obs", sparsity=0.0, groups=1, calib_num_steps=2, calib_prompts=2,
                                 calib_kwargs={"height": 8, "width": 8}))
    assert prune_report(pipe).achieved_sparsity == 0.0 and prune_report(pipe).unobserved_inputs
    assert torch.equal(generate(pipe, "sd"), before)


def test_dit_calibrates_on_more_prompts_than_classes_by_cycling_them():
    from diffusion_accel.prune.apply import calibration_kwargs

    pipe = build_tiny("dit")
    classes = pipe.transformer.config.num_embeds_ada_norm
    prompts = calibration_kwargs(pipe, PruneConfig(calib_prompts=classes + 2), None)["prompts"]
    assert len(prompts) == classes + 2 and max(prompts) == classes - 1 and prompts[-1] == 1


def test_prune_config_names_its_step_count_as_ptq_does_and_reads_the_old_name():
    """PruneConfig.calib_steps was a count where PTQConfig.calib_steps is a step selection."""
    config = PruneConfig(method="obs", calib_num_steps=7)
    assert PruneConfig.from_dict(config.to_dict()) == config
    old = {key if key != "calib_num_steps" else "calib_steps": value for key, value in config.to_dict().items()}
    assert PruneConfig.from_dict(old) == config  # artifacts saved before the rename


def test_groups_whose_hessians_exceed_a_quarter_of_memory_are_split_into_more_sweeps(monkeypatch):
    """Groups hold equal numbers of layer groups, not bytes: full-size SD 1.5 at 4 groups planned 13.4 GiB of
    Hessians in one sweep, and memory ran out with no word. Now such groups are split to fit the budget."""
    import warnings

    from diffusion_accel.calib import hessian

    config = PruneConfig(method="obs", sparsity=0.5, groups=2, calib_prompts=1, calib_num_steps=2)
    roomy = prune_report(prune_(build_tiny("sd"), config))
    monkeypatch.setattr(hessian, "device_memory_bytes", lambda device: 16 * 2**20)  # budget 4 MiB: < a group
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = prune_report(prune_(build_tiny("sd"), config))
    assert roomy.groups == 2 and roomy.peak_hessian_bytes > 4 * 2**20
    assert split.groups > 2 and split.sweeps == split.groups and split.peak_hessian_bytes <= 4 * 2**20
    assert split.layers_pruned == roomy.layers_pruned


def test_a_single_layer_over_the_hessian_budget_gets_a_sweep_of_its_own_and_a_warning(monkeypatch):
    from diffusion_accel.calib import hessian
    from diffusion_accel.quant import PTQConfig, quantize_

    monkeypatch.setattr(hessian, "device_memory_bytes", lambda device: 2 * 2**20)  # budget 0.5 MiB: < one layer
    with pytest.warns(UserWarning, match=r"collects .* of input Hessians .*fewer layers per HessianCollector"):
        pipe = prune_(build_tiny("sd"), PruneConfig(method="obs", sparsity=0.5, groups=1, calib_prompts=1,
                                                    calib_num_steps=2))
    assert prune_report(pipe).groups > 10
    with pytest.warns(UserWarning, match=r"collects .* of input Hessians"):
        quantize_(build_tiny("sd"), PTQConfig.preset("w4a8", calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    assert hessian.hessian_bytes(torch.nn.Linear(10, 3), [""]) == 4 * (10 * 10 + 10)


def test_split_by_memory_keeps_units_in_order_and_counts_shared_layers_once():
    from diffusion_accel.prune.sequential import MemoryBudget, plan_groups, split_by_memory

    sizes = {"a": 4, "b": 4, "c": 9, "d": 1}
    budget = MemoryBudget(8, lambda names: sum(sizes[name] for name in names))
    units = [["a"], ["a"], ["b"], ["c"], ["d"], ["d"]]  # c alone exceeds the budget
    assert split_by_memory(units, list, budget) == [[["a"], ["a"], ["b"]], [["c"]], [["d"], ["d"]]]
    assert plan_groups(units, 2, list, budget) == [[["a"], ["a"], ["b"]], [["c"]], [["d"], ["d"]]]
    assert plan_groups(units, 2, list) == [[["a"], ["a"], ["b"]], [["c"], ["d"], ["d"]]]

@pytest.mark.parametrize("store_trajectory", [True, False])
def test_a_calibration_of_another_architecture_is_refused_as_quantize_refuses_it(store_trajectory):
    """prune_ compared only the denoiser class: an SDXL calibration was accepted for SD (both
    UNet2DConditionModel), while quantize_ refused it; quantize_ refused it only when it replayed a stored
    trajectory (without one it reran SDXL's prompts on SD), and weight-only configs took any object (session 51)."""
    import diffusion_accel as da
    from diffusion_accel.testing.tiny import build_tiny

    sdxl_calibration = da.calibrate(build_tiny("sdxl"), ["a cat"], num_inference_steps=2, progress=False,
                                    store_trajectory=store_trajectory)
    pipe = build_tiny("sd")
    unet = pipe.unet
    with pytest.raises(ValueError, match=r"recorded on a StableDiffusionXLPipeline .* differs in"):
        da.prune_(pipe, da.PruneConfig(method="wanda", sparsity=0.5), calib=sdxl_calibration)
    for config in (da.PTQConfig.preset("w8a8"), da.PTQConfig.preset("w8a16")):
        with pytest.raises(ValueError, match=r"recorded on a StableDiffusionXLPipeline .* differs in"):
            da.quantize_(pipe, config, calib=sdxl_calibration)
        with pytest.raises(TypeError, match="calib must be a Calibration from da.calibrate or None, got str"):
            da.quantize_(pipe, config, calib="oops")
    assert pipe.unet is unet and not applied_techniques(pipe)


def test_a_failed_prune_of_a_compiled_pipeline_keeps_its_compile_wrapper(monkeypatch):
    """The rollback set back the bare module, dropping the user's torch.compile wrapper (until session 41)."""
    import diffusion_accel as da
    from diffusion_accel.testing.tiny import build_tiny

    pipe = build_tiny("sd")
    compiled = pipe.unet = torch.compile(pipe.unet, backend="eager")
    monkeypatch.setattr(prune_apply, "prune_denoiser_", lambda *args: (_ for _ in ()).throw(RuntimeError("failed")))
    with pytest.raises(RuntimeError, match="failed"):
        da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.5))
    assert pipe.unet is compiled


def test_pruning_a_compiled_pipeline_says_the_pruned_copy_is_not_compiled():
    """prune_ swaps in a pruned copy of the denoiser: a torch.compile wrapper (or in-place compilation) was
    dropped without a word."""
    import diffusion_accel as da
    from diffusion_accel.testing.tiny import build_tiny

    pipe = build_tiny("sd")
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    with pytest.warns(UserWarning, match="prune_ replaced the compiled pipe.unet .* not compiled"):
        da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uncompiled pipeline: no such warning
        da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5))


def test_weights_stored_as_tensor_subclasses_are_refused_clearly():
    """A UNet quantized with torchao's own quantize_ (Int8Tensor weights) ended prune_ / quantize_ in
    "NotImplementedError: Int8Tensor dispatch: ... aten.abs"; 2:4 kernel storage likewise."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as torchao_quantize

    import diffusion_accel as da
    from diffusion_accel.testing.tiny import build_tiny

    pipe = build_tiny("sd")
    torchao_quantize(pipe.unet, Int8WeightOnlyConfig())
    unet = pipe.unet
    for apply in (lambda: da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.5)),
                  lambda: da.quantize_(pipe, da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all"))):
        with pytest.raises(ValueError, match=r"needs floating-point weights, but '.*' is a Int8Tensor .*torchao"):
            apply()
        assert pipe.unet is unet and da.artifact.applied_techniques(pipe) == []
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    from diffusion_accel.arch.registry import check_not_prequantized

    layer = torch.nn.Linear(64, 64).to(torch.bfloat16)
    layer.weight = torch.nn.Parameter(SparseSemiStructuredTensorCUTLASS(
        layer.weight.shape, packed=layer.weight.detach().clone(), meta=torch.zeros(1, dtype=torch.int16),
        packed_t=None, meta_t=None, compressed_swizzled_bitmask=None), requires_grad=False)
    with pytest.raises(ValueError, match=r"stored for 2:4 sparse kernels .*sparse_kernels=False"):
        check_not_prequantized(layer, "quantize_")


def test_a_2_4_artifact_with_a_rounding_cast_loads_by_spec_where_sparse_kernels_exist(tmp_path, monkeypatch):
    """Pruned in bf16, cast to float32, saved: load_pipeline loads the base in bf16, where a GPU gives the restored
    layers 2:4 kernels, and then casts; torch casts semi-structured weights to no dtype (NotImplementedError).
    A GPU with 2:4 kernels is emulated: torch's device check is bypassed, its other checks kept."""
    from torch.sparse import SparseSemiStructuredTensor

    import diffusion_accel.prune.serialize as serialize
    import diffusion_accel.prune.sparse as sparse
    from diffusion_accel.loading import load_pipeline

    pipe = load_pipeline("tiny:sd", dtype="bf16")
    prune_(pipe, PruneConfig(method="magnitude", pattern="2:4"))
    pipe.to(torch.float32)
    da.save(pipe, tmp_path)
    validate = SparseSemiStructuredTensor._validate_device_dim_dtype_shape.__func__

    class OnCuda:
        def __init__(self, tensor):
            self.tensor = tensor

        def __getattr__(self, name):
            return True if name == "is_cuda" else getattr(self.tensor, name)

    monkeypatch.setattr(SparseSemiStructuredTensor, "_validate_device_dim_dtype_shape",
                        classmethod(lambda cls, tensor: validate(cls, OnCuda(tensor))))
    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    monkeypatch.setattr(sparse, "sparse_kernel_unavailable",
                        lambda weight, pattern, backend="auto": None if weight.dtype == torch.bfloat16 else "dense")
    converted = []
    monkeypatch.setattr(serialize, "enable_sparse_kernels",
                        lambda *args: converted.append(sparse.enable_sparse_kernels(*args)) or converted[-1])
    loaded = load_pipeline(str(tmp_path))
    assert "2:4 sparse kernels enabled on" in converted[0] and loaded.unet.dtype == torch.float32
    assert torch.equal(generate(loaded, "sd"), generate(pipe, "sd"))


@pytest.mark.parametrize("method, scope", [("obs", "layer"), ("wanda", "layer"), ("obs", "global"),
                                           ("wanda", "global"), ("magnitude", "layer")])
def test_a_grouped_conv_stays_dense_under_every_method(method, scope):
    """Magnitude left a depthwise Conv2d dense, as skip_reason says; OBS and Wanda read their groups' Hessians at the
    first layer and raised TypeError in the Hessian collector (a custom denoiser with a depthwise downsampler)."""
    from torch import nn

    from diffusion_accel.prune.surgery import replace_module

    pipe = build_tiny("sd")
    name = "down_blocks.0.downsamplers.0.conv"
    old = pipe.unet.get_submodule(name)
    replace_module(pipe.unet, name, nn.Conv2d(old.in_channels, old.out_channels, 3, stride=old.stride,
                                              padding=old.padding, groups=old.in_channels))
    weight = pipe.unet.get_submodule(name).weight.detach().clone()
    prune_(pipe, PruneConfig(method=method, sparsity=0.5, scope=scope, groups=2, calib_prompts=1, calib_num_steps=2,
                             calib_kwargs=(("height", 32), ("width", 32))))
    report = prune_report(pipe)
    assert report.layers_skipped[name] == f"grouped Conv2d (groups={old.in_channels})"
    assert torch.equal(pipe.unet.get_submodule(name).weight, weight) and abs(report.achieved_sparsity - 0.5) < 0.01



@pytest.mark.parametrize("pattern", ["unstructured", "structured"])
def test_calibrated_steps_that_all_weigh_zero_are_refused(pattern):
    """weight_range from 0 gives the last step weight 0: a calibration of that step alone left structured pruning
    skipping every block as unobserved, removing nothing, with no warning (session 53 review)."""
    pipe = build_tiny("sd")
    calib = da.calibrate(pipe, ["a cat", "a dog"], num_inference_steps=3, steps=[2], store_trajectory=False,
                         progress=False, height=32, width=32)
    before = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    config = PruneConfig(method="obs", sparsity=0.5, pattern=pattern, weight_range=(0.0, 1.2))
    with pytest.raises(ValueError, match=r"every calibrated step that ran, \[2\], has weight 0 under "
                                         r"weighting='log-decrease'"):
        prune_(pipe, config, calib=calib)
    after = pipe.unet.state_dict()
    assert applied_techniques(pipe) == [] and all(torch.equal(after[name], before[name]) for name in before)
    from diffusers import StableDiffusionImg2ImgPipeline  # step 0 selected but never run: only step 2 observed

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    with pytest.warns(UserWarning, match="did not run"):
        calib = da.calibrate(img2img, ["a cat", "a dog"], num_inference_steps=3, steps=[0, 2], strength=0.5,
                             image=torch.full((1, 3, 32, 32), 0.5), store_trajectory=False, progress=False)
    with pytest.raises(ValueError, match=r"every calibrated step that ran, \[2\], has weight 0"):
        prune_(img2img, config, calib=calib)


def test_obs_pruning_and_gptq_run_under_a_float64_default_dtype():
    """The Hessian accumulators followed torch's default dtype: float64 there met float32 rows, "self and mat2 must
    have the same dtype" (session 53 review)."""
    pipe = build_tiny("sd")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        prune_(pipe, PruneConfig(method="obs", sparsity=0.3, calib_prompts=1, calib_num_steps=2))
        da.quantize_(pipe, da.PTQConfig(weights="int4", activations=None, weight_rounding="gptq", calib_prompts=1,
                                        calib_num_steps=2, calib_steps="all"))
    finally:
        torch.set_default_dtype(previous)
    assert applied_techniques(pipe) == ["prune", "ptq"]
