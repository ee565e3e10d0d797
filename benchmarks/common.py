"""What the benchmark scripts share: their common options, the record of how a result was
made (command, schedule, machine), a seeded new model, a random training subset, and timed training steps and
forward passes interleaved so that a machine that slows down slows every contender alike."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


class Parser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def name_list(text: str, known: list[str], what: str) -> list[str]:
    """The comma-separated names of ``text``, each one of ``known`` (an argparse type)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(known)}")
    return names


def number_list(kind, text: str, what: str, low: float = float("-inf")) -> list:
    """The comma-separated numbers of ``text`` (a trailing ``x`` dropped: ``2x``), each of type
    ``kind`` and above ``low`` (an argparse type)."""
    try:
        values = [kind(v.strip().removesuffix("x")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, not {text!r}") from None
    if not values or any(v <= low for v in values):
        raise argparse.ArgumentTypeError(f"expected {what} above {low:g}, not {text!r}")
    return values


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
            "machine": machine()}


def cpu_name() -> str | None:
    """The processor's model name (from /proc/cpuinfo; Python's guess elsewhere)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                 if line.startswith("model name")), platform.processor() or None)


def machine(device: torch.device | None = None) -> dict:
    """Python, torch, torch's threads and the processor; with a ``device``, the CPU's model name
    and, for CUDA, the GPU's."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    if device is not None:
        out["cpu"] = cpu_name()
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out


def allocator_settings() -> dict[str, str]:
    """The environment that decides how this process allocates memory: glibc's ``MALLOC_*``
    tunables and ``LD_PRELOAD`` (jemalloc, tcmalloc). With glibc's defaults every buffer over
    32 MiB is a fresh ``mmap`` whose pages fault in on first touch, which on CPU makes a step's
    time depend on how many such buffers it allocates (``benchmarks/pruner_overhead.py``)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD"}


def finetune_words(finetune: int, lowlr: int) -> str:
    """How a page names the fine-tune stage: with the default recipe (cosine) one schedule anneals over
    the fine-tune and low-rate epochs together; only ``--lr-schedule constant`` runs the last at lr/10."""
    return (f"fine-tune {finetune} + {lowlr} (one cosine schedule over both, the default recipe; "
            f"with a constant schedule the last {lowlr} at lr/10)")


def record_header(r: dict, title: str, setup: str) -> list[str]:
    """The first lines of a results page: title, the command, ``setup``, the epochs of the
    schedule, the machine and the wall time (``r`` as :func:`run_record` made it)."""
    e = r["epochs"]
    return [f"# {title}", "", f"Command: `{r['command']}`", "",
            f"{setup} Epochs: teacher {e['teacher']}, prune {e['prune']}, {finetune_words(e['finetune'], e['lowlr'])}. "
            f"Machine: {r['machine']}. Wall time {r['wall_seconds'] / 60:.1f} min.", ""]


def seeded_model(name: str, seed: int, in_channels: int, num_classes: int, input_size) -> torch.nn.Module:
    """A registry model with the initial weights ``budgetprune prune --seed seed`` gives it."""
    from budgetprune.models import create_model
    from budgetprune.seeding import seed_model_init
    seed_model_init(seed)
    return create_model(name, in_channels=in_channels, num_classes=num_classes, input_size=tuple(input_size))


def train_teacher(name: str, seed: int, train, test, info, epochs: int, folder: Path,
                  log: Callable[[str], None] = print) -> tuple[Path, float]:
    """A registry model's teacher trained by budgetprune's own teacher stage in ``folder`` (or the one
    a finished or interrupted run left there): its file and its accuracy on ``test``."""
    from budgetprune.pipeline import PruneConfig, PruneRun
    cfg = PruneConfig(model=name, teacher_epochs=epochs, seed=seed, progress=False)
    run = PruneRun(seeded_model(name, seed, info.in_channels, info.num_classes, info.image_size), train, test, cfg,
                   folder, log=log)
    run.train_teacher(resume=True)
    return Path(folder) / "teacher.pt", run.unpruned_accuracy


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


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has done the work queued on it (CUDA runs asynchronously; a CPU
    has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_and_sample(label: str) -> tuple[str, str]:
    """A benchmark's method label, ``name`` or ``name/batch`` (gates sampled once per batch), as
    the Pruner's ``(method, gate_sample)``."""
    name, _, sample = label.partition("/")
    return name, sample or "example"


def training_step(model, optimizer, x, y, pruner=None) -> float:
    """One step of the README's loop on one batch, its wall seconds: cross-entropy (+ the
    pruner's penalty), backward, the optimizer's step (then the pruner's); the device is
    synchronised before and after, so the time is the step's on a GPU too."""
    import torch.nn.functional as F
    synchronize(x.device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    if pruner is not None:
        loss = loss + pruner.penalty()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if pruner is not None:
        pruner.step()
    synchronize(x.device)
    return time.perf_counter() - start


def pruning_steps(model, pruner, optimizer, x, y, steps: int) -> None:
    """The README's loop on one batch: cross-entropy + the pruner's penalty, step, the pruner's step."""
    for _ in range(steps):
        training_step(model, optimizer, x, y, pruner)


@torch.no_grad()
def inference_call(model, x) -> float:
    """Wall seconds of one forward pass of ``model`` (in the mode it is in) on ``x``, without
    gradients, the device synchronised before and after."""
    synchronize(x.device)
    start = time.perf_counter()
    model(x)
    synchronize(x.device)
    return time.perf_counter() - start


def interleaved_steps(contenders: dict[str, Callable[[], float]], rounds: int, per_turn: int, warmup: int = 0,
                      run: Callable | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time several contenders in one run. ``contenders`` maps a name to a function that does one step
    and returns its seconds (:func:`training_step`, :func:`inference_call`). First ``warmup``
    untimed steps of each (interleaved); then ``rounds`` rounds in which each contender takes a
    turn of ``per_turn`` steps in a row, the order rotating every round (with two contenders it
    alternates), so a machine that slows down during the run slows all alike. ``run`` runs each
    turn and may repeat it (``Quiet.run``: ``(result, others' CPU share, attempts)``).

    Returns (per name the seconds of every timed step, per name the others' CPU share in each turn)."""
    names = list(contenders)
    run = run or (lambda turn: (turn(), 0.0, 1))
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times = {name: [] for name in names}
    shares = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            seconds, share, _ = run(lambda step=contenders[name]: [step() for _ in range(per_turn)])
            times[name].extend(seconds)
            shares[name].append(share)
    return times, shares


def write_results(out: str | Path, name: str, record: dict, page: str) -> Path:
    """Write ``<name>.json`` (the record) and ``<name>.md`` (the page) into the results folder
    ``out``, atomically; returns the folder."""
    from budgetprune import io

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / f"{name}.json", record)
    io.write_text(out / f"{name}.md", page if page.endswith("\n") else page + "\n")
    return out


def padding_label(padding: list | None, pad_tied: bool | None = None) -> str:
    """A short name for the padding a finalize kept (its report's ``padding``: multiple, min_width,
    min_area, min_kept; ``pad_tied`` False: tied channels left exact): ``8 in maps ≥ 32 ch``,
    ``8 where ≥ 32 ch kept``, ``×16``, ``×8, tied exact``, ``exact``; ``–`` for a result that does
    not record it (before the auto padding)."""
    if not padding:
        return "–"
    multiple, min_width, _, min_kept = padding
    if multiple <= 1:
        return "exact"
    tied = ", tied exact" if pad_tied is False else ""
    if min_width:
        return f"{multiple} in maps ≥ {min_width} ch{tied}"
    if min_kept:
        return f"{multiple} where ≥ {min_kept} ch kept{tied}"
    return f"×{multiple}{tied}"

