"""Sensitivity-driven regularisation (Tartaglione, Lepsøy, Fiandrotti & Francini; seed 002),
on single weights (the paper's form, ``granularity="weight"``) or on whole channels.

The paper's update is w ← w − η ∂L/∂w − λ·w·max(0, 1 − S(y, w)), with the sensitivity of
the outputs to a parameter

* unspecific: S = (1/C) Σ_k |∂y_k/∂w|,
* specific:   S = Σ_k y*_k |∂y_k/∂w| (y* the one-hot target),

so parameters the outputs do not depend on decay to zero while the others take the plain
optimiser step, and a threshold then removes them.

Per weight, S is the derivative of the outputs w.r.t. the weight itself, and a weight is
pruned when |w| falls below ``threshold`` × its layer's starting RMS; the projection onto
the non-zero-weight budget ranks weights by |w|.

Per channel (the default), the parameter is a channel: its
sensitivity is that of the outputs to a multiplicative probe z_c = 1 on the channel
(:class:`budgetprune.gates.MaskGate` in probing mode), and the decay shrinks the channel's
whole filter (weights and bias). y is the softmax of the network output, averaged over the
batch; for the specific form, y* is the network's own prediction (the method does not see the
labels). A channel's S is a derivative w.r.t. a whole map, on another scale than a single
weight's, so S is divided by its largest value over the network before it enters
max(0, 1 − S): the most sensitive channel is never decayed. S costs one backward pass per class
and is recomputed every ``every`` steps (an exponential average in between). A channel is
pruned when its filter norm falls below ``threshold`` × its norm at the start; a layer the
fatal-pruning guard protects (seed 001, section 4.1) keeps its strongest filter out of the decay
once the decay would take its last one under the threshold.

A unit whose norm falls under the threshold is removed for good (``permanent=True``, the
default): its mask closes, so from the next step on its output is 0 in the forward pass (and
its weights no longer decay), and the rest of the network trains without it, as thresholding
removes a parameter in the paper's procedure. This matters behind a BatchNorm: there the decay
shrinks a filter whose scale the BatchNorm normalises away, so a channel counted pruned (under
1 % of its start) still passed its full signal; the run's count of kept channels fell while the
network still used them all, and the final cut came at once (ResNet-20, Fashion-MNIST, 16×
volume: one seed of three at chance). Counted only (``permanent=False``), a unit under the
threshold still passes what is left of it, and one the optimiser lifts back over it counts as
kept again.

Either way a sensitivity is a derivative on its own scale, so S is divided by its largest
value over the network before it enters max(0, 1 − S): the most sensitive unit is never
decayed. S costs one backward pass per class and is recomputed every ``every`` steps (an
exponential average in between).
"""

from __future__ import annotations

import torch
from torch import nn

from ..aiming import AIM_GAIN, AIM_RATE, BudgetAim
from ..budget import Budget
from ..gates import MaskGate
from ..graph import ChannelGraph, ChannelGroup, parameter
from .base import register_method
from .gated import GatedMethod, still_open


#: The largest decay λ·m an aimed run applies per step (the paper's λ < 1 keeps w ← w(1 − λ(1 − S)) a
#: shrink; half a filter per step is already a cut).
MAX_DECAY = 0.5


@register_method("sensitivity")
class SensitivityRegularization(GatedMethod):
    """Channels whose outputs do not matter decay by λ·w·max(0, 1 − S) after every step."""

    penalty_reads_forward = True  # the sensitivities are derivatives of this step's output

    guard_after_step = False

    rank_statistics = ("sensitivity",)  # measured on each process's batches: averaged over processes

    def __init__(self, lam: float = 1e-2, kind: str = "unspecific", every: int = 10, threshold: float = 1e-2,
                 momentum: float = 0.9, granularity: str = "channel", permanent: bool = True,
                 aim: str = "budget", aim_rate: float = AIM_RATE, aim_gain: float = AIM_GAIN,
                 schedule: str = "sigmoid", hardness: float | None = None, schedule_end: float = 1.0):
        super().__init__(gate_lr=None, granularity=granularity, aim=BudgetAim.create(
            aim, aim_rate, aim_gain, schedule, hardness, schedule_end))
        if kind not in ("unspecific", "specific"):
            raise ValueError("sensitivity kind must be 'unspecific' or 'specific'")
        if not 0 <= lam < 1 or every < 1 or not threshold > 0:
            raise ValueError("sensitivity needs 0 ≤ lam < 1, every ≥ 1 and threshold > 0")
        self.lam, self.kind, self.every = float(lam), kind, int(every)
        self.threshold, self.momentum = float(threshold), float(momentum)
        self.permanent = bool(permanent)
        self._output: torch.Tensor | None = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def new_gate(self, size: int) -> nn.Module:
        return MaskGate(size)  # per weight: holds the mask; S is taken w.r.t. the weights themselves

    def make_gate(self, group: ChannelGroup) -> nn.Module:
        gate = MaskGate(group.channels)
        gate.probing = True
        return gate

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self.modules_of = dict(model.named_modules())
        self.units = [self.gid_of[k] for k in self.gates]
        for unit in self.units:
            gate = self.gate(unit)
            gate.register_buffer("sensitivity", torch.ones_like(gate.mask))
            start = self.filter_norms(unit)
            if self.per_weight:  # a weight is measured against its layer's starting RMS
                start = start.square().mean().sqrt().expand_as(start).clone()
            gate.register_buffer("start_norm", start.clamp_min(1e-12))
        self._handle = model.register_forward_hook(self._keep_output)

    def detach(self) -> None:
        super().detach()
        if getattr(self, "_handle", None) is not None:
            self._handle.remove()
            self._handle = None
        for gate in self.gates.values():
            gate.probing = False

    def _keep_output(self, module, inputs, output):
        self._output = output if module.training else None

    # -- the parameters a channel owns ------------------------------------------------
    def _filter_params(self, gid: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, channel of each of its rows) of an output group's filters."""
        if self.graph.groups[gid].position == "input":
            return []
        return [(parameter(self.modules_of, path), rows) for path, rows in self.graph.filter_rows(gid)]

    def _weight(self, name: str) -> torch.Tensor:
        """A layer's weight parameter (the unmasked original while gates are attached)."""
        module = self.modules_of[name]
        if hasattr(module, "parametrizations"):
            return module.parametrizations.weight.original
        return module.weight

    @torch.no_grad()
    def filter_norms(self, gid: str) -> torch.Tensor:
        """A channel's filter norm; per weight, |w|."""
        if self.per_weight:
            return self._weight(gid).detach().abs().reshape(-1)
        group = self.graph.groups[gid]
        if group.position == "input":  # an MLP's input features: the columns that read them
            w = self.modules_of[group.host].weight.detach()
            return w.reshape(w.shape[0], group.channels, -1).square().sum(dim=(0, 2)).sqrt()
        return torch.sqrt(sum(torch.zeros(group.channels, dtype=p.dtype, device=p.device).index_add(
            0, rows.to(p.device), p.detach().reshape(p.shape[0], -1).square().sum(dim=1))
            for p, rows in self._filter_params(gid)))

    # -- sensitivity -------------------------------------------------------------------
    def sensitivities(self, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """S per channel (not normalised) from the probes of the forward pass of ``output``."""
        gids = self.units
        probes = [self._weight(g) if self.per_weight else self.gate(g).probe for g in gids]
        y = torch.softmax(output, dim=1)
        totals = [p.new_zeros(p.numel() if self.per_weight else p.shape) for p in probes]
        if self.kind == "unspecific":
            targets = [(k, y[:, k].mean(), 1.0 / y.shape[1]) for k in range(y.shape[1])]
        else:
            pred = y.detach().argmax(dim=1)
            targets = [(int(k), y[pred == k, int(k)].mean(), float((pred == k).float().mean()))
                       for k in pred.unique()]
        for _, yk, weight in targets:
            grads = torch.autograd.grad(yk, probes, retain_graph=True, allow_unused=True)
            for t, g in zip(totals, grads):
                if g is not None:
                    t += weight * g.detach().abs().reshape(-1, t.numel()).sum(0)
        return dict(zip(gids, totals))

    def penalty(self, progress: float) -> torch.Tensor:
        """No loss term: the method acts on the update (see :meth:`after_step`). Every ``every``
        steps the sensitivities of this step's forward pass are measured here."""
        if self._output is not None and int(self.steps) % self.every == 0:
            # a closed unit's sensitivity counts 0 (so it is never the top that the others are divided by)
            s = {gid: v * self.gate(gid).mask.to(v).reshape(v.shape)
                 for gid, v in self.sensitivities(self._output).items()}
            top = max(float(v.max()) for v in s.values()) or 1.0
            m = self.momentum if int(self.steps) else 0.0
            for gid, v in s.items():
                buf = self.gate(gid).sensitivity
                buf.mul_(m).add_((1.0 - m) * (v / top).to(buf))
        self._output = None
        return self.zero()

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """w ← w − λ · w · max(0, 1 − S) on every channel's filter (seed 002's learning rule,
        after the optimiser's own step)."""
        self.steps += 1
        lam = min(self.weight(), MAX_DECAY)
        for gid in self.units:
            gate = self.gate(gid)
            shrink = 1.0 - lam * (1.0 - gate.sensitivity).clamp_min(0.0) * gate.mask
            if not self.per_weight and self.graph.groups[gid].min_keep:
                shrink = self._spare_the_last(gid, shrink)
            if self.per_weight:
                p = self._weight(gid)
                p.mul_(shrink.to(p).reshape(p.shape))
                continue
            for p, rows in self._filter_params(gid):
                p.mul_(shrink.to(p)[rows.to(p.device)].reshape(-1, *([1] * (p.dim() - 1))))
        if self.permanent:
            self._close_fallen()
        super().after_step(progress)  # aimed: the controller's step on the masks this decay left

    def _close_fallen(self) -> None:
        """Close the mask of every unit the decay (or the optimiser) took under the threshold; a
        protected group keeps open its ``min_keep`` strongest units even if they fell."""
        for gid in self.units:
            gate = self.gate(gid)
            is_open = gate.mask > 0
            need = 1 if self.per_weight else self.graph.groups[gid].min_keep
            gate.set(still_open(is_open, self.filter_norms(gid) / gate.start_norm, self.threshold, need))

    def _spare_the_last(self, gid: str, shrink: torch.Tensor) -> torch.Tensor:
        """The fatal-pruning guard (seed 001, section 4.1) for the decay: where ``shrink`` would leave
        fewer than ``min_keep`` filters of a protected group above the threshold, its ``min_keep``
        strongest (relative to their starting norms) are not shrunk, so the group keeps channels that
        carry their signal (decayed away, a ResNet's only shortcut cut the network in two)."""
        need = self.graph.groups[gid].min_keep
        gate = self.gate(gid)
        relative = (self.filter_norms(gid) / gate.start_norm).masked_fill(gate.mask <= 0, 0.0)
        if int((relative * shrink > self.threshold).sum()) >= need:
            return shrink
        shrink = shrink.clone()
        shrink[torch.topk(relative, min(need, relative.numel())).indices] = 1.0
        return shrink

    def scores(self) -> dict[str, torch.Tensor]:
        """S per channel; |w| per weight (the magnitude the decay left)."""
        if self.per_weight:
            return {u: self.filter_norms(u) for u in self.units}
        return self.by_group(lambda g: g.sensitivity.detach().clone())

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Units whose filter norm (|w| per weight) kept more than ``threshold`` of its starting norm
        (the layer's starting RMS per weight)."""
        out = {}
        for gid in self.units:
            gate = self.gate(gid)
            out[gid] = (self.filter_norms(gid) > self.threshold * gate.start_norm) & (gate.mask > 0)
        return out
