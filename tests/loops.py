"""What the tests that drive a Pruner by hand share: the user's training loop of the README, and
BatchNorm statistics that are not the identity (so that a BatchNorm maps 0 to something else)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetprune.attach import GateHooks


def pruning_steps(model, pruner, optimizer, batches, loss_fn=F.cross_entropy) -> None:
    """One optimizer step per (x, y) of ``batches``: task loss + the pruner's penalty, then the pruner's step."""
    for x, y in batches:
        loss = loss_fn(model(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()


def finalize_against_choice(pruner) -> tuple[dict, int, float]:
    """Finalize ``pruner`` and hold the result against what its method chose: ``(finalize's report,
    the chosen channels the result dropped, the chosen channels' share of the budget)``
    (:func:`budgetprune.budget.chosen_share`)."""
    from budgetprune.budget import chosen_share

    chosen = pruner.method.keep_masks()
    _, report = pruner.finalize()
    final = {g: torch.zeros(len(m), dtype=torch.bool) for g, m in chosen.items()}
    for g, kept in report["masks"].items():
        final[g][kept] = True
    dropped = sum(int((chosen[g] & ~final[g]).sum()) for g in chosen)
    return report, dropped, chosen_share(pruner.graph, chosen, final, pruner.budgets, pruner.block)


def random_batches(dataset, steps: int, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of ``batch`` (image, label) pairs drawn at random (seeded) from ``dataset``."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        idx = torch.randint(len(dataset), (batch,), generator=g)
        out.append((torch.stack([dataset[int(i)][0] for i in idx]),
                    torch.tensor([int(dataset[int(i)][1]) for i in idx])))
    return out


def masked_output(model: nn.Module, graph, masks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model's output on ``x`` with every group's gates fixed at its 0/1 ``masks`` (the hooks
    removed afterwards): the gated network a compacted one must reproduce."""
    hooks = GateHooks(model, graph, {gid: (lambda n, m=m: m.float()) for gid, m in masks.items()})
    try:
        with torch.no_grad():
            return model(x)
    finally:
        hooks.remove()


def randomise_batchnorms(model: nn.Module, seed: int = 1) -> None:
    """Running statistics and affine parameters of every BatchNorm drawn at random (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_((torch.rand(m.num_features, generator=gen) - 0.5) * 0.4)
