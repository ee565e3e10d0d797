"""The pruner: the one object a training loop drives to prune a model under a budget.

Whatever the loop — budgetprune's own (:class:`budgetprune.pipeline.PruneRun`, the command
line), a user's plain PyTorch loop, a Lightning or Hugging Face trainer — pruning goes through
this object and nothing else::

    pruner = budgetprune.Pruner(model, example_inputs, budget="flops=0.25", method="bar", total_steps=N)
    optimizer = torch.optim.SGD(pruner.parameters(lr=0.1), lr=0.1, momentum=0.9)
    for x, y in loader:
        loss = task_loss(model(x), y) + pruner.penalty()
        optimizer.zero_grad(); loss.backward(); optimizer.step(); pruner.step()
    small, report = pruner.finalize()

The pruner knows nothing of the data, the loss, the optimizer or the device placement: it
adds the method's penalty (which depends on the budget, never on the task, so a model with
any output works), takes one step signal per optimiser step (the budget schedule's clock),
exposes its parameter groups and its state (:meth:`state_dict`, for the user's checkpoints),
and at the end hard-prunes, meets the budget exactly (projection, then fill), compacts the
network physically and checks that the compacted network computes what the gated one did
(:meth:`finalize`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attach import check_gate_sample
from .blocks import GATHER_COST, auto_mode
from .budget import FILLED, Budget, budget_ratios, parse_budgets, project_and_fill, starved_by_padding
from .compact import compact, silence_channels, unpruned_copy
from .errors import BudgetError, ConfigError, TrainingDiverged
from .gates import FAINT_GATE, OPEN_LOG_ALPHA
from .graph import ChannelGraph
from .liveness import (AUTO_WIDE_MULTIPLE, BlockMode, Padding, auto_paddings, effective_masks, has_tied_channels,
                       wide_padding)
from .measured import PADDING_PAYS, RUNTIME_LATENCIES, meet_measured_latency, padding_speedup
from .methods import create_method
from .objectives import check_schedule_end
from . import cpu_allocator, distributed, gate_start
from .plan import make_plan
from .precision import float32
from .resources import METRICS, CostModel, resource_report
from .runtimes import copies_of_first, default_runtime
from .sparsity import check_weight_budget, count_kept, project_weights, scale_weights, weight_counts

BLOCKS = ("auto", "mixed", "regular")


def deploy_runtime_of(deploy_runtime: str | None, budgets: list[Budget]) -> str:
    """The runtime the result is deployed in: the one named, else (None, or ``"none"``: no
    timing asked) :func:`budgetprune.runtimes.default_runtime` for ``budgets``."""
    return default_runtime([b.metric for b in budgets]) if deploy_runtime in (None, "none") else deploy_runtime


def default_form(metrics: list[str]) -> tuple[str, int | str]:
    """``(block, channel_multiple)`` for a run whose budgets are on ``metrics`` and that names
    neither. Under activation-volume budgets alone (seed 001's budget) mixed blocks at exact
    widths, seed 001's form (section 4.2, the mixed-connectivity block): every channel the budget pays for
    is one the method trained, where a padded width or a regular block's shared width spends part
    of it on channels no training chose (on ResNet-20 at 4× and 8× fewer activations that cost
    several points of validation accuracy: README, "The deployed form follows the budget"). With a
    budget on FLOPs, parameters or latency, the fastest form: ``"auto"`` blocks (per residual sum
    the faster) and the ``"auto"`` padding."""
    if metrics and all(m == "volume" for m in metrics):
        return "mixed", 1
    return "auto", "auto"


def resolve_form(block: str | None, channel_multiple: int | str | None, metrics: list[str]) -> tuple[str, int | str]:
    """``block`` and ``channel_multiple``, a None taken from :func:`default_form` for budgets on ``metrics``."""
    default_block, default_multiple = default_form(metrics)
    return (default_block if block is None else block,
            default_multiple if channel_multiple is None else channel_multiple)


def block_mode(block: str, channel_multiple: int | str = "auto", runtime: str = "eager",
               gather_cost: float | None = None) -> BlockMode:
    """The residual ``block`` with its widths padded to ``channel_multiple`` (``"auto"``:
    the first of :func:`budgetprune.liveness.auto_paddings`), or a one-line error. ``"auto"`` blocks weigh a
    mixed sum's gather at its cost in ``runtime`` unless ``gather_cost`` is given."""
    if block not in BLOCKS:
        raise ConfigError(f"block must be one of {', '.join(BLOCKS)}, not {block!r}")
    padding = check_channel_multiple(channel_multiple)
    if gather_cost is not None and not (isinstance(gather_cost, (int, float)) and not isinstance(gather_cost, bool)
                                        and 0 <= gather_cost < float("inf")):
        raise ConfigError(f"gather_cost must be a non-negative number of multiply-adds, got {gather_cost!r}")
    if block != "auto":
        return BlockMode(block, padding)
    if runtime not in GATHER_COST:
        raise ConfigError(f"unknown runtime '{runtime}': choose one of {', '.join(GATHER_COST)}")
    return auto_mode(runtime, padding, gather_cost)


def check_channel_multiple(channel_multiple: int | str) -> Padding:
    """The padding ``channel_multiple`` asks for first: ``"auto"`` (multiples of 8 in feature maps
    and token tensors, :func:`budgetprune.liveness.auto_paddings`) or a
    positive int (every width; 1: exact widths)."""
    return padding_ladder(channel_multiple)[0]


def padding_ladder(channel_multiple: int | str) -> tuple[Padding, ...]:
    """The paddings finalize tries in turn, keeping the first whose network ends within
    [:data:`~budgetprune.budget.FILLED`, 1] of its budget (else the fullest) and, but for the last,
    leaves the channels the method chose at least :data:`~budgetprune.budget.PADDING_KEEPS` of it
    (:func:`~budgetprune.budget.chosen_share`): ``"auto"``'s
    (:func:`budgetprune.liveness.auto_paddings`), or the one a positive int asks for."""
    if channel_multiple == "auto":
        return auto_paddings()
    if type(channel_multiple) is not int or channel_multiple < 1:
        raise ConfigError(f"channel_multiple must be 'auto' or a positive int (1: exact widths), got "
                          f"{channel_multiple!r:.40}")
    return (Padding(channel_multiple),)


_MARK = "_budgetprune_pruner"  # on a model while a Pruner's gates are attached to it


def method_settings(*, lam: float | None = None, schedule: str = "sigmoid", schedule_hardness: float | None = None,
                    schedule_end: float = 1.0, gate_lr: float | None = None, gate_init: float | None = None,
                    dual_lr: float | None = None, dataset_size: int | None = None,
                    granularity: str = "channel") -> dict:
    """Run-wide settings a method may take (each takes those it has; see ``create_method``).
    ``gate_init`` None: Hard Concrete gates start open (:data:`~budgetprune.gates.OPEN_LOG_ALPHA`,
    the model is trained), ``cs`` at s₀ = 0."""
    return {"lam": lam, "schedule": schedule, "hardness": schedule_hardness, "schedule_end": schedule_end,
            "gate_lr": gate_lr,
            "gate_init": OPEN_LOG_ALPHA if gate_init is None else gate_init,
            "s0": 0.0 if gate_init is None else gate_init, "dual_lr": dual_lr, "dataset_size": dataset_size,
            "granularity": granularity}


def check_count(value, name: str, counts: str) -> int:
    """``value`` if it is a whole number ≥ 1, else a one-line error naming the option ``name`` and
    what it ``counts``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number ≥ 1 ({counts}), got {value!r:.40}")
    return value


def check_deploy_batch(deploy_batch, name: str = "deploy_batch") -> int:
    """``deploy_batch`` if it is a whole number of examples ≥ 1, else a one-line error naming the
    option ``name``."""
    return check_count(deploy_batch, name, "examples: the batch the pruned network runs at where it is deployed")


def check_prunable(model: nn.Module, graph: ChannelGraph, budgets: list[Budget], *, method: str = "bar",
                   granularity: str = "channel", block: str | None = None,
                   channel_multiple: int | str | None = None, deploy_runtime: str | None = None,
                   gather_cost: float | None = None, method_options: dict | None = None,
                   metric: str | None = None, fill: bool = True,
                   gate_inputs: bool = True, gate_sample: str = "example", time_padding: bool = False,
                   deploy_batch: int = 1, cpu_buffers: str = "keep", **settings) -> None:
    """Raise a one-line error when ``budgets`` cannot be met on ``model`` or the method's options
    do not fit it, before any training; takes the :class:`Pruner`'s options (the pipeline checks
    them before it trains a teacher)."""
    check_gate_sample(gate_sample)
    check_deploy_batch(deploy_batch)
    cpu_allocator.check_cpu_buffers(cpu_buffers)
    if not isinstance(time_padding, bool):
        raise ConfigError(f"time_padding must be True or False, got {time_padding!r}")
    block, channel_multiple = resolve_form(block, channel_multiple, [b.metric for b in budgets])
    block = block_mode(block, channel_multiple, deploy_runtime_of(deploy_runtime, budgets), gather_cost)
    timed = [b.metric for b in budgets if b.metric in RUNTIME_LATENCIES]
    if timed and block == "mixed" and granularity == "channel":
        raise ConfigError(f"a {timed[0]} budget cannot use mixed blocks: its table times the layers, not the "
                          "channel gathers of mixed blocks, which in that runtime can cost more than the channels "
                          "they save; use block='auto' (--block auto, the default: it weighs each gather) or "
                          "'regular'")
    unknown = set(settings) - set(method_settings.__kwdefaults__)
    if unknown:
        raise ConfigError(f"unknown Pruner option(s) {', '.join(sorted(unknown))}; it takes "
                          f"{', '.join(sorted(method_settings.__kwdefaults__))}")
    check_schedule_end(settings.get("schedule_end", 1.0))
    if granularity == "weight":
        check_weight_budget(budgets[0].absolute(graph), weight_counts(model))
    else:
        loosest = BlockMode(str(block), padding_ladder(channel_multiple)[-1 if fill else 0], block.gather_cost)
        for budget in budgets:
            budget.check_reachable(graph, loosest)  # counted with the padded widths finalize may end with
    create_method(method, shared=method_settings(granularity=granularity, **settings),
                  **(method_options or {})).check(model, graph)


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output: a tensor, or a dict, list or tuple of them (nested)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def output_difference(reference, output) -> tuple[float, float]:
    """(largest absolute difference, max(1, largest |reference|)) of two outputs of the same
    structure; raises TrainingDiverged when either is not finite."""
    ref, out = _tensors(reference), _tensors(output)
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        raise RuntimeError("internal error: the compacted network's outputs have another structure than the "
                           "gated model's")
    if not all(bool(torch.isfinite(t).all()) for t in ref + out):
        raise TrainingDiverged("the pruned network's outputs are NaN or infinite after pruning")
    diff = max((float((a - b).abs().max()) for a, b in zip(ref, out) if a.numel()), default=0.0)
    return diff, max([1.0] + [float(a.abs().max()) for a in ref if a.numel()])


class Pruner:
    """Prunes ``model`` under ``budget`` while any training loop trains it.

    ``example_inputs`` is one batch of inputs (a tensor) the model takes; it fixes the feature
    map sizes the costs are counted on and checks the compacted network. ``budget`` is a
    fraction (``0.25``), a factor (``"4x"``) or one budget per metric (``"flops=0.25,volume=0.5"``)
    of the unpruned ``metric`` (``volume`` by default; ``nonzero`` with ``granularity="weight"``).
    ``total_steps`` is the number of :meth:`step` calls over which the budget moves from the full
    cost to the target (the method's schedule). The other options are those of the method
    (``lam``, ``gate_lr``, ``gate_init``, ...; ``method_options`` for its own, e.g.
    ``{"rounds": 3}`` for ``cs``; Hard Concrete gates start open,
    :data:`~budgetprune.gates.OPEN_LOG_ALPHA`, as the model is taken to be trained:
    ``gate_init=0.0`` is seed 001's start for training from scratch), the granularity, the residual ``block`` of the compacted
    network (``"auto"``: per residual space mixed or regular, whichever runs faster in
    ``deploy_runtime``, its gathers weighed at ``gather_cost``, :mod:`budgetprune.blocks`;
    ``"mixed"``; ``"regular"``), ``channel_multiple`` (every width padded to a multiple of that
    many channels, counted in the budget: the widths onnxruntime's fast CPU convolutions need, 8
    or 16; ``"auto"`` pads feature maps and token tensors to multiples of 8 and
    leaves (batch, features) tensors exact, and where that ends under 0.95 of the budget after the
    fill, pads only those of 32 channels or more, then only those that keep 32 or more, else keeps
    exact widths, :func:`budgetprune.liveness.auto_paddings`; 1: exact widths; where a run names
    neither (None, the defaults), mixed blocks at exact widths under volume budgets alone and
    ``"auto"`` for both with a FLOP, parameter or latency budget, :func:`default_form`; :attr:`block`
    after :meth:`finalize` holds the padding kept; with ``time_padding=True``, as the command line
    does, finalize where it kept multiples of 8 also projects the budget with every width a multiple of
    16 and keeps that where it runs at least 1.05× faster (the blocks of an AVX-512 CPU, the report's
    ``wide_padding_timing``, :data:`budgetprune.liveness.AUTO_WIDE_MULTIPLE`), then projects it at
    exact widths, times both networks in
    ``deploy_runtime`` at ``deploy_batch`` and keeps the padding only where it runs at least 1.05×
    faster, :func:`budgetprune.measured.padding_speedup`, the report's ``padding_timing``; not under a
    latency budget timed in a runtime, whose search times the padded network itself) and whether the final projection
    ``fill``\\ s up to the budget. ``deploy_batch`` (default 1) is the batch the pruned network
    will run at: latency budgets time their layers and the exported network at it, and the padding
    is timed at it. ``gate_sample`` is how a
    stochastic gate is sampled in training: once per example and channel (``"example"``, the
    default) or once per channel for the whole batch (``"batch"``: the gate then folds into its
    host's weights, no pass over the feature maps; see :mod:`budgetprune.attach`). ``cpu_buffers``
    (``"keep"``, the default) asks glibc's malloc, when the model is on the CPU, to keep freed
    buffers for reuse instead of mapping large ones anew at every step (faster CPU steps at large
    inputs; the process holds its peak memory; :mod:`budgetprune.cpu_allocator`, which leaves an
    allocator the user chose alone); ``"system"`` leaves the allocator as it is.

    The pruner attaches the method's gates to ``model`` in place; put the model on its device
    first (the gates follow it).

    Mixed precision: :meth:`penalty`, :meth:`step` and :meth:`finalize` may be called inside
    ``torch.autocast``; they compute in float32 (as the gates do when sampled). Several processes
    (torch.distributed): build the pruner on every rank, before or after wrapping the model in
    DistributedDataParallel (the trainer callbacks build it after: the gates are not the
    wrapper's parameters, the pruner averages their gradients itself); the gates and the
    method's state stay the same on every rank and :meth:`finalize` gives every rank the network
    rank 0 decided (see :class:`_ProcessSync`).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, budget: float | str | list[Budget], *,
                 total_steps: int, metric: str | None = None, method: str = "bar", granularity: str = "channel",
                 block: str | None = None, channel_multiple: int | str | None = None,
                 deploy_runtime: str | None = None,
                 gather_cost: float | None = None, fill: bool = True, gate_inputs: bool = True,
                 gate_sample: str = "example", time_padding: bool = False, deploy_batch: int = 1,
                 cpu_buffers: str = "keep", method_options: dict | None = None,
                 log: Callable[[str], None] | None = None, **settings):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(example_inputs, torch.Tensor):
            raise ConfigError("example_inputs must be one batch of inputs as a tensor (budgetprune traces models "
                              f"of one tensor input), got {type(example_inputs).__name__}")
        if getattr(model, _MARK, None) is not None:
            raise ConfigError("the model already has a Pruner's gates attached: finalize() that pruner first, "
                              "or build a new model")
        if type(total_steps) is not int or total_steps < 1:
            raise ConfigError(f"total_steps must be a positive int (the optimiser steps of the pruning phase), "
                              f"got {total_steps!r}")
        metric = metric or ("nonzero" if granularity == "weight" else "volume")
        self.budgets = list(budget) if isinstance(budget, (list, tuple)) else parse_budgets(budget, metric)
        self.budget = self.budgets[0]
        self.model = model
        self.fill = fill
        self.per_weight = granularity == "weight"
        self.granularity = granularity
        self.gate_inputs = gate_inputs
        self.total_steps = total_steps
        self.steps = 0
        self.log = log or (lambda _line: None)
        device = next((p.device for p in model.parameters()), example_inputs.device)
        self.example = example_inputs.detach().to(device)
        self.graph = ChannelGraph.build(model, self.example, gate_inputs=gate_inputs)
        self.graph.latency_batch = self.deploy_batch = check_deploy_batch(deploy_batch)
        self.deploy_runtime = deploy_runtime_of(deploy_runtime, self.budgets)
        block, channel_multiple = resolve_form(block, channel_multiple, [b.metric for b in self.budgets])
        check_prunable(model, self.graph, self.budgets, method=method, granularity=granularity, block=block,
                       channel_multiple=channel_multiple, deploy_runtime=self.deploy_runtime, gather_cost=gather_cost,
                       gate_sample=gate_sample, time_padding=time_padding, deploy_batch=deploy_batch,
                       cpu_buffers=cpu_buffers, method_options=method_options, **settings)
        self.cpu_buffers_kept = cpu_allocator.prepare(device, cpu_buffers, self.log)
        self.block = block_mode(block, channel_multiple, self.deploy_runtime, gather_cost)
        self.paddings = padding_ladder(channel_multiple)  # with the fill, finalize keeps the first that ends on budget
        self.time_padding = time_padding  # auto padding kept only where it measures faster than exact widths
        self.metrics = METRICS + tuple(b.metric for b in self.budgets if b.metric not in METRICS)
        self.full = resource_report(self.graph, metrics=self.metrics)
        self.method = create_method(method, shared=method_settings(granularity=granularity, **settings),
                                    **(method_options or {}))
        self.method.gate_sample = gate_sample
        self.method.attach(model, self.graph, self.budgets)
        self.method.to(device)
        setattr(model, _MARK, self)
        self._sync = _ProcessSync(self.method, model)  # several processes: the same gates and decisions on each
        self.weight_masks: dict[str, torch.Tensor] | None = None  # after finalize(), per-weight pruning
        self.result: tuple[nn.Module, dict] | None = None  # what finalize() returned
        self.gate_start: dict | None = None  # what choose_gate_start() measured

    # -- what a training loop calls ----------------------------------------------------------
    @property
    def progress(self) -> float:
        """Fraction of ``total_steps`` done: the clock of the budget schedule."""
        return min(self.steps / self.total_steps, 1.0)

    def parameters(self, lr: float, weight_decay: float | None = None) -> list[dict]:
        """Optimiser parameter groups: the model's weights (``name="weights"``), then the method's
        own (gates: their own learning rate, no weight decay)."""
        weights = {"params": [p for p in self.model.parameters() if p.requires_grad], "lr": lr, "name": "weights"}
        if weight_decay is not None:
            weights["weight_decay"] = weight_decay
        return [weights] + self.method_parameters(lr)

    def method_parameters(self, lr: float) -> list[dict]:
        """The method's own parameter groups only (gates), for an optimizer that already holds the
        model's weights (``optimizer.add_param_group``)."""
        return self.method.param_groups(lr)

    def penalty(self) -> torch.Tensor:
        """The method's term to add to the task loss at the current step (a float32 scalar tensor).

        It may be called inside an autocast region (mixed precision): the gate probabilities,
        costs and barrier are computed with autocast off, in float32."""
        self._check_open("penalty()")
        with float32(self.example.device):
            return self.method.penalty(self.progress).float()

    def step(self) -> None:
        """Call once after each optimiser step: the method's update (dual ascent, clamps, rounds),
        in float32 like :meth:`penalty`."""
        self._check_open("step()")
        with float32(self.example.device):
            self._sync.before_step()
            self.method.after_step(self.progress)
            self._sync.after_step()
        self.steps += 1

    def choose_gate_start(self, batches, *, survival: float = gate_start.SURVIVAL, forward=None,
                          agree=None, inputs=None, module: nn.Module | None = None) -> float:
        """Start the Hard Concrete gates at the lowest log α (0, 0.5, ..., 4) whose training-time
        noise the model survives: where, sampled as in a training step, the gated model still gives
        the ungated model's answer on at least ``survival`` of the examples of ``batches`` (a few
        training batches: tensors or (inputs, targets) pairs). Call it once, before the first
        :meth:`step`. ``inputs(batch)`` takes a batch's inputs (default: the batch, or its first
        item); ``forward(model, inputs)`` runs them (default ``model(inputs)``), where ``model`` is
        ``module`` (default the pruned model; a module around it, such as a trainer's model with its
        head, runs with its modes and buffers restored afterwards); ``agree(output, reference)``
        gives a per-example bool tensor (default: the same top-1 class of a (batch, classes)
        output, or of the first tensor of a tuple or dict output). Returns the start;
        :attr:`gate_start` keeps the measurements. See :mod:`budgetprune.gate_start`."""
        self._check_open("choose_gate_start()")
        survival = gate_start.check_survival(survival)
        if self.steps:
            raise ConfigError("choose_gate_start() after step(): the gates have moved; choose their start before "
                              "the first step")
        if module is not None and not any(m is self.model for m in module.modules()):
            raise ConfigError("choose_gate_start(module=...) runs a module that does not hold the pruned model: "
                              "pass the model around it, or no module")
        table = gate_start.survival_table(self.model if module is None else module, self.method, batches,
                                          forward=forward, agree=agree, inputs=inputs)
        start = gate_start.choose_start(table, survival)
        gate_start.place(gate_start.hard_concrete_gates(self.method), start)
        self._sync.broadcast_state()
        self.gate_start = {"log_alpha": start, "survival": survival,
                           "agreement": [[s, fraction] for s, fraction in sorted(table.items())]}
        self.log(gate_start.describe(table, start, survival))
        return start

    def deploy_example(self) -> torch.Tensor:
        """What the deployed network is timed on: ``deploy_batch`` copies of the first example."""
        return copies_of_first(self.example, self.deploy_batch)

    def _check_open(self, call: str) -> None:
        if self.result is not None:
            raise ConfigError(f"{call} after finalize(): the pruner has handed back its pruned model; train that "
                              "model without the pruner (fine-tuning), or build a new Pruner")

    def status(self) -> dict[str, float]:
        """What to log: the method's numbers (BAR: hard cost ``V``, moving budget ``b``, barrier ``f``;
        one of each per metric with several budgets) and ``progress``."""
        return {**self.method.status(), "progress": self.progress}

    def train(self, mode: bool = True) -> "Pruner":
        """Sampled gates (training) or deterministic ones (``mode=False``, for evaluation)."""
        self.method.train(mode)
        return self

    def eval(self) -> "Pruner":
        return self.train(False)

    def state_dict(self) -> dict:
        """The method's state and the step count: save it with the model and optimizer to resume."""
        state = {"method": self.method.state_dict(), "steps": self.steps}
        if self.gate_start is not None:
            state["gate_start"] = self.gate_start
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; under torch.distributed, call it on every rank (rank 0's
        state is then broadcast)."""
        record = gate_start.check_record(state.get("gate_start"))  # checked before anything changes
        steps = state["steps"]
        if type(steps) is not int or steps < 0:
            raise ConfigError(f"pruner state has step count {steps!r}, not a count")
        self.method.load_state_dict(state["method"])
        self.steps = steps
        self.gate_start = record
        self._sync.broadcast_state()

    # -- the end ---------------------------------------------------------------------------
    def finalize(self, inputs: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
        """Hard-prune, meet the budget exactly, compact; ``(smaller model, report)``.

        The method's own masks are projected onto every budget (lowest keep-scores dropped)
        and, with ``fill``, closed channels reopen while the budget holds; the gates' values are
        folded into the weights, the method's hooks removed, and the physically smaller network
        checked against the gated one on ``inputs`` (default: ``example_inputs``). The report
        holds the costs before and after, what the projection dropped and the fill reopened,
        the kept channels per group, the output difference and the pruning plan (and
        ``gate_start``, what :meth:`choose_gate_start` measured, where it ran).

        Both networks are left in eval mode; the original model is left without gates, its
        reopened channels' outgoing weights zeroed (it computes what the pruned one does). A
        second call returns the same result; :meth:`penalty` and :meth:`step` refuse after it."""
        if self.result is not None:
            return self.result  # finalize() twice: the same result
        x = (self.example if inputs is None else inputs).to(self.example.device)
        try:
            with float32(self.example.device):  # the projection and the output check, also inside autocast
                self.result = self._finalize_weights(x) if self.per_weight else self._finalize_channels(x)
            if self.gate_start is not None:  # where choose_gate_start() put the gates, and why
                self.result[1]["gate_start"] = self.gate_start
        finally:
            self.method.detach()  # the user's model gets its plain forward back, whatever happened
            self._sync.close()
            if getattr(self.model, _MARK, None) is self:
                delattr(self.model, _MARK)
        return self.result

    def _decide_channels(self) -> dict:
        """The hard decision: the method's masks projected onto every budget, then filled up to it
        (what was kept, dropped and reopened, and the costs before)."""
        graph, method = self.graph, self.method
        masks = method.keep_masks()
        scores = method.scores()
        # without the fill a network may end under its budget by the method's choice: no finer padding
        modes = [BlockMode(str(self.block), padding, self.block.gather_cost)
                 for padding in (self.paddings if self.fill else self.paddings[:1])]
        if self.fill and modes[0].multiple > 1 and has_tied_channels(graph):
            # tied channels pad in coarse steps (a grouped conv's, by the multiple in every conv group):
            # where that cannot end on the budget, the same padding with them exact comes next
            modes.insert(1, BlockMode(str(self.block), modes[0].padding(), self.block.gather_cost, pad_tied=False))
            modes[2:] = [BlockMode(str(m), m.padding(), m.gather_cost, pad_tied=False) for m in modes[2:]]
        projected = []  # (masks, mode) of every projection: a timed latency budget may keep an earlier one

        def mode_of(kept: dict) -> BlockMode:
            return next((mode for masks_, mode in projected if masks_ is kept), modes[0])

        def project_with(budgets: list[Budget], mode: BlockMode) -> tuple[dict, dict]:
            return project_and_fill(graph, masks, scores, budgets, mode, self.fill)

        def project(budgets: list[Budget]) -> tuple[dict, dict]:
            # each padding in turn (channel_multiple="auto"), until one ends close enough to the budget
            best = None  # (fullness, final, reopened, mode)
            for i, mode in enumerate(modes):
                try:
                    final, reopened = project_with(budgets, mode)
                except BudgetError as error:
                    if best is None and i + 1 == len(modes):
                        raise
                    if i + 1 < len(modes):
                        self.log(f"{mode.describe_padding()}: cannot meet the budget ({error}); "
                                 f"trying {modes[i + 1].describe_padding()}")
                    continue
                fullness = max(budget_ratios(graph, final, budgets, mode))
                starved = mode.multiple > 1 and i + 1 < len(modes) and starved_by_padding(graph, masks, final,
                                                                                          budgets, mode)
                if starved:
                    self.log(f"{mode.describe_padding()}: {starved}; trying {modes[i + 1].describe_padding()}")
                    continue
                if best is None or fullness > best[0]:
                    best = (fullness, final, reopened, mode)
                if fullness >= FILLED:
                    break
                if i + 1 < len(modes):
                    self.log(f"{mode.describe_padding()}: ends at {fullness:.4f} of the budget, under {FILLED}; "
                             f"trying {modes[i + 1].describe_padding()}")
            projected.append((best[1], best[3]))
            return best[1], best[2]

        final, reopened, measured = meet_measured_latency(  # timed against the model itself (None)
            project, lambda kept: unpruned_copy(self.model, graph) if kept is None else
            compact(self.model, graph, kept, mode=mode_of(kept)), self.budgets, self.deploy_example(), self.log)
        kept_mode = mode_of(final)  # the padding of the projection kept, not of the last one tried
        timing = wide_timing = None
        # channel_multiple="auto" (a latency budget timed in a runtime has timed the padded network already)
        timed = self.time_padding and measured is None and len(self.paddings) > 1
        if timed and kept_mode.padding() == self.paddings[0] and kept_mode.multiple < AUTO_WIDE_MULTIPLE:
            wide_timing, wide = self._time_wide_padding(final, kept_mode, project_with, masks)
            if wide is not None:
                (final, reopened), kept_mode = wide
        if timed and kept_mode.multiple > 1:
            exact_mode = BlockMode(str(self.block), Padding(), self.block.gather_cost)
            timing, exact = self._time_padding(final, kept_mode, exact_mode, project_with)
            if exact is not None:
                (final, reopened), kept_mode = exact, exact_mode
        dropped = int(sum(int(masks[g].sum()) - int(final[g].sum()) + int(reopened.get(g, torch.empty(0)).numel())
                          for g in masks))
        # the method's own masks, counted as the result is (the block and padding kept), so "before → after"
        # compares like with like (a padded count of masks kept at exact widths could be several times theirs)
        before = {b.metric: CostModel(graph, b.metric, kept_mode).hard(masks) for b in self.budgets}
        return {"final": final, "dropped": dropped, "reopened": reopened, "before": before, "measured": measured,
                "block": kept_mode, "padding_timing": timing, "wide_padding_timing": wide_timing}

    def _time_wide_padding(self, kept: dict, kept_mode: BlockMode, project_with, chosen: dict):
        """``time_padding`` where the first auto padding was kept: the budget projected again with every
        width a multiple of :data:`~budgetprune.liveness.AUTO_WIDE_MULTIPLE`, both networks timed in the
deploy runtime (``chosen``: the method's own masks). Returns the timing (``multiple``, ``against``: the two multiples, ``ms`` and
        ``against_ms`` their times, ``speedup``, ``pays``; or ``error``) and, where the wider padding ends
        within [FILLED, 1] of the budget, leaves the method's channels at least
        :data:`~budgetprune.budget.PADDING_KEEPS` of it and runs at least
        :data:`~budgetprune.measured.PADDING_PAYS`× faster, ``((final, reopened), mode)`` to keep instead (else None)."""
        wide_mode = BlockMode(str(self.block), wide_padding(), self.block.gather_cost, pad_tied=kept_mode.pad_tied)
        record = {"runtime": self.deploy_runtime, "multiple": wide_mode.multiple, "against": kept_mode.multiple}
        keeping = f"keeping {kept_mode.describe_padding()}"
        try:
            wide = project_with(self.budgets, wide_mode)
        except BudgetError as error:
            self.log(f"{wide_mode.describe_padding()}: cannot meet the budget ({error}); {keeping}")
            return {**record, "error": f"cannot meet the budget: {error}"}, None
        fullness = max(budget_ratios(self.graph, wide[0], self.budgets, wide_mode))
        if fullness < FILLED:
            self.log(f"{wide_mode.describe_padding()}: ends at {fullness:.4f} of the budget, under {FILLED}; {keeping}")
            return {**record, "error": f"ends at {fullness:.4f} of the budget, under {FILLED}"}, None
        starved = starved_by_padding(self.graph, chosen, wide[0], self.budgets, wide_mode)
        if starved:
            self.log(f"{wide_mode.describe_padding()}: {starved}; {keeping}")
            return {**record, "error": starved}, None
        nets = [compact(self.model, self.graph, masks, mode=mode) for masks, mode in
                ((kept, kept_mode), (wide[0], wide_mode))]
        speed = padding_speedup(*nets, self.deploy_example(), self.deploy_runtime)
        if "error" in speed:
            self.log(f"no usable timing of the wider padding in {self.deploy_runtime} ({speed['error']}); {keeping}")
            return {**record, **{k: v for k, v in speed.items() if k != "runtime"}}, None
        timing = {**record, "batch": speed["batch"], "ms": speed["padded_ms"], "against_ms": speed["exact_ms"],
                  "speedup": speed["speedup"], "pairs": speed["pairs"], "others_cpu": speed["others_cpu"],
                  "pays": speed["pays"]}
        verdict = "keeping it" if timing["pays"] else f"under {PADDING_PAYS}×: {keeping}"
        self.log(f"{wide_mode.describe_padding()}: {timing['ms']:.4g} ms against {timing['against_ms']:.4g} ms at "
                 f"multiples of {kept_mode.multiple} in {self.deploy_runtime} (batch {timing['batch']}), "
                 f"{timing['speedup']:.2f}× faster; {verdict}")
        return timing, ((wide, wide_mode) if timing["pays"] else None)

    def _time_padding(self, padded: dict, padded_mode: BlockMode, exact_mode: BlockMode, project_with):
        """``time_padding``: the budget projected again at exact widths, both networks timed in the
        deploy runtime (:func:`budgetprune.measured.padding_speedup`). Returns the timing and, where
        the padding does not pay, the exact ``(final, reopened)`` to keep instead (else None)."""
        try:
            exact = project_with(self.budgets, exact_mode)
        except BudgetError as error:
            self.log(f"exact widths cannot meet the budget ({error}); keeping {padded_mode.describe_padding()}")
            return {"runtime": self.deploy_runtime, "error": f"exact widths: {error}"}, None
        nets = [compact(self.model, self.graph, masks, mode=mode) for masks, mode in
                ((exact[0], exact_mode), (padded, padded_mode))]
        timing = padding_speedup(*nets, self.deploy_example(), self.deploy_runtime)
        if "error" in timing:
            self.log(f"no usable timing of the padded network in {self.deploy_runtime} ({timing['error']}); "
                     f"keeping {padded_mode.describe_padding()}")
            return timing, None
        verdict = "keeping it" if timing["pays"] else f"under {PADDING_PAYS}×: keeping exact widths"
        self.log(f"{padded_mode.describe_padding()}: {timing['padded_ms']:.4g} ms against {timing['exact_ms']:.4g} ms "
                 f"at exact widths in {self.deploy_runtime} (batch {timing['batch']}), {timing['speedup']:.2f}× "
                 f"faster; {verdict}")
        return timing, None if timing["pays"] else exact

    def _finalize_channels(self, x: torch.Tensor) -> tuple[nn.Module, dict]:
        decision = self._sync.decide(self._decide_channels)  # computed on rank 0, the same on every rank
        self.block = decision["block"]  # the padding finalize kept (channel_multiple="auto" tries several)
        graph, method, block = self.graph, self.method, self.block
        final, dropped, reopened, before = (decision[k] for k in ("final", "dropped", "reopened", "before"))
        costs = {b.metric: (CostModel(graph, b.metric, block), b.absolute(graph)) for b in self.budgets}
        n_reopened = int(sum(i.numel() for i in reopened.values()))
        moves = []
        for m, (cm, limit) in costs.items():
            after = cm.hard(final)
            moves.append(f"{m} {before[m]:.6g} → {after:.6g} (budget {limit:.6g}, {after / limit:.4f} of it)")
        self.log(f"hard-prune: {'; '.join(moves)}; the budget projection dropped {dropped} channels"
                 + (f" and reopened {n_reopened}" if n_reopened else ""))
        if dropped and n_reopened and block.multiple == 1:  # padded, the projection aims under the budget
            projected = {g: m.clone() for g, m in final.items()}  # before the fill
            for g, idx in reopened.items():
                projected[g][idx] = False
            cm, limit = costs[self.budget.metric]
            after_projection = cm.hard(projected)
            if before[self.budget.metric] > limit and after_projection < FILLED * limit:
                self.log(overshoot_note(self.budget.metric, before[self.budget.metric], after_projection, limit,
                                        dropped, n_reopened))
        values = method.gate_values()
        if n_reopened:  # reopened channels pass with gate 1 and start with zero outgoing weights
            silence_channels(self.model, graph, reopened)
            for g, idx in reopened.items():
                values[g] = values[g].clone()
                values[g][idx.to(values[g].device)] = 1.0
        values = {g: values[g] * final[g].to(values[g].device).float() for g in final}
        lowest, faint = kept_gates(values, final)
        if faint:
            self.log(f"note: {sum(faint.values())} kept channel(s) pass under {FAINT_GATE:g} of their signal "
                     f"(their gate; smallest per group: "
                     f"{', '.join(f'{g} {lowest[g]:.2g}' for g in sorted(faint, key=lowest.get)[:4])}"
                     f"{', ...' if len(faint) > 4 else ''}); the gate is folded into their weights, which "
                     "fine-tuning may not bring back to size")
        method.freeze(final, values)
        self.model.eval()
        method.eval()
        net = compact(self.model, graph, final, values, mode=block)
        with torch.no_grad():
            diff = self._check_outputs(self.model(x), net(x), "compacted")
        kept = effective_masks(graph, final)  # what the compacted network keeps (pruned-away blocks: none)
        self._attach_plan(net, final)
        report = {"cost_before_projection": before[self.budget.metric], "channels_dropped_by_projection": dropped,
                  "channels_reopened_by_fill": n_reopened, "compaction_max_abs_diff": diff,
                  "lowest_kept_gate": lowest, "faint_kept_channels": faint,
                  "padding": list(block.padding()), "pad_tied": block.pad_tied,
                  "masks": {g: [int(i) for i in torch.nonzero(m).flatten()] for g, m in kept.items()},
                  "pruned": resource_report(graph, final, block, self.metrics),
                  "pruned_by_block": {name: resource_report(graph, final, mode, self.metrics)
                                      for name, mode in self._block_modes().items()},
                  "plan": net.budgetprune_plan}
        if decision.get("measured") is not None:  # a runtime latency budget: the timed projections
            report["measured_latency"] = decision["measured"]
        if decision.get("padding_timing") is not None:  # time_padding: the padded network against exact widths
            report["padding_timing"] = decision["padding_timing"]
        if decision.get("wide_padding_timing") is not None:  # time_padding: multiples of 16 against 8
            report["wide_padding_timing"] = decision["wide_padding_timing"]
        return net, report

    def _finalize_weights(self, x: torch.Tensor) -> tuple[nn.Module, dict]:
        """Per-weight masks → exactly floor(B) non-zero weights → weights zeroed in place.

        Weights the fill reopens start at 0 (the function is unchanged) and may grow in
        fine-tuning; :attr:`weight_masks` then says which weights must stay 0."""
        method = self.method
        masks = method.keep_masks()
        limit = self.budget.absolute(self.graph)
        final = self._sync.decide(lambda: project_weights(masks, method.scores(), limit, fill=self.fill))
        dropped = sum(int((masks[n].cpu() & ~final[n]).sum()) for n in final)
        reopened = {n: final[n] & ~masks[n].cpu() for n in final}
        n_reopened = count_kept(reopened)
        before = count_kept(masks)
        self.log(f"hard-prune: nonzero weights {before} → {count_kept(final)} (budget {limit:.6g}, "
                 f"{count_kept(final) / limit:.4f} of it); the budget projection dropped {dropped} weights"
                 + (f" and reopened {n_reopened} at 0" if n_reopened else ""))
        values = method.gate_values()
        values = {n: values[n].detach().reshape(-1) * (final[n] & ~reopened[n]).to(values[n].device).reshape(-1).float()
                  for n in final}
        method.freeze(final, values)
        self.model.eval()
        method.eval()
        with torch.no_grad():
            reference = self.model(x)
        method.detach()  # the unmasked weights are back; fold the masks into them
        scale_weights(self.model, values)  # values are 0 on every weight that is not kept
        net = compact(self.model, self.graph)  # same widths, pruned weights exactly 0
        with torch.no_grad():
            diff = self._check_outputs(reference, net(x), "sparse")
        self.weight_masks = final
        self._attach_plan(net, None)
        pruned = resource_report(self.graph, None, self.block, self.metrics)
        pruned["nonzero"] = float(count_kept(final))
        report = {"cost_before_projection": float(before), "channels_dropped_by_projection": 0,
                  "channels_reopened_by_fill": 0, "weights_dropped_by_projection": dropped,
                  "weights_reopened_by_fill": n_reopened, "compaction_max_abs_diff": diff,
                  "masks": {g: list(range(grp.channels)) for g, grp in self.graph.groups.items()},
                  "pruned": pruned, "pruned_by_block": {mode: pruned for mode in BLOCKS},
                  "plan": net.budgetprune_plan}
        return net, report

    def _block_modes(self) -> dict[str, BlockMode]:
        """Each kind of residual block with this pruner's padding, its own as it is (gather cost)."""
        padding = self.block.padding()
        tied = self.block.pad_tied
        modes = {"auto": auto_mode(self.deploy_runtime, padding, pad_tied=tied),
                 "mixed": BlockMode("mixed", padding, pad_tied=tied), "regular": BlockMode("regular", padding, pad_tied=tied)}
        return {**modes, str(self.block): self.block}

    def _attach_plan(self, net: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
        """The pruning plan rides on the compacted network: ``budgetprune.save`` writes it, so the
        network can be rebuilt from the user's own model even where no self-contained file can hold it.
        It names the blocks compaction built (``"auto"``: the spaces it kept mixed)."""
        block = getattr(net, "budgetprune_mode", self.block) if masks is not None else self.block
        net.budgetprune_plan = make_plan(self.graph, masks, block=block, granularity=self.granularity,
                                         gate_inputs=self.gate_inputs,
                                         moves_ordered=getattr(net, "budgetprune_moves_ordered", 0) > 0)

    @staticmethod
    def _check_outputs(reference, output, kind: str) -> float:
        """The largest absolute output difference; a relative one above 1e-3 is a bug of budgetprune
        (relative, because float32 sums of outputs of size 1e30 differ by 1e22 in their last bits)."""
        diff, scale = output_difference(reference, output)
        if diff > 1e-3 * scale:
            raise RuntimeError(f"internal error: the {kind} network's outputs differ from the gated model's by "
                               f"{diff:.3g} (largest output {scale:.3g})")
        return diff


class _ProcessSync:
    """What keeps a pruner the same in every process of a torch.distributed group (nothing in one).

    - At the start every rank takes rank 0's method state (gate initialisation, random scores,
      starting norms), as DistributedDataParallel does for the model.
    - The gates' gradients are averaged over the ranks as backward accumulates them, as DDP
      averages the model's; the gates then take the same optimiser step everywhere.
    - Statistics a method gathers from this process's batches (``Method.rank_statistics``,
      e.g. sensitivity's) are averaged before its update; after the update every rank takes
      rank 0's buffers (multipliers, masks, statistics, counters), so the state the method
      changes outside autograd stays identical bit for bit.
    - The hard decision of ``finalize()`` (masks, projection, fill, the padding's timing) is
      computed on rank 0 and broadcast while the other ranks wait idle; the compaction that
      follows is the same on every rank.

    Collectives go through a process group of their own, so those issued from autograd hooks
    never interleave with DDP's.
    """

    def __init__(self, method: nn.Module, model: nn.Module):
        self.method = method
        self.on = distributed.active()
        self.group = distributed.new_group()
        self.hooks: list = []
        self.statistics: set[str] = set()
        if not self.on:
            return
        device = next(iter(list(method.parameters()) + list(method.buffers())), torch.empty(0)).device
        self.device = device if torch.distributed.get_backend(self.group) == "nccl" else torch.device("cpu")
        model_params = {id(p) for p in model.parameters()}
        own = [p for p in method.parameters() if id(p) not in model_params]
        self.hooks = distributed.average_gradients(own, self.group)
        self.statistics = set(getattr(method, "rank_statistics", ()))
        self.broadcast_state()

    def broadcast_state(self) -> None:
        """Every rank takes rank 0's whole method state."""
        if self.on:
            distributed.broadcast_module(self.method, group=self.group)

    def before_step(self) -> None:
        if not self.on:
            return
        for name, buf in self.method.named_buffers():
            if name.rsplit(".", 1)[-1] in self.statistics:
                distributed.average_(buf, self.group)

    def after_step(self) -> None:
        if self.on:
            distributed.broadcast_tensors(list(self.method.buffers()), group=self.group)

    def decide(self, compute):
        """``compute()`` on rank 0, its result on every rank (tensors come back on the CPU); the
        other ranks wait idle (:func:`budgetprune.distributed.from_main`), so a timing rank 0 makes
        meanwhile runs on a quiet machine."""
        if not self.on:
            return compute()
        return distributed.from_main(lambda: _to_cpu(compute()), group=self.group, device=self.device)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def overshoot_note(metric: str, before: float, projected: float, limit: float, dropped: int, reopened: int) -> str:
    """The log's note where the gates ended over the budget and the projection, to meet it, ended
    under :data:`~budgetprune.budget.FILLED` of it (``projected``: its cost after the projection,
    before the fill): no cheaper channels covered the overshoot (the projection tries them first),
    so an expensive channel went, and the channels the fill reopened in its place start with zero
    weights. At exact widths only: with widths padded to a multiple the projection aims under the
    budget by the padding's share and the fill turns the padding into channels, so the same
    numbers say nothing about the gates.

    Why: LeNet-5 at 8× volume, BAR's defaults, 3 seeds on the same teachers
    (``benchmarks/results/methods_8_current/``): the two seeds whose gates ended 1.09× and 1.13× over
    the budget lost a map of the first convolution to the projection (576 units of volume for an
    overshoot of 176–253) and 273–274 reopened hidden units, and scored 84.30 and 84.76 % against
    87.97 % for the seed whose gates met the budget. The projection's try of cheaper channels was
    bounded in the wrong units then; bounded by cost it cut four and three second-conv maps of 64
    units instead, and the two seeds scored 87.56 and 87.55 % (``benchmarks/results/methods_8_cover/``),
    no note."""
    return (f"note: the gates ended over the budget ({metric} {before:.6g}, {before / limit:.2f} of it) and the "
            f"projection cut {dropped} channel(s) they kept, down to {projected / limit:.2f} of it: the fill reopened "
            f"{reopened} closed ones in their place, starting from zero weights. The gates had not caught up with the "
            "budget schedule when pruning ended: a longer prune stage (more epochs or steps) gives them time, and on a "
            "plain chain of layers ending BAR's budget move early (--schedule-end 0.5) is worth a validation run")


def kept_gates(values: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Per group, the smallest gate value (in magnitude: a MorphNet or Information Bottleneck scale may be
    negative) finalize folds into a kept channel (reopened channels count at 1), and how many kept
    channels it folds at under :data:`~budgetprune.gates.FAINT_GATE` (groups with none left out): a
    channel kept at a gate near 0 passes almost none of its signal, compacted too."""
    lowest, faint = {}, {}
    for g, keep in final.items():
        kept = values[g].abs().reshape(-1)[keep.to(values[g].device).reshape(-1)]
        if kept.numel():
            lowest[g] = float(kept.min())
            n_faint = int((kept < FAINT_GATE).sum())
            if n_faint:
                faint[g] = n_faint
    return lowest, faint


def _to_cpu(value):
    """``value`` with every tensor in it (in dicts, lists, tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
