"""NumPy scalars in config fields become Python scalars, as users of numpy-driven sweeps pass them
(``DeepCacheConfig(interval=np.int64(2))`` was refused as "must be an int >= 1, got np.int64(2)",
``PTQConfig(recon_lr=np.float32(1e-3))`` quantized and then could not be saved as JSON)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def plain_scalars(config: Any) -> None:
    """Replace every field of the (frozen) dataclass ``config`` holding a numpy scalar by its Python value
    (``np.int64(2)`` -> 2, ``np.float32(0.5)`` -> 0.5, ``np.bool_(True)`` -> True), before validation."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, np.generic):
            object.__setattr__(config, field.name, value.item())
