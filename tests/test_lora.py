"""LoRA adapters (peft) on the denoiser: weight-changing techniques refuse unmerged adapters before
changing anything and work once they are fused; caching works with them loaded."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig

import diffusion_accel as da
from diffusion_accel.artifact import applied_techniques
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _images(pipe):
    return pipe(**tiny_call_kwargs("sd", steps=3)).images


def _with_lora():
    pipe = build_tiny("sd")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    return pipe


@pytest.fixture(scope="module")
def calib():
    return da.calibrate(_with_lora(), ["a cat", "a dog"], num_inference_steps=3, progress=False)


@pytest.mark.parametrize("apply", [
    lambda pipe, calib: da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib),
    lambda pipe, calib: da.prune_(pipe, da.PruneConfig(sparsity=0.5, pattern="structured"), calib=calib),
], ids=["quantize_", "prune_"])
def test_unmerged_lora_is_refused_before_anything_changes(calib, apply):
    pipe = _with_lora()
    before = _images(pipe)
    with pytest.raises(ValueError, match=r"adapters \(LoRA, via peft\) wrap: 56 .*attn1\.to_q.*fuse_lora\(\)"):
        apply(pipe, calib)
    assert applied_techniques(pipe) == [] and torch.equal(_images(pipe), before)


def test_fused_lora_quantizes_and_caching_works_with_adapters_loaded(calib):
    cached = da.enable_cache(_with_lora(), da.DeepCacheConfig(interval=2))
    assert torch.isfinite(_images(cached)).all()
    pipe = _with_lora()
    with_adapters = _images(pipe)
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    assert torch.allclose(_images(pipe), with_adapters, atol=1e-5)
    da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert type(attn.to_q).__name__ == "Int8Linear"  # the merged projection is quantized, not skipped


def test_saving_a_pipeline_with_unmerged_adapters_warns_that_the_artifact_lacks_them(tmp_path):
    """Adapters added after a technique change the images, but the artifact holds only the techniques."""
    pipe = da.enable_cache(_with_lora(), da.DeepCacheConfig(interval=2))
    with pytest.warns(UserWarning, match=r"unmerged adapters \(LoRA, via peft\) on 56 layers.*\['cache'\]"):
        da.save(pipe, tmp_path)
    da.remove_cache(pipe)
    pipe.unload_lora_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        da.save(da.enable_cache(pipe, da.DeepCacheConfig(interval=2)), tmp_path / "without")


def test_save_refuses_weights_changed_after_the_techniques_by_a_fused_lora(tmp_path):
    """A LoRA fused into a pruned UNet was dropped silently: the artifact held the weights of prune time."""
    from peft import LoraConfig

    import diffusion_accel as da
    from diffusion_accel.artifact import ArtifactError
    from diffusion_accel.testing.tiny import build_tiny

    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5))
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"], init_lora_weights=False))
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    with pytest.raises(ArtifactError, match="changed after \\['prune'\\] were applied"):
        da.save(pipe, tmp_path / "art")
    assert not (tmp_path / "art" / "manifest.json").exists()


@pytest.mark.parametrize("then", ["cache", "ptq", "calibrate_schedule"])
def test_save_refuses_weights_changed_between_techniques(tmp_path, then):
    """The next technique (or calibrate_schedule's trial caches) retook the sample save compares with: the change
    was saved as the old weights, and the artifact reloaded other images, until session 45."""
    import diffusion_accel as da
    from diffusion_accel.artifact import ArtifactError
    from diffusion_accel.testing.tiny import build_tiny

    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.3))
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(1.5)
    if then == "cache":
        da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    elif then == "ptq":
        da.quantize_(pipe, da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    else:
        da.calibrate_schedule(pipe, ["a cat"], budget=0.5, num_inference_steps=4, height=32, width=32)
    with pytest.raises(ArtifactError, match="changed after \\['prune'\\] were applied \\(e.g. conv_out.weight"):
        da.save(pipe, tmp_path / "art")
    assert not (tmp_path / "art" / "manifest.json").exists()


def test_save_works_again_once_changed_weights_are_restored_exactly(tmp_path):
    """A refused save noted the change for good: the weights copied back bit for bit stayed refused ("would restore
    them as they were then", which was then true of nothing)."""
    import diffusion_accel as da
    from diffusion_accel.artifact import ArtifactError
    from diffusion_accel.testing.tiny import build_tiny

    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5))
    weight = pipe.unet.conv_out.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(2)
    with pytest.raises(ArtifactError, match="changed after \\['prune'\\] were applied"):
        da.save(pipe, tmp_path / "changed")
    with torch.no_grad():
        weight.copy_(kept)
    da.save(pipe, tmp_path / "restored")
    assert torch.equal(_images(da.load(build_tiny("sd"), tmp_path / "restored")), _images(pipe))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_refuses_a_small_weight_change_in_a_half_precision_pipeline(tmp_path, dtype):
    """The tolerance that recognises a base rounded along another path (one bfloat16 step) let a 0.3% change made
    after prune_ through save's check, which compares one model with itself."""
    import diffusion_accel as da
    from diffusion_accel.artifact import ArtifactError
    from diffusion_accel.testing.tiny import build_tiny

    pipe = da.prune_(build_tiny("sd").to(dtype), da.PruneConfig(method="magnitude", sparsity=0.5))
    with torch.no_grad():
        for parameter in pipe.unet.parameters():
            parameter.mul_(1.003)
    with pytest.raises(ArtifactError, match="changed after \\['prune'\\] were applied"):
        da.save(pipe, tmp_path / "art")


def test_an_artifact_saved_beside_an_unmerged_lora_names_the_plain_base(tmp_path):
    """The save warning says to load the adapters again after load(), but the artifact's fingerprint held the
    LoRA's tensors: the plain base was refused as "a different base model", also after unload_lora_weights."""
    pipe = da.enable_cache(_with_lora(), da.DeepCacheConfig(interval=2))
    with_adapters = _images(pipe)
    with pytest.warns(UserWarning, match="load the adapters again"):
        da.save(pipe, tmp_path / "art")
    loaded = da.load(build_tiny("sd"), tmp_path / "art")
    torch.manual_seed(0)  # the same LoRA as _with_lora's
    loaded.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    assert torch.equal(_images(loaded), with_adapters)
    pipe.unload_lora_weights()  # the base's own weights again: saved, it loads onto the plain base too
    da.save(pipe, tmp_path / "unloaded")
    assert torch.equal(_images(da.load(build_tiny("sd"), tmp_path / "unloaded")), _images(pipe))


def test_save_pretrained_with_unmerged_adapters_names_them_not_the_techniques(tmp_path):
    """The refusal said "techniques ['cache'] changed 112 of its tensors": caching changed none, peft's renamed
    layers were the mismatch."""
    from diffusion_accel.pretrained_guard import UnsavableModelError

    pipe = da.enable_cache(_with_lora(), da.DeepCacheConfig(interval=2))
    with pytest.raises(UnsavableModelError, match=r"unmerged adapters \(LoRA, via peft\) wrap 56 .*fuse_lora"):
        pipe.save_pretrained(tmp_path / "pipe")
    quantized = _with_lora()
    quantized.fuse_lora(components=["unet"])
    quantized.unload_lora_weights()
    da.quantize_(quantized, da.PTQConfig.preset("w8a8", calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    with pytest.raises(UnsavableModelError, match=r"techniques \['ptq'\] changed"):
        quantized.save_pretrained(tmp_path / "quantized")


def _flux_lora(pipe):
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["proj_out", "to_q"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.mul_(10)
    return pipe


def _flux_images(pipe):
    return pipe(**tiny_call_kwargs("flux", steps=6)).images


def test_the_output_cache_follows_proj_out_when_peft_wraps_or_unwraps_it():
    """The default transformer cache hooked the proj_out module object: a LoRA added after enable_cache left the
    hook on its base layer (cached base output + a LoRA delta of the passed-through input: 0.35 off the other
    order), and unloading a LoRA added before dropped the hook with the wrapper (output caching stopped)."""
    config = da.BlockCacheConfig(interval=3, forecast=1, forecast_target="output")
    lora_first = _flux_images(da.enable_cache(_flux_lora(build_tiny("flux")), config))
    cache_first = _flux_lora(da.enable_cache(build_tiny("flux"), config))
    assert torch.equal(_flux_images(cache_first), lora_first)
    copied = _flux_lora(copy.deepcopy(da.enable_cache(build_tiny("flux"), config)))  # its own session's hook
    assert torch.equal(_flux_images(copied), lora_first)
    plain_cached = _flux_images(da.enable_cache(build_tiny("flux"), config))
    unloaded = da.enable_cache(_flux_lora(build_tiny("flux")), config)
    unloaded.transformer.unload_lora()
    assert torch.equal(_flux_images(unloaded), plain_cached)


@pytest.mark.parametrize("adapter", ["lokr", "loha"])
def test_an_artifact_saved_beside_other_peft_adapters_names_the_plain_base(tmp_path, adapter):
    """The fingerprint dropped tensors named ".lora_" only: LoKr's and LoHa's factors stayed in it, so the plain
    base the save warning points to was refused as "a different base model"."""
    import peft

    torch.manual_seed(0)
    pipe = build_tiny("sd")
    config = (peft.LoKrConfig if adapter == "lokr" else peft.LoHaConfig)(r=4, target_modules=TARGETS)
    pipe.unet.add_adapter(config)
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    with pytest.warns(UserWarning, match="load the adapters again"):
        da.save(pipe, tmp_path / "art")
    plain = build_tiny("sd")
    assert torch.equal(_images(da.load(plain, tmp_path / "art")),
                       _images(da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=2))))


def test_save_with_a_fused_but_not_unloaded_lora_says_the_artifact_base_is_the_fused_model(tmp_path):
    """It said to load the adapters again onto the plain base, which the artifact refuses (its base layers hold
    W + BA)."""
    pipe = _with_lora()
    pipe.fuse_lora(components=["unet"])
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        da.save(pipe, tmp_path / "art")
    messages = " ".join(str(warning.message) for warning in caught)
    assert "the artifact's base is the fused model" in messages and "load the adapters again" not in messages
    fused = _with_lora()
    fused.fuse_lora(components=["unet"])
    fused.unload_lora_weights()
    assert torch.equal(_images(da.load(fused, tmp_path / "art")), _images(pipe))


def test_an_artifact_saved_beside_modules_to_save_names_the_plain_base(tmp_path):
    """peft's modules_to_save wrapper holds original_module (no base_layer): its tensors stayed in the fingerprint
    and the plain base the save warning points to was refused."""
    pipe = build_tiny("sd")
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["conv_out"]))
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    with pytest.warns(UserWarning, match="load the adapters again"):
        da.save(pipe, tmp_path / "art")
    da.load(build_tiny("sd"), tmp_path / "art")


def test_modules_to_save_copies_left_by_unload_count_as_adapters(tmp_path):
    """unload_lora_weights leaves peft's modules_to_save wrappers, whose trained copies compute: save said nothing
    and the artifact loaded onto the plain base giving other images (0.33 off); quantize_ left them in float."""
    pipe = build_tiny("sd")
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"], modules_to_save=["proj_in"]))
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="quantize_ cannot change layers that adapters"):
        da.quantize_(pipe, da.PTQConfig(weights="int8", activations=None, calib_prompts=1, calib_num_steps=2,
                                        calib_steps="all"))
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    with pytest.warns(UserWarning, match="holds unmerged adapters .* e.g. 'down_blocks.0.attentions.0.proj_in'"):
        da.save(pipe, tmp_path / "art")


def test_save_pretrained_names_modules_to_save_copies_as_adapters_not_the_techniques(tmp_path):
    """It said "techniques ['cache'] changed 42 of its tensors" and pointed to an artifact, which loses the copies."""
    from diffusion_accel.pretrained_guard import UnsavableModelError

    pipe = build_tiny("sd")
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"], modules_to_save=["proj_in"]))
    pipe.unload_lora_weights()
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    with pytest.raises(UnsavableModelError, match="unmerged adapters"):
        pipe.save_pretrained(tmp_path / "out")


def _conv_in_lora(pipe):
    """A LoRA on conv_in (a leaf the encoder cache hooks) and to_q, with weights that move the images."""
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["conv_in", "to_q"]))
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.mul_(10)
    return pipe


def test_a_lora_on_conv_in_is_cached_whichever_comes_first_and_deepcache_takes_it():
    """Encoder propagation hooked conv_in itself: a LoRA added after enable_cache left the hook on peft's base layer
    (cached base output plus a fresh LoRA delta, 0.025 off), an unload took it away; DeepCache read conv_in's
    out_channels, which peft's wrapper lacks (an AttributeError; until session 49)."""
    config = da.EncoderPropagationConfig(interval=2)
    lora_first = _images(da.enable_cache(_conv_in_lora(build_tiny("sd")), config))
    assert torch.equal(_images(_conv_in_lora(da.enable_cache(build_tiny("sd"), config))), lora_first)
    unloaded = da.enable_cache(_conv_in_lora(build_tiny("sd")), config)
    unloaded.unet.unload_lora()
    assert torch.equal(_images(unloaded), _images(da.enable_cache(build_tiny("sd"), config)))
    deep = da.enable_cache(_conv_in_lora(build_tiny("sd")), da.DeepCacheConfig(interval=2))
    assert da.cache_summary(deep)["method"] == "deepcache" and _images(deep).isfinite().all()
