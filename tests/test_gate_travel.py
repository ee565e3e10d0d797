"""How far Hard Concrete gates can travel in a prune stage: the half-closed log α, Adam's step
bound the note relies on, and the note a run logs when its prune stage is too short for the
gates to close."""

from __future__ import annotations

import math

import pytest
import torch

import budgetprune
from budgetprune.data import load_dataset
from budgetprune.gates import HardConcreteGate, OPEN_LOG_ALPHA, travel_note


def test_the_pruning_threshold_is_where_the_deterministic_gate_reaches_zero():
    """Hand-worked: ẑ = clamp(σ(log α)(ζ − γ) + γ, 0, 1) is 0 where σ(log α) ≤ 0.1 / 1.2, i.e.
    log α ≤ ln(1/11) = −2.3979; just above it ẑ > 0."""
    gate = HardConcreteGate(2)
    assert gate.open_threshold() == pytest.approx(math.log(1 / 11), abs=1e-12)
    gate.log_alpha.data = torch.tensor([math.log(1 / 11) - 1e-3, math.log(1 / 11) + 1e-3])
    z = gate.deterministic().detach()
    assert float(z[0]) == 0.0 and float(z[1]) > 0.0


def test_adam_moves_a_parameter_by_at_most_about_lr_per_step():
    """The bound the note uses: under a constant gradient (the most a gate can be pushed one way)
    Adam's log α falls by lr per step; under a noisy one, by less."""
    for noise in (0.0, 3.0):
        torch.manual_seed(1)
        p = torch.nn.Parameter(torch.tensor([OPEN_LOG_ALPHA]))
        opt = torch.optim.Adam([p], lr=0.01)
        for _ in range(200):
            opt.zero_grad()
            p.grad = torch.tensor([1.0 + noise * float(torch.randn(()))])
            opt.step()
        travelled = OPEN_LOG_ALPHA - float(p.detach())
        assert travelled <= 0.01 * 200 * 1.001
        assert travelled == pytest.approx(2.0, rel=1e-3) if noise == 0 else travelled < 1.0


def test_the_note_speaks_only_when_the_gates_cannot_get_to_closed():
    gate = HardConcreteGate(8, OPEN_LOG_ALPHA, OPEN_LOG_ALPHA)
    need = OPEN_LOG_ALPHA - math.log(1 / 11)  # 5.40
    short = travel_note([gate], 0.01, 80)
    assert short is not None and "80 steps" in short and "about 0.8 " in short and "by 5.4 " in short
    assert f"at least {math.ceil(need / 0.01)} steps" in short
    # silent from two thirds of the way: 360 steps reach 3.6 of 5.4 (1.5 × 3.6 = 5.4)
    assert travel_note([gate], 0.01, 359) is not None and travel_note([gate], 0.01, 361) is None
    assert travel_note([gate], 0.1, 80) is None  # 8 units of reach
    # the gates that start lowest decide: one near the threshold is enough for the training to act
    near = HardConcreteGate(8, -1.8, -1.8)
    assert travel_note([gate, near], 0.01, 80) is None and travel_note([near, gate], 0.01, 80) is None
    assert travel_note([torch.nn.Linear(2, 2)], 0.01, 10) is None  # no Hard Concrete gate: nothing to say
    assert travel_note([gate], 0.0, 80) is None and travel_note([gate], 0.01, 0) is None


def test_a_run_with_a_short_prune_stage_says_so(tmp_path):
    lines = []
    data = load_dataset("demo")
    small = data.train.subset(torch.arange(128))
    budgetprune.prune(budgetprune.create_model("lenet5"), small, small, budget=0.5, metric="flops", epochs=1,
                      finetune_epochs=0, lowlr_epochs=0, teacher_epochs=0, progress=False, log=lines.append)
    notes = [line for line in lines if "note: the prune stage has 2 steps" in line]
    assert len(notes) == 1, lines
    lines.clear()
    budgetprune.prune(budgetprune.create_model("lenet5"), small, small, budget=0.5, metric="flops", epochs=1,
                      finetune_epochs=0, lowlr_epochs=0, teacher_epochs=0, progress=False, log=lines.append,
                      gate_lr=10.0)
    assert not [line for line in lines if "note: the prune stage" in line]
