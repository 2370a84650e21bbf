"""Timestep-aware post-training quantization (Q-Diffusion style) with real int8 lowering.

>>> da.quantize_(pipe, da.PTQConfig(weights="int8", activations="int8"), calib=calib)
>>> da.quant.lower_(pipe)          # int8 GEMMs via torch._int_mm, packed int4 weights
>>> print(da.quant.summary(pipe))
"""

from . import serialize as _serialize  # noqa: F401  (registers the "ptq" save/load handler)
from .apply import quantize_, register_quant_method, summary
from .configs import PRESETS, PTQConfig
from .lower import lower_

__all__ = ["PRESETS", "PTQConfig", "lower_", "quantize_", "register_quant_method", "summary"]
