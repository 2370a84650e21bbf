"""Adapters against real (tiny) diffusers pipelines and published full-size UNet configs.

Every structural claim is checked against a traced forward pass: layers in one group receive the
same input, blocks and groups are listed in the order they run, skip-concat splits equal the parts
``torch.cat`` joined, and each DeepCache branch pairs the module that pushes a skip with the decoder
resnet that consumes it.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from diffusion_accel.arch import (DenoiserAdapter, UnsupportedModelError, find_denoiser,
                                  get_adapter, supported_denoisers)
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs, tiny_vae

FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart", "dit", "ddpm")
UNET_FAMILIES = ("sd", "sdxl", "ddpm")
ADAPTER_FAMILY = {"sd": "unet2d_condition", "sdxl": "unet2d_condition", "ddpm": "unet2d",
                  "sd3": "sd3", "flux": "flux", "pixart": "pixart", "dit": "dit"}

# Published configs (diffusers' unet/config.json of each hub repository, structural keys).
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, sample_size=96)
SDXL_UNET = dict(
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
# name: (config, parameter count of the published checkpoint, expected summary counts)
PUBLISHED_UNETS = {
    "sd15": (SD15_UNET, 859_520_964, dict(blocks=44, attention=32, ffns=16, skip_concats=24,
                                          cache_points=12, high_precision_layers=4)),
    "sd21": (SD21_UNET, 865_910_724, dict(blocks=44, attention=32, ffns=16, skip_concats=24,
                                          cache_points=12, high_precision_layers=4)),
    "sdxl": (SDXL_UNET, 2_567_463_684, dict(blocks=32, attention=140, ffns=70, skip_concats=18,
                                            cache_points=9, high_precision_layers=6)),
}


# ---- tracing one real pipeline call --------------------------------------------------------
@dataclass
class Trace:
    """What one pipeline call did, first call of every module only."""

    layer_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_ptrs: dict[str, int] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)
    block_order: list[str] = field(default_factory=list)
    block_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    cats: list[tuple[torch.Tensor, tuple[int, ...]]] = field(default_factory=list)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "sample", None)


def _hook_layer(trace: Trace, name: str, module: nn.Module) -> Any:
    def pre_hook(_module: nn.Module, args: tuple) -> None:
        if name not in trace.layer_inputs:
            trace.layer_order.append(name)
            trace.layer_inputs[name] = args[0].detach().clone()
            trace.layer_ptrs[name] = args[0].data_ptr()
    return module.register_forward_pre_hook(pre_hook)


def _hook_block(trace: Trace, name: str, module: nn.Module) -> list[Any]:
    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if name not in trace.block_order:
            trace.block_order.append(name)
            if args:
                trace.block_inputs[name] = args[0]

    def post_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        trace.outputs.setdefault(name, _first_tensor(output))
    return [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            module.register_forward_hook(post_hook)]


@contextlib.contextmanager
def _recording_cat(trace: Trace) -> Iterator[None]:
    original = torch.cat

    def cat(tensors: Any, dim: int = 0, **kwargs: Any) -> torch.Tensor:
        result = original(tensors, dim=dim, **kwargs)
        if dim == 1 and all(t.ndim == 4 for t in tensors):
            trace.cats.append((result, tuple(t.shape[1] for t in tensors)))
        return result
    torch.cat = cat
    try:
        yield
    finally:
        torch.cat = original


def run_traced(family: str, adapter: DenoiserAdapter, pipe: Any) -> Trace:
    """Run one tiny pipeline call with hooks on every Linear/Conv2d and every block."""
    trace = Trace()
    denoiser = adapter.denoiser
    handles = [_hook_layer(trace, name, module) for name, module in denoiser.named_modules()
               if isinstance(module, (nn.Linear, nn.Conv2d))]
    block_names = [info.name for info in adapter.blocks()]
    if hasattr(denoiser, "conv_in"):  # the UNet's first skip tensor
        block_names.append("conv_in")
    for name in block_names:
        handles += _hook_block(trace, name, adapter.module(name))
    try:
        with _recording_cat(trace), torch.no_grad():
            pipe(**tiny_call_kwargs(family, steps=1))
    finally:
        for handle in handles:
            handle.remove()
    return trace


@pytest.fixture(scope="module")
def traced() -> Any:
    cache: dict[str, tuple[Any, DenoiserAdapter, Trace]] = {}

    def get(family: str) -> tuple[Any, DenoiserAdapter, Trace]:
        if family not in cache:
            pipe = build_tiny(family)
            adapter = get_adapter(pipe)
            cache[family] = (pipe, adapter, run_traced(family, adapter, pipe))
        return cache[family]
    return get


# ---- expected counts from each family's config ---------------------------------------------
def _per_level(value: Any, levels: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _unet_level(name: str, levels: int) -> int:
    """Resolution level (index into block_out_channels) of a UNet module name."""
    stage, _, rest = name.partition(".")
    if stage == "mid_block":
        return levels - 1
    index = int(rest.split(".")[0])
    return index if stage == "down_blocks" else levels - 1 - index


def expected_unet_cond(cfg: Any) -> dict[str, Any]:
    """Transformer layers, decoder resnets and per-level head geometry of a UNet2DConditionModel."""
    levels = len(cfg.block_out_channels)
    per_block = _per_level(cfg.layers_per_block, levels)
    layers = _per_level(cfg.transformer_layers_per_block, levels)
    heads = _per_level(cfg.num_attention_heads or cfg.attention_head_dim, levels)
    down = sum(per_block[i] * layers[i] for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t)
    up = sum((per_block[levels - 1 - i] + 1) * layers[levels - 1 - i]
             for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t)
    return dict(transformer_layers=down + layers[-1] + up, decoder_resnets=sum(p + 1 for p in per_block),
                heads=heads, head_dim=[c // h for c, h in zip(cfg.block_out_channels, heads)])


def expected_counts(family: str, denoiser: nn.Module) -> dict[str, int]:
    """Attention and FFN counts computed from the config alone."""
    cfg = denoiser.config
    if family in ("sd", "sdxl"):
        layers = expected_unet_cond(cfg)["transformer_layers"]
        return dict(attention=2 * layers, ffns=layers)
    if family == "ddpm":
        per_block = cfg.layers_per_block
        down = sum(per_block for t in cfg.down_block_types if t.startswith("Attn"))
        up = sum(per_block + 1 for t in cfg.up_block_types if t.startswith("Attn"))
        return dict(attention=down + 1 + up, ffns=0)
    if family == "sd3":
        return dict(attention=cfg.num_layers, ffns=2 * cfg.num_layers - 1)
    if family == "flux":
        return dict(attention=cfg.num_layers + cfg.num_single_layers,
                    ffns=2 * cfg.num_layers + cfg.num_single_layers)
    attentions_per_block = 2 if family == "pixart" else 1
    return dict(attention=attentions_per_block * cfg.num_layers, ffns=cfg.num_layers)


def expected_heads(family: str, denoiser: nn.Module, attention_name: str) -> tuple[int, int]:
    cfg = denoiser.config
    if family in ("sd", "sdxl"):
        geometry = expected_unet_cond(cfg)
        level = _unet_level(attention_name, len(cfg.block_out_channels))
        return geometry["heads"][level], geometry["head_dim"][level]
    if family == "ddpm":
        channels = cfg.block_out_channels[_unet_level(attention_name, len(cfg.block_out_channels))]
        return channels // cfg.attention_head_dim, cfg.attention_head_dim
    return cfg.num_attention_heads, cfg.attention_head_dim


def all_layers(denoiser: nn.Module) -> list[str]:
    return [n for n, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ---- registry ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_registry_finds_adapter_and_component(family: str, traced: Any) -> None:
    pipe, adapter, _ = traced(family)
    component, denoiser = find_denoiser(pipe)
    assert adapter.family == ADAPTER_FAMILY[family]
    assert component == adapter.component and denoiser is getattr(pipe, component)
    assert type(get_adapter(denoiser)) is type(adapter)
    assert type(denoiser).__name__ in supported_denoisers()


def test_unsupported_models_raise_listing_supported() -> None:
    for target in (nn.Linear(2, 2), types.SimpleNamespace(vae=tiny_vae())):
        with pytest.raises(UnsupportedModelError) as info:
            get_adapter(target)
        for name in ("UNet2DConditionModel", "UNet2DModel", "SD3Transformer2DModel",
                     "FluxTransformer2DModel", "PixArtTransformer2DModel", "DiTTransformer2DModel"):
            assert name in str(info.value)
    with pytest.raises(UnsupportedModelError, match="denoiser Conv2d"):
        get_adapter(types.SimpleNamespace(unet=nn.Conv2d(1, 1, 1)))


def test_unsupported_unet_block_is_named() -> None:
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D"), cross_attention_dim=32,
        up_block_types=("SimpleCrossAttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(UnsupportedModelError, match="SimpleCrossAttnDownBlock2D.*CrossAttnDownBlock2D"):
        get_adapter(unet)


@pytest.mark.parametrize("family", ["flux", "sd"])  # FluxAttention (AttentionModuleMixin), legacy Attention
def test_fused_projections_are_rejected_until_unfused(family: str) -> None:
    adapter = get_adapter(build_tiny(family))
    adapter.denoiser.fuse_qkv_projections()
    for query in (adapter.layer_groups, adapter.attention):  # attention(): structured pruning's heads
        with pytest.raises(ValueError, match=r"pipe.unfuse_qkv_projections\(\) first"):
            query()
    adapter.denoiser.unfuse_qkv_projections()  # legacy Attention keeps fused_projections=True
    assert adapter.layer_groups() and adapter.attention()


# ---- layers and groups ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_eligible_and_high_precision_partition_all_layers(family: str, traced: Any) -> None:
    _, adapter, _ = traced(family)
    eligible, high = adapter.eligible_layers(), adapter.high_precision_layers()
    assert len(eligible) == len(set(eligible)) and len(high) == len(set(high))
    assert not set(eligible) & set(high)
    assert set(eligible) | set(high) == set(all_layers(adapter.denoiser))


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_share_the_same_input(family: str, traced: Any) -> None:
    _, adapter, trace = traced(family)
    for layer_group in adapter.layer_groups():
        first, *rest = layer_group.layers
        for name in rest:
            assert torch.equal(trace.layer_inputs[first], trace.layer_inputs[name]), (first, name)
        if layer_group.role != "adaln":  # adaLN linears each apply silu(temb) themselves
            assert {trace.layer_ptrs[n] for n in layer_group.layers} == {trace.layer_ptrs[first]}


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_of_a_block_read_different_inputs(family: str, traced: Any) -> None:
    """Groups are maximal within a block, except K/V of stacked cross-attentions (same encoder states)."""
    _, adapter, trace = traced(family)
    groups = adapter.layer_groups()
    for i, first in enumerate(groups):
        for second in groups[i + 1:]:
            if first.block != second.block:
                continue
            x, y = trace.layer_inputs[first.layers[0]], trace.layer_inputs[second.layers[0]]
            if x.shape == y.shape and torch.equal(x, y):
                assert first.role == second.role == "kv_cross", (first, second)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_and_blocks_in_execution_order(family: str, traced: Any) -> None:
    _, adapter, trace = traced(family)
    assert [info.name for info in adapter.blocks()] == [n for n in trace.block_order if n != "conv_in"]
    position = {name: i for i, name in enumerate(trace.layer_order)}
    starts = [min(position[n] for n in g.layers) for g in adapter.layer_groups()]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    block_names = {info.name for info in adapter.blocks()}
    assert all(g.block in block_names and all(n.startswith(g.block + ".") for n in g.layers)
               for g in adapter.layer_groups())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_name_resolves(family: str, traced: Any) -> None:
    _, adapter, _ = traced(family)
    names = [info.name for info in adapter.blocks()] + adapter.eligible_layers()
    names += adapter.high_precision_layers()
    for attn in adapter.attention():
        names += [n for n in (attn.name, attn.to_q, attn.to_k, attn.to_v, attn.to_out, attn.added_q,
                              attn.added_k, attn.added_v, attn.added_out) if n is not None]
    for ffn in adapter.ffns():
        names += [ffn.name, *ffn.proj_in, ffn.proj_out]
    names += [concat.layer for concat in adapter.skip_concats()]
    for point in adapter.cache_points():
        names += [n for n in (point.down, point.up, point.stack, *point.blocks) if n is not None]
    for name in names:
        adapter.module(name)
    eligible = set(adapter.eligible_layers())
    assert all(ffn.proj_out in eligible and set(ffn.proj_in) <= eligible for ffn in adapter.ffns())


# ---- attention and FFNs --------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_matches_config(family: str, traced: Any) -> None:
    _, adapter, _ = traced(family)
    attentions = adapter.attention()
    assert len(attentions) == expected_counts(family, adapter.denoiser)["attention"]
    for attn in attentions:
        assert (attn.heads, attn.head_dim) == expected_heads(family, adapter.denoiser, attn.name)
        assert attn.heads * attn.head_dim == adapter.module(attn.to_q).out_features
        cross = attn.name.endswith("attn2") and family in ("sd", "sdxl", "pixart")
        assert attn.is_cross_attention == cross
        joint = family in ("sd3", "flux") and not attn.name.startswith("single")
        assert (attn.added_q is not None) == joint
    if family == "flux":
        single = [a for a in attentions if a.name.startswith("single_transformer_blocks")]
        assert single and all(a.to_out is None for a in single)


@pytest.mark.parametrize("family", FAMILIES)
def test_ffns_match_config(family: str, traced: Any) -> None:
    _, adapter, _ = traced(family)
    ffns = adapter.ffns()
    assert len(ffns) == expected_counts(family, adapter.denoiser)["ffns"]
    for ffn in ffns:
        proj_in, proj_out = adapter.module(ffn.proj_in[0]), adapter.module(ffn.proj_out)
        width = proj_out.out_features
        assert ffn.hidden == 4 * width  # every tiny family uses mult / mlp_ratio 4
        assert ffn.gated == (family in ("sd", "sdxl"))
        assert proj_in.out_features == ffn.hidden * (2 if ffn.gated else 1)
        offset = ffn.proj_out_offset
        assert proj_out.in_features == offset + ffn.hidden


def test_flux_single_block_ffn_columns(traced: Any) -> None:
    """proj_out's columns offset: are exactly the MLP activations (hooked during a real call)."""
    _, adapter, trace = traced("flux")
    singles = [f for f in adapter.ffns() if f.proj_out_offset > 0]
    assert len(singles) == adapter.denoiser.config.num_single_layers
    for ffn in singles:
        proj_mlp = adapter.module(ffn.proj_in[0])
        with torch.no_grad():
            mlp = nn.functional.gelu(proj_mlp(trace.layer_inputs[ffn.proj_in[0]]), approximate="tanh")
        proj_out_input = trace.layer_inputs[ffn.proj_out]
        assert torch.allclose(proj_out_input[..., ffn.proj_out_offset:], mlp, atol=1e-6)
        roles = {g.role: g.layers for g in adapter.layer_groups() if g.block == ffn.name}
        assert roles["qkv_mlp"][0] == ffn.proj_in[0] and roles["attn_mlp_out"] == (ffn.proj_out,)


# ---- UNet skip concatenations and DeepCache branches ---------------------------------------
@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_skip_concat_splits_match_torch_cat(family: str, traced: Any) -> None:
    _, adapter, trace = traced(family)
    concats = adapter.skip_concats()
    decoder_resnets = sorted({c.layer.rsplit(".", 1)[0] for c in concats})
    assert len(concats) == 2 * len(decoder_resnets)  # every decoder resnet has conv1 + shortcut
    assert len([c for c in concats if c.direct]) == len(decoder_resnets)
    for concat in concats:
        resnet_input = trace.block_inputs[concat.layer.rsplit(".", 1)[0]]
        parts = [sizes for result, sizes in trace.cats if result is resnet_input]
        assert parts == [(concat.split, concat.total - concat.split)], concat
        assert concat.direct == concat.layer.endswith("conv_shortcut")


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_cache_branches_pair_skip_producer_with_consumer(family: str, traced: Any) -> None:
    _, adapter, trace = traced(family)
    points = adapter.cache_points()
    splits = {c.layer.rsplit(".", 1)[0]: c.split for c in adapter.skip_concats()}
    assert [p.branch for p in points] == list(range(len(splits)))
    assert points[0].down == "conv_in"
    order = trace.block_order
    for point in points:
        assert point.kind == "skip_branch"
        skip = trace.block_inputs[point.up][:, splits[point.up]:]
        assert torch.equal(skip, trace.outputs[point.down]), point
        start = order.index(point.down) + 1
        assert point.blocks == tuple(order[start:order.index(point.up)])
    assert all(len(a.blocks) > len(b.blocks) for a, b in zip(points, points[1:]))


@pytest.mark.parametrize("family", ("sd3", "flux", "pixart", "dit"))
def test_dit_cache_points_are_block_stacks(family: str, traced: Any) -> None:
    _, adapter, _ = traced(family)
    points = adapter.cache_points()
    stacks = ["transformer_blocks"] + ["single_transformer_blocks"] * (family == "flux")
    assert [p.stack for p in points] == stacks and all(p.kind == "block_stack" for p in points)
    assert [b for p in points for b in p.blocks] == [info.name for info in adapter.blocks()]


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_counts_are_consistent(family: str, traced: Any) -> None:
    _, adapter, _ = traced(family)
    summary = adapter.summary()
    assert summary["family"] == ADAPTER_FAMILY[family]
    assert summary["eligible_layers"] + summary["high_precision_layers"] == len(all_layers(adapter.denoiser))
    assert summary["cache_points"] >= 1 and summary["layer_groups"] <= summary["eligible_layers"]
    if family in ("sd", "sdxl"):
        resnets = expected_unet_cond(adapter.denoiser.config)["decoder_resnets"]
        assert (summary["skip_concats"], summary["cache_points"]) == (2 * resnets, resnets)


# ---- published full-size UNets on the meta device ------------------------------------------
@pytest.fixture(scope="module")
def published() -> Any:
    cache: dict[str, DenoiserAdapter] = {}

    def get(name: str) -> DenoiserAdapter:
        if name not in cache:
            with torch.device("meta"):
                cache[name] = get_adapter(UNet2DConditionModel(**PUBLISHED_UNETS[name][0]))
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(PUBLISHED_UNETS))
def test_published_unet_structure(name: str, published: Any) -> None:
    adapter = published(name)
    _, parameters, expected = PUBLISHED_UNETS[name]
    assert sum(p.numel() for p in adapter.denoiser.parameters()) == parameters
    summary = adapter.summary()
    assert {key: summary[key] for key in expected} == expected
    assert summary["eligible_layers"] + summary["high_precision_layers"] == len(all_layers(adapter.denoiser))
    for attn in adapter.attention():
        assert (attn.heads, attn.head_dim) == expected_heads("sd", adapter.denoiser, attn.name)
    for ffn in adapter.ffns():
        channels = adapter.module(ffn.proj_out).out_features
        assert ffn.gated and ffn.hidden == 4 * channels


@pytest.mark.parametrize("name", sorted(PUBLISHED_UNETS))
def test_published_unet_branches_follow_deepcache(name: str, published: Any) -> None:
    """DeepCache: branch k -> cache_block_id k // 3, cache_layer_id k % 3 (3 resnets per up block)."""
    adapter = published(name)
    blocks = len(adapter.denoiser.up_blocks)
    for point in adapter.cache_points():
        block_id, layer_id = divmod(point.branch, 3)
        assert point.up == f"up_blocks.{blocks - 1 - block_id}.resnets.{2 - layer_id}"
        if point.branch == 0:
            continue
        # DeepCache's first skipped down module is (block_id, layer_id); ours is the one before it.
        if layer_id == 0:
            assert point.down == f"down_blocks.{block_id - 1}.downsamplers.0"
        else:
            last_of_layer = {f"down_blocks.{block_id}.{kind}.{layer_id - 1}"
                             for kind in ("attentions", "resnets")}
            assert point.down in last_of_layer


def test_published_skip_concats_follow_config(published: Any) -> None:
    adapter = published("sd15")
    first_up = [c for c in adapter.skip_concats() if c.layer.startswith("up_blocks.0.")]
    # up_blocks.0 (1280 ch) reads cat([1280 hidden, 1280 skip]) for every resnet
    assert {(c.split, c.total) for c in first_up} == {(1280, 2560)}
    last = adapter.skip_concats()[-2:]
    assert [(c.layer, c.split, c.total, c.direct) for c in last] == [
        ("up_blocks.3.resnets.2.conv1", 320, 640, False),
        ("up_blocks.3.resnets.2.conv_shortcut", 320, 640, True)]


def test_sd35_dual_attention_blocks_are_covered() -> None:
    """SD3.5's dual-attention blocks add ``attn2``: grouped in order, sharing inputs, all covered."""
    from diffusers import SD3Transformer2DModel

    pipe = build_tiny("sd3")
    pipe.transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    adapter = get_adapter(pipe)
    trace = run_traced("sd3", adapter, pipe)
    assert [a.name for a in adapter.attention()] == [
        "transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    position = {name: i for i, name in enumerate(trace.layer_order)}
    starts = [min(position[n] for n in g.layers) for g in adapter.layer_groups()]
    assert starts == sorted(starts)
    for layer_group in adapter.layer_groups():
        assert all(torch.equal(trace.layer_inputs[layer_group.layers[0]], trace.layer_inputs[n])
                   for n in layer_group.layers)
    covered = set(adapter.eligible_layers()) | set(adapter.high_precision_layers())
    assert covered == set(all_layers(adapter.denoiser))


def test_flux_single_block_attention_names_its_shared_output(traced: Any) -> None:
    """Single-stream attention has no to_out; proj_out columns 0:dim project it."""
    _, adapter, _ = traced("flux")
    singles = [a for a in adapter.attention() if a.to_out is None]
    assert len(singles) == adapter.denoiser.config.num_single_layers
    for info in singles:
        width = adapter.module(info.to_q).out_features
        assert info.shared_out.endswith("proj_out") and info.shared_out_columns == (0, width)


def test_cross_attention_kv_groups_share_an_input_key(traced: Any) -> None:
    """Every cross-attention K/V group reads the encoder states: one input_key for all."""
    _, adapter, trace = traced("sd")
    kv_groups = [g for g in adapter.layer_groups() if g.role == "kv_cross"]
    assert kv_groups and {g.input_key for g in kv_groups} == {"encoder_hidden_states"}
    first = trace.layer_inputs[kv_groups[0].layers[0]]
    assert all(torch.equal(trace.layer_inputs[g.layers[0]], first) for g in kv_groups)


def test_find_denoiser_looks_through_torch_compile() -> None:
    """A compiled denoiser (OptimizedModule) resolves to its original module."""
    pipe = build_tiny("sd")
    original = pipe.unet
    pipe.unet = torch.compile(original, backend="eager")
    assert find_denoiser(pipe) == ("unet", original)


def test_gligen_fuser_layers_are_grouped_and_quantized() -> None:
    """GLIGEN's gated self-attention (``fuser``, attention_type="gated") was in neither layer list: quantize_ and
    prune_ left its 28 Linears in float, silently."""
    import diffusion_accel as da
    from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel

    sd = build_tiny("sd")
    unet = UNet2DConditionModel(**{**sd.unet.config, "attention_type": "gated"}).eval()
    pipe = StableDiffusionGLIGENPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
                                         scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    adapter = get_adapter(pipe)
    fuser = [name for name in all_layers(unet) if ".fuser." in name]
    assert fuser and set(fuser) <= set(adapter.eligible_layers())
    assert set(adapter.eligible_layers()) | set(adapter.high_precision_layers()) == set(all_layers(unet))
    grounding = {"gligen_phrases": ["a cat"], "gligen_boxes": [[0.1, 0.1, 0.6, 0.6]], "height": 32, "width": 32,
                 "gligen_scheduled_sampling_beta": 1.0}  # the fuser runs on every step
    da.quantize_(pipe, da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all",
                                    calib_kwargs=tuple(grounding.items())))
    assert {type(pipe.unet.get_submodule(name)).__name__ for name in fuser} <= {"Int8Linear", "QuantLinear"}
    attention = da.quantize_(StableDiffusionGLIGENPipeline(**{**pipe.components, "unet": UNet2DConditionModel(
        **{**sd.unet.config, "attention_type": "gated"}).eval()}), da.PTQConfig(
        weights=None, activations=None, attention="int8", calib_prompts=1, calib_num_steps=2, calib_steps="all",
        calib_kwargs=tuple(grounding.items())))  # its fuser's attention is named, not left in float unsaid (s49)
    assert "7 attention modules stay unquantized (processors not replaced: modules the adapter does not list, e.g. " \
        "'down_blocks.0.attentions.0.transformer_blocks.0.fuser.attn'" in da.quant_summary(attention)
