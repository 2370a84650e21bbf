"""diffusers' save_pretrained and fuse_qkv_projections on accelerated pipelines: refused where diffusers
would write a model from_pretrained cannot read back (PTQ codes, structured pruning's shapes) or fuse
quantized projections; unchanged where the weights stay diffusers weights."""

import copy

import pytest
import torch
from diffusers import DiffusionPipeline

import diffusion_accel as da
from diffusion_accel.pretrained_guard import UnfusableModelError, UnsavableModelError, mismatched_tensors
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

PROMPTS = ["a cat", "a dog"]


def _images(pipe):
    return pipe(**tiny_call_kwargs("sd", steps=4)).images


@pytest.fixture(scope="module")
def calib():
    return da.calibrate(build_tiny("sd"), PROMPTS, num_inference_steps=4, progress=False)


def test_quantized_pipeline_refuses_save_pretrained_before_writing_anything(tmp_path, calib):
    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset("w8a8"), calib=calib)
    with pytest.raises(UnsavableModelError, match=r"\['ptq'\] changed \d+ of its tensors.*diffusion_accel.save"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    with pytest.raises(UnsavableModelError, match="UNet2DConditionModel"):
        pipe.unet.save_pretrained(tmp_path / "unet")
    assert not (tmp_path / "unet").exists()


def test_structured_pruning_refuses_save_pretrained(tmp_path, calib):
    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="obs", sparsity=0.3, pattern="structured"),
                     calib=calib)
    assert any(name.endswith("to_k.weight") for name in mismatched_tensors(pipe.unet))  # fewer heads
    with pytest.raises(UnsavableModelError, match=r"\['prune'\]"):
        pipe.save_pretrained(tmp_path)


def test_weight_preserving_techniques_save_and_reload_through_diffusers(tmp_path, calib):
    pruned = da.prune_(build_tiny("sd"), da.PruneConfig(method="obs", sparsity=0.5), calib=calib)
    pruned.save_pretrained(tmp_path / "pruned")
    assert torch.equal(_images(DiffusionPipeline.from_pretrained(tmp_path / "pruned")), _images(pruned))
    cached = da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=2, branch=0))
    cached.save_pretrained(tmp_path / "cached")  # the weights are the base's; the cache is runtime state
    assert torch.equal(_images(DiffusionPipeline.from_pretrained(tmp_path / "cached")), _images(build_tiny("sd")))


def test_a_deep_copy_guards_itself_and_the_check_reads_its_own_tensors(calib):
    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset("w8a8"), calib=calib)
    duplicate = copy.deepcopy(pipe.unet)
    assert duplicate.save_pretrained.__self__ is duplicate
    assert mismatched_tensors(duplicate) == mismatched_tensors(pipe.unet) != []
    assert mismatched_tensors(build_tiny("sd").unet) == []


@pytest.mark.parametrize("preset", ["w8a8", "w8a16"])  # int8 GEMM layers; weight-only stored layers
def test_quantized_pipeline_refuses_fuse_qkv_projections_and_keeps_working(calib, preset):
    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset(preset), calib=calib)
    before = _images(pipe)
    with pytest.raises(UnfusableModelError, match=r"attn1\.to_q \(\w+\): techniques \['ptq'\]"):
        pipe.fuse_qkv_projections()
    assert not any(name.endswith("to_qkv") for name, _ in pipe.unet.named_modules())
    assert torch.equal(_images(pipe), before)


def test_pruned_projections_fuse_and_unfuse_as_diffusers_does(calib):
    """Structured pruning keeps plain (smaller) Linear projections: fusing them gives the same images."""
    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="obs", sparsity=0.5, pattern="structured"),
                     calib=calib)
    before = _images(pipe)
    pipe.fuse_qkv_projections()
    assert torch.allclose(_images(pipe), before, atol=1e-5)
    pipe.unfuse_qkv_projections()  # legacy Attention keeps fused_projections=True: techniques still apply
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2, branch=0))
    assert torch.isfinite(_images(pipe)).all()


def test_a_pipeline_built_from_the_quantized_components_names_what_it_already_wrote(tmp_path, calib):
    """from_pipe shares the quantized UNet, not the guarded pipeline instance: diffusers writes the
    components before the UNet, so the UNet's refusal names them and points to da.save."""
    from diffusers import AutoPipelineForImage2Image

    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset("w8a8"), calib=calib)
    sibling = AutoPipelineForImage2Image.from_pipe(pipe)
    with pytest.raises(UnsavableModelError, match=r"already written \['vae', 'text_encoder', 'tokenizer'\]"):
        sibling.save_pretrained(tmp_path / "sibling")
    assert not (tmp_path / "sibling" / "unet").exists()
    with pytest.raises(UnsavableModelError) as direct:  # a direct call has nothing to name
        pipe.unet.save_pretrained(tmp_path / "unet")
    assert "already written" not in str(direct.value)
    da.save(sibling, tmp_path / "artifact")
    reloaded = da.load(build_tiny("sd"), tmp_path / "artifact")
    assert torch.equal(_images(reloaded), _images(pipe))


def test_an_accelerated_denoiser_pickles_and_its_guards_come_along(calib):
    """The guards were bound methods on the instance, pickled as getattr(unet, '_guarded_model_save'):
    torch.load of a torch.save'd quantized UNet raised AttributeError."""
    import io

    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset("w8a8"), calib=calib)
    buffer = io.BytesIO()
    torch.save(pipe.unet, buffer)
    buffer.seek(0)
    other = build_tiny("sd")
    other.unet = torch.load(buffer, weights_only=False)
    assert torch.equal(_images(other), _images(pipe))
    with pytest.raises(UnsavableModelError):
        other.unet.save_pretrained("never-written")
