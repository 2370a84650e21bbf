"""One-shot pruning of diffusion denoisers: OBS with timestep-weighted Hessians (OBS-Diff),
Wanda and magnitude baselines; unstructured, N:M (2:4, 4:8) and structured (heads, FFN neurons).

>>> prune_(pipe, PruneConfig(method="obs", sparsity=0.5, pattern="unstructured"), calib=calib)
>>> print(prune_report(pipe).summary())
"""

from . import serialize  # noqa: F401  (registers the "prune" save/load technique)
from .apply import TECHNIQUE, prune_, prune_denoiser_, prune_report
from .configs import METHODS, PATTERNS, PruneConfig
from .masks import magnitude_mask, nm_mask, wanda_mask
from .obs import obs_prune
from .report import PruneReport

__all__ = ["METHODS", "PATTERNS", "TECHNIQUE", "PruneConfig", "PruneReport", "magnitude_mask", "nm_mask",
           "obs_prune", "prune_", "prune_denoiser_", "prune_report", "wanda_mask"]
