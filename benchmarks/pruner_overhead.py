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
    python benchmarks/pruner_overhead.py --plain-product    # and the same pruner without in-place products
    python benchmarks/pruner_overhead.py --constant-gates   # and the products alone (no sampling, purge, penalty)

A method written ``name/batch`` samples its gates once per batch (``Pruner(gate_sample="batch")``).

The memory allocator matters on CPU at large inputs: with glibc's defaults each buffer over 32 MiB
is a fresh ``mmap`` whose pages fault in on first touch, so a step that writes a few more feature
maps (the gates' products) pays those faults too. A Pruner on the CPU asks glibc to keep freed
buffers for reuse (``cpu_buffers="keep"``, its default; :mod:`budgetprune.cpu_allocator`); it is
built before either loop's first step, so both loops of a run share the setting.
``--cpu-buffers system`` leaves glibc's defaults. The record names the allocator of the run
(``MALLOC_*``, ``LD_PRELOAD``, the pruner's setting); at 224 px compare::

    python benchmarks/pruner_overhead.py --size 224 --rounds 9
    python benchmarks/pruner_overhead.py --size 224 --rounds 9 --cpu-buffers system
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
        python benchmarks/pruner_overhead.py --size 224 --rounds 9

Writes ``benchmarks/results/pruner_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, allocator_settings, interleaved_steps, method_and_sample, training_step  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune import Pruner, attach, cpu_allocator  # noqa: E402


def forward_memory_mib(model, x, y, pruner=None) -> float:
    """MiB a training forward pass (and the penalty) leaves allocated at its end: what autograd
    keeps for the backward pass, whoever holds it, plus the loss; from ``torch.profiler``'s
    memory events (allocations minus frees of every operator of the pass)."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = F.cross_entropy(model(x), y)
        if pruner is not None:
            loss = loss + pruner.penalty()
    net = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)  # inclusive of children
    del loss
    return net / 2 ** 20


def measure(args, method: str) -> dict:
    torch.manual_seed(0)
    def make():
        model = budgetprune.create_model(args.model, in_channels=3, num_classes=10, input_size=(args.size, args.size))
        for module in model.modules():
            if args.relu_inplace and isinstance(module, torch.nn.ReLU):
                module.inplace = True
        return model

    plain_model = make()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    total = args.warmup + args.rounds * args.steps
    name, sample = method_and_sample(method)

    def pruned_loop(out_of_place: bool = False):
        model = make()
        model.load_state_dict(plain_model.state_dict())
        build = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if out_of_place:  # every per-example gate product autograd's own, as before the in-place one
                stack.enter_context(mock.patch.object(attach, "in_place_gate_host", lambda graph, host: False))
            pruner = Pruner(model, x, args.budget, method=name, total_steps=10 * total, gate_sample=sample,
                            cpu_buffers=args.cpu_buffers)
        build = time.perf_counter() - build
        opt = torch.optim.SGD(pruner.parameters(lr=1e-3), lr=1e-3, momentum=0.9)
        return model, pruner, build, lambda: training_step(model, opt, x, y, pruner)

    pruned_model, pruner, build, pruned_step = pruned_loop()
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9)
    loops = {"plain": lambda: training_step(plain_model, plain_opt, x, y), "pruned": pruned_step}
    memory = {"plain": forward_memory_mib(plain_model, x, y),
              "pruned": forward_memory_mib(pruned_model, x, y, pruner)}
    if args.plain_product:
        other_model, other, _, loops["plain_product"] = pruned_loop(out_of_place=True)
        memory["plain_product"] = forward_memory_mib(other_model, x, y, other)
    if args.constant_gates:
        constant_model = make()
        constant_model.load_state_dict(plain_model.state_dict())
        gates = constant_gates(constant_model, pruner, args.batch)
        constant_opt = torch.optim.SGD([*constant_model.parameters(), *gates], lr=1e-3, momentum=0.9)
        loops["constant_gates"] = lambda: training_step(constant_model, constant_opt, x, y)
    times, _ = interleaved_steps(loops, args.rounds, args.steps, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"method": method, "plain_step_s": med["plain"], "pruned_step_s": med["pruned"],
           "ratio": med["pruned"] / med["plain"], "plain_steps": times["plain"], "pruned_steps": times["pruned"],
           "pruner_build_s": build, "groups": len(pruner.graph.groups),
           "in_place_products": len(pruner.method._hooks.in_place), "cpu_buffers_kept": pruner.cpu_buffers_kept,
           "forward_mib": memory}
    if args.plain_product:
        row.update(plain_product_step_s=med["plain_product"], plain_product_ratio=med["plain_product"] / med["plain"],
                   plain_product_steps=times["plain_product"])
    if args.constant_gates:
        row.update(constant_gates_step_s=med["constant_gates"], constant_gates_ratio=med["constant_gates"] / med["plain"],
                   constant_gates_steps=times["constant_gates"])
    if args.profile:
        row["profile"] = added_operations(loops["plain"], pruned_step, args.profile)
    return row


def constant_gates(model, pruner, batch: int) -> list[torch.Tensor]:
    """A trainable per-example gate (batch, C, 1, ...) of fixed random values multiplied, by a
    forward hook, into ``model``'s output of every channel group of ``pruner`` at the group's gate
    site: the gated maps' products and their gradients, without the pruner's sampling, purge and
    penalty. Returns the gates (for the optimizer)."""
    modules = dict(model.named_modules())
    gates = []
    for group in pruner.graph.groups.values():
        if group.position != "output":
            continue
        z = torch.rand(batch, group.channels, requires_grad=True)
        gates.append(z)
        site = modules[attach.gate_site(pruner.graph, group.host)]
        site.register_forward_hook(lambda module, inputs, out, z=z, dim=group.dim:
                                   out * attach._broadcast(z, out, dim=dim))
    return gates


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
             f"the pruner {p['pruned_ms']:.1f} ms in {p['pruned_calls']:.0f} ({p['pruned_ms'] - p['plain_ms']:+.1f} ms, "
             f"{p['pruned_calls'] - p['plain_calls']:+.0f} calls). The operators whose time grew most (the profiler's "
             "cost per call inflates small ones; a difference of a few ms in the convolutions is noise):", "",
             "| operator | added ms per step | plain ms | with the pruner ms | calls per step (plain → with) |",
             "|---|---:|---:|---:|---|"]
    for t in p["top"]:
        lines.append(f"| `{t['op']}` | {t['added_ms']:+.2f} | {t['plain_ms']:.2f} | {t['pruned_ms']:.2f} | "
                     f"{t['plain_calls']:.0f} → {t['pruned_calls']:.0f} |")
    return lines


def allocation(env: dict, kept: bool) -> str:
    """The allocator settings in words, for the results page."""
    if kept:
        return ("glibc with freed buffers kept for reuse (the Pruner's default `cpu_buffers=\"keep\"`, set as the "
                "first pruner was built, before either loop's first step)")
    if not env:
        return ("glibc's defaults (`--cpu-buffers system`: buffers over 32 MiB are fresh mmaps, their pages "
                "faulted in on first touch)")
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
    p.add_argument("--relu-inplace", action="store_true",
                   help="make every nn.ReLU of the model work in place, as torchvision's and timm's do")
    p.add_argument("--plain-product", action="store_true",
                   help="time a third loop, the same pruner with every per-example gate product out of place "
                        "(autograd's product, which keeps the feature map for backward)")
    p.add_argument("--constant-gates", action="store_true",
                   help="time another loop: the plain model with a fixed per-example gate multiplied into each "
                        "group's output (the products and their gradients alone)")
    p.add_argument("--cpu-buffers", choices=cpu_allocator.CHOICES, default="keep",
                   help="the pruners' cpu_buffers: glibc keeps freed buffers for reuse (keep, the default) or the "
                        "allocator is left as the process has it (system)")
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
    kept = any(r["cpu_buffers_kept"] for r in rows)
    record = {"command": " ".join([f"{k}={v}" for k, v in env.items()] + ["python benchmarks/pruner_overhead.py"]
                                  + (sys.argv[1:] if argv is None else argv)),
              "allocator": allocation(env, kept),
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
             f"loop after {args.warmup} warm-up steps; memory allocator: {record['allocator']}; wall time "
             f"{record['wall_seconds'] / 60:.1f} min.", "",
             "Kept for backward: the MiB one training forward pass leaves allocated at its end (torch.profiler's "
             "memory events: what autograd keeps for the backward pass, and the loss)."
             + (" Every ReLU of the model works in place (`--relu-inplace`)." if args.relu_inplace else "")
             + " In place: the channel groups whose per-example gate product is written into "
             "the host's output (a ReLU that works in place reads it; `budgetprune.gate_product`)."
             + (" Plain product: a third loop in the same run, the same pruner with every product out of place."
                if args.plain_product else "")
             + (" Constant gates: another loop in the same run, the plain network with a fixed per-example gate "
                "multiplied into every gated output (`--constant-gates`: the products and their gradients, without "
                "the pruner's sampling, purge and penalty)." if args.constant_gates else ""), "",
             "| method | plain step (s) | step with the pruner (s) | ratio | channel groups | in place | "
             "kept for backward, plain → with the pruner (MiB) | pruner build (s) |"
             + (" plain product: step (s), ratio, kept (MiB) |" if args.plain_product else "")
             + (" constant gates: step (s), ratio |" if args.constant_gates else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if args.plain_product else "")
             + ("---|" if args.constant_gates else "")]
    for r in rows:
        m = r["forward_mib"]
        line = (f"| {r['method']} | {r['plain_step_s']:.3f} | {r['pruned_step_s']:.3f} | {r['ratio']:.3f} | "
                f"{r['groups']} | {r['in_place_products']} | {m['plain']:.0f} → {m['pruned']:.0f} | "
                f"{r['pruner_build_s']:.1f} |")
        if args.plain_product:
            line += f" {r['plain_product_step_s']:.3f}, {r['plain_product_ratio']:.3f}, {m['plain_product']:.0f} |"
        if args.constant_gates:
            line += f" {r['constant_gates_step_s']:.3f}, {r['constant_gates_ratio']:.3f} |"
        lines.append(line)
    for r in rows:
        if "profile" in r:
            lines += profile_lines(r)
    (out / "pruner_overhead.md").write_text("\n".join(lines + [""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
