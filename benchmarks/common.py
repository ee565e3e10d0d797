"""What the benchmark scripts share: their common options, the record of how a result was
made (command, schedule, machine), and a random training subset."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run_arguments(description: str, model: str, work: str, teacher: int, prune: int, finetune: int,
                  lowlr: int) -> argparse.ArgumentParser:
    """A parser with the options every benchmark run has (data, model, schedule, folders)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default=model)
    p.add_argument("--teacher-epochs", type=int, default=teacher)
    p.add_argument("--epochs", type=int, default=prune)
    p.add_argument("--finetune-epochs", type=int, default=finetune)
    p.add_argument("--lowlr-epochs", type=int, default=lowlr)
    p.add_argument("--train-subset", type=int, default=0, help="train on this many images (0: all)")
    p.add_argument("--work", default=str(HERE.parent / "runs" / work))
    p.add_argument("--out", default=str(RESULTS))
    return p


def run_record(script: str, args, argv) -> dict:
    """The command that made a result, its model, data, schedule and machine."""
    return {"command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model, "data": args.data,
            "epochs": {"teacher": args.teacher_epochs, "prune": args.epochs, "finetune": args.finetune_epochs,
                       "lowlr": args.lowlr_epochs},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}}


def record_header(r: dict, title: str, setup: str) -> list[str]:
    """The first lines of a results page: title, the command, ``setup``, the epochs of the
    schedule, the machine and the wall time (``r`` as :func:`run_record` made it)."""
    e = r["epochs"]
    return [f"# {title}", "", f"Command: `{r['command']}`", "",
            f"{setup} Epochs: teacher {e['teacher']}, prune {e['prune']}, fine-tune {e['finetune']} + {e['lowlr']} "
            f"at lr/10. Machine: {r['machine']}. Wall time {r['wall_seconds'] / 60:.1f} min.", ""]


def random_subset(ds, n: int, seed: int = 0):
    """``n`` random images of ``ds`` (all of them for n ≤ 0)."""
    if n <= 0 or n >= len(ds):
        return ds
    return ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n])


def source_state() -> tuple[str, list[str]] | None:
    """The commit this checkout is at and the files of ``src/budgetprune`` that differ from it
    (the code a benchmark ran), or None without git."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/budgetprune"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head, [line[3:] for line in dirty if line.strip()]


def pruning_steps(model, pruner, optimizer, x, y, steps: int) -> None:
    """The README's loop on one batch: cross-entropy + the pruner's penalty, step, the pruner's step."""
    import torch.nn.functional as F
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()


def write_results(out: str | Path, name: str, record: dict, page: str) -> Path:
    """Write ``<name>.json`` (the record) and ``<name>.md`` (the page) into the results folder
    ``out``, atomically; returns the folder."""
    from budgetprune import io

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / f"{name}.json", record)
    io.write_text(out / f"{name}.md", page if page.endswith("\n") else page + "\n")
    return out
