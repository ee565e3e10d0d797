"""Where BAR's gates start on a trained network: seed 001's log α ≈ 0, open gates (3), or between.

Two measurements per teacher (``budgetprune prune``'s teacher stage on full Fashion-MNIST less the
held-out images, or ``--teacher``):

1. *The shock*: the teacher's top-1 accuracy, and its agreement with the ungated teacher, with
   BAR's gates attached and sampled as in training (one sample per channel and example), before
   any step, per initial log α from 0 to 4, on 1024 images of the training set in batches of 64: what
   ``--gate-survival`` measures (:func:`budgetprune.gate_start.survival_table`).
2. *The runs*: ``budgetprune prune --model M --data fashion-mnist --metric flops --budget <factor>x
   --epochs E --finetune-epochs 1 --lowlr-epochs 1 --validation 5000 --gate-init G --seed S`` for
   each factor, G and S (a run folder that finished is read, not run again). The choice is made on
   the 5000 validation images each run holds out (chosen from the seed); test accuracy is reported
   beside them. Without ``--teacher`` each seed's first run trains the seed's teacher on the seed's
   own split and the seed's other runs share it, so no teacher has seen the images it is judged on.

    python benchmarks/gate_init.py --data-root ../shared/data --teacher runs/deploy_resnet20/2x/teacher.pt \\
        --seeds 0,1 --work runs/gateinit
    python benchmarks/gate_init.py --data-root ../shared/data --model lenet5 --factors 8,16 \\
        --gate-inits 0,1,2,3 --seeds 0,1,2 --out benchmarks/results/gate_init_lenet5

Writes ``gate_init.{json,md}`` in ``--out``. A ResNet-20 run (3 prune epochs) takes about 25
minutes of one core, a LeNet-5 run (2 prune epochs) about 3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, RESULTS, Parser, number_list, source_state, write_results  # noqa: E402
from stats import format_mean_std, tie  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune import gate_start  # noqa: E402
from budgetprune.data.loading import load_dataset  # noqa: E402
from budgetprune.io import load_file  # noqa: E402

#: Epochs of each model's teacher and prune stages (the Torch-Pruning comparison's schedules).
SCHEDULES = {"resnet20": {"teacher": 4, "prune": 3}, "lenet5": {"teacher": 8, "prune": 2}}


def arguments(argv) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding fashion-mnist")
    p.add_argument("--model", choices=sorted(SCHEDULES), default="resnet20")
    p.add_argument("--teacher", help="one trained teacher (teacher.pt of a run) for every seed; default: each "
                                     "seed's first run trains the seed's own")
    p.add_argument("--gate-inits", type=lambda t: number_list(float, t, "initial log α values"), default=[0.0, 3.0])
    p.add_argument("--seeds", type=lambda t: number_list(int, t, "seeds", -1), default=[0])
    p.add_argument("--factors", type=lambda t: number_list(float, t, "FLOP reductions", 1.0), default=[4.0])
    p.add_argument("--epochs", type=int, help="prune epochs of each run (fine-tune 1 + 1 after them; default: "
                                              "resnet20 3, lenet5 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of each run (OMP_NUM_THREADS; 0: torch's default)")
    p.add_argument("--work", default=str(HERE.parent / "runs" / "gateinit"), help="run folders go here")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.teacher and not Path(args.teacher).is_file():
        p.error(f"--teacher {args.teacher} does not exist")
    if args.epochs is None:
        args.epochs = SCHEDULES[args.model]["prune"]
    elif args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def run_folder(work: Path, model: str, factor: float, gate_init: float, seed: int) -> Path:
    """Where a run lives (ResNet-20's directly in ``work``, as before other models were measured)."""
    base = work if model == "resnet20" else work / model
    return base / f"{factor:g}x_gi{gate_init:g}_s{seed}"


def run(args, folder: Path, factor: float, gate_init: float, seed: int, teacher: str | None) -> dict:
    """The run's record, from its folder (run first unless it finished)."""
    read_back = (folder / "metrics.json").is_file()
    if not read_back:
        command = [sys.executable, "-m", "budgetprune", "prune", "--model", args.model, "--data", "fashion-mnist",
                   "--data-root", args.data_root, "--metric", "flops", "--budget", f"{factor:g}x",
                   "--epochs", str(args.epochs), "--finetune-epochs", "1", "--lowlr-epochs", "1",
                   "--validation", "5000", "--gate-init", f"{gate_init:g}", "--seed", str(seed),
                   "--deploy-runtime", "none", "--no-progress", "--out", str(folder)]
        command += ["--teacher", teacher] if teacher else ["--teacher-epochs", str(SCHEDULES[args.model]["teacher"])]
        if (folder / "checkpoint.pt").is_file():
            command.append("--resume")
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        if subprocess.run(command, env=env).returncode != 0:
            raise SystemExit(f"gate_init.py: the run in {folder} failed (its log above); fix it and run again")
    check_run(folder, expected_config(args, factor, gate_init, seed))
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    last = {row["stage"]: row for row in history}  # each stage's last epoch
    return {"factor": factor, "gate_init": gate_init, "seed": seed, "folder": str(folder),
            "val_accuracy": last["finetune"]["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
            "val_accuracy_after_prune": last["prune"]["val_accuracy"],
            "prune_epochs_val_accuracy": [r["val_accuracy"] for r in history if r["stage"] == "prune"],
            "unpruned_test_accuracy": metrics["unpruned_test_accuracy"],
            "flops_over_budget": metrics["budget_ratio"], "read_back": read_back,
            "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime((folder / "metrics.json").stat().st_mtime))}


def expected_config(args, factor: float, gate_init: float, seed: int) -> dict:
    """The options of a run this benchmark makes (as its ``config.json`` records them)."""
    return {"model": args.model, "data": "fashion-mnist", "metric": "flops", "budget": 1.0 / factor,
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


def shock(model_name: str, teacher_path: str, data_root: str, images: int = 1024, batch: int = 64) -> list[dict]:
    """The teacher's accuracy, and its top-1 agreement with the ungated teacher, with gates sampled
    as in training, before any step, at each start of :data:`budgetprune.gate_start.START_GRID`, on
    ``images`` random training images in batches of ``batch``: the measurement ``--gate-survival``
    makes (:func:`budgetprune.gate_start.survival_table`), plus the accuracy."""
    train = load_dataset("fashion-mnist", root=data_root, progress=False).train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:images]
    x = torch.stack([train[int(i)][0] for i in pick])
    y = torch.tensor([train[int(i)][1] for i in pick])
    torch.manual_seed(0)
    model = budgetprune.create_model(model_name)
    model.load_state_dict(load_file(teacher_path)[0].state_dict())
    method = budgetprune.Pruner(model, x[:2], "flops=0.25", total_steps=1).method
    grid = [gate_start.UNGATED_LOG_ALPHA, *gate_start.START_GRID]
    agreement = gate_start.survival_table(model, method, [x[i:i + batch] for i in range(0, images, batch)], grid=grid)
    correct = dict.fromkeys(grid, 0.0)
    for i in range(0, images, batch):
        labels = y[i:i + batch]
        table = gate_start.survival_table(model, method, [x[i:i + batch]], grid=grid, seed=i // batch,
                                          agree=lambda output, reference: output.argmax(1) == labels)
        for start, fraction in table.items():
            correct[start] += fraction * len(labels)
    return [{"gate_init": None if start == gate_start.UNGATED_LOG_ALPHA else start, "accuracy": correct[start] / images,
             "agreement": agreement[start]} for start in grid]


def main(argv=None) -> int:
    args = arguments(argv)
    start = time.perf_counter()
    work = Path(args.work)
    rows, teachers = [], {}
    for seed in args.seeds:
        teacher = args.teacher
        for factor in args.factors:
            for gate_init in args.gate_inits:
                folder = run_folder(work, args.model, factor, gate_init, seed)
                rows.append(run(args, folder, factor, gate_init, seed, teacher))
                teacher = teacher or str(folder / "teacher.pt")  # the seed's later runs share its first one's
        teachers[seed] = teacher
    state = source_state()
    first = teachers[args.seeds[0]]
    record = {"command": "python benchmarks/gate_init.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "git": state[0] if state else None, "uncommitted_src": state[1] if state else None,
              "model": args.model, "teacher": first, "teachers": {str(k): v for k, v in teachers.items()},
              "factors": args.factors, "epochs": args.epochs,
              "shock": shock(args.model, first, args.data_root), "runs": rows,
              "wall_seconds": time.perf_counter() - start}
    out = write_results(args.out, "gate_init", record, markdown(record))
    print(f"results in {out}/gate_init.{{json,md}}")
    return 0


MODEL_NAMES = {"resnet20": "ResNet-20", "lenet5": "LeNet-5"}


def read_back_note(runs: list[dict]) -> str:
    """Which runs this invocation read from folders that an earlier one finished (with the code of
    that time: the git state above is this invocation's)."""
    back = [x for x in runs if x.get("read_back")]
    if not back:
        return ""
    dates = sorted(x["finished"] for x in back)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]} UTC"
    return (f" {len(back)} of {len(runs)} runs were read back from folders an earlier invocation finished ({span}), "
            "with the code of that time; the git state above is this page's.")


def markdown(r: dict) -> str:
    model = MODEL_NAMES.get(r.get("model", "resnet20"), r.get("model"))
    factors = r.get("factors") or [r["factor"]]
    shared = len(set(r.get("teachers", {"0": r["teacher"]}).values())) == 1
    teacher = (f"teacher `{r['teacher']}` (test {100 * r['runs'][0]['unpruned_test_accuracy']:.2f} %)" if shared
               else "one teacher per seed, trained on the seed's own split")
    lines = [f"# Where BAR's gates start on a trained {model}", "", f"Command: `{r['command']}`", "",
             f"{model} on full Fashion-MNIST, FLOP budget {', '.join(f'{f:g}×' for f in factors)}, {teacher}. Each "
             f"run: {r['epochs']} prune epochs, fine-tune 1 + 1, 5000 training images held out for validation (chosen "
             f"from the seed), the library's defaults otherwise. git {r['git']}"
             + (f" (uncommitted: {', '.join(r['uncommitted_src'])})" if r["uncommitted_src"] else "") + "."
             + read_back_note(r["runs"]), "",
             f"**The shock**: the teacher's (`{r['teacher']}`) accuracy with BAR's gates sampled as in a training "
             "step, before any step, and how often its top-1 class is the ungated teacher's:", "",
             "| initial log α | accuracy | agreement |", "|---|---:|---:|"]
    for s in r["shock"]:
        label = "no gates" if s["gate_init"] is None else f"{s['gate_init']:g}"
        agreement = f"{100 * s['agreement']:.1f} %" if "agreement" in s else "–"
        lines.append(f"| {label} | {100 * s['accuracy']:.1f} % | {agreement} |")
    for factor in factors:
        runs = [x for x in r["runs"] if x.get("factor", factor) == factor]
        inits = sorted({x["gate_init"] for x in runs})
        by = {g: [x for x in runs if x["gate_init"] == g] for g in inits}
        lines += ["", f"**The runs at {factor:g}×** (mean ± standard deviation over the seeds; validation decides):", "",
                  "| initial log α | seeds | val % after each prune epoch | val % after pruning | val % final | "
                  "test % final | FLOPs ÷ budget |", "|---|---|---|---:|---:|---:|---:|"]
        for g, xs in by.items():
            epochs = " / ".join(f"{100 * v:.1f}" for v in xs[0]["prune_epochs_val_accuracy"]) + \
                (f" (seed {xs[0]['seed']})" if len(xs) > 1 else "")
            lines.append(f"| {g:g} | {', '.join(str(x['seed']) for x in xs)} | {epochs} | "
                         f"{format_mean_std([100 * x['val_accuracy_after_prune'] for x in xs])} | "
                         f"{format_mean_std([100 * x['val_accuracy'] for x in xs])} | "
                         f"{format_mean_std([100 * x['test_accuracy'] for x in xs])} | "
                         + ", ".join(f"{x['flops_over_budget']:.3f}" for x in xs) + " |")
        finals = {g: [100 * x["val_accuracy"] for x in xs] for g, xs in by.items() if len(xs) > 1}
        if len(finals) >= 2:
            best = max(finals, key=lambda g: sum(finals[g]) / len(finals[g]))
            verdicts = [f"log α {g:g}: " + ("a tie" if tie(finals[best], v) else "behind by more than two standard errors")
                        for g, v in finals.items() if g != best]
            lines += ["", f"Best final validation: log α {best:g}; " + "; ".join(verdicts) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
