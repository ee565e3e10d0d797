"""Where Hard Concrete gates start on a trained network (budgetprune.gate_start): the measured
agreement against the Hard Concrete law, the choice, what the measurement leaves untouched, and the
choice in a Pruner and in a run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import budgetprune
from budgetprune import gate_start
from budgetprune.data import load_dataset
from budgetprune.errors import CheckpointError, ConfigError


def _threshold_model() -> nn.Sequential:
    """Input 1 → hidden unit 0 = 1 (gated: z) → logits (z, 0.5): class 0 exactly when z > 0.5. The
    other hidden units are dead, so the answer depends on unit 0's gate alone."""
    m = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].bias.zero_()
        m[0].weight[0, 0] = 1.0
        m[2].weight.zero_()
        m[2].bias.copy_(torch.tensor([0.0, 0.5]))
        m[2].weight[0, 0] = 1.0
    return m


def test_the_agreement_is_the_probability_that_the_sample_keeps_the_answer():
    """Hand-worked: z > 0.5 ⇔ σ((L + log α)/β)(ζ − γ) + γ > 0.5 ⇔ σ(·) > 0.6/1.2 = 0.5 ⇔ L > −log α for
    the logistic noise L = log u − log(1 − u): P = σ(log α). Each of 4096 examples draws its own
    sample (sd of the fraction ≤ 0.008; tolerance 0.035 also covers the gates' 0.01 jitter)."""
    torch.manual_seed(0)
    m = _threshold_model()
    pruner = budgetprune.Pruner(m, torch.ones(2, 1), "0.5", total_steps=10, gate_inputs=False)
    table = gate_start.survival_table(m, pruner.method, [torch.ones(4096, 1)], grid=[-1.0, 0.0, 1.0, 2.0])
    for start, fraction in table.items():
        assert fraction == pytest.approx(1 / (1 + math.exp(-start)), abs=0.035), table
    assert gate_start.choose_start(table, 0.7) == 1.0  # σ(0) = 0.5 < 0.7 ≤ σ(1) = 0.73
    assert gate_start.choose_start(table, 0.95) == 2.0  # none reaches it: the highest start


def test_the_reference_is_the_ungated_network_and_the_measurement_changes_nothing():
    torch.manual_seed(0)
    model = budgetprune.create_model("lenet5")
    model.train()
    x = torch.randn(64, 1, 28, 28)
    plain = model(x).detach()
    pruner = budgetprune.Pruner(model, x[:2], "flops=0.5", total_steps=10)
    gates = gate_start.hard_concrete_gates(pruner.method)
    gate_start.place(gates, gate_start.UNGATED_LOG_ALPHA)
    assert torch.allclose(model(x), plain, atol=1e-5)  # the reference: every sample exactly 1
    gate_start.place(gates, 3.0)
    assert min(float(g.log_alpha.detach().min()) for g in gates) == pytest.approx(3.0, abs=1e-5)
    model.eval()
    pruner.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    log_alpha = [g.log_alpha.detach().clone() for g in gates]
    rng = torch.get_rng_state()
    table = gate_start.survival_table(model, pruner.method, [x, (x, torch.zeros(64))], grid=[0.0, 40.0])
    assert table[40.0] == 1.0 and table[0.0] < 1.0
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream goes on as before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(a, g.log_alpha) for a, g in zip(log_alpha, gates))
    assert not model.training and not pruner.method.training


def test_a_model_with_batchnorm_keeps_its_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x = torch.randn(16, 1, 12, 12)
    pruner = budgetprune.Pruner(model, x[:2], "flops=0.5", total_steps=10)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    gate_start.survival_table(model, pruner.method, [x])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_the_pruner_starts_its_gates_at_the_choice_and_keeps_it_in_its_state():
    torch.manual_seed(0)
    m = _threshold_model()
    lines = []
    pruner = budgetprune.Pruner(m, torch.ones(2, 1), "0.5", total_steps=10, gate_inputs=False, log=lines.append)
    start = pruner.choose_gate_start([torch.ones(2048, 1)], survival=0.7)
    assert start == 1.0  # σ(0.5) = 0.62 < 0.7 ≤ σ(1) = 0.73
    gates = gate_start.hard_concrete_gates(pruner.method)
    assert min(float(g.log_alpha.detach().min()) for g in gates) == pytest.approx(1.0, abs=1e-6)
    assert lines and lines[0].startswith("gates start at log α 1, the lowest start")
    state = pruner.state_dict()
    assert state["gate_start"]["log_alpha"] == 1.0 and len(state["gate_start"]["agreement"]) == 9
    other = budgetprune.Pruner(_threshold_model(), torch.ones(2, 1), "0.5", total_steps=10, gate_inputs=False)
    other.load_state_dict(state)
    assert other.gate_start == state["gate_start"]
    steps_before = other.steps
    for bad in ({"log_alpha": "import os"}, {**state["gate_start"], "log_alpha": float("nan")},
                {**state["gate_start"], "survival": 7.0}, {**state["gate_start"], "agreement": [[0.0, -3.0]]},
                {**state["gate_start"], "agreement": [[float("inf"), 0.5]]},
                {**state["gate_start"], "agreement": [[0.0, 0.5]] * 65}, {**state["gate_start"], "extra": 1}, [1.0]):
        with pytest.raises(CheckpointError, match="damaged gate_start record .* start the run again without --resume"):
            other.load_state_dict({**state, "steps": 5, "gate_start": bad})
        assert other.steps == steps_before  # refused before anything changed
    pruner.step()
    with pytest.raises(ConfigError, match="before the first step"):
        pruner.choose_gate_start([torch.ones(8, 1)])


def test_outputs_that_are_not_class_scores_need_their_own_agreement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(8, 3, 16, 16)
    pruner = budgetprune.Pruner(model, x[:2], "flops=0.5", total_steps=10)
    with pytest.raises(ConfigError, match=r"returned shape \(8, 3, 16, 16\): pass agree="):
        pruner.choose_gate_start([x])

    def close(output, reference):  # an image model: the example's relative error under 10 %
        return (output - reference).flatten(1).norm(dim=1) < 0.1 * reference.flatten(1).norm(dim=1)
    start = pruner.choose_gate_start([x], agree=close)
    assert start in gate_start.START_GRID


def test_methods_without_hard_concrete_gates_have_no_start_to_choose():
    model = budgetprune.create_model("lenet5")
    x = torch.randn(4, 1, 28, 28)
    pruner = budgetprune.Pruner(model, x[:2], "flops=0.5", total_steps=10, method="magnitude")
    with pytest.raises(ConfigError, match="only Hard Concrete gates have a start to choose: use method bar"):
        pruner.choose_gate_start([x])
    for bad in (0.0, 1.5, True, "0.8"):
        with pytest.raises(ConfigError, match=r"survival must be a fraction in \(0, 1\]"):
            gate_start.choose_start({0.0: 0.5}, bad)
    with pytest.raises(ConfigError, match="at least one"):
        gate_start.choose_start({}, 0.5)


def test_a_run_from_a_teacher_chooses_the_start_and_records_it(tmp_path):
    data = load_dataset("demo")
    small = data.train.subset(torch.arange(128))
    lines = []
    _, metrics = budgetprune.prune(budgetprune.create_model("lenet5"), small, small, budget=0.5, metric="flops",
                                   epochs=1, finetune_epochs=0, lowlr_epochs=0, teacher_epochs=0, progress=False,
                                   log=lines.append, out=tmp_path / "run", gate_survival=0.6)
    chosen = [line for line in lines if line.startswith("gates start at log α")]
    assert len(chosen) == 1, lines
    record = metrics["gate_start"]
    assert record["survival"] == 0.6 and record["log_alpha"] in gate_start.START_GRID
    table = dict(map(tuple, record["agreement"]))
    assert table[record["log_alpha"]] >= 0.6 and all(f < 0.6 for s, f in table.items() if s < record["log_alpha"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["gate_start"] == record


def test_runs_keep_open_gates_unless_asked_to_choose():
    from budgetprune.pipeline import PruneConfig
    config = PruneConfig(model="lenet5", data="demo", budget=0.5)
    assert config.gate_survival is None and config.pruner_options(100)["gate_init"] is None  # the Pruner's open gates
    with pytest.raises(ConfigError, match="--gate-survival must be in"):
        PruneConfig(model="lenet5", data="demo", budget=0.5, gate_survival=1.5).validate()
    with pytest.raises(ConfigError, match="--gate-init fixes where the gates start and --gate-survival chooses"):
        PruneConfig(model="lenet5", data="demo", budget=0.5, gate_survival=0.8, gate_init=0.0).validate()
    with pytest.raises(ConfigError, match="use it with --student-init teacher"):
        PruneConfig(model="lenet5", data="demo", budget=0.5, gate_survival=0.8, student_init="random").validate()
    with pytest.raises(ConfigError, match="method 'cs' has none: drop it, or use --method bar"):
        PruneConfig(model="lenet5", data="demo", budget=0.5, gate_survival=0.8, method="cs").validate()
    for method in ("bar", "l0", "constrained-l0"):
        PruneConfig(model="lenet5", data="demo", budget=0.5, gate_survival=0.8, method=method).validate()


def test_the_command_line_refuses_two_starts_in_one_line(tmp_path):
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "budgetprune", "prune", "--model", "lenet5", "--data", "demo",
                          "--budget", "2x", "--gate-survival", "0.85", "--gate-init", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "give one" in run.stderr, run.stderr


def test_a_run_measures_the_start_with_the_forward_pass_of_its_training_steps(tmp_path):
    """Under --precision bf16 a training step's forward pass runs under autocast: so does the measurement."""
    from budgetprune.pipeline import PruneConfig, PruneRun
    data = load_dataset("demo")
    small = data.train.subset(torch.arange(64))
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        config = PruneConfig(model="lenet5", data="demo", budget=0.5, precision=precision, progress=False)
        run = PruneRun(budgetprune.create_model("lenet5"), small, small, config, tmp_path / precision,
                       log=lambda line: None)
        assert run._step_forward(layer, x).dtype == dtype
