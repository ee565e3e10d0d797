"""The Pruner inside a PyTorch Lightning fit and a Hugging Face Trainer run, end to end on
small data: the budget is met, the trainer's model gets the smaller network, and (Lightning)
the pruner's state rides in the trainer's checkpoint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import budgetprune
from trainer_ranks import DictDataset, HFClassifier

L = pytest.importorskip("lightning", reason="pip install 'budgetprune[lightning]'")
transformers = pytest.importorskip("transformers", reason="pip install 'budgetprune[huggingface]'")


def _data(demo_subsets, n=256):
    train, _ = demo_subsets(n)
    xs = torch.stack([train[i][0] for i in range(len(train))])
    ys = torch.tensor([int(train[i][1]) for i in range(len(train))])
    return xs, ys


class LitClassifier(L.LightningModule):
    def __init__(self, scheduler="step"):
        super().__init__()
        self.model = budgetprune.create_model("lenet5")
        self.example_input_array = torch.zeros(4, 1, 28, 28)
        self.scheduler = scheduler
        self.validation_outputs = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.validation_outputs.append((self.model(x[:4]), self.model(x[:4])))  # the same input twice

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        if self.scheduler == "onecycle":
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=1e-2, total_steps=self.trainer.estimated_stepping_batches), "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}


def _trainer(tmp_path, callback, epochs=2):
    return L.Trainer(max_epochs=epochs, callbacks=[callback], default_root_dir=tmp_path, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


@pytest.mark.parametrize("scheduler", ["step", "onecycle"])
def test_lightning_callback_prunes_to_the_budget(scheduler, demo_subsets, tmp_path):
    from budgetprune.integrations.lightning import BudgetPruning
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=32, shuffle=True)
    module = LitClassifier(scheduler)
    callback = BudgetPruning("flops=0.5", gate_init=3.0)
    trainer = _trainer(tmp_path, callback)
    trainer.fit(module, loader, val_dataloaders=torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xs[:8], ys[:8]), batch_size=8))
    pruner, report = callback.pruner, callback.report
    assert pruner.steps == trainer.global_step == 16  # one pruner step per optimizer step
    assert 0.8 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    assert module.model is callback.pruned_model  # the module now holds the smaller network
    # the gates have their own optimizer at a constant rate; the trainer's schedules only the weights
    gates = {id(p) for g in callback.driver.optimizer.param_groups for p in g["params"]}
    assert not gates & {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert [g["lr"] for g in callback.driver.optimizer.param_groups] == [1e-2]
    if scheduler == "step":
        assert trainer.optimizers[0].param_groups[0]["lr"] == 2.5e-4  # StepLR halved the weights' rate twice
    # validation ran with deterministic gates: the same input gave the same output
    assert module.validation_outputs and all(torch.equal(a, b) for a, b in module.validation_outputs)
    with torch.no_grad():
        assert module.model(xs[:5]).shape == (5, 10)
    saved = torch.load(trainer.checkpoint_callback.best_model_path or next(tmp_path.rglob("*.ckpt")),
                       weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "BudgetPruning" in k)
    assert state["counted"] == 16 and state["pruner"]["steps"] == 16


def test_huggingface_callback_prunes_to_the_budget(demo_subsets, tmp_path):
    from budgetprune.integrations.huggingface import BudgetPruningCallback
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets)
    model = HFClassifier()
    callback = BudgetPruningCallback("flops=0.5", xs[:4], module="backbone", gate_init=3.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=32,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=8, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DictDataset(xs, ys), callbacks=[callback])
    trainer.train()
    pruner, report = callback.pruner, callback.report
    assert pruner.steps == 16
    assert 0.8 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    assert model.backbone is callback.pruned_model
    with torch.no_grad():
        assert model(xs[:5])["logits"].shape == (5, 10)


def test_lightning_fit_resumed_from_its_checkpoint_continues_the_pruner(demo_subsets, tmp_path):
    """A fit stopped after one epoch and resumed from Lightning's checkpoint: the pruner's step count
    and gates come back with the optimizer (which holds the gates' group) and the run ends on budget."""
    from budgetprune.integrations.lightning import BudgetPruning
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=32)
    first = BudgetPruning("flops=0.5", gate_init=3.0, total_steps=16)
    trainer = _trainer(tmp_path / "a", first, epochs=1)
    trainer.fit(LitClassifier(), loader)
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    saved = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "BudgetPruning" in k)
    at_start = {}

    class Watched(BudgetPruning):
        def on_train_start(self, trainer, pl_module):
            at_start.update(steps=self.pruner.steps,
                            method={k: v.clone() for k, v in self.pruner.method.state_dict().items()})

    second = Watched("flops=0.5", gate_init=3.0, total_steps=16)
    trainer = _trainer(tmp_path / "b", second, epochs=2)
    trainer.fit(LitClassifier(), loader, ckpt_path=ckpt)
    assert saved["pruner"]["steps"] == at_start["steps"] == 8  # the schedule's clock came back
    assert all(torch.equal(saved["pruner"]["method"][k], at_start["method"][k]) for k in saved["pruner"]["method"])
    assert second.pruner.steps == 16 and trainer.global_step == 16
    assert 0.8 <= second.report["pruned"]["flops"] / second.pruner.budget.absolute(second.pruner.graph) <= 1.0


def test_huggingface_run_resumed_from_a_checkpoint_restores_the_pruner(demo_subsets, tmp_path):
    from budgetprune.integrations.huggingface import STATE_FILE, BudgetPruningCallback
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets)

    def run(callback, **kwargs):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=32,
                                              learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=8,
                                              use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=HFClassifier(), args=args, train_dataset=DictDataset(xs, ys),
                                       callbacks=[callback])
        trainer.train(**kwargs)
        return trainer

    first = BudgetPruningCallback("flops=0.5", xs[:4], module="backbone", gate_init=3.0)
    run(first)
    saved = torch.load(tmp_path / "checkpoint-8" / STATE_FILE, weights_only=True)
    assert saved["pruner"]["steps"] == 8
    at_start = {}

    class Watched(BudgetPruningCallback):
        def on_train_begin(self, *args, **kwargs):
            super().on_train_begin(*args, **kwargs)
            at_start.update(steps=self.pruner.steps,
                            method={k: v.clone() for k, v in self.pruner.method.state_dict().items()})

    second = Watched("flops=0.5", xs[:4], module="backbone", gate_init=3.0)
    run(second, resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert at_start["steps"] == 8 and second.pruner.steps == 16
    assert all(torch.equal(saved["pruner"]["method"][k], at_start["method"][k]) for k in saved["pruner"]["method"])
    assert 0.8 <= second.report["pruned"]["flops"] / second.pruner.budget.absolute(second.pruner.graph) <= 1.0


def test_a_method_whose_penalty_reads_the_forward_pass_is_refused_by_the_callbacks():
    from budgetprune.errors import ConfigError
    from budgetprune.integrations.driver import TrainerDriver
    model = budgetprune.create_model("lenet5")
    pruner = budgetprune.Pruner(model, torch.zeros(2, 1, 28, 28), 0.5, method="sensitivity", total_steps=4)
    with pytest.raises(ConfigError, match="sensitivity.*own loop"):
        TrainerDriver(pruner, 1e-2)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this Python")
@pytest.mark.parametrize("trainer", ["lightning", "huggingface"])
def test_callbacks_under_torchrun_give_every_rank_the_same_pruned_network(trainer, tmp_path):
    """Two gloo ranks, each starting from other weights, under the trainer's own DDP: the callback
    (built after the trainer wraps the model) ends on every rank with rank 0's gates, the same
    masks and the same weights, one pruner step per optimizer step, on budget."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port),
                           str(Path(__file__).with_name("trainer_ranks.py")), trainer, str(tmp_path)],
                          capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert r0["world_size"] == 2 and r0["global_step"] == r0["steps"] == r1["steps"] == 8
    for key in ("method_state", "weights"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), key
    assert all(torch.equal(torch.as_tensor(r0["masks"][k]), torch.as_tensor(r1["masks"][k])) for k in r0["masks"])
    assert 0.8 <= r0["pruned"]["flops"] / r0["budget"] <= 1.0
    if trainer == "huggingface":  # rank 0 alone writes the pruner's state into each checkpoint folder
        from budgetprune.integrations.huggingface import STATE_FILE
        saved = torch.load(tmp_path / trainer / "checkpoint-4" / STATE_FILE, weights_only=True)
        assert saved["pruner"]["steps"] == 4


def _spy_on_survival(monkeypatch) -> list[dict]:
    """What each survival measurement was given (the module run, its batches' inputs), then the real one."""
    from budgetprune import gate_start
    calls, real = [], gate_start.survival_table

    def spy(model, method, batches, **kwargs):
        batches = list(batches)
        take = kwargs.get("inputs") or gate_start.batch_inputs
        calls.append({"module": model, "inputs": [take(b) for b in batches]})
        calls[-1]["table"] = table = real(model, method, batches, **kwargs)
        return table
    monkeypatch.setattr(gate_start, "survival_table", spy)
    return calls


def _lowest_log_alpha(pruner) -> float:
    from budgetprune import gate_start
    return min(float(g.log_alpha.detach().min()) for g in gate_start.hard_concrete_gates(pruner.method))


def test_lightning_callback_chooses_where_the_gates_start(demo_subsets, tmp_path, monkeypatch):
    """gate_survival: before the first step the start is measured through the pruned network on the
    first gate_start_images examples of the training DataLoader, and the gates are placed there."""
    from budgetprune import gate_start
    from budgetprune.integrations.lightning import BudgetPruning
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=32)  # in order
    calls, at_start = _spy_on_survival(monkeypatch), {}

    class Watched(BudgetPruning):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            at_start.update(steps=self.pruner.steps, low=_lowest_log_alpha(self.pruner))

    module = LitClassifier()
    callback = Watched("flops=0.5", gate_survival=0.9, gate_start_images=50)
    _trainer(tmp_path, callback, epochs=1).fit(module, loader)
    (call,) = calls
    assert call["module"] is callback.pruner.model  # the pruned network itself ran
    assert len(call["inputs"]) == 2 and all(torch.equal(x, xs[32 * i:32 * (i + 1)]) for i, x in enumerate(call["inputs"]))
    chosen = callback.pruner.gate_start
    assert chosen["log_alpha"] == gate_start.choose_start(call["table"], 0.9) and chosen["survival"] == 0.9
    assert at_start == {"steps": 0, "low": chosen["log_alpha"]}
    assert callback.report["gate_start"] == chosen
    assert 0.8 <= callback.report["pruned"]["flops"] / callback.pruner.budget.absolute(callback.pruner.graph) <= 1.0


def test_huggingface_callback_chooses_where_the_gates_start(demo_subsets, tmp_path, monkeypatch):
    """The whole model runs on the Trainer's dict batches without their labels; its logits are compared."""
    from budgetprune import gate_start
    from budgetprune.integrations.huggingface import BudgetPruningCallback
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets)
    calls, at_start = _spy_on_survival(monkeypatch), {}

    class Watched(BudgetPruningCallback):
        def on_train_begin(self, *args, **kwargs):
            super().on_train_begin(*args, **kwargs)
            at_start.update(steps=self.pruner.steps, low=_lowest_log_alpha(self.pruner))

    model = HFClassifier()
    callback = Watched("flops=0.5", xs[:4], module="backbone", gate_survival=0.9, gate_start_images=64)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=32,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=DictDataset(xs, ys), callbacks=[callback]).train()
    (call,) = calls
    assert call["module"] is model
    assert len(call["inputs"]) == 2 and all(set(named) == {"pixel_values"} for named in call["inputs"])
    chosen = callback.pruner.gate_start
    assert chosen["log_alpha"] == gate_start.choose_start(call["table"], 0.9)
    assert at_start == {"steps": 0, "low": chosen["log_alpha"]}


def test_callbacks_refuse_gate_survival_with_gate_init_or_no_images():
    from budgetprune.errors import ConfigError
    from budgetprune.integrations.huggingface import BudgetPruningCallback
    from budgetprune.integrations.lightning import BudgetPruning
    with pytest.raises(ConfigError, match="give one"):
        BudgetPruning("flops=0.5", gate_survival=0.85, gate_init=3.0)
    with pytest.raises(ConfigError, match="survival must be a fraction"):
        BudgetPruningCallback("flops=0.5", torch.zeros(2, 1, 28, 28), gate_survival=1.5)
    with pytest.raises(ConfigError, match="gate_start_images"):
        BudgetPruning("flops=0.5", gate_survival=0.85, gate_start_images=0)


def test_a_resumed_lightning_fit_keeps_the_measured_start(demo_subsets, tmp_path, monkeypatch):
    """The start is measured once: a fit resumed from its checkpoint gets the gates and the record back."""
    from budgetprune.integrations.lightning import BudgetPruning
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=32)
    calls = _spy_on_survival(monkeypatch)
    first = BudgetPruning("flops=0.5", gate_survival=0.9, gate_start_images=32, total_steps=16)
    _trainer(tmp_path / "a", first, epochs=1).fit(LitClassifier(), loader)
    second = BudgetPruning("flops=0.5", gate_survival=0.9, gate_start_images=32, total_steps=16)
    _trainer(tmp_path / "b", second, epochs=2).fit(LitClassifier(), loader, ckpt_path=next((tmp_path / "a").rglob("*.ckpt")))
    assert len(calls) == 1 and second.pruner.steps == 16
    assert second.report["gate_start"] == first.report["gate_start"]


def test_gate_survival_refuses_batches_it_cannot_run_in_one_line(demo_subsets, tmp_path):
    from budgetprune.errors import ConfigError
    from budgetprune.integrations.lightning import BudgetPruning
    xs, ys = _data(demo_subsets, 64)

    class DictBatches(LitClassifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch["x"]), batch["y"])

    dicts = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in zip(xs, ys)], batch_size=32)
    with pytest.raises(ConfigError, match="hold dicts, not tensors.*set gate_init instead"):
        _trainer(tmp_path / "a", BudgetPruning("flops=0.5", gate_survival=0.9)).fit(DictBatches(), dicts)
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=32)
    with pytest.raises(ConfigError, match="one DataLoader; this trainer has several"):
        _trainer(tmp_path / "b", BudgetPruning("flops=0.5", gate_survival=0.9)).fit(
            LitClassifier(), {"a": pairs, "b": pairs})


class HFRenamedLabels(HFClassifier):
    """A model whose labels are an argument the Trainer finds by name (not ``labels``)."""

    def forward(self, pixel_values, class_label=None):
        return super().forward(pixel_values, class_label)


class RenamedDataset(DictDataset):
    def __getitem__(self, i):
        return {"pixel_values": self.xs[i], "class_label": self.ys[i]}


def test_huggingface_gate_survival_leaves_out_labels_the_trainer_finds_by_name(demo_subsets, tmp_path, monkeypatch):
    from budgetprune.integrations.huggingface import BudgetPruningCallback
    torch.manual_seed(0)
    xs, ys = _data(demo_subsets, 64)
    calls = _spy_on_survival(monkeypatch)
    callback = BudgetPruningCallback("flops=0.5", xs[:4], module="backbone", gate_survival=0.9, gate_start_images=32)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=32,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    transformers.Trainer(model=HFRenamedLabels(), args=args, train_dataset=RenamedDataset(xs, ys),
                         callbacks=[callback]).train()
    (call,) = calls
    assert [set(named) for named in call["inputs"]] == [{"pixel_values"}]


def test_choose_gate_start_refuses_a_module_without_the_pruned_model():
    from budgetprune.errors import ConfigError
    model = budgetprune.create_model("lenet5")
    x = torch.randn(8, 1, 28, 28)
    pruner = budgetprune.Pruner(model, x, "flops=0.5", total_steps=4)
    with pytest.raises(ConfigError, match="does not hold the pruned model"):
        pruner.choose_gate_start([x], module=budgetprune.create_model("lenet5"))
    from budgetprune import gate_start
    assert pruner.choose_gate_start([x], module=torch.nn.Sequential(model)) in gate_start.START_GRID  # a wrapper runs
