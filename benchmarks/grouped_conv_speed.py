"""How a pruned grouped convolution runs in onnxruntime: each conv group's kept width against the speed.

A RegNet-X block (1×1 conv → grouped 3×3 conv → 1×1 conv) whose grouped conv has G groups of 16
channels is pruned three ways to the same kinds of widths:

* *tied*: every conv group keeps the same u of its 16 channels (what budgetprune's grouped-conv
  ties keep), u = 4, 6 or 8 — the default padding pads u to a multiple of 8;
* *whole groups*: k of the G groups kept whole (16 channels each).

Each is timed against the unpruned block by pairs (:func:`budgetprune.runtimes.paired_times`),
batch 16, and its speedup is divided by its FLOP reduction (1: runs as fast as its FLOPs say).

    python benchmarks/grouped_conv_speed.py            # two RegNet-X-400MF stages, 1 thread

Writes ``benchmarks/results/grouped_conv_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_results  # noqa: E402

from budgetprune.runtimes import paired_times, runner  # noqa: E402

#: (channels of the residual stream, map side, conv groups of 16): regnet_x_400mf's stages 3 and 4 at 224 px
STAGES = ((160, 14, 10), (400, 7, 25))
GROUP_WIDTH = 16


def block(c: int, groups: int, per_group: int) -> nn.Module:
    w = groups * per_group
    return nn.Sequential(nn.Conv2d(c, w, 1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1, groups=groups), nn.ReLU(),
                         nn.Conv2d(w, c, 1)).eval()


def macs(c: int, side: int, groups: int, per_group: int) -> int:
    w = groups * per_group
    return side * side * (c * w + w * per_group * 9 + w * c)


def variants(groups: int) -> list[tuple[str, int, int]]:
    """``(label, conv groups, channels per group)`` of each pruned form."""
    tied = [(f"tied, {u} of 16 per group", groups, u) for u in (4, 6, 8)]
    whole = [(f"whole groups, {k} of {groups}", k, GROUP_WIDTH) for k in sorted({groups // 4, groups // 2, 3 * groups // 8})]
    return tied + whole


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=200, help="pairs timed per variant")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for c, side, groups in STAGES:
        torch.manual_seed(0)
        x = torch.randn(args.batch, c, side, side)
        full = runner(block(c, groups, GROUP_WIDTH), x, "onnxruntime", threads=args.threads)
        for label, g, per in variants(groups):
            pruned = runner(block(c, g, per), x, "onnxruntime", threads=args.threads)
            a, b = paired_times(full, pruned, args.repeats, min_seconds=0.0)
            speedup = statistics.median(ta / tb for ta, tb in zip(a, b))
            reduction = macs(c, side, groups, GROUP_WIDTH) / macs(c, side, g, per)
            rows.append({"stage": f"{c} ch, {side}×{side}, {groups} groups", "variant": label, "groups": g,
                         "per_group": per, "width": g * per, "speedup": speedup, "flop_reduction": reduction,
                         "ratio": speedup / reduction})
            print(f"{rows[-1]['stage']}: {label}: {speedup:.2f}× for {reduction:.2f}× fewer FLOPs "
                  f"({rows[-1]['ratio']:.2f})", flush=True)
    record = {"command": "python benchmarks/grouped_conv_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": args.threads, "batch": args.batch, "repeats": args.repeats, "machine": machine(),
              "wall_seconds": time.perf_counter() - start, "rows": rows}
    lines = ["# A pruned grouped convolution in onnxruntime: speedup ÷ FLOP reduction", "",
             f"Command: `{record['command']}`", "",
             f"RegNet-X blocks (1×1 → grouped 3×3 → 1×1), batch {args.batch}, {args.threads} onnxruntime thread(s), "
             f"{args.repeats} pairs with the unpruned block per variant (median of the pairs' ratios). "
             f"Machine: {record['machine']}. Wall time {record['wall_seconds'] / 60:.1f} min.", "",
             "| stage | pruned | width | speedup | FLOP reduction | speedup ÷ FLOP reduction |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['variant']} | {r['width']} | {r['speedup']:.2f}× | {r['flop_reduction']:.2f}× | "
                     f"**{r['ratio']:.2f}** |")
    out = write_results(args.out, "grouped_conv_speed", record, "\n".join(lines))
    print(f"results in {out}/grouped_conv_speed.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
