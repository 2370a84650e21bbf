"""Removing input columns of one layer with OBS compensation (structured pruning's core).

Removing the column set S of W with input Hessian H changes the remaining columns by
``-W[:, S] (H^-1)_SS^-1 (H^-1)_S,:`` (group OBS), which is optimal for the calibration inputs. The
Hessian of the smaller layer is H with rows/columns S deleted, so further removals stay exact.
Without a Hessian (magnitude pruning) H = I: scores are sums of squares and nothing is updated.
"""

from __future__ import annotations

import torch

from .obs import inverse_hessian, no_tf32


class ColumnPruner:
    """One layer's 2-D weight (out, d) and Hessian (d, d) while its input columns are removed."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor | None, damp: float = 0.01) -> None:
        self.weight = weight.detach().to(torch.float32).clone()
        self.hessian = None if hessian is None else hessian.detach().to(torch.float32)
        self.damp = damp
        self.removed = 0  # columns removed so far

    def inverse(self) -> torch.Tensor:
        """H^-1 of the damped Hessian (identity without a Hessian), (d, d)."""
        if self.hessian is None:
            return torch.eye(self.weight.shape[1], device=self.weight.device)
        with no_tf32():
            return inverse_hessian(self.hessian, self.damp)[0]

    def column_scores(self, columns: torch.Tensor) -> torch.Tensor:
        """Single-column OBS error sum_rows W[:, c]^2 / [H^-1]_cc for each column c, shape (len,)."""
        diagonal = torch.diag(self.inverse())[columns]
        return self.weight[:, columns].pow(2).sum(0) / diagonal

    def block_scores(self, blocks: torch.Tensor) -> torch.Tensor:
        """Joint OBS error trace(W_B (H^-1)_BB^-1 W_B^T) per column block B; blocks (n, width) -> (n,)."""
        inverse = self.inverse()
        scores = []
        with no_tf32():
            for block in blocks:
                factor = torch.linalg.cholesky(inverse[block][:, block])
                whitened = torch.linalg.solve_triangular(factor, self.weight[:, block].T, upper=False)
                scores.append(whitened.pow(2).sum())
        return torch.stack(scores)

    def remove(self, columns: torch.Tensor) -> None:
        """Delete ``columns`` (long indices), compensating the others; the Hessian shrinks too."""
        if columns.numel() == 0:
            return
        self.removed += columns.numel()
        keep = torch.ones(self.weight.shape[1], dtype=torch.bool, device=self.weight.device)
        keep[columns] = False
        if self.hessian is not None:
            inverse = self.inverse()
            with no_tf32():
                update = torch.linalg.solve(inverse[columns][:, columns], inverse[columns])
                self.weight -= self.weight[:, columns] @ update
            self.hessian = self.hessian[keep][:, keep]
        self.weight = self.weight[:, keep]
