"""Aiming a fixed-λ method at the budget: its penalty weight adapted so that its own hard cost
follows BAR's moving budget.

Penalised L0 (seed 003's penalty box), Continuous Sparsification (seed 004), sensitivity-driven
regularisation (seed 002), the Information Bottleneck and MorphNet weigh their penalty by a
fixed λ: where their cost ends depends on λ, the network and the length of the run, not on the
budget, and the final projection then cuts whatever is left over, untrained (seed 001's
comparison runs them so). Aimed, the method's λ becomes λ·m with m = e^u, and after every
training step u takes one projected dual-ascent step (seed 003's min-max game, as
:func:`budgetprune.objectives.dual_ascent`, here in log space so that m stays positive and
moves across orders of magnitude at the same pace) on the constraint

    g(t) = max_k C_k / b_k(t) − 1 ≤ 0,

where C_k is the cost of budget k's metric over the channels (or weights) the method keeps now
(its own hard decision, :meth:`~budgetprune.methods.base.Method.keep_masks`) and b_k(t) BAR's
moving budget at progress t (seed 001, Eq. 7: :class:`budgetprune.objectives.BudgetSchedule`,
the run's schedule). With the error e = log(max_k C_k / b_k(t)):

    u = clamp(I + κ·e, −U, U),   I ← clamp(I + η·e, −U, U)

an integral term (the dual variable) plus a proportional one (κ) that answers at once, so that
λ falls back as soon as the cost has caught up with b instead of after the integral unwinds.
λ·m is thus large while the method keeps more than the schedule allows and small once it keeps
less; the final projection only trims what the method overshot.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .budget import Budget
from .errors import ConfigError
from .objectives import SCHEDULES, BudgetSchedule, check_schedule_end

#: How λ is weighed: ``budget`` (aimed: the default of l0, sensitivity and ib) or ``fixed`` (the
#: paper's constant λ: the default of cs and morphnet, which aimed lost accuracy; see their classes).
AIMS = ("budget", "fixed")

#: Integral gain η per step of log(C/b): a cost 10 % over b raises λ by e^(0.1η) per step
#: (at η = 0.05, ×2.7 in about 200 steps).
AIM_RATE = 0.05

#: Proportional gain κ: λ × (C/b)^κ at once (5: ×1.6 at 10 % over, ×0.59 at 10 % under). Larger
#: gains follow b more tightly on LeNet-5 but amplify the flicker of methods whose hard decision
#: is a threshold on a jittering value (MorphNet's |γ|, sensitivity's filter norms).
AIM_GAIN = 5.0

#: The exponent u stays within ±U: λ·m between 10⁻⁴ and 10⁴ times the method's λ.
AIM_LIMIT = math.log(1e4)


class BudgetAim(nn.Module):
    """The multiplier m = e^u of a method's λ (the module docstring's controller).

    ``rate`` is η, ``gain`` κ; ``schedule``, ``hardness`` and ``schedule_end`` define b(t) as for
    BAR. The integral term is a buffer: it is saved with the method and restored on resume."""

    def __init__(self, rate: float = AIM_RATE, gain: float = AIM_GAIN, schedule: str = "sigmoid",
                 hardness: float | None = None, schedule_end: float = 1.0):
        super().__init__()
        if not (rate >= 0 and gain >= 0 and math.isfinite(rate) and math.isfinite(gain)):
            raise ValueError("aim_rate and aim_gain must be finite numbers ≥ 0")
        self.rate, self.gain = float(rate), float(gain)
        self.schedule_kind, self.hardness, self.schedule_end = schedule, hardness, schedule_end
        self.register_buffer("integral", torch.zeros((), dtype=torch.float64))
        self.register_buffer("log_error", torch.zeros((), dtype=torch.float64))  # e of the last step
        self.terms: list[tuple[Budget, object, BudgetSchedule]] = []

    @staticmethod
    def create(aim: str, rate: float, gain: float, schedule: str, hardness: float | None,
               schedule_end: float) -> "BudgetAim | None":
        """The controller for option ``aim`` (None for ``fixed``)."""
        if aim not in AIMS:
            raise ValueError(f"aim must be one of {', '.join(AIMS)}, not {aim!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{schedule}': choose one of {', '.join(SCHEDULES)}")
        try:
            schedule_end = check_schedule_end(schedule_end)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return BudgetAim(rate, gain, schedule, hardness, schedule_end) if aim == "budget" else None

    def setup(self, budgets: list[Budget], cost_model) -> None:
        """One term per budget: ``cost_model(metric)`` counts the method's hard cost of that metric."""
        self.terms = []
        for budget in budgets:
            cm = cost_model(budget.metric)
            full = cm.full()
            try:
                schedule = BudgetSchedule(full, budget.fraction * full, self.schedule_kind, self.hardness,
                                          self.schedule_end)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            self.terms.append((budget, cm, schedule))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A method state saved before λ was aimed (an older run resumed) has no controller state:
        the controller starts afresh (λ at the method's own) instead of refusing the checkpoint."""
        for name, buf in self.named_buffers(recurse=False):
            state_dict.setdefault(prefix + name, buf.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def ratio(self, masks: dict[str, torch.Tensor], progress: float) -> float:
        """max_k C_k / b_k(t): above 1 while the method keeps more than the schedule allows."""
        return max(cm.hard(masks) / schedule.b(progress) for _, cm, schedule in self.terms)

    def update(self, masks: dict[str, torch.Tensor], progress: float) -> float:
        """One step of the controller after a training step; returns C/b."""
        ratio = self.ratio(masks, progress)
        self.log_error.fill_(math.log(max(ratio, 1e-12)))
        self.integral.copy_((self.integral + self.rate * self.log_error).clamp(-AIM_LIMIT, AIM_LIMIT))
        return ratio

    def factor(self) -> float:
        """m = e^(I + κ·e): the multiplier of λ for the next step."""
        u = float(self.integral) + self.gain * float(self.log_error)
        return math.exp(min(max(u, -AIM_LIMIT), AIM_LIMIT))
