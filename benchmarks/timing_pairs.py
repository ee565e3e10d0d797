"""How steady a measured speed ratio is: two copies of the same network timed against each other.

The true ratio is 1. Each trial measures it twice, in onnxruntime at batch 1:

* *rounds*: each network timed in 5 alternating rounds of its own (``repeats / 5`` runs each,
  the median of a round, the fastest round kept), the form ``deployed_speed`` used before;
* *pairs*: :func:`budgetprune.runtimes.paired_times`, one run of each by turns (ABBA), the median
  of the pairs' ratios, the form it uses now.

The spread of each estimator over the trials is what a latency budget's finalize check and a
run's reported speedup can trust.

    python benchmarks/timing_pairs.py                     # resnet20 (28 px), resnet50 (112 px), 8 trials

Writes ``benchmarks/results/timing_pairs.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune.runtimes import median_ms, paired_times, runner  # noqa: E402

#: model -> input shape (without the batch)
MODELS = {"resnet20": (1, 28, 28), "resnet50": (3, 112, 112)}


def by_rounds(first, second, repeats: int) -> float:
    rounds = {0: [], 1: []}
    for _ in range(5):
        for i, run in enumerate((first, second)):
            rounds[i].append(median_ms(run, max(1, repeats // 5), warmup=1))
    return min(rounds[1]) / min(rounds[0])


def by_pairs(first, second, repeats: int) -> float:
    a, b = paired_times(first, second, repeats, min_seconds=0.0)
    return statistics.median(y / x for x, y in zip(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--repeats", type=int, default=60, help="runs of each network per measurement")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for name, shape in MODELS.items():
        torch.manual_seed(0)
        model = budgetprune.create_model(name, in_channels=shape[0], num_classes=10, input_size=shape[1:]).eval()
        x = torch.randn(1, *shape)
        first, second = runner(model, x, "onnxruntime"), runner(model, x, "onnxruntime")
        for estimator, measure in (("rounds", by_rounds), ("pairs", by_pairs)):
            ratios = [measure(first, second, args.repeats) for _ in range(args.trials)]
            rows.append({"model": name, "input": list(shape), "estimator": estimator, "ratios": ratios,
                         "min": min(ratios), "max": max(ratios), "spread": max(ratios) / min(ratios)})
            print(rows[-1]["model"], estimator, f"{min(ratios):.3f}–{max(ratios):.3f}", flush=True)
    record = {"command": "python benchmarks/timing_pairs.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "trials": args.trials, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "wall_seconds": time.perf_counter() - start, "rows": rows}
    lines = ["# Two copies of one network timed against each other in onnxruntime (true ratio 1)", "",
             f"Command: `{record['command']}`", "",
             f"Batch 1, {record['threads']} threads, {args.repeats} runs of each network per measurement, "
             f"{args.trials} measurements per estimator; wall time {record['wall_seconds'] / 60:.1f} min.", "",
             "| model | input | estimator | ratio min – max | max ÷ min |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['input']))} | {r['estimator']} | "
                     f"{r['min']:.3f} – {r['max']:.3f} | {r['spread']:.3f} |")
    out = write_results(args.out, "timing_pairs", record, "\n".join(lines))
    print(f"results in {out}/timing_pairs.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
