"""Attention matmul quantization through a custom processor."""

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import diffusion_accel as da
from diffusion_accel.artifact import applied_techniques
from diffusion_accel.quant import PTQConfig, quantize_, summary
from diffusion_accel.quant.attention import (QUANT_PROCESSORS, QuantAttnProcessor, QuantFluxAttnProcessor,
                                             QuantJointAttnProcessor, quantize_softmax)
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs


def _attention():
    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()


def test_processor_matches_sdpa_at_16_bits_and_differs_at_4():
    attn = _attention()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 16)
    reference = attn(x, encoder_hidden_states=context)
    attn.set_processor(QuantAttnProcessor("int16", 16, AttnProcessor2_0()))
    torch.testing.assert_close(attn(x, encoder_hidden_states=context), reference, rtol=1e-3, atol=1e-3)
    attn.set_processor(QuantAttnProcessor("int8", 4, AttnProcessor2_0()))
    assert (attn(x, encoder_hidden_states=context) - reference).abs().max() > 1e-3


def _joint_block_calls(family):
    """(attention module, keyword arguments) of every attention call in one tiny-pipeline step."""
    pipe = build_tiny(family)
    calls, handles = [], []
    for module in pipe.transformer.modules():
        if type(getattr(module, "processor", None)) in QUANT_PROCESSORS:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k: calls.append((m, dict(k, hidden_states=a[0] if a else k["hidden_states"]))),
                with_kwargs=True))
    pipe(**tiny_call_kwargs(family, steps=1))
    for handle in handles:
        handle.remove()
    return pipe, calls


@pytest.mark.parametrize("family, processor_cls", [("sd3", QuantJointAttnProcessor), ("flux", QuantFluxAttnProcessor)])
def test_joint_attention_processors_match_diffusers_at_16_bits_and_differ_at_4(family, processor_cls):
    """SD3's and Flux's joint attention (both streams, Flux's single-stream blocks, Flux's fused
    projections) computed explicitly equals diffusers' processor up to the 16-bit grids."""
    pipe, calls = _joint_block_calls(family)
    assert {call[0].processor.__class__ for call in calls} == {cls for cls, q in QUANT_PROCESSORS.items()
                                                             if q is processor_cls}
    if family == "flux":
        assert any(kwargs.get("encoder_hidden_states") is None for _, kwargs in calls)  # single-stream blocks
        pipe.transformer.fuse_qkv_projections()
    for attn, kwargs in calls:
        original = attn.processor
        with torch.no_grad():
            reference = attn(**kwargs)
            attn.set_processor(processor_cls("int16", 16, original))
            fine = attn(**kwargs)
            attn.set_processor(processor_cls("int8", 4, original))
            coarse = attn(**kwargs)
        attn.set_processor(original)
        # the joint sequence is long: 16-bit softmax steps add up over it to ~1e-3 of outputs ~1
        torch.testing.assert_close(fine, reference, rtol=5e-3, atol=5e-3)
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        assert (first(coarse) - first(reference)).abs().max() > 5e-2


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_flux_attention_takes_a_batch_by_tokens_mask_as_diffusers_does(dtype):
    """A (batch, tokens) mask at batch 2 raised a shape error in the quantizing processor until session 41."""
    pipe = build_tiny("flux")
    attn = pipe.transformer.transformer_blocks[0].attn
    torch.manual_seed(0)
    hidden, context = torch.randn(2, 16, pipe.transformer.inner_dim), torch.randn(2, 8, pipe.transformer.inner_dim)
    mask = torch.ones(2, 24, dtype=torch.bool) if dtype == torch.bool else torch.zeros(2, 24)
    mask[1, 5:8] = False if dtype == torch.bool else float("-inf")
    original = attn.processor
    with torch.no_grad():
        reference = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        attn.set_processor(QuantFluxAttnProcessor("int16", 16, original))
        quantized = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    attn.set_processor(original)
    torch.testing.assert_close(quantized, reference, rtol=5e-3, atol=5e-3)


def test_softmax_grid_is_unsigned_and_fixed():
    probs = torch.tensor([0.0, 0.01, 0.5, 1.0])
    assert torch.equal(quantize_softmax(probs, 2), torch.tensor([0.0, 0.0, 2 / 3, 1.0]))


@pytest.mark.parametrize("family", ["sd", "ddpm", "sd3", "flux", "pixart", "dit", "sdxl"])
def test_attention_quantization_in_pipeline_and_round_trip(tmp_path, family):
    pipe = build_tiny(family)
    config = PTQConfig(attention="int8", softmax_bits=8, calib_prompts=1, calib_num_steps=2, calib_steps="all")
    quantize_(pipe, config)
    assert "attention matmuls" in summary(pipe)
    images = pipe(**tiny_call_kwargs(family)).images
    assert torch.isfinite(images).all()
    da.save(pipe, tmp_path)
    base = build_tiny(family)
    da.load(base, tmp_path)
    assert torch.equal(base(**tiny_call_kwargs(family)).images, images)


def test_attention_only_config_without_known_processors_raises_and_leaves_it_unchanged():
    pipe = build_tiny("sd")
    pipe.unet.set_attn_processor(AttnProcessor())  # diffusers' pre-2.0 processor: not one we replace
    processors = {n: type(m.processor) for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    expected = (r"no attention with a processor we can quantize \(its processors: AttnProcessor ×14; "
                r"accepted: AttnProcessor2_0, JointAttnProcessor2_0, FluxAttnProcessor\)")
    with pytest.raises(ValueError, match=expected):
        quantize_(pipe, PTQConfig(weights=None, activations=None, attention="int8"))
    assert processors == {n: type(m.processor) for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}


ATTENTION_ONLY = dict(weights=None, activations=None, attention="int8", calib_prompts=1, calib_num_steps=2,
                      calib_steps="all")


@pytest.mark.parametrize("changes, message", [
    (dict(include=("nomatch*",)), r"include / exclude select weight and activation layers, but weights=None"),
    (dict(exclude=("*attn2*",)), r"include / exclude select weight and activation layers"),
    (dict(attention=None, softmax_bits=4, weights="int8"), r"softmax_bits=4 sets the softmax output's bits .* "
                                                           r"attention=None turns off"),
])
def test_options_with_no_effect_on_attention_quantization_are_refused(changes, message):
    """A glob matching nothing quantized every attention module, an exclude excluded none, softmax_bits without
    attention did nothing: all silently (session 47)."""
    pipe = build_tiny("sd")
    with pytest.raises(ValueError, match=message):
        quantize_(pipe, PTQConfig(**{**ATTENTION_ONLY, **changes}))
    assert applied_techniques(pipe) == []
    with pytest.raises(ValueError, match="filter_fn selects weight and activation layers"):
        quantize_(pipe, PTQConfig(**ATTENTION_ONLY), filter_fn=lambda module, name: False)  # never called


def test_an_interrupted_attention_install_puts_every_swapped_processor_back(monkeypatch):
    """install_attention returned the processors it replaced only when it finished: interrupted after 3 of 14
    swaps, quantize_ rolled back the rest but left those 3 quantizing (session 47)."""
    import diffusion_accel.quant.attention as attention_module

    pipe = build_tiny("sd")
    before = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    swaps, real = [], attention_module.QuantAttnProcessor

    def failing_after_three(*args):
        swaps.append(1)
        if len(swaps) > 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setitem(attention_module.QUANT_PROCESSORS, AttnProcessor2_0, failing_after_three)
    with pytest.raises(KeyboardInterrupt):
        quantize_(pipe, PTQConfig(**ATTENTION_ONLY))
    assert before == {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}


def test_a_pag_pipelines_summary_says_its_pag_layers_run_float_attention():
    """PAG puts its own processors on its layers during each call: the summary counted them quantized."""
    from diffusers import StableDiffusionPAGPipeline

    pipe = StableDiffusionPAGPipeline(**build_tiny("sd").components, pag_applied_layers=["down_blocks.0"])
    quantize_(pipe, PTQConfig(**ATTENTION_ONLY))
    assert "PAG puts its own float processors on the self-attention of its layers ['down_blocks.0']" in summary(pipe)
    pipe.set_pag_applied_layers(["mid"])  # the pipeline summarised now, not the one quantize_ ran on
    assert "its layers ['mid']" in summary(pipe)
    plain = quantize_(build_tiny("sd"), PTQConfig(**ATTENTION_ONLY))
    assert "PAG" not in summary(plain)
    assert "its layers ['up_blocks.1']" in summary(StableDiffusionPAGPipeline.from_pipe(
        plain, pag_applied_layers=["up_blocks.1"]))


def test_a_manifest_listing_attention_without_its_format_is_refused(tmp_path):
    """It loaded and every call then failed with "unknown number format None" (session 47)."""
    import json

    from diffusion_accel.artifact import ArtifactError

    da.save(quantize_(build_tiny("sd"), PTQConfig(**{**ATTENTION_ONLY, "weights": "int8"})), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["techniques"][0]["config"]["ptq_config"]["attention"] = None
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    base = build_tiny("sd")
    with pytest.raises(ArtifactError, match="attention lists 14 modules, but ptq_config.attention is null"):
        da.load(base, tmp_path)
    assert applied_techniques(base) == []


def test_summary_warns_when_attention_processors_are_replaced_afterwards():
    pipe = build_tiny("sd")
    quantize_(pipe, PTQConfig(attention="int8", calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    assert "warning" not in summary(pipe)
    pipe.enable_attention_slicing(1)  # diffusers swaps every attention processor
    assert "no longer run the quantizing processor" in summary(pipe)


def test_save_refuses_once_quantized_attention_processors_were_replaced(tmp_path):
    """The artifact would restore quantized attention: not the images this pipeline now makes."""
    pipe = build_tiny("sd")
    quantize_(pipe, PTQConfig(attention="int8", calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    da.save(pipe, tmp_path / "before")
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(da.ArtifactError, match=r"14 attention modules .* now use other processors .*AttnProcessor2_0"):
        da.save(pipe, tmp_path / "after")
    assert not (tmp_path / "after").exists()


def test_loading_quantized_attention_onto_a_base_with_other_processors_names_them(tmp_path):
    """It said the artifact was damaged (a bare KeyError), which saving again cannot mend."""
    pipe = build_tiny("sd")
    quantize_(pipe, PTQConfig(attention="int8", calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    da.save(pipe, tmp_path)
    base = build_tiny("sd")
    base.unet.set_attn_processor(AttnProcessor())
    unet = base.unet
    with pytest.raises(da.ArtifactError, match=r"14 of them use processors .*\(AttnProcessor ×14; accepted: .*no "
                                               r"attention slicing"):
        da.load(base, tmp_path)
    assert base.unet is unet and applied_techniques(base) == []
    manifest = json.loads((tmp_path / "manifest.json").read_text())  # a name the base lacks: not its processors
    manifest["techniques"][0]["config"]["attention"][0] = "no.such.attention"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(da.ArtifactError, match=r"\['no.such.attention'\] \(1 names\), which are no attention modules"):
        da.load(build_tiny("sd"), tmp_path)
    names = manifest["techniques"][0]["config"]["attention"]  # a name twice: a KeyError naming a processor class
    names[0] = names[1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(da.ArtifactError, match=r"attention names \[.*\] more than once"):
        da.load(build_tiny("sd"), tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_codes_of_half_precision_inputs_are_those_of_float32(dtype):
    processor = QuantAttnProcessor("int8", 8, AttnProcessor2_0())
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 32).to(dtype)
    assert torch.equal(processor._quant(x), processor._quant(x.float()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_softmax_grid_is_computed_in_float32(dtype):
    """float16 holds no 65535: softmax_bits=16 (the top of its range, advised for Flux) failed every float16 call
    with "value cannot be converted to type c10::Half without overflow"."""
    from diffusion_accel.quant.attention import quantize_softmax

    probs = torch.rand(2, 4, 8, 8).softmax(dim=-1)
    for bits in (8, 16):
        out = quantize_softmax(probs.to(dtype), bits)
        assert out.dtype == dtype and torch.equal(out, quantize_softmax(probs.to(dtype).float(), bits).to(dtype))


def test_float16_attention_scores_that_overflow_before_scaling_stay_finite():
    """Q·Kᵀ was taken in the pipeline's dtype before the 1/sqrt(d) scale: unscaled scores past 65504 became inf in
    float16 (NaN images) where diffusers' attention stays finite."""
    attn = _attention()
    with torch.no_grad():
        attn.to_q.weight.mul_(100.0)
        attn.to_k.weight.mul_(100.0)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 16) * 4
    attn = attn.half()
    reference = attn(x.half(), encoder_hidden_states=context.half())
    attn.set_processor(QuantAttnProcessor("int8", 8, AttnProcessor2_0()))
    query = attn.to_q(x.half()).view(2, 10, 4, 8).transpose(1, 2)
    key = attn.to_k(context.half()).view(2, 7, 4, 8).transpose(1, 2)
    unscaled = query @ key.transpose(-1, -2)
    assert torch.isfinite(reference).all() and not torch.isfinite(unscaled).all()  # the case: overflow unscaled
    assert torch.isfinite(attn(x.half(), encoder_hidden_states=context.half())).all()


def test_gradients_reach_the_query_and_key_projections_through_the_quantized_softmax():
    """The softmax grid rounded without a straight-through gradient: to_q / to_k got none (exactly 0), so block
    reconstruction never moved their AdaRound codes."""
    probs = torch.rand(2, 5, requires_grad=True)
    quantize_softmax(probs, 8).sum().backward()
    assert torch.equal(probs.grad, torch.ones_like(probs))
    torch.manual_seed(0)
    pipe = build_tiny("sd")
    quantize_(pipe, PTQConfig(weights=None, activations=None, attention="int8", calib_prompts=1, calib_num_steps=2,
                              calib_steps="all"))
    query = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
    query.requires_grad_(True)
    sample = torch.randn(1, 4, 8, 8, requires_grad=True)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=text).sample.pow(2).sum().backward()
    assert query.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_an_image_does_not_depend_on_the_images_beside_it(fmt):
    """Q/K/V took one scale over the whole batch: an image generated alone differed by 0.006 from the same prompt and
    seed generated beside another (evaluate's PSNR changed with batch_size; session 53 review). Each batch row now
    gets the values it gets alone."""
    from diffusion_accel.quant.attention import QuantAttentionBase

    quantizer = QuantAttentionBase(fmt, 8, None)
    batch = torch.randn(3, 2, 5, 4) * torch.tensor([1.0, 30.0, 0.01]).view(3, 1, 1, 1)  # one row's outlier
    together = quantizer._quant(batch)
    for row in range(3):
        assert torch.equal(together[row:row + 1], quantizer._quant(batch[row:row + 1]))


def test_save_pretrained_and_fusing_refuse_quantized_attention(tmp_path):
    """Attention quantization lives in processors, not tensors: save_pretrained wrote the float model (from_pretrained
    gave images 0.039 off) and fuse_qkv_projections swapped in float processors, both silently (session 53 review)."""
    from diffusion_accel.pretrained_guard import UnfusableModelError, UnsavableModelError

    pipe = build_tiny("sd")
    quantize_(pipe, PTQConfig(weights=None, activations=None, attention="int8"))
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(UnsavableModelError, match=r"quantize \d+ attention processors .* diffusion_accel.save"):
        pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(UnsavableModelError, match=r"quantize \d+ attention processors"):
        pipe.unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(UnfusableModelError, match=r"fuse_qkv_projections\(\) cannot fuse its attention"):
        pipe.fuse_qkv_projections()
    assert dict(pipe.unet.attn_processors) == processors and not (tmp_path / "pipe").exists()
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # float attention again: the float model, saved as such
    pipe.unet.save_pretrained(tmp_path / "unet")
