"""The method zoo: each method's math against an independent computation, and short runs
on the embedded data that end within the budget."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import budgetprune
from budgetprune import cli, latency
from budgetprune.budget import (Budget, enforce_budget, fill_budget, parse_budgets, reopenable_channels, uniform_share,
                               uniform_widths)
from budgetprune.errors import BudgetError, ConfigError
from budgetprune.gates import GUARD_GATE, GaussianGate, SigmoidGate
from budgetprune.methods import available_methods, create_method
from budgetprune.methods.folding import filters, reader_columns
from budgetprune.methods.gated import still_open
from budgetprune.methods.interpolative import interpolative_decomposition
from budgetprune.objectives import dual_ascent
from budgetprune.resources import CostModel


def lenet5_graph():
    model = budgetprune.create_model("lenet5")
    return model, budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))


def attached(name, budgets=(Budget("volume", 0.25),), **options):
    model, graph = lenet5_graph()
    method = create_method(name, **options)
    method.attach(model, graph, list(budgets))
    return model, graph, method


def set_log_alpha(method, value_or_fn):
    torch.manual_seed(3)
    with torch.no_grad():
        for gate in method.gates.values():
            v = value_or_fn(gate.num_channels) if callable(value_or_fn) else value_or_fn
            gate.log_alpha.copy_(torch.as_tensor(v, dtype=gate.log_alpha.dtype).expand_as(gate.log_alpha))


# ---------------------------------------------------------------------------------------
# registry and options
# ---------------------------------------------------------------------------------------
def test_registry_lists_the_methods():
    assert set(available_methods()) == {"bar", "l0", "constrained-l0", "cs", "sensitivity", "ib", "morphnet",
                                        "random", "magnitude", "vq", "id"}


def test_unknown_option_names_the_method_and_its_options():
    with pytest.raises(ConfigError, match="method 'l0' has no option.*dual_lr"):
        create_method("l0", dual_lr=0.1)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        create_method("nope")


def test_shared_settings_are_taken_only_where_they_apply():
    m = create_method("l0", shared={"dual_lr": 0.5, "dataset_size": 500, "lam": None, "gate_lr": 0.02})
    assert m.lam == pytest.approx(0.1 / 500) and m.gate_lr == 0.02
    c = create_method("constrained-l0", shared={"dual_lr": 0.5, "dataset_size": 500, "lam": 3.0})
    assert c.dual_lr == 0.5


# ---------------------------------------------------------------------------------------
# the dual step (seed 003)
# ---------------------------------------------------------------------------------------
def test_dual_ascent_by_hand():
    lam = torch.tensor([0.0, 0.5, 0.1, 2.0])
    g = torch.tensor([0.3, -0.2, -5.0, 0.0])
    out = dual_ascent(lam, g, 0.5)
    assert out.tolist() == pytest.approx([0.15, 0.4, 0.0, 2.0])


def test_multiplier_rises_while_violated_and_stays_nonnegative():
    _, _, method = attached("constrained-l0", dual_lr=0.1)
    set_log_alpha(method, 5.0)  # every gate open: expected volume ≈ full, far over 0.25
    seen = []
    for _ in range(5):
        method.penalty(0.0)
        method.after_step(0.0)
        seen.append(float(method.multipliers[0]))
    assert all(b > a for a, b in zip([0.0] + seen, seen))
    set_log_alpha(method, -8.0)  # every gate (nearly) closed: the constraint holds with room
    for _ in range(200):
        method.penalty(1.0)
        method.after_step(1.0)
        assert float(method.multipliers.min()) >= 0.0
    assert float(method.multipliers[0]) == 0.0


def test_constrained_l0_violation_is_expected_cost_fraction_minus_target():
    """g = E[V]/V_F − ε, E[V] checked against a Monte Carlo mean of hard volumes."""
    _, graph, method = attached("constrained-l0")
    set_log_alpha(method, lambda n: torch.randn(n))
    g = float(method.violations().detach()[0])
    cm = CostModel(graph, "volume")
    probs = method.by_group(lambda gate: gate.prob_nonzero().detach())
    torch.manual_seed(5)
    mc = sum(cm.hard({k: torch.rand_like(p) < p for k, p in probs.items()}) for _ in range(3000)) / 3000
    assert g == pytest.approx(mc / cm.full() - 0.25, abs=3e-3)


def test_constrained_l0_layer_targets_one_multiplier_per_layer():
    budget = Budget("flops", 0.25)
    _, graph, method = attached("constrained-l0", budgets=(budget,), targets="layer", dual_lr=1.0)
    share = uniform_share(graph, budget)
    assert 0.4 < share < 1  # a layer's FLOPs scale with the channels it reads and those it writes
    assert method.fraction == share
    limit, cm = budget.absolute(graph), CostModel(graph, "flops")

    def thinned(extra):  # the first round(share·C) + extra channels of every layer (LeNet-5: no tied ones)
        out = {}
        for gid, g in graph.groups.items():
            keep = torch.zeros(g.channels, dtype=torch.bool)
            keep[:min(g.channels, max(1, round(share * g.channels)) + extra)] = True
            out[gid] = keep
        return out
    assert cm.hard(thinned(0)) <= limit < cm.hard(thinned(1))
    set_log_alpha(method, 5.0)
    assert method.multipliers.numel() == len(graph.groups)
    g = method.violations()
    p_open = float(method.gate(next(iter(graph.groups))).prob_nonzero().detach()[0])
    assert g.tolist() == pytest.approx([p_open - share] * len(graph.groups), rel=1e-6)
    method.penalty(0.0)
    method.after_step(0.0)
    assert method.multipliers.tolist() == pytest.approx([p_open - share] * len(graph.groups), rel=1e-6)


def _mlp_params(widths):
    """Parameters of Linear layers of the given widths, counted by building them."""
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    return sum(p.numel() for layer in layers for p in layer.parameters())


def test_uniform_share_is_the_largest_common_share_of_channels_within_the_budget():
    """Against networks built by hand: keeping round(s·50) of both hidden layers of a 10-50-50-10
    MLP fits a third of its parameters, one channel more in both does not (25 channels: s = 0.5,
    near √(1/3) since the 50×50 layer holds most parameters, far from 1/3)."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 50), torch.nn.ReLU(), torch.nn.Linear(50, 50), torch.nn.ReLU(),
                                torch.nn.Linear(50, 10))
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 10))
    assert sorted(g.channels for g in graph.groups.values()) == [50, 50]
    limit = _mlp_params([10, 50, 50, 10]) / 3
    share = uniform_share(graph, Budget("params", 1 / 3))
    k = round(share * 50)
    assert _mlp_params([10, k, k, 10]) <= limit < _mlp_params([10, k + 1, k + 1, 10])
    assert k == 25
    assert uniform_share(graph, [Budget("params", 1 / 3), Budget("params", 0.2)]) < share  # every budget holds
    assert uniform_share(graph, Budget("params", 1.0)) == 1.0
    assert uniform_share(graph, Budget("params", 1e-4)) == 1 / 50  # not even one channel each: one of the widest


def _grouped_params(k0, k2, k4):
    """Parameters of the grouped network below with k0 of 4, k2 of 6 channels per conv group (4
    groups) and k4 of 8 channels, counted by building it."""
    layers = [torch.nn.Conv2d(2, 4 * k0, 3), torch.nn.Conv2d(4 * k0, 4 * k2, 3, groups=4),
              torch.nn.Conv2d(4 * k2, k4, 1), torch.nn.Linear(k4, 3)]
    return sum(p.numel() for layer in layers for p in layer.parameters())


def test_uniform_share_of_a_grouped_convolution_counts_channels_per_conv_group():
    """A conv read by a grouped conv (4 groups) keeps the same share of each conv group: s is the
    largest share at which round(s·4), round(s·6) and round(s·8) channels per conv group fit the
    budget, against networks built by hand; a hair more and one of them rounds up past it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 24, 3, padding=1, groups=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(24, 8, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 2, 8, 8))
    assert sorted((g.channels, g.units) for g in graph.groups.values()) == [(8, 8), (16, 4), (24, 6)]
    assert _grouped_params(4, 6, 8) == sum(p.numel() for p in model.parameters())

    def params(share):
        return _grouped_params(*(max(1, round(share * units)) for units in (4, 6, 8)))
    for fraction in (0.3, 0.5):
        share = uniform_share(graph, Budget("params", fraction))
        limit = fraction * _grouped_params(4, 6, 8)
        assert params(share) <= limit < params(share + 1e-6)


def test_constrained_l0_lagrangian_gradient_pushes_gates_closed():
    _, _, method = attached("constrained-l0")
    set_log_alpha(method, 1.0)
    method.multipliers.fill_(2.0)
    method.penalty(0.0).backward()
    assert all(bool((g.log_alpha.grad > 0).all()) for g in method.gates.values())


# ---------------------------------------------------------------------------------------
# penalised L0 (Louizos et al.)
# ---------------------------------------------------------------------------------------
def test_l0_penalty_is_lambda_times_expected_parameters_by_hand():
    """LeNet-5 gates conv1 (20), conv2 (50) and fc1 (500); with every P(z>0) = p the expected
    parameter count is each layer's k²·E[n_in]·E[n_out] + per-output terms."""
    _, graph, method = attached("l0", lam=1e-3, aim="fixed")  # fixed λ: the paper's parameter count
    set_log_alpha(method, 0.7)
    p = float(method.gate("features.0").prob_nonzero().detach()[0])
    widths = {gid: g.channels for gid, g in graph.groups.items()}
    c1, c2, f1 = widths["features.0"], widths["features.3"], widths["classifier.1"]

    def hand(p):
        return (25 * 1 * c1 * p + c1 * p) + (25 * c1 * p * c2 * p + c2 * p) \
            + (16 * c2 * p * f1 * p + f1 * p) + (f1 * p * 10 + 10)
    model = budgetprune.create_model("lenet5")
    assert hand(1.0) == sum(q.numel() for q in model.parameters())  # the formula covers every weight
    hand = hand(p)
    assert float(method.penalty(0.0).detach()) == pytest.approx(1e-3 * hand, rel=1e-5)


def test_l0_default_lambda_is_a_tenth_over_n_and_layer_lambda_weights():
    assert create_method("l0", dataset_size=60000).lam == pytest.approx(0.1 / 60000)
    _, _, plain = attached("l0", lam=1.0, metric="params")
    _, graph, weighted = attached("l0", lam=1.0, metric="params", layer_lam={"classifier.1": 3.0})
    for m in (plain, weighted):
        set_log_alpha(m, 0.0)
    cm = CostModel(graph, "params")
    probs = plain.by_group(lambda g: g.prob_nonzero().detach())
    fc1 = [t for t in cm.terms if t.name == "classifier.1"][0]
    n_in = float(probs["features.3"].sum()) * fc1.in_expansion
    extra = 2.0 * fc1.cost(n_in, float(probs["classifier.1"].sum()))
    assert float(weighted.penalty(0.0).detach()) == pytest.approx(float(plain.penalty(0.0).detach()) + extra, rel=1e-6)
    with pytest.raises(ConfigError, match="layer_lam names layers"):
        attached("l0", layer_lam={"nope": 1.0})


def test_aimed_l0_counts_the_budgets_metric_in_parameter_units():
    """Aimed (the default), the penalty is λ·E[C]·P_F/C_F in the budget's metric (the average over
    several budgets); under a parameter budget, or with fixed λ, it is the paper's E[‖θ‖₀]."""
    def penalty(method):
        set_log_alpha(method, lambda n: torch.linspace(-1.0, 2.0, n))
        return float(method.penalty(0.0).detach())

    _, graph, volume = attached("l0", lam=1.0)
    set_log_alpha(volume, lambda n: torch.linspace(-1.0, 2.0, n))
    probs = volume.by_group(lambda g: g.prob_nonzero().detach())
    params_cm, volume_cm, flops_cm = (CostModel(graph, m) for m in ("params", "volume", "flops"))
    p_full = params_cm.full()
    e_volume = float(volume_cm.expected(probs)) * p_full / volume_cm.full()
    e_flops = float(flops_cm.expected(probs)) * p_full / flops_cm.full()
    e_params = float(params_cm.expected(probs))
    assert penalty(volume) == pytest.approx(e_volume, rel=1e-5)
    assert e_volume != pytest.approx(e_params, rel=1e-2)  # the two counts differ at these gates
    _, _, both = attached("l0", lam=1.0, budgets=(Budget("volume", 0.25), Budget("flops", 0.25)))
    assert penalty(both) == pytest.approx((e_volume + e_flops) / 2, rel=1e-5)
    for options, budgets in (({"aim": "fixed"}, (Budget("volume", 0.25),)), ({}, (Budget("params", 0.25),)),
                             ({"metric": "params"}, (Budget("volume", 0.25),))):
        _, _, method = attached("l0", lam=1.0, budgets=budgets, **options)
        assert penalty(method) == pytest.approx(e_params, rel=1e-5)
    _, _, named = attached("l0", lam=1.0, aim="fixed", metric="flops")
    assert penalty(named) == pytest.approx(e_flops, rel=1e-5)


def test_l0_penalty_gradient_matches_finite_differences():
    _, _, method = attached("l0", lam=1e-2)
    method.double()
    set_log_alpha(method, lambda n: torch.randn(n))
    method.penalty(0.0).backward()
    gate = method.gate("features.3")
    h = 1e-5
    with torch.no_grad():
        gate.log_alpha[4] += h
        up = float(method.penalty(0.0))
        gate.log_alpha[4] -= 2 * h
        dn = float(method.penalty(0.0))
        gate.log_alpha[4] += h
    assert float(gate.log_alpha.grad[4]) == pytest.approx((up - dn) / (2 * h), rel=1e-6)


# ---------------------------------------------------------------------------------------
# Information Bottleneck (Dai et al.)
# ---------------------------------------------------------------------------------------
def test_gaussian_gate_init_and_samples_match_mu_sigma():
    torch.manual_seed(0)
    gate = GaussianGate(4000)
    mu, log_sigma = gate.mu.detach(), gate.log_sigma.detach()
    assert abs(float(mu.mean()) - 1.0) < 1e-3 and abs(float(mu.std()) - 0.01) < 1e-3
    assert abs(float(log_sigma.mean()) + 9.0) < 1e-3 and abs(float(log_sigma.std()) - 0.01) < 1e-3
    small = GaussianGate(3)
    with torch.no_grad():
        small.mu.copy_(torch.tensor([0.5, -1.0, 2.0]))
        small.log_sigma.copy_(torch.log(torch.tensor([0.25, 0.5, 3.0])))
    z = small(200_000).detach()
    assert torch.allclose(z.mean(0), small.mu.detach(), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([0.25, 0.5, 3.0]), rtol=0.01)
    small.eval()
    assert small().tolist() == pytest.approx([0.5, -1.0, 0.0])  # μ²/σ² = 4, 4, 4/9: the last is pruned


def test_ib_prior_is_area_weighted_log_one_plus_snr_by_hand():
    _, graph, method = attached("ib", lam=2e-3)
    with torch.no_grad():
        for gid, g in graph.groups.items():
            method.gate(gid).mu.fill_(0.5)
            method.gate(gid).log_sigma.fill_(math.log(0.25))
    # log(1 + 0.25 / 0.0625) = log 5 per channel; areas 24·24, 8·8 and 1 (LeNet-5 on 28×28)
    hand = math.log(5.0) * (576 * 20 + 64 * 50 + 1 * 500)
    assert float(method.penalty(0.0).detach()) == pytest.approx(2e-3 * hand, rel=1e-6)


def test_ib_prior_gradient_matches_finite_differences():
    _, _, method = attached("ib", lam=1.0)
    method.double()
    torch.manual_seed(2)
    with torch.no_grad():
        for g in method.gates.values():
            g.mu.copy_(torch.randn_like(g.mu))
            g.log_sigma.copy_(torch.randn_like(g.log_sigma))
    method.penalty(0.0).backward()
    gate, h = method.gate("features.3"), 1e-6
    for p in (gate.mu, gate.log_sigma):
        with torch.no_grad():
            p[7] += h
            up = float(method.penalty(0.0))
            p[7] -= 2 * h
            dn = float(method.penalty(0.0))
            p[7] += h
        assert float(p.grad[7]) == pytest.approx((up - dn) / (2 * h), rel=1e-5)


def test_ib_guard_keeps_one_channel_of_a_protected_group():
    _, _, method = attached("ib")
    with torch.no_grad():
        for g in method.gates.values():
            g.log_sigma.fill_(3.0)  # every SNR ≪ 1: everything pruned
    method.after_step(0.5)
    assert all(int(g.keep_mask().sum()) == 1 for g in method.gates.values())


# ---------------------------------------------------------------------------------------
# MorphNet (Gordon et al.)
# ---------------------------------------------------------------------------------------
def test_morphnet_channel_costs_by_hand():
    _, _, vol = attached("morphnet")
    w = vol.channel_costs()
    assert torch.allclose(w["features.0"], torch.full((20,), 576.0)) and torch.allclose(w["features.3"],
                                                                                          torch.full((50,), 64.0))
    _, _, fl = attached("morphnet", metric="flops")
    w = fl.channel_costs()
    # conv1 channel: its own 24²·5²·1 MACs plus the 8²·5²·50 MACs conv2 spends reading it
    assert torch.allclose(w["features.0"], torch.full((20,), 576.0 * 25 + 64.0 * 25 * 50))
    # fc1 unit: 800 inputs, plus the 10 outputs reading it
    assert torch.allclose(w["classifier.1"], torch.full((500,), 800.0 + 10.0))


def test_morphnet_penalty_is_cost_weighted_l1_and_uses_batchnorm_gamma():
    _, graph, method = attached("morphnet", lam=1e-3)
    full_volume = CostModel(graph, "volume").full()
    # every γ = 1: the gated part of V_F (all but the 10 ungated output units)
    assert float(method.penalty(0.0).detach()) == pytest.approx(1e-3 * (full_volume - 10))
    model = budgetprune.create_model("resnet20")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    method = create_method("morphnet", lam=1.0)
    method.attach(model, graph, [Budget("volume", 0.25)])
    bn = dict(model.named_modules())["layer1.0.bn1"]
    gate = method.gate("layer1.0.conv1")
    assert gate.gamma is bn.weight and method.param_groups(1e-3) == []
    with torch.no_grad():
        bn.weight[:3] = torch.tensor([-0.5, 0.005, 2.0])
    assert gate.keep_mask()[:3].tolist() == [True, False, True]
    method.penalty(0.0).backward()
    w = method.channel_costs()["layer1.0.conv1"]
    assert bn.weight.grad[:3].tolist() == pytest.approx((w[:3] * torch.tensor([-1.0, 1.0, 1.0])).tolist())


def test_still_open_by_hand():
    is_open = torch.tensor([True, True, False, True, True])
    strength = torch.tensor([0.5, 0.005, 0.9, 0.02, 0.001])
    assert still_open(is_open, strength, 0.01, 1).tolist() == [True, False, False, True, False]
    # every open unit fallen: the guard keeps the need strongest open ones (never the closed 0.9)
    fallen = torch.tensor([0.003, 0.005, 0.9, 0.001, 0.002])
    assert still_open(is_open, fallen, 0.01, 2).tolist() == [True, True, False, False, False]
    assert still_open(is_open, fallen, 0.01, 0).tolist() == [False] * 5
    # per-weight units come as a weight's shape: the same rule over all of them
    assert still_open(is_open[:4].view(2, 2), fallen[:4].view(2, 2), 0.01, 2).tolist() == [[True, True], [False, False]]
    assert still_open(is_open, fallen, 0.01, 9).tolist() == [True, True, False, True, True]  # fewer open than need


@pytest.mark.parametrize("permanent", [True, False])
def test_morphnet_closes_a_fallen_channel_for_good(permanent):
    """A γ at the threshold closes its channel: its factor is 0 from then on and it stays pruned when
    γ grows back; counted only (``permanent=False``) it is kept again."""
    model = budgetprune.create_model("resnet20")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    method = create_method("morphnet", permanent=permanent)
    method.attach(model, graph, [Budget("volume", 0.25)])
    bn = dict(model.named_modules())["layer1.0.bn1"]
    gate = method.gate("layer1.0.conv1")
    with torch.no_grad():
        bn.weight[:3] = torch.tensor([-0.5, 0.005, -0.008])
    method.after_step(0.1)
    closed = [False, True, True] if permanent else [False, False, False]
    assert (gate().detach()[:3] == 0).tolist() == closed
    with torch.no_grad():
        bn.weight[:3] = 1.0
    method.after_step(0.2)
    assert gate.keep_mask()[:3].tolist() == [not c for c in closed]


def test_morphnet_guard_keeps_an_open_channel_of_a_protected_layer():
    _, graph, method = attached("morphnet")
    gate = method.gate("features.0")  # LeNet-5's first conv: no BatchNorm, a scale of its own, protected
    with torch.no_grad():
        gate.own.copy_(torch.linspace(0.001, 0.009, 20))
        gate.own[5] = 0.5
    method.after_step(0.1)
    assert gate.open.tolist() == [1.0 if i == 5 else 0.0 for i in range(20)]
    with torch.no_grad():
        gate.own[5] = 0.002  # the last open one falls too: it stays open, lifted over the threshold
    method.after_step(0.2)
    assert gate.keep_mask().tolist() == [i == 5 for i in range(20)]
    assert float(gate.own[5].detach()) == GUARD_GATE  # lifted to carry its signal, not to just over 0.01


def test_a_morphnet_state_saved_before_channels_closed_loads():
    _, _, method = attached("morphnet")
    state = {k: v for k, v in method.state_dict().items() if not k.endswith(".open")}
    _, _, other = attached("morphnet")
    other.gate("features.0").open.zero_()
    other.load_state_dict(state)
    assert all(bool((g.open == 1).all()) for g in other.gates.values())


# ---------------------------------------------------------------------------------------
# Continuous Sparsification (seed 004)
# ---------------------------------------------------------------------------------------
def test_cs_mask_tends_to_the_heaviside_step_as_beta_grows():
    gate = SigmoidGate(4)
    with torch.no_grad():
        gate.s.copy_(torch.tensor([-0.5, -0.05, 0.05, 0.5]))
    step = torch.tensor([0.0, 0.0, 1.0, 1.0])
    gaps = []
    for beta in (1.0, 10.0, 50.0, 200.0, 1000.0):
        gate.beta.fill_(beta)
        gaps.append(float((gate.soft().detach() - step).abs().max()))
    assert all(b < a for a, b in zip(gaps, gaps[1:]))
    assert gaps[0] == pytest.approx(1.0 / (1.0 + math.exp(0.05)), rel=1e-6)  # σ(−0.05): the worst channel
    assert gaps[-1] == pytest.approx(1.0 / (1.0 + math.exp(50.0)), rel=1e-6)  # σ(−1000·0.05)
    assert gate.keep_mask().tolist() == [False, False, True, True]
    assert gate.deterministic().tolist() == (2.0 * step).tolist()  # H(s)/σ(s₀), σ(0) = ½


def test_cs_beta_schedule_and_penalty_by_hand():
    _, graph, method = attached("cs", lam=0.01, beta_max=200.0)
    assert method.beta(0.0) == 1.0 and method.beta(1.0) == pytest.approx(200.0)
    assert method.beta(0.5) == pytest.approx(200.0 ** 0.5)
    with torch.no_grad():
        for g in method.gates.values():
            g.s.fill_(0.02)
    n = sum(g.channels for g in graph.groups.values())
    pen = float(method.penalty(0.5).detach())
    assert pen == pytest.approx(0.01 * n / (1.0 + math.exp(-0.02 * 200.0 ** 0.5)), rel=1e-6)
    assert all(float(g.beta) == pytest.approx(200.0 ** 0.5) for g in method.gates.values())


# ---------------------------------------------------------------------------------------
# sensitivity-driven regularisation (seed 002), channel-level
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unspecific", "specific"])
def test_sensitivity_matches_finite_differences(kind):
    model, graph, method = attached("sensitivity", kind=kind)
    model.double()
    method.double()
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    S = method.sensitivities(model(x))
    with torch.no_grad():
        pred = torch.softmax(model(x), 1).argmax(1)
    gate, h = method.gate("features.3"), 1e-6
    for c in (0, 7, 31):
        with torch.no_grad():
            gate.mask[c] += h
            up = torch.softmax(model(x), 1)
            gate.mask[c] -= 2 * h
            dn = torch.softmax(model(x), 1)
            gate.mask[c] += h
        d = (up - dn) / (2 * h)  # (batch, classes): ∂y_k/∂z_c per example
        if kind == "unspecific":
            hand = float(d.mean(0).abs().mean())
        else:
            hand = sum(float((pred == k).double().mean()) * abs(float(d[pred == k, k].mean())) for k in pred.unique())
        assert float(S["features.3"][c]) == pytest.approx(hand, rel=1e-5)


def test_sensitivity_update_decays_insensitive_channels_only():
    model, graph, method = attached("sensitivity", lam=0.1)
    plain = copy.deepcopy(model)
    conv = model.features[3]
    gate = method.gate("features.3")
    gate.sensitivity.fill_(1.0)
    gate.sensitivity[0] = 0.0   # insensitive: decays by λ · w
    gate.sensitivity[1] = 0.25  # decays by λ · 0.75 · w
    for net in (model, plain):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        torch.manual_seed(0)
        net(torch.randn(4, 1, 28, 28)).square().mean().backward()
        opt.step()
    method.after_step(0.0)
    ref = plain.features[3]
    assert torch.allclose(conv.weight[0], 0.9 * ref.weight[0]) and torch.allclose(conv.bias[0], 0.9 * ref.bias[0])
    assert torch.allclose(conv.weight[1], (1 - 0.075) * ref.weight[1])
    assert torch.equal(conv.weight[2:], ref.weight[2:])  # S = 1: exactly the plain step


def test_sensitivity_prunes_filters_that_shrank_below_the_threshold():
    model, _, method = attached("sensitivity", threshold=0.05)
    with torch.no_grad():
        model.features[0].weight[3] *= 0.01
        model.features[0].bias[3] *= 0.01
    keep = method.keep_masks()["features.0"]
    assert not bool(keep[3]) and int(keep.sum()) == 19


@pytest.mark.parametrize("permanent", [True, False])
def test_sensitivity_decay_spares_the_strongest_filter_of_a_protected_layer(permanent):
    """The fatal-pruning guard for the decay: every channel insensitive (S = 0) at λ = 0.5, each step
    halves every filter; every LeNet-5 layer is protected (every path crosses it). The step that would
    take a layer's last filters under the threshold (0.05 of their starting norms: after 5 halvings)
    spares the one strongest relative to its start, which stays at 0.5⁴ of it and stays kept. Closed
    for good (the default), the others stop decaying once under the threshold (after 5 halvings)."""
    model, graph, method = attached("sensitivity", lam=0.5, threshold=0.05, aim="fixed", permanent=permanent)
    assert all(g.min_keep == 1 for g in graph.groups.values())
    for gate in method.gates.values():
        gate.sensitivity.fill_(0.0)
    conv = model.features[0]
    with torch.no_grad():  # channel 0 of the first convolution: the strongest relative to its start
        conv.weight[1:] *= 0.9
        conv.bias[1:] *= 0.9
    start = method.gate("features.0").start_norm.clone()
    for _ in range(8):
        method.after_step(0.0)
    keep = method.keep_masks()
    assert keep["features.0"].tolist() == [True] + [False] * 19
    relative = method.filter_norms("features.0") / start
    assert float(relative[0]) == pytest.approx(0.5 ** 4, rel=1e-5)
    assert float(relative[1:].max()) == pytest.approx(0.9 * 0.5 ** (5 if permanent else 8), rel=1e-5)
    assert all(int(m.sum()) == 1 for m in keep.values())  # one filter per layer, never none


def test_sensitivity_closes_a_fallen_channel_for_good():
    """A filter under the threshold closes its mask: the channel's output is 0 from then on, and it
    stays pruned when the optimiser lifts the filter back over the threshold; counted only
    (``permanent=False``) it is kept again."""
    for permanent in (True, False):
        model, _, method = attached("sensitivity", threshold=0.05, lam=0.0, aim="fixed", permanent=permanent)
        conv, gate = model.features[0], method.gate("features.0")
        with torch.no_grad():
            conv.weight[3] *= 0.01
            conv.bias[3] *= 0.01
        method.after_step(0.0)
        assert gate.mask.tolist() == [1.0] * 3 + [0.0 if permanent else 1.0] + [1.0] * 16
        with torch.no_grad():
            conv.weight[3] *= 100.0
            conv.bias[3] *= 100.0
        method.after_step(0.0)
        assert bool(method.keep_masks()["features.0"][3]) is not permanent


def test_a_closed_channel_behind_a_batchnorm_stops_passing_its_signal():
    """Why the threshold closes the mask: behind a BatchNorm (training mode, batch statistics) a filter
    decayed to 5 % of its start (under a threshold of 10 %) still passes its full, renormalised signal; once closed, the network's
    output is that of the same network with the channel's BatchNorm output set to 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(8, 1, 8, 8)
    graph = budgetprune.ChannelGraph.build(model, x[:1])
    reference = copy.deepcopy(model)
    method = create_method("sensitivity", lam=0.0, aim="fixed", threshold=0.1)
    method.attach(model, graph, [Budget("volume", 0.5)])
    with torch.no_grad():
        before = model(x)
        model[0].weight[1] *= 0.05
        model[0].bias[1] *= 0.05
        assert torch.allclose(model(x), before, atol=1e-3)  # the BatchNorm undid the decay
        reference[0].weight[1] *= 0.05
        reference[0].bias[1] *= 0.05
    method.after_step(0.0)
    assert method.gate(next(iter(graph.groups))).mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    reference[1].register_forward_hook(lambda m, i, out: out * torch.tensor([1.0, 0.0, 1.0, 1.0]).view(1, 4, 1, 1))
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)
        assert not torch.allclose(model(x), before, atol=1e-3)


# ---------------------------------------------------------------------------------------
# the iterative baselines (seed 001, supplement 3.2)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation,low", [("uniform", 0.8), ("global", 0.95)])
def test_iterative_cuts_halve_the_volume_at_evenly_spaced_points(allocation, low):
    _, graph, method = attached("magnitude", budgets=[Budget("volume", 0.125)], allocation=allocation)
    cm = CostModel(graph, "volume")
    full = cm.full()
    assert method.fractions == [[0.5], [0.25], [0.125]]
    assert [method.cut_progress(k) for k in range(3)] == [0.25, 0.5, 0.75]
    seen, previous = [], method.keep_masks()
    for step in range(101):
        method.after_step(step / 100)
        masks = method.keep_masks()
        for gid in masks:  # a pruned channel never comes back
            assert not bool((masks[gid] & ~previous[gid]).any())
        previous = masks
        seen.append(cm.hard(masks) / full)
    assert seen[24] == 1.0
    for step, target in ((25, 0.5), (50, 0.25), (75, 0.125)):
        assert low * target <= seen[step] <= target, (step, seen[step])
    assert seen[100] == seen[75] and int(method.cuts_done) == 3


def test_uniform_widths_scale_every_layer_alike_and_keep_the_best():
    _, graph = lenet5_graph()
    torch.manual_seed(4)
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    full = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    out = uniform_widths(graph, full, scores, Budget("volume", 0.3))
    cm = CostModel(graph, "volume")
    assert cm.hard(out) <= 0.3 * cm.full()
    ratios = [int(out[g].sum()) / graph.groups[g].channels for g in out]
    assert max(ratios) - min(ratios) <= max(1.0 / graph.groups[g].channels for g in out) + 1e-9
    for gid in out:
        assert float(scores[gid][out[gid]].min()) >= float(scores[gid][~out[gid]].max())


class _TwoWriterStream(torch.nn.Module):
    """conv ``a`` writes an 8-channel residual stream and conv ``c`` (after ``b``) adds into it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        s = torch.relu(self.a(x))
        s = s + self.c(torch.relu(self.b(s)))
        return self.head(s.mean((2, 3)))


def test_writers_of_a_residual_stream_rank_its_slots_by_their_summed_scores():
    """Hand-worked: ``a`` and ``c`` write the same 8 slots; each slot is scored by the sum of the two
    writers' scores, ``b`` (no shared slot) keeps its own. Thinned to a budget with
    ``joint_streams``, both writers keep the same slots, the best by that sum, so the stream is as
    narrow as each of them; ranked each by its own scores (the default) they keep different
    channels and the stream stays wider."""
    from budgetprune.budget import slot_scores

    model = _TwoWriterStream()
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 8, 8))
    by_host = {g.host: gid for gid, g in graph.groups.items()}
    a, b, c = by_host["a"], by_host["b"], by_host["c"]
    scores = {a: torch.tensor([8., 1., 7., 2., 6., 3., 5., 4.]), c: torch.tensor([0., 9., 0., 9., 0., 0., 0., 0.]),
              b: torch.arange(8.)}
    scores.update({gid: torch.ones(g.channels) for gid, g in graph.groups.items() if gid not in scores})
    joint = slot_scores(graph, scores)
    summed = torch.tensor([8., 10., 7., 11., 6., 3., 5., 4.])
    assert torch.equal(joint[a], summed) and torch.equal(joint[c], summed) and torch.equal(joint[b], scores[b])
    full = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    out = uniform_widths(graph, full, scores, Budget("volume", 0.5), joint_streams=True)
    k = int(out[a].sum())
    assert 1 <= k < 8 and torch.equal(out[a], out[c])  # the same slots: the stream is k wide
    assert set(torch.nonzero(out[a]).flatten().tolist()) == set(torch.argsort(summed, descending=True)[:k].tolist())
    assert CostModel(graph, "volume").hard(out) <= 0.5 * CostModel(graph, "volume").full()
    apart = uniform_widths(graph, full, scores, Budget("volume", 0.5))  # the default: each layer its own
    assert int(apart[a].sum()) == int(apart[c].sum()) and not torch.equal(apart[a], apart[c])
    assert int((apart[a] | apart[c]).sum()) > int(apart[a].sum())  # the stream keeps the union: wider
    with pytest.raises(ConfigError, match="method 'magnitude': streams must be 'joint'"):
        create_method("magnitude", streams="both")
    with pytest.raises(ConfigError, match="streams='joint' ranks the channels of the uniform allocation"):
        create_method("random", streams="joint", allocation="global")
    assert create_method("magnitude").streams == "apart"
    method = create_method("magnitude", streams="joint")
    method.attach(model, graph, [Budget("volume", 0.5)])
    method.after_step(1.0)  # every cut, ranked by the stream's summed filter magnitudes
    kept = method.keep_masks()
    assert torch.equal(kept[a].cpu(), kept[c].cpu()) and int(kept[a].sum()) < 8


def test_iterative_steps_option_spaces_fractions_geometrically():
    _, _, method = attached("random", budgets=[Budget("volume", 0.1)], steps=2)
    assert [f[0] for f in method.fractions] == pytest.approx([0.1 ** 0.5, 0.1])


def test_magnitude_scores_are_mean_absolute_filter_weights():
    model, graph, method = attached("magnitude")
    w = model.features[3].weight.detach()
    hand = torch.tensor([float(w[i].abs().sum()) / w[i].numel() for i in range(w.shape[0])])
    assert torch.allclose(method.scores()["features.3"], hand, rtol=1e-6)
    method.after_step(1.0)  # every cut
    keep, score = method.keep_masks()["features.3"], method.scores()["features.3"]
    assert bool(keep.any()) and bool((~keep).any())
    assert float(score[keep].min()) >= float(score[~keep].max())  # the largest filters stay


def test_magnitude_scores_mlp_inputs_by_their_columns():
    model = budgetprune.create_model("lenet300")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28), gate_inputs=True)
    method = create_method("magnitude")
    method.attach(model, graph, [Budget("volume", 0.25)])
    inputs = [gid for gid, g in graph.groups.items() if g.position == "input"]
    assert len(inputs) == 1
    host = dict(model.named_modules())[graph.groups[inputs[0]].host]
    assert torch.allclose(method.scores()[inputs[0]], host.weight.detach().abs().mean(dim=0), rtol=1e-6)


def test_vq_merges_repeated_filters_into_exactly_the_target_width_without_changing_the_function():
    """conv1 of LeNet-5 with 5 distinct filters, each repeated 4 times: quantised to 5 channels,
    the centres are those filters and conv2 sums the merged inputs, so the outputs are equal."""
    model, graph, method = attached("vq")
    torch.manual_seed(0)
    conv1 = model.features[0]
    with torch.no_grad():
        base_w, base_b = torch.randn(5, 1, 5, 5), torch.randn(5)
        order = torch.randperm(20) % 5
        conv1.weight.copy_(base_w[order])
        conv1.bias.copy_(base_b[order])
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    kept = method.reduce_group("features.0", torch.arange(20), 5)
    assert len(kept) == 5 and len(set(order[kept].tolist())) == 5  # one channel per distinct filter
    keep = torch.zeros(20, dtype=torch.bool)
    keep[kept] = True
    method.gate("features.0").set(keep)
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before, atol=1e-4)


def test_vq_cut_keeps_exactly_the_uniform_width_of_every_layer():
    _, graph, method = attached("vq", budgets=[Budget("volume", 0.5)])
    scores = method.channel_scores()
    full = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    target = uniform_widths(graph, full, scores, Budget("volume", 0.5))
    method.after_step(1.0)
    got = method.keep_masks()
    assert {g: int(m.sum()) for g, m in got.items()} == {g: int(m.sum()) for g, m in target.items()}


def test_interpolative_decomposition_reconstructs_a_low_rank_layer_exactly():
    """A 6-unit linear layer of rank 3 followed by a linear layer: ID keeps 3 units, folds the
    interpolation matrix forward, and the network computes exactly what it did."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    with torch.no_grad():
        rows = torch.randn(6, 3) @ torch.randn(3, 9)  # (6, 9): weights and bias of rank 3
        model[0].weight.copy_(rows[:, :8])
        model[0].bias.copy_(rows[:, 8])
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 8))
    method = create_method("id")
    method.attach(model, graph, [Budget("volume", 0.5)])
    w = filters(model[0]).double().numpy()
    rows_kept, p = interpolative_decomposition(w, 3)
    assert len(rows_kept) == 3 and abs(p @ w[rows_kept] - w).max() < 1e-5 * abs(w).max()  # float32 weights
    assert abs(p[rows_kept] - torch.eye(3).numpy()).max() < 1e-12
    x = torch.randn(16, 8)
    with torch.no_grad():
        before = model(x)
    kept = method.reduce_group("0", torch.arange(6), 3)
    keep = torch.zeros(6, dtype=torch.bool)
    keep[kept] = True
    method.gate("0").set(keep)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)


def test_folding_refuses_a_residual_sum():
    model = budgetprune.create_model("resnet20")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    assert reader_columns(graph, "layer1.0.conv2") is None  # writes the residual signal with others
    assert reader_columns(graph, "layer1.0.conv1") is not None


def test_random_scores_are_fixed_and_seeded():
    torch.manual_seed(1)
    _, _, a = attached("random")
    torch.manual_seed(1)
    _, _, b = attached("random")
    first = a.scores()
    assert all(torch.equal(first[g], b.scores()[g]) for g in first)
    a.after_step(1.0)
    assert all(torch.equal(first[g], a.scores()[g]) for g in first)


# ---------------------------------------------------------------------------------------
# short runs on the embedded data: every method ends within the budget
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_small(demo_subsets):
    return demo_subsets(512)


FAST = dict(teacher_epochs=1, epochs=2, finetune_epochs=1, lowlr_epochs=0, batch_size=64, progress=False,
            deploy_runtime="none")  # the result's speed is not timed here (tests/test_cli.py times it)


@pytest.mark.parametrize("method", ["l0", "constrained-l0", "cs", "sensitivity", "ib", "morphnet", "random",
                                    "magnitude", "vq", "id"])
def test_short_run_ends_within_budget(method, demo_small, tmp_path):
    train, test = demo_small
    torch.manual_seed(0)
    _, m = budgetprune.prune(budgetprune.create_model("lenet5"), train, test, budget="4x", method=method,
                             out=tmp_path / "run", log=None, **FAST)
    assert m["method"] == method
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9 and 0.95 <= m["budget_ratio"] <= 1.0
    assert m["compaction_max_abs_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bar", "l0", "constrained-l0", "cs",
                                    "sensitivity", "ib", "morphnet", "random", "magnitude", "vq", "id"])
def test_every_method_prunes_resnet20_within_budget(method, demo_small, tmp_path):
    train, test = demo_small
    torch.manual_seed(0)
    _, m = budgetprune.prune(budgetprune.create_model("resnet20"), train.subset(torch.arange(192)),
                             test.subset(torch.arange(64)), budget="4x", method=method, out=tmp_path / "run", log=None,
                             teacher_epochs=0, epochs=1, finetune_epochs=0, lowlr_epochs=0, batch_size=64,
                             progress=False, deploy_runtime="none")
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9 and 0.95 <= m["budget_ratio"] <= 1.0
    assert m["compaction_max_abs_diff"] <= 1e-4


# ---------------------------------------------------------------------------------------
# several budgets at once
# ---------------------------------------------------------------------------------------
def test_parse_budgets_forms_and_errors():
    assert parse_budgets("0.25", "flops") == [Budget("flops", 0.25)]
    assert parse_budgets("volume=4x, flops=20%") == [Budget("volume", 0.25), Budget("flops", 0.2)]
    for bad, msg in (("volume=0.25,volume=0.3", "twice"), ("volume=0.25,flops", "METRIC=VALUE"),
                     ("speed=0.5", "unknown metric"), ("volume=2", "strictly between")):
        with pytest.raises(BudgetError, match=msg):
            parse_budgets(bad)


def test_bar_run_with_two_budgets_meets_both(demo_small, tmp_path):
    train, test = demo_small
    torch.manual_seed(0)
    _, m = budgetprune.prune(budgetprune.create_model("lenet5"), train, test, budget="volume=0.3,flops=0.1",
                             out=tmp_path / "run", log=None, **FAST)
    ratios = {k: v["ratio"] for k, v in m["budgets"].items()}
    assert set(ratios) == {"volume", "flops"} and max(ratios.values()) <= 1.0 and max(ratios.values()) >= 0.95
    assert m["pruned"]["flops"] <= 0.1 * m["full"]["flops"] + 1e-6


def test_cli_rejects_a_malformed_budget_list(capsys, tmp_path):
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "volume=0.25,flops",
                     "--out", str(tmp_path / "r")])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "METRIC=VALUE" in err


# ---------------------------------------------------------------------------------------
# the latency budget
# ---------------------------------------------------------------------------------------
def test_latency_fit_recovers_a_bilinear_timer_exactly(monkeypatch):
    def fake_time(module, repeats, device=None):
        n_in, n_out = (module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) \
            else (module.in_channels, module.out_channels)
        return 0.002 * n_in * n_out + 0.05 * n_out

    monkeypatch.setattr(latency, "runner", lambda module, x, runtime: module)  # timed by its widths
    monkeypatch.setattr(latency, "median_ms", fake_time)
    spec = {"kind": "conv", "in": 20, "out": 50, "spatial": [12, 12], "batch": 1, "bias": True,
            "depthwise": False, "kernel": [5, 5], "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
    fit = latency.measure_layer(spec, torch.device("cpu"), repeats=1)
    assert len(fit["table"]) == 16
    assert fit["c_io"] == pytest.approx(0.002, rel=1e-9) and fit["c_out"] == pytest.approx(0.05, rel=1e-9)


def test_latency_budget_times_its_layers_at_the_deployment_batch(monkeypatch, tmp_path):
    """deploy_batch: every layer of the table is timed at that batch (its own cache entries); the
    default is one example; anything but a whole number ≥ 1 is refused in one line."""
    monkeypatch.setenv("BUDGETPRUNE_CACHE", str(tmp_path))
    batches = []
    monkeypatch.setattr(latency, "measure_layer", lambda spec, device, repeats=20, runtime="eager": (
        batches.append(spec["batch"]) or {"table": [], "c_io": 1e-3 * spec["batch"], "c_out": 0.01}))
    x = torch.randn(2, 1, 28, 28)
    for batch in (1, 16):
        del batches[:]
        pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), x, "latency=0.5", total_steps=1,
                                    method="magnitude", **({} if batch == 1 else {"deploy_batch": batch}))
        assert batches == [batch] * 4 and pruner.graph.latency_batch == pruner.deploy_batch == batch
        assert pruner.deploy_example().shape == (batch, 1, 28, 28)
        assert torch.equal(pruner.deploy_example()[-1], x[0])
    for bad in (0, 2.0, True):
        with pytest.raises(ConfigError, match="deploy_batch must be a whole number"):
            budgetprune.Pruner(budgetprune.create_model("lenet5"), x, "flops=0.5", total_steps=1, deploy_batch=bad)


def test_latency_table_is_cached_per_device(monkeypatch, tmp_path):
    monkeypatch.setenv("BUDGETPRUNE_CACHE", str(tmp_path))
    calls = []

    def fake_measure(spec, device, repeats=20, runtime="eager"):
        calls.append(spec["out"])
        return {"table": [], "c_io": 1e-3 * spec["out"], "c_out": 0.01}

    monkeypatch.setattr(latency, "measure_layer", fake_measure)
    _, graph = lenet5_graph()
    first = latency.layer_coefficients(graph)
    assert sorted(calls) == [10, 20, 50, 500] and set(first) == set(graph.layers)
    again = latency.layer_coefficients(graph)
    assert again == first and len(calls) == 4  # nothing measured twice
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert list(cache) == [latency.device_name(torch.device("cpu"))]
    # the latency cost is the fitted bilinear form: by hand for the full LeNet-5
    hand = (1e-3 * 20 * 1 * 20 + 0.01 * 20) + (1e-3 * 50 * 20 * 50 + 0.01 * 50) \
        + (1e-3 * 500 * 800 * 500 + 0.01 * 500) + (1e-3 * 10 * 500 * 10 + 0.01 * 10)
    assert CostModel(graph, "latency").full() == pytest.approx(hand, rel=1e-9)
    # another runtime has its own table
    latency.layer_coefficients(graph, runtime="onnxruntime")
    assert len(calls) == 8
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert sorted(cache) == sorted([latency.device_name(torch.device("cpu")),
                                    latency.device_name(torch.device("cpu"), "onnxruntime")])
    assert latency.device_name(torch.device("cpu"), "onnxruntime").startswith("onnxruntime:")


@pytest.mark.parametrize("runtime", ["torchscript", "onnxruntime"])
def test_latency_table_measured_in_a_deployment_runtime(runtime):
    spec = {"kind": "conv", "in": 16, "out": 32, "spatial": [8, 8], "batch": 1, "bias": False,
            "depthwise": False, "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    fit = latency.measure_layer(spec, torch.device("cpu"), repeats=3, runtime=runtime)
    assert len(fit["table"]) == 16 and all(ms > 0 for _, _, ms in fit["table"])
    assert fit["c_io"] >= 0 and fit["c_out"] >= 0 and fit["c_io"] + fit["c_out"] > 0


def test_pruner_under_an_onnxruntime_latency_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETPRUNE_CACHE", str(tmp_path))
    model = budgetprune.create_model("lenet5")
    x = torch.randn(4, 1, 28, 28)
    pruner = budgetprune.Pruner(model, x, "latency:onnxruntime=0.5", total_steps=1, method="magnitude",
                                block="regular")
    small, report = pruner.finalize(x)
    limit = pruner.budget.absolute(pruner.graph)
    assert report["pruned"]["latency:onnxruntime"] <= limit
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert list(cache) == [latency.device_name(torch.device("cpu"), "onnxruntime")]
    with pytest.raises(ConfigError, match="unknown runtime"):
        latency.layer_coefficients(pruner.graph, runtime="tensorrt")


@pytest.mark.parametrize("damaged", ['[1, 2]', '{"%s": [1]}', '{"%s": {"KEY": {"c_io": "x", "c_out": 1}}}',
                                     '{"%s": {"KEY": {"c_io": -1, "c_out": 1}}}', '{"%s": {"KEY": {}}}'])
def test_damaged_latency_cache_is_measured_again(damaged, monkeypatch, tmp_path):
    """A cache file that is not the table budgetprune writes is never fatal: its entries are measured again."""
    monkeypatch.setenv("BUDGETPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "measure_layer", lambda spec, device, repeats=20, runtime="eager":
                        {"table": [], "c_io": 1.0, "c_out": 2.0})
    _, graph = lenet5_graph()
    name = latency.device_name(torch.device("cpu"))
    key = json.dumps(latency._layer_spec(graph, graph.layers["features.0"], graph.gm.get_submodule("features.0"), 1),
                     sort_keys=True)
    text = damaged.replace("%s", name) if "%s" in damaged else damaged
    (tmp_path / "latency.json").write_text(text.replace('"KEY"', json.dumps(key)))
    coefficients = latency.layer_coefficients(graph)
    assert set(coefficients.values()) == {(1.0, 2.0)}


def test_short_run_under_a_measured_latency_budget(demo_small, tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETPRUNE_CACHE", str(tmp_path / "cache"))
    train, test = demo_small
    torch.manual_seed(0)
    _, m = budgetprune.prune(budgetprune.create_model("lenet5"), train, test, budget="2x", metric="latency",
                             out=tmp_path / "run", log=None, **{**FAST, "deploy_runtime": "eager", "deploy_batch": 3})
    assert m["metric"] == "latency" and m["pruned"]["latency"] <= m["budget"] + 1e-9
    assert 0.9 <= m["budget_ratio"] <= 1.0 and (tmp_path / "cache" / "latency.json").exists()
    # the deployment's batch: the table's layers and the result's deployed speed are timed at it
    (table,) = json.loads((tmp_path / "cache" / "latency.json").read_text()).values()
    assert {json.loads(key)["batch"] for key in table} == {3}
    assert m["deployed"]["runtime"] == "eager" and m["deployed"]["batch"] == 3


@pytest.mark.parametrize("model_name", ["tiny_mobilenetv2", "resnet20"])
def test_regular_block_projection_removes_residual_slots_from_every_writer(model_name):
    """With regular blocks one writer of a residual slot saves nothing alone: the projection
    must take the slot from all writers together to reach a tight budget."""
    model = budgetprune.create_model(model_name)
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    full = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    torch.manual_seed(0)
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    budget = Budget("volume", 0.25)
    budget.check_reachable(graph, "regular")
    out = enforce_budget(graph, full, scores, budget, mode="regular")
    cm = CostModel(graph, "volume", "regular")
    assert 0.95 * budget.absolute(graph) <= cm.hard(out) <= budget.absolute(graph)


def test_fill_reopens_a_residual_writer_only_where_its_slot_is_alive():
    model = budgetprune.create_model("resnet20")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    # residual channel 5 of stage 1: closed in every writer (stem and the three blocks' conv2)
    writers = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    for gid in writers:
        masks[gid][5] = False
    masks["layer1.1.conv2"][7] = False  # channel 7: closed here only, alive through the others
    masks["layer1.0.conv1"][2] = False  # a sole writer
    allowed = reopenable_channels(graph, masks)
    assert not any(bool(allowed[g][5]) for g in writers)
    assert bool(allowed["layer1.1.conv2"][7]) and bool(allowed["layer1.0.conv1"][2])
    assert int(sum(int(a.sum()) for a in allowed.values())) == 2
    cm = CostModel(graph, "volume")
    out = fill_budget(graph, masks, {g: torch.ones(m.numel()) for g, m in masks.items()},
                      Budget("volume", 0.999999), reopenable=allowed)
    assert not any(bool(out[g][5]) for g in writers) and bool(out["layer1.1.conv2"][7])
    assert cm.hard(out) <= 0.999999 * cm.full()


def test_runtime_latency_budget_is_tightened_until_the_timed_network_meets_it(monkeypatch):
    """The table says the budget holds; the timed network says it does not: the projection runs
    again to a shrunk budget until the measured latency is within it."""
    from budgetprune import measured, resources

    monkeypatch.setattr(resources, "layer_coefficients", lambda graph, runtime="eager": {
        name: (1e-3, 0.0) for name in graph.layers})  # the table: per input × output channel, no area
    batches = set()

    def timed(unpruned, net, example, runtime, repeats=30):  # the network's time: its MACs and 0.2 ms for the rest
        batches.add(example.shape[0])
        counted = {name: CostModel(budgetprune.ChannelGraph.build(m, example), "flops").full()
                   for name, m in (("unpruned", unpruned), ("pruned", net))}
        ms = {f"{name}_ms": 0.2 + cost * 1e-6 for name, cost in counted.items()}
        return {**ms, "ratio": ms["pruned_ms"] / ms["unpruned_ms"]}

    monkeypatch.setattr(measured, "deployed_speed", timed)
    model = budgetprune.create_model("lenet5")
    x = torch.randn(4, 1, 28, 28)
    lines = []
    with pytest.raises(ConfigError, match="cannot use mixed blocks"):
        budgetprune.Pruner(model, x, "latency:onnxruntime=0.5", total_steps=1, block="mixed")
    pruner = budgetprune.Pruner(model, x, "latency:onnxruntime=0.5", total_steps=1, method="magnitude",
                                block="regular", log=lines.append, deploy_batch=5)
    small, report = pruner.finalize(x)
    assert batches == {5} and report["measured_latency"]["batch"] == 5  # timed at the deployment's batch
    tries = report["measured_latency"]["tries"]
    # the network returned is the try kept, compacted with that try's padding (not the last projection's)
    kept = tries[report["measured_latency"]["kept_try"]]["measured"]["latency:onnxruntime"]["ratio"]
    assert timed(budgetprune.create_model("lenet5"), small, torch.zeros(5, 1, 28, 28), "onnxruntime")["ratio"] == \
        pytest.approx(kept)
    assert len(tries) >= 2  # the first projection measured over its budget
    first, last = tries[0]["measured"]["latency:onnxruntime"], tries[-1]["measured"]["latency:onnxruntime"]
    assert first["ratio"] > 0.5 and measured.BAND[0] <= last["ratio"] / 0.5 <= measured.BAND[1]  # aimed inside [0.9, 1]
    assert tries[-1]["projected_to"]["latency:onnxruntime"] < 0.5
    assert any("of the budget" in line for line in lines)


def test_a_latency_budget_is_timed_against_the_model_itself(monkeypatch):
    """The unpruned network the tries are timed against is the model as the user has it, not its
    compaction with every channel kept, which runs a ShuffleNet's channel shuffles as gathers (7 %
    faster than the model in onnxruntime, so the search ended at 0.83–0.88 of its budget when the
    result was timed against the model)."""
    from budgetprune import measured, resources
    from budgetprune.ops import select_channels
    from test_shuffle_split import TinyShuffleNet

    monkeypatch.setattr(resources, "layer_coefficients", lambda graph, runtime="eager": {
        name: (1e-3, 0.0) for name in graph.layers})
    references = []

    def timed(unpruned, net, example, runtime, repeats=30):
        references.append(unpruned)
        return {"unpruned_ms": 1.0, "pruned_ms": 0.45, "ratio": 0.45}

    monkeypatch.setattr(measured, "deployed_speed", timed)
    torch.manual_seed(0)
    model = TinyShuffleNet()
    original = copy.deepcopy(model).eval()
    x = torch.randn(4, 3, 8, 8)
    pruner = budgetprune.Pruner(model, x, "latency:onnxruntime=0.5", total_steps=1, method="magnitude",
                                block="regular")
    pruner.finalize(x)
    (reference,) = {id(r): r for r in references}.values()  # one unpruned network for every try
    targets = [n.target for n in reference.graph.nodes]
    assert select_channels not in targets and targets == [n.target for n in pruner.graph.gm.graph.nodes]
    with torch.no_grad():
        assert torch.equal(reference(x), original(x))  # no gates: the pruner's hooks are not in it


def test_a_run_reports_the_measured_latency_beside_its_budget(demo_small, tmp_path, monkeypatch):
    """metrics.json keeps finalize's timed projections (the one kept, met or not) and report.md puts
    the kept network's measured latency next to the budget."""
    from budgetprune import measured, resources

    monkeypatch.setattr(resources, "layer_coefficients", lambda graph, runtime="eager": {
        name: (1e-3, 0.0) for name in graph.layers})

    def timed(unpruned, net, example, runtime, repeats=30):  # the network's time: its MACs and 0.2 ms for the rest
        counted = {name: CostModel(budgetprune.ChannelGraph.build(m, example), "flops").full()
                   for name, m in (("unpruned", unpruned), ("pruned", net))}
        ms = {f"{name}_ms": 0.2 + cost * 1e-6 for name, cost in counted.items()}
        return {**ms, "ratio": ms["pruned_ms"] / ms["unpruned_ms"]}

    monkeypatch.setattr(measured, "deployed_speed", timed)
    train, test = demo_small
    torch.manual_seed(0)
    _, m = budgetprune.prune(budgetprune.create_model("lenet5"), train, test, budget="2x",
                             metric="latency:onnxruntime", out=tmp_path / "run", log=None,
                             **{**FAST, "block": "regular", "deploy_runtime": "none"})
    record = m["measured_latency"]
    kept = record["tries"][record["kept_try"]]["measured"]["latency:onnxruntime"]
    assert record["met"] and record["measured_over_budget"] == pytest.approx(kept["ratio"] / 0.5)
    assert record["measured_over_budget"] <= 1.0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["measured_latency"]["kept_try"] == record["kept_try"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"**{kept['ratio'] / 0.5:.3f} of the budget** 0.5" in report


def test_other_budgets_are_not_timed(monkeypatch):
    from budgetprune import measured

    monkeypatch.setattr(measured, "deployed_speed", lambda *a, **k: pytest.fail("timed a flops budget"))
    model = budgetprune.create_model("lenet5")
    x = torch.randn(4, 1, 28, 28)
    _, report = budgetprune.Pruner(model, x, "flops=0.5", total_steps=1, method="magnitude").finalize(x)
    assert "measured_latency" not in report
