"""What budgetprune can prune in torchvision's (or timm's) classification models, one per family.

For each model (untrained, ``num_classes=10``, random inputs of ``--size`` pixels) a Pruner
under a FLOP budget takes ``--steps`` SGD steps and finalizes. Recorded per model: the share
of conv/linear output channels that are prunable (channel groups over all conv/linear outputs
but the classifier's; depthwise convs and squeeze-and-excitation scales follow the channels they
read or scale and count with them, an attention's query/key/value projection with its gated
heads) and why the rest is not, whether the budget is met (V/B), the
compacted network's largest output difference from the gated one (relative to the largest
output), the parameter and FLOP reduction, how the result saves (self-contained file or plan + weights)
and whether the loaded file gives the same outputs — or the one-line error where a step fails.

    python benchmarks/torchvision_models.py                      # every family, 64 px, 2x FLOPs
    python benchmarks/torchvision_models.py --models resnet18,vit_b_16 --size 64
    python benchmarks/torchvision_models.py --models convnext_tiny,vit_b_16 --update   # rerun rows, keep the rest
    python benchmarks/torchvision_models.py --source timm        # timm's families (TIMM_FAMILIES)

Writes ``benchmarks/results/torchvision_models.{json,md}`` (``timm_models.{json,md}`` with
``--source timm``). torchvision and timm are benchmark and test dependencies only (``pip install
--no-deps torchvision timm`` next to the torch pin); a CUDA build of torchvision imports with a
CPU torch once its ``nms``/``qnms`` operator schemas are defined, which this script does when the
plain import fails (timm imports torchvision). timm's models are built as ``--model timm:NAME``
builds them (``budgetprune.create_model``: a model made for one image size at ``--size``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, padding_label, pruning_steps, source_state  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune import Pruner  # noqa: E402
from budgetprune.errors import BudgetpruneError, first_line  # noqa: E402

FAMILIES = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "densenet121", "googlenet", "inception_v3",
            "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s",
            "shufflenet_v2_x0_5", "squeezenet1_0", "regnet_x_400mf", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t"]
#: timm's families, one small model each (timm's own BatchNorm + activation modules, attention,
#: partial residuals, channel splits, re-parameterisable blocks, ...).
TIMM_FAMILIES = ["resnet18d", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_large_100", "regnety_002",
                 "cspresnet50", "dla34", "ghostnet_100", "rexnet_100", "res2net50_14w_8s", "repvgg_a0",
                 "densenet121", "hrnet_w18_small", "convnext_atto", "convnextv2_atto", "vit_tiny_patch16_224",
                 "levit_128s", "poolformer_s12", "mobilevit_xxs", "efficientformer_l1", "edgenext_xx_small",
                 "fastvit_t8", "mobileone_s0", "lcnet_050", "tinynet_e", "mixer_s16_224", "nf_resnet26",
                 "efficientvit_b0", "mobilenetv4_conv_small", "swin_tiny_patch4_window7_224", "skresnet18",
                 "ecaresnet26t", "tf_efficientnetv2_b0", "vgg11_bn", "efficientvit_m0", "coat_lite_tiny",
                 "inception_next_tiny", "coatnet_nano_rw_224", "cait_xxs24_224", "gmlp_ti16_224", "halonet26t",
                 "crossvit_tiny_240", "bat_resnext26ts"]
SIZE_AT_LEAST = {"inception_v3": 75, "maxvit_t": 224,  # what the architecture itself needs
                 "halonet26t": 256, "crossvit_tiny_240": 240, "bat_resnext26ts": 256}
_SHIM = None


def import_torchvision():
    global _SHIM
    if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode != 0:
        _SHIM = torch.library.Library("torchvision", "DEF")
        _SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision.models
    return torchvision.models


def import_source(source: str):
    """The model factory ``make(name, size)`` of torchvision or timm."""
    models = import_torchvision()
    if source == "timm":
        return lambda name, size: budgetprune.create_model(f"timm:{name}", in_channels=3, num_classes=10,
                                                           input_size=(size, size))
    return lambda name, size: make(models, name, size)


def make(models, name: str, size: int) -> nn.Module:
    kwargs = {"weights": None, "num_classes": 10}
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return models.get_model(name, **kwargs)


def prunable_share(model: nn.Module, graph) -> tuple[float, int, int]:
    """(prunable share, prunable channels, all channels) of conv/linear outputs but the last layer's."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in layers[:-1])
    depthwise = {name for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1}
    grouped = sum(g.channels for g in graph.groups.values() if g.position == "output")
    following = sum(graph.layers[name].out_channels for name in depthwise
                    if name in graph.layers and graph.layers[name].out_group is None
                    and graph.tensors[graph.layers[name].in_tensor].sources())
    following += sum(layer.out_channels for layer in graph.layers.values()  # squeeze-and-excitation scales
                     if layer.follows and graph.tensors[layer.out_tensor].sources())
    modules = dict(model.named_modules())
    for g in graph.groups.values():  # a gated head prunes its 3·d query, key and value rows of an nn.Linear
        spec = graph.layers[g.producer].attention if g.position == "heads" else None
        if spec is not None and isinstance(modules.get(spec.qkv_weight.rpartition(".")[0]), nn.Linear):
            following += g.channels * 3 * spec.head_dim
    kept = grouped + following
    return kept / max(total, 1), kept, total


def one(make_model, name: str, size: int, budget: str, steps: int) -> dict:
    row: dict = {"model": name, "size": size}
    start = time.perf_counter()
    stage = "build"
    try:
        torch.manual_seed(0)
        model = make_model(name, size)
        x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
        full_params = sum(p.numel() for p in model.parameters())
        stage = "trace"
        pruner = Pruner(model, x, budget, total_steps=steps, gate_init=3.0)
        row["prunable_share"], row["prunable_channels"], row["channels"] = prunable_share(model, pruner.graph)
        reasons = Counter(re.sub(r" at node '[^']*'", "", why) for why in pruner.graph.ungated.values())
        row["not_pruned"] = {why: n for why, n in reasons.most_common() if why != "feeds the network output"}
        stage = "train"
        optimizer = torch.optim.SGD(pruner.parameters(lr=1e-3), lr=1e-3, momentum=0.9)
        pruning_steps(model, pruner, optimizer, x, y, steps)
        stage = "finalize"
        small, report = pruner.finalize(x)
        with torch.no_grad():
            row["output_scale"] = float(small(x).abs().max())  # the difference below is relative to it
        metric = pruner.budget.metric
        row["padding"] = report.get("padding")  # the padding finalize kept: [multiple, min_width, min_area, min_kept]
        row["pad_tied"] = report.get("pad_tied")  # and whether tied channels (concatenations, grouped convs) were padded
        row.update(budget_ratio=report["pruned"][metric] / pruner.budget.absolute(pruner.graph),
                   compaction_max_abs_diff=report["compaction_max_abs_diff"],
                   flops_reduction=pruner.full["flops"] / report["pruned"]["flops"],
                   params_reduction=full_params / sum(p.numel() for p in small.parameters()))
        stage = "save"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.pt"
            budgetprune.save(small, path)
            stored = torch.load(path, weights_only=True)
            row["file"] = "self-contained" if "graph" in stored else "plan + weights"
            stage = "load"
            again = budgetprune.load(path) if "graph" in stored else budgetprune.load(path, model=make_model(name, size))
            with torch.no_grad():
                row["load_max_abs_diff"] = float((again(x) - small(x)).abs().max())
    except (BudgetpruneError, RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        row["failed_at"] = stage
        row["error"] = f"{type(exc).__name__}: {first_line(exc, 240)}"
    row["seconds"] = time.perf_counter() - start
    return row


def table(rows: list[dict], size: int) -> list[str]:
    """The page's table; a model run at another input size than ``size`` (the one it needs) says it."""
    lines = ["| model | prunable channels | V/B | widths | compaction diff (relative) | FLOPs ÷ | params ÷ | file | "
             "load diff | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r = dict(r, model=r["model"] + (f" ({r['size']} px)" if r.get("size", size) != size else ""))
        share = f"{r['prunable_share']:.0%} ({r['prunable_channels']}/{r['channels']})" if "prunable_share" in r else "–"
        if "error" in r and "budget_ratio" not in r:
            lines.append(f"| {r['model']} | {share} | failed at {r['failed_at']}: {r['error'].replace('|', '/')} "
                         f"| | | | | | | {r['seconds']:.0f} |")
            continue
        tail = (f"{r['file']} | {r['load_max_abs_diff']:.1e}" if "load_max_abs_diff" in r
                else f"failed at {r.get('failed_at')}: {r.get('error', '').replace('|', '/')} | –")
        scale = r.get("output_scale", 1.0)
        diff = f"{r['compaction_max_abs_diff'] / scale:.1e}" if scale > 0 else "outputs are 0"
        lines.append(f"| {r['model']} | {share} | {r['budget_ratio']:.4f} | {padding_label(r.get('padding'), r.get('pad_tied'))} | {diff} | "
                     f"{r['flops_reduction']:.2f} | {r['params_reduction']:.2f} | {tail} | {r['seconds']:.0f} |")
    return lines


def git_commit() -> str:
    """The commit the code under test is at (``+changes`` when its sources differ from it)."""
    state = source_state()
    return "unknown" if state is None else state[0] + ("+changes" if state[1] else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["torchvision", "timm"], default="torchvision")
    p.add_argument("--models", default=None, help="comma-separated names (default: the source's families)")
    p.add_argument("--size", type=int, default=64, help="input pixels (raised where an architecture needs more)")
    p.add_argument("--budget", default="flops=0.5")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--update", action="store_true",
                   help="replace only the rows of --models in the existing results (same budget and steps)")
    args = p.parse_args(argv)
    families = TIMM_FAMILIES if args.source == "timm" else FAMILIES
    args.models = args.models or ",".join(families)
    stem = f"{args.source}_models"
    out = Path(args.out)
    runs, kept = [], {}
    if args.update:
        try:
            old = json.loads((out / f"{stem}.json").read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--update needs the results of an earlier run in {out}: {exc}")
        if old.get("budget") != args.budget or old.get("steps") != args.steps:
            p.error(f"--update: the results in {out} were made with --budget {old.get('budget')} "
                    f"--steps {old.get('steps')}; rerun with those or without --update")
        runs = old.get("runs") or [{"command": old["command"], "commit": old.get("commit", "see the page"),
                                     "models": [r["model"] for r in old["rows"]], "wall_seconds": old["wall_seconds"]}]
        kept = {r["model"]: r for r in old["rows"]}
    make_model = import_source(args.source)
    commit = git_commit()
    start = time.perf_counter()
    names = args.models.split(",")
    for name in names:
        row = one(make_model, name, max(args.size, SIZE_AT_LEAST.get(name, 0)), args.budget, args.steps)
        row["commit"] = commit
        print(json.dumps(row), flush=True)
        kept[name] = row
    command = "python benchmarks/torchvision_models.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs.append({"command": command, "commit": commit, "models": names, "wall_seconds": time.perf_counter() - start})
    # a run whose every row a later run replaced made none of the rows left
    runs = [run for i, run in enumerate(runs)
            if not set(run["models"]) <= {m for later in runs[i + 1:] for m in later["models"]}]
    order = {name: i for i, name in enumerate(families)}
    rows = sorted(kept.values(), key=lambda r: order.get(r["model"], len(order)))
    record = {"command": command, "budget": args.budget, "steps": args.steps, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "wall_seconds": sum(r["wall_seconds"] for r in runs),
              "runs": runs, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    made = [f"- `{r['command']}` at commit {r['commit']}: {', '.join(r['models'])} "
            f"({r['wall_seconds'] / 60:.1f} min)" for r in runs]
    page = [f"# {args.source} classification models under a FLOP budget", "",
            "Made by (a later run replaces the rows of the models it names):", "", *made, "",
            f"Untrained models, 10 classes, random inputs; {args.steps} SGD steps (lr 1e-3) under `{args.budget}`, then "
            f"finalize, save, load. torch {record['torch']}, {record['threads']} threads. FLOPs are MACs of every "
            f"op torch's flop counter counts (attention products included). Inputs of {args.size} px, or the size a "
            "model needs (named after it).", "", *table(rows, args.size), "",
            "What stays unpruned (layers left ungated, by reason; the classifier is never pruned):", ""]
    for r in rows:
        for why, n in r.get("not_pruned", {}).items():
            page.append(f"- {r['model']}: {n} × {why}")
    page.append("")
    (out / f"{stem}.md").write_text("\n".join(page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
