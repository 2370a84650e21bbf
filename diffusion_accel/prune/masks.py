"""Score-based masks without weight updates: magnitude |W| and Wanda |W| * ||X_j||.

Masks are bool tensors shaped like the 2-D weight (rows, d), True where a weight is removed.
Unstructured counts are exact: round(numel * sparsity) for magnitude (one threshold per layer),
round(d * sparsity) per output row for Wanda (its per-row comparison group). N:M keeps the N
highest scores of every M consecutive inputs in each row.
"""

from __future__ import annotations

import torch


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of exactly ``count`` lowest entries of ``scores`` (any shape)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.view(-1)[torch.topk(scores.flatten(), count, largest=False).indices] = True
    return mask


def row_lowest_mask(scores: torch.Tensor, count_per_row: int) -> torch.Tensor:
    """Mask (rows, d) of the ``count_per_row`` lowest scores of every row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count_per_row > 0:
        mask.scatter_(1, torch.topk(scores, count_per_row, dim=1, largest=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Mask (rows, d) removing the ``group - keep`` lowest of every ``group`` consecutive inputs."""
    rows, cols = scores.shape
    if cols % group:
        raise ValueError(f"N:M pattern needs the input width {cols} to be a multiple of M={group}")
    grouped = scores.reshape(rows, cols // group, group)
    lowest = torch.topk(grouped, group - keep, dim=2, largest=False).indices
    return torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, lowest, True).reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Mask of the smallest |W| (rows, d): one layer-wide threshold, or per M-group for N:M."""
    scores = weight.detach().abs().float()
    if nm is not None:
        return nm_mask(scores, *nm)
    return lowest_mask(scores, round(scores.numel() * sparsity))


def wanda_mask(weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda mask (rows, d): scores |W_ij| * ||X_j||_2 compared within each output row."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"input norms have shape {tuple(input_sq_norms.shape)}; the weight needs "
                         f"({weight.shape[1]},)")
    scores = weight.detach().abs().float() * input_sq_norms.to(weight.device).float().sqrt().unsqueeze(0)
    if nm is not None:
        return nm_mask(scores, *nm)
    # every row keeps one weight: rounding 0.98 of a 7-wide row removed all 7, and whole layers went to zero
    return row_lowest_mask(scores, min(round(weight.shape[1] * sparsity), weight.shape[1] - 1))
