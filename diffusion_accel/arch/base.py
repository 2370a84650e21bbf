"""Adapter interface: what a technique may ask about a denoiser family.

An adapter is the only code that knows a model family's module names. Techniques ask it
("which layers share an input", "where are the skip concatenations", "which blocks can be
cached") and never match module paths themselves. All names returned are fully qualified module
names relative to the denoiser (``denoiser.get_submodule(name)`` resolves them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

# Call arguments (of a denoiser or its blocks) that every image of a batch shares whatever their first dimension:
# Flux's / Chroma's position ids (tokens, 3) and the rotary tables diffusers' DiTs pass their blocks (tokens, dim).
# Calibration records split and merge tensors per image by their first dimension; at a batch equal to a token
# count these were cut into rows (replay and block reconstruction failed or trained on wrong tables).
BATCH_SHARED_ARGUMENTS = frozenset({"img_ids", "txt_ids", "image_rotary_emb"})


@dataclass(frozen=True)
class BlockInfo:
    """One block of the denoiser, in execution order.

    kind: UNets list their individual layers' modules in run order ("resnet", "transformer",
    "attention", "downsample", "upsample"); DiTs their blocks ("transformer", "double_stream",
    "single_stream").
    """

    name: str
    kind: str


@dataclass(frozen=True)
class LayerGroup:
    """Linear/Conv layers that receive exactly the same input tensor (e.g. q, k, v).

    OBS pruning shares one Hessian per group; PTQ shares one input quantizer per group.
    ``block`` is the enclosing block's name (for group-wise sequential work), ``role`` a short
    label such as "qkv", "kv_cross", "attn_out", "ffn_in", "ffn_out", "conv", "proj".
    ``input_key`` is set when several groups read the very same tensor (every cross-attention's
    K/V reads the text encoder states): groups with equal keys may share one Hessian.
    """

    layers: tuple[str, ...]
    block: str
    role: str
    input_key: str | None = None


@dataclass(frozen=True)
class AttentionInfo:
    """An attention module with its projections and head geometry.

    ``added_*`` are the context-stream projections of joint attention (SD3/Flux), None if none.
    ``to_out`` is None when the attention has no own output projection (Flux single-stream
    blocks): then ``shared_out`` names the layer that projects it and ``shared_out_columns`` the
    ``(start, stop)`` input columns of that layer which belong to this attention.
    """

    name: str
    heads: int
    head_dim: int
    to_q: str
    to_k: str
    to_v: str
    to_out: str | None
    added_q: str | None = None
    added_k: str | None = None
    added_v: str | None = None
    added_out: str | None = None
    is_cross_attention: bool = False
    shared_out: str | None = None
    shared_out_columns: tuple[int, int] | None = None


@dataclass(frozen=True)
class FFNInfo:
    """A feed-forward pair: ``proj_in`` layers expand to ``hidden`` units, ``proj_out`` contracts.

    Structured pruning of hidden neuron j removes output row j of every ``proj_in`` (for GEGLU,
    rows j and j+hidden of the gate projection) and input column ``proj_out_offset + j`` of
    ``proj_out``. The offset is non-zero when ``proj_out`` reads ``cat([other, mlp_hidden])``
    (Flux single-stream blocks): columns ``0:proj_out_offset`` are not the FFN's to prune.
    """

    name: str
    proj_in: tuple[str, ...]
    proj_out: str
    hidden: int
    gated: bool = False
    proj_out_offset: int = 0


@dataclass(frozen=True)
class ResnetInfo:
    """A ResNet block's inner channels: ``conv1`` -> (+ time embedding) -> ``norm2`` -> ``conv2``.

    Structured pruning removes whole GroupNorm groups of these ``channels`` (``groups`` of
    ``channels // groups`` each), so the remaining groups' statistics are unchanged: output rows of
    ``conv1`` and ``time_emb_proj`` (rows c and c + channels when ``scale_shift``), ``norm2``'s
    affine entries, and ``conv2``'s input channels.
    """

    name: str
    conv1: str
    norm2: str
    conv2: str
    time_emb_proj: str | None
    channels: int
    groups: int
    scale_shift: bool = False


@dataclass(frozen=True)
class SkipConcat:
    """A layer fed by ``cat([hidden, skip], dim=1)`` in a UNet decoder.

    ``split`` is the channel count of the first part (``hidden``); channels ``split:`` are the skip.
    ``direct`` is True when the layer sees the concatenation directly (the 1x1 shortcut conv), False
    when a norm/activation sits between (conv1 after GroupNorm): only direct consumers get
    split-shortcut quantization.
    """

    layer: str
    split: int
    total: int
    direct: bool


@dataclass(frozen=True)
class CachePoint:
    """Where a cache can cut the computation.

    UNet: ``kind == "skip_branch"``; ``branch`` is the DeepCache branch id: skip tensor k, with
    k = 0 the output of ``conv_in`` (for SD/SDXL exactly DeepCache's ``block = k // 3``,
    ``layer = k % 3``). ``down`` is the module producing that skip, ``up`` the decoder resnet
    consuming it, ``blocks`` the modules the cache replaces on a skipped step.
    DiT: ``kind == "block_stack"``; ``stack`` names the stack, ``blocks`` its blocks in order.
    UNet encoder (``encoder_cache_point()``): ``kind == "encoder"``; ``blocks`` are the modules
    whose outputs encoder propagation reuses (input conv, down blocks, mid block), ``up`` the first
    decoder module.
    """

    kind: str
    branch: int | None = None
    down: str | None = None
    up: str | None = None
    blocks: tuple[str, ...] = field(default_factory=tuple)
    stack: str | None = None


MODULATED_SOURCES = ("output", "input")


@dataclass(frozen=True)
class BlockStreams:
    """How a transformer block's ``forward`` takes and returns its streams.

    ``hidden_arg`` / ``encoder_arg`` name the forward arguments carrying the image and the text
    (context) stream; ``encoder_arg`` is None when the block does not update a context stream
    (cross-attention blocks only read it). ``hidden_out`` / ``encoder_out`` are their positions in
    a returned tuple (a block returning a bare tensor returns the hidden stream). ``modulated`` is
    the submodule (relative to the block) that carries the timestep-modulated input TeaCache
    watches: its first output (``modulated_from="output"``, an adaptive norm) or its
    ``hidden_states`` input (``"input"``, e.g. the attention after adaLN-single's scale/shift).
    """

    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = None
    hidden_out: int = 0
    encoder_out: int | None = None
    modulated: str | None = None
    modulated_from: str = "output"

    def __post_init__(self) -> None:
        if self.modulated_from not in MODULATED_SOURCES:
            raise ValueError(f"modulated_from must be one of {MODULATED_SOURCES}, got {self.modulated_from!r}")


class DenoiserAdapter(ABC):
    """Base class: one subclass per denoiser family, registered with ``@register_adapter``.

    Subclasses set ``family`` (a short name) and ``denoiser_classes`` (class names, so that
    diffusers need not export every class) and implement the query methods.
    """

    family: ClassVar[str] = ""
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    component: ClassVar[str] = "transformer"  # the pipeline attribute holding the denoiser
    # whether the pipelines of this family feed guidance_scale to the denoiser (distilled guidance) instead of
    # running classifier-free guidance with it (true CFG, where offered, is a separate argument); an adapter may
    # read it off the model (UNets with ``time_cond_proj_dim``: LCM)
    embeds_guidance: ClassVar[bool] = False

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser

    @property
    def config(self) -> Any:
        return getattr(self.denoiser, "config", None)

    def module(self, name: str) -> nn.Module:
        return self.denoiser.get_submodule(name)

    # ---- queries every adapter answers ----------------------------------------------------
    @abstractmethod
    def blocks(self) -> list[BlockInfo]:
        """The denoiser's blocks in execution order."""

    @abstractmethod
    def layer_groups(self) -> list[LayerGroup]:
        """Eligible layers grouped by shared input, in execution (depth) order."""

    @abstractmethod
    def attention(self) -> list[AttentionInfo]:
        """Every attention module with its projections and head geometry."""

    @abstractmethod
    def ffns(self) -> list[FFNInfo]:
        """Every feed-forward pair (expanding and contracting projections)."""

    def resnets(self) -> list[ResnetInfo]:
        """ResNet blocks whose inner channels structured pruning may remove; none by default."""
        return []

    def skip_concats(self) -> list[SkipConcat]:
        """UNet decoder layers fed by ``cat([hidden, skip])``; none for other families."""
        return []

    @abstractmethod
    def cache_points(self) -> list[CachePoint]:
        """Where caches can cut the computation (UNet skip branches, DiT block stacks)."""

    def block_streams(self, name: str) -> BlockStreams:
        """Stream layout of the transformer block ``name`` (block caches); TypeError if it has none."""
        raise TypeError(f"{type(self.denoiser).__name__} has no transformer blocks with known streams "
                        f"(asked for {name!r})")

    def output_layer(self) -> str | None:
        """The final projection producing the denoiser's output (output-forecasting caches); None if unknown."""
        return None

    def num_classes(self) -> int | None:
        """Classes a class-conditional denoiser is trained on (calibration label ids 0..n-1); None if it
        takes no class labels."""
        return None

    def encoder_cache_point(self) -> CachePoint | None:
        """UNets: the encoder (input conv, down blocks, mid block) for encoder propagation; else None."""
        return None

    @abstractmethod
    def high_precision_layers(self) -> list[str]:
        """Layers kept in high precision by default (first/last conv or proj, time embedding)."""

    # ---- derived helpers ---------------------------------------------------------------
    def eligible_layers(self) -> list[str]:
        """All Linear/Conv layers eligible for quantization and pruning, in depth order."""
        return [name for group in self.layer_groups() for name in group.layers]

    def summary(self) -> dict[str, Any]:
        """Counts of what the adapter found, for users and tests."""
        return {
            "family": self.family,
            "denoiser": type(self.denoiser).__name__,
            "blocks": len(self.blocks()),
            "layer_groups": len(self.layer_groups()),
            "eligible_layers": len(self.eligible_layers()),
            "attention": len(self.attention()),
            "ffns": len(self.ffns()),
            "skip_concats": len(self.skip_concats()),
            "cache_points": len(self.cache_points()),
            "high_precision_layers": len(self.high_precision_layers()),
        }
