"""BAR on full Fashion-MNIST with LeNet-5 at V_F/2, /4, /8, /16 (a benchmark, not a test).

Measures, in one process: test accuracy of each pruned model vs the unpruned teacher;
volume, FLOP and parameter reduction factors; V/B; the time and saved-activation memory of
a BAR training step as a ratio to a plain training step; CPU latency of the pruned vs the
unpruned model at batch 1 and 64 (median of repeated runs). Writes
``benchmarks/results/bar_fashion_mnist.{json,md}`` and ``accuracy_vs_factor.png``.

    python benchmarks/bar_fashion_mnist.py --data-root ../shared/data
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import budgetprune
from budgetprune import io
from budgetprune.budget import Budget
from budgetprune.compact import to_plain
from budgetprune.data import load_dataset
from budgetprune.engine import iterate_batches, predict_logits
from budgetprune.recipe import PAPER, make_optimizer
from budgetprune.graph import ChannelGraph
from budgetprune.methods import create_method
from budgetprune.objectives import distillation_loss
from budgetprune.pipeline import PruneConfig, PruneRun
from common import random_subset, record_header, run_arguments, run_record
from latency import median_latency



def saved_bytes(step) -> int:
    """Bytes of tensors autograd saves for backward during one step (the activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def step_costs(model_name: str, splits, teacher: nn.Module, steps: int = 150) -> dict:
    """A BAR training step (gates + KD + barrier) vs a plain cross-entropy step, same batch size."""
    torch.manual_seed(0)
    info = splits.info
    x_all = [(idx, x, y) for idx, x, y in iterate_batches(splits.train, 64, shuffle=True,
                                                          generator=torch.Generator().manual_seed(0))][:steps]
    cached = predict_logits(teacher, splits.train, torch.device("cpu"))

    def make(kind):
        model = budgetprune.create_model(model_name, in_channels=info.in_channels, num_classes=info.num_classes,
                                         input_size=info.image_size)
        if kind == "plain":
            opt = make_optimizer(list(model.parameters()), PAPER)

            def step(i):
                _, x, y = x_all[i % len(x_all)]
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step
        graph = ChannelGraph.build(model, x_all[0][1][:1])
        method = create_method("bar", gate_lr=1e-2)
        method.attach(model, graph, [Budget("volume", 0.25)])
        opt = make_optimizer([{"params": list(model.parameters()), "name": "weights"}] + method.param_groups(1e-3),
                             PAPER)

        def step(i):
            idx, x, y = x_all[i % len(x_all)]
            loss = distillation_loss(model(x), y, cached.index_select(0, idx)) + method.penalty(i / steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step(i / steps)
        return step

    out = {}
    steppers = {k: make(k) for k in ("plain", "bar")}
    for k, step in steppers.items():
        for i in range(10):
            step(i)
    # Interleave the two kinds in rounds so machine noise hits both alike.
    times = {k: [] for k in steppers}
    for r in range(5):
        for k, step in steppers.items():
            t0 = time.perf_counter()
            for i in range(steps // 5):
                step(r * (steps // 5) + i)
            times[k].append((time.perf_counter() - t0) / (steps // 5))
    for k in steppers:
        out[f"{k}_step_seconds"] = statistics.median(times[k])
        out[f"{k}_saved_bytes"] = saved_bytes(lambda: steppers[k](0))
    out["step_time_ratio"] = out["bar_step_seconds"] / out["plain_step_seconds"]
    out["saved_memory_ratio"] = out["bar_saved_bytes"] / out["plain_saved_bytes"]
    return out


def main(argv=None) -> int:
    p = run_arguments(__doc__.splitlines()[0], "lenet5", "benchmark", teacher=10, prune=10, finetune=4, lowlr=1)
    p.add_argument("--factors", default="2,4,8,16")
    p.add_argument("--step-only", action="store_true",
                   help="only re-measure the BAR step / plain step costs into the committed results")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    splits = load_dataset(args.data, root=args.data_root)
    info = splits.info
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def new_model():
        return budgetprune.create_model(args.model, in_channels=info.in_channels, num_classes=info.num_classes,
                                        input_size=info.image_size)

    if args.step_only:
        return remeasure_step(args, argv, splits, new_model, work, out)
    rows = []
    teacher = None
    for factor in [float(f) for f in args.factors.split(",")]:
        cfg = PruneConfig(budget=1.0 / factor, model=args.model, data=args.data, epochs=args.epochs,
                          finetune_epochs=args.finetune_epochs, lowlr_epochs=args.lowlr_epochs,
                          teacher_epochs=args.teacher_epochs, progress=False)
        run_dir = work / f"x{factor:g}"
        run = PruneRun(new_model(), random_subset(splits.train, args.train_subset), splits.test, cfg, run_dir,
                       teacher=teacher, log=lambda s: print(s, flush=True))
        resume = (run_dir / "checkpoint.pt").exists()
        result = run.run(resume=resume)
        teacher = run.teacher  # the first run trains it; the others distil from the same one
        m = result.metrics
        x1, x64 = torch.randn(1, info.in_channels, *info.image_size), torch.randn(64, info.in_channels, *info.image_size)
        unpruned = to_plain(teacher, ChannelGraph.build(teacher, x1))
        lat = {}
        for name, xb, reps in (("b1", x1, 300), ("b64", x64, 60)):
            # alternate to share machine noise
            a, b = [], []
            for _ in range(3):
                a.append(median_latency(unpruned, xb, reps))
                b.append(median_latency(result.model, xb, reps))
            lat[name] = {"unpruned_ms": 1e3 * statistics.median(a), "pruned_ms": 1e3 * statistics.median(b),
                         "speedup": statistics.median(a) / statistics.median(b)}
        rows.append({"factor": factor, "budget_fraction": 1.0 / factor, "test_accuracy": m["test_accuracy"],
                     "unpruned_test_accuracy": m["unpruned_test_accuracy"],
                     "accuracy_change_points": 100 * m["accuracy_change"], "V_over_B": m["budget_ratio"],
                     "reduction": m["reduction_factor"], "widths": {k: v["kept"] for k, v in m["widths"].items()},
                     "latency": lat, "channels_dropped_by_projection": m["channels_dropped_by_projection"],
                     "channels_reopened_by_fill": m["channels_reopened_by_fill"]})
        print(json.dumps(rows[-1]), flush=True)
        save_results(args, argv, rows, None, time.time() - t_start, out)  # partial results after each budget

    costs = step_costs(args.model, splits, teacher)
    save_results(args, argv, rows, costs, time.time() - t_start, out)
    print(f"results in {out}")
    return 0


def remeasure_step(args, argv, splits, new_model, work: Path, out: Path) -> int:
    """Replace the step costs of the committed results with a fresh measurement by this code."""
    path = out / "bar_fashion_mnist.json"
    if not path.exists():
        print(f"{path} does not exist: run the whole benchmark first", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    saved = sorted(work.glob("x*/teacher.pt"))
    teacher = io.load(saved[0]) if saved else new_model().eval()  # the step time does not depend on its weights
    result["step"] = step_costs(args.model, splits, teacher)
    result["step_command"] = run_record("bar_fashion_mnist.py", args, argv)["command"]
    io.write_json(path, result)
    write_markdown(result, out)
    print(json.dumps(result["step"]))
    return 0


def save_results(args, argv, rows, costs, wall, out: Path) -> None:
    result = {**run_record("bar_fashion_mnist.py", args, argv), "train_images": args.train_subset or "all",
              "wall_seconds": wall, "runs": rows, "step": costs,
              "targets": {"V_over_B": [0.95, 1.0], "max_accuracy_loss_points_at_4x": 0.5, "max_step_time_ratio": 1.15}}
    io.write_json(out / "bar_fashion_mnist.json", result)
    write_markdown(result, out)
    plot(result, out / "accuracy_vs_factor.png")


def write_markdown(r: dict, out: Path) -> None:
    lines = record_header(r, f"BAR on {r['data']} / {r['model']}", f"{r.get('train_images', 'All')} training images.") + [
             "| factor | test acc | unpruned | Δ points | V/B | V red. | FLOP red. | param red. | widths | "
             "latency b1 (pruned/unpruned ms, speedup) | latency b64 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for row in r["runs"]:
        red = row["reduction"]
        l1, l64 = row["latency"]["b1"], row["latency"]["b64"]
        lines.append(
            f"| {row['factor']:g}× | {row['test_accuracy']:.4f} | {row['unpruned_test_accuracy']:.4f} | "
            f"{row['accuracy_change_points']:+.2f} | {row['V_over_B']:.4f} | {red['volume']:.2f}× | {red['flops']:.2f}× | "
            f"{red['params']:.2f}× | {'-'.join(str(v) for v in row['widths'].values())} | "
            f"{l1['pruned_ms']:.3f}/{l1['unpruned_ms']:.3f}, {l1['speedup']:.2f}× | "
            f"{l64['pruned_ms']:.2f}/{l64['unpruned_ms']:.2f}, {l64['speedup']:.2f}× |")
    s = r["step"]
    if s is None:
        lines += ["", "Training-step costs: not measured yet (the run is still going)."]
    else:
        lines += ["", "Training step (batch 64, median over interleaved rounds): BAR step "
              f"{1e3 * s['bar_step_seconds']:.2f} ms vs plain step {1e3 * s['plain_step_seconds']:.2f} ms → "
              f"**{s['step_time_ratio']:.3f}×**; activation memory saved for backward {s['bar_saved_bytes'] / 2**20:.2f} "
              f"MiB vs {s['plain_saved_bytes'] / 2**20:.2f} MiB → **{s['saved_memory_ratio']:.3f}×**."]
        if r.get("step_command"):
            lines += [f"The step costs were re-measured by `{r['step_command']}`."]
    lines += ["", "Targets: V/B in [0.95, 1.00]; ≤ 0.5 point accuracy loss at 4×; BAR step ≤ 1.15× a plain step.",
              "", "![accuracy vs factor](accuracy_vs_factor.png)"]
    io.write_text(out / "bar_fashion_mnist.md", "\n".join(lines) + "\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    f = [row["factor"] for row in r["runs"]]
    ax.plot(f, [100 * row["test_accuracy"] for row in r["runs"]], "o-", label="BAR (pruned)")
    ax.axhline(100 * r["runs"][0]["unpruned_test_accuracy"], color="gray", ls="--", label="unpruned")
    ax.set_xscale("log", base=2)
    ax.set_xticks(f)
    ax.set_xticklabels([f"{x:g}×" for x in f])
    ax.set_xlabel("volume reduction factor (budget)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"BAR, {r['model']} on {r['data']}")
    ax.legend()
    fig.tight_layout()
    io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


if __name__ == "__main__":
    sys.exit(main())
