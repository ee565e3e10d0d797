"""Every pruning method on Fashion-MNIST / LeNet-5 under one budget (a benchmark, not a test).

Same model, same data, same teacher, same epochs and the same final projection for every
method (the comparison of seed 001, section 5): test accuracy vs the unpruned teacher, V/B,
FLOP and parameter reductions, how much of the budget the projection or the fill had to fix,
and the layer widths each method chose. Writes ``benchmarks/results/methods_fashion_mnist.{json,md,png}``.

    python benchmarks/methods_fashion_mnist.py --data-root ../shared/data --factor 8 --seeds 0,1,2

With several seeds every method runs once per seed (each seed its own teacher); the table gives
the accuracy as mean ± standard deviation and marks a method whose mean is within two standard
errors of the best one's as a tie. With ``--validation N`` every run holds ``N`` of its training
images out (chosen from the seed, as ``budgetprune prune --validation`` chooses them; the teacher
never sees them either) and the verdict (best, tie, behind) is made on their accuracy; the test
accuracy is reported beside it and decides nothing.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

import budgetprune
from budgetprune import io
from budgetprune.compact import to_plain
from budgetprune.data import load_dataset
from budgetprune.cli import parse_method_options
from budgetprune.methods import available_methods, method_options
from budgetprune.pipeline import PruneConfig, PruneRun
from common import random_subset, record_header, run_arguments, run_record
from stats import format_mean_std, mean_std, tie



#: Run settings a --methods entry may set (the rest are the method's own options).
RUN_FIELDS = ("lam", "dual_lr", "gate_init", "gate_lr", "block", "channel_multiple", "schedule_end")


def split_entry(entry: str) -> tuple[str, list[str], dict, dict]:
    """``NAME:KEY=VALUE:...`` of --methods → (name, its KEY=VALUE texts, the method's own options, the
    run settings among them (:data:`RUN_FIELDS`: ``lam=...`` is ``--lam``))."""
    method, *settings = entry.split(":")
    options = parse_method_options(settings)
    return method, settings, options, {k: options.pop(k) for k in list(options) if k in RUN_FIELDS}


def main(argv=None) -> int:
    p = run_arguments(__doc__.splitlines()[0], "lenet5", "methods", teacher=5, prune=6, finetune=2, lowlr=1)
    p.add_argument("--factor", type=float, default=8.0)
    p.add_argument("--granularity", choices=["channel", "weight"], default="channel",
                   help="channel: a volume budget (or --metric); weight: single weights under a nonzero budget")
    p.add_argument("--metric", choices=["volume", "params", "flops"], default="volume",
                   help="the budget's metric when channels are pruned (default volume, seed 001's)")
    p.add_argument("--methods", help="comma-separated; NAME:KEY=VALUE:... sets a method option or lam, dual_lr, "
                                     "gate_init, gate_lr, block, channel_multiple, schedule_end (values without commas; default: "
                                     "every method that prunes at this granularity)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each has its own teacher (default 0)")
    p.add_argument("--schedule-end", type=float, default=1.0, help="the runs' --schedule-end (default 1)")
    p.add_argument("--validation", type=int, default=0,
                   help="training images held out of every run and its teacher; the verdict is made on them "
                        "(default 0: none, the verdict on test)")
    args = p.parse_args(argv)
    if args.granularity == "weight" and args.metric != "volume":
        p.error("--metric is for channel pruning; --granularity weight budgets non-zero weights")
    if args.validation < 0:
        p.error("--validation must be 0 (none) or a number of training images to hold out")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    per_weight = args.granularity == "weight"
    if args.methods is None:
        args.methods = ",".join(m for m in available_methods() if not per_weight or "granularity" in method_options(m))
    suffix = "_weight" if per_weight else ""
    t0 = time.time()
    splits = load_dataset(args.data, root=args.data_root)
    info = splits.info
    train = random_subset(splits.train, args.train_subset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unit = "weights" if per_weight else "channels"
    runs = []
    for seed in seeds:
        work = Path(args.work) if seed == 0 else Path(args.work) / f"seed{seed}"  # seed 0: where earlier runs are

        def new_model():
            torch.manual_seed(seed)
            return budgetprune.create_model(args.model, in_channels=info.in_channels, num_classes=info.num_classes,
                                            input_size=info.image_size)

        held_out = f"-val{args.validation}" if args.validation else ""  # runs and teachers that never saw them
        teacher_file = work / f"teacher{held_out.replace('-', '_')}.pt"
        teacher = io.load(teacher_file) if teacher_file.exists() else None
        for entry in args.methods.split(","):
            method, settings, options, run_settings = split_entry(entry)
            label = " ".join([method] + settings)
            name = "-".join([method, *settings, *([f"end{args.schedule_end:g}"] if args.schedule_end != 1 else []),
                             *([f"val{args.validation}"] if args.validation else []),
                             *([args.metric] if args.metric != "volume" else [])])
            run_dir = work / re.sub(r"[^A-Za-z0-9=.+-]+", "_", "weight-" * per_weight + name)
            if (run_dir / "metrics.json").exists():
                m = json.loads((run_dir / "metrics.json").read_text())
            else:
                cfg = PruneConfig(budget=1.0 / args.factor, method=method, model=args.model, data=args.data,
                                  epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                  lowlr_epochs=args.lowlr_epochs, teacher_epochs=args.teacher_epochs,
                                  progress=False, granularity=args.granularity, method_options=options,
                                  metric=None if per_weight else args.metric,
                                  seed=seed, validation=args.validation,
                                  **{"schedule_end": args.schedule_end, **run_settings})
                start = time.time()
                run = PruneRun(new_model(), train, splits.test, cfg, run_dir, teacher=teacher,
                               log=lambda s: print(f"[{label} seed {seed}] {s}", flush=True))
                m = run.run(resume=(run_dir / "checkpoint.pt").exists()).metrics
                m["benchmark_seconds"] = time.time() - start
                io.write_json(run_dir / "metrics.json", m)
                if teacher is None:
                    io.save(to_plain(run.teacher, run.graph), teacher_file, meta={"role": "teacher"})
                    teacher = run.teacher
            runs.append({"method": label, "seed": seed, "test_accuracy": m["test_accuracy"],
                         "unpruned_test_accuracy": m["unpruned_test_accuracy"],
                         **{k: m[k] for k in ("val_accuracy", "unpruned_val_accuracy") if k in m},
                         "accuracy_change_points": 100 * m["accuracy_change"], "V_over_B": m["budget_ratio"],
                         "reduction": m["reduction_factor"], "widths": {k: v["kept"] for k, v in m["widths"].items()},
                         "cost_before_projection_over_B": m["cost_before_projection"] / m["budget"],
                         "dropped_by_projection": m[f"{unit}_dropped_by_projection"],
                         "reopened_by_fill": m[f"{unit}_reopened_by_fill"],
                         "density": {k: v["nonzero"] / v["total"] for k, v in m.get("density", {}).items()},
                         "model_file_bytes": m.get("model_file_bytes"), "seconds": m.get("benchmark_seconds")})
            print(json.dumps(runs[-1]), flush=True)
    result = {**run_record("methods_fashion_mnist.py", args, argv), "factor": args.factor, "seeds": seeds,
              "schedule_end": args.schedule_end, "validation": args.validation,
              "train_images": args.train_subset or len(splits.train.labels), "wall_seconds": time.time() - t0,
              "runs": runs, "rows": summarise(runs)}
    result["granularity"] = args.granularity
    result["metric"] = "nonzero" if per_weight else args.metric
    io.write_json(out / f"methods_fashion_mnist{suffix}.json", result)
    write_markdown(result, out, suffix)
    plot(result, out / f"methods_fashion_mnist{suffix}.png")
    print(f"results in {out}")
    return 0


def summarise(runs: list[dict]) -> list[dict]:
    """One row per method: its seeds' accuracies as mean ± std, whether it ties the best method (a
    difference under two standard errors; on the validation accuracy where every run has one, else on
    test), and seed-averaged costs; the first seed's widths."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    accuracies = {m: [100 * r["test_accuracy"] for r in rs] for m, rs in by_method.items()}
    on_validation = bool(runs) and all("val_accuracy" in r for r in runs)
    judged = {m: [100 * r["val_accuracy"] for r in rs] for m, rs in by_method.items()} if on_validation else accuracies
    best = max(judged, key=lambda m: mean_std(judged[m])[0])
    rows = []
    for method, rs in by_method.items():
        acc = accuracies[method]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        rows.append({**rs[0], "seeds": [r["seed"] for r in rs], "accuracies": acc,
                     "test_accuracy": mean_std(acc)[0] / 100, "test_accuracy_std": mean_std(acc)[1] / 100,
                     "unpruned_test_accuracy": mean("unpruned_test_accuracy"),
                     "unpruned_accuracies": [100 * r["unpruned_test_accuracy"] for r in rs],
                     "accuracy_change_points": mean("accuracy_change_points"), "V_over_B": mean("V_over_B"),
                     "cost_before_projection_over_B": mean("cost_before_projection_over_B"),
                     **({"val_accuracies": judged[method], "val_accuracy": mean_std(judged[method])[0] / 100,
                         "unpruned_val_accuracies": [100 * r["unpruned_val_accuracy"] for r in rs]}
                        if on_validation else {}),
                     "best": method == best, "tie_with_best": method != best and tie(judged[method], judged[best])})
    return rows


def write_markdown(r: dict, out: Path, suffix: str = "") -> None:
    per_weight = r.get("granularity") == "weight"
    metric = "non-zero weights" if per_weight else r.get("metric", "volume")
    seeds = r.get("seeds", [0])
    held_out = r.get("validation", 0)
    on_validation = bool(r["rows"]) and all("val_accuracies" in row for row in r["rows"])
    lines = record_header(r, f"Every method on {r['data']} / {r['model']} at {r['factor']:g}× {metric}",
                          f"{r['train_images']} training images"
                          + (f" ({held_out} of them held out for validation, never trained on: the verdict is "
                             "made on their accuracy, the test accuracy decides nothing)" if held_out else "")
                          + ", one teacher per seed for all methods; default "
                          "hyper-parameters of every method unless the name gives an option; seeds "
                          f"{', '.join(map(str, seeds))}; budget schedule end {r.get('schedule_end', 1):g}"
                          + (" (where the name gives no schedule_end)"
                             if any("schedule_end=" in row["method"] for row in r["rows"]) else "") + ".")
    unit = "weights" if per_weight else "channels"
    last = "density per layer" if per_weight else "widths (first seed)"
    val = "val acc (mean ± std) | " if on_validation else ""
    lines += [f"| method | {val}test acc (mean ± std) | vs best | Δ points | cost/B | cost before projection / B | "
              f"{unit} dropped | {unit} reopened | FLOP red. | param red. | {last} |",
              "|---|" + "---:|" * bool(val) + "---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = "val_accuracy" if on_validation else "test_accuracy"
    for row in sorted(r["rows"], key=lambda x: -x[order]):
        red = row["reduction"]
        shape = ("-".join(f"{100 * v:.1f}%" for v in row["density"].values()) if per_weight
                 else "-".join(str(v) for v in row["widths"].values()))
        acc = format_mean_std(row.get("accuracies", [100 * row["test_accuracy"]]))
        verdict = ("best" if row.get("best") else ("tie" if row.get("tie_with_best") else "behind")) \
            if len(seeds) > 1 else "one seed"
        val_acc = f"{format_mean_std(row['val_accuracies'])} % | " if on_validation else ""
        lines.append(f"| {row['method']} | {val_acc}{acc} % | {verdict} | {row['accuracy_change_points']:+.2f} | "
                     f"{row['V_over_B']:.4f} | {row['cost_before_projection_over_B']:.2f} | "
                     f"{row.get('dropped_by_projection', row.get('channels_dropped_by_projection'))} | "
                     f"{row.get('reopened_by_fill', row.get('channels_reopened_by_fill'))} | "
                     f"{red['flops']:.1f}× | {red['params']:.1f}× | {shape} |")
    if r["rows"]:
        teacher = r["rows"][0].get("unpruned_accuracies", [100 * r["rows"][0]["unpruned_test_accuracy"]])
        on = " on validation" if on_validation else ""
        teachers_val = (f" test; {format_mean_std(r['rows'][0]['unpruned_val_accuracies'])} % validation"
                        if on_validation else "")
        lines += ["", f"Unpruned teachers: {format_mean_std(teacher)} %{teachers_val}. 'tie': the difference from the "
                      f"best method's mean{on} is under two standard errors of the difference (benchmarks/stats.py)."]
    if r.get("note"):
        lines += ["", r["note"]]
    if per_weight:
        lines += ["", "Per-weight pruning leaves the network's shape (so its FLOPs and dense parameter count) as it "
                      "was; the budget counts non-zero conv/linear weights, stored sparse in the model file."]
    lines += ["", f"![accuracy per method](methods_fashion_mnist{suffix}.png)"]
    io.write_text(out / f"methods_fashion_mnist{suffix}.md", "\n".join(lines) + "\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(r["rows"], key=lambda x: -x["test_accuracy"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar([x["method"] for x in rows], [100 * x["test_accuracy"] for x in rows], color="#1f6feb",
           yerr=[100 * x.get("test_accuracy_std", 0.0) for x in rows], capsize=3)
    if rows:
        ax.axhline(100 * rows[0]["unpruned_test_accuracy"], color="gray", ls="--", label="unpruned")
    ax.set_ylabel("test accuracy (%)")
    metric = "non-zero weights" if r.get("granularity") == "weight" else r.get("metric", "volume")
    ax.set_title(f"{r['model']} on {r['data']}, {r['factor']:g}× {metric}")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


if __name__ == "__main__":
    sys.exit(main())
