"""bf16 vs fp32: the same BAR run of LeNet-5 on Fashion-MNIST in both precisions, from one fp32
teacher, interleaved in one invocation; test accuracy, budget ratio and wall time of each.

    python benchmarks/precision.py --train-subset 12000 --seeds 2      # results/precision.{json,md}
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_subset, record_header, run_arguments, run_record, write_results  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune.data import load_dataset  # noqa: E402
from budgetprune.pipeline import PruneConfig, PruneRun  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def main(argv=None) -> dict:
    p = run_arguments("bf16 vs fp32 BAR runs from one teacher", "lenet5", "precision", 3, 4, 2, 1)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--seeds", type=int, default=1, help="runs per precision (seeds 0, 1, ...)")
    p.add_argument("--gate-init", type=float, default=3.0, help="initial log alpha (3: gates open, for short runs)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    splits = load_dataset(args.data, root=args.data_root)
    train = random_subset(splits.train, args.train_subset)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)  # a teacher.pt left there would be taken as the teacher
    base = dict(budget=args.budget, model=args.model, data=args.data, epochs=args.epochs,
                finetune_epochs=args.finetune_epochs, lowlr_epochs=args.lowlr_epochs, gate_init=args.gate_init,
                progress=False)
    torch.manual_seed(0)
    teacher_run = PruneRun(budgetprune.create_model(args.model), train, splits.test,
                           PruneConfig(**{**base, "teacher_epochs": args.teacher_epochs}), work / "teacher",
                           log=lambda _: None)
    teacher_run.run()
    teacher = budgetprune.load(work / "teacher" / "teacher.pt")
    rows = []
    for seed in range(args.seeds):
        for precision in PRECISIONS:  # interleaved: the shared machine's noise falls on both alike
            torch.manual_seed(0)
            t0 = time.perf_counter()
            m = PruneRun(budgetprune.create_model(args.model), train, splits.test,
                         PruneConfig(**base, seed=seed, precision=precision), work / f"{precision}-{seed}",
                         teacher=teacher, log=lambda _: None).run().metrics
            rows.append({"precision": precision, "seed": seed, "test_accuracy": m["test_accuracy"],
                         "unpruned_test_accuracy": m["unpruned_test_accuracy"], "budget_ratio": m["budget_ratio"],
                         "within_budget": m["pruned"][m["metric"]] <= m["budget"] + 1e-9,
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    record = run_record("precision.py", args, argv)
    record.update(wall_seconds=time.perf_counter() - started, budget=args.budget, gate_init=args.gate_init,
                  train_images=len(train),
                  rows=rows)
    write_results(args.out, "precision", record, "\n".join(_page(record)))
    return record


def _page(r: dict) -> list[str]:
    lines = record_header(r, "bf16 vs fp32 (BAR, one fp32 teacher)",
                          f"{r['model']} on {r['data']} ({r['train_images']} training images), volume budget "
                          f"{r['budget']:g}, gate init {r['gate_init']:g}, CPU autocast for bf16.")
    lines += ["| precision | seed | test accuracy | unpruned | V/B | within budget | seconds |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['precision']} | {row['seed']} | {row['test_accuracy']:.4f} | "
                     f"{row['unpruned_test_accuracy']:.4f} | {row['budget_ratio']:.4f} | {row['within_budget']} | "
                     f"{row['seconds']:.0f} |")
    by = {p: [x for x in r["rows"] if x["precision"] == p] for p in PRECISIONS}
    if all(by.values()):
        acc = {p: sum(x["test_accuracy"] for x in v) / len(v) for p, v in by.items()}
        sec = {p: sum(x["seconds"] for x in v) / len(v) for p, v in by.items()}
        lines += ["", f"Mean test accuracy: bf16 {acc['bf16']:.4f}, fp32 {acc['fp32']:.4f} "
                      f"({100 * (acc['bf16'] - acc['fp32']):+.2f} points); time bf16 / fp32: "
                      f"{sec['bf16'] / sec['fp32']:.2f}."]
    return lines


if __name__ == "__main__":
    main()
