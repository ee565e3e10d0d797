"""Where the gates start: open on a trained network (a Pruner's model, a student started from the
teacher), at seed 001's log α ≈ 0 on a student trained from scratch."""

from __future__ import annotations

import math

import pytest
import torch

import budgetprune
from budgetprune import Pruner
from budgetprune.gates import BETA, GAMMA, OPEN_LOG_ALPHA, ZETA, HardConcreteGate
from budgetprune.pipeline import PruneConfig


def test_open_gates_sample_one_four_times_in_five_and_zero_once_in_a_hundred():
    """Hand-worked: P(z = 1) = σ(log α − β ln((1 − γ)/(ζ − 1))) = σ(3 − ⅔ ln 11) = 0.8024 and
    P(z = 0) = 1 − σ(log α − β ln(−γ/ζ)) = 1 − σ(3 + ⅔ ln 11) = 0.0100; a Monte Carlo draw
    agrees, and the deterministic gate is exactly 1."""
    sigmoid = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    one = sigmoid(OPEN_LOG_ALPHA - BETA * math.log((1 - GAMMA) / (ZETA - 1)))
    zero = 1.0 - sigmoid(OPEN_LOG_ALPHA - BETA * math.log(-GAMMA / ZETA))
    assert one == pytest.approx(0.8024, abs=1e-4) and zero == pytest.approx(0.0100, abs=1e-4)
    torch.manual_seed(0)
    gate = HardConcreteGate(4, OPEN_LOG_ALPHA, OPEN_LOG_ALPHA)
    z = gate.sample(100_000)
    assert float((z == 1).float().mean()) == pytest.approx(one, abs=0.005)
    assert float((z == 0).float().mean()) == pytest.approx(zero, abs=0.002)
    assert torch.equal(gate.deterministic(), torch.ones(4))
    # the gate's own closed forms give the same numbers
    assert float(gate.prob_one()[0].detach()) == pytest.approx(one, rel=1e-5)
    assert float(gate.prob_zero()[0].detach()) == pytest.approx(zero, rel=1e-4)


@pytest.mark.parametrize("method", ["bar", "l0", "constrained-l0"])
def test_a_pruner_starts_hard_concrete_gates_open_unless_told(method):
    x = torch.randn(2, 1, 28, 28)
    pruner = Pruner(budgetprune.create_model("lenet5"), x, "flops=0.5", total_steps=4, method=method)
    told = Pruner(budgetprune.create_model("lenet5"), x, "flops=0.5", total_steps=4, method=method, gate_init=0.0)
    for p, start in ((pruner, OPEN_LOG_ALPHA), (told, 0.0)):
        log_alphas = p.method.by_group(lambda gate: gate.log_alpha.detach())
        assert len(log_alphas) >= 3  # lenet5's gated groups
        for log_alpha in log_alphas.values():
            assert bool(((log_alpha >= start) & (log_alpha <= start + 0.01)).all())


def test_continuous_sparsification_keeps_s0_zero_by_default():
    x = torch.randn(2, 1, 28, 28)
    assert Pruner(budgetprune.create_model("lenet5"), x, "flops=0.5", total_steps=4, method="cs").method.s0 == 0.0
    assert Pruner(budgetprune.create_model("lenet5"), x, "flops=0.5", total_steps=4, method="cs",
                  gate_init=0.5).method.s0 == 0.5


@pytest.mark.parametrize("student_init, gate_init, expected", [
    ("teacher", None, None),  # the Pruner's default: open
    ("random", None, 0.0),  # trained from scratch: seed 001's start
    ("teacher", 0.0, 0.0),
    ("random", 2.0, 2.0),
])
def test_a_run_opens_the_gates_of_a_student_started_from_the_teacher(student_init, gate_init, expected):
    config = PruneConfig(budget=0.5, student_init=student_init, gate_init=gate_init)
    config.validate()
    assert config.pruner_options(100)["gate_init"] == expected
