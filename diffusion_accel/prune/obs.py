"""The OBS solver (SparseGPT's algorithm, as used by OBS-Diff) for one weight matrix.

``obs_prune(W, H, sparsity)`` removes weights column by column in the order of the upper Cholesky
factor of H^-1 and folds each removed weight's error into the columns not yet visited, so the
layer output on the calibration inputs changes as little as possible. Everything runs in fp32
with TF32 off. A Conv2d weight (out, in, kh, kw) is passed as ``W.reshape(out, -1)``, matching the
unfolded Hessian of ``calib.HessianCollector``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

MAX_DAMP_RETRIES = 4


@contextmanager
def no_tf32() -> Iterator[None]:
    """Disable TF32 matmuls and convolutions (CUDA) inside the block; restores the previous settings."""
    switches = _tf32_switches()
    saved = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, off in switches:
        setattr(owner, name, off)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(switches, saved):
            setattr(owner, name, value)


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(owner, attribute, value turning TF32 off) for cuBLAS matmuls and cuDNN convolutions, in the API the user set
    them with: torch >= 2.9 raises on reading the legacy ``allow_tf32`` flags once its ``fp32_precision`` ones were
    set (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` made every OBS prune fail), and reading the new
    ones after legacy writes would break the user's legacy reads in turn."""
    backends = torch.backends
    switches = []
    for legacy_owner, new_owner in ((backends.cuda.matmul, backends.cuda.matmul), (backends.cudnn, backends.cudnn.conv)):
        try:
            getattr(legacy_owner, "allow_tf32")
            switches.append((legacy_owner, "allow_tf32", False))
        except RuntimeError:
            switches.append((new_owner, "fp32_precision", "ieee"))
    return switches


def damped_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp * mean(diag H) * I with dead inputs' diagonal set to 1, dead mask (d,)); fp32 copy."""
    hess = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(hess) == 0
    hess[dead, dead] = 1.0
    diagonal = torch.arange(hess.shape[0], device=hess.device)
    hess[diagonal, diagonal] += damp * torch.mean(torch.diag(hess))
    return hess, dead


def inverse_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H^-1 of the damped Hessian (d, d), dead mask); raises the damping if H is not PD."""
    for attempt in range(MAX_DAMP_RETRIES):
        hess, dead = damped_hessian(hessian, damp * 10 ** attempt)
        factor, info = torch.linalg.cholesky_ex(hess)
        if int(info) == 0:
            return torch.cholesky_inverse(factor), dead
    raise ValueError(f"Hessian of shape {tuple(hessian.shape)} is not positive definite even with "
                     f"damp={damp * 10 ** (MAX_DAMP_RETRIES - 1):g}; check the calibration inputs")


def upper_inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Upper Cholesky factor U of H^-1 = U^T U (d, d), dead mask (d,))."""
    inverse, dead = inverse_hessian(hessian, damp)
    return torch.linalg.cholesky(inverse, upper=True), dead


def _block_counts(rows: int, cols: int, sparsity: float, blocksize: int) -> list[int]:
    """Weights to remove per column block so the layer total is exactly round(rows*cols*sparsity)."""
    starts = list(range(0, cols, blocksize)) + [cols]
    cumulative = [round(rows * start * sparsity) for start in starts]
    return [b - a for a, b in zip(cumulative[:-1], cumulative[1:])]


def _nm_prune(scores: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Mask (rows, group) of the ``group - keep`` lowest scores of each row."""
    lowest = torch.topk(scores, group - keep, dim=1, largest=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)


ColumnRule = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def obs_column_pass(work: torch.Tensor, factor: torch.Tensor, blocksize: int, rule: ColumnRule) -> None:
    """The OBS / GPTQ sweep over the columns of ``work`` (rows, d), in place.

    Column i of each ``blocksize`` block becomes ``rule(block_w, block_u, start, i)`` (the block's
    current weights (rows, b), its factor block, the block's first column, i); the change, divided
    by U_ii, is folded into the later columns along row i of the upper factor U of H^-1 (lazily
    across blocks), so the layer output on the calibration inputs moves as little as possible.
    """
    cols = work.shape[1]
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        block_w = work[:, start:stop].clone()
        block_u = factor[start:stop, start:stop]
        errors = torch.zeros_like(block_w)
        for i in range(stop - start):
            column = block_w[:, i].clone()
            kept = rule(block_w, block_u, start, i)
            err = (column - kept) / block_u[i, i]
            block_w[:, i:] -= err.unsqueeze(1) * block_u[i, i:].unsqueeze(0)
            block_w[:, i] = kept
            errors[:, i] = err
        work[:, start:stop] = block_w
        work[:, stop:] -= errors @ factor[start:stop, stop:]


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
              nm: tuple[int, int] | None = None, blocksize: int = 128,
              damp: float = 0.01,
              inverse_factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (rows, d) with Hessian (d, d): (new weight fp32, pruned mask bool), both (rows, d).

    Unstructured: exactly round(rows * d * sparsity) weights, chosen by w^2 / [U]_ii^2 within each
    ``blocksize``-column block. ``nm=(N, M)``: keeps N of every M consecutive inputs per row
    (d % M == 0 required). Weights of dead inputs (zero Hessian diagonal: no signal in calibration)
    are kept unless the budget picks them: zeroing them all (SparseGPT's rule, ours until session 27)
    pruned beyond the target, even at sparsity 0, when calibration at a small size left a 3x3 conv's
    off-centre taps on a 1x1 feature map seeing only padding.
    ``inverse_factor``: ``upper_inverse_factor(hessian, damp)`` when already computed (layers that
    share an input, or one layer pruned at several sparsities, need it once).
    Weights already zero (an earlier prune's) stay zero and count toward each block's / group's budget: chosen
    after the earlier columns' compensation, 17% of an unstructured 50% prune's zeros came back under a 2:4 one
    (until session 53; the GPTQ sweep keeps them likewise).
    """
    with no_tf32():
        work = weight.detach().to(torch.float32).clone()
        if inverse_factor is None:
            inverse_factor = upper_inverse_factor(hessian.to(work.device), damp)
        factor, _ = (t.to(work.device) for t in inverse_factor)
        rows, cols = work.shape
        already_zero = work == 0
        mask = already_zero.clone()
        counts = _block_counts(rows, cols, sparsity, blocksize)

        def prune_column(block_w: torch.Tensor, block_u: torch.Tensor, start: int, i: int) -> torch.Tensor:
            width = block_w.shape[1]
            if nm is None and i == 0 and counts[start // blocksize] > 0:
                scores = block_w.pow(2) / torch.diag(block_u).pow(2).unsqueeze(0)
                zeros = already_zero[:, start:start + width]
                scores = scores.masked_fill(zeros, float("-inf"))  # picked first: they fill the budget
                lowest = torch.topk(scores.flatten(), counts[start // blocksize], largest=False).indices
                block_mask = zeros.clone()
                block_mask.view(-1)[lowest] = True
                mask[:, start:start + width] = block_mask
            if nm is not None and i % nm[1] == 0:
                scores = block_w[:, i:i + nm[1]].pow(2) / torch.diag(block_u)[i:i + nm[1]].pow(2)
                zeros = already_zero[:, start + i:start + i + nm[1]]
                mask[:, start + i:start + i + nm[1]] = _nm_prune(scores.masked_fill(zeros, float("-inf")), *nm) | zeros
            column = block_w[:, i]
            return torch.where(mask[:, start + i], torch.zeros_like(column), column)

        obs_column_pass(work, factor, blocksize, prune_column)
    return work, mask
