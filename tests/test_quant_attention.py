"""Attention matmul quantization through a custom processor."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import diffusion_accel as da
from diffusion_accel.quant import PTQConfig, quantize_, summary
from diffusion_accel.quant.attention import QuantAttnProcessor, quantize_softmax
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


def test_softmax_grid_is_unsigned_and_fixed():
    probs = torch.tensor([0.0, 0.01, 0.5, 1.0])
    assert torch.equal(quantize_softmax(probs, 2), torch.tensor([0.0, 0.0, 2 / 3, 1.0]))


@pytest.mark.parametrize("family", ["sd", "ddpm"])
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


def test_attention_only_config_on_joint_attention_model_raises_and_leaves_it_unchanged():
    pipe = build_tiny("flux")
    processors = {n: type(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError, match="no attention with a standard processor"):
        quantize_(pipe, PTQConfig(weights=None, activations=None, attention="int8"))
    assert processors == {n: type(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}


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
