"""One rank of a Lightning fit or a Hugging Face Trainer run under torchrun, with budgetprune's
callback: ``torchrun --nproc_per_node 2 tests/trainer_ranks.py lightning|huggingface OUT``. Its
Hugging Face model and dataset are also those of tests/test_integrations.py.

Each rank trains on its shard of 256 demo images (the trainer's own distributed sampler) and
writes what its callback ended with to ``OUT/<rank>.pt``: the masks, the pruned network's
weights, the pruner's gates and step count and the budget, for the test to compare across ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
from budgetprune.data import load_dataset

STEPS = 8  # optimizer steps of the run: 2 epochs of 4 global batches of 32 (16 per rank)


def _data():
    train = load_dataset("demo").train.subset(range(256))
    xs = torch.stack([train[i][0] for i in range(len(train))])
    ys = torch.tensor([int(train[i][1]) for i in range(len(train))])
    return xs, ys


def lightning(out: Path) -> dict:
    import lightning as L

    from budgetprune.integrations.lightning import BudgetPruning

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = budgetprune.create_model("lenet5")
            self.example_input_array = torch.zeros(4, 1, 28, 28)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    xs, ys = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=32, shuffle=True)
    callback = BudgetPruning("flops=0.5", gate_init=3.0)
    trainer = L.Trainer(max_epochs=2, callbacks=[callback], default_root_dir=out, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        accelerator="cpu", devices=2, strategy="ddp")
    module = Classifier()
    trainer.fit(module, loader)
    assert module.model is callback.pruned_model
    return {"global_step": trainer.global_step, "world_size": trainer.world_size, **_result(callback)}


class HFClassifier(nn.Module):
    """What a Hugging Face Trainer expects: forward(inputs, labels) → {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.backbone = budgetprune.create_model("lenet5")

    def forward(self, pixel_values, labels=None):
        logits = self.backbone(pixel_values)
        return {"logits": logits, **({} if labels is None else {"loss": F.cross_entropy(logits, labels)})}


class DictDataset(torch.utils.data.Dataset):
    """Images and labels as the dicts a Hugging Face Trainer batches."""

    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return {"pixel_values": self.xs[i], "labels": self.ys[i]}


def huggingface(out: Path) -> dict:
    import transformers

    from budgetprune.integrations.huggingface import BudgetPruningCallback

    xs, ys = _data()
    model = HFClassifier()
    callback = BudgetPruningCallback("flops=0.5", xs[:4], module="backbone", gate_init=3.0)
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=16,
                                          learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=4,
                                          use_cpu=True, disable_tqdm=True, ddp_backend="gloo")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DictDataset(xs, ys), callbacks=[callback])
    trainer.train()
    assert model.backbone is callback.pruned_model
    return {"global_step": trainer.state.global_step, "world_size": args.world_size, **_result(callback)}


def _result(callback) -> dict:
    pruner, report = callback.pruner, callback.report
    return {"masks": report["masks"], "pruned": report["pruned"], "budget": pruner.budget.absolute(pruner.graph),
            "steps": pruner.steps, "weights": callback.pruned_model.state_dict(),
            "method_state": pruner.method.state_dict()}


if __name__ == "__main__":
    import conftest  # noqa: F401  (torchvision's operator schemas: Lightning and transformers import torchvision)
    torch.set_num_threads(1)
    kind, folder = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(int(os.environ["RANK"]))  # other weights on each rank: the trainers must agree them
    result = {"lightning": lightning, "huggingface": huggingface}[kind](folder / kind)
    torch.save(result, folder / f"{os.environ['RANK']}.pt")
