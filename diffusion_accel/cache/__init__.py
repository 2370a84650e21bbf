"""Feature caching across denoising steps: DeepCache and Faster Diffusion encoder propagation
(UNets), block / Δ-DiT / First-Block / TeaCache caching (transformers), calibrated schedules and learned
block routers (transformers).

>>> enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
>>> pipe("a red bicycle"); print(summary(pipe, as_text=True))
>>> remove_cache(pipe)
"""

from . import persist  # noqa: F401  (registers the "cache" save/load technique)
from .apply import (cache_config, calibrated_steps, default_cache_config, enable_cache, register_cache_method,
                    remove_cache, summary)
from .calibrated import calibrate_schedule
from .configs import (FASTER_DIFFUSION_KEY_STEPS, BlockCacheConfig, CalibratedCacheConfig, DeepCacheConfig,
                      DeltaCacheConfig, EncoderPropagationConfig, FirstBlockCacheConfig, RouterCacheConfig,
                      TeaCacheConfig)
from .router_learn import learn_router
from .schedules import nonuniform_full_steps, resample_full_steps, uniform_full_steps
from .teacache_fit import fit_teacache_coefficients

__all__ = [
    "FASTER_DIFFUSION_KEY_STEPS", "BlockCacheConfig", "CalibratedCacheConfig", "DeepCacheConfig",
    "DeltaCacheConfig", "EncoderPropagationConfig", "FirstBlockCacheConfig", "RouterCacheConfig", "TeaCacheConfig",
    "cache_config", "calibrate_schedule", "calibrated_steps", "default_cache_config", "enable_cache",
    "fit_teacache_coefficients", "learn_router",
    "nonuniform_full_steps", "register_cache_method", "remove_cache", "resample_full_steps", "summary",
    "uniform_full_steps",
]
