"""Trajectory calibration: run a pipeline once, stream per-step module tensors into collectors.

>>> calib = calibrate(pipe, prompts, num_inference_steps=25, steps="uniform:5",
...                   weighting="log-decrease", collectors=[HessianCollector(["mid_block.attentions.0.proj_in"])])
>>> H = calib.collector(HessianCollector).hessian("mid_block.attentions.0.proj_in")
"""

from .collectors import WANTS, Collector, ModuleCall, Step
from .hessian import HessianCollector, conv2d_rows, linear_rows
from .inputs import CALL_MODES, call_mode, class_count, default_calibration_items
from .probes import ChangeRecord, FeatureChangeProbe
from .ranges import RANGE_METHODS, RangeObserver, fake_quantize, mse_range, percentile_range, quantization_mse
from .replay import CallCounts
from .reservoir import ValueReservoir
from .result import Calibration, CalibrationSettings, check_given_calibration
from .runner import DEFAULT_MAX_TRAJECTORY_BYTES, calibrate, calibrate_parameters
from .samples import Sample, SampleStore
from .schedule import (SELECTION_FORMS, WEIGHTING_SCHEMES, denoiser_steps, resolve_weights, select_steps,
                       step_weights)
from .trajectory import TrajectoryRecord

__all__ = [
    "CALL_MODES", "DEFAULT_MAX_TRAJECTORY_BYTES", "RANGE_METHODS", "SELECTION_FORMS", "WANTS",
    "WEIGHTING_SCHEMES", "CallCounts", "Calibration", "CalibrationSettings", "ChangeRecord", "Collector",
    "FeatureChangeProbe", "HessianCollector", "ModuleCall", "RangeObserver", "Sample", "SampleStore", "Step",
    "TrajectoryRecord", "ValueReservoir", "calibrate", "calibrate_parameters", "call_mode", "check_given_calibration",
    "class_count",
    "conv2d_rows", "default_calibration_items", "denoiser_steps", "fake_quantize",
    "linear_rows", "mse_range", "percentile_range", "quantization_mse", "resolve_weights", "select_steps",
    "step_weights",
]
