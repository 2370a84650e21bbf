"""``PruneReport``: what one ``prune_`` call did, readable by users and tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

REPORT_ATTR = "_diffusion_accel_prune_report"


@dataclass
class PruneReport:
    """Method, pattern, sparsity reached, parameter counts, skips, sweeps, memory, step weights.

    ``achieved_sparsity``: zero fraction of the pruned layers' weights (unstructured, N:M), or the
    fraction of the denoiser's parameters removed (structured). ``peak_hessian_bytes``: the most
    accumulator memory alive at once (one group's Hessians). ``step_weights``: per-step Hessian
    weights of the calibration sweeps (empty for magnitude). ``layer_sparsity``: the per-layer targets
    of scope="global" (empty for scope="layer"), split by ``allocation`` ("error" or "saliency").
    ``unobserved_inputs``: layers with input columns that were zero on every calibration input (a 3x3
    conv's off-centre taps on a 1x1 feature map of a calibration smaller than the generation size):
    their weights were judged without data.
    """

    method: str
    pattern: str
    target_sparsity: float
    layers_pruned: list[str] = field(default_factory=list)
    layers_skipped: dict[str, str] = field(default_factory=dict)
    achieved_sparsity: float = 0.0
    params_before: int = 0
    params_after: int = 0
    heads_removed: int = 0
    neurons_removed: int = 0
    channels_removed: int = 0
    groups: int = 0
    sweeps: int = 0
    peak_hessian_bytes: int = 0
    step_weights: list[float] = field(default_factory=list)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    allocation: str = ""
    sparse_kernels: str = ""
    seconds: float = 0.0
    unobserved_inputs: dict[str, int] = field(default_factory=dict)  # layer -> input columns no calibration reached

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [self._headline(),
                 f"  parameters: {self.params_before:,} -> {self.params_after:,}",
                 f"  groups {self.groups}, calibration sweeps {self.sweeps}, "
                 f"peak Hessian memory {self.peak_hessian_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s"]
        if self.layer_sparsity:
            shares = sorted(self.layer_sparsity.values())
            lines.append(f"  global scope ({self.allocation} allocation): per-layer sparsity {shares[0]:.3f} .. {shares[-1]:.3f} "
                         f"(median {shares[len(shares) // 2]:.3f})")
        if self.heads_removed or self.neurons_removed or self.channels_removed:
            lines.append(f"  removed {self.heads_removed} heads, {self.neurons_removed} FFN neurons, "
                         f"{self.channels_removed} ResNet channels")
        if self.layers_skipped:
            lines.append(f"  left dense: {len(self.layers_skipped)} layers "
                         f"(e.g. {next(iter(self.layers_skipped.items()))})")
        if self.sparse_kernels:
            lines.append(f"  {self.sparse_kernels}")
        if self.unobserved_inputs:
            lines.append(f"  warning: {self.unobserved_inputs_text()}")
        return "\n".join(lines)

    def unobserved_inputs_text(self) -> str:
        """One sentence on the layers whose inputs calibration left partly without signal."""
        name, count = next(iter(self.unobserved_inputs.items()))
        return (f"{len(self.unobserved_inputs)} layers had input columns no calibration input reached (e.g. {name}: "
                f"{count}); their weights were judged without data: calibrate at the generation size")

    def _headline(self) -> str:
        """Target vs result in the pattern's own terms: structured pruning removes a fraction of each
        unit's heads / FFN neurons / channels (always keeping one), so its result is the share of
        the whole denoiser's parameters removed, not a zero fraction."""
        if self.pattern == "structured":
            return (f"prune: {self.method} structured, removing {self.target_sparsity:.3f} of each unit's heads, "
                    f"FFN neurons and channels (one always kept): denoiser parameters "
                    f"-{self.achieved_sparsity:.1%}, {len(self.layers_pruned)} output layers pruned")
        return (f"prune: {self.method} {self.pattern}, target sparsity {self.target_sparsity:.3f}, "
                f"reached {self.achieved_sparsity:.3f} over {len(self.layers_pruned)} layers")


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters())


def zero_fraction(denoiser: nn.Module, names: list[str]) -> float:
    """Fraction of exactly-zero weights over the named layers (0 when none)."""
    zeros = total = 0
    for name in names:
        weight = denoiser.get_submodule(name).weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0
