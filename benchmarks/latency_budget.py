"""Latency budgets measured in onnxruntime: does the exported network land on its budget?

For each model and latency fraction a ``budgetprune.Pruner`` with the budget
``latency:onnxruntime=<fraction>`` (each conv/linear layer shape timed in onnxruntime at a grid
of widths, :mod:`budgetprune.latency`) takes ``--steps`` AdamW steps on random inputs and
finalizes: the projection meets the budget in the table's milliseconds, and finalize times the
result in onnxruntime and projects again, aiming at 0.95 of the budget, until it measures within
[0.92, 0.98] of it (:mod:`budgetprune.measured`, at most 7 projections). The compacted network and the unpruned one
are then timed again here, independently (:func:`budgetprune.runtimes.deployed_speed`: runs
paired by turns, at ``--batch``, default 1, the ratio a median of the pairs' ratios), and timed
once more, up to twice, while the unpruned network runs more than 1.25 times slower than in
finalize's fastest try (:func:`budgetprune.measured.steady_speed`: the machine was busier; the
timing whose unpruned run was fastest counts, ``retimed`` in the JSON). The target: the measured
latency of the pruned network is within [0.9, 1.0] of the budget, i.e. of ``fraction`` × the
measured latency of the unpruned network.

Each run is done three times: with regular blocks of exact widths, with regular blocks whose
widths are padded as ``--multiple`` asks (default ``auto``, the library's default: multiples of 8
in every feature map, loosened where that cannot end on the budget; onnxruntime's
blocked CPU convolutions need such widths), and with the library's defaults (auto blocks: each
residual space mixed or regular by its gathers' cost in onnxruntime; padded the same way). A runtime latency
budget refuses pure mixed blocks: measured here before that refusal, their gathers (not in the
table) drove mobilenet_v2 to 520× fewer FLOPs to meet a 2× latency budget. Untrained weights: timing does not need accuracy.

    python benchmarks/latency_budget.py                              # resnet20, resnet18, mobilenet_v2
    python benchmarks/latency_budget.py --models resnet20 --fractions 0.5    # smoke run
    python benchmarks/latency_budget.py --batch 16 --out benchmarks/results/latency_budget_batch16
    python benchmarks/latency_budget.py --models shufflenet_v2_x0_5 --batch 16 \
        --out benchmarks/results/latency_budget_shufflenet           # any family deploy_speed.py knows

``--batch`` is the deployment's batch (the Pruner's ``deploy_batch``): the tables, finalize's
timings and the timing here all run at it.

Writes ``benchmarks/results/latency_budget.{json,md}``. The per-layer tables are cached in
``--cache`` (default ``runs/latency_budget/cache``, so the run does not touch the user cache).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, RESULTS, padding_label, pruning_steps, source_state, write_results  # noqa: E402
from deploy_speed import KNOWN_MODELS, REGISTRY, build  # noqa: E402
from torchvision_models import import_torchvision  # noqa: E402

from budgetprune import Pruner  # noqa: E402
from budgetprune.cli import channel_multiple_arg  # noqa: E402
from budgetprune.measured import fastest_unpruned_ms, steady_speed  # noqa: E402

MODELS = ["resnet20", "resnet18", "mobilenet_v2"]
TARGET = (0.9, 1.0)


def arguments(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(KNOWN_MODELS)}")
    p.add_argument("--fractions", default="0.5,0.25", help="latency budgets as fractions of the unpruned latency")
    p.add_argument("--size", type=int, default=224, help="pixels of the torchvision models' inputs")
    p.add_argument("--steps", type=int, default=4, help="AdamW steps before finalize")
    p.add_argument("--multiple", type=channel_multiple_arg, default="auto",
                   help="channel multiple of the padded runs: a whole number, or auto (the library default)")
    p.add_argument("--batch", type=int, default=1, help="the deployment's batch: tables and timings run at it")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per network at least (paired by turns with the other network, a second at least)")
    p.add_argument("--cache", default=str(HERE.parent / "runs" / "latency_budget" / "cache"))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in KNOWN_MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}")
    try:
        args.fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        p.error(f"--fractions must be numbers, not {args.fractions!r}")
    if not all(0 < f < 1 for f in args.fractions):
        p.error("--fractions must lie strictly between 0 and 1")
    if args.batch < 1:
        p.error("--batch must be 1 or more")
    return args


def run_one(unpruned, shape, fraction: float, block: str, multiple: int | str, steps: int, repeats: int,
            batch: int = 1) -> dict:
    torch.manual_seed(0)
    model = copy.deepcopy(unpruned).train()
    x, y = torch.randn(2, *shape), torch.randint(0, 10, (2,))
    start = time.perf_counter()
    pruner = Pruner(model, x, f"latency:onnxruntime={fraction!r}", total_steps=max(steps, 1), method="magnitude",
                    block=block, channel_multiple=multiple, deploy_batch=batch)
    table_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3)
    pruning_steps(model, pruner, optimizer, x, y, steps)
    small, report = pruner.finalize(x)
    metric = "latency:onnxruntime"
    full, pruned = pruner.full[metric], report["pruned"][metric]
    tries = report.get("measured_latency", {}).get("tries", [])
    measured = steady_speed(unpruned.eval(), small, torch.zeros(batch, *shape), "onnxruntime",
                            fastest_unpruned_ms(tries, metric), repeats=repeats)
    out = {"fraction": fraction, "block": block, "channel_multiple": multiple, "padding": report.get("padding"),
           "finalize_tries": tries,
           "table_ms": {"unpruned": full, "pruned": pruned, "ratio": pruned / full},
           "measured": measured, "table_seconds": table_seconds,
           "flop_reduction": pruner.full["flops"] / report["pruned"]["flops"]}
    if "error" not in measured:
        ratio = measured["ratio"]
        out["measured_ratio"] = ratio
        out["measured_over_budget"] = ratio / fraction
        out["on_target"] = TARGET[0] <= ratio / fraction <= TARGET[1]
    return out


def main(argv=None) -> int:
    args = arguments(argv)
    os.environ["BUDGETPRUNE_CACHE"] = args.cache
    models_module = import_torchvision() if any(m not in REGISTRY for m in args.models) else None
    start = time.perf_counter()
    rows = []
    variants = [("regular", 1), ("regular", args.multiple), ("auto", args.multiple)]
    with tqdm(total=len(args.models) * len(args.fractions) * len(variants), unit="run", dynamic_ncols=True) as bar:
        for name in args.models:
            unpruned, shape = build(name, args.size, models_module)
            for fraction in args.fractions:
                for block, multiple in variants:
                    bar.set_description(f"{name} {fraction:g} {block}/{multiple}")
                    row = {"model": name, "input_shape": list(shape)}
                    try:
                        row.update(run_one(unpruned, shape, fraction, block, multiple, args.steps, args.repeats,
                                           args.batch))
                    except Exception as exc:  # one failure is recorded, the others still run
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                        tqdm.write(f"{name} {fraction:g} {block}: {row['error']}")
                    rows.append(row)
                    bar.update()
    state = source_state()
    record = {"command": "python benchmarks/latency_budget.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache")},
              "git": state[0] if state else None, "uncommitted_src": state[1] if state else None,
              "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - start, "rows": rows}
    out = write_results(args.out, "latency_budget", record, markdown(record))
    print(f"results in {out}/latency_budget.{{json,md}} ({record['wall_seconds'] / 60:.1f} min)")
    return 0


def _padding(row: dict) -> str:
    """How a padded run's widths ended: ``×16``, or ``auto → ×8`` (the padding kept)."""
    if row["channel_multiple"] != "auto":
        return f"×{row['channel_multiple']}"
    return f"auto → {padding_label(row.get('padding'))}"


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# Latency budgets measured in onnxruntime", "", f"Command: `{r['command']}`", "",
             "Per model and latency fraction, a `Pruner` with the budget `latency:onnxruntime=<fraction>` (method "
             f"`magnitude`, {s['steps']} AdamW steps on random inputs, untrained weights) finalizes; the compacted "
             f"network and the unpruned one are exported to ONNX and timed in onnxruntime at batch {s.get('batch', 1)} "
             f"({r['threads']} threads; runs paired by turns, at least {s['repeats']} pairs and a second; the ratio is the median of the pairs' ratios). "
             "*Projections*: how many finalize timed (aiming at 0.95 of the budget) before one measured within "
             "[0.92, 0.98] of it (7 at most). *Table* is the per-layer table's ratio of the result; *measured* is the exported "
             f"network's latency over the unpruned one's, timed again after finalize (marked † where that timing was "
             "repeated because the unpruned network ran over 1.25× slower than in finalize's fastest try: the "
             "timing with the fastest unpruned run counts). Target: measured ÷ budget in [{TARGET[0]}, {TARGET[1]}]. "
             f"Torchvision models at {s['size']} px; resnet20 at 1×28×28. git {r['git']}"
             + (f" (uncommitted: {', '.join(r['uncommitted_src'])})" if r["uncommitted_src"] else "")
             + f". Wall time {r['wall_seconds'] / 60:.1f} min. The machine's 2 cores may have been shared.", "",
             "| model | budget | block | projections | table ratio | measured ms (unpruned → pruned) | "
             "measured ratio | measured ÷ budget | on target | FLOP red. |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | | | | failed: {row['error']} | | | | | |")
            continue
        block = row["block"] + (f", {_padding(row)}" if row["channel_multiple"] != 1 else "")
        m = row["measured"]
        if "error" in m:
            lines.append(f"| {row['model']} | {row['fraction']:g} | {block} | {len(row['finalize_tries'])} | "
                         f"{row['table_ms']['ratio']:.3f} | not measured: {m['error']} | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['fraction']:g} | {block} | {len(row['finalize_tries'])} | "
                     f"{row['table_ms']['ratio']:.3f} | {m['unpruned_ms']:.3f} → {m['pruned_ms']:.3f}{' †' if m.get('retimed') else ''} | "
                     f"{row['measured_ratio']:.3f} | "
                     f"{row['measured_over_budget']:.2f} | {'yes' if row['on_target'] else '**no**'} | "
                     f"{row['flop_reduction']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
