"""BAR with a short prune stage: what its gates do when they have too few steps to close.

BAR's Hard Concrete gates learn at ``--gate-lr`` (Adam, 1e-2); Adam moves a log α by about lr per
step at most, and an open gate (log α = 3) must fall 5.4 to the pruning threshold (−2.40). A run
whose prune stage has fewer steps than that logs a note (``budgetprune.gates.travel_note``). This
benchmark measures such a stage: ResNet-20 on ``--train-subset`` images of Fashion-MNIST (2500:
40 batches of 64 per epoch, 80 prune steps), BAR at ``--factor`` FLOPs from a teacher trained on
the same images (budgetprune's teacher stage, ``--teacher-epochs``), prune 2 epochs, fine-tune
1 + 1, for each variant ``GATE_LR/GATE_INIT`` (``d``: the default) and seed. Every choice is read
on ``--holdout`` training images the teacher and the runs never train on (the test set is not
read). Per run: the held-out accuracy when pruning ends and at the end, V/b when pruning ends (V:
the FLOPs of the channels whose gates are open, ẑ > 0; b: the schedule's bound, the budget by
then), and whether the run logged the note.

    python benchmarks/short_prune.py --data-root ../shared/data --seeds 0,1,2

Writes ``benchmarks/results/short_prune.{json,md}``; run folders go to ``--work`` (finished runs
are read, not run again). About 2 minutes per run and 1.5 per teacher on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, RESULTS, Parser, number_list, seeded_model, source_state, train_teacher, write_results  # noqa: E402
from stats import format_mean_std, tie  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune.data.loading import load_dataset  # noqa: E402
from budgetprune.engine import num_batches  # noqa: E402
from budgetprune.pipeline import PruneConfig  # noqa: E402

NAME = "short_prune"
PRUNE_EPOCHS, FINETUNE_EPOCHS, LOWLR_EPOCHS = 2, 1, 1  # each run's stages


def variant(text: str) -> tuple[float | None, float | None]:
    """``GATE_LR/GATE_INIT``, each a number or ``d`` (the default)."""
    try:
        lr, init = (None if v.strip() == "d" else float(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a variant is GATE_LR/GATE_INIT (numbers or d), not {text!r}") from None
    if lr is not None and not lr > 0:
        raise argparse.ArgumentTypeError(f"a variant's gate lr must be above 0, not {text!r}")
    return lr, init


def arguments(argv) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding fashion-mnist")
    p.add_argument("--variants", type=lambda t: list(dict.fromkeys(variant(v) for v in t.split(",") if v.strip())),
                   default="d/d,0.1/d,d/0", help="comma-separated GATE_LR/GATE_INIT, d: the default")
    p.add_argument("--seeds", type=lambda t: number_list(int, t, "seeds", -1), default=[0])
    p.add_argument("--factor", type=float, default=8.0, help="FLOP reduction of the runs")
    p.add_argument("--train-subset", type=int, default=2500, help="training images (the first of a seeded shuffle)")
    p.add_argument("--holdout", type=int, default=5000, help="held-out training images every choice is read on")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", default=str(HERE.parent / "runs" / NAME), help="teachers and run folders go here")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))
    if not args.variants:
        p.error("--variants names no variant")
    if args.train_subset < 64 or args.holdout < 1 or args.teacher_epochs < 1 or args.factor <= 1:
        p.error("--train-subset must be at least 64, --holdout and --teacher-epochs at least 1, --factor above 1")
    if args.train_subset + args.holdout > 60000:
        p.error(f"--train-subset + --holdout is {args.train_subset + args.holdout}, more than fashion-mnist's 60000 "
                "training images")
    # runs of other data or teachers never share a folder: the options are in its path
    args.work = str(Path(args.work) / f"n{args.train_subset}_h{args.holdout}_t{args.teacher_epochs}")
    return args


def label(v: tuple[float | None, float | None]) -> str:
    lr, init = v
    return f"gate lr {'1e-2 (default)' if lr is None else f'{lr:g}'}, log α₀ {'3 (default)' if init is None else f'{init:g}'}"


def splits(args):
    """The training subset and the held-out images: disjoint slices of one seeded shuffle."""
    data = load_dataset("fashion-mnist", root=args.data_root, progress=False)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    return (data.train.subset(order[:args.train_subset]),
            data.train.subset(order[args.train_subset:args.train_subset + args.holdout]), data.info)


def teacher(args, seed: int, train, holdout, info) -> tuple[Path, float]:
    """The seed's teacher, trained by budgetprune's teacher stage on the subset (or found in --work)."""
    return train_teacher("resnet20", seed, train, holdout, info, args.teacher_epochs, Path(args.work) / f"teacher_s{seed}",
                         log=lambda s: print(f"[teacher {seed}] {s}", flush=True))


def run_one(args, v, seed: int, teacher_file: Path, train, holdout, info) -> dict:
    lr, init = v
    folder = Path(args.work) / (f"{args.factor:g}x_lr{'d' if lr is None else f'{lr:g}'}"
                                f"_init{'d' if init is None else f'{init:g}'}_s{seed}")
    lines: list[str] = []
    if not (folder / "metrics.json").is_file():
        options = {} if init is None else {"gate_init": init}
        if lr is not None:
            options["gate_lr"] = lr
        budgetprune.prune(seeded_model("resnet20", seed, info.in_channels, info.num_classes, info.image_size),
                          train, holdout, budget=1.0 / args.factor, metric="flops", method="bar",
                          teacher=str(teacher_file), out=folder, resume=(folder / "checkpoint.pt").exists(),
                          epochs=PRUNE_EPOCHS, finetune_epochs=FINETUNE_EPOCHS, lowlr_epochs=LOWLR_EPOCHS,
                          seed=seed, progress=False,
                          deploy_runtime="none", log=lambda s: (lines.append(s), print(f"[{folder.name}] {s}", flush=True)),
                          **options)
        with open(folder / "log.txt", "a") as fh:  # a resumed run adds to what its first part logged
            fh.write("\n".join(lines) + "\n")
    history = json.loads((folder / "history.json").read_text())
    prune = [r for r in history if r["stage"] == "prune"][-1]
    log = (folder / "log.txt").read_text() if (folder / "log.txt").is_file() else ""
    return {"gate_lr": lr, "gate_init": init, "seed": seed, "folder": str(folder),
            "holdout_after_prune": prune["test_accuracy"], "holdout_final": history[-1]["test_accuracy"],
            "v_over_b_after_prune": prune["V"] / prune["b"], "noted": "note: the prune stage has" in log}


def markdown(record: dict) -> str:
    lines = ["# BAR with a short prune stage", "", f"Command: `{record['command']}`", "",
             f"ResNet-20, Fashion-MNIST: {record['train_images']} training images ({record['prune_steps']} prune steps), {record['holdout_images']} held-out training images for every accuracy here (the test set "
             f"is not read); teacher {record['teacher_epochs']} epochs on the same images, per seed; BAR at "
             f"{record['factor']:g}× FLOPs, prune {PRUNE_EPOCHS} epochs, fine-tune {FINETUNE_EPOCHS} + {LOWLR_EPOCHS}. budgetprune at {record['git'] or 'an unknown commit'}. "
             "V/b when pruning ends: the FLOPs of the channels whose gates are open (ẑ > 0) over the schedule's "
             f"bound, by then the budget ({record['factor']:g}: no gate closed; far above 1: the final projection "
             "chose the channels; below 1: the gates closed more than the budget asks). Mean ± standard deviation "
             "over the seeds (one seed: its value); "
             "(tie): within two standard errors of the best.", "",
             "Unpruned teachers, held-out accuracy: " + format_mean_std([100 * t for t in record["teachers"].values()])
             + " %.", "",
             "| variant | seeds | held-out % when pruning ends | held-out % final | V/b when pruning ends | note logged |",
             "|---|---|---:|---:|---:|---|"]
    groups: dict = {}
    for r in record["runs"]:
        groups.setdefault((r["gate_lr"], r["gate_init"]), []).append(r)
    finals = {k: [100 * r["holdout_final"] for r in rs] for k, rs in groups.items()}
    best = max(finals, key=lambda k: sum(finals[k]) / len(finals[k]))
    for k, rs in groups.items():
        cell = format_mean_std(finals[k])
        if len(rs) > 1:
            cell = f"**{cell}**" if k == best else (f"{cell} (tie)" if tie(finals[k], finals[best]) else cell)
        vb = [r["v_over_b_after_prune"] for r in rs]
        lines.append(f"| {label(k)} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{format_mean_std([100 * r['holdout_after_prune'] for r in rs])} | {cell} | "
                     f"{min(vb):.2f}–{max(vb):.2f} | {'yes' if all(r['noted'] for r in rs) else 'no' if not any(r['noted'] for r in rs) else 'some'} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    args = arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train, holdout, info = splits(args)
    teachers, rows = {}, []
    for seed in args.seeds:
        teacher_file, accuracy = teacher(args, seed, train, holdout, info)
        teachers[str(seed)] = accuracy
        for v in args.variants:
            rows.append(run_one(args, v, seed, teacher_file, train, holdout, info))
    state = source_state()
    record = {"command": "python benchmarks/short_prune.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "git": state[0] if state else None, "uncommitted_src": state[1] if state else None,
              "train_images": len(train), "holdout_images": len(holdout),
              "prune_steps": PRUNE_EPOCHS * num_batches(train, PruneConfig().batch_size),
              "teacher_epochs": args.teacher_epochs, "factor": args.factor, "teachers": teachers, "runs": rows,
              "wall_seconds": time.perf_counter() - start}
    out = write_results(args.out, NAME, record, markdown(record))
    print(f"results in {out}/{NAME}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
