"""Speed of pruned residual networks: unpruned vs regular-block vs mixed-block (a benchmark, not a test).

For each volume budget (2/4/8/16× by default) a BAR run prunes a ResNet on real data with
mixed-connectivity blocks. The channels it keeps are then compacted twice from the same
weights: with regular blocks (tensors that are added keep equal widths) and with mixed
blocks (``index_add``, seed 001 supplement 2). Measured in one process: CPU latency of the
unpruned, regular and mixed networks at batch 1 and 64 (median of repeated runs,
interleaved), beside each one's FLOP reduction, and the cut of the effective volume by
mixed vs regular blocks against the paper's Table 2 (12/43/53/58 % at 2/4/8/16×).
Writes ``benchmarks/results/resnet_speed.{json,md,png}``.

    python benchmarks/resnet_speed.py --data-root ../shared/data

Finished runs are reused (``--work``), so ``--latency-only`` re-times them on a quiet machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import budgetprune
from budgetprune import io
from budgetprune.compact import compact, to_plain
from budgetprune.data import load_dataset
from budgetprune.graph import ChannelGraph
from budgetprune.pipeline import PruneConfig, PruneRun
from budgetprune.plan import masks_of_indices
from budgetprune.resources import resource_report
from common import random_subset, record_header, run_arguments, run_record, seeded_model
from latency import interleaved_latency

#: Seed 001, supplement Table 2: how much mixed-connectivity blocks cut the effective volume
#: of a pruned Wide-ResNet compared with regular blocks, per pruning factor.
PAPER_VOLUME_CUT = {2.0: 0.12, 4.0: 0.43, 8.0: 0.53, 16.0: 0.58}
SPEEDUP_TARGET = 0.7  # speedup ≥ 0.7 × FLOP reduction at batch 64


def prune_runs(args, splits, factors) -> dict[float, dict]:
    """One BAR run per factor (the first trains the teacher the others distil from)."""
    work = Path(args.work)
    train = random_subset(splits.train, args.train_subset)
    info = splits.info
    metrics, teacher = {}, None
    for factor in factors:
        run_dir = work / f"x{factor:g}"
        if (run_dir / "metrics.json").exists():
            metrics[factor] = json.loads((run_dir / "metrics.json").read_text())
            continue
        if args.latency_only:
            raise SystemExit(f"--latency-only: no finished run in {run_dir}; run without it first")
        if teacher is None and (work / "teacher.pt").exists():
            teacher = io.load(work / "teacher.pt")
        cfg = PruneConfig(budget=1.0 / factor, model=args.model, data=args.data, epochs=args.epochs,
                          finetune_epochs=args.finetune_epochs, lowlr_epochs=args.lowlr_epochs,
                          teacher_epochs=args.teacher_epochs, progress=False, block="mixed")
        # the initial weights of `budgetprune prune` (seed 0, the config's): the teacher is reproducible
        model = seeded_model(args.model, cfg.seed, info.in_channels, info.num_classes, info.image_size)
        run = PruneRun(model, train, splits.test, cfg, run_dir, teacher=teacher, log=lambda s: print(s, flush=True))
        result = run.run(resume=(run_dir / "checkpoint.pt").exists())
        if teacher is None:
            io.save(to_plain(run.teacher, run.graph), work / "teacher.pt", meta={"role": "teacher"})
            teacher = run.teacher
        metrics[factor] = result.metrics
    return metrics


def trained_model(args, info) -> torch.nn.Module:
    """The model with the teacher's weights, under the model's own module names."""
    model = budgetprune.create_model(args.model, in_channels=info.in_channels, num_classes=info.num_classes,
                                     input_size=info.image_size)
    model.load_state_dict(io.load(Path(args.work) / "teacher.pt").state_dict())
    return model.eval()


def measure(args, info, metrics: dict[float, dict]) -> list[dict]:
    model = trained_model(args, info)
    x1 = torch.randn(1, info.in_channels, *info.image_size)
    x64 = torch.randn(64, info.in_channels, *info.image_size)
    graph = ChannelGraph.build(model, x1)
    full = resource_report(graph)
    unpruned = to_plain(model, graph)
    rows = []
    for factor, m in metrics.items():
        if set(m["kept_channels"]) != set(graph.groups):
            raise SystemExit(f"the run for {factor:g}× was made for another graph; delete {args.work} and rerun")
        masks = masks_of_indices(m["kept_channels"], {gid: g.channels for gid, g in graph.groups.items()})
        nets = {"unpruned": unpruned}
        cost = {"unpruned": full}
        for mode in ("regular", "mixed"):
            nets[mode] = compact(model, graph, masks, mode=mode)
            cost[mode] = resource_report(graph, masks, mode)
        with torch.no_grad():
            diff = float((nets["regular"](x64) - nets["mixed"](x64)).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"regular and mixed compactions differ by {diff} at {factor:g}×")
        latency = {}
        for batch, x, reps in (("b1", x1, args.repeats_b1), ("b64", x64, args.repeats_b64)):
            t = interleaved_latency(nets, x, reps, rounds=args.rounds)
            latency[batch] = {name: 1e3 * s for name, s in t.items()}
        row = {"factor": factor, "test_accuracy": m["test_accuracy"],
               "unpruned_test_accuracy": m["unpruned_test_accuracy"], "V_over_B": m["budget_ratio"],
               "volume_cut_by_mixed": 1.0 - cost["mixed"]["volume"] / cost["regular"]["volume"],
               "paper_volume_cut": PAPER_VOLUME_CUT.get(factor), "latency_ms": latency, "cost": cost,
               "compaction_max_abs_diff_regular_vs_mixed": diff}
        for mode in ("regular", "mixed"):
            flop_red = full["flops"] / cost[mode]["flops"]
            row[mode] = {"flop_reduction": flop_red, "volume_reduction": full["volume"] / cost[mode]["volume"],
                         "param_reduction": full["params"] / cost[mode]["params"]}
            for batch in ("b1", "b64"):
                sp = latency[batch]["unpruned"] / latency[batch][mode]
                row[mode][f"speedup_{batch}"] = sp
                row[mode][f"speedup_over_flop_reduction_{batch}"] = sp / flop_red
            row[mode]["meets_speed_target_b64"] = row[mode]["speedup_over_flop_reduction_b64"] >= SPEEDUP_TARGET
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("factor", "volume_cut_by_mixed", "regular", "mixed")}), flush=True)
    return rows


def main(argv=None) -> int:
    p = run_arguments(__doc__.splitlines()[0], "resnet20", "resnet_speed", teacher=3, prune=4, finetune=1, lowlr=1)
    p.add_argument("--factors", default="2,4,8,16")
    p.add_argument("--repeats-b1", type=int, default=100)
    p.add_argument("--repeats-b64", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--latency-only", action="store_true", help="reuse finished runs; only time them")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    splits = load_dataset(args.data, root=args.data_root)
    factors = [float(f) for f in args.factors.split(",")]
    metrics = prune_runs(args, splits, factors)
    rows = measure(args, splits.info, metrics)
    result = {**run_record("resnet_speed.py", args, argv),
              "train_images": args.train_subset or len(splits.train.labels), "wall_seconds": time.time() - t0, "rows": rows,
              "targets": {"speedup_over_flop_reduction_b64": SPEEDUP_TARGET, "volume_cut_by_mixed": PAPER_VOLUME_CUT}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "resnet_speed.json", result)
    write_markdown(result, out)
    plot(result, out / "resnet_speed.png")
    print(f"results in {out}")
    return 0


def write_markdown(r: dict, out: Path) -> None:
    lines = record_header(r, f"Speed of pruned {r['model']} on {r['data']}: unpruned vs regular vs mixed blocks",
                          f"BAR runs (mixed blocks) on {r['train_images']} training images. The kept channels of "
                          "each run are compacted twice from the same weights. Latency: CPU, median of repeated "
                          "runs in interleaved rounds, one process.") + [
             "| factor | test acc (unpruned) | V/B | volume cut by mixed (paper) | block | FLOP red. | "
             "b1 ms | b1 speedup | b64 ms | b64 speedup | speedup / FLOP red. (b64) |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lat = row["latency_ms"]
        paper = row["paper_volume_cut"]
        head = (f"| {row['factor']:g}× | {100 * row['test_accuracy']:.2f} % ({100 * row['unpruned_test_accuracy']:.2f} %) | "
                f"{row['V_over_B']:.4f} | {100 * row['volume_cut_by_mixed']:.1f} % "
                f"({'—' if paper is None else f'{100 * paper:.0f} %'}) |")
        lines.append(f"{head} unpruned | 1.00× | {lat['b1']['unpruned']:.3f} | 1.00× | {lat['b64']['unpruned']:.2f} | "
                     "1.00× | |")
        for mode in ("regular", "mixed"):
            m = row[mode]
            ok = "✓" if m["meets_speed_target_b64"] else "✗"
            lines.append(f"| | | | | {mode} | {m['flop_reduction']:.2f}× | {lat['b1'][mode]:.3f} | "
                         f"{m['speedup_b1']:.2f}× | {lat['b64'][mode]:.2f} | {m['speedup_b64']:.2f}× | "
                         f"{m['speedup_over_flop_reduction_b64']:.2f} {ok} |")
    lines += ["", f"Targets: speedup ≥ {SPEEDUP_TARGET} × FLOP reduction at batch 64; mixed blocks cut the effective "
              "volume vs regular blocks by at least the paper's Table 2 (12/43/53/58 % at 2/4/8/16×).",
              "", "![speedup vs FLOP reduction](resnet_speed.png)"]
    io.write_text(out / "resnet_speed.md", "\n".join(lines) + "\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = r["rows"]
    top = max(max(row[m]["flop_reduction"] for m in ("regular", "mixed")) for row in rows) * 1.1
    ax.plot([1, top], [1, top], color="gray", ls=":", label="speedup = FLOP reduction")
    ax.plot([1, top], [SPEEDUP_TARGET, SPEEDUP_TARGET * top], color="gray", ls="--", label=f"{SPEEDUP_TARGET} × FLOP red.")
    for mode, marker in (("regular", "s"), ("mixed", "o")):
        for batch, fill in (("b64", "full"), ("b1", "none")):
            ax.plot([row[mode]["flop_reduction"] for row in rows], [row[mode][f"speedup_{batch}"] for row in rows],
                    marker=marker, fillstyle=fill, ls="-" if batch == "b64" else "--",
                    label=f"{mode}, batch {batch[1:]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("FLOP reduction")
    ax.set_ylabel("measured CPU speedup")
    ax.legend(fontsize=7)
    f = [row["factor"] for row in rows]
    bx.plot(f, [100 * row["volume_cut_by_mixed"] for row in rows], "o-", label="measured")
    bx.plot([x for x in f if x in PAPER_VOLUME_CUT], [100 * PAPER_VOLUME_CUT[x] for x in f if x in PAPER_VOLUME_CUT],
            "s--", color="gray", label="paper, Table 2")
    bx.set_xscale("log", base=2)
    bx.set_xticks(f)
    bx.set_xticklabels([f"{x:g}×" for x in f])
    bx.set_xlabel("volume budget (pruning factor)")
    bx.set_ylabel("effective volume cut by mixed blocks (%)")
    bx.legend(fontsize=8)
    fig.suptitle(f"{r['model']} on {r['data']}")
    fig.tight_layout()
    io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


if __name__ == "__main__":
    sys.exit(main())
