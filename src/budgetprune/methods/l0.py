"""Penalised L0 (Louizos, Welling & Kingma, ICLR 2018; "LZR" in seed 001's comparison).

Hard Concrete gates on every channel group and the loss
``data loss + λ · E[‖θ‖₀]`` (seed 003, the "Regularization via L0 penalties" box), where
E[‖θ‖₀] is the expected number of parameters the open gates keep: with gates on channels
(group sparsity) a conv's k²·n_in·n_out weights count with the expected open input and
output channels (:meth:`budgetprune.resources.CostModel.expected`). The budget is not in
the objective: it is met only by the shared final projection (the engine's
``enforce_budget``), which is exactly the comparison seed 001 makes.

``granularity="weight"`` is the paper's original form: one gate per weight, and E[‖θ‖₀] =
Σ_j P(z_j > 0) (:class:`budgetprune.sparsity.WeightCost`), met by a non-zero-weight budget.

Aimed at the budget (``aim="budget"``, the default; :mod:`budgetprune.aiming`), the penalty counts
what the budget counts: E[C] in the budget's metric, scaled by P_F / C_F (the full network's
parameters over its full cost) so that λ keeps its meaning per parameter where the network is
whole, and averaged over the budgets when there are several. Under a parameter budget that is
E[‖θ‖₀] itself. Counting parameters under another budget would pull on the wrong channels: under
a volume budget on LeNet-5 the aim raised λ until conv1 closed (it holds most of the volume and
few parameters), and at that λ the parameter-heavy conv2 had closed first. ``metric`` sets the
counted resource explicitly; with ``aim="fixed"`` it is ``params``, the paper's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..aiming import AIM_GAIN, AIM_RATE, BudgetAim
from ..budget import Budget
from ..errors import ConfigError
from ..gates import HardConcreteGate
from ..sparsity import weight_counts
from ..graph import ChannelGraph
from .base import register_method
from .gated import GatedMethod


@register_method("l0")
class PenalizedL0(GatedMethod):
    """λ · E[‖θ‖₀] with Hard Concrete channel gates.

    ``lam`` is λ per expected parameter; by default 0.1 / N for N training examples (the
    value of Louizos et al. and seed 003's table; 1e-6 when N is not known). ``layer_lam`` multiplies λ for the layers
    it names (``{"features.0": 2.0}``: per-layer λ). ``metric`` is the resource penalised: by
    default the budget's own when aimed, ``params`` (the paper's) with ``aim="fixed"``; any
    budget metric can be named (with ``granularity="weight"`` every metric counts non-zero
    weights).
    """

    def __init__(self, lam: float | None = None, dataset_size: int | None = None, metric: str | None = None,
                 layer_lam: dict[str, float] | None = None, gate_lr: float | None = None, gate_init: float = 0.0,
                 granularity: str = "channel",
                 aim: str = "budget", aim_rate: float = AIM_RATE, aim_gain: float = AIM_GAIN,
                 schedule: str = "sigmoid", hardness: float | None = None, schedule_end: float = 1.0):
        super().__init__(gate_lr, granularity, BudgetAim.create(
            aim, aim_rate, aim_gain, schedule, hardness, schedule_end))
        if lam is None:
            lam = 0.1 / dataset_size if dataset_size else 1e-6
        if lam < 0:
            raise ValueError("the L0 penalty weight λ must be ≥ 0")
        self.lam = float(lam)
        self.metric = metric
        self.layer_lam = dict(layer_lam or {})
        self.gate_init = float(gate_init)

    def new_gate(self, size: int) -> nn.Module:
        return HardConcreteGate(size, self.gate_init, self.gate_init + 0.01)

    def check(self, model: nn.Module, graph: ChannelGraph) -> None:
        names = set(weight_counts(model)) if self.per_weight else set(graph.layers) | set(graph.groups)
        unknown = set(self.layer_lam) - names
        if unknown:
            raise ConfigError(f"layer_lam names layers the model does not have: {', '.join(sorted(unknown))}; "
                              f"its layers are {', '.join(sorted(names))}")

    def penalised_metrics(self, budgets: list[Budget]) -> list[str]:
        """The metrics the penalty counts: ``metric``; else each budget's when aimed, else ``params``."""
        if self.metric is not None:
            return [self.metric]
        if self.aim is not None and budgets:
            return list(dict.fromkeys(b.metric for b in budgets))
        return ["params"]

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self.check(model, graph)
        params = self.cost_model("params").full()
        self.costs = [(cm, params / cm.full())  # each metric's expected cost in parameter units (P_F / C_F)
                      for cm in map(self.cost_model, self.penalised_metrics(budgets))]

    def expected_l0(self) -> torch.Tensor:
        """E[‖θ‖₀], or under other metrics E[C]·P_F/C_F averaged over them (each layer weighted by its
        ``layer_lam`` factor)."""
        probs, weights = self.per_channel("prob_nonzero"), self.layer_lam or None
        return sum(scale * cm.expected(probs, weights=weights) for cm, scale in self.costs) / len(self.costs)

    def penalty(self, progress: float) -> torch.Tensor:
        l0 = self.expected_l0()
        self._last["E_L0"] = float(l0.detach())
        return self.weight() * l0
