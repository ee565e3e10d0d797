"""The user's training loop of the README, shared by the tests that drive a Pruner by hand."""

from __future__ import annotations

import torch.nn.functional as F


def pruning_steps(model, pruner, optimizer, batches, loss_fn=F.cross_entropy) -> None:
    """One optimizer step per (x, y) of ``batches``: task loss + the pruner's penalty, then the pruner's step."""
    for x, y in batches:
        loss = loss_fn(model(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
