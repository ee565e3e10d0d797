"""Torch-Pruning side by side: the same torchvision models and 2x FLOP target as torchvision_models.py.

Torch-Pruning (github.com/VainF/Torch-Pruning, PyPI ``torch-pruning``) prunes channels to a
*channel ratio*, not to a resource budget: a FLOP target is met by trying ratios. For each model
of ``FAMILIES`` (built by torchvision_models.py's ``make``: untrained, ``num_classes=10``, the same
input size rule, ``torch.manual_seed(0)``, CPU) this script records two Torch-Pruning runs:

* iterative — the way Torch-Pruning's own benchmark (``reproduce/main.py``, ``progressive_pruning``)
  meets a speed-up: ``BasePruner`` (``MagnitudePruner``/``MetaPruner`` are its deprecated aliases)
  with ``GroupMagnitudeImportance(p=2)``, local (per-layer) ranking, ``pruning_ratio=1.0`` spread
  over ``--steps`` iterative steps (each step removes another 1/steps of every layer's channels),
  stopping at the first step whose FLOPs (``tp.utils.count_ops_and_params``) are at or under
  ``--target`` of the original: the closest Torch-Pruning lands on the target from above;
* one-shot — ``pruning_ratio = 1 - sqrt(target)`` (1 - 1/sqrt(2) = 0.293 for 2x FLOPs: both the
  in- and out-channels of a layer shrink by the ratio), one step, as users typically pick it.

The final classifier layer is ignored (never pruned). Attention is handled as Torch-Pruning's
examples do: torchvision's ViT gets channel groups of ``num_heads`` for its ``nn.MultiheadAttention``
layers (``out_channel_groups``, the example's deprecated ``channel_groups``; passing them as
``num_heads`` instead makes 1.6.1 skip the hidden-size group, so the ViT could only shrink its MLPs)
and ``model.hidden_dim`` is reset after every step (examples/torchvision_models); MaxViT and Swin get
``num_heads`` for their qkv linear layer, and MaxViT's ``head_dim`` attribute is reset after every
step (as examples/transformers/prune_timm_vit.py does for timm's Attention). No forward method is
rewritten.

"TP prunable share" is the share of conv/linear output channels (all but the classifier's, the
same denominator as torchvision_models.py's "prunable channels") of layers whose output channels
appear in one of Torch-Pruning's pruning groups (``DG.get_all_groups``, out-channel handlers),
i.e. what its dependency graph could prune (``nn.MultiheadAttention``'s pruner also prunes its
``out_proj``); "removed" is the share of all those conv/linear output channels (prunable or not) that
the iterative run actually removed. Three counters are recorded for the unpruned and the pruned
model: Torch-Pruning's (``count_ops_and_params``: module hooks, conv/linear MACs plus bias,
BatchNorm, LayerNorm, activations, pooling, ``nn.MultiheadAttention``; a functional ``F.linear``
or matmul outside such a module is not seen), budgetprune's (``resource_report`` of a
``ChannelGraph``: conv/linear MACs of the layers its graph holds) and ``torch.utils.flop_counter``'s
("aten": the MACs of every convolution and matrix product torch runs, the reference).

    .venv/bin/pip install -c constraints.txt torch-pruning==1.6.1      # the `bench` extra; keeps torch 2.13.0
    python benchmarks/peer_torch_pruning.py                            # every family, 64 px, 2x FLOPs
    python benchmarks/peer_torch_pruning.py --models resnet18,vit_b_16 --out /tmp/tp

Writes ``benchmarks/results/peer_torch_pruning.{json,md}``. A model that fails (an exception, or
past ``--timeout`` seconds, past ``--graph-timeout`` seconds building Torch-Pruning's dependency graph
and pruning groups, which do not end on some models, or past ``--max-memory-gb`` of resident memory)
is recorded with a one-line error; the script goes on to the next.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from peer import LAYERS, aten_macs, base_pruner, bp_count, budgetprune_state, layers, outputs, version  # noqa: E402
from torchvision_models import FAMILIES, SIZE_AT_LEAST, import_torchvision, make  # noqa: E402

from budgetprune.errors import first_line  # noqa: E402

class Limit(BaseException):
    """Past a time or memory limit: a BaseException, so that no per-stage `except Exception` swallows it."""


_LIMIT = {"text": ""}  # which limit the pending alarm stands for


def _alarm(signum, frame):
    raise Limit(_LIMIT["text"])


def _memory(signum, frame):
    raise Limit(_LIMIT["memory"])


def watch_memory(gigabytes: float) -> None:
    """Interrupt the main thread (SIGUSR1) whenever this process's resident memory passes ``gigabytes``:
    Torch-Pruning's group search grows without end on some models (swin_t: 24 GB within minutes)."""
    _LIMIT["memory"] = f"resident memory past {gigabytes:g} GB (--max-memory-gb)"
    signal.signal(signal.SIGUSR1, _memory)
    page, limit = os.sysconf("SC_PAGE_SIZE"), gigabytes * 2**30

    def loop():
        fired = False
        while True:
            time.sleep(0.5)
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            if rss > limit and not fired:
                os.kill(os.getpid(), signal.SIGUSR1)
            fired = rss > limit
    threading.Thread(target=loop, daemon=True).start()


def arm(seconds: int, text: str) -> None:
    _LIMIT["text"] = text
    signal.alarm(seconds)


GRAPH_TIMEOUT = {"seconds": 300}


def limited_graph(build_pruner):
    """Build a pruner under --graph-timeout (Torch-Pruning's group search does not end on some models),
    then give the run's own limit back."""
    left, start = signal.alarm(0), time.monotonic()
    text = _LIMIT["text"]
    arm(min(left, GRAPH_TIMEOUT["seconds"]) if left else GRAPH_TIMEOUT["seconds"],
        f"dependency graph and pruning groups not done in {GRAPH_TIMEOUT['seconds']} s (--graph-timeout)")
    try:
        return build_pruner()
    finally:
        signal.alarm(0)
        if left:
            arm(max(1, left - int(time.monotonic() - start)), text)


def attention_setup(model: nn.Module) -> tuple[dict, dict, callable]:
    """``num_heads`` and ``out_channel_groups`` for the pruner, and what to reset on the model after each step."""
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    from torchvision.models.vision_transformer import VisionTransformer

    num_heads, groups, fixes = {}, {}, []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):  # examples/torchvision_models: channel_groups, not num_heads
            groups[m] = m.num_heads
        elif isinstance(m, RelativePositionalMultiHeadAttention):
            num_heads[m.to_qkv] = m.n_heads
            fixes.append(lambda m=m: setattr(m, "head_dim", m.to_qkv.out_features // (3 * m.n_heads)))
        elif isinstance(m, ShiftedWindowAttention):
            num_heads[m.qkv] = m.num_heads
    if isinstance(model, VisionTransformer):
        fixes.append(lambda: setattr(model, "hidden_dim", model.conv_proj.out_channels))

    def fix():
        for f in fixes:
            f()
    return num_heads, groups, fix


def pruner_for(tp, model, x, ratio: float, steps: int):
    num_heads, groups, fix = attention_setup(model)
    pruner = base_pruner(tp, model, x, tp.importance.GroupMagnitudeImportance(p=2), ratio, steps,
                         num_heads=num_heads, in_channel_groups={}, out_channel_groups=groups)
    return pruner, fix


def tp_prunable(pruner, model) -> tuple[int, set]:
    """Output channels of conv/linear layers (classifier aside) in a Torch-Pruning group."""
    classifier = layers(model)[-1]
    seen = set()
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        for dep, _ in group:
            m = dep.target.module
            if not pruner.DG.is_out_channel_pruning_fn(dep.handler):
                continue
            if isinstance(m, nn.MultiheadAttention):  # its pruner also prunes out_proj's outputs
                m = m.out_proj
            if isinstance(m, LAYERS) and m is not classifier:
                seen.add(m)
    return sum(outputs(m) for m in seen), seen


def forward_ok(model, x) -> str | None:
    try:
        with torch.no_grad():
            out = model(x)
        if tuple(out.shape) != (x.shape[0], 10):
            return f"output shape {tuple(out.shape)}"
        if not torch.isfinite(out).all():
            return "non-finite output"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {first_line(exc, 200)}"
    return None


def error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc, 240)}"


def build(models, name, size):
    torch.manual_seed(0)
    model = make(models, name, size)
    x = torch.randn(4, 3, size, size)  # drawn right after the model, as torchvision_models.py does
    return model.eval(), x


def iterative(tp, models, name, size, target, steps, row):
    r: dict = {}
    row["iterative"] = r
    r["stage"] = "build"
    try:
        model, x = build(models, name, size)
        channels = sum(outputs(m) for m in layers(model)[:-1])
        before = {id(m): outputs(m) for m in layers(model)[:-1]}
        r["stage"] = "count"
        base_flops, base_params = tp.utils.count_ops_and_params(model, x)
        row.update(tp_flops=base_flops, tp_params=base_params, params=sum(p.numel() for p in model.parameters()))
        full, aten_full = bp_count(model, x), aten_macs(model, x)
        row.update(bp_full=full, aten_full=aten_full)
        if isinstance(aten_full, float):
            row["tp_over_aten_full"] = base_flops / aten_full
            if isinstance(full, dict):
                row["bp_over_aten_full"] = full["flops"] / aten_full
        r["stage"] = "dependency graph"
        pruner, fix = limited_graph(lambda: pruner_for(tp, model, x, 1.0, steps))
        prunable, _ = tp_prunable(pruner, model)
        row.update(tp_prunable_share=prunable / max(channels, 1), tp_prunable_channels=prunable, channels=channels)
        flops, params, previous = base_flops, base_params, None
        for step in range(1, steps + 1):
            r["stage"] = f"step {step}"
            pruner.step()
            fix()
            previous = base_flops / flops
            flops, params = tp.utils.count_ops_and_params(model, x)
            r.update(steps=step, channel_ratio=pruner.per_step_pruning_ratio[step], flops=flops, params=params,
                     flops_reduction=base_flops / flops, params_reduction=base_params / params,
                     previous_flops_reduction=previous)
            if flops <= target * base_flops:
                break
        else:
            r["note"] = f"did not reach the target in {steps} steps"
        r["stage"] = "forward"
        r["forward_error"] = forward_ok(model, x)
        r["forward"] = r["forward_error"] is None
        after = {id(m): outputs(m) for m in layers(model)[:-1]}
        r["channels_removed_share"] = sum(before[k] - after.get(k, 0) for k in before) / max(channels, 1)
        r["stage"] = "other counters"
        small, aten = bp_count(model, x), aten_macs(model, x)
        r.update(bp=small, aten=aten)
        if isinstance(full, dict) and isinstance(small, dict):
            r["bp_flops_reduction"] = full["flops"] / small["flops"]
        if isinstance(aten_full, float) and isinstance(aten, float):
            r["aten_flops_reduction"] = aten_full / aten
        del r["stage"]
    except Exception as exc:  # noqa: BLE001 - one model's failure is a result, not a crash
        r.update(failed_at=r.pop("stage"), error=error(exc))


def one_shot(tp, models, name, size, target, row):
    r: dict = {"pruning_ratio": 1 - math.sqrt(target)}
    row["one_shot"] = r
    r["stage"] = "build"
    try:
        model, x = build(models, name, size)
        base_flops, base_params = tp.utils.count_ops_and_params(model, x)
        r["stage"] = "dependency graph"
        pruner, fix = limited_graph(lambda: pruner_for(tp, model, x, r["pruning_ratio"], 1))
        r["stage"] = "step"
        pruner.step()
        fix()
        r["stage"] = "count"
        flops, params = tp.utils.count_ops_and_params(model, x)
        r.update(flops=flops, params=params, flops_reduction=base_flops / flops, params_reduction=base_params / params)
        r["stage"] = "forward"
        r["forward_error"] = forward_ok(model, x)
        r["forward"] = r["forward_error"] is None
        del r["stage"]
    except Exception as exc:  # noqa: BLE001
        r.update(failed_at=r.pop("stage"), error=error(exc))


def one(tp, models, name, size, target, steps, timeout) -> dict:
    row: dict = {"model": name, "size": size}
    start = time.perf_counter()
    for label, run in (("iterative", lambda: iterative(tp, models, name, size, target, steps, row)),
                       ("one_shot", lambda: one_shot(tp, models, name, size, target, row))):
        failed = row.get("iterative", {}).get("failed_at", "")
        if label == "one_shot" and failed.startswith(("build", "count", "dependency graph")):
            row["one_shot"] = {"failed_at": failed, "error": "not run: the iterative run failed before pruning, "
                                                             "and this one builds the same dependency graph"}
            continue
        arm(timeout, f"run not done in {timeout} s (--timeout)")
        try:
            run()
        except Limit as exc:  # past a limit, in whatever stage the run had reached
            r = row.setdefault(label, {})
            r.update(failed_at=f"{r.pop('stage', '?')} (limit)", error=str(exc))
        finally:
            signal.alarm(0)
    row["seconds"] = time.perf_counter() - start
    return row


def _red(r: dict) -> str:
    if "flops_reduction" not in r or "error" in r:
        return "– | –"
    return f"{r['flops_reduction']:.2f} | {r['params_reduction']:.2f}"


def notes(row: dict) -> str:
    out = []
    for label in ("iterative", "one_shot"):
        r = row.get(label, {})
        if "error" in r:
            out.append(f"{label.replace('_', '-')} failed at {r['failed_at']}: {r['error']}")
        if r.get("forward") is False:
            out.append(f"{label.replace('_', '-')} forward fails: {r['forward_error']}")
        if r.get("note"):
            out.append(f"{label.replace('_', '-')}: {r['note']}")
    it = row.get("iterative", {})
    if "steps" in it and "error" not in it:
        out.insert(0, f"{it['steps']} steps to channel ratio {it['channel_ratio']:.3f} (one step earlier "
                      f"{it['previous_flops_reduction']:.2f}x), removed {it['channels_removed_share']:.0%}")
    counted = [f"{label} {it[key]:.2f}x" for label, key in (("aten", "aten_flops_reduction"),
                                                               ("budgetprune", "bp_flops_reduction")) if key in it]
    if counted:
        out.append("iterative result by other counters: " + ", ".join(counted))
    if isinstance(it.get("bp"), str):
        out.append("budgetprune cannot count the pruned model")
    full = [f"{label} {row[key]:.2f}" for label, key in (("TP", "tp_over_aten_full"), ("budgetprune", "bp_over_aten_full"))
            if key in row]
    if full:
        out.append("full model's FLOPs over aten's: " + ", ".join(full))
    return "; ".join(out).replace("|", "/")


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | TP prunable share | iterative: FLOPs ÷ | params ÷ | one-shot: FLOPs ÷ | params ÷ | "
             "notes / error | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = (f"{r['tp_prunable_share']:.0%} ({r['tp_prunable_channels']}/{r['channels']})"
                 if "tp_prunable_share" in r else "–")
        lines.append(f"| {r['model']} | {share} | {_red(r.get('iterative', {}))} | {_red(r.get('one_shot', {}))} | "
                     f"{notes(r)} | {r['seconds']:.0f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(FAMILIES))
    p.add_argument("--size", type=int, default=64, help="input pixels (raised where an architecture needs more)")
    p.add_argument("--target", type=float, default=0.5, help="FLOPs to keep, as a share of the full model's")
    p.add_argument("--steps", type=int, default=200, help="iterative steps over pruning_ratio 1.0")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per model and run (iterative, one-shot)")
    p.add_argument("--graph-timeout", type=int, default=300,
                   help="seconds for Torch-Pruning's dependency graph and pruning groups (part of --timeout)")
    p.add_argument("--max-memory-gb", type=float, default=8.0, help="stop a run past this resident memory")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    models = import_torchvision()
    import torch_pruning as tp
    signal.signal(signal.SIGALRM, _alarm)
    GRAPH_TIMEOUT["seconds"] = args.graph_timeout
    watch_memory(args.max_memory_gb)
    rows, start = [], time.perf_counter()
    for name in args.models.split(","):
        row = one(tp, models, name, max(args.size, SIZE_AT_LEAST.get(name, 0)), args.target, args.steps,
                  args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    record = {"command": "python benchmarks/peer_torch_pruning.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "target": args.target, "steps": args.steps, "torch": torch.__version__,
              "torch_pruning": version("torch-pruning"),
              "torch_pruning_module_version": getattr(tp, "__version__", None),  # 1.6.1's says 1.6.0
              "threads": torch.get_num_threads(), "budgetprune": budgetprune_state(),
              "wall_seconds": time.perf_counter() - start, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_torch_pruning.json").write_text(json.dumps(record, indent=2) + "\n")
    page = ["# Torch-Pruning on torchvision's model families, 2x FLOP target", "",
            f"Command: `{record['command']}`", "",
            f"torch {record['torch']}, torch-pruning {record['torch_pruning']}, {record['threads']} threads, wall time "
            f"{record['wall_seconds'] / 60:.1f} min. Untrained models, 10 classes, random inputs, the sizes of "
            f"torchvision_models.md. Target: FLOPs at or under {args.target:g} of the full model's, counted by "
            f"`tp.utils.count_ops_and_params`. Iterative: `BasePruner` + `GroupMagnitudeImportance(p=2)`, local "
            f"ranking, `pruning_ratio=1.0` over {args.steps} steps, stopping at the first step at or under the "
            f"target. One-shot: `pruning_ratio={1 - math.sqrt(args.target):.3f}` (1 - sqrt(target)), one step. "
            "TP prunable share: conv/linear output channels (the classifier's aside) of layers in a Torch-Pruning "
            "pruning group; 'removed': the share of those channels the iterative run removed. Other counters: the "
            "iterative result's FLOP reduction by `torch.utils.flop_counter` (aten: every conv/matmul torch runs, "
            "functional ones included; counted in train mode so `nn.MultiheadAttention` is decomposed) and by "
            "budgetprune's `resource_report` (conv/linear MACs of the layers its graph holds), and each counter's "
            "count of the full model over aten's. budgetprune: " + record["budgetprune"] + ".", "", *table(rows), ""]
    (out / "peer_torch_pruning.md").write_text("\n".join(page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
