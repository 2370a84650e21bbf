"""Call settings a pipeline is meant to run with, carried on the pipeline object.

A zoo pipeline needs arguments diffusers' defaults do not give: fashion-flux was trained with a
32-token T5 (FluxPipeline pads to 512 tokens it never saw) and true CFG; fashion-sd's guidance scale
is 3.0, not 7.5. ``zoo.load`` tags its pipelines with them, and wherever diffusion_accel itself calls
a pipeline (``calibrate``, ``evaluate`` and so the CLI's demo, eval, grid and bench) they apply
beneath the caller's explicit arguments. Calling the pipeline yourself, pass them:
``pipe(prompt, **call_defaults(pipe))``.
"""

from __future__ import annotations

from typing import Any

_ATTR = "_diffusion_accel_call_defaults"


def set_call_defaults(pipe: Any, defaults: dict[str, Any]) -> None:
    """Tag ``pipe`` with the keyword arguments it should be called with (a deep copy keeps them)."""
    setattr(pipe, _ATTR, dict(defaults))


def call_defaults(pipe: Any) -> dict[str, Any]:
    """The keyword arguments ``pipe`` was tagged with (``{}`` for an untagged pipeline)."""
    return dict(getattr(pipe, _ATTR, None) or {})


def per_prompt_negative(negative_prompt: Any, num_prompts: int) -> Any:
    """A negative prompt given as one string, as one copy per prompt (for a list of ``num_prompts``
    prompts): StableDiffusionPipeline refuses a string beside a list of prompts; the other pipelines
    broadcast it themselves, so this changes nothing else."""
    return [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else negative_prompt
