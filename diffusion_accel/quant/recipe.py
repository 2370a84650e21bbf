"""Recipe-driven PTQ for the CLI: a recipe dict (parsed TOML) -> calibrate, quantize, save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifact import save
from ..calib import calibrate
from ..prompts import load as load_prompts
from .apply import quantize_, summary
from .calibrate import default_calibration_inputs
from .configs import PTQConfig


def _calibration(pipe: Any, section: dict[str, Any]) -> Any:
    """``calibrate`` from a recipe's [calibration] table (prompts, num_prompts, steps, selection...)."""
    count = int(section.get("num_prompts", 4))
    inputs = default_calibration_inputs(pipe, count)
    if "prompts" in inputs and "prompts" in section:
        inputs = {"prompts": load_prompts(section["prompts"], limit=count)}
    return calibrate(pipe, num_inference_steps=int(section.get("steps", 25)),
                     steps=section.get("selection", "uniform:5"), guidance_scale=section.get("guidance"),
                     batch_size=int(section.get("batch_size", 1)), store_trajectory=True, progress=True,
                     **inputs)


def run_ptq_from_recipe(pipe: Any, recipe: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """Calibrate per ``recipe["calibration"]``, quantize per ``recipe["quant"]`` (PTQConfig fields,
    optionally ``preset = "w8a8"``), save to ``out_dir`` if given; returns the PTQ summary."""
    quant = dict(recipe.get("quant", {}))
    preset = quant.pop("preset", None)
    config = PTQConfig.preset(preset, **quant) if preset else PTQConfig.from_dict(quant)
    calib = _calibration(pipe, dict(recipe.get("calibration", {})))
    quantize_(pipe, config, calib=calib)
    if out_dir is not None:
        save(pipe, out_dir)
    return summary(pipe)
