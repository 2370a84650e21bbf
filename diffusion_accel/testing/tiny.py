"""Tiny diffusers pipelines built from config with random weights (seeded), for tests and demos.

Every builder returns a real diffusers pipeline of the named class whose components are small
enough that a 2-step generation takes well under a second on CPU. Shapes keep each family's
structure (cross-attention down/up blocks, skip concatenations, joint attention, single-stream
blocks) so adapters and techniques have real work to do.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DiTPipeline,
                       DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, PixArtAlphaPipeline, PixArtTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                          T5EncoderModel)

from ..pipeline_defaults import set_call_defaults
from .tokenizers import clip_tokenizer, t5_tokenizer

TEXT_DIM = 32


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's published settings."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_clip_text(with_projection: bool = False, hidden: int = TEXT_DIM,
                   projection_dim: int = TEXT_DIM) -> CLIPTextModel:
    """A 2-layer CLIP text tower over the byte-level tokenizer's vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer()), hidden_size=hidden, intermediate_size=hidden * 2,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
        projection_dim=projection_dim, bos_token_id=len(clip_tokenizer()) - 2,
        eos_token_id=len(clip_tokenizer()) - 1, pad_token_id=len(clip_tokenizer()) - 1,
    )
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def tiny_t5(d_model: int = TEXT_DIM) -> T5EncoderModel:
    """A 1-layer T5 encoder over the word-level tokenizer's vocabulary."""
    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_ff=d_model * 2, d_kv=8,
                      num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, **overrides: Any) -> AutoencoderKL:
    """A 2-level VAE: 32x32 RGB <-> 16x16 latents (vae_scale_factor 2)."""
    kwargs = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                  norm_num_groups=4, sample_size=32)
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs).eval()


def tiny_sd_unet(cross_attention_dim: int = TEXT_DIM) -> UNet2DConditionModel:
    """SD 1.x-shaped UNet: cross-attention down/up blocks, a plain down/up pair, a mid block."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """StableDiffusionPipeline with a 3-level cross-attention UNet, DDIM scheduler."""
    _seeded(seed)
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip_text(), tokenizer=clip_tokenizer(),
        unet=tiny_sd_unet(), scheduler=_sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL-shaped UNet: text_time additional embeddings, 2 transformer layers in the deep block."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    ).eval()


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """StableDiffusionXLPipeline with two CLIP text towers and an SDXL-shaped UNet."""
    _seeded(seed)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip_text(), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_text(with_projection=True), tokenizer_2=clip_tokenizer(),
        unet=tiny_sdxl_unet(), scheduler=_sd_scheduler(),
        force_zeros_for_empty_prompt=False,
    )


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """StableDiffusion3Pipeline: 2 joint-attention blocks, two CLIP towers and a T5 encoder."""
    _seeded(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=tiny_vae(shift_factor=0.0), scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=tiny_clip_text(with_projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_text(with_projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=tiny_t5(d_model=64), tokenizer_3=t5_tokenizer(),
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """FluxPipeline: 2 double-stream + 2 single-stream blocks, 4-channel latents packed 2x2; with
    ``guidance_embeds`` FLUX.1-dev's guidance-distilled layout (``guidance_scale`` embedded), else schnell's."""
    _seeded(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
    ).eval()
    vae = tiny_vae(latent_channels=4, use_quant_conv=False, use_post_quant_conv=False,
                   shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=tiny_clip_text(), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5(), tokenizer_2=t5_tokenizer(),
    )
    pipe.default_sample_size = 8  # 16 px without height / width, as tiny_call_kwargs (FluxPipeline's 128: 256 px)
    return pipe


def tiny_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArtAlphaPipeline: 2 adaLN-single transformer blocks with cross-attention to T5."""
    _seeded(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=TEXT_DIM, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=transformer, scheduler=DDIMScheduler())
    # Its 16-latent sample size is none of PixArt's resolution-binning tables ("Invalid sample size"),
    # and clean_caption needs bs4 + ftfy: every call the library makes turns both off.
    set_call_defaults(pipe, {"use_resolution_binning": False, "clean_caption": False})
    return pipe


def tiny_dit_pipeline(seed: int = 0) -> DiTPipeline:
    """DiTPipeline: class-conditional, 2 adaLN-zero blocks, ids 0..9 labelled; 1000 class embeddings
    (+ the null class) as DiT-XL, because DiTPipeline's CFG feeds class id 1000 as the null label."""
    _seeded(seed)
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    labels = {i: name for i, name in enumerate(
        ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"])}
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(),
                       id2label=labels)


def tiny_ddpm_pipeline(seed: int = 0) -> DDPMPipeline:
    """DDPMPipeline over a pixel-space UNet2DModel with attention down/up blocks (16x16 RGB)."""
    _seeded(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ).eval()
    return DDPMPipeline(unet=unet, scheduler=DDIMScheduler())


TINY_BUILDERS: dict[str, Callable[..., Any]] = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "flux-dev": lambda seed=0: tiny_flux_pipeline(seed, guidance_embeds=True),
    "pixart": tiny_pixart_pipeline,
    "dit": tiny_dit_pipeline,
    "ddpm": tiny_ddpm_pipeline,
}

def build_tiny(family: str, seed: int = 0) -> Any:
    """Build the tiny pipeline of ``family`` (one of ``TINY_BUILDERS``)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; accepted: {sorted(TINY_BUILDERS)}")
    return TINY_BUILDERS[family](seed=seed)


def tiny_call_kwargs(family: str, steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for one small, deterministic call of the tiny pipeline of ``family``."""
    generator = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": generator,
                              "output_type": "pt"}
    if family == "ddpm":
        return kwargs | {"batch_size": 1}
    if family == "dit":
        return kwargs | {"class_labels": [1], "guidance_scale": 1.0}
    size = 16 if family.startswith("flux") else 32
    kwargs |= {"prompt": "a photo of a red bicycle", "height": size, "width": size}
    if family == "pixart":
        kwargs |= {"use_resolution_binning": False, "clean_caption": False}
    return kwargs
