"""NumPy scalars in config fields and calibrate's arguments become Python scalars, as numpy-driven sweeps
pass them (``DeepCacheConfig(interval=np.int64(2))`` was refused as "must be an int >= 1, got np.int64(2)",
``PTQConfig(recon_lr=np.float32(1e-3))`` quantized and then could not be saved as JSON)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import torch


def plain_number(value: Any) -> Any:
    """A numpy scalar as its Python value (``np.int64(2)`` -> 2, ``np.float32(0.5)`` -> 0.5, ``np.bool_(True)``
    -> True); anything else as it is, for the caller's checks to name."""
    return value.item() if isinstance(value, np.generic) else value


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) that a float holds finitely: NaN, inf and ints beyond
    float range (``10**400``, where ``math.isfinite`` raised OverflowError instead of the caller's ValueError) are
    not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def plain_scalars(config: Any) -> None:
    """Replace every field of the (frozen) dataclass ``config`` by :func:`plain_number` of it, inside tuples, lists
    and dict values too (``calib_steps=(np.int64(0),)`` was refused as 'must be ints'), before validation."""
    for field in dataclasses.fields(config):
        object.__setattr__(config, field.name, _plain(getattr(config, field.name)))


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):  # not namedtuples: kept as they are
        return type(value)(_plain(item) for item in value)
    if type(value) is dict:  # calib_kwargs={"height": np.int64(32)} was refused, its pairs form taken (s48)
        return {key: _plain(item) for key, item in value.items()}
    return plain_number(value)


def plain_values(value: Any) -> Any:
    """``value`` with numpy arrays and torch tensors as lists and numpy scalars as Python ones, inside tuples and
    lists too (``calibrate(steps=np.arange(0, 4, 2))`` was refused as 'must be a string or a list of ints')."""
    if isinstance(value, (np.ndarray, torch.Tensor)):  # a tensor of step indices was refused (until session 49)
        return value.tolist()
    return _plain(value)


def json_form(value: Any) -> Any:
    """``value`` as the artifact's JSON manifest gives it back (tuples as lists): a config holding
    ``original_size=(64, 64)`` in ``calib_kwargs`` compared unequal to itself after a save / load (until session 50).
    Raises TypeError / ValueError for what JSON cannot hold (NaN, objects)."""
    return json.loads(json.dumps(value, allow_nan=False))
