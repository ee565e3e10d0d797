"""Loss pieces: the budget barrier, the budget schedule, the Lagrangian dual step and
knowledge distillation.

All from seed 001 except the dual step (seed 003) (Lemaire et al., "Structured Pruning of Neural Networks with
Budget-Aware Regularization", CVPR 2019).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError

#: Where the barrier stops following g(c) = c²/(1−c) and continues along its tangent, so
#: that it stays finite (and C¹) when the hard volume V reaches the moving budget b. At
#: 0.9, f = 8.1 there with slope 99: the wall is steep, but not so steep that Adam moves
#: every gate in lock-step (which closes them all at once: measured on the embedded
#: Fashion-MNIST with LeNet-5 at 4x, knee 0.999 ended at 75.8 % accuracy with conv1 cut
#: to one map; knee 0.9 at 82.2 % vs 82.6 % unpruned, V tracking b through training).
BARRIER_KNEE = 0.9


def barrier(V: float, a: float, b: float, knee: float = BARRIER_KNEE) -> float:
    """Budget barrier f(V, a, b) (seed 001, Eq. 5), made finite past the wall.

    With c = (V − a)/(b − a): f = 0 for c ≤ 0 and f = g(c) = c²/(1 − c) for 0 < c < 1, which
    equals (V − a)²/((b − V)(b − a)) — the paper's formula, C¹ at V = a. The paper sets
    f = ∞ for V ≥ b; a training step cannot use ∞ (it would turn into NaN gradients), so
    from c = ``knee`` on, f continues along its tangent line g(k) + g'(k)(c − k):
    finite, C¹, strictly increasing. At the default knee 0.9, f is 8.1 there and rises by 99 per
    unit of c past it: a soft wall, which V may cross when the data loss pulls harder (README,
    "Where we depart from the paper").
    ``V``, ``a`` and ``b`` are plain numbers: V is the hard (non-differentiable) volume,
    so f scales the sparsity loss L_S (Eq. 6) and carries no gradient itself.
    """
    if not b > a:
        raise ValueError(f"barrier needs b > a, got a={a}, b={b}")
    c = (V - a) / (b - a)
    if c <= 0.0:
        return 0.0
    if c < knee:
        return c * c / (1.0 - c)
    g_k = knee * knee / (1.0 - knee)
    dg_k = (2.0 * knee - knee * knee) / (1.0 - knee) ** 2
    return g_k + dg_k * (c - knee)


def sigmoid_transition(t: float, d: float = 10.0) -> float:
    """T(t, d) = (σ(d(t − ½)) − δ)/(1 − 2δ), δ = σ(−d/2) (seed 001, supplement Eq. 1).

    T(0) = 0, T(1) = 1; d → 0 tends to the linear transition. d = 10 is BAR's default.
    """
    t = min(max(t, 0.0), 1.0)
    if d <= 1e-6:
        return t
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    delta = sig(-0.5 * d)
    return (sig(d * (t - 0.5)) - delta) / (1.0 - 2.0 * delta)


def linear_transition(t: float, d: float = 0.0) -> float:
    """T(t) = t: the linear schedule section 3.4 compares against."""
    return min(max(t, 0.0), 1.0)


def exponential_transition(t: float, d: float = 5.0) -> float:
    """T(t) = (1 − e^(−d t))/(1 − e^(−d)): fast early, slow late (section 3.4's option)."""
    t = min(max(t, 0.0), 1.0)
    if d <= 1e-6:
        return t
    return (1.0 - math.exp(-d * t)) / (1.0 - math.exp(-d))


SCHEDULES = {"sigmoid": sigmoid_transition, "linear": linear_transition,
             "exponential": exponential_transition}


def _check_fraction(value, top_included: bool, problem: str) -> float:
    """``value`` as a float in (0, 1) or (0, 1], or a ConfigError that starts with ``problem``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0.0 < value < 1.0 or (top_included and value == 1.0)):
        raise ConfigError(problem)
    return float(value)


def check_knee(knee) -> float:
    """``knee`` as a float in (0, 1), or a one-line error (where :func:`barrier` leaves c²/(1 − c))."""
    return _check_fraction(knee, False, f"barrier knee {knee!r} must lie in (0, 1): where the barrier continues "
                           f"along its tangent (default {BARRIER_KNEE}; closer to 1 is a harder wall)")


def check_schedule_end(end) -> float:
    """``end`` as a float in (0, 1], or a one-line error."""
    return _check_fraction(end, True, f"schedule end {end!r} must lie in (0, 1]: the fraction of the pruning "
                           "phase after which the budget has reached its target (1: the paper's, at the very end)")


class BudgetSchedule:
    """The moving budget b = (1 − T(i)) V_F + T(i) B with a = B − 10⁻⁴ V_F (seed 001, Eq. 7).

    ``i`` is the fraction of the training phase done (iteration / training iterations), divided
    by ``end``: with ``end`` < 1 the budget reaches B after that fraction of the phase, and the
    rest of it trains at the budget (1: the paper's schedule, B at the very end).
    """

    def __init__(self, full: float, budget: float, kind: str = "sigmoid", hardness: float | None = None,
                 end: float = 1.0):
        if kind not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{kind}': choose one of {', '.join(SCHEDULES)}")
        if not 0 < budget < full:
            raise ConfigError(f"budget {budget:g} must lie between 0 and the full cost {full:g}")
        self.full, self.budget, self.kind = float(full), float(budget), kind
        self.hardness = hardness if hardness is not None else {"sigmoid": 10.0, "linear": 0.0,
                                                               "exponential": 5.0}[kind]
        self.end = check_schedule_end(end)
        self.a = self.budget - 1e-4 * self.full

    def transition(self, progress: float) -> float:
        return SCHEDULES[self.kind](min(progress / self.end, 1.0), self.hardness)

    def b(self, progress: float) -> float:
        T = self.transition(progress)
        return (1.0 - T) * self.full + T * self.budget


def dual_ascent(multipliers: torch.Tensor, violations: torch.Tensor, lr: float) -> torch.Tensor:
    """One projected gradient-ascent step on Lagrange multipliers: λ ← max(0, λ + η g).

    ∂L/∂λ_i = g_i (the constraint's violation), so λ grows while its constraint is violated
    (g > 0), shrinks when it holds with room (g < 0), and never goes below 0 (seed 003's
    min-max game; Cooper's projected dual optimiser).
    """
    return (multipliers + lr * violations.to(multipliers)).clamp_min(0.0)


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against the smoothed target (1 − ε) one-hot(y) + ε/K over K classes
    (label smoothing, Szegedy et al. 2016, section 7): (1 − ε) CE(y) + ε · mean_k(−log p_k)."""
    return F.cross_entropy(logits, targets, label_smoothing=float(epsilon))


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor,
                      teacher_logits: torch.Tensor | None, alpha: float = 0.9,
                      temperature: float = 4.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 − α) CE(P_s, y) + α T² CE(P_s, P_t) (Hinton et al.; seed 001, section 3.5).

    ``label_smoothing`` ε smooths the hard term only: its target is (1 − ε) one-hot(y) + ε/K
    (Szegedy et al. 2016, section 7; :func:`smoothed_cross_entropy`); the teacher's P_t is soft already.

    The soft term is computed as KL(P_t ‖ P_s) = CE(P_s, P_t) − H(P_t), with P = softmax(logits/T):
    the same gradient as the paper's cross-entropy (H(P_t) does not depend on the student),
    but a value that reads 0 when the student matches the teacher. Averaged over the batch.
    Without a teacher this is the plain cross-entropy.
    """
    hard = smoothed_cross_entropy(student_logits, targets, label_smoothing)
    if teacher_logits is None or alpha == 0.0:
        return hard
    T = temperature
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits.detach() / T, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - alpha) * hard + alpha * T * T * soft
