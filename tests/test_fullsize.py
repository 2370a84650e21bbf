"""testing/fullsize.py: published configs (parameter counts on meta), example inputs, one real forward."""

import pytest
import torch

from diffusion_accel.testing.fullsize import PUBLISHED_PARAMETERS, build_fullsize, dit_xl_2


def parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("name, overrides", [
    ("sd15", {}), ("sdxl", {}), ("pixart", {}), ("flux", {"num_layers": 19, "num_single_layers": 38}),
])
def test_parameter_counts_match_published_models(name, overrides):
    module, _ = build_fullsize(name, device="meta", **overrides)
    assert parameters(module) == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.01)


def test_dit_xl_2_matches_published_count_with_the_shared_embedder_counted_once():
    model, _ = dit_xl_2(device="meta")
    per_block_embedder = parameters(model.transformer_blocks[0].norm1.emb)
    copies = len(model.transformer_blocks) - 1
    assert parameters(model) - copies * per_block_embedder == pytest.approx(PUBLISHED_PARAMETERS["dit"], rel=0.01)


def test_pixart_512_has_no_size_conditioning():
    model, make_inputs = build_fullsize("pixart", device="meta", resolution=512)
    assert not model.use_additional_conditions and model.config.sample_size == 64
    assert make_inputs(1)["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}


@pytest.mark.parametrize("name, resolution, expected", [
    ("sd15", 512, (2, 4, 64, 64)), ("sdxl", 1024, (2, 4, 128, 128)), ("pixart", 1024, (2, 8, 128, 128)),
    ("dit", 256, (2, 8, 32, 32)), ("flux", 1024, (2, 4096, 64)),
])
def test_example_inputs_run_through_the_published_architecture_on_meta(name, resolution, expected):
    module, make_inputs = build_fullsize(name, device="meta", dtype=torch.bfloat16)
    inputs = make_inputs(batch_size=2, resolution=resolution)
    output = module(**inputs, return_dict=False)[0]
    assert tuple(output.shape) == expected and output.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_depth_dit_runs_a_real_forward(dtype):
    model, make_inputs = build_fullsize("dit", num_layers=2, dtype=dtype)
    with torch.no_grad():
        output = model(**make_inputs(batch_size=1, resolution=64)).sample
    assert output.shape == (1, 8, 8, 8) and output.dtype == dtype and torch.isfinite(output).all()
    assert next(model.parameters()).dtype == dtype and not model.training


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="unknown full-size model 'sd2'"):
        build_fullsize("sd2", device="meta")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_fullsize("sd15", device="meta")[1](1, 500)
    with pytest.raises(ValueError, match="512 or 1024"):
        build_fullsize("pixart", device="meta", resolution=768)
