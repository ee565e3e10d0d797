"""What a Pruner adds to a user's training step: the same loop with and without it, in one run.

Two copies of the same network (same initial weights) train on the same random batches with
SGD; one loop is plain (forward, cross-entropy, backward, step), the other adds
``pruner.penalty()`` to the loss and calls ``pruner.step()`` (the README's three lines). Steps
are timed in interleaved rounds (the order alternates each round, after warm-up steps) and the
medians compared, so a machine that slows down during the run slows both loops alike.

    python benchmarks/pruner_overhead.py                             # ResNet-50, batch 16, 64 px, BAR
    python benchmarks/pruner_overhead.py --methods bar,bar/batch --rounds 7    # gates per example, per batch
    python benchmarks/pruner_overhead.py --methods bar,l0,cs --size 96 --rounds 7
    python benchmarks/pruner_overhead.py --methods bar --profile 5    # and where the added time goes

A method written ``name/batch`` samples its gates once per batch (``Pruner(gate_sample="batch")``).

The memory allocator matters on CPU at large inputs: with glibc's defaults each buffer over 32 MiB
is a fresh ``mmap`` whose pages fault in on first touch, so a step that writes a few more feature
maps (the gates' products) pays those faults too. The record names the allocator settings of the
run (``MALLOC_*``, ``LD_PRELOAD``); at 224 px compare a run with the defaults to one that keeps
freed buffers for reuse::

    python benchmarks/pruner_overhead.py --size 224 --rounds 9
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/pruner_overhead.py --size 224 --rounds 9
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
        python benchmarks/pruner_overhead.py --size 224 --rounds 9

Writes ``benchmarks/results/pruner_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, allocator_settings, interleaved_steps, method_and_sample, training_step  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune import Pruner  # noqa: E402


def measure(args, method: str) -> dict:
    torch.manual_seed(0)
    make = lambda: budgetprune.create_model(args.model, in_channels=3, num_classes=10,  # noqa: E731
                                            input_size=(args.size, args.size))
    plain_model = make()
    pruned_model = make()
    pruned_model.load_state_dict(plain_model.state_dict())
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    total = args.warmup + args.rounds * args.steps
    build = time.perf_counter()
    name, sample = method_and_sample(method)
    pruner = Pruner(pruned_model, x, args.budget, method=name, total_steps=10 * total, gate_sample=sample)
    build = time.perf_counter() - build
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9)
    pruned_opt = torch.optim.SGD(pruner.parameters(lr=1e-3), lr=1e-3, momentum=0.9)
    times, _ = interleaved_steps({"plain": lambda: training_step(plain_model, plain_opt, x, y),
                                  "pruned": lambda: training_step(pruned_model, pruned_opt, x, y, pruner)},
                                 args.rounds, args.steps, args.warmup)
    plain, pruned = times["plain"], times["pruned"]
    p_med, q_med = statistics.median(plain), statistics.median(pruned)
    row = {"method": method, "plain_step_s": p_med, "pruned_step_s": q_med, "ratio": q_med / p_med,
           "plain_steps": plain, "pruned_steps": pruned, "pruner_build_s": build,
           "groups": len(pruner.graph.groups)}
    if args.profile:
        row["profile"] = added_operations(lambda: training_step(plain_model, plain_opt, x, y),
                                          lambda: training_step(pruned_model, pruned_opt, x, y, pruner),
                                          args.profile)
    return row


def operation_times(step, steps: int) -> dict[str, tuple[float, float]]:
    """Per operator, its self CPU milliseconds and calls per step, over ``steps`` steps under
    ``torch.profiler`` (forward, backward and the optimizer's step)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}


def added_operations(plain_step, pruned_step, steps: int, top: int = 15) -> dict:
    """Where the pruner's added time goes: both loops profiled for ``steps`` steps each (plain
    first), the profiled step totals, and the ``top`` operators whose self time per step grew
    most (ms and calls per step, in each loop). The profiler's own cost per call inflates small
    operations, so the totals differ from the timed medians; the shares are what it is for."""
    plain, pruned = operation_times(plain_step, steps), operation_times(pruned_step, steps)
    for name in set(plain) | set(pruned):  # an operator one loop never ran: 0 ms in 0 calls there
        plain.setdefault(name, (0.0, 0))
        pruned.setdefault(name, (0.0, 0))
    grow = {n: pruned[n][0] - plain[n][0] for n in plain}
    rows = [{"op": n, "added_ms": grow[n], "plain_ms": plain[n][0], "pruned_ms": pruned[n][0],
             "plain_calls": plain[n][1], "pruned_calls": pruned[n][1]}
            for n in sorted(grow, key=lambda n: -grow[n])[:top]]
    return {"steps": steps, "plain_ms": sum(v[0] for v in plain.values()),
            "pruned_ms": sum(v[0] for v in pruned.values()),
            "plain_calls": sum(v[1] for v in plain.values()), "pruned_calls": sum(v[1] for v in pruned.values()),
            "top": rows}


def profile_lines(row: dict) -> list[str]:
    """The page's table of where a method's added time went (``--profile``)."""
    p = row["profile"]
    lines = ["", f"### Where `{row['method']}` adds time (torch.profiler, {p['steps']} steps of each loop)", "",
             f"Self CPU time per step: plain {p['plain_ms']:.1f} ms in {p['plain_calls']:.0f} operator calls, with "
             f"the pruner {p['pruned_ms']:.1f} ms in {p['pruned_calls']:.0f} (+{p['pruned_ms'] - p['plain_ms']:.1f} ms, "
             f"+{p['pruned_calls'] - p['plain_calls']:.0f} calls). The operators whose time grew most (the profiler's "
             "cost per call inflates small ones; a difference of a few ms in the convolutions is noise):", "",
             "| operator | added ms per step | plain ms | with the pruner ms | calls per step (plain → with) |",
             "|---|---:|---:|---:|---|"]
    for t in p["top"]:
        lines.append(f"| `{t['op']}` | {t['added_ms']:+.2f} | {t['plain_ms']:.2f} | {t['pruned_ms']:.2f} | "
                     f"{t['plain_calls']:.0f} → {t['pruned_calls']:.0f} |")
    return lines


def allocation(env: dict) -> str:
    """The allocator settings in words, for the results page."""
    if not env:
        return "glibc's defaults (buffers over 32 MiB are fresh mmaps, their pages faulted in on first touch)"
    return ", ".join(f"`{k}={v}`" for k, v in env.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--methods", default="bar")
    p.add_argument("--budget", default="flops=0.5")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per loop per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps of each loop and list the operators that grew")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.profile < 0:
        p.error(f"--profile takes a number of steps, 0 or more (got {args.profile})")
    start = time.perf_counter()
    rows = []
    for method in args.methods.split(","):
        row = measure(args, method)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_steps")}), flush=True)
        rows.append(row)
    env = allocator_settings()
    record = {"command": " ".join([f"{k}={v}" for k, v in env.items()] + ["python benchmarks/pruner_overhead.py"]
                                  + (sys.argv[1:] if argv is None else argv)),
              "allocator": env or "glibc defaults",
              "model": args.model, "batch": args.batch, "size": args.size, "budget": args.budget,
              "rounds": args.rounds, "steps_per_round": args.steps, "device": "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - start, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruner_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# A Pruner inside a plain training loop: step time with and without it", "",
             f"Command: `{record['command']}`", "",
             f"{args.model}, batch {args.batch}, {args.size} px, CPU, torch {record['torch']}, {record['threads']} "
             f"threads; budget `{args.budget}`; medians of {args.rounds} interleaved rounds of {args.steps} steps per "
             f"loop after {args.warmup} warm-up steps; memory allocator: {allocation(env)}; wall time "
             f"{record['wall_seconds'] / 60:.1f} min.", "",
             "| method | plain step (s) | step with the pruner (s) | ratio | channel groups | pruner build (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['plain_step_s']:.3f} | {r['pruned_step_s']:.3f} | {r['ratio']:.3f} | "
                     f"{r['groups']} | {r['pruner_build_s']:.1f} |")
    for r in rows:
        if "profile" in r:
            lines += profile_lines(r)
    (out / "pruner_overhead.md").write_text("\n".join(lines + [""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
