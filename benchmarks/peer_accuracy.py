"""Torch-Pruning side by side on accuracy, at equal FLOPs and equal epochs (a benchmark, not a test).

For each model and seed, one unpruned teacher, trained by budgetprune's own teacher stage
(``PruneRun.train_teacher``; ``--teacher-epochs``). From its weights, for each FLOP reduction
factor (target: the full model's FLOPs / factor):

* ``bar``: ``budgetprune.prune(method="bar", metric="flops", budget=1/factor, teacher=<the file>)``,
  the library's defaults, ``--prune-epochs`` + ``--finetune-epochs`` + ``--lowlr-epochs``
  (E = the total minus the teacher's epochs); ``bar-exact`` (on request): the same with exact
  widths (``channel_multiple=1``) instead of the default's widths padded to multiples of 8 for
  deployed speed, so both sides choose any width;
* ``tp-magnitude-*`` / ``tp-taylor-*``: Torch-Pruning's ``BasePruner`` with
  ``GroupMagnitudeImportance(p=2)`` or ``GroupTaylorImportance`` (gradients: the cross-entropy of
  ``--taylor-batches`` training batches, summed, before each pruning step, as Torch-Pruning's
  ``reproduce/main.py`` does). ``oneshot``: one pruning step, then E fine-tune
  epochs. ``iterative``: ``--tp-steps`` pruning steps, each followed by an equal share of the E epochs;
  step i aims at the FLOPs of Torch-Pruning's linear channel schedule (a channel keep fraction going
  linearly from 1 to 1/sqrt(factor)), the last step at the target. Each step's pruning ratio is found
  by bisection on a copy, for global and for local (per-layer) ranking: the smallest ratio whose
  FLOPs are at or under the step's target; the step takes the ranking that keeps more FLOPs. So the
  result never passes the target and lands as close under it as Torch-Pruning's channels allow.
  Fine-tune: budgetprune's own fine-tune stage (``kd``: ``PruneConfig().recipe("finetune")``, the
  optimiser, weight decay, warm-up, learning-rate schedule, label smoothing and batch size that
  ``bar``'s compacted network gets, with distillation from the same teacher; the engine's
  ``train_epoch``); the ``-plain`` variants fine-tune with cross-entropy, Adam lr 1e-3, batch 128,
  no weight decay, constant learning rate.

FLOPs are counted for both sides by one counter, ``torch.utils.flop_counter`` (the MACs of every
convolution and matrix product torch runs, per image); budgetprune's own count (``resource_report``,
the one its budget uses) is recorded next to it. Nothing is tuned: every recipe is fixed in advance
and the test set is only read for the final accuracy.

    python benchmarks/peer_accuracy.py --data-root ../shared/data                 # the whole grid
    python benchmarks/peer_accuracy.py --models lenet5 --train-subset 20000 --threads 1

Each finished (model, seed, method, factor) is written at once (atomically) into
``benchmarks/results/peer_accuracy.json`` and skipped on a rerun with the same settings, so an
interrupted run loses only the run in progress (the teacher and BAR runs resume from their
checkpoints in ``--work``); several processes may share the file (e.g. one per seed). ``--redo METHODS`` runs those methods again
(after a default changed), moving their old rows to the page's "Superseded runs" and their run folders
aside (``bar-8.superseded-1``); an interrupted ``--redo`` continues without ``--redo`` (with it, the
runs it finished would be redone once more). A teacher retrained from its seed must score what the
results' teacher scored, or the run stops. The page
``peer_accuracy.md`` and the plot ``peer_accuracy.png`` are rewritten from the file at the end
(``--report-only``: only that). Requires the ``bench`` extra:
``pip install -c constraints.txt ".[bench]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import math
import sys
import time
import warnings
from dataclasses import replace, asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budgetprune  # noqa: E402
from budgetprune import io, seeding  # noqa: E402
from budgetprune.api import load_teacher  # noqa: E402
from budgetprune.data import load_dataset  # noqa: E402
from budgetprune.engine import evaluate, iterate_batches, num_batches, predict_logits, train_epoch  # noqa: E402
from budgetprune.recipe import Recipe, make_optimizer, stage_schedule  # noqa: E402
from budgetprune.objectives import distillation_loss  # noqa: E402
from budgetprune.pipeline import PruneConfig  # noqa: E402
from common import HERE, RESULTS, Parser, finetune_words, machine, name_list, random_subset, seeded_model, train_teacher  # noqa: E402
from peer import aten_macs, base_pruner, bp_count, budgetprune_state, version  # noqa: E402
from stats import format_mean_std, mean_std, tie  # noqa: E402

NAME = "peer_accuracy"
TP_METHODS = tuple(f"tp-{imp}-{schedule}" for imp in ("magnitude", "taylor") for schedule in ("oneshot", "iterative"))
BAR_METHODS = {"bar": "auto", "bar-exact": 1}  # budgetprune's BAR, by its channel_multiple
METHODS = ("bar",) + TP_METHODS  # the default selection: every recipe with budgetprune's fine-tune
ALL_METHODS = tuple(BAR_METHODS) + TP_METHODS + tuple(f"{m}-plain" for m in TP_METHODS)
WINDOW = (0.95, 1.0)  # FLOPs / target, both sides
CPU = torch.device("cpu")

#: The budgetprune this process runs: its commit and uncommitted files when it was imported (the
#: working tree may change while a long run goes on; the rows record what the code was).
LOADED = budgetprune_state()


@dataclass(frozen=True)
class Settings:
    """What every run of one model in a results file shares (other settings need another --out)."""
    data: str
    train_subset: int
    teacher_epochs: int
    prune_epochs: int
    finetune_epochs: int
    lowlr_epochs: int
    tp_steps: int
    taylor_batches: int
    finetune: str = ""  # the kd fine-tune recipe in words: results made under another recipe are not mixed

    @property
    def epochs_after_teacher(self) -> int:
        return self.prune_epochs + self.finetune_epochs + self.lowlr_epochs


@dataclass(frozen=True)
class FineTune:
    """How a Torch-Pruning result is fine-tuned: ``stage`` trains it (a budgetprune recipe), with
    distillation from the teacher (``distill``) or the cross-entropy, at ``batch_size``; the last
    ``lowlr_epochs`` at ``lowlr_factor`` × the rate when the schedule is constant."""
    name: str
    stage: Recipe
    batch_size: int
    lowlr_epochs: int
    lowlr_factor: float
    distill: bool


#: The plain loop of the issue's reference: cross-entropy, Adam lr 1e-3, batch 128, no weight decay, constant rate.
PLAIN = FineTune("plain", Recipe(optimizer="adam", lr=1e-3, weight_decay=0.0), 128, 0, 1.0, False)


def finetune_recipe(method: str, settings: Settings) -> FineTune:
    """budgetprune's own fine-tune stage (``PruneConfig().recipe("finetune")``, its batch size,
    distillation weights and low-lr tail: what ``bar``'s compacted network gets), or the plain
    loop for ``-plain``."""
    if method.endswith("-plain"):
        return PLAIN
    cfg = PruneConfig()
    return FineTune("kd", cfg.recipe("finetune"), cfg.batch_size, settings.lowlr_epochs, cfg.lowlr_factor, True)


def recipe_words(ft: FineTune) -> str:
    r = ft.stage
    words = f"{r.optimizer} lr {r.lr:g}, weight decay {r.weight_decay:g}, batch {ft.batch_size}, {r.schedule}"
    if r.warmup_epochs:
        words += f" with {r.warmup_epochs:g}-epoch warm-up"
    if r.label_smoothing:
        words += f", label smoothing {r.label_smoothing:g}"
    return words + (", distillation from the teacher" if ft.distill else ", cross-entropy")


@dataclass
class Setup:
    """What the runs of one (model, seed) share: data, the teacher and the full model's costs."""
    model: str
    seed: int
    train: object
    test: object
    info: object
    teacher_file: Path
    teacher: nn.Module
    teacher_accuracy: float
    example: torch.Tensor
    full: dict  # flops (aten), bp_flops, params
    logits: torch.Tensor | None = None  # the teacher's logits on the training set, made when first needed

    def new_model(self) -> nn.Module:
        return new_model(self.model, self.info, self.seed)

    def teacher_logits(self) -> torch.Tensor:
        if self.logits is None:
            self.logits = predict_logits(self.teacher, self.train, CPU)
        return self.logits


def new_model(name: str, info, seed: int) -> nn.Module:
    return seeded_model(name, seed, info.in_channels, info.num_classes, info.image_size)


def costs(net: nn.Module, x: torch.Tensor) -> dict:
    """FLOPs by torch's counter and by budgetprune's, and parameters."""
    bp = bp_count(net, x)
    return {"flops": aten_macs(net, x), "bp_flops": bp["flops"] if isinstance(bp, dict) else bp,
            "params": sum(p.numel() for p in net.parameters())}


def prepare(model: str, seed: int, train, test, info, settings: Settings, folder: Path, log=print) -> Setup:
    """The (model, seed)'s teacher, trained by budgetprune's teacher stage in ``folder`` (or loaded from it)."""
    start = time.time()
    teacher_file, accuracy = train_teacher(model, seed, train, test, info, settings.teacher_epochs, folder, log=log)
    setup = from_teacher(model, seed, train, test, info, teacher_file, accuracy)
    setup.full["teacher_seconds"] = time.time() - start
    return setup


def record_teacher(record: dict, name: str, entry: dict) -> None:
    """The teacher's entry in the results; one recorded before keeps its training time (a later
    run that loads the teacher would otherwise record the seconds it took to load it)."""
    before = record["teachers"].get(name) or {}
    if "teacher_seconds" in before:
        entry = {**entry, "teacher_seconds": before["teacher_seconds"]}
    record["teachers"][name] = entry


def from_teacher(model: str, seed: int, train, test, info, teacher_file: Path, accuracy: float) -> Setup:
    """The (model, seed)'s Setup from a trained teacher's file (its test ``accuracy`` as measured)."""
    example = train[0][0].unsqueeze(0)
    teacher = load_teacher(teacher_file, new_model(model, info, seed), example)
    return Setup(model, seed, train, test, info, teacher_file, teacher, accuracy, example, costs(teacher, example))


def run_bar(setup: Setup, factor: float, settings: Settings, folder: Path, log=print,
            channel_multiple=BAR_METHODS["bar"]) -> tuple[nn.Module, dict]:
    """budgetprune's BAR with its defaults under a FLOP budget, from the shared teacher's file
    (``channel_multiple``: the default's, or 1 for exact widths)."""
    net, m = budgetprune.prune(setup.new_model(), setup.train, setup.test, budget=1.0 / factor, metric="flops",
                               method="bar", teacher=setup.teacher_file, out=folder,
                               channel_multiple=channel_multiple,
                               resume=(folder / "checkpoint.pt").exists(), log=log,
                               epochs=settings.prune_epochs, finetune_epochs=settings.finetune_epochs,
                               lowlr_epochs=settings.lowlr_epochs, seed=setup.seed, progress=False)
    return net, bar_extra(m)


def bar_extra(m: dict) -> dict:
    """What a BAR row keeps of its run's ``metrics.json``: the budget ratio, the accuracy, the kept
    widths, the padding kept and, where the padding was timed against exact widths, that timing."""
    extra = {"budget_ratio": m["budget_ratio"], "test_accuracy": m["test_accuracy"],
             "widths": "-".join(str(w["kept"]) for w in m["widths"].values()), "padding": m["padding"]}
    if m.get("padding_timing"):  # the padded network against exact widths (Pruner time_padding)
        extra["padding_timing"] = m["padding_timing"]
    if m.get("deployed"):  # the run's own timing of its exported network against the unpruned one
        extra["deployed"] = m["deployed"]
    return extra


def _widths_cell(rows: list[dict]) -> str:
    """Per seed: the kept widths, and whether they were padded (with the timed speedup over exact widths)."""
    cells = []
    for r in rows:
        if "widths" not in r:
            return "–"
        timing = r.get("padding_timing") or {}
        kept = "padded" if r["padding"][0] > 1 else "exact"
        cells.append(f"{r['widths']} {kept}" + (f" ({timing['speedup']:.2f}×)" if "speedup" in timing else ""))
    return "; ".join(cells)


def taylor_gradients(model: nn.Module, data, batches: int, generator: torch.Generator) -> None:
    """Fill ``.grad`` with the cross-entropy's gradient summed over ``batches`` training batches."""
    model.train()
    model.zero_grad(set_to_none=True)
    for k, (_, x, y) in enumerate(iterate_batches(data, 64, shuffle=True, generator=generator)):
        if k >= batches:
            break
        F.cross_entropy(model(x), y).backward()


def prune_to(tp, model: nn.Module, importance, target: float, x: torch.Tensor) -> tuple[nn.Module, dict]:
    """One Torch-Pruning step on a copy of ``model`` that lands as close to ``target`` FLOPs as it
    can without passing it: for global and for local (per-layer) ranking, the smallest pruning ratio
    at or under ``target``, found by bisection; of the two, the one with more FLOPs left (a LeNet-5
    conv1 channel alone is about 4 % of the network's FLOPs, so either ranking may have to stop well under
    the target). The gradients in ``.grad``, which Taylor importance reads, are copied along.
    Returns the pruned copy and the step's record."""
    def trial(ratio: float, global_pruning: bool):
        net = copy.deepcopy(model)
        for p, q in zip(model.parameters(), net.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        base_pruner(tp, net, x, importance, ratio, global_pruning=global_pruning).step()
        net.zero_grad(set_to_none=True)
        return aten_macs(net, x), net

    def bisect(global_pruning: bool):
        lo, hi, best, trials = 0.0, None, None, 0
        for guess in (0.5, 0.75, 0.9, 0.95, 0.98, 0.99):  # a ratio at or under the target (lo: over it)
            trials += 1
            f, net = trial(guess, global_pruning)
            if f <= target:
                hi, best = guess, (f, net)
                break
            lo = guess
        if hi is None:
            return None
        while hi - lo > 0.25 / channels:  # finer than one channel of the whole network
            mid = (lo + hi) / 2
            trials += 1
            f, net = trial(mid, global_pruning)
            if f <= target:
                hi, best = mid, (f, net)
            else:
                lo = mid
        return {"flops": best[0], "net": best[1], "ratio": hi, "trials": trials,
                "ranking": "global" if global_pruning else "local"}

    flops = aten_macs(model, x)
    if flops <= target:
        return model, {"ratio": 0.0, "flops": flops, "target": target, "trials": 0}
    channels = sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                   for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    found = [r for r in (bisect(True), bisect(False)) if r is not None]
    if not found:
        raise RuntimeError(f"Torch-Pruning cannot reach {target:.4g} FLOPs at pruning ratio 0.99")
    best = max(found, key=lambda r: r["flops"])
    step = {k: v for k, v in best.items() if k != "net"} | {"target": target,
                                                             "other": [{k: r[k] for k in ("ranking", "ratio", "flops")}
                                                                       for r in found if r is not best]}
    return best["net"], step


def epoch_shares(epochs: int, steps: int) -> list[int]:
    """``epochs`` split over ``steps`` as evenly as whole epochs allow (the later steps take the rest)."""
    return [epochs // steps + (1 if i >= steps - epochs % steps else 0) for i in range(steps)]


def run_tp(tp, setup: Setup, method: str, factor: float, settings: Settings, log=print) -> tuple[nn.Module, dict]:
    """A Torch-Pruning recipe (``tp-{magnitude,taylor}-{oneshot,iterative}[-plain]``) from the teacher's weights."""
    _, kind, schedule, *_ = method.split("-")
    ft = finetune_recipe(method, settings)
    model = setup.new_model()
    model.load_state_dict(setup.teacher.state_dict())
    importance = (tp.importance.GroupMagnitudeImportance(p=2) if kind == "magnitude"
                  else tp.importance.GroupTaylorImportance())
    steps = settings.tp_steps if schedule == "iterative" else 1
    total = settings.epochs_after_teacher
    shares = epoch_shares(total, steps)
    keep = 1.0 / math.sqrt(factor)  # channel keep fraction whose square is the FLOP share
    smoothing = ft.stage.label_smoothing
    if ft.distill:
        logits = setup.teacher_logits()
        cfg = PruneConfig()

        def loss_fn(out, y, idx, x):
            return distillation_loss(out, y, logits.index_select(0, idx), cfg.kd_alpha, cfg.kd_temperature, smoothing)
    else:
        def loss_fn(out, y, idx, x):
            return distillation_loss(out, y, None, label_smoothing=smoothing)
    seeding.seed_stage(setup.seed, "finetune")
    record, epoch = {"steps": [], "recipe": asdict(ft), "epoch_shares": shares}, 0
    steps_per_epoch = num_batches(setup.train, ft.batch_size)
    for i in range(steps):
        target = setup.full["flops"] * (1.0 - (1.0 - keep) * (i + 1) / steps) ** 2
        if kind == "taylor":
            gen = torch.Generator().manual_seed(seeding.stream_seed(setup.seed, f"taylor-{i}"))
            taylor_gradients(model, setup.train, settings.taylor_batches, gen)
        model, step = prune_to(tp, model, importance, target, setup.example)
        record["steps"].append(step)
        log(f"[{method} {factor:g}x] step {i + 1}/{steps}: {step.get('ranking', '')} ratio {step['ratio']:.4f}, FLOPs {step['flops']:.4g} "
            f"({step['flops'] / target:.4f} of the step's target)")
        # each step's fine-tune is one stage of budgetprune's recipe (its warm-up and schedule over
        # the step's share of epochs; a constant rate takes the low-lr tail in the last share)
        opt = make_optimizer(list(model.parameters()), ft.stage)
        low = min(ft.lowlr_epochs, shares[i]) if i == steps - 1 else 0
        schedule_fn = stage_schedule(opt, ft.stage, steps_per_epoch, shares[i] - low, low, ft.lowlr_factor)
        for e in range(shares[i]):
            stats = train_epoch(model, setup.train, opt, loss_fn, device=CPU, batch_size=ft.batch_size,
                                generator=seeding.batch_generator(setup.seed, 2, epoch), show_progress=False,
                                step=e * steps_per_epoch, before_step=schedule_fn)
            log(f"[{method} {factor:g}x] epoch {epoch + 1}/{total}: loss {stats['loss']:.4f} "
                f"{stats['seconds']:.0f}s")
            epoch += 1
    model.eval()
    record["test_accuracy"] = evaluate(model, setup.test, CPU)["accuracy"]
    return model, record


def run_one(tp, setup: Setup, method: str, factor: float, settings: Settings, folder: Path, log=print) -> dict:
    """One (model, seed, method, factor): its accuracy, FLOPs by both counters, params and wall time."""
    start = time.time()
    if method in BAR_METHODS:
        net, extra = run_bar(setup, factor, settings, folder, log, channel_multiple=BAR_METHODS[method])
    else:
        net, extra = run_tp(tp, setup, method, factor, settings, log)
    c = costs(net, setup.example)
    target = setup.full["flops"] / factor
    row = {"model": setup.model, "seed": setup.seed, "method": method, "factor": factor,
           "test_accuracy": extra.pop("test_accuracy"), "teacher_accuracy": setup.teacher_accuracy,
           "flops": c["flops"], "flops_over_target": c["flops"] / target,
           "flops_reduction": setup.full["flops"] / c["flops"],
           "bp_flops": c["bp_flops"], "params": c["params"], "params_reduction": setup.full["params"] / c["params"],
           "seconds": time.time() - start, **extra}
    if isinstance(c["bp_flops"], float):
        row["bp_flops_reduction"] = setup.full["bp_flops"] / c["bp_flops"]
    row["in_window"] = WINDOW[0] <= row["flops_over_target"] <= WINDOW[1] + 1e-9
    row["budgetprune"] = LOADED
    return row


# -- the results file -----------------------------------------------------------------------

def key(model: str, seed: int, method: str, factor: float) -> str:
    return f"{model}/seed{seed}/{method}/{factor:g}"


@contextlib.contextmanager
def locked(out: Path):
    """The results file to one process at a time (processes running other seeds share it)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{NAME}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read(out: Path) -> dict:
    path = out / f"{NAME}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update(out: Path, change) -> dict:
    """Read the results file, ``change(record)``, write it back atomically."""
    with locked(out):
        record = read(out)
        change(record)
        io.write_json(out / f"{NAME}.json", record)
    return record


def supersede(record: dict, keys: set) -> list[str]:
    """Move the finished runs named by ``keys`` to ``record["superseded"]`` (``--redo``), so they
    run again; the keys moved."""
    moved = sorted(keys & set(record.get("runs", {})))
    for k in moved:
        record.setdefault("superseded", []).append({"key": k, **record["runs"].pop(k)})
    return moved


def same_teacher(record: dict, model: str, seed: int, accuracy: float, p: Parser) -> None:
    """Refuse to add runs from a teacher other than the one the results' other runs of (model, seed) used.

    A teacher retrained from its seed (its folder in ``--work`` gone) is the same network only if it
    scores the same; otherwise the methods of one row would not share their starting point.
    """
    before = record.get("teachers", {}).get(f"{model}/seed{seed}")
    if before is not None and abs(before["accuracy"] - accuracy) > 1e-9:
        p.error(f"the {model} seed {seed} teacher scores {100 * accuracy:.2f} %, the one the results were made from "
                f"{100 * before['accuracy']:.2f} %: runs from it would not share a teacher; pass another --out and "
                "--work, or bring back that teacher's folder")


# -- the page and the plot --------------------------------------------------------------------

def summary(record: dict) -> dict:
    """Per (model, factor): per method the seeds' values; the best method; ties with it."""
    groups: dict = {}
    for row in record.get("runs", {}).values():
        g = groups.setdefault(row["model"], {}).setdefault(row["factor"], {}).setdefault(row["method"], [])
        g.append(row)
    out = {}
    for model, by_factor in groups.items():
        for factor, by_method in by_factor.items():
            acc = {m: [100 * r["test_accuracy"] for r in rows] for m, rows in by_method.items()}
            best = max(acc, key=lambda m: mean_std(acc[m])[0])
            out.setdefault(model, {})[factor] = {
                m: {"rows": by_method[m], "acc": acc[m], "best": m == best, "tie": m != best and tie(acc[m], acc[best])}
                for m in by_method}
    return out


def _order(methods) -> list[str]:
    return sorted(methods, key=lambda m: ALL_METHODS.index(m) if m in ALL_METHODS else len(ALL_METHODS))


def _cell(s: dict) -> str:
    text = format_mean_std(s["acc"])
    if s["best"]:
        return f"**{text}**"
    return f"{text} (tie)" if s["tie"] else text


def _range(values, digits=2) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}–{hi:.{digits}f}"


def model_table(model: str, by_factor: dict) -> list[str]:
    factors = sorted(by_factor)
    methods = _order({m for f in factors for m in by_factor[f]})
    lines = ["| method | fine-tune | " + " | ".join(f"{f:g}×: accuracy % | FLOPs ÷ | params ÷" for f in factors) + " |",
             "|---|---|" + "---:|---:|---:|" * len(factors)]
    for m in methods:
        cells = []
        for f in factors:
            s = by_factor[f].get(m)
            if s is None:
                cells += ["–", "–", "–"]
                continue
            n = len(s["rows"])
            cells += [_cell(s) + ("" if n in (1, 3) else f" (n={n})"),  # one seed: format_mean_std says so
                      _range([r["flops_reduction"] for r in s["rows"]]),
                      _range([r["params_reduction"] for r in s["rows"]], 1)]
        tune = "BAR's own (KD)" if m in BAR_METHODS else ("plain CE" if m.endswith("-plain") else "budgetprune's (KD)")
        lines.append(f"| {m} | {tune} | " + " | ".join(cells) + " |")
    return lines


def detail_table(model: str, by_factor: dict) -> list[str]:
    lines = ["| method | factor | seeds | accuracy per seed % | FLOPs / target (torch counter) | FLOPs ÷ budgetprune's counter | "
             "all in [0.95, 1] | deployed speedup | kept widths per seed (padding timed: ×) | wall s (mean) |",
             "|---|---:|---|---|---|---|---|---|---|---:|"]
    for f in sorted(by_factor):
        for m in _order(by_factor[f]):
            rows = sorted(by_factor[f][m]["rows"], key=lambda r: r["seed"])
            bp = [r["bp_flops_reduction"] for r in rows if "bp_flops_reduction" in r]
            fast = [r["deployed"] for r in rows if "deployed" in r]
            runtime = f" ({fast[0]['runtime']}, batch {fast[0]['batch']})" if fast else ""
            lines.append(f"| {m} | {f:g}× | {','.join(str(r['seed']) for r in rows)} | "
                         f"{', '.join('%.2f' % (100 * r['test_accuracy']) for r in rows)} | "
                         f"{_range([r['flops_over_target'] for r in rows], 4)} | {_range(bp) if bp else '–'} | "
                         f"{'yes' if all(r['in_window'] for r in rows) else 'no'} | "
                         f"{_range([d['speedup'] for d in fast]) + '×' + runtime if fast else '–'} | "
                         f"{_widths_cell(rows)} | {sum(r['seconds'] for r in rows) / len(rows):.0f} |")
    return lines


def verdicts(by_factor: dict) -> list[str]:
    out = []
    for f in sorted(by_factor):
        s = by_factor[f]
        tps = [m for m in s if m not in BAR_METHODS]
        if not tps:
            continue
        best_tp = max(tps, key=lambda m: mean_std(s[m]["acc"])[0])
        for bar in (m for m in BAR_METHODS if m in s):
            gap = mean_std(s[bar]["acc"])[0] - mean_std(s[best_tp]["acc"])[0]
            word = "tie" if tie(s[bar]["acc"], s[best_tp]["acc"]) else f"{bar} ahead" if gap > 0 else "Torch-Pruning ahead"
            out.append(f"{f:g}×: {bar} − best Torch-Pruning ({best_tp}) = {gap:+.2f} points: {word}")
    return out


def superseded_table(rows: list) -> list[str]:
    """The runs ``--redo`` replaced, grouped by (model, method, factor, budgetprune version): the before."""
    if not rows:
        return []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["factor"], r.get("budgetprune", "an earlier version")), []).append(r)
    lines = ["## Superseded runs", "", "Runs made again with `--redo` (after a default changed); what they scored before:",
             "", "| model | method | factor | made with budgetprune | seeds | accuracy % |", "|---|---|---:|---|---|---:|"]
    for (model, method, factor, made), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        rs = sorted(rs, key=lambda r: r["seed"])
        lines.append(f"| {model} | {method} | {factor:g}× | {made} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{format_mean_std([100 * r['test_accuracy'] for r in rs])} |")
    return lines + [""]


def write_page(record: dict, out: Path) -> None:
    s = summary(record)
    lines = ["# Torch-Pruning side by side on accuracy at equal FLOPs and epochs", "",
             "Commands (each invocation added the runs it finished; the file holds their union):", ""]
    lines += [f"- `{c['command']}` ({c['wall_seconds'] / 60:.0f} min)" for c in record.get("commands", [])]
    lines += ["", f"Torch-Pruning {record.get('torch_pruning')}, torch {record.get('torch')}, budgetprune "
              f"{record.get('budgetprune')}. Machine: {record.get('machine')}.", "",
              "How each side ran: one teacher per model and seed (budgetprune's teacher stage), shared by every "
              "method. `bar` is `budgetprune.prune(method='bar', metric='flops', budget=1/factor)` with the "
              "library's defaults. Torch-Pruning: `BasePruner`, `GroupMagnitudeImportance(p=2)` or "
              "`GroupTaylorImportance` (gradients of the cross-entropy over a few training batches before each step); "
              "each step's pruning ratio bisected, for global and for local ranking, to the smallest one at or under "
              "that step's FLOP target, the ranking that leaves more FLOPs kept. Fine-tune `kd` = budgetprune's own "
              "fine-tune stage, the one `bar`'s compacted network gets (see each model's recipe below; the engine's "
              "`train_epoch`); `-plain` = cross-entropy, Adam lr 1e-3, batch 128, no weight decay, constant rate. "
              "FLOPs: one counter for both sides, `torch.utils.flop_counter` (conv and matmul MACs per image); "
              "budgetprune's `resource_report` count is in the second table. Nothing was tuned; the test set is read "
              "once per run, for the final accuracy.", "",
              "Accuracy: mean ± standard deviation over the seeds (n=3 unless marked); **bold**: the best method at "
              "that factor; (tie): within two standard errors of the difference of the best "
              "(`benchmarks/stats.py`). FLOPs ÷ and params ÷: reduction vs the unpruned teacher, range over seeds. "
              "Deployed speedup (BAR's runs): each run's own timing of its exported network against the "
              "unpruned one (`metrics.json` `deployed`), range over seeds. Kept widths (BAR's runs, per seed: "
              "each gated layer's kept channels or units, and whether the widths were padded to multiples of 8; "
              "where the run timed its padded network against exact widths, the padded one's speedup over them: "
              "the padding is kept from 1.05×).", ""]
    for model in sorted(s):
        teachers = [100 * t["accuracy"] for k, t in record.get("teachers", {}).items() if k.startswith(model + "/")]
        st = record["settings"][model]
        lines += [f"## {model}", "", f"Data: {st['data']}, {st['train_images']} training images (the same for every "
                  f"seed), the whole test set. Epochs per side: teacher {st['teacher_epochs']}, then E = "
                  f"{st['prune_epochs'] + st['finetune_epochs'] + st['lowlr_epochs']}: `bar` prunes {st['prune_epochs']}, "
                  f"then {finetune_words(st['finetune_epochs'], st['lowlr_epochs'])}; each Torch-Pruning recipe "
                  f"fine-tunes E epochs (iterative: {st['tp_steps']} pruning steps, each followed by an equal share of "
                  f"them; Taylor: {st['taylor_batches']} batches of gradients). Fine-tune `kd`: "
                  f"{st.get('finetune') or 'adam lr 0.001, weight decay 0.0005, batch 64, constant, the last epoch at lr/10, distillation from the teacher'}. "
                  + (f"Unpruned teachers: {format_mean_std(teachers)} %"
                     + ("" if len(teachers) == 1 else f" (n={len(teachers)})") + "." if teachers else ""), ""]
        lines += model_table(model, s[model]) + [""]
        v = verdicts(s[model])
        if v:
            lines += ["Target (budgetprune's best default ≥ Torch-Pruning's best at equal FLOPs and epochs):", ""]
            lines += [f"- {x}" for x in v] + [""]
        lines += detail_table(model, s[model]) + [""]
    lines += superseded_table(record.get("superseded", []))
    lines += [f"![accuracy vs FLOP reduction]({NAME}.png)", ""]
    io.write_text(out / f"{NAME}.md", "\n".join(lines))


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = summary(record)
    if not s:
        return
    fig, axes = plt.subplots(1, len(s), figsize=(6.5 * len(s), 4.2), squeeze=False)
    for ax, model in zip(axes[0], sorted(s)):
        methods = _order({m for f in s[model] for m in s[model][f]})
        for m in methods:
            pts = [(f, s[model][f][m]) for f in sorted(s[model]) if m in s[model][f]]
            x = [mean_std([r["flops_reduction"] for r in p["rows"]])[0] for _, p in pts]
            y = [mean_std(p["acc"]) for _, p in pts]
            if m in BAR_METHODS:
                style = dict(lw=2.5, color="black", ls="-" if m == "bar" else ":")
            else:
                style = dict(ls="--" if m.endswith("-plain") else "-")
            ax.errorbar(x, [v[0] for v in y], yerr=[v[1] for v in y], marker="o", capsize=3, label=m, **style)
        factors = sorted(s[model])
        ax.set_xscale("log", base=2)
        ax.set_xlim(factors[0] / 1.4, factors[-1] * 1.4)  # one factor alone still gets a readable axis
        ax.set_xticks(factors, [f"{f:g}×" for f in factors])
        ax.minorticks_off()
        ax.set_xlabel("FLOP reduction (torch.utils.flop_counter)")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------

def factor_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"factors must be numbers, got {text!r}") from None
    if not values or any(not v > 1 for v in values):
        raise argparse.ArgumentTypeError(f"factors must be numbers above 1, got {text!r}")
    return values


def seed_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be integers of 0 or more, got {text!r}")
    return values


def parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--models", type=lambda t: name_list(t, budgetprune.available_models(), "model"),
                   default="lenet5,resnet20")
    p.add_argument("--seeds", type=seed_list, default="0,1,2")
    p.add_argument("--factors", type=factor_list, default="4,8,16", help="FLOP reduction factors")
    p.add_argument("--methods", type=lambda t: name_list(t, list(ALL_METHODS), "method"), default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(ALL_METHODS)} (default: all but the -plain ones)")
    p.add_argument("--total-epochs", type=int, default=12, help="per side, the teacher's included")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--prune-epochs", type=int, default=2, help="bar's training + pruning epochs")
    p.add_argument("--finetune-epochs", type=int, default=1, help="bar's fine-tune epochs")
    p.add_argument("--lowlr-epochs", type=int, default=1,
                   help="the last fine-tune epochs (bar and the kd recipe; the cosine schedule spans them with the "
                        "fine-tune epochs, a constant one runs them at lr/10)")
    p.add_argument("--tp-steps", type=int, default=4, help="pruning steps of the iterative Torch-Pruning recipes")
    p.add_argument("--taylor-batches", type=int, default=10, help="training batches whose gradients Taylor reads")
    p.add_argument("--train-subset", type=int, default=0, help="train on this many images (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", default=str(HERE.parent / "runs" / NAME), help="teachers' and BAR runs' folders")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--redo", type=lambda t: name_list(t, list(ALL_METHODS), "method"), default=[],
                   help="methods whose finished runs (of these models, seeds and factors) are run again, e.g. after "
                        "a default changed; the old rows move to the file's 'superseded' list")
    p.add_argument("--report-only", action="store_true", help="only rewrite the page and plot from the results file")
    return p


def check(p: Parser, args) -> Settings:
    for name in ("teacher_epochs", "finetune_epochs", "lowlr_epochs", "train_subset", "threads"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    if args.prune_epochs < 1 or args.tp_steps < 1 or args.taylor_batches < 1:
        p.error("--prune-epochs, --tp-steps and --taylor-batches must be at least 1")
    settings = Settings(args.data, args.train_subset, args.teacher_epochs, args.prune_epochs, args.finetune_epochs,
                        args.lowlr_epochs, args.tp_steps, args.taylor_batches, "")
    settings = replace(settings, finetune=recipe_words(finetune_recipe("tp", settings)))
    if args.teacher_epochs + settings.epochs_after_teacher != args.total_epochs:
        p.error(f"--total-epochs {args.total_epochs} must equal --teacher-epochs + --prune-epochs + "
                f"--finetune-epochs + --lowlr-epochs ({args.teacher_epochs + settings.epochs_after_teacher})")
    if set(args.redo) - set(args.methods):
        p.error(f"--redo {','.join(args.redo)}: only methods this invocation runs (--methods) can be redone")
    if args.lowlr_epochs > settings.epochs_after_teacher:
        p.error("--lowlr-epochs cannot exceed the epochs after the teacher")
    made = read(Path(args.out)).get("settings", {})
    for model in args.models:
        there = made.get(model, asdict(settings))
        differ = ", ".join(f"{k} {there.get(k)} there, {v} here" for k, v in asdict(settings).items() if there.get(k) != v)
        if differ and not args.report_only:
            p.error(f"{Path(args.out) / (NAME + '.json')} holds {model} runs with other settings ({differ}): pass "
                    "another --out and --work")
    return settings


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    settings = check(p, args)
    out, work = Path(args.out), Path(args.work)
    if args.report_only:
        record = read(out)
        if not record:
            p.error(f"no results in {out / (NAME + '.json')}")
        write_page(record, out)
        plot(record, out / f"{NAME}.png")
        return 0
    if any(m not in BAR_METHODS for m in args.methods):
        try:
            import torch_pruning as tp
        except ImportError:
            p.error("Torch-Pruning is not installed: pip install -c constraints.txt '.[bench]'")
    else:
        tp = None
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    command = f"python benchmarks/{NAME}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    splits = load_dataset(args.data, root=args.data_root)
    train = random_subset(splits.train, args.train_subset)

    def header(r):
        for row in r.get("runs", {}).values():  # rows from before rows recorded their version: the file's, or older
            row.setdefault("budgetprune", f"{r.get('budgetprune', '?')} or before")
        r.setdefault("settings", {}).update({m: asdict(settings) | {"train_images": len(train)} for m in args.models})
        r.update(torch=torch.__version__, torch_pruning=version("torch-pruning"), budgetprune=LOADED,
                 machine=machine(CPU))
        r.setdefault("runs", {})
        r.setdefault("teachers", {})
    update(out, header)
    for model in args.models:
        for seed in args.seeds:
            redo = {key(model, seed, m, f) for m in args.redo for f in args.factors}
            done = set(read(out)["runs"]) - redo
            todo = [(f, m) for f in args.factors for m in args.methods if key(model, seed, m, f) not in done]
            if not todo:
                continue
            base = work / model / f"seed{seed}"
            setup = prepare(model, seed, train, splits.test, splits.info, settings, base / "teacher",
                            log=lambda s: print(f"[{model} seed {seed} teacher] {s}", flush=True))
            same_teacher(read(out), model, seed, setup.teacher_accuracy, p)
            moved: list[str] = []
            update(out, lambda r: moved.extend(supersede(r, redo)))
            for k in moved:  # a finished run folder would only be read back: set it aside, so the run trains
                _, _, method, factor = k.split("/")
                folder = base / f"{method}-{factor}"
                if folder.exists():
                    folder.rename(next(folder.with_name(f"{folder.name}.superseded-{i}") for i in range(1, 10**6)
                                       if not folder.with_name(f"{folder.name}.superseded-{i}").exists()))
            update(out, lambda r: record_teacher(r, f"{model}/seed{seed}", {
                "accuracy": setup.teacher_accuracy, **setup.full}))
            for factor, method in todo:
                row = run_one(tp, setup, method, factor, settings, base / f"{method}-{factor:g}",
                              log=lambda s: print(f"[{model} seed {seed}] {s}", flush=True))
                update(out, lambda r: r["runs"].__setitem__(key(model, seed, method, factor), row))
                print(json.dumps(row), flush=True)
    record = update(out, lambda r: r.setdefault("commands", []).append(
        {"command": command, "wall_seconds": time.time() - t0}))
    with locked(out):
        write_page(record, out)
        plot(record, out / f"{NAME}.png")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
