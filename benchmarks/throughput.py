"""Throughput on one device: images/s of a plain training step, of every method's pruning step,
and of a compacted network's inference against the unpruned network's (a benchmark, not a test).

Per model (``--models``; default LeNet-5 and ResNet-20 on Fashion-MNIST-shaped inputs, 1×28×28
at batch 128, and ResNet-50 on 3×64×64 at batch 16), copies of one network with the same
initial weights train on one random batch with SGD (lr 1e-3, momentum 0.9):

- **plain**, the teacher's step: forward, cross-entropy, backward, the optimizer's step;
- **every method** (``--methods``, default all of ``budgetprune.methods.available_methods()``):
  the same step with a ``budgetprune.Pruner`` under ``--budget``, its ``penalty()`` added to
  the loss and its ``step()`` called after the optimizer's (the README's loop), its gates
  sampled per example (the default); the methods of ``--per-batch`` (default bar) once more with
  ``gate_sample="batch"`` (rows ``bar/batch``: one sample per batch, folded into the weights). Each pruner's
  ``total_steps`` is ten times the steps it takes here, so the budget barely moves: this times
  the step early in a run, not a method's rare events (an iterative cut, a CS round), which the
  median leaves out.

All of a model's contenders are timed in one run: ``--warmup`` untimed steps each, then
``--rounds`` rounds in which each takes ``--steps`` steps in a row, the order rotating every
round, so a machine that slows down slows all alike; a contender's images/s is the batch over
its median step, and its ratio is its median step over the plain one's. On a shared machine
each turn waits until other processes leave the CPUs alone and is repeated when they did not
(:class:`budgetprune.quiet.Quiet`); the page states how much they used.

Inference: a BAR pruner on another copy takes ``--warmup`` steps and finalizes (the exact
budget, the compacted network, blocks weighed for eager PyTorch); the compacted network and the
unpruned one, both in eval mode without gradients, are timed the same way at the same batch.

Device-agnostic: ``--device cuda`` puts every model, gate and batch on the GPU and synchronises
around each timed step and forward pass.

    python benchmarks/throughput.py                                     # CPU, lenet5, resnet20, resnet50
    python benchmarks/throughput.py --device cuda --models resnet20,resnet50 --batch 128
    python benchmarks/throughput.py --quick                             # smoke run, seconds

Writes ``benchmarks/results/throughput.{json,md}`` (``--quick``: ``runs/throughput_quick``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (HERE, RESULTS, Parser, inference_call, interleaved_steps, machine, method_and_sample,  # noqa: E402
                    name_list, pruning_steps, source_state, training_step, write_results)
from budgetprune.quiet import Quiet  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune import Pruner  # noqa: E402
from budgetprune.budget import parse_budgets  # noqa: E402
from budgetprune.errors import first_line  # noqa: E402
from budgetprune.methods import available_methods  # noqa: E402

#: Per model: input channels, pixels and batch of the default configuration.
MODELS = {"lenet5": (1, 28, 128), "resnet20": (1, 28, 128), "resnet50": (3, 64, 16)}
#: Timing settings of a full run and of ``--quick`` (a flag given on the command line wins).
FULL = {"models": list(MODELS), "rounds": 5, "steps": 3, "warmup": 2, "infer_steps": 10, "quiet_budget_min": 5.0}
QUICK = {"models": ["lenet5"], "batch": 16, "rounds": 2, "steps": 1, "warmup": 1, "infer_steps": 2,
         "quiet_budget_min": 0.0}
#: The targets of the BAR step over a plain one (issue 12): on CPU, and on GPU for ResNet-20 at batch 128.
TARGETS = {"cpu": 1.15, "cuda": 1.10}
LR = 1e-3


def arguments(argv) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--models", type=lambda t: name_list(t, list(MODELS), "model(s)"),
                   help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    p.add_argument("--methods", type=lambda t: name_list(t, available_methods(), "method(s)"), default=available_methods(),
                   help="comma-separated pruning methods (default: all)")
    p.add_argument("--per-batch", type=lambda t: name_list(t, available_methods(), "method(s)"), default=["bar"],
                   help="comma-separated methods timed once more with gates sampled per batch (default: bar)")
    p.add_argument("--budget", default="flops=0.25", help="the pruners' budget (as --budget of the CLI)")
    p.add_argument("--batch", type=int, help="batch of every model (default: 128, resnet50 16)")
    p.add_argument("--size", type=int, help="input pixels of every model (default: 28, resnet50 64)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5)")
    p.add_argument("--steps", type=int, help="steps per contender and round (default 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per contender first (default 2)")
    p.add_argument("--infer-steps", type=int, help="forward passes per network and round (default 10)")
    p.add_argument("--quiet-busy", type=float, default=0.15,
                   help="time while other processes use at most this share of all CPUs (see budgetprune.quiet.Quiet)")
    p.add_argument("--quiet-budget-min", type=float,
                   help="minutes the whole run may wait for a quiet machine (default 5; 0: never wait)")
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds: lenet5 at batch 16, 2 rounds of 1 step")
    p.add_argument("--out", help="results folder (default benchmarks/results; --quick: runs/throughput_quick)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = args.out or str(HERE.parent / "runs" / "throughput_quick" if args.quick else RESULTS)
    for flag in ("batch", "size", "rounds", "steps", "infer_steps"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    if args.warmup < 0 or args.quiet_budget_min < 0 or not 0 < args.quiet_busy <= 1:
        p.error("--warmup and --quiet-budget-min must be 0 or more, --quiet-busy in (0, 1]")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be cpu, cuda or cuda:N, not {args.device!r}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu, cuda or cuda:N, not {str(args.device)!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device")
    try:
        parse_budgets(args.budget, "volume")
    except budgetprune.BudgetpruneError as exc:
        p.error(f"--budget: {exc}")
    return args


# --------------------------------------------------------------------------------------------- measuring


def configuration(name: str, args) -> dict:
    channels, size, batch = MODELS[name]
    size = args.size or size
    return {"model": name, "batch": args.batch or batch, "input_shape": [channels, size, size]}


def contender(reference: torch.nn.Module, x, y, method: str | None, args, total_steps: int) -> dict:
    """A copy of ``reference``, its optimizer and (with ``method``: a name, or ``name/batch`` for
    gates sampled per batch) its Pruner; the step that times them."""
    model = copy.deepcopy(reference).train()
    out = {}
    pruner = None
    if method is not None:
        name, sample = method_and_sample(method)
        start = time.perf_counter()
        pruner = Pruner(model, x[:2], args.budget, method=name, total_steps=total_steps, deploy_runtime="eager",
                        gate_sample=sample)
        out = {"pruner_build_s": time.perf_counter() - start, "groups": len(pruner.graph.groups)}
    optimizer = torch.optim.SGD(pruner.parameters(lr=LR) if pruner else model.parameters(), lr=LR, momentum=0.9)
    out["step"] = lambda: training_step(model, optimizer, x, y, pruner)
    return out


def contenders(methods: list[str], per_batch: list[str]) -> list[str]:
    """The timed methods: each of ``methods`` (``--methods``), then ``name/batch`` for each of
    ``per_batch`` (``--per-batch``)."""
    return [*methods, *(f"{m}/batch" for m in per_batch)]


def summary(times: list[float], shares: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"step_s": median, "mean_step_s": statistics.fmean(times), "images_per_s": batch / median,
            "steps_s": times, "others_cpu_share_per_turn": shares}


def training(reference, x, y, args, quiet: Quiet) -> list[dict]:
    """Rows of the plain step and of every method's step (or its one-line error), ratios to the plain step."""
    total = 10 * (args.warmup + args.rounds * args.steps)
    rows, steps = {}, {}
    for method in [None, *contenders(args.methods, args.per_batch)]:
        key = method or "plain"
        try:
            c = contender(reference, x, y, method, args, total)
        except Exception as exc:  # one method's failure is recorded, the others still run
            rows[key] = {"method": key, "error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
            print(f"{key}: failed: {rows[key]['error']}", flush=True)
            continue
        steps[key] = c.pop("step")
        rows[key] = {"method": key, **c}
    try:
        times, shares = interleaved_steps(steps, args.rounds, args.steps, args.warmup, run=quiet.run)
    except Exception as exc:  # a step failing mid-run: the model's row says so
        return [{"method": "plain", "error": f"{type(exc).__name__}: {first_line(exc, 300)}"}]
    for key in steps:
        rows[key].update(summary(times[key], shares[key], len(x)))
    compare(list(rows.values()))
    return list(rows.values())


def compare(rows: list[dict]) -> None:
    """Add to each timed row its median and mean step over the plain row's, and the median
    ratio's 95 % interval."""
    plain = next(row for row in rows if row["method"] == "plain")
    for row in rows:
        if "step_s" in row and "step_s" in plain:
            row["ratio"] = row["step_s"] / plain["step_s"]
            row["mean_ratio"] = row["mean_step_s"] / plain["mean_step_s"]
            row["ratio_95"] = ratio_interval(row["steps_s"], plain["steps_s"])


def ratio_interval(numerator: list[float], denominator: list[float], draws: int = 2000) -> list[float]:
    """The 95 % bootstrap interval of median(numerator) ÷ median(denominator), each list
    resampled with replacement (steps taken as independent; fixed seed)."""
    rng = random.Random(0)
    ratios = sorted(statistics.median(rng.choices(numerator, k=len(numerator)))
                    / statistics.median(rng.choices(denominator, k=len(denominator))) for _ in range(draws))
    return [ratios[round(0.025 * (draws - 1))], ratios[round(0.975 * (draws - 1))]]


def inference(reference, x, y, args, quiet: Quiet) -> dict:
    """A BAR pruning of a copy of ``reference`` to the budget, compacted; both networks' forward passes timed."""
    model = copy.deepcopy(reference).train()
    pruner = Pruner(model, x[:2], args.budget, method="bar", total_steps=max(args.warmup, 1), deploy_runtime="eager")
    optimizer = torch.optim.SGD(pruner.parameters(lr=LR), lr=LR, momentum=0.9)
    pruning_steps(model, pruner, optimizer, x, y, args.warmup)
    small, report = pruner.finalize(x[:2])
    unpruned = copy.deepcopy(reference).eval()
    times, shares = interleaved_steps({"unpruned": lambda: inference_call(unpruned, x),
                                       "compacted": lambda: inference_call(small, x)},
                                      args.rounds, args.infer_steps, 1, run=quiet.run)
    out = {"method": "bar", "block": report["plan"]["block"], "mixed_spaces": len(report["plan"].get("mixed_spaces", [])),
           "flop_reduction": pruner.full["flops"] / report["pruned"]["flops"],
           "V_over_B": report["pruned"][pruner.budget.metric] / pruner.budget.absolute(pruner.graph)}
    for key in times:
        out[key] = summary(times[key], shares[key], len(x))
    speedup(out)
    return out


def speedup(inference: dict) -> None:
    """Add the compacted network's speedup over the unpruned one (median forward passes) and its 95 % interval."""
    unpruned, compacted = inference["unpruned"], inference["compacted"]
    inference["speedup"] = unpruned["step_s"] / compacted["step_s"]
    inference["speedup_95"] = ratio_interval(unpruned["steps_s"], compacted["steps_s"])


def measure_model(name: str, args, quiet: Quiet) -> dict:
    config = configuration(name, args)
    torch.manual_seed(0)
    shape = config["input_shape"]
    reference = budgetprune.create_model(name, in_channels=shape[0], num_classes=10,
                                         input_size=tuple(shape[1:])).to(args.device)
    x = torch.randn(config["batch"], *shape, device=args.device)
    y = torch.randint(0, 10, (config["batch"],), device=args.device)
    print(f"{name}: training steps", flush=True)
    config["training"] = training(reference, x, y, args, quiet)
    print(f"{name}: inference", flush=True)
    try:
        config["inference"] = inference(reference, x, y, args, quiet)
    except Exception as exc:
        config["inference"] = {"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
    return config


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(args) -> dict:
    state = source_state()
    return {**machine(args.device), "device": str(args.device), "git_commit": state[0] if state else None,
            "uncommitted_src": state[1] if state else None}


def main(argv=None) -> int:
    args = arguments(argv)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    quiet = Quiet(args.quiet_busy, 60 * args.quiet_budget_min)
    start = time.perf_counter()
    models = []
    for name in args.models:
        models.append(measure_model(name, args, quiet))
        free(args.device)
    record = {"command": command.strip(), "environment": environment(args),
              "settings": {k: (str(v) if k == "device" else v) for k, v in vars(args).items() if k != "out"},
              "watched_other_processes": quiet.enabled, "waited_for_quiet_seconds": quiet.waited, "wall_seconds": time.perf_counter() - start, "models": models}
    out = write_results(args.out, "throughput", record, markdown(record))
    print(markdown(record))
    print(f"results in {out}/throughput.{{json,md}} ({record['wall_seconds'] / 60:.1f} min)")
    return 0


# --------------------------------------------------------------------------------------------- report


def markdown(r: dict) -> str:
    env, s = r["environment"], r["settings"]
    device = env.get("gpu") or f"CPU ({env['cpu']}, {env['threads']} torch threads)"
    lines = ["# Throughput: plain training step, every method's pruning step, compacted inference", "",
             f"Command: `{r['command']}`", "",
             f"Device `{env['device']}`: {device}; torch {env['torch']}; commit {env['git_commit']}. Budget "
             f"`{s['budget']}`; SGD (lr {LR:g}, momentum 0.9) on one random batch; per model the plain step and every "
             f"method's step timed in {s['rounds']} interleaved rounds of {s['steps']} step(s) each (order rotating) "
             f"after {s['warmup']} warm-up step(s); images/s = batch ÷ median step; × plain = median step ÷ the plain "
             f"step's, in brackets its 95 % bootstrap interval over the steps. {others(r)} Wall time {r['wall_seconds'] / 60:.1f} min.", "", "## Training step", ""]
    models = r["models"]
    header = "| method | " + " | ".join(f"{m['model']} (batch {m['batch']}, {'×'.join(map(str, m['input_shape']))}) "
                                       f"images/s | × plain" for m in models) + " |"
    lines += [header, "|---|" + "---|---|" * len(models)]
    for method in ["plain", *contenders(s["methods"], s.get("per_batch", []))]:
        cells = []
        for m in models:
            row = next((t for t in m["training"] if t["method"] == method), None)
            if row is None or "error" in row:
                cells += ["failed" if row else "", ""]
            else:
                low, high = row["ratio_95"]
                cells += [f"{row['images_per_s']:.0f}", f"{row['ratio']:.2f} ({low:.2f}–{high:.2f})"]
        label = {"plain": "plain (teacher step)"}.get(method, method.replace("/batch", ", gates per batch"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Inference of the compacted network (BAR, pruned to the budget)", "",
              "| model | batch | unpruned images/s | compacted images/s | speedup | FLOPs ÷ | V/B |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        i = m["inference"]
        if "error" in i:
            lines.append(f"| {m['model']} | {m['batch']} | failed: {i['error']} | | | | |")
            continue
        lines.append(f"| {m['model']} | {m['batch']} | {i['unpruned']['images_per_s']:.0f} | "
                     f"{i['compacted']['images_per_s']:.0f} | {i['speedup']:.2f} ({i['speedup_95'][0]:.2f}–"
                     f"{i['speedup_95'][1]:.2f}) | {i['flop_reduction']:.2f} | "
                     f"{i['V_over_B']:.4f} |")
    lines += ["", "## Notes", ""] + notes(r)
    return "\n".join(lines) + "\n"


def others(r: dict) -> str:
    shares = [x for m in r["models"] for row in m["training"] for x in row.get("others_cpu_share_per_turn", [])]
    if not shares or not r["watched_other_processes"]:
        return "Other processes were not watched."
    return (f"Other processes used a median {100 * statistics.median(shares):.0f} % (at most "
            f"{100 * max(shares):.0f} %) of the CPUs during a timed turn; {r['waited_for_quiet_seconds']:.0f} s "
            "were spent waiting for a quiet machine.")


def verdict(row: dict, target: float, device: str) -> str:
    """A step's ratio to the plain step, its interval, and whether it meets ``target``."""
    low, high = row["ratio_95"]
    meets = "meets" if row["ratio"] <= target else "misses"
    sure = (row["ratio"] <= target) == (high <= target) == (low <= target)
    return (f"{row['ratio']:.3f}× the plain step (95 % interval {low:.2f}–{high:.2f}): it {meets} the "
            f"{device.upper()} target ≤ {target:.2f}×" + ("." if sure else ", within the noise of this run."))


def notes(r: dict) -> list[str]:
    """The BAR step against its target, and the methods whose step is much slower than BAR's."""
    device = r["environment"]["device"].split(":")[0]
    out = []
    for m in r["models"]:
        rows = {t["method"]: t for t in m["training"] if "ratio" in t}
        failed = [t["method"] for t in m["training"] if "error" in t]
        if failed:
            out.append(f"- {m['model']}: failed: " + "; ".join(f"{t['method']} ({t['error']})" for t in m["training"]
                                                              if "error" in t))
        bar = rows.get("bar")
        if bar is None:
            continue
        target = TARGETS[device]
        for key, words in (("bar", "the BAR step"), ("bar/batch", "with gates sampled per batch, the BAR step")):
            if key in rows:
                out.append(f"- {m['model']}: {words} is {verdict(rows[key], target, device)}")
        high = bar["ratio_95"][1]
        slow = [t for k, t in rows.items() if k not in ("plain", "bar", "bar/batch") and t["ratio_95"][0] > high]
        if slow:
            out.append("  Slower than BAR beyond the noise (intervals apart): " + ", ".join(
                f"{t['method']} {t['ratio']:.3f}×" for t in sorted(slow, key=lambda t: -t["ratio"])) + ".")
        spiky = [t for k, t in rows.items() if t["mean_ratio"] > 1.2 * t["ratio"]]
        if spiky:
            out.append("  Mean step well above the median (work every few steps, left out of the median): " + ", ".join(
                f"{t['method']} (mean {t['mean_ratio']:.2f}×)" for t in spiky) + ".")
    return out


if __name__ == "__main__":
    sys.exit(main())
