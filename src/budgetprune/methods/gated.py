"""What every method with one learnable multiplicative gate per channel shares.

BAR, penalised L0, constrained L0, Continuous Sparsification, the Information Bottleneck
and MorphNet all put a per-channel factor on each group's host output
(:class:`budgetprune.attach.GateHooks`) and differ only in the gate's distribution and in
the penalty. The gate module is any ``nn.Module`` of :mod:`budgetprune.gates` with
``forward(batch_size)``, ``deterministic()``, ``keep_score()``, ``keep_mask()``,
``keep_at_least_one()`` and ``freeze(values)``.

Methods that also prune single weights (``granularity="weight"``: l0, constrained-l0, cs,
sensitivity) get one gate per conv/linear layer with one entry per weight instead, applied
by :class:`budgetprune.sparsity.WeightGates`; their units are then layer names, not group
ids, and :meth:`cost_model` counts non-zero weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..aiming import BudgetAim
from ..attach import GateHooks
from ..budget import Budget
from ..gates import HardConcreteGate, per_channel_joined
from ..graph import ChannelGroup, ChannelGraph
from ..resources import CostModel
from ..sparsity import WeightCost, WeightGates, weight_counts
from .base import Method

GRANULARITIES = ("channel", "weight")


def _key(gid: str) -> str:
    """ModuleDict keys may not contain dots."""
    return gid.replace(".", "__")


def still_open(is_open: torch.Tensor, strength: torch.Tensor, threshold: float, need: int) -> torch.Tensor:
    """The units that stay open when every unit whose ``strength`` (sensitivity's relative filter
    norm, MorphNet's |γ|) is at ``threshold`` or under closes for good: the open ones above it, and
    where fewer than ``need`` of those are left (the fatal-pruning guard, seed 001 section 4.1), the
    ``need`` strongest open ones. Computed on the device without reading a count back (it runs
    after every training step)."""
    keep = is_open & (strength > threshold)
    ranked = strength.masked_fill(~is_open, float("-inf")).flatten()
    strongest = torch.zeros_like(ranked, dtype=torch.bool)
    strongest[torch.topk(ranked, min(need, ranked.numel())).indices] = True
    return torch.where(keep.sum() < need, keep | (strongest.view_as(keep) & is_open), keep)


class GatedMethod(Method):
    """Gates on every group of the graph; subclasses give :meth:`make_gate` and :meth:`penalty`."""

    #: Whether the fatal-pruning guard clamps a protected group's best gate open after each step.
    guard_after_step = True
    #: Gate samples in training: one per example and channel ("example") or one per channel for the
    #: batch ("batch": folded into the host's weights where it can be, no pass over the feature maps).
    #: Set before :meth:`attach` (the Pruner's ``gate_sample``).
    gate_sample = "example"

    def __init__(self, gate_lr: float | None = None, granularity: str = "channel", aim: BudgetAim | None = None):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not '{granularity}'")
        self.gate_lr = gate_lr
        self.granularity = granularity
        self.aim = aim  # a method without a budget of its own: λ aimed at the budget schedule (None: fixed λ)
        self.gates = nn.ModuleDict()
        self._hooks: GateHooks | WeightGates | None = None
        self._last: dict[str, float] = {}

    def new_gate(self, size: int) -> nn.Module:
        """A gate over ``size`` units (channels, or the weights of one layer)."""
        raise NotImplementedError

    def make_gate(self, group: ChannelGroup) -> nn.Module:
        """One gate unit per independent channel (tied channels of a grouped conv share one)."""
        return self.new_gate(group.units)

    @property
    def per_weight(self) -> bool:
        return self.granularity == "weight"

    def cost_model(self, metric: str):
        """The cost of ``metric`` over this method's units (non-zero weights for per-weight gates)."""
        return WeightCost(self.counts) if self.per_weight else CostModel(self.graph, metric)

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        """Method-specific state once the gates exist (cost models, multipliers, ...)."""

    def attach(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self.graph = graph
        device = self.device = next(model.parameters()).device
        self.gid_of = {}
        if self.per_weight:
            self.counts = weight_counts(model)
            units = {name: self.new_gate(n) for name, n in self.counts.items()}
        else:
            units = {gid: self.make_gate(group) for gid, group in graph.groups.items()}
        for unit, gate in units.items():
            self.gates[_key(unit)] = gate.to(device)
            self.gid_of[_key(unit)] = unit
        self.setup(model, graph, budgets)
        if self.aim is not None:
            self.aim.setup(budgets, self.cost_model)
        gates = {unit: self.gates[_key(unit)] for unit in units}
        self._hooks = WeightGates(model, gates) if self.per_weight else GateHooks(model, graph, gates, self.gate_sample)

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def gate(self, gid: str) -> nn.Module:
        return self.gates[_key(gid)]

    def by_group(self, fn) -> dict[str, torch.Tensor]:
        """``{group id: fn(gate)}``, per channel: a gate over tied units gives each channel its unit's value."""
        return self._by_unit({key: fn(gate) for key, gate in self.gates.items()})

    def per_channel(self, quantity: str) -> dict[str, torch.Tensor]:
        """``by_group(lambda g: getattr(g, quantity)())`` for a per-channel quantity of
        :data:`budgetprune.gates.JOINT_QUANTITIES`: the Hard Concrete gates that share (β, γ, ζ)
        compute it once over their joined log α (a handful of operations for the whole network
        instead of a handful per gate; :func:`budgetprune.gates.per_channel_joined`)."""
        return self.per_channel_joined(quantity)[0]

    def per_channel_joined(self, quantity: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """:meth:`per_channel`, and the one vector its values were computed as, in the dict's order,
        where there is one: every gate a Hard Concrete gate of one (β, γ, ζ), none over tied units
        (else None). :meth:`budgetprune.resources.CostModel.expected` reads it as ``joined``."""
        joint: dict[tuple, list[str]] = {}
        values = {}
        for key, gate in self.gates.items():
            if type(gate) is HardConcreteGate:
                joint.setdefault((gate.beta, gate.gamma, gate.zeta, gate.log_alpha.device), []).append(key)
            else:
                values[key] = getattr(gate, quantity)()
        vector = None
        for keys in joint.values():
            gates = [self.gates[k] for k in keys]
            vector = per_channel_joined(gates, quantity)
            values.update(zip(keys, vector.split([g.num_channels for g in gates])))
        out = self._by_unit({key: values[key] for key in self.gates})
        whole = list(joint.values()) == [list(self.gates)] and len(out) == len(self.gates) and \
            all(out[self.gid_of[key]] is values[key] for key in self.gates)  # one set of all, none expanded
        return out, vector if whole else None

    def _by_unit(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Values per gate key as values per unit (group id or layer name), tied units expanded."""
        out = {}
        for key, value in values.items():
            unit = self.gid_of[key]
            group = None if self.per_weight else self.graph.groups.get(unit)
            if group is not None and isinstance(value, torch.Tensor) and value.dim() >= 1 and \
                    value.shape[-1] == group.units != group.channels:
                value = group.expand(value)
            out[unit] = value
        return out

    def zero(self) -> torch.Tensor:
        """A differentiable 0 on the gates' device (a penalty that is off)."""
        params = list(self.gates.parameters())
        if params:
            return sum(p.sum() for p in params) * 0.0
        return torch.zeros((), device=self.device)

    def after_step(self, progress: float) -> None:
        """Keep ≥ 1 open channel in every protected group (the fatal-pruning guard, seed 001 section 4.1),
        then, for an aimed method, the controller's step (:mod:`budgetprune.aiming`).

        Groups with ``min_keep`` 0 (inside a residual branch) may close completely: the
        block then disappears (automatic depth determination). With per-weight gates every
        layer keeps ≥ 1 weight."""
        if self.guard_after_step:
            for key, gate in self.gates.items():
                if gate.frozen is None and (self.per_weight or self.graph.groups[self.gid_of[key]].min_keep > 0):
                    gate.keep_at_least_one()
        if self.aim is not None:
            with torch.no_grad():
                ratio = self.aim.update(self.keep_masks(), progress)
            self._last.update({"cost/b": ratio, "lam": self.weight()})

    def weight(self) -> float:
        """λ of the penalty at this step: the method's λ, times the aim's multiplier when aimed."""
        return self.lam * (self.aim.factor() if self.aim is not None else 1.0)

    def scores(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.per_channel("keep_score")

    def keep_masks(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.per_channel("keep_mask")

    def gate_values(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.per_channel("deterministic")

    def freeze(self, masks: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
        """Gates become their deterministic value (or ``values``) on kept channels and 0 on pruned ones."""
        if values is None:
            det = self.gate_values()
            values = {g: det[g] * masks[g].to(det[g].device).float() for g in det}
        for key, gate in self.gates.items():
            unit = self.gid_of[key]
            value = values[unit]
            group = None if self.per_weight else self.graph.groups.get(unit)
            if group is not None and gate.num_channels == group.units != value.shape[-1]:
                value = value[..., :group.units]  # tied masks: channels 0 .. units-1 stand for their units
            gate.freeze(value)

    def param_groups(self, lr: float) -> list[dict]:
        params = [p for g in self.gates.values() for p in g.parameters()]
        if not params:
            return []
        return [{"params": params, "lr": self.gate_lr or lr, "weight_decay": 0.0, "name": "gates"}]

    def status(self) -> dict[str, float]:
        return dict(self._last)
