"""Shared adapter for diffusers UNets (``UNet2DConditionModel``, ``UNet2DModel``).

Blocks are the leaf units the UNet runs in order: every resnet, every attention (a
``Transformer2DModel`` in conditional UNets, a spatial ``Attention`` in ``UNet2DModel``) and every
down/upsampler, walking down blocks, the mid block, then up blocks.

Skip connections. The down path pushes one skip tensor per "unit": ``conv_in``'s output first, then
the output of each (resnet[, attention]) pair and of each downsampler. Every decoder resnet pops the
newest one and reads ``cat([hidden, skip], dim=1)``. Skip ``k`` (0 = ``conv_in``, the shallowest) is
DeepCache's branch ``k``: with ``cache_branch_id = k`` DeepCache recomputes the units that produce
skips ``0..k`` and the up units from the resnet that consumes skip ``k`` on, and reuses the cached
feature for everything in between. For SD 1.x/2.x and SDXL (3 resnets per up block) this is exactly
DeepCache's ``cache_block_id = k // 3, cache_layer_id = k % 3``; for other ``layers_per_block`` the
skip index is the consistent generalisation.
"""

from __future__ import annotations

from torch import nn

from ..base import (AttentionInfo, BlockInfo, CachePoint, DenoiserAdapter, FFNInfo, LayerGroup, ResnetInfo,
                    SkipConcat)
from ..registry import UnsupportedModelError
from ._common import (attention_groups, attention_info, basic_block_attention, basic_block_groups,
                      ffn_info, group, join, layers_outside)

SUPPORTED_STAGES = {
    "down_blocks": ("DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block": ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn"),
    "up_blocks": ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"),
}
ATTENTION_KINDS = {"Transformer2DModel": "transformer", "Attention": "attention"}
STAGES = tuple(SUPPORTED_STAGES)

Unit = tuple[BlockInfo, ...]


def _attention_kind(prefix: str, attn: nn.Module) -> str:
    kind = ATTENTION_KINDS.get(type(attn).__name__)
    if kind is None:
        raise UnsupportedModelError(
            f"UNet attention {prefix!r} is a {type(attn).__name__}; supported: {sorted(ATTENTION_KINDS)}")
    return kind


def _check_stage(prefix: str, stage: nn.Module, accepted: tuple[str, ...]) -> None:
    if type(stage).__name__ not in accepted:
        raise UnsupportedModelError(
            f"UNet block {prefix!r} is a {type(stage).__name__}; supported: {', '.join(accepted)}")


def stage_units(prefix: str, stage: nn.Module, sampler_attr: str, sampler_kind: str) -> list[Unit]:
    """Units of a down/up block: (resnet[, attention]) per layer, then one per sampler."""
    attentions = list(getattr(stage, "attentions", None) or [])
    units: list[Unit] = []
    for j in range(len(stage.resnets)):
        unit = [BlockInfo(f"{prefix}.resnets.{j}", "resnet")]
        if j < len(attentions) and attentions[j] is not None:
            name = f"{prefix}.attentions.{j}"
            unit.append(BlockInfo(name, _attention_kind(name, attentions[j])))
        units.append(tuple(unit))
    samplers = getattr(stage, sampler_attr, None) or []
    units += [(BlockInfo(f"{prefix}.{sampler_attr}.{k}", sampler_kind),) for k in range(len(samplers))]
    return units


def mid_leaves(mid: nn.Module | None) -> list[BlockInfo]:
    """Mid-block leaves: resnets[0], then (attention[i], resnets[i + 1]) pairs."""
    if mid is None:
        return []
    leaves = [BlockInfo("mid_block.resnets.0", "resnet")]
    for j, attn in enumerate(getattr(mid, "attentions", None) or []):
        if attn is not None:
            name = f"mid_block.attentions.{j}"
            leaves.append(BlockInfo(name, _attention_kind(name, attn)))
        leaves.append(BlockInfo(f"mid_block.resnets.{j + 1}", "resnet"))
    return leaves


def resnet_groups(prefix: str, resnet: nn.Module, block: str) -> list[LayerGroup]:
    """ResnetBlock2D groups in execution order: conv1, time_emb_proj, conv2, conv_shortcut."""
    return (group(resnet, prefix, ("conv1",), block, "conv")
            + group(resnet, prefix, ("time_emb_proj",), block, "time_emb")
            + group(resnet, prefix, ("conv2",), block, "conv")
            + group(resnet, prefix, ("conv_shortcut",), block, "shortcut"))


def transformer2d_groups(prefix: str, model: nn.Module, block: str) -> list[LayerGroup]:
    """Transformer2DModel groups: proj_in, each BasicTransformerBlock, proj_out."""
    groups = group(model, prefix, ("proj_in",), block, "proj_in")
    for k, inner in enumerate(model.transformer_blocks):
        groups += basic_block_groups(f"{prefix}.transformer_blocks.{k}", inner, block)
    return groups + group(model, prefix, ("proj_out",), block, "proj_out")


def leaf_groups(name: str, module: nn.Module) -> list[LayerGroup]:
    """Groups of one leaf block, dispatched on its class."""
    kind = type(module).__name__
    if kind == "ResnetBlock2D":
        return resnet_groups(name, module, name)
    if kind == "Transformer2DModel":
        return transformer2d_groups(name, module, name)
    if kind == "Attention":
        return attention_groups(name, module, name)
    return group(module, name, ("conv",), name, "conv")  # Downsample2D / Upsample2D


def resnet_info(name: str, resnet: nn.Module) -> ResnetInfo | None:
    """The inner-channel geometry of a ResnetBlock2D, or None if it is not the standard layout."""
    norm = getattr(resnet, "norm2", None)
    standard = (isinstance(norm, nn.GroupNorm) and norm.affine and isinstance(getattr(resnet, "conv1", None), nn.Conv2d)
                and isinstance(getattr(resnet, "conv2", None), nn.Conv2d)
                and not getattr(resnet, "up", False) and not getattr(resnet, "down", False)
                and getattr(resnet, "time_embedding_norm", "default") in ("default", "scale_shift"))
    if (not standard or resnet.conv1.groups != 1 or resnet.conv2.groups != 1
            or norm.num_channels != resnet.conv1.out_channels):
        return None
    temb = "time_emb_proj" if isinstance(getattr(resnet, "time_emb_proj", None), nn.Linear) else None
    return ResnetInfo(name, f"{name}.conv1", f"{name}.norm2", f"{name}.conv2",
                      None if temb is None else f"{name}.{temb}", resnet.conv1.out_channels, norm.num_groups,
                      getattr(resnet, "time_embedding_norm", "default") == "scale_shift")


class UNetAdapter(DenoiserAdapter):
    """Adapter for diffusers UNets built from the standard down/mid/up blocks."""

    component = "unet"

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__(denoiser)
        self._check_structure()

    def _check_structure(self) -> None:
        for stage_attr in ("down_blocks", "up_blocks"):
            for i, stage in enumerate(getattr(self.denoiser, stage_attr)):
                _check_stage(f"{stage_attr}.{i}", stage, SUPPORTED_STAGES[stage_attr])
        mid = getattr(self.denoiser, "mid_block", None)
        if mid is not None:
            _check_stage("mid_block", mid, SUPPORTED_STAGES["mid_block"])
        self.blocks()  # validates every attention leaf

    # ---- structure ---------------------------------------------------------------------
    def _units(self, stage_attr: str, sampler_attr: str, sampler_kind: str) -> list[Unit]:
        stages = getattr(self.denoiser, stage_attr)
        return [unit for i, stage in enumerate(stages)
                for unit in stage_units(f"{stage_attr}.{i}", stage, sampler_attr, sampler_kind)]

    def down_units(self) -> list[Unit]:
        """Down-path units in execution order; each pushes one skip tensor."""
        return self._units("down_blocks", "downsamplers", "downsample")

    def up_units(self) -> list[Unit]:
        """Up-path units in execution order; each resnet unit pops one skip tensor."""
        return self._units("up_blocks", "upsamplers", "upsample")

    def blocks(self) -> list[BlockInfo]:
        down = [leaf for unit in self.down_units() for leaf in unit]
        up = [leaf for unit in self.up_units() for leaf in unit]
        return down + mid_leaves(getattr(self.denoiser, "mid_block", None)) + up

    # ---- layers ------------------------------------------------------------------------
    def layer_groups(self) -> list[LayerGroup]:
        return [g for info in self.blocks() for g in leaf_groups(info.name, self.module(info.name))]

    def high_precision_layers(self) -> list[str]:
        """Everything outside the down/mid/up blocks: conv_in, time/added embeddings, conv_out."""
        return layers_outside(self.denoiser, STAGES)

    def _transformer_leaves(self) -> list[tuple[str, nn.Module]]:
        return [(info.name, self.module(info.name)) for info in self.blocks()
                if info.kind in ("transformer", "attention")]

    def attention(self) -> list[AttentionInfo]:
        infos: list[AttentionInfo] = []
        for name, module in self._transformer_leaves():
            if type(module).__name__ == "Attention":
                infos.append(attention_info(name, module))
                continue
            for k, inner in enumerate(module.transformer_blocks):
                infos += basic_block_attention(f"{name}.transformer_blocks.{k}", inner)
        return infos

    def ffns(self) -> list[FFNInfo]:
        return [ffn_info(f"{name}.transformer_blocks.{k}.ff", inner.ff)
                for name, module in self._transformer_leaves()
                for k, inner in enumerate(getattr(module, "transformer_blocks", ()))]

    def resnets(self) -> list[ResnetInfo]:
        """Every standard ResnetBlock2D (GroupNorm norm2, no up/down sampling inside)."""
        infos = [resnet_info(info.name, self.module(info.name)) for info in self.blocks() if info.kind == "resnet"]
        return [info for info in infos if info is not None]

    # ---- skip connections and DeepCache branches ---------------------------------------
    def skip_producers(self) -> list[tuple[str, int]]:
        """(module whose output is pushed as a skip, its channels), shallowest (conv_in) first."""
        conv_in = self.denoiser.conv_in  # peft's LoRA wrapper has no out_channels (an AttributeError until s49)
        producers = [("conv_in", getattr(conv_in, "base_layer", conv_in).out_channels)]
        return producers + [(unit[-1].name, self.module(unit[0].name).out_channels)
                            for unit in self.down_units()]

    def _decoder_resnets(self) -> list[tuple[str, int, int]]:
        """(decoder resnet, channels of its hidden input part, total input channels), in order."""
        mid = getattr(self.denoiser, "mid_block", None)
        hidden = mid.resnets[-1].out_channels if mid is not None else self.skip_producers()[-1][1]
        consumers = []
        for unit in self.up_units():
            module = self.module(unit[0].name)
            if unit[0].kind == "resnet":
                consumers.append((unit[0].name, hidden, module.in_channels))
            hidden = module.out_channels
        return consumers

    def skip_pairs(self) -> list[tuple[str, str, int, int]]:
        """Per skip, shallowest first: (producer, consuming decoder resnet, split, total)."""
        producers, consumers = self.skip_producers(), self._decoder_resnets()[::-1]
        if len(producers) != len(consumers):
            raise UnsupportedModelError(f"UNet pushes {len(producers)} skips but its decoder pops "
                                        f"{len(consumers)}; unsupported block layout")
        pairs = []
        for (producer, channels), (resnet, split, total) in zip(producers, consumers):
            if split + channels != total:
                raise UnsupportedModelError(f"{resnet} reads {total} channels, expected hidden "
                                            f"{split} + skip {channels} from {producer}")
            pairs.append((producer, resnet, split, total))
        return pairs

    def skip_concats(self) -> list[SkipConcat]:
        concats: list[SkipConcat] = []
        for _, resnet, split, total in reversed(self.skip_pairs()):  # decoder execution order
            concats.append(SkipConcat(join(resnet, "conv1"), split, total, direct=False))
            if getattr(self.module(resnet), "conv_shortcut", None) is not None:
                concats.append(SkipConcat(join(resnet, "conv_shortcut"), split, total, direct=True))
        return concats

    def encoder_cache_point(self) -> CachePoint:
        """The encoder Faster Diffusion propagates: ``conv_in``, every down block, the mid block.

        Their outputs are everything the decoder reads from the encoder (the skip tensors and the
        mid output); ``up`` is the first up block, which runs after all of them.
        """
        names = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(self.denoiser.down_blocks))]
        if getattr(self.denoiser, "mid_block", None) is not None:
            names.append("mid_block")
        return CachePoint(kind="encoder", down=names[-1], up="up_blocks.0", blocks=tuple(names))

    def cache_points(self) -> list[CachePoint]:
        """DeepCache branches; ``blocks`` are the leaves replaced by the cache on skipped steps."""
        order = [info.name for info in self.blocks()]
        points = []
        for branch, (producer, resnet, _, _) in enumerate(self.skip_pairs()):
            start = order.index(producer) + 1 if producer in order else 0
            cached = tuple(order[start:order.index(resnet)])
            points.append(CachePoint(kind="skip_branch", branch=branch, down=producer, up=resnet,
                                     blocks=cached))
        return points
