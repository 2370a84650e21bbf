"""Block reconstruction (BRECQ with AdaRound, LSQ-style activation steps), block by block.

For each adapter block holding quantized layers, in execution order: every quantized layer gets a
learnable rectified-sigmoid rounding of its float weight (AdaRound: ``h(V)`` in [0, 1] added to
``floor(W / s)``), optionally its static activation scales become learnable (LSQ, straight-through
rounding), and both minimise ``|block_q(x) - block_fp(x)|^p`` over stored block calls plus the
rounding regulariser ``lambda * sum(1 - |2h - 1|^beta)`` (beta annealed after a warm-up). The
rounding is then frozen into the integer codes. Inputs are the full-precision model's block inputs
(from ``SampleStore``), so quantization error of earlier blocks is not propagated.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..arch.registry import find_denoiser
from ..calib import SampleStore
from ..calib.trees import tensors_in
from ..progress import progress_bar
from ..stacklevel import user_stacklevel
from .calibrate import reconstruction_units
from .configs import PTQConfig
from .formats import get_format
from .attention import QuantAttentionBase
from .layers import ActQuantizer, QuantLayer, StepGroups
from .quantizers import expand_segments
from .state import get_state

GAMMA, ZETA = -0.1, 1.1
BatchFn = Callable[[torch.Tensor], tuple[tuple, dict, Any]]  # (args, kwargs, the target output: a tensor or a tuple of streams)


class AdaRound(nn.Module):
    """Learnable rounding of a float weight (out, columns) on a fixed per-segment scale grid. Weights that are
    exactly zero (pruned) stay zero: rounding them up would undo the pruning (a 2:4 pattern)."""

    def __init__(self, w2d: torch.Tensor, scale: torch.Tensor, sizes: Sequence[int], fmt: str) -> None:
        super().__init__()
        full = expand_segments(scale.float(), sizes)
        scaled = w2d.float() / full
        self.register_buffer("floor", torch.floor(scaled))
        self.register_buffer("full_scale", full)
        self.register_buffer("pruned", w2d == 0)
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        number = get_format(fmt)
        self.qmin, self.qmax = number.qmin, number.qmax

    def soft(self) -> torch.Tensor:
        """h(V) in [0, 1]: the rectified sigmoid."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1).masked_fill(self.pruned, 0.0)

    def forward(self) -> torch.Tensor:
        return torch.clamp(self.floor + self.soft(), self.qmin, self.qmax) * self.full_scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    def hard_codes(self) -> torch.Tensor:
        """Final int8 codes: round up where V >= 0."""
        rounded_up = (self.alpha >= 0) & ~self.pruned
        return torch.clamp(self.floor + rounded_up.float(), self.qmin, self.qmax).to(torch.int8)


def _beta(iteration: int, total: int, config: PTQConfig) -> float | None:
    """Annealed beta, or None during warm-up (no regulariser)."""
    warm = int(config.recon_warmup * total)
    if iteration < warm:
        return None
    start, end = config.recon_beta
    return end + (start - end) * (1 - (iteration - warm) / max(total - warm, 1))


def _attach(layers: dict[str, QuantLayer], originals: dict[str, nn.Module], learn_act: bool) -> tuple[list, list]:
    rounding_params, act_params = [], []
    for name, layer in layers.items():
        w = originals[name].weight.detach()
        layer.rounding = AdaRound(w.reshape(w.shape[0], -1), layer.weight_scale, layer.segment_sizes,
                                  layer.weight_fmt).to(w.device)
        rounding_params.append(layer.rounding.alpha)
        if learn_act and isinstance(layer.act, ActQuantizer):
            layer.act.scale.requires_grad_(True)
            act_params.append(layer.act.scale)
    return rounding_params, act_params


def _freeze(layers: dict[str, QuantLayer]) -> None:
    for layer in layers.values():
        if layer.rounding is not None:
            layer.weight_codes.copy_(layer.rounding.hard_codes())
            layer.rounding = None
        if isinstance(layer.act, ActQuantizer):
            layer.act.scale.requires_grad_(False)
            layer.act.scale.data.clamp_(min=1e-12)


def reconstruction_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """``|pred - target|^p`` averaged over every element of every output stream of a block. Every stream counts:
    Flux's and SD3's blocks return the text and the image stream, and until session 33 only the first (text)
    one was reconstructed, so the image-stream layers kept nearest rounding. The mean over elements weighs the
    rounding regulariser C times more than BRECQ's / Q-Diffusion's loss (summed over C channels); their
    normalisation measured worse at our 300 iterations per block (fashion-sd W4A8 AdaRound: 28.92 vs 29.51 dB,
    paired over 40 images; session 33), so ``recon_reg`` is relative to this mean."""
    errors = [(pred - target).abs().pow(p).flatten() for pred, target in zip(preds, targets, strict=True)]
    return torch.cat(errors).mean()


def reconstruct_block(block: nn.Module, layers: dict[str, QuantLayer], originals: dict[str, nn.Module],
                      batches: BatchFn, num_samples: int, config: PTQConfig, seed: int = 0,
                      sample_groups: Sequence[int] | torch.Tensor | None = None,
                      selector: StepGroups | None = None,
                      sample_layouts: Sequence[int] | torch.Tensor | None = None) -> None:
    """Optimise the rounding (and activation scales) of ``layers`` inside ``block``; freeze codes.

    ``sample_groups`` (with ``selector``, timestep groups): each sample's group. A batch then holds samples of
    one group, quantized with that group's activation scales (``selector.forced``): the block runs outside any
    denoiser call, where every sample took group 0's scales and only those were learned."""
    saved = {p: p.requires_grad for p in block.parameters()}
    try:  # from the first change: a Ctrl-C in _attach left the block's norms and biases frozen (until session 49)
        for p in saved:
            p.requires_grad_(False)
        rounding_params, act_params = _attach(layers, originals, config.recon_act_iters > 0)
        opt_w = torch.optim.Adam(rounding_params, lr=config.recon_lr)
        opt_a = torch.optim.Adam(act_params, lr=config.recon_act_lr) if act_params else None
        generator = torch.Generator().manual_seed(seed)
        total = max(config.recon_iters, config.recon_act_iters if act_params else 0)  # no scales: nothing to learn
        with torch.enable_grad():
            for it in range(total):
                idx = _batch_indices(num_samples, config.recon_batch, generator, sample_groups, selector,
                                     sample_layouts)
                args, kwargs, target = batches(idx)
                loss = reconstruction_loss(tensors_in(block(*args, **kwargs)), tensors_in(target), config.recon_p)
                beta = _beta(it, config.recon_iters, config)
                if beta is not None and it < config.recon_iters:
                    loss = loss + config.recon_reg * sum(layer.rounding.regularizer(beta) for layer in layers.values())
                opt_w.zero_grad()
                if opt_a is not None:
                    opt_a.zero_grad()
                loss.backward()
                if it < config.recon_iters:
                    opt_w.step()
                if opt_a is not None and it < config.recon_act_iters:
                    opt_a.step()
    finally:
        if selector is not None:
            selector.forced = None
        for p, flag in saved.items():  # first: an interrupted _freeze left the base's parameters frozen
            p.requires_grad_(flag)
        _freeze(layers)


def _batch_indices(num_samples: int, batch: int, generator: torch.Generator,
                   sample_groups: Sequence[int] | torch.Tensor | None,
                   selector: StepGroups | None, sample_layouts: Sequence[int] | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """A random batch of sample indices; with groups, of the group of a random sample (groups weighted by their
    sample counts), and ``selector`` forced to that group; with layouts (``SampleStore.layout_classes``), of the
    random sample's layout too, since only those merge into one call."""
    order = torch.randperm(num_samples, generator=generator)
    keep = torch.ones(num_samples, dtype=torch.bool)
    if sample_layouts is not None:
        layouts = torch.as_tensor(sample_layouts)
        keep &= layouts[order] == layouts[order[0]]
    if sample_groups is not None and selector is not None:
        groups = torch.as_tensor(sample_groups)
        selector.forced = int(groups[order[0]])
        keep &= groups[order] == groups[order[0]]
    return order[keep][:batch]


def store_batches(samples: SampleStore, name: str, device: torch.device,
                  target_block: nn.Module | None = None) -> tuple[BatchFn, int]:
    """A batch function over the stored calls of block ``name`` and the number of samples; the targets are the
    stored outputs, or ``target_block``'s (the float block's) outputs on the stored inputs, computed once."""
    count = len(samples.samples(name))
    targets = None if target_block is None else _block_outputs(samples, name, device, target_block)

    def batches(indices: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
        call = samples.batch(name, indices.tolist())
        args, kwargs = _moved(call.args, device), {k: _moved(v, device) for k, v in call.kwargs.items()}
        if targets is not None:
            return args, kwargs, tuple(stream[indices.to(stream.device)] for stream in targets)
        if target_block is not None:  # an output stream without a batch dimension: computed per batch
            with torch.no_grad():
                return args, kwargs, tuple(tensors_in(target_block(*args, **kwargs)))
        return args, kwargs, tuple(output.to(device) for output in tensors_in(call.output))

    return batches, count


def _moved(value: Any, device: torch.device) -> Any:
    """A tensor (or a tuple of arguments) on ``device``; anything else as it is."""
    if isinstance(value, tuple):
        return tuple(_moved(item, device) for item in value)
    return value.to(device) if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def _block_outputs(samples: SampleStore, name: str, device: torch.device, block: nn.Module,
                   chunk: int = 16) -> tuple[torch.Tensor, ...] | None:
    """``block``'s output streams on every stored call of ``name``, the samples along dim 0: once per block, not at
    every reconstruction iteration; None when a stream has no batch dimension."""
    layouts = samples.layout_classes(name)  # chunks of one layout: only those merge into one call
    order, parts = [], []
    for layout in sorted(set(layouts)):
        members = [index for index, value in enumerate(layouts) if value == layout]
        for start in range(0, len(members), chunk):
            rows = members[start:start + chunk]
            call = samples.batch(name, rows)
            args, kwargs = _moved(call.args, device), {k: _moved(v, device) for k, v in call.kwargs.items()}
            streams = tuple(tensors_in(block(*args, **kwargs)))
            if any(stream.dim() == 0 or stream.shape[0] != len(rows) for stream in streams):
                return None
            order.extend(rows)
            parts.append(streams)
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))  # back to sample order
    return tuple(torch.cat(stream)[position.to(stream[0].device)] for stream in zip(*parts))


def float_block(block: nn.Module, unit: str, layers: dict[str, QuantLayer],
                originals: dict[str, nn.Module]) -> nn.Module:
    """``block`` (the reconstruction unit ``unit``) with its quantized ``layers`` and attention processors back in
    float: a copy holding the original layers and processors (shared, not copied), or the original layer itself for
    a unit that is one layer. The copy never reaches a quantized layer: their timestep-group selector holds the
    whole denoiser, whose copy failed half-built ('no attribute _modules', session 50 review)."""
    if unit in layers:
        return originals[unit]
    memo: dict[int, Any] = {id(layer): originals[name] for name, layer in layers.items()}
    for module in block.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, QuantAttentionBase):  # targets with attention quantization error otherwise
            memo[id(processor)] = processor.original
    return copy.deepcopy(block, memo)


def reconstruct_blocks(pipe: Any, config: PTQConfig, samples: SampleStore | None, originals: dict[str, nn.Module],
                       selector: StepGroups | None = None, step_group: Callable[[int], int] | None = None,
                       float_targets: bool = False) -> None:
    """Reconstruct every adapter block that holds quantized layers, then each quantized layer outside them, alone
    (``reconstruction_units``), sequentially; with timestep groups
    (``selector``, ``step_group``: calibrated step index -> group), each batch in its samples' group.
    ``float_targets``: fit to the float block's outputs on the stored inputs, not the stored outputs, when the
    pipeline changed modules during its calls: PAG's perturbed rows ran identity self-attention, targets the block
    cannot produce outside a PAG call (a third of the samples missed by up to 0.7; until session 50)."""
    _, denoiser = find_denoiser(pipe)
    state = get_state(denoiser)
    if samples is None:
        raise ValueError("reconstruction needs stored block calls; none were collected")
    device, reconstructed = next(denoiser.parameters()).device, []
    for unit in progress_bar(reconstruction_units(pipe, state.layers), "reconstruct blocks"):
        layers = {n: denoiser.get_submodule(n) for n in state.layers if n == unit or n.startswith(unit + ".")}
        if not layers or unit not in samples.module_names or not samples.samples(unit):
            continue
        reconstructed.append(unit)
        target_block = float_block(denoiser.get_submodule(unit), unit, layers, originals) if float_targets else None
        batches, count = store_batches(samples, unit, device, target_block)
        groups = None if selector is None or step_group is None else \
            torch.tensor([step_group(sample.step.step_index) for sample in samples.samples(unit)])
        layouts = samples.layout_classes(unit)
        reconstruct_block(denoiser.get_submodule(unit), layers, originals, batches, count, config,
                          sample_groups=groups, selector=selector,
                          sample_layouts=torch.tensor(layouts) if len(set(layouts)) > 1 else None)
    state.notes.append(f"block reconstruction: {config.recon_iters} AdaRound iterations per block, "
                       f"{config.recon_act_iters} activation-step iterations, fp block inputs")
    _note_memory_capped(state, samples, config, reconstructed)


def _note_memory_capped(state: Any, samples: SampleStore, config: PTQConfig, blocks: list[str]) -> None:
    """Warn (and note) when ``recon_max_bytes`` left ``blocks`` fewer stored calls than ``recon_samples`` and their
    calls offered: their rounding is fitted to those few (full-size SD 1.5 at 512 px: 1-2 per block until the
    budget was shared by count, session 46)."""
    held = {name: len(samples.samples(name)) for name in blocks}
    short = {name: count for name, count in held.items()
             if count < min(config.recon_samples, samples.rows_seen[name])}
    if not short:
        return
    fewest = min(short.values())
    message = (f"block reconstruction: recon_max_bytes={config.recon_max_bytes} held {fewest} to "
               f"{max(short.values())} samples in {len(short)} blocks (recon_samples={config.recon_samples}), "
               f"e.g. {min(short, key=short.get)!r} {fewest}; raise recon_max_bytes for more")
    warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())
    state.notes.append(message)
