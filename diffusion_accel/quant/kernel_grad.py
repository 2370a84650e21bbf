"""Gradients through lowered layers.

The low-precision kernels (``torch._int_mm``, oneDNN's int8 convolution, ``_scaled_mm``, tinygemm) have no
autograd formula: a backward pass through a lowered denoiser used to stop at them (no gradient for the
input, so a LoRA trained on top of a quantized denoiser got none below the first int8 layer). A lowered
layer whose input or parameters need gradients runs its kernel forward, so its outputs do not depend on
the grad mode, and takes the backward of the simulated float path it was lowered from: the
straight-through gradient the simulated (``lower=False``) model gives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Path = Callable[[torch.Tensor], torch.Tensor]


class _KernelWithFloatGrad(torch.autograd.Function):
    """Forward: ``kernel(x)``; backward: the gradient of ``float_path`` at ``x`` (input and parameters)."""

    @staticmethod
    def forward(ctx, kernel: Path, float_path: Path, params: tuple, x: torch.Tensor,  # type: ignore[override]
                *param_tensors: torch.Tensor) -> torch.Tensor:
        ctx.float_path, ctx.params = float_path, params
        ctx.save_for_backward(x)
        return kernel(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = ctx.float_path(x_in)
            grads = torch.autograd.grad(out, (x_in, *ctx.params), grad_out, allow_unused=True)
        return (None, None, None, *grads)


def run_kernel(module: nn.Module, x: torch.Tensor, kernel: Path, float_path: Path) -> torch.Tensor:
    """``kernel(x)``, recorded for autograd with ``float_path``'s gradient when grads are wanted through
    ``module`` (grad mode on and ``x`` or one of ``module``'s parameters requiring grad)."""
    if not torch.is_grad_enabled():
        return kernel(x)
    params = tuple(p for p in module.parameters() if p.requires_grad)
    if not (x.requires_grad or params):
        return kernel(x)
    if torch.compiler.is_compiling():
        return float_path(x)
    return _KernelWithFloatGrad.apply(kernel, _in_this_group(module, float_path), params, x, *params)


def _in_this_group(module: nn.Module, float_path: Path) -> Path:
    """``float_path`` computed with the timestep group of this forward call pinned: backward recomputes it
    later, when another denoiser call may have moved the step tracker (a loss over several sampling steps took
    the gradient of another group's scales; the simulated layer keeps its forward's). A layer's activation
    quantizer holds the denoiser's one ``StepGroups`` selector, if any."""
    selector = next((sub.selector for sub in module.modules() if getattr(sub, "selector", None) is not None), None)
    if selector is None:
        return float_path
    group = selector.current_index()

    def pinned(x: torch.Tensor) -> torch.Tensor:
        previous, selector.forced = selector.forced, group
        try:
            return float_path(x)
        finally:
            selector.forced = previous

    return pinned
