"""LoRA adapters (peft) on accelerated denoisers: refused before anything changes where they target layers a
technique replaced, rolled back when peft fails part-way, and loaded as diffusers would otherwise."""

import pytest
import torch
from safetensors.torch import save_file

import diffusion_accel as da
from diffusion_accel.adapter_guard import AdapterOnReplacedLayerError, lora_targets
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

FAST = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all")
# attention projections (quantized by W8A8) and the time embedding's first layer (kept in float)
TARGETS = ["linear_1", "to_q", "to_k", "to_v", "to_out.0"]


def _images(pipe):
    return pipe(**tiny_call_kwargs("sd")).images


def _lora_config(targets=TARGETS):
    return peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)


def _wrappers(module):
    return [name for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]


@pytest.fixture(scope="module")
def lora_state_dict():
    """A diffusers-format UNet LoRA ("unet.<module>.lora_A.weight", ...) with non-zero weights."""
    donor = build_tiny("sd").unet
    donor.add_adapter(_lora_config())
    return {f"unet.{key}": value for key, value in get_peft_model_state_dict(donor).items()}


@pytest.fixture
def quantized():
    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig.preset("w8a8", **FAST))
    return pipe, _images(pipe)


def test_add_adapter_on_quantized_layers_is_refused_and_changes_nothing(quantized):
    pipe, before = quantized
    with pytest.raises(AdapterOnReplacedLayerError, match=r"add_adapter\(\) cannot put a LoRA adapter on .*"
                                                           r"\(Int8Linear\).*\['ptq'\].*Nothing was changed"):
        pipe.unet.add_adapter(_lora_config())
    assert _wrappers(pipe.unet) == [] and not hasattr(pipe.unet, "peft_config")
    assert torch.equal(_images(pipe), before)


def test_load_lora_weights_on_a_quantized_pipeline_is_refused_and_changes_nothing(quantized, lora_state_dict):
    pipe, before = quantized
    with pytest.raises(AdapterOnReplacedLayerError, match=r"load_lora_adapter\(\) cannot .*pipe.fuse_lora"):
        pipe.load_lora_weights(dict(lora_state_dict))
    assert _wrappers(pipe.unet) == []
    assert torch.equal(_images(pipe), before)


def test_a_lora_file_peft_fails_on_is_unwrapped_again(quantized, lora_state_dict, tmp_path):
    """A path is read by diffusers itself (no early check): peft fails on the first Int8Linear after
    wrapping the float time-embedding layer, and the guard unwraps it."""
    pipe, before = quantized
    save_file(dict(lora_state_dict), tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match="not supported"):
        pipe.unet.load_lora_adapter(str(tmp_path), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    assert _wrappers(pipe.unet) == []
    assert type(pipe.unet.time_embedding.linear_1) is torch.nn.Linear
    assert torch.equal(_images(pipe), before)


def test_a_failed_lora_file_leaves_no_tensors_on_layers_an_earlier_adapter_wrapped(quantized, lora_state_dict,
                                                                                   tmp_path):
    """The rollback unwrapped only the layers the call wrapped: a layer wrapped by adapter "a" kept the failed
    adapter "b"'s lora_A / lora_B (until session 49)."""
    pipe, _ = quantized
    pipe.unet.add_adapter(_lora_config(["linear_1"]), adapter_name="a")
    keys, before = set(pipe.unet.state_dict()), _images(pipe)
    save_file(dict(lora_state_dict), tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match="not supported"):
        pipe.unet.load_lora_adapter(str(tmp_path), prefix="unet", weight_name="pytorch_lora_weights.safetensors",
                                    adapter_name="b")
    assert set(pipe.unet.state_dict()) == keys and list(pipe.unet.peft_config) == ["a"]
    assert torch.equal(_images(pipe), before)


def test_lora_on_layers_kept_in_float_or_on_a_cached_pipeline_loads(quantized, lora_state_dict):
    pipe, before = quantized
    pipe.unet.add_adapter(_lora_config(["linear_1"]))
    assert _wrappers(pipe.unet) == ["time_embedding.linear_1"]
    assert not torch.equal(_images(pipe), before)
    cached = da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=2, branch=0))
    cached.load_lora_weights(dict(lora_state_dict))
    assert len(_wrappers(cached.unet)) == len(lora_targets(lora_state_dict, "unet"))


def test_all_linear_on_quantized_layers_is_refused(quantized):
    """peft expands "all-linear" to nn.Linear layers only: it wrapped the 2 float ones of a W8A8 UNet, silently."""
    pipe, before = quantized
    with pytest.raises(AdapterOnReplacedLayerError, match=r"\(Int8Linear\) or \d+ more"):
        pipe.unet.add_adapter(_lora_config("all-linear"))
    assert _wrappers(pipe.unet) == [] and torch.equal(_images(pipe), before)


def test_older_format_lora_keys_are_read_like_diffusers_reads_them(quantized, lora_state_dict):
    """'<module>.lora.down.weight' keys (diffusers' older format) named no target: peft's raw error followed."""
    older = {key.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"): value
             for key, value in lora_state_dict.items()}
    assert lora_targets(older, "unet") == lora_targets(lora_state_dict, "unet")
    pipe, before = quantized
    with pytest.raises(AdapterOnReplacedLayerError, match=r"load_lora_adapter\(\) cannot put a LoRA adapter on"):
        pipe.load_lora_weights(older)
    assert _wrappers(pipe.unet) == [] and torch.equal(_images(pipe), before)


def test_lora_targets_reads_module_names_from_diffusers_keys():
    keys = {"unet.a.to_q.lora_A.weight": 0, "unet.a.to_q.lora_B.weight": 0, "unet.b.lora_B.default.weight": 0,
            "text_encoder.c.lora_A.weight": 0, "unet.a.to_q.alpha": 0}
    assert lora_targets(keys, "unet") == ["a.to_q", "b"]
    assert lora_targets({"a.lora_A.weight": 0}, None) == ["a"]


def test_a_loaded_artifact_is_guarded_too(quantized, lora_state_dict, tmp_path):
    pipe, before = quantized
    da.save(pipe, tmp_path / "w8a8")
    loaded = da.load(build_tiny("sd"), tmp_path / "w8a8")
    with pytest.raises(AdapterOnReplacedLayerError):
        loaded.load_lora_weights(dict(lora_state_dict))
    assert _wrappers(loaded.unet) == [] and torch.equal(_images(loaded), before)


# how a pipeline the user calls is had from the accelerated one: itself, or a sibling sharing its components (these
# bypassed the guards installed on the accelerated pipeline's instance until session 51)
SIBLINGS = {"itself": lambda pipe: pipe,
            "components": lambda pipe: _img2img_class(pipe)(**pipe.components),
            "from_pipe": lambda pipe: _img2img_class(pipe).from_pipe(pipe)}


def _img2img_class(pipe):
    from diffusers import FluxImg2ImgPipeline, StableDiffusionImg2ImgPipeline

    return FluxImg2ImgPipeline if hasattr(pipe, "transformer") else StableDiffusionImg2ImgPipeline


@pytest.mark.parametrize("sibling", SIBLINGS)
def test_flux_load_lora_weights_names_the_replaced_layer_instead_of_a_key_error(sibling):
    """FluxPipeline.load_lora_weights reads every targeted layer's ``weight`` first (KeyError on an Int8Linear)."""
    donor = build_tiny("flux").transformer
    donor.add_adapter(_lora_config(["to_q", "to_k", "to_v"]))
    lora = {f"transformer.{key}": value for key, value in get_peft_model_state_dict(donor).items()}
    pipe = da.quantize_(build_tiny("flux"), da.PTQConfig.preset("w8a8", **FAST))
    before = pipe(**tiny_call_kwargs("flux")).images
    with pytest.raises(AdapterOnReplacedLayerError, match=r"load_lora_weights\(\) cannot put a LoRA adapter on "
                                                           r"[\w.]+\.to_[qkv] \(Int8Linear\) or 11 more: .* replaced "
                                                           r"these layers"):
        SIBLINGS[sibling](pipe).load_lora_weights(lora)
    assert _wrappers(pipe.transformer) == [] and torch.equal(pipe(**tiny_call_kwargs("flux")).images, before)


def test_a_lora_for_layers_structured_pruning_resized_is_refused_with_the_reason(lora_state_dict):
    """peft raised 'size mismatch for ...' over dozens of lines; nothing said the layers were pruned smaller."""
    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5, pattern="structured"))
    before = _images(pipe)
    with pytest.raises(AdapterOnReplacedLayerError, match=r"which structured pruning made smaller \(weight "
                                                           r"\[\d+, \d+\] -> \[\d+, \d+\]\).*before pruning"):
        pipe.load_lora_weights(dict(lora_state_dict))
    assert _wrappers(pipe.unet) == [] and torch.equal(_images(pipe), before)


@pytest.mark.parametrize("sibling", SIBLINGS)
@pytest.mark.parametrize("targets", [["to_out.0", "ff.net.2"], ["to_q", "to_k", "to_out.0"]])
def test_a_flux_lora_for_pruned_layers_is_refused_before_flux_widens_them(targets, sibling):
    """FluxPipeline.load_lora_weights widens every Linear narrower than the LoRA's input first (Control LoRAs): the
    pruned to_out.0 / ff.net.2 became zero-padded base-size layers, then the refusal said "Nothing was changed"
    and every later call failed with a shape error. A LoRA on output-resized layers got peft's raw size mismatch."""
    donor = build_tiny("flux").transformer
    donor.add_adapter(_lora_config(targets))
    lora = {f"transformer.{key}": value for key, value in get_peft_model_state_dict(donor).items()}
    pipe = da.prune_(build_tiny("flux"), da.PruneConfig(method="magnitude", sparsity=0.5, pattern="structured"))
    shapes = {name: tuple(module.weight.shape) for name, module in pipe.transformer.named_modules()
              if isinstance(module, torch.nn.Linear)}
    before = pipe(**tiny_call_kwargs("flux")).images
    with pytest.raises(AdapterOnReplacedLayerError, match=r"load_lora_weights\(\) cannot load this LoRA: .* made "
                                                           r"smaller \(weight \[32, 32\] -> \[\d+, \d+\]\)"):
        SIBLINGS[sibling](pipe).load_lora_weights(lora)
    assert shapes == {name: tuple(module.weight.shape) for name, module in pipe.transformer.named_modules()
                      if isinstance(module, torch.nn.Linear)}
    assert _wrappers(pipe.transformer) == [] and torch.equal(pipe(**tiny_call_kwargs("flux")).images, before)


def _ip_adapter_state_dict(unet, embed_dim=16):
    """A diffusers-format IP-Adapter for ``unet`` (random weights): image projection + to_k_ip / to_v_ip of every
    cross-attention, at the config's widths, as load_ip_adapter hands them to the UNet."""
    torch.manual_seed(1)
    cross, widths = unet.config.cross_attention_dim, unet.config.block_out_channels
    image_proj = {"proj.weight": torch.randn(4 * cross, embed_dim) * 0.1, "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        level = name.split(".")[1] if not name.startswith("mid_block") else None
        width = widths[-1] if level is None else (widths[::-1] if name.startswith("up") else widths)[int(level)]
        layers |= {f"{key}.to_k_ip.weight": torch.randn(width, cross) * 0.1,
                   f"{key}.to_v_ip.weight": torch.randn(width, cross) * 0.1}
        key += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


@pytest.mark.parametrize("sibling", SIBLINGS)
def test_ip_adapters_are_refused_where_diffusers_would_build_them_wrong(sibling):
    """After structured head pruning an IP-Adapter loaded at the base's width and attended over the wrong tokens,
    silently; after quantize_(attention=...) load_ip_adapter and unload_ip_adapter failed with a TypeError, the
    latter after dropping the image encoder (our processors cannot be rebuilt with no arguments)."""
    pruned = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5, pattern="structured"))
    with pytest.raises(AdapterOnReplacedLayerError, match=r"structured pruning removed attention heads.*before prune_"):
        pruned.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pruned.unet)])
    assert pruned.unet.encoder_hid_proj is None
    with_ip = build_tiny("sd")
    with_ip.unet._load_ip_adapter_weights([_ip_adapter_state_dict(with_ip.unet)])
    da.quantize_(with_ip, da.PTQConfig(weights=None, activations=None, attention="int8"))
    processors = dict(with_ip.unet.attn_processors)
    with pytest.raises(AdapterOnReplacedLayerError, match=r"unload_ip_adapter\(\) cannot run .*Nothing was changed"):
        SIBLINGS[sibling](with_ip).unload_ip_adapter()
    assert with_ip.unet.encoder_hid_proj is not None and with_ip.unet.attn_processors == processors
    with pytest.raises(AdapterOnReplacedLayerError, match=r"load_ip_adapter\(\) cannot run .*quantize_\(attention"):
        with_ip.unet._load_ip_adapter_weights([_ip_adapter_state_dict(with_ip.unet)])
    unstructured = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5))
    unstructured.unet._load_ip_adapter_weights([_ip_adapter_state_dict(unstructured.unet)])  # no head removed: it loads


def test_calibrating_a_pipeline_with_an_ip_adapter_but_no_image_embeddings_says_which_input_is_missing():
    """diffusers failed with "argument of type 'NoneType' is not iterable" and nothing named the missing input."""
    pipe = build_tiny("sd")
    pipe.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipe.unet)])
    with pytest.raises(TypeError, match=r"takes \['ip_adapter_image or ip_adapter_image_embeds'\], not given"):
        da.calibrate(pipe, ["a"], 2, progress=False)


@pytest.mark.parametrize("family, component", [("sd", "unet"), ("flux", "transformer")])
def test_a_lora_trained_on_the_pruned_model_loads_onto_it(family, component):
    """Every target structured pruning resized was refused, also a LoRA whose tensors have the pruned widths
    (add_adapter works on a pruned model, so its own LoRA could never be loaded back)."""
    import copy

    pipe = da.prune_(build_tiny(family), da.PruneConfig(method="magnitude", sparsity=0.5, pattern="structured"))
    donor = copy.deepcopy(getattr(pipe, component))
    donor.add_adapter(_lora_config(["to_out.0"]))
    pipe.load_lora_weights({f"{component}.{key}": value for key, value in get_peft_model_state_dict(donor).items()})
    assert _wrappers(getattr(pipe, component))


def test_the_mixin_guards_pass_plain_pipelines_through():
    """The class-level wrappers act only for denoisers with a technique applied: a plain Flux pipeline's Control
    LoRA still widens its layer, as diffusers does, and installing twice wraps once."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    from diffusion_accel.adapter_guard import install_mixin_guards

    install_mixin_guards()
    wrapped = FluxLoraLoaderMixin._maybe_expand_transformer_param_shape_or_error_
    install_mixin_guards()
    assert FluxLoraLoaderMixin._maybe_expand_transformer_param_shape_or_error_ == wrapped
    pipe = build_tiny("flux")
    embedder = pipe.transformer.x_embedder
    pipe.load_lora_weights({"transformer.x_embedder.lora_A.weight": torch.randn(4, 2 * embedder.in_features),
                            "transformer.x_embedder.lora_B.weight": torch.randn(embedder.out_features, 4)})
    assert pipe.transformer.x_embedder.base_layer.weight.shape == (embedder.out_features, 2 * embedder.in_features)
