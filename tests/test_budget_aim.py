"""Methods without a budget of their own, aimed at it (budgetprune.aiming), and the schedule's end.

The controller's step is checked against hand-worked numbers; the aimed methods' λ rises while
their cost stays above the moving budget and their run ends nearer the budget than with the
paper's fixed λ; the state resumes; the schedule end moves b and the iterative cuts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import budgetprune
from budgetprune import Pruner
from budgetprune.aiming import AIM_LIMIT, BudgetAim
from budgetprune.budget import Budget
from budgetprune.errors import ConfigError
from budgetprune.methods import create_method
from budgetprune.objectives import BudgetSchedule, sigmoid_transition
from loops import pruning_steps, random_batches

AIMED = ["l0", "cs", "sensitivity", "ib", "morphnet"]


class FixedCost:
    """A cost model whose hard cost is whatever the test sets."""

    def __init__(self, full: float):
        self.value = self._full = full

    def full(self) -> float:
        return self._full

    def hard(self, masks) -> float:
        return self.value


def test_the_controller_step_by_hand():
    """u = I + κ·e, I ← I + η·e, e = log(C/b): two steps worked out by hand."""
    aim = BudgetAim(rate=0.1, gain=4.0, schedule="linear")
    cost = FixedCost(100.0)
    aim.setup([Budget("volume", 0.5)], lambda metric: cost)
    # progress 0.5 on the linear schedule: b = 100 − 0.5·(100 − 50) = 75
    cost.value = 90.0
    assert aim.update({}, 0.5) == pytest.approx(90 / 75)
    e1 = math.log(90 / 75)
    assert float(aim.integral) == pytest.approx(0.1 * e1)
    assert aim.factor() == pytest.approx(math.exp(0.1 * e1 + 4.0 * e1))
    cost.value = 40.0  # progress 1: b = 50, the cost is under it
    aim.update({}, 1.0)
    e2 = math.log(40 / 50)
    assert float(aim.integral) == pytest.approx(0.1 * (e1 + e2))
    assert aim.factor() == pytest.approx(math.exp(0.1 * (e1 + e2) + 4.0 * e2))
    assert aim.factor() < 1.0  # under the budget: λ below the method's own


def test_the_controller_takes_the_worst_budget_and_its_integral_is_bounded():
    aim = BudgetAim(rate=1000.0, gain=0.0, schedule="linear")
    volume, flops = FixedCost(10.0), FixedCost(10.0)
    aim.setup([Budget("volume", 0.5), Budget("flops", 0.5)], lambda m: volume if m == "volume" else flops)
    volume.value, flops.value = 5.0, 8.0  # at progress 1 both budgets are 5: flops is 1.6 over
    assert aim.update({}, 1.0) == pytest.approx(1.6)
    assert float(aim.integral) == pytest.approx(AIM_LIMIT)  # clamped
    assert aim.factor() == pytest.approx(math.exp(AIM_LIMIT))


def test_the_schedule_end_reaches_the_budget_early():
    full, target = 100.0, 20.0
    early = BudgetSchedule(full, target, "sigmoid", end=0.5)
    paper = BudgetSchedule(full, target, "sigmoid")
    assert early.b(0.5) == pytest.approx(target) and early.b(0.8) == pytest.approx(target)
    assert early.b(0.2) == pytest.approx(paper.b(0.4))
    t = sigmoid_transition(0.6)  # by hand: b = (1 − T(0.3/0.5)) V_F + T B
    assert early.b(0.3) == pytest.approx((1 - t) * full + t * target)
    for bad in (0, 1.5, -1, True, "half"):
        with pytest.raises(ConfigError, match="schedule end"):
            BudgetSchedule(full, target, end=bad)


def test_iterative_cuts_share_the_first_part_of_the_phase():
    paper = create_method("magnitude")
    early = create_method("magnitude", schedule_end=0.5)
    model = budgetprune.create_model("lenet5")
    graph = budgetprune.graph.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    for method in (paper, early):
        method.attach(model, graph, [Budget("volume", 0.125)])
        method.detach()
    n = len(paper.fractions)  # 3 cuts at 1/4, 2/4, 3/4 of the phase
    assert [paper.cut_progress(k) for k in range(n)] == pytest.approx([(k + 1) / (n + 1) for k in range(n)])
    assert [early.cut_progress(k) for k in range(n)] == pytest.approx([0.5 * (k + 1) / (n + 1) for k in range(n)])


@pytest.mark.parametrize("method", AIMED)
def test_lambda_rises_while_the_cost_is_over_the_schedule(method, demo_subsets):
    """With the weights never updated, the cost stays at the full one while b falls: the aimed λ
    only grows (a fixed λ does not move); the penalty is λ × the method's term."""
    train, _ = demo_subsets(64)
    batches = random_batches(train, 6)
    model = budgetprune.create_model("lenet5")
    aimed = Pruner(model, batches[0][0], 0.25, method=method, total_steps=6, dataset_size=len(train),
                   method_options={"aim": "budget"})
    weights = []
    for x, y in batches:
        F.cross_entropy(model(x), y) + aimed.penalty()
        aimed.step()  # no optimiser step: nothing is pruned
        weights.append(aimed.method.weight())
    assert all(b > a for a, b in zip(weights[1:], weights[2:]))  # from the second step on b < V_F
    assert aimed.status()["cost/b"] > 1.0
    aimed.finalize()
    fixed = Pruner(budgetprune.create_model("lenet5"), batches[0][0], 0.25, method=method, total_steps=6,
                   dataset_size=len(train), method_options={"aim": "fixed"})
    for x, y in batches:
        fixed.penalty()
        fixed.step()
    assert fixed.method.weight() == fixed.method.lam and "cost/b" not in fixed.status()


def test_the_penalty_is_the_aimed_weight_times_the_term(demo_subsets):
    train, _ = demo_subsets(64)
    batches = random_batches(train, 3)
    model = budgetprune.create_model("lenet5")
    pruner = Pruner(model, batches[0][0], 0.25, method="l0", total_steps=3, dataset_size=len(train))
    for _ in range(2):
        pruner.penalty()
        pruner.step()
    method = pruner.method
    assert method.weight() != method.lam
    assert float(pruner.penalty()) == pytest.approx(method.weight() * float(method.expected_l0()), rel=1e-5)


def test_an_aimed_run_ends_nearer_its_budget_than_a_fixed_one():
    """An MLP on a separable task, l0 at the paper's λ for 60 000 images under a volume budget: the
    cost the method itself keeps when the prune phase ends, over the budget, is near 1 when its
    penalty (the paper's parameter count) is aimed, far over it with the fixed λ (which the final
    projection must then cut at once), and with the default (aimed, the penalty counting the
    budget's own metric) much nearer than with the fixed λ."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2048, 16, generator=g), torch.randn(16, 4, generator=g)
    y = (x @ w).argmax(1)
    batches = [(x[i % 64 * 32:(i % 64 + 1) * 32], y[i % 64 * 32:(i % 64 + 1) * 32]) for i in range(300)]
    before = {}
    for label, options in (("budget", {"metric": "params"}), ("fixed", {"aim": "fixed"}), ("default", {})):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                    torch.nn.ReLU(), torch.nn.Linear(64, 4))
        pruner = Pruner(model, batches[0][0], 0.25, method="l0", total_steps=len(batches), gate_lr=0.05,
                        dataset_size=60000, method_options=options)
        optimizer = torch.optim.Adam(pruner.parameters(lr=1e-3), lr=1e-3)
        pruning_steps(model, pruner, optimizer, batches)
        _, report = pruner.finalize()
        before[label] = report["cost_before_projection"] / pruner.budget.absolute(pruner.graph)
    assert before["fixed"] > 3.0
    assert 0.8 < before["budget"] < 1.3, before
    assert abs(math.log(before["default"])) < 0.5 * math.log(before["fixed"]), before


def test_the_aim_resumes_from_the_method_state(demo_subsets):
    train, _ = demo_subsets(64)
    batches = random_batches(train, 4)
    model = budgetprune.create_model("lenet5")
    pruner = Pruner(model, batches[0][0], 0.25, method="ib", total_steps=4)
    for _ in range(3):
        pruner.penalty()
        pruner.step()
    state = pruner.state_dict()
    assert {"aim.integral", "aim.log_error"} <= set(state["method"])
    other = Pruner(budgetprune.create_model("lenet5"), batches[0][0], 0.25, method="ib", total_steps=4)
    other.load_state_dict(state)
    assert other.method.weight() == pytest.approx(pruner.method.weight())
    older = {"method": {k: v for k, v in state["method"].items() if not k.startswith("aim.")}, "steps": 3}
    fresh = Pruner(budgetprune.create_model("lenet5"), batches[0][0], 0.25, method="ib", total_steps=4)
    fresh.load_state_dict(older)  # saved before λ was aimed: the controller starts afresh
    assert fresh.method.weight() == pytest.approx(fresh.method.lam)


def test_an_aimed_sensitivity_decay_stays_a_shrink(demo_subsets):
    from budgetprune.methods.sensitivity import MAX_DECAY
    train, _ = demo_subsets(64)
    batches = random_batches(train, 2)
    model = budgetprune.create_model("lenet5")
    pruner = Pruner(model, batches[0][0], 0.25, method="sensitivity", total_steps=2)
    pruner.method.aim.integral.fill_(AIM_LIMIT)  # λ·m far above 1
    conv = model.features[0].weight
    start = conv.detach().clone()
    F.cross_entropy(model(batches[0][0]), batches[0][1]) + pruner.penalty()
    pruner.step()
    factor = conv.detach().flatten(1).norm(dim=1) / start.flatten(1).norm(dim=1)
    assert float(factor.min()) >= 1 - MAX_DECAY - 1e-6 and float(factor.max()) <= 1 + 1e-6
    pruner.finalize()


@pytest.mark.parametrize("options, words", [
    ({"aim": "sometimes"}, "aim must be one of budget, fixed"),
    ({"aim_rate": -1.0}, "aim_rate and aim_gain"),
    ({"schedule_end": 2.0}, "schedule end"),
])
def test_bad_aim_options_are_one_line(options, words):
    with pytest.raises(ConfigError, match=words):
        create_method("l0", **options)


def test_the_schedule_end_flag(tmp_path, capsys):
    from budgetprune.cli import main
    code = main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5", "--schedule-end", "0",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schedule end" in err[0]
