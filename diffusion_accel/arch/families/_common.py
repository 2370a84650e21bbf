"""Helpers shared by the family adapters: layer discovery, attention/FFN descriptions, groups.

Everything here works on the live modules (shapes are read from the layers themselves), so an
adapter stays truthful after a technique has, say, pruned heads or FFN neurons.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from diffusers.models.attention_processor import Attention
from torch import nn

from ..base import AttentionInfo, FFNInfo, LayerGroup

ELIGIBLE_TYPES = (nn.Linear, nn.Conv2d)
QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")


def join(prefix: str, name: str) -> str:
    """Qualified module name ``prefix.name`` (just ``name`` at the root)."""
    return f"{prefix}.{name}" if prefix else name


def is_eligible(module: nn.Module | None) -> bool:
    """True for the layer types adapters hand to techniques (Linear, Conv2d)."""
    return isinstance(module, ELIGIBLE_TYPES)


def child(parent: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` of ``parent``, or None if absent (or set to None)."""
    try:
        return parent.get_submodule(path)
    except AttributeError:
        return None


def present(parent: nn.Module, prefix: str, paths: Iterable[str]) -> tuple[str, ...]:
    """Qualified names of those ``paths`` under ``parent`` that are eligible layers, in order."""
    return tuple(join(prefix, path) for path in paths if is_eligible(child(parent, path)))


def group(parent: nn.Module, prefix: str, paths: Sequence[str], block: str,
          role: str, input_key: str | None = None) -> list[LayerGroup]:
    """A one-element list holding the group of existing ``paths``, or [] if none exists."""
    names = present(parent, prefix, paths)
    return [LayerGroup(layers=names, block=block, role=role, input_key=input_key)] if names else []


def eligible_layer_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Qualified names of every Linear/Conv2d under ``module`` (registration order)."""
    return [name for name, sub in module.named_modules(prefix=prefix) if is_eligible(sub)]


def layers_outside(denoiser: nn.Module, stacks: Sequence[str]) -> list[str]:
    """Eligible layers of ``denoiser`` that live outside the named top-level ``stacks``."""
    inside = tuple(f"{stack}." for stack in stacks)
    return [name for name in eligible_layer_names(denoiser) if not name.startswith(inside)]


def in_module_order(denoiser: nn.Module, names: Iterable[str]) -> list[str]:
    """``names`` sorted by the denoiser's module registration order (duplicates dropped)."""
    wanted = set(names)
    return [name for name in eligible_layer_names(denoiser) if name in wanted]


# ---- attention -----------------------------------------------------------------------------
def uses_fused_projections(attn: nn.Module) -> bool:
    """Whether ``attn`` runs fused QKV projections (``to_qkv``/``to_kv``/``to_added_qkv``).

    Legacy ``Attention`` keeps ``fused_projections=True`` after ``pipe.unfuse_qkv_projections()``,
    which only restores the unfused processors: there the processor decides. Attention classes with
    diffusers' ``AttentionModuleMixin`` (Flux, SD3's new style) clear the flag when they unfuse.
    """
    if not getattr(attn, "fused_projections", False):
        return False
    if isinstance(attn, Attention):
        return "Fused" in type(attn.processor).__name__
    return True


def _check_unfused(prefix: str, attn: nn.Module) -> None:
    if uses_fused_projections(attn):
        raise ValueError(f"attention {prefix!r} uses fused QKV projections (fuse_qkv_projections()); "
                         "call pipe.unfuse_qkv_projections() first: techniques work on the separate "
                         "to_q/to_k/to_v layers")


def is_cross_attention(attn: nn.Module) -> bool:
    """True when the attention's keys/values read encoder states rather than its own input."""
    return bool(getattr(attn, "is_cross_attention", False))


def attention_input_groups(prefix: str, attn: nn.Module, block: str) -> list[LayerGroup]:
    """Projection groups of one attention: {q,k,v} (or {q} + {k,v} for cross) + added {q,k,v}."""
    _check_unfused(prefix, attn)
    if is_cross_attention(attn):
        groups = (group(attn, prefix, ("to_q",), block, "q_cross")
                  + group(attn, prefix, ("to_k", "to_v"), block, "kv_cross",
                          input_key="encoder_hidden_states"))
    else:
        groups = group(attn, prefix, QKV, block, "qkv")
    return groups + group(attn, prefix, ADDED_QKV, block, "added_qkv")


def attention_output_groups(prefix: str, attn: nn.Module, block: str,
                            added_first: bool = False) -> list[LayerGroup]:
    """Output projections of one attention, in the order the family's processor runs them."""
    out = group(attn, prefix, ("to_out.0",), block, "attn_out")
    added = group(attn, prefix, ("to_add_out",), block, "added_attn_out")
    return added + out if added_first else out + added


def attention_groups(prefix: str, attn: nn.Module, block: str,
                     added_first: bool = False) -> list[LayerGroup]:
    """All projection groups of one attention: inputs, then outputs."""
    return (attention_input_groups(prefix, attn, block)
            + attention_output_groups(prefix, attn, block, added_first))


def _optional(attn: nn.Module, prefix: str, path: str) -> str | None:
    names = present(attn, prefix, (path,))
    return names[0] if names else None


def attention_info(prefix: str, attn: nn.Module) -> AttentionInfo:
    """Describe a diffusers attention module (``Attention``, ``FluxAttention``, ...)."""
    _check_unfused(prefix, attn)
    heads = int(attn.heads)
    inner = attn.to_q.out_features
    if heads <= 0 or inner % heads:
        raise ValueError(f"attention {prefix!r}: to_q width {inner} is not a multiple of "
                         f"heads={heads}")
    return AttentionInfo(
        name=prefix, heads=heads, head_dim=inner // heads,
        to_q=join(prefix, "to_q"), to_k=join(prefix, "to_k"), to_v=join(prefix, "to_v"),
        to_out=_optional(attn, prefix, "to_out.0"),
        added_q=_optional(attn, prefix, "add_q_proj"), added_k=_optional(attn, prefix, "add_k_proj"),
        added_v=_optional(attn, prefix, "add_v_proj"), added_out=_optional(attn, prefix, "to_add_out"),
        is_cross_attention=is_cross_attention(attn),
    )


# ---- feed-forward --------------------------------------------------------------------------
def ffn_groups(prefix: str, ff: nn.Module, block: str) -> list[LayerGroup]:
    """The two groups of a diffusers ``FeedForward``: ``net.0.proj`` then ``net.2``."""
    return (group(ff, prefix, ("net.0.proj",), block, "ffn_in")
            + group(ff, prefix, ("net.2",), block, "ffn_out"))


def ffn_info(prefix: str, ff: nn.Module) -> FFNInfo:
    """Describe a diffusers ``FeedForward`` (GEGLU/SwiGLU: the gate doubles ``net.0.proj``)."""
    activation, proj_out = ff.net[0], ff.net[2]
    hidden = proj_out.in_features
    gated = (type(activation).__name__ in GATED_ACTIVATIONS
             or activation.proj.out_features == 2 * hidden)
    return FFNInfo(name=prefix, proj_in=(join(prefix, "net.0.proj"),),
                   proj_out=join(prefix, "net.2"), hidden=hidden, gated=gated)


# ---- diffusers BasicTransformerBlock (UNet Transformer2DModel, PixArt, DiT) -----------------
def basic_block_groups(prefix: str, block: nn.Module, owner: str) -> list[LayerGroup]:
    """Groups of a ``BasicTransformerBlock`` in execution order; ``owner`` is the enclosing block."""
    groups = group(block, prefix, ("norm1.linear",), owner, "adaln")
    groups += attention_groups(join(prefix, "attn1"), block.attn1, owner)
    fuser = getattr(block, "fuser", None)  # GLIGEN's gated self-attention over the grounding tokens, after attn1
    if fuser is not None:
        groups += group(block, prefix, ("fuser.linear",), owner, "grounding_in")
        groups += attention_groups(join(prefix, "fuser.attn"), fuser.attn, owner)
        groups += ffn_groups(join(prefix, "fuser.ff"), fuser.ff, owner)
    if getattr(block, "attn2", None) is not None:
        groups += group(block, prefix, ("norm2.linear",), owner, "adaln")
        groups += attention_groups(join(prefix, "attn2"), block.attn2, owner)
    groups += group(block, prefix, ("norm3.linear",), owner, "adaln")
    return groups + ffn_groups(join(prefix, "ff"), block.ff, owner)


def basic_block_attention(prefix: str, block: nn.Module) -> list[AttentionInfo]:
    """AttentionInfo for ``attn1`` and, when present, ``attn2`` of a ``BasicTransformerBlock``."""
    return [attention_info(join(prefix, attr), getattr(block, attr))
            for attr in ("attn1", "attn2") if getattr(block, attr, None) is not None]


def basic_block_time_embedding(prefix: str, block: nn.Module) -> list[str]:
    """Linear layers of timestep/label embedders that live inside a block's norms (DiT)."""
    names: list[str] = []
    for norm_attr in ("norm1", "norm2", "norm3"):
        embedding = child(block, f"{norm_attr}.emb")
        if embedding is not None:
            names += eligible_layer_names(embedding, join(prefix, f"{norm_attr}.emb"))
    return names
