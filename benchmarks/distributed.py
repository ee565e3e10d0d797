"""One process vs two (torchrun, gloo on the CPU): the same BAR run of LeNet-5 on Fashion-MNIST
with the same global batch; test accuracy, budget ratio, whether both ranks end alike, and wall time.

    python benchmarks/distributed.py --train-subset 12000         # results/distributed.{json,md}

The two-process run is this script started again by ``torchrun --nproc_per_node=2`` with
``--worker``; each rank records what it ended with, and the parent compares them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_subset, record_header, run_arguments, run_record, write_results  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune import distributed  # noqa: E402
from budgetprune.data import load_dataset  # noqa: E402
from budgetprune.graph import ChannelGraph  # noqa: E402
from budgetprune.pipeline import PruneConfig, PruneRun  # noqa: E402
from budgetprune.resources import CostModel  # noqa: E402


def _arguments():
    p = run_arguments("one process vs two (torchrun) on the same global batches", "lenet5", "distributed", 2, 3, 1, 1)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--gate-init", type=float, default=3.0, help="initial log alpha (3: gates open, for short runs)")
    p.add_argument("--worker", help="internal: run one rank, write its result to this folder")
    return p


def run_once(args, work: Path) -> dict:
    """One PruneRun on the training subset (one rank of it under torchrun); its metrics and weights."""
    splits = load_dataset(args.data, root=args.data_root)
    train = random_subset(splits.train, args.train_subset)
    cfg = PruneConfig(budget=args.budget, model=args.model, data=args.data, teacher_epochs=args.teacher_epochs,
                      epochs=args.epochs, finetune_epochs=args.finetune_epochs, lowlr_epochs=args.lowlr_epochs,
                      batch_size=args.batch_size, gate_init=args.gate_init, progress=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = PruneRun(budgetprune.create_model(args.model), train, splits.test, cfg, work, log=print).run()
    m = result.metrics
    return {"test_accuracy": m["test_accuracy"], "unpruned_test_accuracy": m["unpruned_test_accuracy"],
            "budget_ratio": m["budget_ratio"], "within_budget": m["pruned"][m["metric"]] <= m["budget"] + 1e-9,
            "smallest_step": smallest_step(args, train, m), "kept_channels": m["kept_channels"],
            "seconds": time.perf_counter() - t0,
            "weights": {k: v.clone() for k, v in result.model.state_dict().items()}}


def smallest_step(args, train, metrics: dict) -> float:
    """The least a run could still have added to its cost, as a fraction of the budget: reopening
    the one closed channel (of any group) whose cost is smallest. A run whose V/B is within this
    of 1 ended as close to its budget as whole channels allow."""
    model = budgetprune.create_model(args.model)
    graph = ChannelGraph.build(model, train[0][0].unsqueeze(0))
    cost = CostModel(graph, metrics["metric"])
    kept = {gid: torch.zeros(g.channels, dtype=torch.bool).index_fill_(0, torch.tensor(metrics["kept_channels"][gid],
                                                                                      dtype=torch.long), True)
            for gid, g in graph.groups.items()}
    now, steps = cost.hard(kept), []
    for gid, mask in kept.items():
        closed = (~mask).nonzero().flatten()
        if len(closed):
            grown = dict(kept, **{gid: mask.clone().index_fill_(0, closed[:1], True)})
            steps.append(cost.hard(grown) - now)
    return min(steps, default=float("inf")) / metrics["budget"]


def worker(args) -> None:
    torch.distributed.init_process_group("gloo")
    try:
        out = run_once(args, Path(args.work) / "two")
        torch.save(out, Path(args.worker) / f"rank{distributed.rank()}.pt")
    finally:
        torch.distributed.destroy_process_group()


def main(argv=None) -> dict:
    args = _arguments().parse_args(argv)
    if args.worker:
        return worker(args)
    started = time.perf_counter()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    ranks = work / "ranks"
    ranks.mkdir(parents=True)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    passed = argv if argv is not None else sys.argv[1:]
    t0 = time.perf_counter()
    subprocess.run([torchrun, f"--nproc_per_node={args.processes}", "--master_port=29517", __file__, *passed,
                    "--worker", str(ranks)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    two_wall = time.perf_counter() - t0
    per_rank = [torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in range(args.processes)]
    same = all(r["kept_channels"] == per_rank[0]["kept_channels"] and
               all(torch.equal(r["weights"][k], per_rank[0]["weights"][k]) for k in r["weights"]) for r in per_rank)
    torch.set_num_threads(1)  # each of the two processes had one thread
    one = run_once(args, work / "one")
    rows = [{"processes": 1, **{k: v for k, v in one.items() if k not in ("weights", "kept_channels")}},
            {"processes": args.processes, **{k: v for k, v in per_rank[0].items() if k not in ("weights", "kept_channels")},
             "seconds": two_wall, "ranks_identical": same}]
    for row in rows:
        print(json.dumps(row), flush=True)
    record = run_record("distributed.py", args, argv)
    record.update(wall_seconds=time.perf_counter() - started, budget=args.budget, batch_size=args.batch_size,
                  gate_init=args.gate_init, train_images=args.train_subset,
                  rows=rows)
    write_results(args.out, "distributed", record, "\n".join(_page(record)))
    return record


def _page(r: dict) -> list[str]:
    lines = record_header(r, "One process vs two (torchrun, gloo on the CPU)",
                          f"{r['model']} on {r['data']} ({r['train_images'] or 'all'} training images), BAR, volume "
                          f"budget {r['budget']:g}, gate init {r['gate_init']:g}, global batch {r['batch_size']} in "
                          "both; one thread per process.")
    lines += ["| processes | test accuracy | unpruned | V/B | smallest step left (÷ B) | within budget "
              "| ranks identical | seconds |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        step = f"{row['smallest_step']:.4f}" if "smallest_step" in row else "–"
        lines.append(f"| {row['processes']} | {row['test_accuracy']:.4f} | {row['unpruned_test_accuracy']:.4f} | "
                     f"{row['budget_ratio']:.4f} | {step} | {row['within_budget']} | "
                     f"{row.get('ranks_identical', '–')} | {row['seconds']:.0f} |")
    one, two = r["rows"]
    lines += ["", f"Accuracy, two processes minus one: {100 * (two['test_accuracy'] - one['test_accuracy']):+.2f} "
                  f"points; V/B {one['budget_ratio']:.4f} vs {two['budget_ratio']:.4f}. The smallest step left is "
                  "what reopening the cheapest closed channel would add: a run whose V/B is within it of 1 ended as "
                  "close to its budget as whole channels allow. Wall time of two includes starting both processes."]
    return lines


if __name__ == "__main__":
    main()
