"""How much of the budget each padding leaves to the channels the method chose.

A padding is paid for by dropping chosen channels elsewhere; ``channel_multiple="auto"`` passes
over a padding that leaves them under ``budgetprune.budget.PADDING_KEEPS`` of the budget
(:func:`budgetprune.budget.chosen_share`). Per model and FLOP budget, one ``Pruner`` (method
``magnitude``, 4 AdamW steps on random inputs, untrained weights: the masks of
``benchmarks/deploy_speed.py``) is projected and filled with each padding of the auto ladder and
with multiples of 16; each row gives the fullness (cost over the budget, padded) and the chosen
channels' share. No timing: the numbers are the projections' own.

    python benchmarks/padding_share.py            # the deploy benchmark's networks at 2× and 4×

Writes ``benchmarks/results/padding_share.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, name_list, number_list, write_results  # noqa: E402
from deploy_speed import KNOWN_MODELS, REGISTRY, build, pruning_steps  # noqa: E402

from budgetprune import Pruner  # noqa: E402
from budgetprune.budget import PADDING_KEEPS, budget_ratios, chosen_share, project_and_fill  # noqa: E402
from budgetprune.errors import BudgetError  # noqa: E402
from budgetprune.liveness import BlockMode, auto_paddings, wide_padding  # noqa: E402

MODELS = ["resnet20", "resnet18", "mobilenet_v2", "mnasnet0_5", "squeezenet1_0", "mobilenet_v3_small",
          "efficientnet_b0", "googlenet", "shufflenet_v2_x0_5"]


def shares(name: str, factor: float, size: int, models_module) -> list[dict]:
    """One row per padding: fullness and chosen share of the projected, filled masks (or why none)."""
    torch.manual_seed(0)  # the same untrained weights whatever ran before
    unpruned, shape = build(name, size, models_module)
    torch.manual_seed(0)
    model = copy.deepcopy(unpruned).train()
    x, y = torch.randn(2, *shape), torch.randint(0, 10, (2,))
    pruner = Pruner(model, x, f"flops={1.0 / factor!r}", total_steps=4, method="magnitude",
                    deploy_runtime="onnxruntime", log=lambda line: None)
    optimizer = torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3)
    pruning_steps(model, pruner, optimizer, x, y, 4)
    graph, chosen, scores = pruner.graph, pruner.method.keep_masks(), pruner.method.scores()
    rows = []
    for rung, padding in [(str(i + 1), p) for i, p in enumerate(auto_paddings())] + [("16", wide_padding())]:
        mode = BlockMode(str(pruner.block), padding, pruner.block.gather_cost)
        row = {"model": name, "factor": factor, "rung": rung, "padding": padding.describe()}
        try:
            final, _ = project_and_fill(graph, chosen, scores, pruner.budgets, mode)
        except BudgetError as error:
            rows.append({**row, "error": str(error)})
            continue
        rows.append({**row, "fullness": max(budget_ratios(graph, final, pruner.budgets, mode)),
                     "chosen_share": chosen_share(graph, chosen, final, pruner.budgets, mode)})
    return rows


def page(record: dict) -> str:
    lines = ["# The budget each padding leaves to the channels the method chose", "",
             f"Command: `{record['command']}`", "",
             __doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`").replace(":func:", ""), "",
             f"`channel_multiple=\"auto\"` keeps a padding only where the share is at least {PADDING_KEEPS} "
             f"(and the fullness at least 0.95; multiples of 16 only where timed faster). Machine: "
             f"{record['machine']}. Wall time {record['wall_seconds'] / 60:.1f} min.", "",
             "| model | FLOPs ÷ | padding | fullness | chosen share |", "|---|---:|---|---:|---:|"]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['factor']:g}× | {r['padding']} | cannot meet the budget | – |")
        else:
            low = " **(under)**" if r["chosen_share"] < PADDING_KEEPS and r["padding"] != "exact widths" else ""
            lines.append(f"| {r['model']} | {r['factor']:g}× | {r['padding']} | {r['fullness']:.4f} | "
                         f"{r['chosen_share']:.3f}{low} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda t: name_list(t, KNOWN_MODELS, "model(s)"), default=MODELS,
                   help=f"comma-separated (default {','.join(MODELS)}), from {','.join(KNOWN_MODELS)}")
    p.add_argument("--budgets", type=lambda t: number_list(float, t, "FLOP reduction factors", 1.0),
                   default=[2.0, 4.0], help="FLOP reduction factors (default 2,4)")
    p.add_argument("--size", type=int, default=224, help="pixels of the torchvision models' inputs")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    models, factors = args.models, args.budgets
    models_module = None
    if any(m not in REGISTRY for m in models):
        from torchvision_models import import_torchvision
        models_module = import_torchvision()
    start, rows = time.time(), []
    for name in models:
        for factor in factors:
            rows.extend(shares(name, factor, args.size, models_module))
            print(f"{name} {factor:g}x done", flush=True)
    record = {"command": "python benchmarks/padding_share.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "keeps": PADDING_KEEPS, "wall_seconds": time.time() - start, "rows": rows}
    out = write_results(args.out, "padding_share", record, page(record))
    print(f"results in {out}/padding_share.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
