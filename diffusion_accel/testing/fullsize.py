"""Full-size denoisers with random weights, for speed benchmarks only (no hub access needed).

Configs are the published ones: SD 1.5 UNet (859.5M parameters), SDXL base UNet (2.567B),
PixArt-α XL/2 (611M at 1024 px, with resolution/aspect-ratio conditioning; sample_size 64 for
512 px), DiT-XL/2 256 (675M published; diffusers keeps a copy of the 2.78M timestep/class embedder
in each of the 28 blocks, so the module holds 749.8M), and the FLUX.1-dev transformer
(3072 = 24 x 128 hidden, 11.9B at 19 + 38 blocks) with fewer blocks by default (2 + 4: 1.31B,
5.2 GB in fp32) so it fits a 24 GiB machine.

Every builder returns ``(module, make_inputs)``; ``make_inputs(batch_size, resolution)`` gives
the keyword arguments of one denoiser call (latents, timestep, text states, added conditions) for
images of ``resolution`` pixels, on the module's device and dtype. ``device="meta"`` builds the
structure without allocating weights (parameter counts, shape checks).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                       UNet2DConditionModel)
from torch import nn

InputsFn = Callable[..., dict[str, Any]]
VAE_SCALE = 8  # pixels per latent cell for every family here

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0,
)
PIXART_ALPHA = dict(
    num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2,
    caption_channels=4096, cross_attention_dim=1152, attention_bias=True, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
)
DIT_XL_2 = dict(
    sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, in_channels=4,
    out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    activation_fn="gelu-approximate", attention_bias=True,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SDXL_TEXT_EMBED_DIM = 1280  # pooled text_embeds; time_ids add 6 x 256 = 1536 -> 2816
SD_TEXT_TOKENS = 77
PIXART_TEXT_TOKENS = 120
FLUX_TEXT_TOKENS = 512


def _instantiate(cls: type[nn.Module], config: dict[str, Any], dtype: torch.dtype, device: str | torch.device,
                 seed: int) -> nn.Module:
    """Build ``cls(**config)`` directly on ``device`` (seeded random init), cast to ``dtype``, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            module = cls(**config)
    if dtype != torch.float32:
        nn.Module.to(module, dtype)  # plain cast; ModelMixin.to warns about from_pretrained dtypes
    return module.eval()


def _latent_side(resolution: int) -> int:
    if resolution % (VAE_SCALE * 2):
        raise ValueError(f"resolution must be a multiple of {VAE_SCALE * 2} pixels; got {resolution}")
    return resolution // VAE_SCALE


def _randn(generator: torch.Generator | None, *shape: int, like: nn.Module) -> torch.Tensor:
    """Standard normal tensor of ``shape`` on ``like``'s device and dtype (CPU-seeded)."""
    parameter = next(like.parameters())
    if parameter.device.type == "meta":
        return torch.empty(shape, device="meta", dtype=parameter.dtype)
    return torch.randn(shape, generator=generator).to(parameter.device, parameter.dtype)


def _timesteps(batch_size: int, value: float, like: nn.Module) -> torch.Tensor:
    return torch.full((batch_size,), value, device=next(like.parameters()).device)


def sd15_unet(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
              **overrides: Any) -> tuple[UNet2DConditionModel, InputsFn]:
    """Stable Diffusion 1.5 UNet (859.5M params); inputs: 4-ch latents, 77 x 768 text states."""
    unet = _instantiate(UNet2DConditionModel, SD15_UNET | overrides, dtype, device, seed)

    def make_inputs(batch_size: int = 1, resolution: int = 512, seed: int = 0) -> dict[str, Any]:
        generator, side = torch.Generator().manual_seed(seed), _latent_side(resolution)
        return {"sample": _randn(generator, batch_size, 4, side, side, like=unet),
                "timestep": _timesteps(batch_size, 500.0, unet),
                "encoder_hidden_states": _randn(generator, batch_size, SD_TEXT_TOKENS,
                                                unet.config.cross_attention_dim, like=unet)}

    return unet, make_inputs


def sdxl_unet(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
              **overrides: Any) -> tuple[UNet2DConditionModel, InputsFn]:
    """SDXL base UNet (2.567B params); inputs add pooled ``text_embeds`` (1280) and 6 ``time_ids``."""
    unet = _instantiate(UNet2DConditionModel, SDXL_UNET | overrides, dtype, device, seed)

    def make_inputs(batch_size: int = 1, resolution: int = 1024, seed: int = 0) -> dict[str, Any]:
        generator, side = torch.Generator().manual_seed(seed), _latent_side(resolution)
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        parameter = next(unet.parameters())
        return {"sample": _randn(generator, batch_size, 4, side, side, like=unet),
                "timestep": _timesteps(batch_size, 500.0, unet),
                "encoder_hidden_states": _randn(generator, batch_size, SD_TEXT_TOKENS,
                                                unet.config.cross_attention_dim, like=unet),
                "added_cond_kwargs": {
                    "text_embeds": _randn(generator, batch_size, SDXL_TEXT_EMBED_DIM, like=unet),
                    "time_ids": time_ids.repeat(batch_size, 1).to(parameter.device, parameter.dtype)}}

    return unet, make_inputs


def pixart_alpha(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
                 resolution: int = 1024, **overrides: Any) -> tuple[PixArtTransformer2DModel, InputsFn]:
    """PixArt-α XL/2 (611M params at 1024 px); inputs: latents, 120 x 4096 T5 states, size conds."""
    if resolution not in (512, 1024):
        raise ValueError(f"PixArt-α was published for resolution 512 or 1024; got {resolution}")
    config = PIXART_ALPHA | {"sample_size": resolution // VAE_SCALE} | overrides
    model = _instantiate(PixArtTransformer2DModel, config, dtype, device, seed)

    def make_inputs(batch_size: int = 1, resolution: int = resolution, seed: int = 0) -> dict[str, Any]:
        generator, side = torch.Generator().manual_seed(seed), _latent_side(resolution)
        parameter = next(model.parameters())
        added = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            added = {"resolution": torch.tensor([[resolution, resolution]] * batch_size, dtype=parameter.dtype,
                                                device=parameter.device),
                     "aspect_ratio": torch.ones(batch_size, 1, dtype=parameter.dtype, device=parameter.device)}
        return {"hidden_states": _randn(generator, batch_size, 4, side, side, like=model),
                "encoder_hidden_states": _randn(generator, batch_size, PIXART_TEXT_TOKENS,
                                                model.config.caption_channels, like=model),
                "timestep": _timesteps(batch_size, 500.0, model), "added_cond_kwargs": added}

    return model, make_inputs


def dit_xl_2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
             **overrides: Any) -> tuple[DiTTransformer2DModel, InputsFn]:
    """DiT-XL/2 at 256 px (675M params); inputs: 32x32x4 latents, timestep, ImageNet class ids."""
    model = _instantiate(DiTTransformer2DModel, DIT_XL_2 | overrides, dtype, device, seed)

    def make_inputs(batch_size: int = 1, resolution: int = 256, seed: int = 0) -> dict[str, Any]:
        generator, side = torch.Generator().manual_seed(seed), _latent_side(resolution)
        device = next(model.parameters()).device
        labels = torch.randint(0, model.config.num_embeds_ada_norm, (batch_size,), generator=generator)
        return {"hidden_states": _randn(generator, batch_size, 4, side, side, like=model),
                "timestep": _timesteps(batch_size, 500.0, model).long(), "class_labels": labels.to(device)}

    return model, make_inputs


def flux_dev(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
             num_layers: int = 2, num_single_layers: int = 4,
             **overrides: Any) -> tuple[FluxTransformer2DModel, InputsFn]:
    """FLUX.1-dev transformer, published widths, ``num_layers`` + ``num_single_layers`` blocks (19 + 38 full)."""
    config = FLUX_DEV | {"num_layers": num_layers, "num_single_layers": num_single_layers} | overrides
    model = _instantiate(FluxTransformer2DModel, config, dtype, device, seed)

    def make_inputs(batch_size: int = 1, resolution: int = 1024, seed: int = 0,
                    text_tokens: int = FLUX_TEXT_TOKENS) -> dict[str, Any]:
        generator, side = torch.Generator().manual_seed(seed), _latent_side(resolution) // 2  # 2x2 packing
        parameter = next(model.parameters())
        image_ids = torch.zeros(side, side, 3)
        image_ids[..., 1] = torch.arange(side)[:, None]
        image_ids[..., 2] = torch.arange(side)[None, :]
        return {"hidden_states": _randn(generator, batch_size, side * side, model.config.in_channels, like=model),
                "encoder_hidden_states": _randn(generator, batch_size, text_tokens,
                                                model.config.joint_attention_dim, like=model),
                "pooled_projections": _randn(generator, batch_size, model.config.pooled_projection_dim,
                                             like=model),
                "timestep": _timesteps(batch_size, 0.5, model).to(parameter.dtype),
                "guidance": _timesteps(batch_size, 3.5, model).to(parameter.dtype),
                "img_ids": image_ids.reshape(-1, 3).to(parameter.device, parameter.dtype),
                "txt_ids": torch.zeros(text_tokens, 3, device=parameter.device, dtype=parameter.dtype)}

    return model, make_inputs


FULLSIZE_BUILDERS: dict[str, Callable[..., tuple[nn.Module, InputsFn]]] = {
    "sd15": sd15_unet, "sdxl": sdxl_unet, "pixart": pixart_alpha, "dit": dit_xl_2, "flux": flux_dev,
}

PUBLISHED_PARAMETERS = {  # published parameter counts of the full models
    "sd15": 859_520_964, "sdxl": 2_567_463_684, "pixart": 611_000_000, "dit": 675_000_000,
    "flux": 11_901_408_320,
}


def build_fullsize(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0, **overrides: Any) -> tuple[nn.Module, InputsFn]:
    """Build the full-size denoiser ``name`` (one of ``FULLSIZE_BUILDERS``) and its input maker."""
    if name not in FULLSIZE_BUILDERS:
        raise ValueError(f"unknown full-size model {name!r}; accepted: {sorted(FULLSIZE_BUILDERS)}")
    return FULLSIZE_BUILDERS[name](dtype=dtype, device=device, seed=seed, **overrides)
