"""Prune inside your own training loop: a plain PyTorch loop with budgetprune.Pruner.

    python examples/plain_loop.py --data demo --budget flops=0.25 --epochs 3

The loop is yours (here: AdamW, cross-entropy, then a cosine fine-tune); the pruner
adds its penalty to the loss and takes one step signal per optimiser step. At the end it
returns a physically smaller network on the budget, which this script fine-tunes for one more
epoch, evaluates and saves.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import budgetprune
from budgetprune.data import load_dataset
from budgetprune.errors import BudgetpruneError


def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def train(model, loader, optimizer, scheduler=None, pruner=None, max_steps=None) -> None:
    model.train()
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        loss = F.cross_entropy(model(x), y)
        if pruner is not None:
            loss = loss + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if pruner is not None:
            pruner.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo", help="demo, mnist or fashion-mnist")
    parser.add_argument("--data-root", help="folder of the dataset files")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--budget", default="flops=0.25", help="e.g. 0.25, 4x, flops=0.25,volume=0.5")
    parser.add_argument("--method", default="bar")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of training while pruning")
    parser.add_argument("--max-steps", type=int, help="at most this many steps per epoch (a quick try)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="plain_loop_model.pt")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = load_dataset(args.data, root=args.data_root)
    train_loader = DataLoader(data.train, batch_size=64, shuffle=True)
    test_loader = DataLoader(data.test, batch_size=256)
    info = data.info
    model = budgetprune.create_model(args.model, in_channels=info.in_channels, num_classes=info.num_classes,
                                     input_size=info.image_size)
    steps_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    example = next(iter(train_loader))[0]

    # The model trains from scratch here, so its gates start where seed 001's do (log α ≈ 0), not
    # open (the Pruner's default, for a model that is already trained).
    pruner = budgetprune.Pruner(model, example, args.budget, method=args.method,
                                total_steps=args.epochs * steps_per_epoch, gate_lr=1e-2, gate_init=0.0)
    # A constant learning rate while the budget moves: the gates must keep learning until the end.
    optimizer = torch.optim.AdamW(pruner.parameters(lr=args.lr), lr=args.lr, weight_decay=1e-4)
    for epoch in range(args.epochs):
        train(model, train_loader, optimizer, pruner=pruner, max_steps=args.max_steps)
        status = ", ".join(f"{k} {v:.4g}" for k, v in pruner.status().items())
        print(f"epoch {epoch + 1}: {status}", flush=True)

    small, report = pruner.finalize()
    limit = pruner.budget.absolute(pruner.graph)
    print(f"pruned: {pruner.budget.metric} {report['pruned'][pruner.budget.metric]:.6g} of a budget of "
          f"{limit:.6g} ({report['pruned'][pruner.budget.metric] / limit:.4f} of it); "
          f"outputs match the gated model to {report['compaction_max_abs_diff']:.2g}")

    finetune = torch.optim.AdamW(small.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = min(len(train_loader), args.max_steps or len(train_loader))
    train(small, train_loader, finetune, torch.optim.lr_scheduler.CosineAnnealingLR(finetune, T_max=steps),
          max_steps=args.max_steps)
    print(f"test accuracy of the pruned model: {accuracy(small, test_loader):.4f}")
    budgetprune.save(small, args.out, meta={"input_shape": list(example.shape[1:])})
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BudgetpruneError as exc:
        print(f"plain_loop: error: {exc}", file=sys.stderr)
        sys.exit(2)
