"""One pruning run, start to finish, resumable at every epoch.

Stages (seed 001, supplement 3.1): the unpruned *teacher* is trained (or loaded); the
*prune* stage trains the student with the method's penalty while the budget tightens; the
student is then hard-pruned, projected onto the budget exactly and physically compacted;
the *finetune* stage trains the compacted network with knowledge distillation (with a constant
rate, first at the base learning rate and then at a tenth of it). Each stage trains with its
recipe (:meth:`PruneConfig.recipe`, :mod:`budgetprune.recipe`). After every epoch the run's state is written
atomically to ``checkpoint.pt``, so an interrupted run resumes without losing a finished
epoch.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from . import io
from . import graphio
from . import distributed
from . import gate_start, seeding
from .attach import check_gate_sample
from .cpu_allocator import check_cpu_buffers
from .cpu_allocator import prepare as prepare_cpu_buffers
from .budget import Budget
from .compact import to_plain
from .data.folder import check_folder_options
from .data.validation import check_validation, split_validation
from .engine import DivergenceCheck, evaluate, iterate_batches, num_batches, predict_logits, streams, train_epoch
from .errors import CheckpointError, ConfigError, TrainingDiverged, first_line
from .gates import travel_note
from .graph import ChannelGraph
from .inputs import check_inputs
from .methods import available_methods, check_method_options, method_options
from .objectives import check_schedule_end, distillation_loss, smoothed_cross_entropy
from .plan import make_plan
from .plan import replay as plan_replay
from .precision import autocast, check_precision, grad_scaler
from .recipe import Recipe, make_optimizer, stage_schedule
from .pruner import Pruner, check_channel_multiple, check_deploy_batch, check_prunable, resolve_form
from .resources import BUDGET_METRICS, METRICS, resource_report
from .runfolder import RunFolder
from .runtimes import check_runtime, copies_of_first, default_runtime, deployed_speed
from .sparsity import density, prunable_weights

STAGES = ("teacher", "prune", "finetune", "done")

#: Written into the run folder when training diverged after a checkpoint: the learning rate it
#: diverged at. While it is there, a resume may (and must) lower ``lr``; the resume removes it.
DIVERGED_FILE = "diverged.json"


def diverged_lr(out: str | Path) -> float | None:
    """The learning rate the run in ``out`` diverged at, if it stopped that way (else None)."""
    try:
        lr = json.loads((Path(out) / DIVERGED_FILE).read_text()).get("lr")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 else None


@dataclass
class PruneConfig:
    """Every option of a run (written to ``config.json``). Paper values in comments.

    Epoch defaults are small for a CPU; seed 001 used 80 (prune) / 40 (fine-tune) /
    10 (low learning rate) on CIFAR and trained the teacher for 80 + 10.
    """

    budget: float = 0.25  # fraction of the full cost
    metric: str | None = None  # None: "volume" (channels), "nonzero" (weights)
    granularity: str = "channel"  # what is pruned: "channel" (physically smaller) or "weight" (sparse)
    extra_budgets: dict[str, float] = field(default_factory=dict)  # more budgets: metric -> fraction
    method: str = "bar"
    method_options: dict = field(default_factory=dict)  # the method's own options: {"rounds": 3} for cs, ...
    model: str | None = None
    data: str | None = None
    data_root: str | None = None
    image_size: int | None = None  # folder:PATH data: side of the square inputs (None: 32)
    augment: str | None = None  # folder:PATH data: none, flip or crop-flip (None: crop-flip)
    workers: int | None = None  # DataLoader processes reading streamed data (None: min(4, CPU count))
    epochs: int = 10  # train + prune (paper: 80)
    finetune_epochs: int = 4  # gates frozen (paper: 40)
    lowlr_epochs: int = 1  # at lr × lowlr_factor (paper: 10)
    teacher_epochs: int = 5  # unpruned teacher, when none is given (paper: 80 + 10)
    lr: float = 1e-3
    gate_lr: float | None = 1e-2
    # initial log α of Hard Concrete gates, s0 of cs; None: open gates (gates.OPEN_LOG_ALPHA; cs 0), or where
    # gate_survival chooses, for a student started from the teacher; seed 001's ≈ 0 (supplement 4) for a random one
    gate_init: float | None = None
    # with gate_init None and a student started from the teacher: Hard Concrete gates start at the lowest log α
    # (0, 0.5, ..., 4) at which the student with its gates sampled keeps its own ungated answer on this fraction
    # of 1024 training images (gate_start.py); None: open gates
    gate_survival: float | None = None
    lowlr_factor: float = 0.1
    # the training recipe of the teacher and fine-tune stages (budgetprune.recipe; README "Training recipe")
    # (benchmarks/results/recipe.md: chosen on validation accuracy; seed 001's: adam, 5e-4, constant, 0, 0)
    optimizer: str = "adamw"  # adam (coupled L2, seed 001), adamw (decoupled) or sgd
    weight_decay: float = 0.05  # as the optimizer applies it (seed 001: 5e-4 with Adam)
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    lr_schedule: str = "cosine"  # constant, cosine or onecycle, per stage, from each stage's global step
    warmup_epochs: float = 0.5  # linear warm-up at the start of each stage (fractions allowed)
    label_smoothing: float = 0.1  # the teacher's cross-entropy and the hard part of distillation
    prune_recipe: str = "paper"  # the prune stage: "paper" (Adam at lr, L2 5e-4, constant) or "same" (the above)
    validation: float = 0  # training images held out for val_accuracy: a count (≥ 1), a fraction (< 1), 0: none
    batch_size: int = 64
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    lam: float | None = None  # weight of the method's penalty (None: the method's default; BAR 1e-5)
    dual_lr: float | None = None  # constrained-l0: learning rate of the Lagrange multipliers
    schedule: str = "sigmoid"
    schedule_hardness: float | None = None
    schedule_end: float = 1.0  # fraction of the prune epochs after which b = B (paper: 1)
    student_init: str = "teacher"  # "teacher" or "random"
    gate_inputs: bool = True  # gate an MLP's input features (Louizos et al.)
    gate_sample: str = "example"  # stochastic gates sampled per example, or per batch (folded into the host's weights)
    fill_budget: bool = True  # reopen closed channels (zero outgoing weights) while the budget holds
    # residual sums of the compacted net: "auto" (per sum, the faster), "mixed" or "regular"; and widths padded to
    # a multiple (1: exact; auto: 8 in feature maps, loosened where that cannot end on the budget). None: by the
    # budgets (pruner.default_form): mixed and 1 under volume budgets alone, else auto and auto
    block: str | None = None
    channel_multiple: int | str | None = None
    deploy_runtime: str | None = None  # where the result runs (auto blocks weigh gathers there; its speed is timed
    # there): eager, torchscript, onnxruntime, none
    deploy_batch: int = 1  # the batch it runs at there: latency budgets, the padding's timing and "deployed" use it
    cpu_buffers: str = "keep"  # on the CPU, glibc keeps freed buffers for reuse (budgetprune.cpu_allocator); "system"
    teacher: str | None = None
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)
    progress: bool = True

    def __post_init__(self):
        if self.metric is None:
            self.metric = "nonzero" if self.granularity == "weight" else "volume"
        metrics = [self.metric, *self.extra_budgets] if isinstance(self.extra_budgets, dict) else [self.metric]
        self.block, self.channel_multiple = resolve_form(self.block, self.channel_multiple, metrics)

    def validate(self) -> None:
        self._check_types()
        if self.granularity not in ("channel", "weight"):
            raise ConfigError(f"unknown granularity '{self.granularity}': choose channel or weight")
        if self.granularity == "weight":
            if self.method in available_methods() and "granularity" not in method_options(self.method):
                takes = ", ".join(m for m in available_methods() if "granularity" in method_options(m))
                raise ConfigError(f"method '{self.method}' prunes channels only; --granularity weight works with {takes}")
            if self.metric != "nonzero" or self.extra_budgets:
                raise ConfigError("pruning single weights saves non-zero weights only: use --metric nonzero "
                                  "(the default with --granularity weight) and no other budget")
        if self.metric not in BUDGET_METRICS:
            raise ConfigError(f"unknown metric '{self.metric}': choose one of {', '.join(BUDGET_METRICS)}")
        if not 0.0 < self.budget < 1.0:
            raise ConfigError(f"budget {self.budget} must lie strictly between 0 and 1")
        for metric, fraction in self.extra_budgets.items():
            if metric not in BUDGET_METRICS or metric == self.metric:
                raise ConfigError(f"extra budget on '{metric}': give each of {', '.join(BUDGET_METRICS)} at most once")
            if not 0.0 < fraction < 1.0:
                raise ConfigError(f"{metric} budget {fraction} must lie strictly between 0 and 1")
        for name in ("epochs", "finetune_epochs", "lowlr_epochs", "teacher_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.epochs < 1:
            raise ConfigError("--epochs must be at least 1: pruning happens during training")
        if self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("--batch-size and --lr must be positive")
        if self.prune_recipe not in PRUNE_RECIPES:
            raise ConfigError(f"unknown --prune-recipe '{self.prune_recipe}': choose {' or '.join(PRUNE_RECIPES)}")
        self.recipe("teacher").check()
        check_validation(self.validation)
        if self.block not in ("auto", "mixed", "regular"):
            raise ConfigError("--block must be 'auto', 'mixed' or 'regular'")
        if self.deploy_runtime not in (None, "none"):
            check_runtime(self.deploy_runtime)
        check_deploy_batch(self.deploy_batch, "--deploy-batch")
        check_channel_multiple(self.channel_multiple)
        if self.method not in available_methods():
            raise ConfigError(f"unknown method '{self.method}': choose one of {', '.join(available_methods())}")
        if self.lam is not None and self.lam < 0:
            raise ConfigError("--lam must be 0 or more")
        if self.dual_lr is not None and not self.dual_lr > 0:
            raise ConfigError("--dual-lr must be positive")
        check_schedule_end(self.schedule_end)
        if self.gate_survival is not None:
            if not 0.0 < self.gate_survival <= 1.0:
                raise ConfigError(f"--gate-survival must be in (0, 1], got {self.gate_survival}")
            if self.gate_init is not None:
                raise ConfigError("--gate-init fixes where the gates start and --gate-survival chooses it: give one")
            if self.student_init != "teacher":
                raise ConfigError("--gate-survival measures the noise a trained student survives: use it with "
                                  "--student-init teacher, or set --gate-init")
            if self.method in available_methods() and "gate_init" not in method_options(self.method):
                raise ConfigError(f"--gate-survival chooses where Hard Concrete gates start and method "
                                  f"'{self.method}' has none: drop it, or use --method bar, l0 or constrained-l0")
        check_gate_sample(self.gate_sample)
        check_cpu_buffers(self.cpu_buffers, "--cpu-buffers")
        if self.student_init not in ("teacher", "random"):
            raise ConfigError("--student-init must be 'teacher' or 'random'")
        if not 0.0 <= self.kd_alpha <= 1.0 or self.kd_temperature < 1.0:
            raise ConfigError("--kd-alpha must lie in [0, 1] and --kd-temperature be at least 1")
        check_folder_options(self.data, self.image_size, self.augment, self.workers)
        check_precision(self.precision)
        check_method_options(self.method, self.method_options)  # fails now, not after the teacher has trained

    def _check_types(self) -> None:
        """Each field holds its annotated type: an int field an int (not a bool), a float field a
        finite number, ``X | Y`` either, ``X | None`` also None."""
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = [k.strip() for k in str(f.type).split("|")]
            if value is None and "None" in kinds:
                continue
            types = [k.split("[")[0] for k in kinds if k != "None"]
            if not any(_TYPE_CHECKS[kind](value) for kind in types):
                hint = f"; the default is {f.default!r}" if f.default not in (MISSING, None) else ""
                words = " or ".join([_TYPE_WORDS[kind] for kind in types] + (["None"] if "None" in kinds else []))
                raise ConfigError(f"option {f.name} must be {words}, got {value!r:.40} (a {type(value).__name__}){hint}")

    def budgets(self) -> list[Budget]:
        """Every budget of the run, the primary one (``metric``, ``budget``) first."""
        return [Budget(self.metric, self.budget)] + [Budget(m, f) for m, f in self.extra_budgets.items()]

    def pruner_options(self, dataset_size: int | None) -> dict:
        """The :class:`~budgetprune.pruner.Pruner` options this run sets (besides model, inputs, budget
        and step count)."""
        return {"metric": self.metric, "method": self.method, "granularity": self.granularity, "block": self.block,
                "channel_multiple": self.channel_multiple, "deploy_runtime": self.deploy_runtime,
                "fill": self.fill_budget, "gate_inputs": self.gate_inputs, "gate_sample": self.gate_sample,
                "time_padding": self.deploy_runtime != "none",  # "none": nothing is timed
                "deploy_batch": self.deploy_batch, "cpu_buffers": self.cpu_buffers,
                "method_options": self.method_options,
                "lam": self.lam, "schedule": self.schedule, "schedule_hardness": self.schedule_hardness,
                "schedule_end": self.schedule_end,
                "gate_lr": self.gate_lr, "gate_init": self.gate_init_for_student(), "dual_lr": self.dual_lr,
                "dataset_size": dataset_size}

    def gate_init_for_student(self) -> float | None:
        """The gates' initial log α: as set, else open (None: the Pruner's default) on a student
        started from the teacher and seed 001's 0 on a random one (trained from scratch, as the
        paper's CIFAR runs)."""
        if self.gate_init is not None or self.student_init == "teacher":
            return self.gate_init
        return 0.0

    def recipe(self, stage: str) -> Recipe:
        """How ``stage`` trains: the teacher and fine-tune stages by the recipe options; the prune
        stage by them too with ``prune_recipe="same"``, and by seed 001's (Adam at ``lr``, coupled L2
        5e-4, constant rate, no smoothing) with ``"paper"``: BAR's gates, barrier weight λ and budget
        schedule were tuned with it."""
        if stage == "prune" and self.prune_recipe == "paper":
            return Recipe(optimizer="adam", lr=self.lr, weight_decay=PAPER_WEIGHT_DECAY)
        return Recipe(optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum,
                      nesterov=self.nesterov, schedule=self.lr_schedule, warmup_epochs=self.warmup_epochs,
                      label_smoothing=self.label_smoothing)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        """The config a ``config.json`` holds; a key it lacks (written before the option existed)
        takes the value that gives that version's behaviour (:data:`BEFORE_OPTION`), not today's default."""
        names = {f.name for f in fields(cls)}
        return cls(**{**BEFORE_OPTION, **{k: v for k, v in d.items() if k in names}})


PRUNE_RECIPES = ("paper", "same")
PAPER_WEIGHT_DECAY = 5e-4  # seed 001, section 5.1, with Adam at lr 1e-3

#: The behaviour of runs whose config.json predates an option: a resumed old run continues as it began.
BEFORE_OPTION = {"optimizer": "adam", "weight_decay": 5e-4, "momentum": 0.9, "nesterov": False,
                 "lr_schedule": "constant", "warmup_epochs": 0.0, "label_smoothing": 0.0, "prune_recipe": "paper",
                 "validation": 0, "batch_size": 64, "lr": 1e-3}


_TYPE_CHECKS = {  # Python's own types: config.json is written with the json module
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
}
_TYPE_WORDS = {"int": "an int", "float": "a finite number", "str": "a string", "bool": "True or False",
               "dict": "a dict"}


@dataclass
class PruneResult:
    model: nn.Module  # the compacted network (a torch.fx.GraphModule)
    metrics: dict
    architecture: dict | None  # budgetprune.graphio.describe(model); None where only its plan describes it
    history: list[dict] = field(default_factory=list)


def _description(net: nn.Module) -> dict | None:
    """The self-contained description of ``net``, or None where only its pruning plan can describe it."""
    try:
        return graphio.describe(graphio.trace(net))
    except CheckpointError:
        return None


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for but CUDA is not available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for but it is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None


class PruneRun:
    """A pruning run in ``out_dir``: call :meth:`run` (it resumes where a checkpoint stopped)."""

    def __init__(self, model: nn.Module, train_data, test_data, config: PruneConfig, out_dir: str | Path,
                 teacher: nn.Module | None = None, log: Callable[[str], None] = print):
        config.validate()
        check_inputs(model, train_data, test_data)
        self.config = config
        self.out = Path(out_dir)
        self.device = resolve_device(config.device)
        check_precision(config.precision, self.device)
        self.model = model.to(self.device)
        # the held-out validation images (config.validation) are never trained on
        self.train_data, self.val_data = split_validation(train_data, config.validation, config.seed)
        self.test_data = test_data
        self._parts = [d for d in (self.train_data, self.val_data) if d is not None and d is not train_data]
        self.log = log if distributed.is_main() else (lambda _line: None)  # rank 0 speaks for every process
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        x0 = train_data[0][0]
        self.example = x0.unsqueeze(0).to(self.device)
        self.graph = ChannelGraph.build(self.model, self.example, gate_inputs=config.gate_inputs)
        self.graph.latency_batch = config.deploy_batch  # before any latency is counted
        self.budgets = config.budgets()
        self.budget = self.budgets[0]
        self.per_weight = config.granularity == "weight"
        check_prunable(self.model, self.graph, self.budgets, **config.pruner_options(len(self.train_data)))
        prepare_cpu_buffers(self.device, config.cpu_buffers, self.log)  # before the teacher trains
        self.metrics = METRICS + tuple(b.metric for b in self.budgets if b.metric not in METRICS)
        self.full = resource_report(self.graph, metrics=self.metrics)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.history: list[dict] = []
        self.saved: tuple[str, int] | None = None  # (stage, epoch) of the newest checkpoint
        self.loss_reference: dict[str, float] = {}  # per stage: the task loss divergence is measured against
        self.scalers: dict[str, torch.amp.GradScaler] = {}  # per stage, with --precision fp16
        self.replicas: dict[int, nn.Module] = {}  # under torch.distributed: id(model) -> its DDP replica

    # -- checkpoints ------------------------------------------------------------------
    def _save_checkpoint(self, stage: str, epoch: int, **state) -> None:
        self.saved = (stage, epoch)
        if not distributed.is_main():
            return  # rank 0 writes; every rank holds the same state
        io.torch_save(self.ckpt_path, {"stage": stage, "epoch": epoch, "history": json.dumps(self.history),
                                       "rng": torch.get_rng_state(), **self._device_rng(),
                                       "loss_reference": self.loss_reference.get(stage), **self._scaler_state(stage),
                                       **state})

    def _load_checkpoint(self) -> dict | None:
        if not self.ckpt_path.exists():
            return
        ckpt = io.torch_load(self.ckpt_path, "checkpoint")
        if not isinstance(ckpt, dict) or ckpt.get("stage") not in STAGES:
            raise CheckpointError(f"{self.ckpt_path} is not a budgetprune run checkpoint")
        epoch, reference = ckpt.get("epoch"), ckpt.get("loss_reference")
        if type(epoch) is not int or epoch < 0 or not isinstance(reference, (int, float, type(None))):
            raise self._damaged("its epoch or loss reference is not a number")
        self.history = self._from_checkpoint("history", lambda: json.loads(ckpt["history"]))
        if not isinstance(self.history, list):
            raise self._damaged("its history is not a list")
        self._from_checkpoint("random state", lambda: self._restore_rng(ckpt))
        if "scaler" in ckpt and self._scaler(ckpt["stage"]) is not None:
            self._from_checkpoint("gradient scaler", lambda: self._scaler(ckpt["stage"]).load_state_dict(ckpt["scaler"]))
        self.saved = (ckpt["stage"], epoch)
        if reference is not None:
            self.loss_reference[ckpt["stage"]] = float(reference)
        return ckpt

    def _damaged(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.ckpt_path} is damaged ({why}); start afresh with another --out")

    def _from_checkpoint(self, what: str, restore):
        """``restore()``, which reads part ``what`` of the checkpoint; one line if the part is damaged."""
        try:
            return restore()
        except CheckpointError as exc:
            raise self._damaged(f"{what}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, RecursionError) as exc:
            raise self._damaged(f"{what}: {first_line(exc)}") from None

    def _scaler(self, stage: str) -> torch.amp.GradScaler | None:
        """The gradient scaler of ``stage`` (one per stage, kept across its epochs); None unless fp16."""
        if self.config.precision != "fp16":
            return None
        if stage not in self.scalers:
            self.scalers[stage] = grad_scaler(self.device, self.config.precision)
        return self.scalers[stage]

    def _scaler_state(self, stage: str) -> dict:
        scaler = self._scaler(stage)
        return {"scaler": scaler.state_dict()} if scaler is not None else {}

    def _device_rng(self) -> dict:
        """The CUDA generator's state (gate samples on a GPU draw from it)."""
        if self.device.type == "cuda":
            return {"cuda_rng": torch.cuda.get_rng_state(self.device)}
        return {}

    def _restore_rng(self, ckpt: dict) -> None:
        torch.set_rng_state(ckpt["rng"])
        if self.device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)

    def _generator(self, stage: str, epoch: int) -> torch.Generator:
        return seeding.batch_generator(self.config.seed, STAGES.index(stage), epoch)

    def _load_optimizer(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """The saved optimizer state, at the learning rates of this run's config (a run resumed
        after a divergence continues with the lower --lr it was given)."""
        rates = [g["lr"] for g in opt.param_groups]
        opt.load_state_dict(state)
        for group, lr in zip(opt.param_groups, rates):
            group["lr"] = lr

    def _diverged(self, what: str, resumable: bool = True) -> TrainingDiverged:
        """``what`` went wrong, and what to rerun: from the last good checkpoint, or afresh."""
        lr = f"a lower --lr (now {self.config.lr:g})"
        if not resumable:
            return TrainingDiverged(f"{what}; the trained weights are unusable: rerun with another --out and {lr}")
        if self.saved is not None and self.ckpt_path.exists():
            stage, epoch = self.saved
            after = f"after {stage} epoch {epoch}" if epoch else f"at the start of {stage}"
            if distributed.is_main():
                io.write_json(self.out / DIVERGED_FILE, {"lr": self.config.lr, "stage": stage, "epoch": epoch})
            return TrainingDiverged(f"{what}; the last good checkpoint ({after}) is kept in {self.ckpt_path}: "
                                    f"rerun with --resume and {lr}")
        return TrainingDiverged(f"{what}; no epoch finished, so there is nothing to resume: rerun without "
                                f"--resume with {lr}")

    def _line(self, stage: str, epoch: int, total: int, stats: dict) -> None:
        parts = [f"[{stage}] epoch {epoch}/{total}", f"loss {stats['loss']:.4f}",
                 f"acc {stats['train_accuracy']:.4f}", f"test {stats['test_accuracy']:.4f}"]
        if "val_accuracy" in stats:
            parts.append(f"val {stats['val_accuracy']:.4f}")
        skip = {"loss", "train_accuracy", "test_accuracy", "val_accuracy", "seconds", "steps", "penalty"}
        parts += [f"{k} {v:.4g}" for k, v in stats.items() if k not in skip and isinstance(v, (int, float))]
        parts.append(f"{stats['seconds']:.1f}s")
        self.log("  ".join(parts))

    # -- the run ----------------------------------------------------------------------
    def run(self, resume: bool = False) -> PruneResult:
        try:
            with distributed.main_only(RunFolder(self.out)):  # one run at a time in the folder (see budgetprune.runfolder)
                return self._run_stages(resume)
        finally:
            for part in self._parts:  # the worker processes of a split folder of images
                if hasattr(part, "close"):
                    part.close()

    def _run_stages(self, resume: bool) -> PruneResult:
        self._check_diverged_resume(resume)
        ckpt = self._load_checkpoint() if resume else None
        if ckpt is not None:
            self.log(f"resuming {self.out} at stage '{ckpt['stage']}' after epoch {ckpt['epoch']}")
        stage = ckpt["stage"] if ckpt else "teacher"
        self._teacher_stage(ckpt if stage == "teacher" else None)
        if stage == "teacher":
            ckpt = None
        pruner = self._prune_stage(ckpt if ckpt and ckpt["stage"] == "prune" else None,
                                   skip=ckpt is not None and ckpt["stage"] in ("finetune", "done"))
        net, specs, info = self._finetune_stage(ckpt if ckpt and ckpt["stage"] in ("finetune", "done") else None,
                                                pruner)
        return self._finish(net, specs, info)

    def train_teacher(self, resume: bool = False) -> nn.Module:
        """The teacher stage alone: train the unpruned teacher (or load the run folder's
        ``teacher.pt``), write ``teacher.pt`` and return the teacher, so that several runs, or
        another pruning tool, can start from the same weights (pass the file as ``teacher``)."""
        with distributed.main_only(RunFolder(self.out)):
            ckpt = self._load_checkpoint() if resume else None
            self._teacher_stage(ckpt if ckpt is not None and ckpt["stage"] == "teacher" else None)
        return self.teacher

    def _check_diverged_resume(self, resume: bool) -> None:
        """After a divergence, a resume continues only with a lower learning rate."""
        lr = diverged_lr(self.out)
        if lr is None:
            return
        if resume and not self.config.lr < lr:
            raise ConfigError(f"the run in {self.out} diverged at --lr {lr:g}: resume it with a lower --lr "
                              f"(now {self.config.lr:g})")
        distributed.barrier()  # every rank has read the file before rank 0 removes it
        if distributed.is_main():
            (self.out / DIVERGED_FILE).unlink(missing_ok=True)

    # teacher -------------------------------------------------------------------------
    def _teacher_stage(self, ckpt: dict | None):
        teacher_file = self.out / "teacher.pt"
        if self.teacher is None and teacher_file.exists() and (ckpt is None):
            self.teacher = io.load_file(teacher_file, fallback=self.model)[0].to(self.device).eval()
        if self.teacher is not None:
            if not teacher_file.exists():
                self._save_teacher(self.teacher)
            self._evaluate_unpruned()
            return
        cfg = self.config
        recipe = cfg.recipe("teacher")
        model = copy.deepcopy(self.model).to(self.device)
        opt = make_optimizer(list(model.parameters()), recipe)
        start = 0
        if ckpt is not None:
            self._from_checkpoint("teacher weights", lambda: model.load_state_dict(ckpt["model"]))
            self._from_checkpoint("optimizer", lambda: self._load_optimizer(opt, ckpt["optimizer"]))
            start = ckpt["epoch"]
        else:
            seeding.seed_stage(cfg.seed, "teacher")  # dropout and every other draw of the global generator
        steps_per_epoch = num_batches(self.train_data, cfg.batch_size)
        schedule = stage_schedule(opt, recipe, steps_per_epoch, cfg.teacher_epochs)
        for epoch in range(start, cfg.teacher_epochs):
            self._epoch(model, opt, "teacher", epoch, cfg.teacher_epochs, steps_per_epoch,
                        lambda logits, y, idx, x: smoothed_cross_entropy(logits, y, recipe.label_smoothing),
                        before_step=schedule)
            self._save_checkpoint("teacher", epoch + 1, model=model.state_dict(), optimizer=opt.state_dict())
        self.teacher = model.eval()
        self._save_teacher(model)
        self._evaluate_unpruned()
        return None

    def _evaluate_unpruned(self) -> None:
        self.unpruned_accuracy = self._evaluate(self.teacher)
        self.unpruned_val_accuracy = self._evaluate(self.teacher, self.val_data) if self.val_data else None

    def _save_teacher(self, teacher: nn.Module) -> None:
        if not distributed.is_main():
            return
        graph = ChannelGraph.build(teacher, self.example)
        plain = to_plain(teacher, graph)
        # nothing pruned: a plan that keeps every channel, for networks no self-contained file can describe
        plain.budgetprune_plan = make_plan(graph, None, block=self.config.block, granularity="channel",
                                           gate_inputs=False, moves_ordered=plain.budgetprune_moves_ordered > 0)
        io.save(plain, self.out / "teacher.pt", meta={"role": "teacher", "model": self.config.model,
                                                      "input_shape": list(self.graph.input_shape)})

    def _epoch(self, model, opt, stage, epoch, total_epochs, steps_per_epoch, loss_fn, pruner=None,
               after_step=None, before_step=None) -> dict:
        cfg = self.config
        step0 = epoch * steps_per_epoch
        divergence = DivergenceCheck(reference=self.loss_reference.get(stage))
        try:
            stats = train_epoch(self._replica(model), self.train_data, opt, loss_fn,
                                device=self.device,
                                batch_size=cfg.batch_size, generator=self._generator(stage, epoch),
                                step=step0, penalty=pruner.penalty if pruner else None,
                                after_step=pruner.step if pruner else after_step, before_step=before_step,
                                show_progress=cfg.progress and distributed.is_main(),
                                desc=f"{stage} {epoch + 1}/{total_epochs}", divergence=divergence,
                                workers=cfg.workers, precision=cfg.precision, scaler=self._scaler(stage),
                                shard=distributed.active())
        except TrainingDiverged as exc:
            raise self._diverged(f"{exc} in {stage} epoch {epoch + 1}") from None
        if divergence.reference is not None:
            self.loss_reference[stage] = divergence.reference
        if pruner is not None:
            pruner.eval()  # deterministic gates for the test accuracy, as the pruned network will have
        stats["test_accuracy"] = self._evaluate(model)
        if self.val_data is not None:
            stats["val_accuracy"] = self._evaluate(model, self.val_data)
        if pruner is not None:
            pruner.train()
            stats.update({k: v for k, v in pruner.status().items() if k != "progress"})
        row = {"stage": stage, "epoch": epoch + 1, **{k: v for k, v in stats.items() if k != "steps"},
               "lr": opt.param_groups[0]["lr"]}
        self.history.append(row)
        self._line(stage, epoch + 1, total_epochs, stats)
        return stats

    def _replica(self, model: nn.Module) -> nn.Module:
        """``model`` itself in one process; under torch.distributed its DistributedDataParallel
        replica (made once per model: its construction broadcasts rank 0's weights), which averages
        the gradients of each global batch over the processes. The gates of a gated model (the
        pruner's, not the model's parameters) are averaged by the pruner itself."""
        if not distributed.active():
            return model
        if id(model) not in self.replicas:
            ids = [self.device] if self.device.type == "cuda" else None
            self.replicas[id(model)] = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return self.replicas[id(model)]

    @torch.no_grad()
    def _classes(self, model: nn.Module) -> int | None:
        """How many classes ``model`` scores (the width of its logits), None where its output is not
        a (batch, classes) tensor."""
        was = model.training
        model.eval()
        out = model(self.example)
        model.train(was)
        return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None

    def _evaluate(self, model: nn.Module, data=None) -> float:
        """Accuracy of ``model`` on ``data`` (default: the test split); under torch.distributed each
        process evaluates its part and the counts are summed."""
        data = self.test_data if data is None else data
        return evaluate(model, data, self.device, workers=self.config.workers, split=True)["accuracy"]

    def _kd_loss(self, dataset, recipe: Recipe):
        """Distillation loss; teacher logits are computed once when the data is in memory and not
        augmented, batch by batch otherwise (streamed data: no N x classes table in memory)."""
        cfg = self.config
        on_the_fly = getattr(dataset, "augment", False) or streams(dataset)
        cached = None if on_the_fly else predict_logits(self.teacher, dataset, self.device, split=True)

        def loss_fn(logits, y, idx, x):
            if cached is not None:
                t = cached.index_select(0, idx).to(logits.device)
            else:
                with torch.no_grad():
                    t = self.teacher(x)
            return distillation_loss(logits, y, t, cfg.kd_alpha, cfg.kd_temperature, recipe.label_smoothing)
        return loss_fn

    # prune ---------------------------------------------------------------------------
    def _prune_stage(self, ckpt: dict | None, skip: bool):
        if skip:
            return
        cfg = self.config
        if ckpt is None:
            seeding.seed_stage(cfg.seed, "prune")  # gate initialisation and noise, dropout, random scores
        student = copy.deepcopy(self.model).to(self.device)
        if cfg.student_init == "teacher":
            student.load_state_dict(self._teacher_state_for_model())
        steps_per_epoch = num_batches(self.train_data, cfg.batch_size)
        pruner = Pruner(student, self.example, self.budgets, total_steps=steps_per_epoch * cfg.epochs,
                        log=self.log, **cfg.pruner_options(len(self.train_data)))
        recipe = cfg.recipe("prune")
        opt = make_optimizer(pruner.parameters(recipe.lr, recipe.weight_decay), recipe)
        schedule = stage_schedule(opt, recipe, steps_per_epoch, cfg.epochs)  # the weights'; the gates keep theirs
        start = 0
        if ckpt is not None:
            self._from_checkpoint("student weights", lambda: student.load_state_dict(ckpt["model"]))
            self._from_checkpoint("method state", lambda: pruner.load_state_dict(
                ckpt["pruner"] if "pruner" in ckpt else {"method": ckpt["method"], "steps": ckpt["epoch"] * steps_per_epoch}))
            self._from_checkpoint("optimizer", lambda: self._load_optimizer(opt, ckpt["optimizer"]))
            start = ckpt["epoch"]
            self._restore_rng(ckpt)  # creating the gates drew random numbers: continue the saved stream
        if ckpt is None and self._chooses_gate_start(pruner):
            pruner.choose_gate_start(self._start_batches(), survival=cfg.gate_survival, forward=self._step_forward)
        if ckpt is None and recipe.optimizer in ("adam", "adamw"):
            self._warn_short_travel(pruner, opt, steps_per_epoch * cfg.epochs)
        loss_fn = self._kd_loss(self.train_data, recipe)
        for epoch in range(start, cfg.epochs):
            self._epoch(student, opt, "prune", epoch, cfg.epochs, steps_per_epoch, loss_fn, pruner=pruner,
                        before_step=schedule)
            self._save_checkpoint("prune", epoch + 1, model=student.state_dict(), pruner=pruner.state_dict(),
                                  optimizer=opt.state_dict())
        return pruner

    def _chooses_gate_start(self, pruner: Pruner) -> bool:
        """Whether the prune stage measures where its Hard Concrete gates start (no ``gate_init``, a
        student started from the teacher, a ``gate_survival``)."""
        cfg = self.config
        return (cfg.gate_init is None and cfg.student_init == "teacher" and cfg.gate_survival is not None
                and bool(gate_start.hard_concrete_gates(pruner.method)))

    def _step_forward(self, model: nn.Module, x: torch.Tensor):
        """A forward pass as a training step runs it: under autocast at ``--precision``."""
        with autocast(self.device, self.config.precision):
            return model(x)

    def _start_batches(self, images: int = 1024) -> list[torch.Tensor]:
        """The training batches the gates' start is chosen on: the first ``images`` of a random order
        drawn from the run's seed (each process its part of every batch), as a training step sees them;
        on the CPU (each goes to the device when measured)."""
        cfg = self.config
        count = max(1, -(-images // cfg.batch_size))
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = iterate_batches(self.train_data, cfg.batch_size, shuffle=True, generator=generator,
                                  workers=cfg.workers, pin_memory=self.device.type == "cuda", shard=True)
        return [x for _, (_, x, _) in zip(range(count), batches)]

    def _warn_short_travel(self, pruner: Pruner, opt: torch.optim.Optimizer, steps: int) -> None:
        """Log :func:`~budgetprune.gates.travel_note` for the method's Hard Concrete gates, if any."""
        lrs = [g["lr"] for g in opt.param_groups if g.get("name") == "gates"]
        gates = gate_start.hard_concrete_gates(pruner.method)
        if lrs and gates:
            note = travel_note(gates, lrs[0], steps)
            if note:
                self.log(note)

    def _teacher_state_for_model(self) -> dict:
        """The teacher's weights under the model's names (a file written by an older version
        of budgetprune names them by position)."""
        mine, theirs = self.model.state_dict(), self.teacher.state_dict()
        if set(mine) == set(theirs):
            return copy.deepcopy(theirs)
        if [tuple(t.shape) for t in mine.values()] != [tuple(t.shape) for t in theirs.values()]:
            raise CheckpointError("the teacher's weights do not fit the model; pass a teacher of the same architecture")
        return {k: t.clone() for k, t in zip(mine, theirs.values())}

    def _weight_mask_step(self, net: nn.Module):
        """After each fine-tune step: pruned weights back to exactly 0 (None for channel pruning)."""
        if not self.per_weight:
            return None
        layers = prunable_weights(net)
        pairs = [(layers[n].weight, m.to(layers[n].weight.device, layers[n].weight.dtype).reshape(layers[n].weight.shape))
                 for n, m in self.weight_masks.items()]

        @torch.no_grad()
        def step():
            for weight, mask in pairs:
                weight.mul_(mask)
        return step

    def _sample_batch(self) -> torch.Tensor:
        """Up to 256 test inputs: the compacted network is checked against the gated one on them."""
        _, x, _ = next(iter(iterate_batches(self.test_data, 256, workers=self.config.workers,
                                            pin_memory=self.device.type == "cuda")))
        return x.to(self.device)

    def _hard_prune(self, pruner: Pruner) -> tuple[nn.Module, dict, dict]:
        """The pruner's finalize (exact budget, compaction, equality check) and the saved description."""
        try:
            net, info = pruner.finalize(self._sample_batch())
        except TrainingDiverged as exc:
            raise self._diverged(str(exc), resumable=False) from None
        if self.per_weight:
            self.weight_masks = pruner.weight_masks
        return net, _description(net), info

    # finetune ------------------------------------------------------------------------
    def _finetune_stage(self, ckpt: dict | None, pruner: Pruner | None):
        cfg = self.config
        if ckpt is None:
            net, specs, info = self._hard_prune(pruner)
            start = 0
            self._save_checkpoint("finetune", 0, arch=json.dumps(specs), model=net.state_dict(),
                                  info=json.dumps(info), optimizer={}, **self._mask_state())
        else:
            specs = self._from_checkpoint("network", lambda: json.loads(ckpt["arch"]))
            info = self._from_checkpoint("pruning record", lambda: json.loads(ckpt["info"]))
            if not isinstance(info, dict):
                raise self._damaged("its pruning record is not an object")
            if info.get("gate_start") is not None:
                info["gate_start"] = self._from_checkpoint("gate start",
                                                           lambda: gate_start.check_record(info["gate_start"]))
            if specs is None:  # a network only its plan describes: replayed on the run's model
                net = self._from_checkpoint("network", lambda: plan_replay(info.get("plan"), self.model, ckpt["model"]))
            else:
                net = self._from_checkpoint("network", lambda: graphio.rebuild(specs, ckpt["model"]))
            net = net.to(self.device)
            if info.get("plan") is not None:
                net.budgetprune_plan = info["plan"]  # model.pt keeps the plan across a resume
            start = ckpt["epoch"]
            if self.per_weight:
                self.weight_masks = self._from_checkpoint("weight masks", lambda: {
                    n: m.bool() for n, m in ckpt["weight_masks"].items()})
        recipe = cfg.recipe("finetune")
        opt = make_optimizer(list(net.parameters()), recipe)
        if ckpt is not None and ckpt.get("optimizer"):
            self._from_checkpoint("optimizer", lambda: self._load_optimizer(opt, ckpt["optimizer"]))
        if start == 0:
            seeding.seed_stage(cfg.seed, "finetune")  # dropout of the compacted network
        total = cfg.finetune_epochs + cfg.lowlr_epochs
        steps_per_epoch = num_batches(self.train_data, cfg.batch_size)
        loss_fn = self._kd_loss(self.train_data, recipe) if total > start else None
        # constant: the last lowlr_epochs at lr × lowlr_factor; cosine and onecycle anneal over all of them
        schedule = stage_schedule(opt, recipe, steps_per_epoch, cfg.finetune_epochs, cfg.lowlr_epochs, cfg.lowlr_factor)
        for epoch in range(start, total):
            self._epoch(net, opt, "finetune", epoch, total, steps_per_epoch, loss_fn,
                        after_step=self._weight_mask_step(net), before_step=schedule)
            self._save_checkpoint("finetune", epoch + 1, arch=json.dumps(specs), model=net.state_dict(),
                                  info=json.dumps(info), optimizer=opt.state_dict(), **self._mask_state())
        return net.eval(), specs, info

    def _mask_state(self) -> dict:
        """The per-weight masks, for a checkpoint (nothing for channel pruning)."""
        return {"weight_masks": self.weight_masks} if self.per_weight else {}

    # results -------------------------------------------------------------------------
    def _write_results(self, net: nn.Module, metrics: dict) -> None:
        """model.pt, metrics.json, history.json, config.json and the report."""
        from .report import write_report
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        io.save(net, self.out / "model.pt", meta={"metrics": {k: metrics[k] for k in
                                                                ("method", "metric", "budget_fraction")},
                                                    "model": cfg.model, "input_shape": list(self.graph.input_shape)})
        metrics["model_file_bytes"] = (self.out / "model.pt").stat().st_size
        io.write_json(self.out / "metrics.json", metrics)
        io.write_json(self.out / "history.json", self.history)
        io.write_json(self.out / "config.json", asdict(cfg))
        write_report(self.out, metrics, self.history)

    def _deployed_speed(self, net: nn.Module) -> dict | None:
        """The result's latency next to the unpruned network's, at ``deploy_batch``, in the chosen runtime."""
        runtime = self.config.deploy_runtime or default_runtime([b.metric for b in self.budgets])
        if runtime == "none":
            return None
        batch = self.config.deploy_batch
        example = copies_of_first(self.example, batch)  # what the Pruner times its padding and latency on
        self.log(f"timing the unpruned and the pruned network in {runtime} (batch {batch})")
        return deployed_speed(self.teacher, net, example, runtime)

    def _finish(self, net: nn.Module, specs: dict, info: dict) -> PruneResult:
        from .report import collapse_note, deploy_note, layer_widths
        cfg = self.config
        if not hasattr(self, "unpruned_accuracy"):
            self._evaluate_unpruned()
        acc = self._evaluate(net)
        pruned = info["pruned"]
        limit = self.budget.fraction * self.full[cfg.metric]
        metrics = {
            "method": cfg.method, "metric": cfg.metric, "budget_fraction": cfg.budget,
            "budget": limit, "budget_ratio": pruned[cfg.metric] / limit,
            "budgets": {b.metric: {"fraction": b.fraction, "limit": b.fraction * self.full[b.metric],
                                   "pruned": pruned[b.metric], "ratio": pruned[b.metric] / (b.fraction * self.full[b.metric])}
                        for b in self.budgets},
            "full": self.full, "pruned": pruned, "block": cfg.block, "channel_multiple": cfg.channel_multiple,
            # [multiple, min width, min positions, min kept]: the padding finalize kept
            "padding": info.get("padding", list(check_channel_multiple(cfg.channel_multiple))),
            "pad_tied": info.get("pad_tied", True),  # False: tied channels (concatenations, grouped convs) exact
            # auto padding timed against exact widths in the deploy runtime (where it was: see Pruner.time_padding)
            **({"padding_timing": info["padding_timing"]} if info.get("padding_timing") else {}),
            # with the first auto padding kept: every width a multiple of 16 timed against 8 there
            **({"wide_padding_timing": info["wide_padding_timing"]} if info.get("wide_padding_timing") else {}),
            # a latency budget timed in a runtime: each projection's measured latency, the one kept, met or not
            **({"measured_latency": info["measured_latency"]} if info.get("measured_latency") else {}),
            "mixed_spaces": (info.get("plan") or {}).get("mixed_spaces", []),  # auto: the residual spaces kept mixed
            "pruned_by_block": info.get("pruned_by_block", {cfg.block: pruned}),
            "reduction_factor": {k: self.full[k] / pruned[k] for k in self.full},
            "widths": layer_widths(self.graph, info["masks"]),
            "kept_channels": info["masks"],  # per group: indices of the original channels kept
            "test_accuracy": acc, "unpruned_test_accuracy": self.unpruned_accuracy,
            "accuracy_change": acc - self.unpruned_accuracy,
            **({"val_accuracy": self._evaluate(net, self.val_data), "unpruned_val_accuracy": self.unpruned_val_accuracy,
                "validation_images": len(self.val_data)} if self.val_data is not None else {}),
            "cost_before_projection": info["cost_before_projection"],
            "channels_dropped_by_projection": info["channels_dropped_by_projection"],
            "channels_reopened_by_fill": info.get("channels_reopened_by_fill", 0),
            "compaction_max_abs_diff": info["compaction_max_abs_diff"],
            # per group, the smallest gate folded into a kept channel (near 0: a channel kept but silent), and
            # how many kept channels are folded under FAINT_GATE
            **({"lowest_kept_gate": info["lowest_kept_gate"],
                "faint_kept_channels": info.get("faint_kept_channels", {})} if info.get("lowest_kept_gate") else {}),
            # where the gates started and the agreement measured at each start (a chosen start only)
            **({"gate_start": info["gate_start"]} if info.get("gate_start") else {}),
            "model": cfg.model, "data": cfg.data, "granularity": cfg.granularity,
            "classes": self._classes(net),
        }
        if self.per_weight:
            layers = density(net)
            metrics.update({"weights_dropped_by_projection": info["weights_dropped_by_projection"],
                            "weights_reopened_by_fill": info["weights_reopened_by_fill"],
                            "nonzero_after_finetune": sum(v["nonzero"] for v in layers.values()),
                            "density": layers})
        # rank 0 times the result while the other ranks wait idle, and every rank keeps its record
        metrics["deployed"] = distributed.from_main(lambda: self._deployed_speed(net))
        if distributed.is_main():  # rank 0 writes the run folder
            for note in (collapse_note(metrics, self.history), deploy_note(metrics)):
                if note:
                    self.log(note)
            self._write_results(net, metrics)
        total = cfg.finetune_epochs + cfg.lowlr_epochs
        self._save_checkpoint("done", total, arch=json.dumps(specs), model=net.state_dict(), info=json.dumps(info),
                              optimizer={}, **self._mask_state())
        self.log(f"done: test accuracy {acc:.4f} (unpruned {self.unpruned_accuracy:.4f}); {cfg.metric} "
                 f"{pruned[cfg.metric]:.6g} = {metrics['budget_ratio']:.4f} of the budget; files in {self.out}")
        return PruneResult(net, metrics, specs, self.history)
