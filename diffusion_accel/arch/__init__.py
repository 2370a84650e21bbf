"""Model-family adapters: the only place that knows a denoiser's module names."""

from .base import (AttentionInfo, BlockInfo, BlockStreams, CachePoint, DenoiserAdapter, FFNInfo, LayerGroup,
                   SkipConcat)
from .registry import (UnsupportedModelError, find_denoiser, get_adapter, register_adapter,
                       supported_denoisers)

__all__ = [
    "AttentionInfo", "BlockInfo", "BlockStreams", "CachePoint", "DenoiserAdapter", "FFNInfo", "LayerGroup",
    "SkipConcat", "UnsupportedModelError", "find_denoiser", "get_adapter", "register_adapter",
    "supported_denoisers",
]
