"""Training recipes of the unpruned teacher at equal epochs (a benchmark, not a test).

Trains the unpruned network with several recipes (optimizer, weight decay, batch size,
learning-rate schedule, label smoothing) through budgetprune's own teacher stage pieces
(``recipe.make_optimizer``, ``recipe.stage_schedule``, ``engine.train_epoch``, the teacher's
seeds), and with a hand-written plain PyTorch loop (Adam lr 1e-3, batch 128, no weight decay,
constant rate), for the same epochs, several seeds each. ``--validation`` training images
(chosen from the seed, as ``budgetprune prune --validation`` chooses them) are held out of
training for every contender alike: the recipes are compared, and one is chosen, on their
validation accuracy; the test accuracy is reported next to it and chooses nothing. Differences
under two standard errors are ties (``stats.tie``). Writes ``benchmarks/results/recipe.{json,md,png}``.

    python benchmarks/recipe.py --data-root ../shared/data --jobs 2
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

from budgetprune import io
from common import HERE, RESULTS, Parser, machine, name_list, seeded_model, write_results
from stats import format_mean_std, mean_std, tie

#: Recipes by name: the PruneConfig recipe fields and batch size each sets. ``default`` is the
#: teacher recipe budgetprune had before this benchmark (seed 001's Adam, L2 5e-4, batch 64).
RECIPES = {
    "default": dict(optimizer="adam", lr=1e-3, weight_decay=5e-4, lr_schedule="constant", batch_size=64),
    "adamw-cos": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="cosine", warmup_epochs=0.5,
                      batch_size=128),
    "adamw-cos-ls": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="cosine", warmup_epochs=0.5,
                         label_smoothing=0.1, batch_size=128),
    "adamw-cos-b64": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="cosine", warmup_epochs=0.5,
                          batch_size=64),
    "adamw-cos-ls-b64": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="cosine", warmup_epochs=0.5,
                             label_smoothing=0.1, batch_size=64),
    "sgd-cos": dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, lr_schedule="cosine",
                    warmup_epochs=0.5, batch_size=128),
    "sgd-cos-ls": dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       lr_schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1, batch_size=128),
}
PLAIN = "plain loop"  # the reference: Adam lr 1e-3, batch 128, no weight decay, constant rate
CONTENDERS = [PLAIN, *RECIPES]

#: model:data and the contenders run on it by default. A LeNet-5 epoch on 50 000 images is ~25 s
#: of one core here (minutes on the shared machine), LeNet-300-100's ~2 s: LeNet-5 gets the
#: reference, the old default and the recipe with the best validation accuracy on LeNet-300-100
#: (chosen before any LeNet-5 run, without looking at a test accuracy).
DEFAULT_GRID = {"lenet300:mnist": CONTENDERS,
                "lenet5:fashion-mnist": [PLAIN, "default", "adamw-cos-ls-b64"]}


def settings(name: str) -> str:
    """A recipe in words, for the table."""
    if name == PLAIN:
        return "hand-written loop: Adam 1e-3, batch 128, no weight decay, constant"
    r = RECIPES[name]
    words = [f"{r['optimizer']} {r['lr']:g}", f"wd {r['weight_decay']:g}", f"batch {r['batch_size']}",
             r["lr_schedule"] + (f" + {r['warmup_epochs']:g} ep warm-up" if r.get("warmup_epochs") else "")]
    if r.get("nesterov"):
        words[0] += f" (Nesterov, momentum {r['momentum']:g})"
    if r.get("label_smoothing"):
        words.append(f"label smoothing {r['label_smoothing']:g}")
    return ", ".join(words)


def _splits(model_data: str, data_root: str, validation: float, seed: int):
    from budgetprune.data import load_dataset
    from budgetprune.data.validation import split_validation
    data = model_data.split(":", 1)[1]
    splits = load_dataset(data, root=data_root)
    train, val = split_validation(splits.train, validation, seed)
    return splits, train, val


def _model(model_data: str, info, seed: int):
    return seeded_model(model_data.split(":")[0], seed, info.in_channels, info.num_classes, info.image_size)


def train_budgetprune(model, train, recipe_fields: dict, epochs: int, seed: int) -> None:
    """The teacher stage of ``budgetprune prune`` (pipeline.PruneRun._teacher_stage) without its
    checkpoints: the recipe's optimizer and schedule, its label smoothing, the teacher's seeds."""
    from budgetprune import seeding
    from budgetprune.engine import num_batches, train_epoch
    from budgetprune.objectives import smoothed_cross_entropy
    from budgetprune.pipeline import STAGES, PruneConfig
    from budgetprune.recipe import make_optimizer, stage_schedule
    cfg = PruneConfig(seed=seed, teacher_epochs=epochs, **recipe_fields)
    cfg.validate()
    recipe = cfg.recipe("teacher")
    opt = make_optimizer(list(model.parameters()), recipe)
    steps = num_batches(train, cfg.batch_size)
    schedule = stage_schedule(opt, recipe, steps, epochs)
    seeding.seed_stage(seed, "teacher")
    for epoch in range(epochs):
        train_epoch(model, train, opt, lambda logits, y, idx, x: smoothed_cross_entropy(logits, y, recipe.label_smoothing),
                    device=torch.device("cpu"), batch_size=cfg.batch_size, step=epoch * steps,
                    generator=seeding.batch_generator(seed, STAGES.index("teacher"), epoch),
                    before_step=schedule, show_progress=False)


def train_plain(model, train, epochs: int, seed: int) -> None:
    """The issue's plain loop, written as a user would: Adam lr 1e-3, batch 128, no weight decay."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for start in range(0, len(train), 128):
            x, y = train.batch(order[start:start + 128])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def one_run(job: tuple) -> dict:
    """Train one contender on one model with one seed (in a worker process, one thread)."""
    model_data, name, seed, epochs, validation, data_root = job
    torch.set_num_threads(1)
    from budgetprune.engine import evaluate
    splits, train, val = _splits(model_data, data_root, validation, seed)
    model = _model(model_data, splits.info, seed)
    start = time.perf_counter()
    if name == PLAIN:
        train_plain(model, train, epochs, seed)
    else:
        train_budgetprune(model, train, RECIPES[name], epochs, seed)
    seconds = time.perf_counter() - start
    cpu = torch.device("cpu")
    return {"model": model_data, "recipe": name, "seed": seed, "train_seconds": seconds,
            "train_images": len(train), "val_images": len(val),
            "val_accuracy": 100 * evaluate(model, val, cpu)["accuracy"],
            "test_accuracy": 100 * evaluate(model, splits.test, cpu)["accuracy"]}


def summarise(runs: list[dict], grid: dict[str, list[str]]) -> dict:
    """Per model: per contender its accuracies over seeds; the best by validation; ties."""
    out = {}
    for model_data, names in grid.items():
        rows = {}
        for name in names:
            mine = sorted((r for r in runs if r["model"] == model_data and r["recipe"] == name), key=lambda r: r["seed"])
            if not mine:
                continue
            val, test = [r["val_accuracy"] for r in mine], [r["test_accuracy"] for r in mine]
            rows[name] = {"settings": settings(name), "recipe": RECIPES.get(name), "seeds": [r["seed"] for r in mine],
                          "val": val, "test": test, "val_mean_std": mean_std(val), "test_mean_std": mean_std(test),
                          "train_seconds": sum(r["train_seconds"] for r in mine) / len(mine)}
        recipes = [n for n in rows if n != PLAIN]
        best = max(recipes, key=lambda n: rows[n]["val_mean_std"][0]) if recipes else None
        for name, row in rows.items():
            if best is not None and name != best:
                row["val_vs_best"] = _verdict(row["val"], rows[best]["val"])
            for ref in ("default", PLAIN):
                if ref in rows and name != ref:
                    row[f"val_vs_{ref}"] = _verdict(row["val"], rows[ref]["val"])
                    row[f"test_vs_{ref}"] = _verdict(row["test"], rows[ref]["test"])
        out[model_data] = {"rows": rows, "best_by_validation": best}
    return out


def _verdict(a: list[float], b: list[float]) -> str:
    """``a`` against ``b``: a tie under two standard errors, else better or worse by the gap."""
    gap = mean_std(a)[0] - mean_std(b)[0]
    return f"tie ({gap:+.2f})" if tie(a, b) else f"{'better' if gap > 0 else 'worse'} ({gap:+.2f})"


def page(record: dict) -> str:
    lines = ["# Training recipes of the unpruned teacher, at equal epochs", "",
             f"Command: `{record['command']}`", "",
             f"{record['epochs']} epochs each, seeds {record['seeds']}; {record['validation']} training images held "
             "out (chosen from the seed) for validation and never trained on. **Chosen by validation accuracy**; "
             "the test accuracy is reported, never used to choose. Accuracy in % (mean ± std over seeds); "
             "'tie' = the means differ by under two standard errors of their difference (benchmarks/stats.py). "
             f"Machine: {record['machine']}, {record['jobs']} runs at once, one thread each, shared with "
             f"other jobs (s/run: wall seconds of one run's training). Training time of all runs "
             f"{record['train_seconds'] / 60:.0f} min (runs kept in --work from earlier invocations are read, "
             f"not trained again; this invocation: {record['wall_seconds'] / 60:.1f} min).", ""]
    for model_data, res in record["results"].items():
        lines += [f"## {model_data}", "",
                  "| recipe | settings | val accuracy | vs default (val) | vs best (val) | test accuracy | "
                  "vs default (test) | vs plain loop (test) | s/run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in res["rows"].items():
            mark = " **(best val)**" if name == res["best_by_validation"] else ""
            lines.append(f"| {name}{mark} | {row['settings']} | {format_mean_std(row['val'])} | "
                         f"{row.get('val_vs_default', '—')} | {row.get('val_vs_best', '—')} | "
                         f"{format_mean_std(row['test'])} | "
                         f"{row.get('test_vs_default', '—')} | {row.get('test_vs_plain loop', '—')} | "
                         f"{row['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(record: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = record["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (model_data, res) in zip(axes[0], results.items()):
        names = list(res["rows"])
        for k, (split, colour) in enumerate((("val", "tab:blue"), ("test", "tab:orange"))):
            means = [res["rows"][n][f"{split}_mean_std"][0] for n in names]
            stds = [res["rows"][n][f"{split}_mean_std"][1] for n in names]
            ax.errorbar([i + (k - 0.5) * 0.2 for i in range(len(names))], means, yerr=stds, fmt="o", color=colour,
                        capsize=3, label=f"{split} accuracy")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel("accuracy (%), mean ± std over seeds")
        ax.set_title(f"{model_data}, {record['epochs']} epochs")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import sys
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=8, help="epochs of every contender (default 8: issue 13's teacher)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--validation", type=float, default=10000, help="training images held out (default 10000)")
    p.add_argument("--models", type=lambda t: name_list(t, list(DEFAULT_GRID), "model:data"),
                   default=list(DEFAULT_GRID), help="comma-separated model:data (default: both)")
    p.add_argument("--recipes", type=lambda t: name_list(t, CONTENDERS, "recipe"),
                   help="comma-separated contenders for every model (default: each model's grid)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once (one thread each)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--work", default=str(HERE.parent / "runs" / "recipe"),
                   help="each finished run is kept here and not trained again (delete it to start afresh)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1 or args.jobs < 1:
        p.error("--epochs, --seeds and --jobs must be at least 1")
    grid = {m: (args.recipes or DEFAULT_GRID[m]) for m in args.models}
    jobs = [(m, name, seed, args.epochs, args.validation, args.data_root)
            for m, names in grid.items() for seed in range(args.seeds) for name in names]
    # the short runs first, then seed by seed: a partial grid is already comparable
    jobs.sort(key=lambda j: (not j[0].startswith("lenet300"), j[2], grid[j[0]].index(j[1])))
    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cached = {job: work / (f"{job[0].replace(':', '_')}_{job[1].replace(' ', '_')}_seed{job[2]}_"
                           f"{job[3]}ep_val{job[4]:g}.json") for job in jobs}
    runs = [json.loads(f.read_text()) for f in cached.values() if f.exists()]
    todo = [job for job in jobs if not cached[job].exists()]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(one_run, job): job for job in todo}
        for future in as_completed(futures):
            run = future.result()
            io.write_json(cached[futures[future]], run)
            runs.append(run)
            print(f"{run['model']} {run['recipe']} seed {run['seed']}: val {run['val_accuracy']:.2f} "
                  f"test {run['test_accuracy']:.2f} ({run['train_seconds']:.0f} s)", flush=True)
    record = {"command": "python benchmarks/recipe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "epochs": args.epochs, "seeds": list(range(args.seeds)), "validation": args.validation,
              "machine": machine(), "jobs": args.jobs, "recipes": RECIPES, "runs": runs,
              "results": summarise(runs, grid), "wall_seconds": time.time() - t0,
              "train_seconds": sum(r["train_seconds"] for r in runs)}
    out = write_results(args.out, "recipe", record, page(record))
    plot(record, out / "recipe.png")
    print(page(record))
    print(json.dumps({m: r["best_by_validation"] for m, r in record["results"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
