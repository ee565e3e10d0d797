"""Formula tests: Hard Concrete gates, the BAR barrier, budget schedules, distillation,
resource counts and budgets.

Every formula is checked against an independent computation written in the test itself
(Monte Carlo sampling, finite differences, hand-worked numbers from the paper, seed 001),
never against the library's own code path.
"""

from __future__ import annotations

import math

import pytest
import torch

import budgetprune
from budgetprune.budget import Budget, enforce_budget, fill_budget, parse_budget
from budgetprune.errors import BudgetError, ConfigError
from budgetprune.gates import HardConcreteGate
from budgetprune.methods.bar import BAR
from budgetprune.objectives import (
    BudgetSchedule,
    barrier,
    distillation_loss,
    exponential_transition,
    linear_transition,
    sigmoid_transition,
)
from budgetprune.resources import CostModel, resource_report

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def lenet5_graph():
    model = budgetprune.create_model("lenet5")
    return model, budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))


def full_masks(graph):
    return {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}


# ---------------------------------------------------------------------------------------
# 1. Hard Concrete
# ---------------------------------------------------------------------------------------
LOG_ALPHAS = [-3.0, -1.0, 0.0, 0.5, 2.0]
N_MC = 400_000


@pytest.fixture(scope="module")
def hc_samples():
    torch.manual_seed(0)
    gate = HardConcreteGate(len(LOG_ALPHAS))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(LOG_ALPHAS))
        z = gate.sample(batch_size=N_MC)
    return gate, z


def test_hc_samples_in_unit_interval(hc_samples):
    _, z = hc_samples
    assert z.shape == (N_MC, len(LOG_ALPHAS))
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    # Both end points carry real mass and the interior too (the Hard Concrete shape).
    for j in range(len(LOG_ALPHAS)):
        col = z[:, j]
        assert ((col > 0) & (col < 1)).float().mean() > 0.05


@pytest.mark.parametrize("j", range(len(LOG_ALPHAS)))
def test_hc_point_masses_match_monte_carlo(hc_samples, j):
    gate, z = hc_samples
    col = z[:, j]
    p0_mc = float((col == 0).double().mean())
    p1_mc = float((col == 1).double().mean())
    pnz_mc = float((col > 0).double().mean())
    p0, p1, pnz = (float(gate.prob_zero().detach()[j]), float(gate.prob_one().detach()[j]),
                   float(gate.prob_nonzero().detach()[j]))
    for p_lib, p_mc in ((p0, p0_mc), (p1, p1_mc), (pnz, pnz_mc)):
        se = math.sqrt(max(p_lib * (1 - p_lib), 1e-6) / N_MC)
        assert abs(p_lib - p_mc) < 4 * se, (LOG_ALPHAS[j], p_lib, p_mc)


@pytest.mark.parametrize("log_alpha", LOG_ALPHAS)
def test_hc_point_masses_match_paper_cdf(log_alpha):
    """P(z=0) = Q_BC(−γ/(ζ−γ)), P(z=1) = 1 − Q_BC((1−γ)/(ζ−γ)) with the paper's CDF (supp. Eq. 3)."""
    def q_bc(s):  # Sigmoid((log s − log(1 − s)) β − log α)
        return sig((math.log(s) - math.log(1 - s)) * BETA - log_alpha)

    gate = HardConcreteGate(1)
    with torch.no_grad():
        gate.log_alpha.fill_(log_alpha)
    p0 = q_bc(-GAMMA / (ZETA - GAMMA))
    p1 = 1.0 - q_bc((1 - GAMMA) / (ZETA - GAMMA))
    assert float(gate.prob_zero()) == pytest.approx(p0, abs=1e-6)
    assert float(gate.prob_one()) == pytest.approx(p1, abs=1e-6)
    assert float(gate.prob_nonzero()) == pytest.approx(1.0 - p0, abs=1e-6)


def test_hc_symmetric_point_masses_at_log_alpha_zero(hc_samples):
    """At log α = 0 the stretch is symmetric, so P(z=0) = P(z=1).

    The paper's supplement 7.1 quotes ≈ 0.23 for this value, but with β = 2/3 (the value it
    also states) the exact mass is σ(β·log(1/11)) = σ(−1.5986) ≈ 0.168, which the Monte Carlo
    below confirms; 0.23 is what β = 1/2 gives (checked in the next test).
    """
    gate, z = hc_samples
    j = LOG_ALPHAS.index(0.0)
    p0, p1 = float(gate.prob_zero().detach()[j]), float(gate.prob_one().detach()[j])
    assert p0 == pytest.approx(p1, abs=1e-6)
    assert p0 == pytest.approx(1.0 / (1.0 + 11.0 ** (2.0 / 3.0)), abs=1e-6)  # σ((2/3) log(1/11))
    assert p0 == pytest.approx(0.1682, abs=1e-4)
    col = z[:, j]
    assert float((col == 0).double().mean()) == pytest.approx(float((col == 1).double().mean()), abs=0.004)


def test_hc_paper_value_023_corresponds_to_beta_half():
    torch.manual_seed(1)
    gate = HardConcreteGate(1, beta=0.5)
    with torch.no_grad():
        gate.log_alpha.zero_()
        z = gate.sample(batch_size=N_MC)
    p0_mc = float((z == 0).double().mean())
    p1_mc = float((z == 1).double().mean())
    assert p0_mc == pytest.approx(0.23, abs=0.005)
    assert p1_mc == pytest.approx(0.23, abs=0.005)
    assert float(gate.prob_zero()) == pytest.approx(p0_mc, abs=0.004)


@pytest.mark.parametrize("log_alpha", [-3.0, -2.4, -2.39, -1.0, 0.0, 0.7, 2.0, 3.0])
def test_hc_deterministic_gate_by_hand(log_alpha):
    gate = HardConcreteGate(1)
    with torch.no_grad():
        gate.log_alpha.fill_(log_alpha)
    expected = min(max(sig(log_alpha) * 1.2 - 0.1, 0.0), 1.0)
    got = float(gate.deterministic())
    assert got == pytest.approx(expected, abs=1e-6)
    threshold = math.log(1.0 / 11.0)  # σ(log α)·1.2 − 0.1 = 0  ⇔  σ(log α) = 1/12
    if log_alpha < threshold:
        assert got == 0.0
        assert not bool(gate.keep_mask())
    else:
        assert got > 0.0
        assert bool(gate.keep_mask())
    gate.eval()
    assert float(gate()) == pytest.approx(expected, abs=1e-6)


def test_hc_deterministic_open_threshold():
    gate = HardConcreteGate(2)
    t = math.log(1.0 / 11.0)
    assert gate.open_threshold() == pytest.approx(t, abs=1e-9)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([t - 1e-4, t + 1e-4]))
    d = gate.deterministic()
    assert float(d[0]) == 0.0 and float(d[1]) > 0.0


def test_hc_sample_is_reparametrised():
    gate = HardConcreteGate(3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    torch.manual_seed(5)
    z = gate.sample(batch_size=1000)
    z.sum().backward()
    g = gate.log_alpha.grad.clone()
    assert torch.isfinite(g).all() and (g > 0).all()
    # Finite differences of the paper's inverse CDF with the same noise u (same seed).
    torch.manual_seed(5)
    u = torch.rand((1000, 3)).clamp(1e-6, 1 - 1e-6).double()
    la = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)

    def total(log_alpha):
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1).sum(dim=0)

    h = 1e-4
    for j in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = h
        fd = float((total(la + e) - total(la - e))[j]) / (2 * h)
        assert float(g[j]) == pytest.approx(fd, rel=1e-2)


def test_hc_sample_reproduces_paper_icdf():
    """sample() equals the paper's inverse CDF (supp. Eq. 4) applied to the same uniform noise."""
    gate = HardConcreteGate(4)
    la = torch.tensor([-2.0, -0.3, 0.4, 1.5])
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    torch.manual_seed(11)
    z = gate.sample(batch_size=500).detach()
    torch.manual_seed(11)
    eps = torch.rand(500, 4).clamp(1e-6, 1 - 1e-6)
    s = 1.0 / (1.0 + torch.exp(-(torch.log(eps) - torch.log(1 - eps) + la) / BETA))
    expected = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
    assert torch.allclose(z, expected, atol=1e-5)


def test_keep_at_least_one_opens_highest_when_all_closed():
    torch.manual_seed(2)
    gate = HardConcreteGate(10)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(10) - 8.0)
    before = gate.log_alpha.detach().clone()
    assert not gate.keep_mask().any()
    gate.keep_at_least_one()
    mask = gate.keep_mask()
    assert int(mask.sum()) == 1
    assert int(torch.nonzero(mask)) == int(torch.argmax(before))
    others = torch.arange(10) != int(torch.argmax(before))
    assert torch.equal(gate.log_alpha.detach()[others], before[others])


def test_keep_at_least_one_noop_when_one_is_at_least_half_open():
    gate = HardConcreteGate(6)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-5.0, -4.0, 0.2, -6.0, -3.0, -1.0]))  # ẑ(0.2) = 0.56
    before = gate.log_alpha.detach().clone()
    gate.keep_at_least_one()
    assert torch.equal(gate.log_alpha.detach(), before)


def test_keep_at_least_one_lifts_a_faintly_open_best_channel_to_half():
    """The guard's clamp keeps the channel with a gate that carries its signal: ẑ = ½ by hand is
    σ(log α) = (½ + 0.1)/1.2 = ½, log α = 0; a channel open at ẑ ≈ 0.001 (just above the threshold,
    where the guard used to clamp) is lifted there, the others untouched."""
    gate = HardConcreteGate(4)
    faint = gate.open_threshold() + 1e-2
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-5.0, faint, -3.0, -7.0]))
    z = float(gate.deterministic()[1])
    assert 0.0 < z < 1e-3  # open, by a thousandth: σ′ at the threshold is (1/12)(11/12)
    assert z == pytest.approx((1 / 12) * (11 / 12) * 0.01 * 1.2, rel=0.01)
    gate.keep_at_least_one()
    assert float(gate.log_alpha[1]) == pytest.approx(0.0, abs=1e-12)
    assert float(gate.deterministic()[1]) == pytest.approx(0.5, abs=1e-6)
    assert torch.equal(gate.log_alpha.detach()[[0, 2, 3]], torch.tensor([-5.0, -3.0, -7.0]))
    assert gate.log_alpha_of(0.25) == pytest.approx(math.log((0.35 / 1.2) / (0.85 / 1.2)), abs=1e-12)


def test_hc_init_within_0_and_001():
    torch.manual_seed(3)
    gate = HardConcreteGate(5000)
    la = gate.log_alpha.detach()
    assert float(la.min()) >= 0.0 and float(la.max()) <= 0.01
    assert float(la.std()) > 1e-3  # actually uniform, not a constant
    _, graph = lenet5_graph()
    bar = BAR()
    bar.attach(budgetprune.create_model("lenet5"), graph, [Budget("volume", 0.25)])
    for g in bar.gates.values():
        assert float(g.log_alpha.min()) >= 0.0 and float(g.log_alpha.max()) <= 0.01


# ---------------------------------------------------------------------------------------
# 2. Barrier
# ---------------------------------------------------------------------------------------
def paper_f(V, a, b):
    return (V - a) ** 2 / ((b - V) * (b - a))


@pytest.mark.parametrize("V,expected", [(11.0, 1.0 / 12.0), (12.0, 0.5), (13.0, 2.25), (10.4, 0.16 / 14.4)])
def test_barrier_hand_values(V, expected):
    # a = 10, b = 14: c = 0.25, 0.5, 0.75, 0.1 — all below the knee 0.9.
    assert barrier(V, 10.0, 14.0) == pytest.approx(expected, rel=1e-12)
    assert barrier(V, 10.0, 14.0) == pytest.approx(paper_f(V, 10.0, 14.0), rel=1e-12)


@pytest.mark.parametrize("V", [10.0, 9.999, 5.0, -100.0])
def test_barrier_zero_at_or_below_a(V):
    assert barrier(V, 10.0, 14.0) == 0.0


def test_barrier_c1_at_a():
    a, b, h = 10.0, 14.0, 1e-6
    assert barrier(a + h, a, b) < 1e-10  # continuity
    right = (barrier(a + h, a, b) - barrier(a, a, b)) / h
    left = (barrier(a, a, b) - barrier(a - h, a, b)) / h
    assert abs(right) < 1e-5 and abs(left) < 1e-12


@pytest.mark.parametrize("a,b,knee", [(10.0, 14.0, 0.9), (0.0, 1.0, 0.9), (2.0, 3.0, 0.99), (100.0, 1100.0, 0.8)])
def test_barrier_c1_at_knee(a, b, knee):
    Vk = a + knee * (b - a)
    h = 1e-7 * (b - a)
    fk = barrier(Vk, a, b, knee=knee)
    # continuity: the paper's formula on the left meets the tangent on the right
    assert fk == pytest.approx(paper_f(Vk, a, b), rel=1e-9)
    assert barrier(Vk - h, a, b, knee=knee) == pytest.approx(fk, rel=1e-4)
    assert barrier(Vk + h, a, b, knee=knee) == pytest.approx(fk, rel=1e-4)
    left = (fk - barrier(Vk - h, a, b, knee=knee)) / h
    right = (barrier(Vk + h, a, b, knee=knee) - fk) / h
    assert right == pytest.approx(left, rel=1e-3)
    # and both equal the derivative of the paper's formula, by central differences
    paper_slope = (paper_f(Vk + h, a, b) - paper_f(Vk - h, a, b)) / (2 * h)
    assert right == pytest.approx(paper_slope, rel=1e-3)


def test_barrier_knee_hand_value():
    # g(0.9) = 0.81 / 0.1 = 8.1; g'(0.9) = (1.8 − 0.81)/0.01 = 99: past the knee f = 8.1 + 99 (c − 0.9)
    assert barrier(0.9, 0.0, 1.0, knee=0.9) == pytest.approx(8.1, rel=1e-9)
    assert barrier(1.0, 0.0, 1.0, knee=0.9) == pytest.approx(8.1 + 9.9, rel=1e-9)
    assert barrier(2.0, 0.0, 1.0, knee=0.9) == pytest.approx(8.1 + 99 * 1.1, rel=1e-9)


def test_barrier_finite_and_increasing_past_b():
    a, b = 10.0, 14.0
    vals = [barrier(V, a, b) for V in (13.5, b, 14.5, 2 * b, 10 * b)]
    assert all(math.isfinite(v) for v in vals)
    assert all(v2 > v1 for v1, v2 in zip(vals, vals[1:]))
    grid = [a + 0.01 + i * 0.05 for i in range(1000)]  # from just above a to ~6 b
    fs = [barrier(V, a, b) for V in grid]
    assert all(f2 > f1 for f1, f2 in zip(fs, fs[1:]))


@pytest.mark.parametrize("c", [0.95, 0.99, 0.9999])
def test_barrier_with_knee_near_one_is_the_paper_formula(c):
    a, b = 3.0, 7.0
    V = a + c * (b - a)
    assert barrier(V, a, b, knee=0.999999) == pytest.approx(paper_f(V, a, b), rel=1e-6)
    assert barrier(V, a, b, knee=0.999999) == pytest.approx(c * c / (1 - c), rel=1e-6)


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (2.0, 1.0)])
def test_barrier_rejects_b_not_above_a(a, b):
    with pytest.raises(ValueError):
        barrier(0.5, a, b)


@pytest.mark.parametrize("progress", [0.0, 0.5, 0.9, 1.0])
def test_bar_penalty_gradients_finite_when_V_crosses_b(progress):
    torch.manual_seed(4)
    model, graph = lenet5_graph()
    bar = BAR()
    bar.attach(model, graph, [Budget("volume", 0.25)])
    assert all(bool(g.keep_mask().all()) for g in bar.gates.values())  # all gates open: V = V_F ≥ b
    p = bar.penalty(progress)
    p.backward()
    st = bar.status()
    assert st["V"] >= st["b"]
    assert torch.isfinite(p)
    for key, g in bar.gates.items():
        assert g.log_alpha.grad is not None
        assert torch.isfinite(g.log_alpha.grad).all(), key
        assert (g.log_alpha.grad != 0).all(), key
    # Independent value of the gradient: λ f A_l σ'(log α − β log(−γ/ζ)), f by hand.
    full = 20 * 576 + 50 * 64 + 500 + 10
    B = 0.25 * full
    a = B - 1e-4 * full
    d = 10.0
    delta = sig(-d / 2)
    T = (sig(d * (progress - 0.5)) - delta) / (1 - 2 * delta)
    b = (1 - T) * full + T * B
    c = (full - a) / (b - a)
    f = 8.1 + 99.0 * (c - 0.9) if c >= 0.9 else c * c / (1 - c)
    areas = {"features.0": 576, "features.3": 64, "classifier.1": 1}
    shift = BETA * math.log(-GAMMA / ZETA)
    for key, g in bar.gates.items():
        gid = bar.gid_of[key]
        s = torch.sigmoid(g.log_alpha.detach().double() - shift)
        expected = bar.lam * f * areas[gid] * s * (1 - s)
        assert torch.allclose(g.log_alpha.grad.double(), expected, rtol=1e-4), gid


def test_bar_penalty_gradient_finite_with_closed_and_saturated_gates():
    torch.manual_seed(6)
    model, graph = lenet5_graph()
    bar = BAR()
    bar.attach(model, graph, [Budget("volume", 0.25)])
    with torch.no_grad():
        for g in bar.gates.values():
            g.log_alpha.copy_(torch.randn(g.num_channels) * 6)
    for progress in (0.3, 1.0):
        for g in bar.gates.values():
            g.log_alpha.grad = None
        p = bar.penalty(progress)
        if p.requires_grad:
            p.backward()
            for g in bar.gates.values():
                assert torch.isfinite(g.log_alpha.grad).all()


def test_bar_penalty_is_a_differentiable_zero_when_every_term_is_off():
    """V at or under a (f = 0): the penalty is exactly 0 and still reaches every gate, with a zero gradient."""
    model, graph = lenet5_graph()
    bar = BAR()
    bar.attach(model, graph, [Budget("volume", 0.5)])
    with torch.no_grad():
        for g in bar.gates.values():
            g.log_alpha.fill_(-8.0)   # every channel closed: V = the ungated part, under a
            g.log_alpha[0] = 8.0
    p = bar.penalty(0.5)
    assert bar.status()["f"] == 0.0 and float(p) == 0.0 and p.requires_grad
    p.backward()
    for g in bar.gates.values():
        assert g.log_alpha.grad is not None and not g.log_alpha.grad.any()


# ---------------------------------------------------------------------------------------
# 3. Schedules
# ---------------------------------------------------------------------------------------
GRID = [i / 1000 for i in range(1001)]


@pytest.mark.parametrize("fn,d", [(sigmoid_transition, 10.0), (sigmoid_transition, 3.0),
                                  (linear_transition, 0.0), (exponential_transition, 5.0),
                                  (exponential_transition, 1.0)])
def test_transition_endpoints_and_monotone(fn, d):
    assert fn(0.0, d) == pytest.approx(0.0, abs=1e-12)
    assert fn(1.0, d) == pytest.approx(1.0, abs=1e-12)
    vals = [fn(t, d) for t in GRID]
    assert all(v2 > v1 for v1, v2 in zip(vals, vals[1:]))


def test_sigmoid_transition_symmetric():
    for t in GRID:
        assert sigmoid_transition(t) + sigmoid_transition(1 - t) == pytest.approx(1.0, abs=1e-12)


def test_sigmoid_transition_hand_value():
    # t = 0.25, d = 10: (σ(−2.5) − σ(−5))/(1 − 2σ(−5))
    s25 = 1 / (1 + math.exp(2.5))   # 0.0758582
    s5 = 1 / (1 + math.exp(5.0))    # 0.0066929
    expected = (s25 - s5) / (1 - 2 * s5)
    assert expected == pytest.approx(0.070104, abs=1e-6)
    assert sigmoid_transition(0.25, 10.0) == pytest.approx(expected, rel=1e-12)
    assert sigmoid_transition(0.5, 10.0) == pytest.approx(0.5, abs=1e-12)


def test_sigmoid_transition_small_d_is_linear():
    for t in (0.1, 0.3, 0.5, 0.77, 0.95):
        assert sigmoid_transition(t, 1e-3) == pytest.approx(t, abs=1e-5)
        assert abs(sigmoid_transition(t, 10.0) - t) > 1e-3 or t == 0.5


def test_exponential_transition_hand_value():
    assert exponential_transition(0.5, 5.0) == pytest.approx((1 - math.exp(-2.5)) / (1 - math.exp(-5)), rel=1e-12)
    assert linear_transition(0.3) == 0.3


def test_budget_schedule_margins():
    full, budget = 15230.0, 3807.5
    s = BudgetSchedule(full, budget)
    assert s.b(0.0) == pytest.approx(full, rel=1e-12)
    assert s.b(1.0) == pytest.approx(budget, rel=1e-12)
    assert s.a == pytest.approx(budget - 1e-4 * full, rel=1e-12)
    T = sigmoid_transition(0.25, 10.0)
    assert s.b(0.25) == pytest.approx((1 - T) * full + T * budget, rel=1e-12)
    bs = [s.b(t) for t in GRID]
    assert all(b2 < b1 for b1, b2 in zip(bs, bs[1:]))


# ---------------------------------------------------------------------------------------
# 4. Distillation
# ---------------------------------------------------------------------------------------
def hand_softmax(x):
    e = torch.exp(x - x.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def hand_ce(s, y):
    logp = torch.log(hand_softmax(s))
    return -sum(logp[i, int(y[i])] for i in range(s.shape[0])) / s.shape[0]


def kd_data(seed=7, n=6, k=5):
    torch.manual_seed(seed)
    s = (torch.randn(n, k, dtype=torch.float64) * 2).requires_grad_(True)
    t = (torch.randn(n, k, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(0, k, (n,))
    return s, y, t


@pytest.mark.parametrize("alpha,T", [(0.9, 4.0), (0.5, 1.0), (0.3, 2.5)])
def test_distillation_value_by_hand(alpha, T):
    s, y, t = kd_data()
    got = distillation_loss(s, y, t, alpha, T)
    pt, ps = hand_softmax(t / T), hand_softmax(s / T)
    ce_soft = -(pt * torch.log(ps)).sum() / s.shape[0]
    ent = -(pt * torch.log(pt)).sum() / s.shape[0]
    expected = (1 - alpha) * hand_ce(s, y) + alpha * T * T * (ce_soft - ent)
    assert float(got) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("alpha,T", [(0.9, 4.0), (0.5, 1.0)])
def test_distillation_gradient_equals_paper_ce_form(alpha, T):
    s, y, t = kd_data(seed=8)
    distillation_loss(s, y, t, alpha, T).backward()
    g_lib = s.grad.clone()
    s2 = s.detach().clone().requires_grad_(True)
    pt, ps = hand_softmax(t.detach() / T), hand_softmax(s2 / T)
    paper = (1 - alpha) * hand_ce(s2, y) + alpha * T * T * (-(pt * torch.log(ps)).sum() / s.shape[0])
    paper.backward()
    assert torch.allclose(g_lib, s2.grad, rtol=1e-8, atol=1e-12)
    # and a finite-difference check of one entry
    h = 1e-6
    def value(delta):
        s3 = s.detach().clone()
        s3[2, 1] += delta
        return float(distillation_loss(s3, y, t.detach(), alpha, T))
    fd = (value(h) - value(-h)) / (2 * h)
    assert float(g_lib[2, 1]) == pytest.approx(fd, rel=1e-5)


def test_distillation_alpha_zero_and_no_teacher_are_plain_ce():
    s, y, t = kd_data(seed=9)
    ce = float(hand_ce(s, y))
    assert float(distillation_loss(s, y, t, 0.0, 4.0)) == pytest.approx(ce, rel=1e-12)
    assert float(distillation_loss(s, y, None, 0.9, 4.0)) == pytest.approx(ce, rel=1e-12)


def test_distillation_soft_term_vanishes_when_student_matches_teacher():
    s, y, _ = kd_data(seed=10)
    ce = float(hand_ce(s, y))
    assert float(distillation_loss(s, y, s.detach().clone(), 0.9, 4.0)) == pytest.approx(0.1 * ce, rel=1e-10)


def test_distillation_no_gradient_to_teacher():
    s, y, t = kd_data(seed=11)
    distillation_loss(s, y, t, 0.9, 4.0).backward()
    assert t.grad is None or float(t.grad.abs().max()) == 0.0
    assert s.grad is not None and float(s.grad.abs().max()) > 0.0


# ---------------------------------------------------------------------------------------
# 5. Resources
# ---------------------------------------------------------------------------------------
LENET5_FULL = {
    "volume": 20 * 576 + 50 * 64 + 500 + 10,
    "flops": 576 * 25 * 1 * 20 + 64 * 25 * 20 * 50 + 800 * 500 + 500 * 10,
    "params": (25 * 1 * 20 + 20) + (25 * 20 * 50 + 50) + (800 * 500 + 500) + (500 * 10 + 10),
}
LENET5_PRUNED = {  # keep 5 of conv1, 10 of conv2, 100 of fc1
    "volume": 5 * 576 + 10 * 64 + 100 + 10,
    "flops": 576 * 25 * 1 * 5 + 64 * 25 * 5 * 10 + (10 * 16) * 100 + 100 * 10,
    "params": (25 * 1 * 5 + 5) + (25 * 5 * 10 + 10) + (10 * 16 * 100 + 100) + (100 * 10 + 10),
}


def test_lenet5_full_resources_by_hand():
    _, graph = lenet5_graph()
    assert LENET5_FULL == {"volume": 15230, "flops": 2293000, "params": 431080}
    rep = resource_report(graph)
    for k, v in LENET5_FULL.items():
        assert rep[k] == pytest.approx(v, rel=1e-12), k
    rep2 = resource_report(graph, full_masks(graph))
    for k, v in LENET5_FULL.items():
        assert rep2[k] == pytest.approx(v, rel=1e-12), k
    # and the params count is that of the real module
    model = budgetprune.create_model("lenet5")
    assert sum(p.numel() for p in model.parameters()) == LENET5_FULL["params"]


def test_lenet5_pruned_resources_are_purge_aware():
    _, graph = lenet5_graph()
    torch.manual_seed(12)
    masks = {}
    for gid, n in (("features.0", 5), ("features.3", 10), ("classifier.1", 100)):
        m = torch.zeros(graph.groups[gid].channels, dtype=torch.bool)
        m[torch.randperm(m.numel())[:n]] = True
        masks[gid] = m
    rep = resource_report(graph, masks)
    for k, v in LENET5_PRUNED.items():
        assert rep[k] == pytest.approx(v, rel=1e-12), k


def test_vgg_small_full_resources_by_hand():
    model = budgetprune.create_model("vgg_small", in_channels=1)
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    # 28×28 (2 convs of 32), 14×14 (2 of 64), 7×7 (2 of 128), pool to 3×3, GAP, fc 256, fc 10
    volume = 32 * 784 * 2 + 64 * 196 * 2 + 128 * 49 * 2 + 256 + 10
    flops = (784 * 9 * 1 * 32 + 784 * 9 * 32 * 32 + 196 * 9 * 32 * 64 + 196 * 9 * 64 * 64
             + 49 * 9 * 64 * 128 + 49 * 9 * 128 * 128 + 128 * 256 + 256 * 10)
    params = ((9 * 1 * 32 + 2 * 32) + (9 * 32 * 32 + 2 * 32) + (9 * 32 * 64 + 2 * 64) + (9 * 64 * 64 + 2 * 64)
              + (9 * 64 * 128 + 2 * 128) + (9 * 128 * 128 + 2 * 128) + (128 * 256 + 256) + (256 * 10 + 10))
    rep = resource_report(graph)
    assert rep["volume"] == pytest.approx(volume, rel=1e-12)
    assert rep["flops"] == pytest.approx(flops, rel=1e-12)
    assert rep["params"] == pytest.approx(params, rel=1e-12)
    assert sum(p.numel() for p in model.parameters()) == params


def test_lenet300_gated_inputs_resources_by_hand():
    model = budgetprune.create_model("lenet300")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28), gate_inputs=True)
    assert graph.groups["input"].channels == 784
    rep = resource_report(graph)
    assert rep["volume"] == pytest.approx(784 + 300 + 100 + 10)
    assert rep["flops"] == pytest.approx(784 * 300 + 300 * 100 + 100 * 10)
    assert rep["params"] == pytest.approx(784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
    masks = {"input": torch.arange(784) % 4 == 0, "features.1": torch.arange(300) < 30,
             "features.3": torch.arange(100) < 7}
    rep = resource_report(graph, masks)
    assert rep["volume"] == pytest.approx(196 + 30 + 7 + 10)
    assert rep["flops"] == pytest.approx(196 * 30 + 30 * 7 + 7 * 10)
    assert rep["params"] == pytest.approx(196 * 30 + 30 + 30 * 7 + 7 + 7 * 10 + 10)


@pytest.mark.parametrize("metric", ["volume", "flops", "params"])
def test_cost_model_expected_matches_hard_on_binary_probs(metric):
    _, graph = lenet5_graph()
    cm = CostModel(graph, metric)
    torch.manual_seed(13)
    masks = {gid: torch.rand(g.channels) < 0.4 for gid, g in graph.groups.items()}
    probs = {gid: m.double() for gid, m in masks.items()}
    assert float(cm.expected(probs)) == pytest.approx(cm.hard(masks), rel=1e-12)
    assert cm.hard(masks) == pytest.approx(resource_report(graph, masks)[metric], rel=1e-12)


@pytest.mark.parametrize("metric", ["volume", "flops", "params"])
def test_cost_model_expected_is_differentiable(metric):
    _, graph = lenet5_graph()
    cm = CostModel(graph, metric)
    torch.manual_seed(14)
    base = {gid: torch.rand(g.channels, dtype=torch.float64) for gid, g in graph.groups.items()}
    probs = {gid: p.clone().requires_grad_(True) for gid, p in base.items()}
    cm.expected(probs).backward()
    h = 1e-4
    for gid, idx in (("features.0", 3), ("features.3", 17), ("classifier.1", 250)):
        up = {k: v.clone() for k, v in base.items()}
        dn = {k: v.clone() for k, v in base.items()}
        up[gid][idx] += h
        dn[gid][idx] -= h
        fd = (float(cm.expected(up)) - float(cm.expected(dn))) / (2 * h)
        assert float(probs[gid].grad[idx]) == pytest.approx(fd, rel=1e-6), (metric, gid)
    # by hand for volume: ∂/∂p of Σ A_l Σ p is A_l
    if metric == "volume":
        assert torch.allclose(probs["features.0"].grad, torch.full((20,), 576.0, dtype=torch.float64))
        assert torch.allclose(probs["features.3"].grad, torch.full((50,), 64.0, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# 6. Budgets
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0.25", 0.25, "4x", "25%", " 4X ", "0.25 "])
def test_parse_budget_quarter(value):
    b = parse_budget(value)
    assert b.fraction == pytest.approx(0.25, abs=1e-15)
    assert b.metric == "volume"
    assert b.factor == pytest.approx(4.0)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "1x", "0.5x", "abc", "nan", "", "0%", "100%", 0, 1.0])
def test_parse_budget_rejects(value):
    with pytest.raises(BudgetError) as err:
        parse_budget(value)
    assert "\n" not in str(err.value)


def test_parse_budget_metric():
    assert parse_budget("2x", metric="flops") == Budget("flops", 0.5)
    with pytest.raises(BudgetError):
        parse_budget("0.5", metric="speed")


def test_check_reachable():
    _, graph = lenet5_graph()
    low = (576 + 64 + 1 + 10) / 15230  # one channel per gated layer + the ungated output
    assert low == pytest.approx(0.042744, abs=1e-6)
    with pytest.raises(BudgetError):
        Budget("volume", low * 0.99).check_reachable(graph)
    Budget("volume", low * 1.01).check_reachable(graph)
    Budget("volume", 0.25).check_reachable(graph)
    # params minimum by hand: conv1 (25+1), conv2 (25·1·1+1), fc1 (16+1), fc2 (10+10)
    plow = (26 + 26 + 17 + 20) / 431080
    with pytest.raises(BudgetError):
        Budget("params", plow * 0.99).check_reachable(graph)
    Budget("params", plow * 1.01).check_reachable(graph)


@pytest.mark.parametrize("metric,tweak,expected", [
    # volume: cost saved per channel is 576 (conv1), 64 (conv2), 1 (fc1)
    ("volume", {"features.0": (4, 0.5)}, ("features.0", 4)),          # 0.5/576 < 1/64 < 1/1
    ("volume", {"features.3": (7, 0.01)}, ("features.3", 7)),         # 0.01/64 < 1/576
    ("volume", {"classifier.1": (42, 1e-4)}, ("classifier.1", 42)),   # 1e-4/1 < 1/576
    # flops (purge-aware): conv1 576·25 + 64·25·50 = 94400, conv2 64·25·20 + 16·500 = 40000,
    # fc1 800 + 10 = 810
    ("flops", {"features.0": (4, 0.9)}, ("features.0", 4)),           # 0.9/94400 < 1/40000
    ("flops", {"features.3": (7, 0.3)}, ("features.3", 7)),           # 0.3/40000 < 1/94400
    ("flops", {"classifier.1": (42, 0.005)}, ("classifier.1", 42)),   # 0.005/810 < 1/94400
])
def test_enforce_budget_drops_lowest_score_per_cost(metric, tweak, expected):
    _, graph = lenet5_graph()
    full = LENET5_FULL[metric]
    scores = {gid: torch.ones(g.channels) for gid, g in graph.groups.items()}
    for gid, (i, v) in tweak.items():
        scores[gid][i] = v
    masks = full_masks(graph)
    out = enforce_budget(graph, masks, scores, Budget(metric, (full - 0.5) / full))
    dropped = [(gid, int(i)) for gid, m in out.items() for i in torch.nonzero(~m).flatten()]
    assert dropped == [expected]
    assert all(bool(m.all()) for m in masks.values())  # input untouched


def test_enforce_budget_flops_savings_by_hand():
    """Dropping a conv1 channel saves 94400 FLOPs: a budget 94400 below full drops exactly one."""
    _, graph = lenet5_graph()
    full = LENET5_FULL["flops"]
    scores = {gid: torch.ones(g.channels) for gid, g in graph.groups.items()}
    scores["features.0"][9] = 0.5
    out = enforce_budget(graph, full_masks(graph), scores, Budget("flops", (full - 94400) / full))
    assert [int(m.sum()) for m in out.values()] == [19, 50, 500]
    assert resource_report(graph, out)["flops"] == full - 94400


def test_enforce_budget_never_below_one_channel():
    _, graph = lenet5_graph()
    torch.manual_seed(15)
    low = (576 + 64 + 1 + 10) / 15230
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    out = enforce_budget(graph, full_masks(graph), scores, Budget("volume", low * 1.0001))
    assert {gid: int(m.sum()) for gid, m in out.items()} == {"features.0": 1, "features.3": 1, "classifier.1": 1}
    # the kept channel of each group is its highest-score one
    for gid, m in out.items():
        assert int(torch.nonzero(m)) == int(torch.argmax(scores[gid]))
    with pytest.raises(BudgetError):
        enforce_budget(graph, full_masks(graph), scores, Budget("volume", low * 0.99))


def test_enforce_budget_keeps_masks_within_budget_unchanged():
    _, graph = lenet5_graph()
    torch.manual_seed(16)
    masks = {gid: torch.rand(g.channels) < 0.2 for gid, g in graph.groups.items()}
    for m in masks.values():
        m[0] = True
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    out = enforce_budget(graph, masks, scores, Budget("volume", 0.9))
    for gid in masks:
        assert torch.equal(out[gid], masks[gid])


def _fill_ratio(frac, metric, seed):
    _, graph = lenet5_graph()
    cm = CostModel(graph, metric)
    torch.manual_seed(seed)
    masks = full_masks(graph)
    originals = {gid: m.clone() for gid, m in masks.items()}
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    out = enforce_budget(graph, masks, scores, Budget(metric, frac))
    for gid in masks:
        assert torch.equal(masks[gid], originals[gid])  # not modified in place
        assert int(out[gid].sum()) >= 1
    return cm.hard(out) / (frac * cm.full())


@pytest.mark.parametrize("frac", [0.25, 0.125, 0.0625])
def test_enforce_budget_tight(frac):
    for seed in range(10):
        r = _fill_ratio(frac, "volume", seed)
        assert 0.95 <= r <= 1.0, (frac, seed, r)


# Regression: the last greedy removal used to overshoot by a whole conv1 map (V/B 0.933 at 0.5, seeds 6/7/12).
def test_enforce_budget_tight_half():
    ratios = [_fill_ratio(0.5, "volume", seed) for seed in range(14)]
    assert all(r <= 1.0 for r in ratios)
    assert min(ratios) >= 0.95, ratios


def test_enforce_budget_never_exceeds_any_metric():
    for metric in ("volume", "flops", "params"):
        for frac in (0.5, 0.2, 0.07):
            for seed in range(3):
                assert _fill_ratio(frac, metric, seed) <= 1.0 + 1e-12


# ---------------------------------------------------------------------------------------
# Filling up to the budget
# ---------------------------------------------------------------------------------------
def _under_budget_masks(graph, seed, keep=0.15):
    torch.manual_seed(seed)
    masks = {gid: torch.rand(g.channels) < keep for gid, g in graph.groups.items()}
    for m in masks.values():
        m[0] = True
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    return masks, scores


@pytest.mark.parametrize("metric", ["volume", "flops", "params"])
@pytest.mark.parametrize("frac", [0.5, 0.25, 0.125])
def test_fill_budget_reaches_budget_without_exceeding(metric, frac):
    _, graph = lenet5_graph()
    cm = CostModel(graph, metric)
    limit = frac * cm.full()
    for seed in range(3):
        masks, scores = _under_budget_masks(graph, seed, keep=0.05)
        assert cm.hard(masks) < 0.9 * limit
        out = fill_budget(graph, masks, scores, Budget(metric, frac))
        ratio = cm.hard(out) / limit
        assert ratio <= 1.0
        if metric == "volume":  # additive costs (576, 64 or 1 per channel): the fill ends close to B
            assert ratio >= 0.95, (frac, seed, ratio)
        for gid in masks:  # only adds, never removes, and does not modify its input
            assert bool((masks[gid] <= out[gid]).all())
        # maximal: no single closed channel still fits (for flops and params a layer's cost
        # grows with its neighbours' widths, so a greedy fill can stop further below B)
        for gid, m in out.items():
            if bool(m.all()):
                continue
            grown = {g: x.clone() for g, x in out.items()}
            grown[gid][int(torch.nonzero(~m)[0])] = True
            assert cm.hard(grown) > limit


def test_fill_budget_reopens_highest_score_per_cost_first():
    """Volume costs 576 per conv1 map, 64 per conv2 map, 1 per fc1 unit: with room for
    exactly one conv2 map and ample scores elsewhere, the best conv2 candidate is chosen by
    score / cost among the groups that fit."""
    _, graph = lenet5_graph()
    cm = CostModel(graph, "volume")
    masks = full_masks(graph)
    masks["features.3"][[3, 8]] = False     # two conv2 maps closed (64 each)
    masks["classifier.1"][[5]] = False      # one fc1 unit closed (1)
    scores = {gid: torch.full((g.channels,), 0.5) for gid, g in graph.groups.items()}
    scores["features.3"][8] = 0.9
    scores["classifier.1"][5] = 0.001       # 0.001 / 1 < 0.9 / 64: the conv2 map goes first
    limit = cm.hard(masks) + 64.5           # room for one conv2 map; 0.5 left is too little for fc1
    out = fill_budget(graph, masks, scores, Budget("volume", limit / cm.full()))
    assert bool(out["features.3"][8]) and not bool(out["features.3"][3])
    assert not bool(out["classifier.1"][5])
    assert cm.hard(out) == cm.hard(masks) + 64


def test_fill_budget_respects_every_budget():
    _, graph = lenet5_graph()
    budgets = [Budget("volume", 0.5), Budget("flops", 0.1)]
    masks, scores = _under_budget_masks(graph, 4, keep=0.03)
    out = fill_budget(graph, masks, scores, budgets)
    ratios = [CostModel(graph, b.metric).hard(out) / b.absolute(graph) for b in budgets]
    assert max(ratios) <= 1.0
    assert max(ratios) >= 0.95  # the binding budget is met closely


@pytest.mark.parametrize("metric", ["volume", "flops"])
def test_expected_cost_on_residual_graph_matches_monte_carlo(metric):
    """L_S with shared residual slots: P(slot alive) = 1 − Π(1 − p) over its writers (gates
    independent). Checked against the mean hard cost of sampled keep-masks, counted with the
    boolean slot sets (another code path than the probability formula)."""
    from budgetprune.liveness import slot_sets
    model = budgetprune.create_model("resnet20")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    cm = CostModel(graph, metric)
    gen = torch.Generator().manual_seed(21)
    probs = {gid: 0.05 + 0.9 * torch.rand(g.channels, generator=gen, dtype=torch.float64)
             for gid, g in graph.groups.items()}
    expected = float(cm.expected(probs))
    samples = []
    for _ in range(400):
        masks = {gid: torch.rand(p.shape, generator=gen, dtype=torch.float64) < p for gid, p in probs.items()}
        sets = slot_sets(graph, masks, "mixed", purge=False)
        total = 0.0
        for t in cm.terms:
            n_out = int(masks[t.out_group].sum()) if t.out_group else int(sets[t.out_tensor].sum())
            n_in = int(sets[t.in_tensor].sum()) * t.in_expansion if t.in_tensor else 0
            total += t.c_io * n_in * n_out + t.c_out * n_out
        samples.append(total)
    s = torch.tensor(samples, dtype=torch.float64)
    se = float(s.std()) / math.sqrt(len(samples))
    assert abs(float(s.mean()) - expected) < 4 * se + 1e-9 * expected, (float(s.mean()), expected, se)
    if metric == "volume":  # Eq. 4's L_S: each layer's own maps, Σ A_l Σ p, plus the ungated fc's 10 outputs
        by_hand = sum(float(p.sum()) * graph.groups[g].area for g, p in probs.items()) + 10
        assert abs(by_hand - expected) < 1e-9 * expected


@pytest.mark.parametrize("model_name, metric", [("resnet20", "flops"), ("resnet20", "volume"), ("lenet300", "params")])
def test_the_vectorised_expectation_equals_the_sum_of_its_terms(model_name, metric):
    """CostModel.expected (every term at once, budgetprune.expectation) against the formula
    written term by term with the per-tensor aliveness 1 − Π(1 − p) of budgetprune.liveness:
    value and gradient, with per-layer weights, and with one group left without gates (always alive)."""
    from budgetprune.liveness import alive
    model = budgetprune.create_model(model_name)
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28), gate_inputs=True)
    cm = CostModel(graph, metric)
    gen = torch.Generator().manual_seed(5)
    groups = list(graph.groups)
    base = {gid: torch.rand(graph.groups[gid].channels, generator=gen, dtype=torch.float64) for gid in groups[1:]}
    weights = {t.name: 0.5 + i % 3 for i, t in enumerate(cm.terms) if i % 2}
    unweighted = None
    for w in (None, weights):
        fast = {g: p.clone().requires_grad_(True) for g, p in base.items()}
        slow = {g: p.clone().requires_grad_(True) for g, p in base.items()}
        value = cm.expected(fast, weights=w)
        reference = cm.fixed
        for t in cm.terms:
            n_out = slow[t.out_group].sum() if t.out_group in slow else alive(graph.tensors[t.out_tensor], slow).sum()
            n_in = alive(graph.tensors[t.in_tensor], slow).sum() * t.in_expansion if t.in_tensor else 0.0
            reference = reference + (1.0 if w is None else w.get(t.name, 1.0)) * t.cost(n_in, n_out)
        assert float(value) == pytest.approx(float(reference), rel=1e-12)
        unweighted = float(value) if w is None else unweighted
        value.backward()
        reference.backward()
        for g in base:
            torch.testing.assert_close(fast[g].grad, slow[g].grad, rtol=1e-10, atol=1e-12)
    as_float = cm.expected({g: p.float() for g, p in base.items()})
    assert as_float.dtype == torch.float32 and float(as_float) == pytest.approx(unweighted, rel=1e-5)


def test_the_expectation_reads_the_joined_gate_probabilities_as_one_vector():
    """BAR's Hard Concrete gates compute their probabilities as one vector (per_channel_joined):
    the expectation read from it has the value and the log α gradients of the pieces joined again;
    gates of two kinds give no vector; a vector of the wrong length is refused."""
    model = budgetprune.create_model("resnet20")
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    bar = BAR()
    bar.attach(model, graph, [Budget("flops", 0.25)])
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for g in bar.gates.values():
            g.log_alpha.copy_(torch.randn(g.num_channels, generator=gen) * 2 + 1)
    cm = bar.terms[0][1]
    probs, joined = bar.per_channel_joined("prob_nonzero")
    assert joined is not None and joined.shape == (sum(p.numel() for p in probs.values()),)
    value = cm.expected(probs, joined=joined)
    value.backward()
    fast = {k: g.log_alpha.grad.clone() for k, g in bar.gates.items()}
    for g in bar.gates.values():
        g.log_alpha.grad = None
    reference = cm.expected(bar.per_channel("prob_nonzero"))  # the pieces, joined again
    reference.backward()
    assert float(value) == pytest.approx(float(reference), rel=1e-12)
    for k, g in bar.gates.items():
        torch.testing.assert_close(fast[k], g.log_alpha.grad, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="joined has shape"):
        cm.expected(probs, joined=joined[1:])
    next(iter(bar.gates.values())).beta = 0.5  # two sets of (β, γ, ζ): no single vector, the same pieces
    probs, joined = bar.per_channel_joined("prob_nonzero")
    assert joined is None and list(probs) == list(bar.per_channel("prob_nonzero"))


def test_bar_knee_option_sets_the_barrier_s_knee():
    """All gates open at progress 0.6: V = V_F lies past the moving budget b, where the knee decides
    f. BAR's f is the hand formula of the tangent, g(k) + g'(k)(c − k), for its own knee."""
    model, graph = lenet5_graph()
    for knee in (0.9, 0.99):
        bar = BAR(knee=knee)
        bar.attach(model, graph, [Budget("volume", 0.25)])
        bar.penalty(0.6)
        s, a = bar.status(), bar.terms[0][2].a
        c = (s["V"] - a) / (s["b"] - a)
        assert c > 1
        g, dg = knee * knee / (1 - knee), (2 * knee - knee * knee) / (1 - knee) ** 2
        assert s["f"] == pytest.approx(g + dg * (c - knee), rel=1e-9)
        bar.detach()


@pytest.mark.parametrize("knee", [0.0, 1.0, 1.5, -0.2, True, "0.9"])
def test_bar_refuses_a_knee_outside_0_1(knee):
    with pytest.raises(ConfigError, match="knee"):
        BAR(knee=knee)
