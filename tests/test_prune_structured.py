"""Structured pruning: removing heads / FFN neurons whose weights are already zero changes nothing."""

import pytest
import torch

from diffusion_accel import get_adapter
from diffusion_accel.prune import PruneConfig, prune_, prune_denoiser_
from diffusion_accel.prune.structured import attention_outputs
from diffusion_accel.testing.tiny import build_tiny

from prune_helpers import generate

FRACTION = 0.5


def zero_prunable_units(pipe, fraction: float) -> tuple[int, int]:
    """Zero the output columns of the first round(n * fraction) FFN neurons and heads of every unit."""
    adapter = get_adapter(pipe)
    denoiser = adapter.denoiser
    heads = neurons = 0
    with torch.no_grad():
        for ffn in adapter.ffns():
            count = min(round(ffn.hidden * fraction), ffn.hidden - 1)
            start = ffn.proj_out_offset
            denoiser.get_submodule(ffn.proj_out).weight[:, start:start + count] = 0
            neurons += count
        for attn in adapter.attention():
            count = min(round(attn.heads * fraction), attn.heads - 1)
            for name, start in attention_outputs(attn):
                denoiser.get_submodule(name).weight[:, start:start + count * attn.head_dim] = 0
            heads += count
    return heads, neurons


@pytest.mark.parametrize("family", ["sd", "flux", "sd3", "dit", "ddpm"])
def test_removing_zero_units_keeps_outputs(family):
    pipe = build_tiny(family)
    heads, neurons = zero_prunable_units(pipe, FRACTION)
    before = generate(pipe, family)
    config = PruneConfig(method="magnitude", sparsity=FRACTION, pattern="structured", keep_last_block_dense=False)
    report = prune_denoiser_(get_adapter(pipe).denoiser, config)
    after = generate(pipe, family)
    assert (report.heads_removed, report.neurons_removed) == (heads, neurons)
    assert report.params_after < report.params_before
    assert torch.allclose(before, after, atol=1e-5)


def test_gated_ffn_and_heads_shrink_layers():
    pipe = build_tiny("sd")
    adapter = get_adapter(pipe)
    ffn, attn = adapter.ffns()[0], adapter.attention()[0]
    assert ffn.gated
    prune_denoiser_(adapter.denoiser, PruneConfig(method="magnitude", sparsity=0.25, pattern="structured"))
    after_ffn = next(f for f in get_adapter(pipe).ffns() if f.name == ffn.name)
    after_attn = next(a for a in get_adapter(pipe).attention() if a.name == attn.name)
    assert after_ffn.hidden == ffn.hidden - round(ffn.hidden * 0.25)
    assert adapter.denoiser.get_submodule(ffn.proj_in[0]).out_features == 2 * after_ffn.hidden
    assert after_attn.heads == attn.heads - round(attn.heads * 0.25)
    assert adapter.denoiser.get_submodule(attn.to_k).out_features == after_attn.heads * attn.head_dim


def test_flux_single_block_offset_columns():
    pipe = build_tiny("flux")
    block = pipe.transformer.single_transformer_blocks[0]
    width, hidden = block.attn.to_q.out_features, block.proj_mlp.out_features
    prune_denoiser_(pipe.transformer, PruneConfig(method="magnitude", sparsity=0.5, pattern="structured"))
    new_hidden, heads = block.proj_mlp.out_features, block.attn.heads
    assert new_hidden == hidden // 2 and heads == 1
    assert block.proj_out.in_features == heads * (width // 2) + new_hidden


def zero_resnet_groups(pipe, fraction: float) -> int:
    """Zero conv2's input columns of the first round(groups * fraction) GroupNorm groups of every ResNet."""
    adapter = get_adapter(pipe)
    channels = 0
    with torch.no_grad():
        for resnet in adapter.resnets():
            count = min(round(resnet.groups * fraction), resnet.groups - 1)
            width = count * resnet.channels // resnet.groups
            adapter.denoiser.get_submodule(resnet.conv2).weight[:, :width] = 0
            channels += width
    return channels


@pytest.mark.parametrize("family", ["sd", "ddpm"])
def test_removing_zero_resnet_groups_keeps_outputs(family):
    pipe = build_tiny(family)
    channels = zero_resnet_groups(pipe, FRACTION)
    before = generate(pipe, family)
    config = PruneConfig(method="magnitude", sparsity=FRACTION, pattern="structured", keep_last_block_dense=False,
                         prune_heads=False, prune_ffn=False, prune_resnets=True)
    report = prune_denoiser_(get_adapter(pipe).denoiser, config)
    assert channels > 0 and report.channels_removed == channels
    assert torch.allclose(before, generate(pipe, family), atol=1e-5)


def test_resnet_pruning_shrinks_conv_norm_and_time_projection_together():
    pipe = build_tiny("sd")
    before = {r.name: r for r in get_adapter(pipe).resnets()}
    prune_denoiser_(get_adapter(pipe).denoiser, PruneConfig(method="magnitude", sparsity=0.25, pattern="structured",
                                                            prune_resnets=True))
    denoiser = pipe.unet
    shrunk = [r for r in get_adapter(pipe).resnets() if r.channels < before[r.name].channels]
    assert shrunk
    for info in shrunk:
        old = before[info.name]
        assert info.groups == old.groups - round(old.groups * 0.25)
        assert info.channels == info.groups * old.channels // old.groups
        assert denoiser.get_submodule(info.conv2).in_channels == info.channels
        assert denoiser.get_submodule(info.time_emb_proj).out_features == info.channels
        assert denoiser.get_submodule(info.norm2).weight.shape == (info.channels,)


def test_obs_resnet_pruning_beats_magnitude_on_the_calibration_trajectory():
    from prune_helpers import tiny_calibration

    errors = {}
    reference = generate(build_tiny("sd"), "sd")
    for method in ("obs", "magnitude"):
        pipe = build_tiny("sd")
        config = PruneConfig(method=method, sparsity=0.25, pattern="structured", prune_heads=False, prune_ffn=False,
                             prune_resnets=True, groups=1)
        prune_(pipe, config, calib=tiny_calibration(pipe, "sd"))
        errors[method] = float((generate(pipe, "sd") - reference).pow(2).mean())
    assert errors["obs"] < errors["magnitude"]


def test_structured_summary_states_the_target_per_unit_and_the_parameter_reduction():
    """The headline used to read 'target sparsity 0.990, reached 0.237': a per-unit head/neuron fraction
    against a whole-denoiser parameter share, with no word on the one head always kept."""
    from diffusion_accel.prune import prune_report

    pipe = prune_(build_tiny("sd"), PruneConfig(method="magnitude", sparsity=0.99, pattern="structured"))
    report = prune_report(pipe)
    reduction = 1 - report.params_after / report.params_before
    headline = report.summary().splitlines()[0]
    assert "removing 0.990 of each unit's heads, FFN neurons and channels (one always kept)" in headline
    assert f"denoiser parameters -{reduction:.1%}" in headline and "reached" not in headline


def test_attention_with_ip_adapter_projections_keeps_its_heads():
    """IP-Adapter processors hold image key/value projections of their own that head removal did not resize:
    structured pruning crashed the next calibration sweep with a shape error (FFN neurons are still pruned)."""
    import diffusion_accel as da
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    from diffusion_accel.testing.tiny import TEXT_DIM, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(0)
    unet = pipe.unet
    processors = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        processors[name] = AttnProcessor2_0() if name.endswith("attn1.processor") else IPAdapterAttnProcessor2_0(
            attention.to_q.out_features, cross_attention_dim=TEXT_DIM, num_tokens=(4,), scale=1.0)
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=TEXT_DIM, image_embed_dim=16, num_image_text_embeds=4)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(5))]
    calib = da.calibrate(pipe, ["a red bicycle"], num_inference_steps=3, progress=False, height=32, width=32,
                         ip_adapter_image_embeds=embeds)
    da.prune_(pipe, da.PruneConfig(method="obs", sparsity=0.3, pattern="structured"), calib=calib)
    report = da.prune_report(pipe)
    kept = [name for name, why in report.layers_skipped.items() if "IP-Adapter" in why]
    assert kept and all(name.endswith("attn2") for name in kept)
    assert report.heads_removed > 0 and report.neurons_removed > 0  # attn1 heads and FFNs still pruned
    images = pipe("a red bicycle", num_inference_steps=3, height=32, width=32, output_type="pt",
                  ip_adapter_image_embeds=embeds).images
    assert torch.isfinite(images).all()


def test_the_structured_report_lists_what_exclude_kept_dense():
    """The unstructured report listed excluded layers; the structured one named only the last block, so
    summary() said 'left dense: 1' beside an attention kept whole on purpose."""
    from diffusion_accel.prune import prune_report

    pipe = build_tiny("sd")
    excluded = get_adapter(pipe).attention()[0].name
    prune_(pipe, PruneConfig(method="magnitude", pattern="structured", sparsity=0.5, exclude=(excluded,)))
    assert pipe.unet.get_submodule(excluded).heads == 8
    skipped = prune_report(pipe).layers_skipped
    assert skipped[excluded].startswith("excluded") and list(skipped.values()).count("last block kept dense") == 1


def test_a_structured_sparsity_that_rounds_to_nothing_is_refused_and_whole_kinds_are_named():
    """0.05 of 8 heads rounds to none: pruning removed nothing, warned nothing and reported every output layer
    pruned (the artifact held them as resized). Only the layers that lost columns are reported now."""
    import warnings

    from diffusion_accel.prune import prune_report

    pipe = build_tiny("sd")
    before = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"structured sparsity 0.05 removes nothing: heads \(round\(8 x 0.05\) = 0"):
        prune_(pipe, PruneConfig(method="magnitude", sparsity=0.05, pattern="structured", prune_ffn=False))
    assert all(torch.equal(before[name], value) for name, value in pipe.unet.state_dict().items())
    with pytest.warns(UserWarning, match=r"structured sparsity 0.05 leaves whole: heads"):
        prune_(pipe, PruneConfig(method="magnitude", sparsity=0.05, pattern="structured"))
    report = prune_report(pipe)
    assert report.heads_removed == 0 and report.neurons_removed > 0
    assert report.layers_pruned and all(name.endswith("ff.net.2") for name in report.layers_pruned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_(build_tiny("sd"), PruneConfig(method="magnitude", sparsity=0.3, pattern="structured"))
