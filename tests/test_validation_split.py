"""--validation: training images held out from the seed, disjoint from what is trained on, the
same in every run with that seed, for data in memory, folders of images and any dataset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from budgetprune.data import FolderDataset, load_dataset
from budgetprune.data.validation import split_validation, validation_count
from budgetprune.errors import ConfigError, DataError

from test_folder_data import folder, write_tree


def _keys(ds) -> list[bytes]:
    """Each image of an in-memory dataset by its pixels."""
    return [bytes(img.flatten().tolist()) for img in ds.images]


def test_held_out_images_are_disjoint_counted_and_fixed_by_the_seed():
    full = load_dataset("demo").train.subset(torch.arange(500))
    train, val = split_validation(full, 100, seed=3)
    assert (len(train), len(val)) == (400, 100)
    keys_train, keys_val = _keys(train), _keys(val)
    assert set(keys_train).isdisjoint(keys_val) and sorted(keys_train + keys_val) == sorted(_keys(full))
    again_train, again_val = split_validation(full, 100, seed=3)
    assert _keys(again_val) == keys_val and torch.equal(again_train.labels, train.labels)
    assert _keys(split_validation(full, 100, seed=4)[1]) != keys_val  # another seed, another split
    # a fraction of the training images; the counts as the README says
    assert len(split_validation(full, 0.1, seed=3)[1]) == 50
    assert split_validation(full, 0, seed=3) == (full, None)
    assert validation_count(0.001, 500) == 1


def test_validation_images_are_never_augmented():
    cifar_like = load_dataset("demo").train.subset(torch.arange(50))
    cifar_like.augment = True
    train, val = split_validation(cifar_like, 10, seed=0)
    assert train.augment and not val.augment


def test_too_many_held_out_is_a_one_line_error():
    full = load_dataset("demo").train.subset(torch.arange(20))
    with pytest.raises(DataError, match="holds out 20 of the 20 training images, leaving none to train on"):
        split_validation(full, 20, seed=0)
    with pytest.raises(ConfigError, match="give a number of training images to hold out"):
        split_validation(full, 1.5, seed=0)


def test_any_map_style_dataset_is_split_into_subsets():
    data = TensorDataset(torch.arange(30, dtype=torch.float32).unsqueeze(1), torch.zeros(30, dtype=torch.long))
    train, val = split_validation(data, 6, seed=1)
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert sorted(train.indices + val.indices) == list(range(30)) and len(val) == 6


def test_folders_of_images_are_split_into_folder_datasets(tmp_path):
    splits = load_dataset(folder(write_tree(tmp_path / "images", per_class=6)), augment="flip", workers=0)
    train, val = split_validation(splits.train, 5, seed=0)
    assert isinstance(train, FolderDataset) and isinstance(val, FolderDataset)
    assert len(train) + len(val) == len(splits.train) and len(val) == 5
    assert set(train.paths).isdisjoint(val.paths) and set(train.paths) | set(val.paths) == set(splits.train.paths)
    assert train.augment and not val.augment
    assert val.paths == split_validation(splits.train, 5, seed=0)[1].paths
    labels = {p: int(splits.train.labels[i]) for i, p in enumerate(splits.train.paths)}
    assert [labels[p] for p in val.paths] == val.labels.tolist()


def test_a_run_on_a_folder_logs_validation_accuracy_every_epoch(tmp_path, capsys):
    import json
    from budgetprune import cli
    tree, out = write_tree(tmp_path / "images"), tmp_path / "run"
    code = cli.main(["prune", "--model", "lenet5", "--data", folder(tree), "--image-size", "16", "--budget", "2x",
                     "--validation", "6", "--workers", "1", "--out", str(out), "--no-progress", "--teacher-epochs",
                     "1", "--epochs", "1", "--finetune-epochs", "1", "--lowlr-epochs", "0"])
    assert code == 0, capsys.readouterr().err
    history = json.loads((out / "history.json").read_text())
    assert [r["stage"] for r in history] == ["teacher", "prune", "finetune"]
    assert all(r["val_accuracy"] in {k / 6 for k in range(7)} for r in history)  # 6 images held out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation_images"] == 6 and {"val_accuracy", "unpruned_val_accuracy"} <= set(metrics)
