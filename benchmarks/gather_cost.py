"""What a mixed block's gather costs in each runtime: the γ of ``budgetprune.blocks.GATHER_COST``.

``block="auto"`` keeps a residual space mixed when the multiply-adds it saves exceed γ per
channel of each gathered sum and position. This script measures γ with
:func:`budgetprune.blocks.measure_gather_cost` (a residual block whose branch writes all its
channels against the same block writing half of them into the sum through a gather) in eager
PyTorch, TorchScript and onnxruntime, at the batch sizes given, and writes
``results/gather_cost.{json,md}``. Run it on a quiet machine: it times milliseconds.

    python benchmarks/gather_cost.py [--batches 16,1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import RESULTS, source_state, write_results

from budgetprune.blocks import GATHER_COST, measure_gather_cost
from budgetprune.runtimes import RUNTIMES


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="16,1", help="batch sizes, comma-separated (the first sets the table)")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per shape (each keeps its fastest)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per runtime and batch (their median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for runtime in RUNTIMES:
            runs = [measure_gather_cost(runtime, batch=batch, rounds=args.rounds) for _ in range(args.repeats)]
            gamma = statistics.median(r["gather_cost"] for r in runs)
            rows.append({"runtime": runtime, "batch": batch, "gather_cost": gamma, "runs": runs})
            print(f"{runtime:12s} batch {batch:3d}: γ = {gamma:7.1f} MACs per channel and position "
                  f"(runs {', '.join(f'{r['gather_cost']:.1f}' for r in runs)})", flush=True)
    state = source_state()
    record = {"command": "python benchmarks/gather_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "git": state[0] if state else None, "threads": args.threads, "torch": torch.__version__,
              "rows": rows, "in_code": GATHER_COST, "wall_seconds": time.time() - start}
    lines = ["# What a mixed block's gather costs, per runtime (γ of `block=\"auto\"`)", "",
             f"Command: `{record['command']}` at git {record['git']}; torch {torch.__version__}, "
             f"{args.threads} threads; wall time {record['wall_seconds'] / 60:.1f} min.", "",
             "Per (channels, size) of 64×28², 128×14², 256×7²: a residual block (conv, ReLU, conv, sum, ReLU, conv) "
             "whose branch writes all its channels (plain add) against the same block whose branch writes half of "
             "them into the sum through a gather (`index_add`; Pad + Gather in ONNX), timed in alternating rounds "
             "(each keeps its fastest). γ = (mixed time − regular time + the MACs the mixed block saves at the "
             "regular block's rate) ÷ (channels × positions), in MACs; per measurement the median over the three "
             "shapes, floored at 0; the table gives the median of the measurements.", "",
             "| runtime | batch | γ (MACs per channel and position) | measurements | in `GATHER_COST` |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['batch']} | {r['gather_cost']:.1f} | "
                     f"{', '.join(f'{x['gather_cost']:.1f}' for x in r['runs'])} | {GATHER_COST[r['runtime']]:g} |")
    lines += ["", "Per shape (first measurement of each runtime and batch):", "",
              "| runtime | batch | channels × size² | regular ms | mixed ms | γ |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        for s in r["runs"][0]["shapes"]:
            lines.append(f"| {r['runtime']} | {r['batch']} | {s['channels']}×{s['size']}² | {s['regular_ms']:.3f} | "
                         f"{s['mixed_ms']:.3f} | {s['gather_cost']:.1f} |")
    write_results(args.out, "gather_cost", record, "\n".join(lines))


if __name__ == "__main__":
    main()
