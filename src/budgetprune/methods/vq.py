"""Vector quantization of filters (Gong et al. 2014; seed 001's "VQ" baseline, section 5.1).

At each cut of the iterative scheme (:mod:`budgetprune.methods.iterative`) every layer's
width is scaled alike; a layer that must go from n to k channels has its kept filters
(weights and bias, as vectors) clustered into k groups by k-means (``scipy.cluster.vq``).
The centres become the new filters: each cluster keeps one channel (the member nearest its
centre) whose filter is set to the centre, and the layers reading the merged channels add
their input weights into that channel's (:func:`budgetprune.methods.folding.fold_into_readers`;
channels a residual sum also writes are not folded).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from .base import register_method
from .folding import FoldingPruning, filters, fold_into_readers, set_filters


def kmeans_exact(points: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ / Lloyd (scipy) with every one of the ``k`` clusters non-empty.

    An empty cluster takes the point farthest from its own centre (repeated until none is
    empty), so exactly ``k`` channels remain even when filters repeat."""
    centres, labels = kmeans2(points, k, minit="++", seed=seed)
    for _ in range(k):
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            break
        dist = ((points - centres[labels]) ** 2).sum(axis=1)
        dist[counts[labels] <= 1] = -1.0  # never empty another cluster
        far = int(np.argmax(dist))
        labels[far] = empty[0]
        centres[empty[0]] = points[far]
    for j in range(k):
        centres[j] = points[labels == j].mean(axis=0)
    return centres, labels


@register_method("vq")
class VectorQuantization(FoldingPruning):
    """Filters clustered to the target width; the centres become the filters (the final
    projection ranks channels by filter magnitude)."""

    def reduce_group(self, gid: str, kept: torch.Tensor, k: int) -> torch.Tensor:
        """Merge the ``kept`` channels of ``gid`` into ``k``; returns the channels that stay."""
        group = self.graph.groups[gid]
        module = self.modules_of[group.producer]
        points = filters(module)[kept].double().cpu().numpy()
        centres, labels = kmeans_exact(points, k)
        reps = []
        for j in range(k):
            members = np.flatnonzero(labels == j)
            d = ((points[members] - centres[j]) ** 2).sum(axis=1)
            reps.append(int(members[int(np.argmin(d))]))
        reps_t = torch.tensor(reps, dtype=torch.long)
        set_filters(module, kept[reps_t], torch.from_numpy(centres))
        mix = torch.zeros(group.channels, k, dtype=torch.float64)
        mix[kept, torch.from_numpy(labels).long()] = 1.0
        new = kept[reps_t]
        fold_into_readers(self.graph, self.modules_of, gid, new, mix)
        return new
