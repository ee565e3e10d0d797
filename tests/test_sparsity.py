"""Unstructured (per-weight) pruning, the non-zero-weight budget, sparse model files, method
options, and Continuous Sparsification's ticket search."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import budgetprune
from budgetprune import cli, io
from budgetprune.budget import Budget
from budgetprune.compact import compact
from budgetprune.errors import BudgetError, CheckpointError, ConfigError
from budgetprune.gates import BETA, GAMMA, ZETA
from budgetprune.methods import create_method
from budgetprune.pipeline import PruneConfig, PruneRun
from budgetprune.resources import CostModel
from budgetprune.sparsity import count_kept, density, project_weights, weight_counts

NONZERO = [Budget("nonzero", 0.1)]


def lenet5():
    model = budgetprune.create_model("lenet5")
    return model, budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))


def attached(name, **options):
    model, graph = lenet5()
    method = create_method(name, granularity="weight", **options)
    method.attach(model, graph, NONZERO)
    return model, graph, method


# ---------------------------------------------------------------------------------------
# the nonzero metric
# ---------------------------------------------------------------------------------------
def test_nonzero_metric_counts_conv_and_linear_weights():
    model, graph = lenet5()
    by_hand = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert CostModel(graph, "nonzero").full() == by_hand == sum(weight_counts(model).values())
    # channel pruning: the weights the compacted network keeps
    masks = {g: torch.arange(grp.channels) % 3 == 0 for g, grp in graph.groups.items()}
    net = compact(model, graph, masks)
    kept = sum(m.weight.numel() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert CostModel(graph, "nonzero").hard(masks) == kept


# ---------------------------------------------------------------------------------------
# weight gates
# ---------------------------------------------------------------------------------------
def test_weight_gates_mask_each_weight_and_remove_restores_the_model():
    model, graph = lenet5()
    before = copy.deepcopy(model.state_dict())
    method = create_method("l0", granularity="weight")
    method.attach(model, graph, NONZERO)
    assert set(method.gid_of.values()) == set(weight_counts(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for gate in method.gates.values():
            gate.log_alpha.copy_(torch.randn_like(gate.log_alpha) * 2)
    method.eval()
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
    method.detach()
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    # by hand: every weight times its deterministic gate
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in plain.named_modules():
            if name in method.counts:
                module.weight.mul_(method.gate(name).deterministic().reshape(module.weight.shape))
    with torch.no_grad():
        assert torch.allclose(reference, plain(x), atol=1e-6)


def test_weight_l0_penalty_is_lambda_sum_of_p_nonzero_and_matches_monte_carlo():
    _, _, method = attached("l0", lam=1e-4)
    torch.manual_seed(0)
    with torch.no_grad():
        for gate in method.gates.values():
            gate.log_alpha.copy_(torch.randn_like(gate.log_alpha))
    hand = sum(float(torch.sigmoid(g.log_alpha.detach() - BETA * math.log(-GAMMA / ZETA)).sum()) for g in method.gates.values())
    assert float(method.penalty(0.0).detach()) == pytest.approx(1e-4 * hand, rel=1e-6)
    gate = method.gate("features.0")  # 150 weights: count the non-zero samples
    samples = torch.stack([gate(None).detach() for _ in range(4000)])
    assert float((samples > 0).float().mean(0).sum()) == pytest.approx(float(gate.prob_nonzero().detach().sum()), rel=0.02)


def test_weight_constrained_l0_violation_is_expected_density_minus_target():
    _, _, method = attached("constrained-l0")
    probs = {n: g.prob_nonzero().detach() for n, g in ((method.gid_of[k], g) for k, g in method.gates.items())}
    total = sum(p.numel() for p in probs.values())
    hand = float(sum(p.sum() for p in probs.values())) / total - 0.1
    assert float(method.violations()[0].detach()) == pytest.approx(hand, rel=1e-6)
    layer = create_method("constrained-l0", granularity="weight", targets="layer")
    model, graph = lenet5()
    layer.attach(model, graph, NONZERO)
    assert layer.multipliers.numel() == len(weight_counts(model))
    assert layer.fraction == NONZERO[0].fraction  # single-weight gates: a layer's share is its share of weights


def test_methods_that_prune_only_channels_refuse_weight_granularity():
    with pytest.raises(ConfigError, match="method 'bar' prunes channels only.*l0"):
        PruneConfig(method="bar", granularity="weight").validate()
    with pytest.raises(ConfigError, match="use --metric nonzero"):
        PruneConfig(method="l0", granularity="weight", metric="volume").validate()
    assert PruneConfig(method="cs", granularity="weight").metric == "nonzero"


# ---------------------------------------------------------------------------------------
# the projection onto the budget
# ---------------------------------------------------------------------------------------
def test_projection_keeps_exactly_the_budget_by_score_and_one_weight_per_layer():
    torch.manual_seed(0)
    masks = {"a": torch.rand(40) < 0.8, "b": torch.zeros(3, 5, dtype=torch.bool), "c": torch.rand(30) < 0.9}
    scores = {"a": torch.rand(40), "b": torch.rand(3, 5) - 5.0, "c": torch.rand(30)}
    out = project_weights(masks, scores, limit=20.7)
    assert count_kept(out) == 20 and out["b"].shape == (3, 5)
    assert int(out["b"].sum()) == 1 and bool(out["b"].reshape(-1)[scores["b"].reshape(-1).argmax()])  # the guard
    # the other 19 are the best-scoring among the weights the method kept (sorted independently)
    kept = sorted(((float(scores[n].reshape(-1)[i]), n, i) for n in ("a", "c")
                   for i in torch.nonzero(masks[n].reshape(-1)).flatten().tolist()), reverse=True)
    assert {(n, i) for _, n, i in kept[:19]} == {(n, i) for n in ("a", "c") for i in torch.nonzero(out[n]).flatten().tolist()}
    # under the budget: the best closed weights reopen, up to exactly floor(B); without fill nothing moves
    few = {"a": torch.zeros(40, dtype=torch.bool), "b": torch.zeros(3, 5, dtype=torch.bool),
           "c": torch.zeros(30, dtype=torch.bool)}
    filled = project_weights(few, scores, limit=12.0)
    assert count_kept(filled) == 12
    assert count_kept(project_weights(few, scores, limit=12.0, fill=False)) == 3  # one per layer
    with pytest.raises(BudgetError, match="one weight in each of the 3 layers"):
        project_weights(masks, scores, limit=2.0)


# ---------------------------------------------------------------------------------------
# sensitivity per weight (seed 002)
# ---------------------------------------------------------------------------------------
def test_weight_sensitivity_matches_finite_differences():
    model, graph, method = attached("sensitivity")
    model.double()
    method.double()
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    S = method.sensitivities(model(x))
    w, h = method._weight("features.3"), 1e-6
    for j in (0, 101, 2399):
        with torch.no_grad():
            w.view(-1)[j] += h
            up = torch.softmax(model(x), 1).mean(0)
            w.view(-1)[j] -= 2 * h
            dn = torch.softmax(model(x), 1).mean(0)
            w.view(-1)[j] += h
        hand = float(((up - dn) / (2 * h)).abs().mean())  # (1/C) Σ_k |∂ȳ_k/∂w|
        assert float(S["features.3"][j]) == pytest.approx(hand, rel=1e-5)


def test_weight_sensitivity_update_decays_insensitive_weights_only():
    model, _, method = attached("sensitivity", lam=0.1)
    gate = method.gate("classifier.1")
    gate.sensitivity.fill_(1.0)
    gate.sensitivity[:10] = 0.0  # decay by λ·w
    gate.sensitivity[10:20] = 0.5  # decay by λ·0.5·w
    w = method._weight("classifier.1")
    before = w.detach().clone().reshape(-1)
    method.after_step(0.0)
    after = w.detach().reshape(-1)
    assert torch.allclose(after[:10], 0.9 * before[:10]) and torch.allclose(after[10:20], 0.95 * before[10:20])
    assert torch.equal(after[20:], before[20:])


# ---------------------------------------------------------------------------------------
# Continuous Sparsification: the ticket search (seed 004; the authors' algorithm)
# ---------------------------------------------------------------------------------------
def test_cs_rounds_reset_masks_rewind_weights_and_restart_beta():
    model, graph = lenet5()
    method = create_method("cs", rounds=2, s0=0.1, beta_max=100.0)
    method.attach(model, graph, [Budget("volume", 0.25)])
    start = copy.deepcopy(model.state_dict())
    steps = 10
    assert method.beta(0.0) == 1.0 and method.beta(0.45) == pytest.approx(100.0 ** 0.9)
    assert method.beta(0.5) == 1.0 and method.round_of(0.75) == (1, 0.5)
    for step in range(steps):
        with torch.no_grad():  # stand-in for training: move weights and mask parameters
            for p in model.parameters():
                p.add_(0.01)
            for g in method.gates.values():
                g.s.sub_(0.003 * torch.arange(g.s.numel()))
        s_before = {k: g.s.detach().clone() for k, g in method.gates.items()}
        method.after_step(step / steps)
        if step == 4:  # the next step (progress 0.5) starts round 2
            assert int(method.round) == 1
            for k, g in method.gates.items():
                assert torch.allclose(g.s, torch.clamp(100.0 * s_before[k], max=0.1))
            state = model.state_dict()
            assert all(torch.equal(state[n], start[n]) for n, _ in model.named_parameters())
        elif step < 4:
            assert int(method.round) == 0
    # after the last round the ticket's weights are rewound once more
    state = model.state_dict()
    assert all(torch.equal(state[n], start[n]) for n, _ in model.named_parameters())


@pytest.mark.parametrize("total,rounds", [(14, 2), (36, 3), (24, 2)])
def test_cs_round_ends_exactly_at_the_step_boundary(total, rounds):
    """Step k of T is in round ⌊k·R/T⌋ (whole numbers); float progress k/T must not shift a reset."""
    model, graph = lenet5()
    method = create_method("cs", rounds=rounds)
    method.attach(model, graph, [Budget("volume", 0.25)])
    for k in range(total):
        method.penalty(k / total)
        assert method.round_of(k / total)[0] == int(method.round) == min(k * rounds // total, rounds - 1)
        method.after_step(k / total)
        if k + 1 < total and (k + 1) * rounds // total > k * rounds // total:  # a reset: β restarts at 1
            assert all(float(g.beta) == 1.0 for g in method.gates.values())


def test_cs_next_step_is_recovered_exactly_on_long_runs_and_after_a_resume():
    """80 epochs of 782 steps (seed 001's CIFAR schedule): the saved last progress (an integer
    tick in the method's state) still gives the exact next step."""
    model, graph = lenet5()
    method = create_method("cs", rounds=3)
    method.attach(model, graph, [Budget("volume", 0.25)])
    total = 80 * 782
    for k in (1, 20853, 20854, 41707, total - 2):
        method.after_step((k - 1) / total)
        state = copy.deepcopy(method.state_dict())
        method.load_state_dict(state)  # as after a resume
        last = int(method.last_tick) / 2 ** 52
        assert method.next_progress(last, k / total) == (k + 1) / total


def test_cs_single_round_rewinds_the_ticket_only_with_a_rewind_point():
    for rewind, rewound in ((0.0, False), (0.3, True)):
        model, graph = lenet5()
        method = create_method("cs", rewind=rewind)
        method.attach(model, graph, [Budget("volume", 0.25)])
        for k in range(10):
            if k == 3:
                snap = copy.deepcopy(model.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            method.after_step(k / 10)
        state = model.state_dict()
        same = all(torch.equal(state[n], snap[n] + 1.0) for n, _ in model.named_parameters())
        assert same == rewound  # snapshot after step 3 (progress 0.3), rewound after the last step


def test_cs_rewind_point_is_a_fraction_of_the_first_round():
    model, graph = lenet5()
    method = create_method("cs", rounds=2, rewind=0.4, rewind_ticket=False)
    method.attach(model, graph, [Budget("volume", 0.25)])
    for step in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        if step == 2:  # progress 0.2 = 0.4 of the first round: the snapshot
            snap = copy.deepcopy(model.state_dict())
        method.after_step(step / 10)
    state = model.state_dict()
    # rewound at the end of round 1 (after step 4) to the snapshot, then 5 more steps of +1
    assert all(torch.allclose(state[n], snap[n] + 5.0) for n, _ in model.named_parameters())


def test_cs_gate_starts_at_one_and_keeps_h_over_sigma_s0():
    _, _, method = attached("cs", s0=-0.01)
    gate = next(iter(method.gates.values()))
    assert torch.allclose(gate(None), torch.ones(gate.s.numel()))  # σ(s₀)/σ(s₀) at β = 1
    assert float(gate.deterministic().max()) == pytest.approx(0.0)  # s₀ < 0: nothing kept yet


# ---------------------------------------------------------------------------------------
# sparse model files
# ---------------------------------------------------------------------------------------
def test_sparse_model_file_is_smaller_and_loads_exactly(tmp_path):
    model, _ = lenet5()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_((torch.rand_like(m.weight) < 0.1).float())
    model.eval()
    io.save(model, tmp_path / "sparse.pt", meta={"input_shape": [1, 28, 28]})
    raw = torch.load(tmp_path / "sparse.pt", weights_only=True)
    assert raw["version"] == 3 and set(raw["sparse"]) == {f"{n}.weight" for n in weight_counts(model)}
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert (tmp_path / "sparse.pt").stat().st_size < 0.3 * dense_bytes
    loaded = io.load(tmp_path / "sparse.pt")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert density(loaded) == density(model)
    raw["sparse"]["features.3.weight"]["values"] = raw["sparse"]["features.3.weight"]["values"][:-1]
    torch.save(raw, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged.*1 values|damaged"):
        io.load(tmp_path / "damaged.pt")


# ---------------------------------------------------------------------------------------
# short runs: every per-weight method meets the non-zero-weight budget
# ---------------------------------------------------------------------------------------
FAST = dict(teacher_epochs=1, epochs=2, finetune_epochs=1, lowlr_epochs=0, batch_size=64, progress=False,
            deploy_runtime="none")  # the result's speed is not timed here (tests/test_cli.py times it)


@pytest.mark.parametrize("method,options", [("l0", {}), ("constrained-l0", {}), ("cs", {}),
                                            ("cs", {"rounds": 2}), ("sensitivity", {"every": 4})])
def test_weight_run_meets_the_nonzero_budget_and_stays_sparse(method, options, demo_subsets, tmp_path):
    train, test = demo_subsets(512)
    torch.manual_seed(0)
    net, m = budgetprune.prune(budgetprune.create_model("lenet5"), train, test, budget="10x", method=method,
                               granularity="weight", method_options=options, out=tmp_path / "run", log=None, **FAST)
    total = sum(weight_counts(net).values())
    assert m["metric"] == "nonzero" and m["granularity"] == "weight" and m["full"]["nonzero"] == total
    assert m["pruned"]["nonzero"] <= m["budget"] and 0.95 <= m["budget_ratio"] <= 1.0
    assert m["nonzero_after_finetune"] <= m["pruned"]["nonzero"]  # fine-tuning kept pruned weights at 0
    assert m["reduction_factor"]["volume"] == pytest.approx(1.0)  # dense compute is unchanged
    loaded = io.load(tmp_path / "run" / "model.pt")
    assert sum(v["nonzero"] for v in density(loaded).values()) == m["nonzero_after_finetune"]
    assert m["model_file_bytes"] < 0.4 * 4 * total


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l0", "constrained-l0", "cs", "sensitivity"])
def test_weight_run_on_resnet20_meets_the_nonzero_budget(method, demo_subsets, tmp_path):
    train, test = demo_subsets(192, 64)
    torch.manual_seed(0)
    net, m = budgetprune.prune(budgetprune.create_model("resnet20"), train, test, budget="10x", method=method,
                               granularity="weight", out=tmp_path / "run", log=None, teacher_epochs=0, epochs=1,
                               finetune_epochs=1, lowlr_epochs=0, progress=False, deploy_runtime="none")
    assert m["budget"] * 0.95 <= m["nonzero_after_finetune"] <= m["pruned"]["nonzero"] <= m["budget"]
    assert m["compaction_max_abs_diff"] <= 1e-5 and sum(v["nonzero"] for v in density(net).values()) == \
        m["nonzero_after_finetune"]


def test_weight_run_resumes_with_its_masks(demo_subsets, tmp_path):
    train, test = demo_subsets(256)
    cfg = PruneConfig(budget=0.1, method="l0", granularity="weight", **{**FAST, "finetune_epochs": 2})
    torch.manual_seed(0)
    first = PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, tmp_path / "run", log=lambda s: None).run()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert count_kept(ckpt["weight_masks"]) == first.metrics["pruned"]["nonzero"]
    # back to the state after the first fine-tune epoch, then resume: pruned weights stay 0
    ckpt["stage"], ckpt["epoch"] = "finetune", 1
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    again = PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, tmp_path / "run",
                     log=lambda s: None).run(resume=True)
    assert again.metrics["nonzero_after_finetune"] <= first.metrics["pruned"]["nonzero"]


def test_interrupted_weight_run_resumes_exactly(demo_subsets, tmp_path):
    """Stopped after the first prune epoch and resumed, the run ends with the same weights as
    an uninterrupted one (the gate samples continue the saved random stream)."""
    train, test = demo_subsets(256)

    class Stop(Exception):
        pass

    def run(folder, log=lambda s: None, resume=False):
        cfg = PruneConfig(budget=0.1, method="l0", granularity="weight", **{**FAST, "epochs": 2})
        torch.manual_seed(0)
        return PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, tmp_path / folder, log=log).run(resume)

    def stop(line):
        if line.startswith("[prune] epoch 2/"):  # before epoch 2's checkpoint is written
            raise Stop

    whole = run("a")
    with pytest.raises(Stop):
        run("b", log=stop)
    torch.manual_seed(123)  # the resumed run must not depend on the caller's random state
    resumed = run("b", resume=True)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_epochs_report_the_test_accuracy_of_deterministic_gates(demo_subsets, tmp_path, monkeypatch):
    import budgetprune.pipeline as pipeline
    from budgetprune.gates import HardConcreteGate
    state = {"evaluating": False, "samples_in_eval": 0, "evaluations": 0}
    real_evaluate, real_sample = pipeline.evaluate, HardConcreteGate.sample

    def evaluate(*args, **kw):
        state["evaluating"], state["evaluations"] = True, state["evaluations"] + 1
        try:
            return real_evaluate(*args, **kw)
        finally:
            state["evaluating"] = False

    def sample(self, *args, **kw):
        state["samples_in_eval"] += state["evaluating"]
        return real_sample(self, *args, **kw)

    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    monkeypatch.setattr(HardConcreteGate, "sample", sample)
    train, test = demo_subsets(128)
    budgetprune.prune(budgetprune.create_model("lenet5"), train, test, budget=0.25, method="bar", out=tmp_path / "r",
                      log=None, **{**FAST, "epochs": 1, "teacher_epochs": 0})
    assert state["evaluations"] >= 2 and state["samples_in_eval"] == 0


# ---------------------------------------------------------------------------------------
# method options from the command line
# ---------------------------------------------------------------------------------------
def test_method_options_are_parsed_from_the_command_line(capsys, tmp_path):
    assert cli.parse_method_options(["rounds=3", "kind=specific", 'layer_lam={"features.0": 2}', "beta-max=50.5"]) == \
        {"rounds": 3, "kind": "specific", "layer_lam": {"features.0": 2}, "beta_max": 50.5}
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        cli.parse_method_options(["rounds"])
    PruneConfig(method="cs", method_options={"rewind": 0, "beta_max": 100}).validate()  # ints for floats are fine
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.1", "--method", "bar",
                     "--granularity", "weight", "--out", str(tmp_path / "x")])
    assert code == 2 and "prunes channels only" in capsys.readouterr().err


@pytest.mark.parametrize("method,options,message", [
    ("cs", {"targets": "layer"}, "method 'cs' has no option.*targets.*it takes.*rounds"),
    ("cs", {"rounds": "x=2"}, "option rounds must be an integer.*not 'x=2'"),
    ("cs", {"rewind_ticket": 1}, "option rewind_ticket must be true or false"),
    ("cs", {"rounds": 0}, "method 'cs': cs needs rounds ≥ 1"),
    ("l0", {"granularity": "weight"}, "granularity are run settings: set --granularity"),
    ("cs", {"lam": 0.01}, "lam are run settings: set --lam"),
    ("l0", {"layer_lam": 3}, "option layer_lam must be a JSON object"),
    ("l0", {"metric": 5}, "option metric must be a text"),
])
def test_bad_method_options_fail_validation(method, options, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(method=method, method_options=options).validate()


def test_layer_lambda_of_a_missing_layer_fails_before_any_training(demo_subsets, tmp_path):
    train, test = demo_subsets(64)
    cfg = PruneConfig(method="l0", method_options={"layer_lam": {"nope": 2.0}}, teacher_epochs=3)
    with pytest.raises(ConfigError, match="layer_lam names layers the model does not have: nope.*features.0"):
        PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_config_json_round_trips_method_options_and_granularity():
    cfg = PruneConfig(method="cs", granularity="weight", method_options={"rounds": 2})
    again = PruneConfig.from_dict(json.loads(json.dumps(cfg.__dict__)))
    assert again.method_options == {"rounds": 2} and again.granularity == "weight" and again.metric == "nonzero"
