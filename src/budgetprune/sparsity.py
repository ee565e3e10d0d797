"""Unstructured (per-weight) pruning: one mask entry per weight, a non-zero-weight budget,
and the exact projection onto it.

Penalised L0 (Louizos et al.), constrained L0 (seed 003), Continuous Sparsification
(seed 004) and the sensitivity rule (seed 002) were first stated for single weights. With
``granularity="weight"`` the units of those methods are the weights of every conv and
linear layer (biases and BatchNorm are left dense): a layer's gate has one entry per
weight and multiplies the weight through a ``torch.nn.utils.parametrize``
parametrization, which the user's module gets from the outside and loses again on
:meth:`WeightGates.remove`. The budget counts non-zero weights (``--metric nonzero``,
‖θ‖₀ ≤ B).

The projection is exact (:func:`project_weights`): above the budget, the lowest-scoring
kept weights go until ``floor(B)`` are left; under it, the highest-scoring closed weights
reopen at value 0 (the network computes the same; fine-tuning trains them). A layer never
loses its last weight (the fatal-pruning guard of seed 001, section 4.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .attach import gate_values
from .errors import BudgetError

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` of every conv and linear layer whose weight a per-weight mask prunes."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)}


def weight_counts(model: nn.Module) -> dict[str, int]:
    """Number of weights of each prunable layer."""
    return {name: m.weight.numel() for name, m in prunable_weights(model).items()}


def check_weight_budget(limit: float, counts: Mapping[str, int]) -> None:
    """Raise :class:`BudgetError` when ``limit`` non-zero weights cannot keep one weight per layer."""
    total = sum(counts.values())
    if limit < len(counts):
        raise BudgetError(f"nonzero budget {limit / total:.4g} (= {limit:.4g} weights) is unreachable: keeping one "
                          f"weight in each of the {len(counts)} layers needs {len(counts)}; use --budget "
                          f"{max(len(counts) / total * 1.05, 1e-6):.3g} or more")


class _GatedWeight(nn.Module):
    """Parametrization ``W ↦ W ⊙ z`` with ``z`` the gate's values for this forward pass."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self._gate = (gate,)  # a tuple: the gate stays the method's module, not the user's model's

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # this parametrization is a submodule of the layer: its mode is the model's
        return weight * gate_values(self._gate[0], None, self.training).reshape(weight.shape).to(weight.dtype)


class WeightGates:
    """Multiply each named layer's weight by its gate (one value per weight) while attached."""

    def __init__(self, model: nn.Module, gates: Mapping[str, nn.Module]):
        layers = prunable_weights(model)
        self.layers = {name: layers[name] for name in gates}
        for name, gate in gates.items():
            parametrize.register_parametrization(self.layers[name], "weight", _GatedWeight(gate))

    def remove(self) -> None:
        """Restore the unmasked weights (``leave_parametrized=False``); fold gates with :func:`scale_weights`."""
        for module in self.layers.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self.layers = {}


@torch.no_grad()
def scale_weights(model: nn.Module, factors: Mapping[str, torch.Tensor]) -> None:
    """Each named layer's weights ← weights · factors (one per weight; a 0/1 mask zeroes the pruned ones)."""
    layers = prunable_weights(model)
    for name, factor in factors.items():
        w = layers[name].weight
        w.mul_(factor.to(w.device, w.dtype).reshape(w.shape))


def count_kept(masks: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def project_weights(masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor], limit: float,
                    fill: bool = True) -> dict[str, torch.Tensor]:
    """The masks with exactly ``floor(limit)`` kept weights (fewer only when ``fill`` is off and
    the method kept fewer): drop the lowest-scoring kept weights, or reopen the highest-scoring
    closed ones; the highest-scoring weight of every layer is always kept."""
    names = list(masks)
    sizes = [masks[n].numel() for n in names]
    if limit < len(names):
        raise BudgetError(f"a budget of {limit:.4g} non-zero weights cannot keep one weight in each of the "
                          f"{len(names)} layers")
    keep = torch.cat([masks[n].detach().reshape(-1).bool().cpu() for n in names])
    score = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    protected = torch.zeros_like(keep)
    start = 0
    for size in sizes:
        protected[start + int(torch.argmax(score[start:start + size]))] = True
        start += size
    keep |= protected
    allowed = int(math.floor(limit + 1e-9))
    excess = int(keep.sum()) - allowed
    if excess > 0:
        candidates = torch.nonzero(keep & ~protected).flatten()
        drop = candidates[torch.topk(score[candidates], excess, largest=False).indices]
        keep[drop] = False
    elif excess < 0 and fill:
        candidates = torch.nonzero(~keep).flatten()
        reopen = candidates[torch.topk(score[candidates], min(-excess, candidates.numel())).indices]
        keep[reopen] = True
    out, start = {}, 0
    for n, size in zip(names, sizes):
        out[n] = keep[start:start + size].reshape(masks[n].shape).clone()
        start += size
    return out


def density(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{layer: {"nonzero": .., "total": ..}}`` of the model's conv and linear weights."""
    return {name: {"nonzero": int(torch.count_nonzero(m.weight.detach())), "total": m.weight.numel()}
            for name, m in prunable_weights(model).items()}


class WeightCost:
    """Non-zero weights with per-weight gates: the :class:`budgetprune.resources.CostModel`
    interface (``full``, ``hard``, ``expected``, ``layer_names``) where every weight costs 1.

    ``expected`` is E[‖θ‖₀] = Σ_j P(z_j > 0) (Louizos et al., Eq. 12; seed 003's L0 box)."""

    metric = "nonzero"

    def __init__(self, counts: Mapping[str, int]):
        self.counts = dict(counts)

    def layer_names(self) -> list[str]:
        return list(self.counts)

    def full(self) -> float:
        return float(sum(self.counts.values()))

    def hard(self, masks: Mapping[str, torch.Tensor]) -> float:
        return float(count_kept(masks))

    def expected(self, probs: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """Σ over layers of (layer weight, 1 by default) · Σ_j P(z_j > 0)."""
        return sum((1.0 if weights is None else float(weights.get(n, 1.0))) * p.sum() for n, p in probs.items())
