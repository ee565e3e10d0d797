"""Where BAR's gates start on a trained ResNet-20: seed 001's log α ≈ 0 against open gates (3).

Two measurements, one teacher (ResNet-20 on full Fashion-MNIST, ``budgetprune prune``'s teacher
stage, or ``--teacher``):

1. *The shock*: the teacher's accuracy with BAR's gates attached, sampled as in training (one
   sample per channel and example), before any step, per initial log α. These are 1000 images of
   the test set: a diagnostic of the noise, not a choice made on them.
2. *The runs*: ``budgetprune prune --model resnet20 --data fashion-mnist --metric flops --budget
   <factor>x --teacher T --epochs 3 --finetune-epochs 1 --validation 5000 --gate-init G --seed S``
   for each G and S (a run folder that finished is read, not run again). The choice is made on the
   5000 validation images each run holds out; test accuracy is reported beside them.

    python benchmarks/gate_init.py --data-root ../shared/data --teacher runs/deploy_resnet20/2x/teacher.pt \\
        --seeds 0,1 --work runs/gateinit

Writes ``benchmarks/results/gate_init.{json,md}``. One run takes about 25 minutes of one core.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, RESULTS, Parser, number_list, source_state, write_results  # noqa: E402
from stats import format_mean_std, tie  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune.data.loading import load_dataset  # noqa: E402
from budgetprune.io import load_file  # noqa: E402


def arguments(argv) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding fashion-mnist")
    p.add_argument("--teacher", help="a trained ResNet-20 (teacher.pt of a run); default: the first run trains one")
    p.add_argument("--gate-inits", type=lambda t: number_list(float, t, "initial log α values"), default=[0.0, 3.0])
    p.add_argument("--seeds", type=lambda t: number_list(int, t, "seeds", -1), default=[0])
    p.add_argument("--factor", type=float, default=4.0, help="FLOP reduction of the runs")
    p.add_argument("--epochs", type=int, default=3, help="prune epochs of each run (fine-tune 1 + 1 after them)")
    p.add_argument("--work", default=str(HERE.parent / "runs" / "gateinit"), help="run folders go here")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.teacher and not Path(args.teacher).is_file():
        p.error(f"--teacher {args.teacher} does not exist")
    return args


def run_folder(work: Path, factor: float, gate_init: float, seed: int) -> Path:
    return work / f"{factor:g}x_gi{gate_init:g}_s{seed}"


def run(args, folder: Path, gate_init: float, seed: int, teacher: str | None) -> dict:
    """The run's record, from its folder (run first unless it finished)."""
    if not (folder / "metrics.json").is_file():
        command = [sys.executable, "-m", "budgetprune", "prune", "--model", "resnet20", "--data", "fashion-mnist",
                   "--data-root", args.data_root, "--metric", "flops", "--budget", f"{args.factor:g}x",
                   "--epochs", str(args.epochs), "--finetune-epochs", "1", "--validation", "5000",
                   "--gate-init", f"{gate_init:g}", "--seed", str(seed), "--deploy-runtime", "none",
                   "--no-progress", "--out", str(folder)]
        command += ["--teacher", teacher] if teacher else ["--teacher-epochs", "4"]
        if (folder / "checkpoint.pt").is_file():
            command.append("--resume")
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"gate_init.py: the run in {folder} failed (its log above); fix it and run again")
    check_run(folder, expected_config(args, gate_init, seed))
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    last = {row["stage"]: row for row in history}  # each stage's last epoch
    return {"gate_init": gate_init, "seed": seed, "folder": str(folder),
            "val_accuracy": last["finetune"]["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
            "val_accuracy_after_prune": last["prune"]["val_accuracy"],
            "prune_epochs_val_accuracy": [r["val_accuracy"] for r in history if r["stage"] == "prune"],
            "unpruned_test_accuracy": metrics["unpruned_test_accuracy"],
            "flops_over_budget": metrics["budget_ratio"]}


def expected_config(args, gate_init: float, seed: int) -> dict:
    """The options of a run this benchmark makes (as its ``config.json`` records them)."""
    return {"model": "resnet20", "data": "fashion-mnist", "metric": "flops", "budget": 1.0 / args.factor,
            "epochs": args.epochs, "finetune_epochs": 1, "lowlr_epochs": 1, "gate_init": gate_init, "seed": seed,
            "validation": 5000}


def check_run(folder: Path, expected: dict) -> None:
    """A finished run folder found in ``--work`` is used only if it ran with the benchmark's options."""
    config = json.loads((folder / "config.json").read_text())
    differ = [k for k, v in expected.items() if config.get(k) != v and not (
        isinstance(v, (int, float)) and isinstance(config.get(k), (int, float)) and abs(config[k] - v) < 1e-9)]
    if differ:
        raise SystemExit(f"gate_init.py: {folder} ran with other options ({', '.join(f'{k}={config.get(k)!r}' for k in differ)}"
                         f"); remove it or pass another --work")


@torch.no_grad()
def shock(teacher_path: str, data_root: str, gate_inits: list[float], images: int = 1000) -> list[dict]:
    """The teacher's accuracy with gates sampled as in training, before any step, per initial log α."""
    test = load_dataset("fashion-mnist", root=data_root, progress=False).test
    x = torch.stack([test[i][0] for i in range(images)])
    y = torch.tensor([test[i][1] for i in range(images)])
    teacher = load_file(teacher_path)[0]
    out = []
    for gate_init in [None, *gate_inits]:
        torch.manual_seed(0)
        model = budgetprune.create_model("resnet20")
        model.load_state_dict(teacher.state_dict())
        if gate_init is not None:
            budgetprune.Pruner(model, x[:2], "flops=0.25", total_steps=1, gate_init=gate_init, log=lambda line: None)
        model.train()  # gates sampled (BatchNorm on batch statistics, as in a training step)
        out.append({"gate_init": gate_init, "accuracy": float((model(x).argmax(1) == y).float().mean())})
    return out


def main(argv=None) -> int:
    args = arguments(argv)
    start = time.perf_counter()
    work = Path(args.work)
    teacher = args.teacher
    rows = []
    for seed in args.seeds:
        for gate_init in args.gate_inits:
            folder = run_folder(work, args.factor, gate_init, seed)
            rows.append(run(args, folder, gate_init, seed, teacher))
            teacher = teacher or str(folder / "teacher.pt")  # the later runs share the first one's
    state = source_state()
    record = {"command": "python benchmarks/gate_init.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "git": state[0] if state else None, "uncommitted_src": state[1] if state else None,
              "teacher": teacher, "factor": args.factor, "epochs": args.epochs,
              "shock": shock(teacher, args.data_root, args.gate_inits), "runs": rows,
              "wall_seconds": time.perf_counter() - start}
    out = write_results(args.out, "gate_init", record, markdown(record))
    print(f"results in {out}/gate_init.{{json,md}}")
    return 0


def markdown(r: dict) -> str:
    lines = ["# Where BAR's gates start on a trained ResNet-20", "", f"Command: `{r['command']}`", "",
             f"ResNet-20 on full Fashion-MNIST, FLOP budget {r['factor']:g}×, teacher `{r['teacher']}` (test "
             f"{100 * r['runs'][0]['unpruned_test_accuracy']:.2f} %). Each run: {r['epochs']} prune epochs, fine-tune "
             "1 + 1, 5000 training images held out for validation (chosen from the seed), the library's defaults "
             f"otherwise. git {r['git']}" + (f" (uncommitted: {', '.join(r['uncommitted_src'])})"
                                            if r["uncommitted_src"] else "") + ".", "",
             "**The shock**: the teacher's accuracy on 1000 test images with BAR's gates sampled as in a training "
             "step, before any step:", "", "| initial log α | accuracy |", "|---|---:|"]
    for s in r["shock"]:
        label = "no gates" if s["gate_init"] is None else f"{s['gate_init']:g}"
        lines.append(f"| {label} | {100 * s['accuracy']:.1f} % |")
    inits = sorted({x["gate_init"] for x in r["runs"]})
    by = {g: [x for x in r["runs"] if x["gate_init"] == g] for g in inits}
    lines += ["", "**The runs** (mean ± standard deviation over the seeds; validation decides):", "",
              "| initial log α | seeds | val % after each prune epoch | val % after pruning | val % final | "
              "test % final | FLOPs ÷ budget |", "|---|---|---|---:|---:|---:|---:|"]
    for g, xs in by.items():
        epochs = " / ".join(f"{100 * v:.1f}" for v in xs[0]["prune_epochs_val_accuracy"]) + \
            (" (seed 0)" if len(xs) > 1 else "")
        lines.append(f"| {g:g} | {', '.join(str(x['seed']) for x in xs)} | {epochs} | "
                     f"{format_mean_std([100 * x['val_accuracy_after_prune'] for x in xs])} | "
                     f"{format_mean_std([100 * x['val_accuracy'] for x in xs])} | "
                     f"{format_mean_std([100 * x['test_accuracy'] for x in xs])} | "
                     + ", ".join(f"{x['flops_over_budget']:.3f}" for x in xs) + " |")
    if len(inits) == 2 and all(len(v) > 1 for v in by.values()):
        a, b = ([100 * x["val_accuracy"] for x in by[g]] for g in inits)
        lines += ["", f"Final validation, log α {inits[0]:g} vs {inits[1]:g}: "
                  + ("a tie (within two standard errors)" if tie(a, b) else "apart by more than two standard errors")
                  + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
