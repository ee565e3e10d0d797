"""What BAR's masks need for mixed-connectivity blocks to matter (a benchmark, not a test).

Seed 001's Table 2 reports that compacting BAR's masks with regular residual blocks instead of
mixed ones would keep 12/43/53/58 % more activation volume at 2/4/8/16× (Wide-ResNet, CIFAR-10).
A mixed block saves volume only where the tensors a residual sum adds keep *different* channels;
where every writer of a residual space keeps all of its channels, or none, the two compactions
coincide. This runs BAR (``block="mixed"``, volume budget) under a few settings, each from one
shared teacher, and reports for the same final masks the volume of both compactions (the cut by
mixed blocks), the accuracy, and each stage's widths, so one can see where the masks put the
channels.

    python benchmarks/mixed_cut.py --train-subset 20000 --factors 4 --variants default,gate_init=0,no_fill
    python benchmarks/mixed_cut.py --factors 2,4,8 --variants default,gate_init=0   # all 60,000 images

Split over processes: ``--teacher-only`` trains the shared teacher into ``--work`` first; then
each process runs some ``--factors`` on that ``--work``, and a last call with all of them writes
the page from the finished runs. The model is created with the run's seed, so a command trains
the same teacher each time.

Variants: ``default`` (the library's defaults), ``gate_init=X`` (the gates' initial log α; 0 is
the paper's start), ``no_fill`` (no reopening of closed channels after the projection),
``epochs=N`` (a longer prune stage). Writes ``mixed_cut.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budgetprune import io  # noqa: E402
from budgetprune.compact import to_plain  # noqa: E402
from budgetprune.data import load_dataset  # noqa: E402
from budgetprune.graph import ChannelGraph  # noqa: E402
from budgetprune.pipeline import PruneConfig, PruneRun  # noqa: E402
from budgetprune.plan import masks_of_indices  # noqa: E402
from budgetprune.resources import resource_report  # noqa: E402
from common import (finetune_words, random_subset, run_arguments, run_record, seeded_model,  # noqa: E402
                    train_teacher, write_results)

#: Seed 001, Table 2 (CIFAR-10): volume that regular blocks would add, as a share of the regular volume.
PAPER_CUT = {2.0: 0.12, 4.0: 0.43, 8.0: 0.53, 16.0: 0.58}


def variant_options(name: str) -> dict:
    """PruneConfig options of a variant name (see the module docstring)."""
    if name == "default":
        return {}
    if name == "no_fill":
        return {"fill_budget": False}
    key, sep, value = name.partition("=")
    try:
        if sep and key == "gate_init":
            return {"gate_init": float(value)}
        if sep and key == "epochs":
            return {"epochs": int(value)}
    except ValueError:
        raise ValueError(f"variant {name!r}: {key} takes a number") from None
    raise ValueError(f"unknown variant {name!r}: use default, no_fill, gate_init=X or epochs=N")


def stage_widths(kept: dict[str, list[int]]) -> dict[str, list[int]]:
    """Kept channels per layer, grouped by the name's first part (stem, layer1, ...)."""
    out: dict[str, list[int]] = {}
    for gid, channels in kept.items():
        out.setdefault(gid.split(".")[0], []).append(len(channels))
    return out


def main(argv=None) -> int:
    p = run_arguments(__doc__.splitlines()[0], "resnet20", "mixed_cut", teacher=3, prune=3, finetune=1, lowlr=0)
    p.add_argument("--factors", default="4", help="comma-separated volume reduction factors")
    p.add_argument("--variants", default="default,gate_init=0,no_fill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-only", action="store_true",
                   help="train the shared teacher into --work/teacher.pt and stop (then run several processes, "
                        "each with some --factors, on that --work; a last call with all of them writes the page "
                        "from the finished runs)")
    args = p.parse_args(argv)
    try:
        factors = [float(f) for f in args.factors.split(",") if f.strip()]
    except ValueError:
        p.error(f"--factors is a comma-separated list of numbers above 1, e.g. 2,4 (got {args.factors!r})")
    if not factors or any(f <= 1 for f in factors):
        p.error(f"--factors must be numbers above 1 (got {args.factors!r})")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        options = {v: variant_options(v) for v in variants}
    except ValueError as err:
        p.error(str(err))
    start = time.time()
    torch.set_num_threads(1)
    splits = load_dataset(args.data, root=args.data_root)
    train = random_subset(splits.train, args.train_subset) if args.train_subset else splits.train
    info = splits.info
    work = Path(args.work)
    make = lambda: seeded_model(args.model, args.seed, info.in_channels, info.num_classes,  # noqa: E731
                                info.image_size)  # the initial weights of `budgetprune prune --seed`
    graph = ChannelGraph.build(make(), torch.randn(1, info.in_channels, *info.image_size))
    teacher = io.load(work / "teacher.pt") if (work / "teacher.pt").exists() else None
    if args.teacher_only:  # budgetprune's teacher stage in --work itself, where every run looks for teacher.pt
        if teacher is None:
            train_teacher(args.model, args.seed, train, splits.test, info, args.teacher_epochs, work, log=lambda s: None)
        print(f"teacher: {work / 'teacher.pt'}", flush=True)
        return 0
    rows = []
    for factor in factors:
        for variant in variants:
            opts = dict(options[variant])
            cfg = PruneConfig(budget=1.0 / factor, model=args.model, data=args.data, block="mixed",
                              epochs=opts.pop("epochs", args.epochs), finetune_epochs=args.finetune_epochs,
                              lowlr_epochs=args.lowlr_epochs, teacher_epochs=args.teacher_epochs, seed=args.seed,
                              progress=False, **opts)
            folder = work / f"{variant}-{factor:g}x"
            run = PruneRun(make(), train, splits.test, cfg, folder, teacher=teacher, log=lambda s: None)
            m = run.run(resume=(folder / "checkpoint.pt").exists()).metrics
            if teacher is None:
                io.save(to_plain(run.teacher, run.graph), work / "teacher.pt", meta={"role": "teacher"})
                teacher = run.teacher
            masks = masks_of_indices(m["kept_channels"], {gid: g.channels for gid, g in graph.groups.items()})
            volume = {mode: resource_report(graph, masks, mode)["volume"] for mode in ("regular", "mixed")}
            row = {"factor": factor, "variant": variant, "test_accuracy": m["test_accuracy"],
                   "teacher_accuracy": m["unpruned_test_accuracy"], "V_over_B": m["budget_ratio"],
                   "volume_regular": volume["regular"], "volume_mixed": volume["mixed"],
                   "cut_by_mixed": 1.0 - volume["mixed"] / volume["regular"], "paper_cut": PAPER_CUT.get(factor),
                   "widths": stage_widths(m["kept_channels"])}
            print(json.dumps({k: row[k] for k in ("factor", "variant", "test_accuracy", "cut_by_mixed")}), flush=True)
            rows.append(row)
    record = run_record("mixed_cut.py", args, argv) | {"train_images": len(train.labels), "seed": args.seed,
                                                       "wall_seconds": time.time() - start, "rows": rows}
    write_results(args.out, "mixed_cut", record, page(record))
    return 0


def page(r: dict) -> str:
    e = r["epochs"]
    lines = ["# What BAR's masks need for mixed blocks to matter", "", f"Command: `{r['command']}`", "",
             f"{r['model']} on {r['data']} ({r['train_images']} training images), volume budgets, `block=\"mixed\"`, "
             f"seed {r['seed']}, one teacher for every run. Epochs: teacher {e['teacher']}, prune {e['prune']}, "
             f"{finetune_words(e['finetune'], e['lowlr'])}. Cut by mixed: 1 − V(mixed) / V(regular) for "
             f"the same final masks (seed 001 Table 2, CIFAR-10, in brackets). Machine: {r['machine']}. "
             f"Wall time {r['wall_seconds'] / 60:.1f} min.", "",
             "| factor | variant | test acc (teacher) | V/B | cut by mixed (paper) | kept channels per layer, by stage |",
             "|---:|---|---:|---:|---:|---|"]
    for row in r["rows"]:
        paper = f" ({100 * row['paper_cut']:.0f} %)" if row["paper_cut"] is not None else ""
        widths = "; ".join(f"{stage}: {'-'.join(map(str, w))}" for stage, w in row["widths"].items())
        lines.append(f"| {row['factor']:g}× | {row['variant']} | {100 * row['test_accuracy']:.2f} % "
                     f"({100 * row['teacher_accuracy']:.2f} %) | {row['V_over_B']:.4f} | "
                     f"{100 * row['cut_by_mixed']:.1f} %{paper} | {widths} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    raise SystemExit(main())
