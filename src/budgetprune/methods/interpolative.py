"""Interpolative decomposition of filters (seed 001's "ID" baseline, section 5.1; refs [6, 16]).

At each cut of the iterative scheme every layer's width is scaled alike; a layer that must go
from n to k channels factorises its filter matrix W (n filters, weights and bias as rows) as
W ≈ P · W[J]: k of its own filters J (``scipy.linalg.interpolative``, deterministic) and a
(n × k) interpolation matrix P that is the identity on J. Layer l keeps the filters J, and P
is multiplied into the layers that read it (W_{l+1} ← W_{l+1} P,
:func:`budgetprune.methods.folding.fold_into_readers`): exact for a layer of rank ≤ k followed
by a linear map, an approximation across a non-linearity, as in the paper.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.interpolative as sli
import torch

from .base import register_method
from .folding import FoldingPruning, filters, fold_into_readers


def interpolative_decomposition(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``J`` (k of them) and P (n × k) with ``w ≈ P @ w[J]`` and P[J] = I."""
    n = w.shape[0]
    if k >= n:
        return np.arange(n), np.eye(n)
    k_id = min(k, w.shape[1])  # the rank is at most the fan-in: more rows than that carry themselves
    idx, proj = sli.interp_decomp(np.ascontiguousarray(w.T), k_id, rand=False)
    rows = idx[:k_id]
    p = sli.reconstruct_interp_matrix(idx, proj).T  # (n, k_id)
    if k_id < k:  # keep k rows as asked; the extra ones carry themselves
        extra = np.setdiff1d(np.arange(n), rows)[:k - k_id]
        rows = np.concatenate([rows, extra])
        p = np.concatenate([p, np.zeros((n, len(extra)))], axis=1)
        p[extra] = 0.0
        p[extra, k_id + np.arange(len(extra))] = 1.0
    return rows, p


@register_method("id")
class InterpolativeDecompositionPruning(FoldingPruning):
    """Filters reduced to k of their own by an interpolative decomposition; the rest folded forward."""

    def reduce_group(self, gid: str, kept: torch.Tensor, k: int) -> torch.Tensor:
        group = self.graph.groups[gid]
        w = filters(self.modules_of[group.producer])[kept].double().cpu().numpy()
        rows, p = interpolative_decomposition(w, k)
        new = kept[torch.from_numpy(np.asarray(rows)).long()]
        mix = torch.zeros(group.channels, k, dtype=torch.float64)
        mix[kept] = torch.from_numpy(p)
        fold_into_readers(self.graph, self.modules_of, gid, new, mix)
        return new
