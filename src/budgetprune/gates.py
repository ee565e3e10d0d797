"""Gate distributions: the learnable per-channel masks that training prunes with.

Hard Concrete (Louizos, Welling & Kingma 2018; BAR, seed 001, supplement 7):
a Binary Concrete variable stretched to (γ, ζ) and clamped to [0, 1], so that it puts
real probability mass on exactly 0 (channel off) and exactly 1 (channel on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Hard Concrete constants used throughout BAR (seed 001, supplement 7.1): β, γ, ζ.
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1

#: Initial log α of the gates of a network that is already trained (the default when the student
#: starts from the teacher, and of a :class:`~budgetprune.Pruner`): ẑ = 1, a training sample is
#: exactly 1 with probability 0.80 and 0 with probability 0.01. Seed 001's log α ≈ 0 trains from
#: scratch; on trained weights its samples (ẑ = 0.5, P(z = 0) = 0.17 per channel and example)
#: are a shock: a trained ResNet-20 (Fashion-MNIST, 96 % on 1024 training images) scored 13 % on
#: them with such samples before any step, 86 % at log α = 3 (``benchmarks/results/gate_init.md``,
#: with the BAR runs from both starts; :mod:`budgetprune.gate_start` chooses a start per network).
OPEN_LOG_ALPHA = 3.0

#: The deterministic gate ẑ below which the fatal-pruning guard lifts the best channel of a protected
#: group (seed 001, section 4.1: "we clamp the highest value of Φ so at least one feature map is kept").
#: A clamp just above the opening threshold (log α = −2.40 + 0.01) keeps the channel at ẑ ≈ 0.001:
#: open in name, while the compacted network folds ẑ into its weights, and a BatchNorm scaled down a
#: thousandfold is at the size of one Adam step: measured on ResNet-20 at 16× volume (seed 0), the
#: second stage's only residual channel came out of fine-tuning ≤ 0 for every input, so the ReLU after
#: the sum cut the network off (10 % accuracy). Clamped at ẑ = ½ (log α = 0, where seed 001 starts
#: the gates) the kept channel carries its signal.
GUARD_GATE = 0.5

#: A kept channel whose folded gate is under this passes less than 1 % of its signal: finalize and the
#: report name it (``lowest_kept_gate``).
FAINT_GATE = 0.01


def travel_note(gates: list, lr: float, steps: int) -> str | None:
    """A warning when Hard Concrete ``gates`` trained by Adam cannot get to closed within ``steps``.

    Adam moves a parameter by about ``lr`` per step (its update is lr times the gradient's running
    mean over its running root mean square: 1 for a steady gradient, somewhat more while the
    gradient grows), so in ``steps`` a log α travels about ``lr · steps``. A gate that starts at
    log α₀ must fall to the pruning threshold (:meth:`HardConcreteGate.open_threshold`, −2.40:
    ẑ = 0 below it) before the training can prune its channel. The note speaks when even the
    gates that start lowest could not get two thirds of the way there (a margin for that
    "somewhat more"): training then barely moves the cost of the kept channels, and the final
    projection alone picks them (measured: ResNet-20 with 80 prune steps,
    ``benchmarks/results/short_prune.md``)."""
    hard_concrete = [g for g in gates if isinstance(g, HardConcreteGate)]
    if not hard_concrete or steps < 1 or lr <= 0:
        return None
    need = min(float(g.log_alpha.detach().min()) - g.open_threshold() for g in hard_concrete)
    reach = lr * steps
    if 1.5 * reach >= need:
        return None
    return (f"note: the prune stage has {steps} steps; at gate lr {lr:g} a gate's log α moves about {reach:.2g} "
            f"in them, and from where the gates start it must fall by {need:.2g} to the pruning threshold: the "
            "gates will hardly move and the final projection will choose the channels nearly alone. Give the "
            f"prune stage at least {math.ceil(need / lr)} steps (more epochs or more data) for the budget-aware "
            "training to act")


class HardConcreteGate(nn.Module):
    """One Hard Concrete gate per channel, parametrised by ``log_alpha`` (Φ in seed 001).

    * training: reparametrised sample (seed 001, supplement Eq. 4)
      ``z = clamp(σ((log u − log(1−u) + log α)/β)(ζ−γ)+γ, 0, 1)``, u ~ U(0, 1);
    * evaluation: the deterministic gate ``ẑ = clamp(σ(log α)(ζ−γ)+γ, 0, 1)``;
      a channel is pruned where ẑ = 0 (Eq. 4's ``E[z] > 0`` test);
    * ``prob_nonzero``: ``P(z > 0) = σ(log α − β log(−γ/ζ))`` (supplement Eq. 5).

    ``log_alpha`` starts near 0 (uniform in [init_low, init_high]): supplement 4 gives
    U(0, 0.01), which only makes sense read as log α, since with α itself that small every
    gate would start closed.
    """

    #: Values are never negative, so the gate may be applied after a ReLU or pooling (attach.py).
    nonnegative = True

    def __init__(self, num_channels: int, init_low: float = 0.0, init_high: float = 0.01,
                 beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA):
        super().__init__()
        if num_channels < 1:
            raise ValueError("a gate needs at least one channel")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError("Hard Concrete needs gamma < 0 < 1 < zeta and beta > 0")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.log_alpha = nn.Parameter(torch.empty(num_channels).uniform_(init_low, init_high))
        #: When set (a 0/1 or [0,1] tensor), the gate is frozen at these values.
        self.register_buffer("frozen", None, persistent=False)

    @property
    def num_channels(self) -> int:
        return self.log_alpha.numel()

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(self, batch_size: int | None = None) -> torch.Tensor:
        """Reparametrised sample, differentiable w.r.t. ``log_alpha``; one per example if asked."""
        return hard_concrete_sample(self.log_alpha, batch_size, self.beta, self.gamma, self.zeta)

    def deterministic(self) -> torch.Tensor:
        """ẑ = clamp(σ(log α)(ζ−γ)+γ, 0, 1): the gate used at evaluation and for pruning."""
        return self._stretch(torch.sigmoid(self.log_alpha))

    def prob_nonzero(self) -> torch.Tensor:
        """P(z > 0) = σ(log α − β log(−γ/ζ)) (seed 001, supplement Eq. 5)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def keep_score(self) -> torch.Tensor:
        """How much each channel is worth keeping: P(z > 0)."""
        return self.prob_nonzero()

    def prob_zero(self) -> torch.Tensor:
        """P(z = 0) = 1 − P(z > 0)."""
        return 1.0 - self.prob_nonzero()

    def prob_one(self) -> torch.Tensor:
        """P(z = 1) = 1 − σ(β log((1−γ)/(ζ−1)) − log α): the stretched mass above 1."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log((1.0 - self.gamma) / (self.zeta - 1.0)))

    def open_threshold(self) -> float:
        """log α above which ẑ > 0: σ(log α) > −γ/(ζ − γ)."""
        return self.log_alpha_of(0.0)

    def log_alpha_of(self, z: float) -> float:
        """The log α whose deterministic gate ẑ is ``z`` (0 ≤ z < 1): the inverse of :meth:`deterministic`
        (at 0, the edge of the clamp: the opening threshold)."""
        p = (z - self.gamma) / (self.zeta - self.gamma)
        return math.log(p / (1.0 - p))

    @torch.no_grad()
    def keep_at_least_one(self, gate: float = GUARD_GATE) -> None:
        """Fatal-pruning guard (seed 001, section 4.1): clamp the highest log α so one channel stays
        open with a deterministic gate of at least ``gate`` (:data:`GUARD_GATE`)."""
        i = int(torch.argmax(self.log_alpha))
        floor = self.log_alpha_of(gate)
        if float(self.log_alpha[i]) < floor:
            self.log_alpha[i] = floor

    def keep_mask(self) -> torch.Tensor:
        """Channels whose deterministic gate is non-zero."""
        return self.deterministic() > 0

    def freeze(self, values: torch.Tensor) -> None:
        """Fix the gate to ``values`` (e.g. ẑ with pruned channels at 0) for fine-tuning."""
        self.frozen = values.detach().to(self.log_alpha.device, self.log_alpha.dtype).clone()
        self.log_alpha.requires_grad_(False)

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        """The gate values for one forward pass: frozen, a sample (training) or ẑ (eval)."""
        if self.frozen is not None:
            return self.frozen
        if self.training:
            return self.sample(batch_size)
        return self.deterministic()


def hard_concrete_sample(log_alpha: torch.Tensor, batch_size: int | None, beta: float, gamma: float,
                         zeta: float) -> torch.Tensor:
    """``z = clamp(σ((log u − log(1−u) + log α)/β)(ζ−γ)+γ, 0, 1)``, u ~ U(0, 1) (seed 001, supplement
    Eq. 4), for every entry of ``log_alpha``: (C,), or (batch, C) with one sample per example."""
    shape = log_alpha.shape if batch_size is None else (batch_size, *log_alpha.shape)
    # the noise logit(u)/β = (log u − log(1 − u))/β, made in place: it needs no gradient
    noise = torch.rand(shape, device=log_alpha.device, dtype=log_alpha.dtype).logit_(1e-6).mul_(1.0 / beta)
    s = torch.sigmoid(noise + log_alpha / beta)
    # the stretch in place, and a clip whose gradient reads its own result (hardtanh_): no saved copies
    return F.hardtanh_(s.mul(zeta - gamma).add_(gamma), 0.0, 1.0)


def sample_joined(gates: list[HardConcreteGate], batch_size: int | None) -> torch.Tensor:
    """The samples :meth:`HardConcreteGate.sample` draws, for several gates with the same (β, γ, ζ) at
    once: their ``log α`` joined into one tensor, one chain of a dozen operations for all of them
    (instead of a dozen per gate); the gates' units one after another along the last dim (split
    it by ``num_channels``), each gate's part with its distribution."""
    first = gates[0]
    log_alpha = torch.cat([g.log_alpha for g in gates])
    return hard_concrete_sample(log_alpha, batch_size, first.beta, first.gamma, first.zeta)


def piece_index(sizes: list[int], device: torch.device) -> torch.Tensor:
    """For consecutive pieces of ``sizes`` entries, each entry's piece number."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def open_in_every_row(samples: torch.Tensor, pieces: torch.Tensor) -> list[bool]:
    """For the pieces of non-negative ``samples``' last dim (``pieces``: :func:`piece_index`),
    whether every row (every example of a (batch, units) sample; the one row of a (units,) one)
    has a nonzero entry in the piece: one reduction for all pieces."""
    rows = samples.detach().reshape(-1, samples.shape[-1])
    largest = rows.new_zeros(rows.shape[0], int(pieces[-1]) + 1)
    largest.scatter_reduce_(1, pieces.expand_as(rows), rows, "amax")
    return (largest.amin(dim=0) > 0).tolist()


class _JoinedGates:
    """Several Hard Concrete gates with the same (β, γ, ζ) as one: their log α joined, with the
    gate's own per-channel methods (they read only log α, β, γ and ζ)."""

    _stretch = HardConcreteGate._stretch
    deterministic = HardConcreteGate.deterministic
    prob_nonzero = HardConcreteGate.prob_nonzero
    keep_score = HardConcreteGate.keep_score
    keep_mask = HardConcreteGate.keep_mask

    def __init__(self, gates: list[HardConcreteGate]):
        self.beta, self.gamma, self.zeta = gates[0].beta, gates[0].gamma, gates[0].zeta
        self.log_alpha = torch.cat([g.log_alpha for g in gates])


#: The per-channel quantities :func:`per_channel_joined` computes.
JOINT_QUANTITIES = ("deterministic", "prob_nonzero", "keep_score", "keep_mask")


def per_channel_joined(gates: list[HardConcreteGate], quantity: str) -> torch.Tensor:
    """``getattr(gate, quantity)()`` of every gate (one of :data:`JOINT_QUANTITIES`), for several
    Hard Concrete gates with the same (β, γ, ζ), as one vector: computed once over their joined
    log α (gradients reach each gate's log α)."""
    if quantity not in JOINT_QUANTITIES:
        raise ValueError(f"per_channel_joined computes {', '.join(JOINT_QUANTITIES)}, not {quantity!r}")
    return getattr(_JoinedGates(gates), quantity)()


class MaskGate(nn.Module):
    """A fixed 0/1 mask per channel, no parameters: the gate of the iterative baselines
    (random, weight magnitude, VQ, ID; seed 001 supplement 3.2), which prune by setting it."""

    #: Values are never negative, so the gate may be applied after a ReLU or pooling (attach.py).
    nonnegative = True

    #: When True, each forward pass returns a leaf tensor ``probe`` (the mask values) that
    #: outputs can be differentiated against (the sensitivity method).
    probing = False

    def __init__(self, num_channels: int):
        super().__init__()
        if num_channels < 1:
            raise ValueError("a gate needs at least one channel")
        self.register_buffer("mask", torch.ones(num_channels))
        self.register_buffer("frozen", None, persistent=False)

    @property
    def num_channels(self) -> int:
        return self.mask.numel()

    def deterministic(self) -> torch.Tensor:
        return self.mask

    def keep_score(self) -> torch.Tensor:
        return self.mask

    def keep_mask(self) -> torch.Tensor:
        return self.mask > 0

    def keep_at_least_one(self) -> None:
        """Nothing to do: the budget projection keeps a protected group's last channel."""

    def set(self, keep: torch.Tensor) -> None:
        self.mask.copy_(keep.to(self.mask).float())

    def freeze(self, values: torch.Tensor) -> None:
        self.frozen = values.detach().to(self.mask.device, self.mask.dtype).clone()

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        if self.probing:
            # a fresh leaf each pass: the gradient of an output w.r.t. it is that channel's sensitivity
            self.probe = self.mask.detach().clone().requires_grad_(True)
            return self.probe
        return self.mask


class GaussianGate(nn.Module):
    """The Information Bottleneck's gate (Dai, Zhu & Wipf, ICML 2018; seed 001 section 5.1):
    z = μ + ε·σ per channel, ε ~ N(0, 1).

    Initialised μ ~ N(1, 0.01²), log σ ~ N(−9, 0.01²) (seed 001, supplement 4). A channel is
    kept while its signal-to-noise ratio α = μ²/σ² exceeds ``threshold`` (1: log α > 0, Dai et
    al.'s rule); at evaluation the gate is μ on kept channels and 0 on pruned ones.
    """

    def __init__(self, num_channels: int, threshold: float = 1.0):
        super().__init__()
        if num_channels < 1:
            raise ValueError("a gate needs at least one channel")
        self.mu = nn.Parameter(1.0 + 0.01 * torch.randn(num_channels))
        self.log_sigma = nn.Parameter(-9.0 + 0.01 * torch.randn(num_channels))
        self.log_threshold = math.log(threshold)
        self.register_buffer("frozen", None, persistent=False)

    @property
    def num_channels(self) -> int:
        return self.mu.numel()

    def log_snr(self) -> torch.Tensor:
        """log α = log(μ²/σ²)."""
        return torch.log(self.mu.square() + 1e-30) - 2.0 * self.log_sigma

    def kl(self) -> torch.Tensor:
        """Per-channel prior term log(1 + μ²/σ²) (Dai et al.'s KL bound up to a constant)."""
        return torch.nn.functional.softplus(self.log_snr())

    def keep_mask(self) -> torch.Tensor:
        return self.log_snr() > self.log_threshold

    def keep_score(self) -> torch.Tensor:
        """σ(log α − log threshold) ∈ (0, 1): above ½ for kept channels."""
        return torch.sigmoid(self.log_snr() - self.log_threshold)

    def deterministic(self) -> torch.Tensor:
        return self.mu * self.keep_mask().to(self.mu.dtype)

    @torch.no_grad()
    def keep_at_least_one(self, margin: float = 1e-2) -> None:
        """Fatal-pruning guard: lower σ of the channel of highest α until it is kept."""
        i = int(torch.argmax(self.log_snr()))
        floor = self.log_threshold + margin
        snr = float(self.log_snr()[i])
        if snr < floor:
            self.log_sigma[i] -= 0.5 * (floor - snr)

    def freeze(self, values: torch.Tensor) -> None:
        self.frozen = values.detach().to(self.mu.device, self.mu.dtype).clone()
        self.mu.requires_grad_(False)
        self.log_sigma.requires_grad_(False)

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        if not self.training:
            return self.deterministic()
        shape = (self.num_channels,) if batch_size is None else (batch_size, self.num_channels)
        eps = torch.randn(shape, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu + eps * self.log_sigma.exp()


class ScaleGate(nn.Module):
    """MorphNet's channel scale (Gordon et al., CVPR 2018): a per-channel factor γ.

    With ``bn`` given (the affine BatchNorm the channel group is hosted at), γ *is* that
    BatchNorm's weight: the gate reads it and multiplies by 1 on open channels (the BatchNorm
    already scales). Without one (a layer with no BatchNorm), γ is the gate's own parameter,
    initialised to 1.
    A channel is kept while |γ| > ``threshold`` and it is open: :meth:`close` shuts channels for
    good (their factor is 0 from then on, whatever γ does).
    """

    def __init__(self, num_channels: int, bn: nn.Module | None = None, threshold: float = 1e-2):
        super().__init__()
        if num_channels < 1:
            raise ValueError("a gate needs at least one channel")
        self.__dict__["bn"] = bn  # not a submodule: the weight stays the model's parameter
        self.own = None if bn is not None else nn.Parameter(torch.ones(num_channels))
        self.threshold = float(threshold)
        self.register_buffer("open", torch.ones(num_channels))
        self.register_buffer("frozen", None, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state saved before channels could close has every channel open."""
        state_dict.setdefault(prefix + "open", torch.ones_like(self.open))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def close(self, keep: torch.Tensor) -> None:
        """Leave open only the channels ``keep`` marks (a closed channel never reopens in training)."""
        self.open.mul_(keep.to(self.open))

    @property
    def gamma(self) -> torch.Tensor:
        return self.bn.weight if self.bn is not None else self.own

    @property
    def num_channels(self) -> int:
        return self.gamma.numel()

    def keep_mask(self) -> torch.Tensor:
        return (self.gamma.detach().abs() > self.threshold) & (self.open > 0)

    def keep_score(self) -> torch.Tensor:
        return self.gamma.detach().abs() * self.open

    def deterministic(self) -> torch.Tensor:
        """The factor the compacted network folds: γ for an own scale, 1 when the BatchNorm holds it."""
        keep = self.keep_mask().to(self.gamma.dtype)
        return keep if self.bn is not None else self.gamma.detach() * keep

    @torch.no_grad()
    def keep_at_least_one(self, gate: float = GUARD_GATE) -> None:
        """Fatal-pruning guard (seed 001, section 4.1): where the largest |γ| of an open channel is at
        the threshold or under, it is raised to ``gate`` (:data:`GUARD_GATE`, as BAR's guard clamps its
        gate; γ starts at 1): lifted just over the threshold, the one channel a layer keeps passed 1 %
        of its signal and the network behind it learnt nothing."""
        g = self.gamma
        i = int(torch.argmax(g.abs().masked_fill(self.open <= 0, -1.0)))
        if float(g[i].abs()) <= self.threshold:
            g[i] = max(gate, self.threshold) * (1.0 if float(g[i]) >= 0 else -1.0)

    def freeze(self, values: torch.Tensor) -> None:
        self.frozen = values.detach().to(self.gamma.device, self.gamma.dtype).clone()
        if self.own is not None:
            self.own.requires_grad_(False)

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        if self.bn is not None:
            return self.open.to(self.gamma.dtype)
        return self.own * self.open


class SigmoidGate(nn.Module):
    """Continuous Sparsification's deterministic mask m = σ(β·s) (Savarese et al., NeurIPS 2020;
    seed 004), with s initialised to ``s0`` and the temperature β set by the method.

    β → ∞ turns σ(β·s) into the Heaviside step H(s): a channel is kept where s > 0, and the
    network that is kept uses the step (s ≥ 0). The gate's value is the mask times
    1/σ(s₀), as in the authors' code, so that it starts at exactly 1 and the kept network
    uses 1/σ(s₀) · H(s).
    """

    #: Values are never negative, so the gate may be applied after a ReLU or pooling (attach.py).
    nonnegative = True

    def __init__(self, num_channels: int, s0: float = 0.0):
        super().__init__()
        if num_channels < 1:
            raise ValueError("a gate needs at least one channel")
        self.s = nn.Parameter(torch.full((num_channels,), float(s0)))
        self.scale = 1.0 / (1.0 / (1.0 + math.exp(-float(s0))))  # 1/σ(s₀)
        self.register_buffer("beta", torch.ones(()))
        self.register_buffer("frozen", None, persistent=False)

    @property
    def num_channels(self) -> int:
        return self.s.numel()

    def soft(self) -> torch.Tensor:
        """σ(β·s)."""
        return torch.sigmoid(self.beta * self.s)

    def keep_mask(self) -> torch.Tensor:
        """H(s) with H(0) = 1: at s₀ = 0 every channel starts kept."""
        return self.s >= 0

    def keep_score(self) -> torch.Tensor:
        return torch.sigmoid(self.s)

    def deterministic(self) -> torch.Tensor:
        """The step the kept network uses: H(s)/σ(s₀)."""
        return self.scale * self.keep_mask().to(self.s.dtype)

    @torch.no_grad()
    def keep_at_least_one(self, margin: float = 1e-3) -> None:
        i = int(torch.argmax(self.s))
        if float(self.s[i]) < 0.0:
            self.s[i] = margin

    def freeze(self, values: torch.Tensor) -> None:
        self.frozen = values.detach().to(self.s.device, self.s.dtype).clone()
        self.s.requires_grad_(False)

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        return self.frozen if self.frozen is not None else self.scale * self.soft()
