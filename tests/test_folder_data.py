"""``--data folder:PATH``: a tree of the user's own images, streamed from disk.

Every tree is written by the tests into tmp_path: small PNGs whose colour depends on the
class (a model learns it in an epoch), plus the odd files and layouts the reader must handle.
"""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image

import budgetprune
from budgetprune import cli
from budgetprune.data import FolderDataset, load_dataset
from budgetprune.data.folder import holdout_split, list_samples
from budgetprune.data.images import ImageTransform
from budgetprune.engine import iterate_batches
from budgetprune.errors import ConfigError, DataError
from budgetprune.pipeline import PruneConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 220)}
FAST = ["--teacher-epochs", "2", "--epochs", "2", "--finetune-epochs", "1", "--lowlr-epochs", "0",
        "--deploy-runtime", "none"]  # the result's speed is not timed here (tests/test_cli.py times it)


def write_image(path, colour, size=(16, 16), seed=0, mode="RGB"):
    """A noisy image of ``colour`` (w x h = ``size``) at ``path``, in Pillow ``mode``."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def write_tree(root, per_class=12, classes=COLOURS, size=(16, 16)):
    """``root/<class>/NN.png``, ``per_class`` images per class (an int or a dict by class)."""
    for c, (name, colour) in enumerate(classes.items()):
        n = per_class[name] if isinstance(per_class, dict) else per_class
        for i in range(n):
            write_image(root / name / f"{i:02d}.png", colour, size, seed=100 * c + i)
    return root


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "images")


def folder(path) -> str:
    return f"folder:{path}"


def test_classes_are_sorted_folder_names_and_labels_follow_them(tree):
    splits = load_dataset(folder(tree), workers=0)
    assert splits.info.class_names == ("blue", "green", "red")
    assert (splits.info.in_channels, splits.info.image_size, splits.info.num_classes) == (3, (32, 32), 3)
    for ds in (splits.train, splits.test):
        assert isinstance(ds, FolderDataset)
        for path, label in zip(ds.paths, ds.labels.tolist()):
            assert path.parent.name == splits.info.class_names[label]
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert len(splits.train) + len(splits.test) == 36


def test_holdout_split_is_deterministic_stratified_and_said(tree):
    first, second = load_dataset(folder(tree), workers=0), load_dataset(folder(tree), workers=0)
    assert first.test.paths == second.test.paths and first.train.paths == second.train.paths
    assert sorted(first.test.labels.tolist()) == [0, 1, 2]  # round(10% of 12) = 1 per class
    assert not set(first.train.paths) & set(first.test.paths)
    assert "held out" in first.note and str(tree) in first.note and "33 train and 3 test" in first.note
    # classes of other sizes: 10% rounded, at least one of each class with two or more, none of a single image
    samples = [(tree / "a" / f"{i}.png", 0) for i in range(25)] + [(tree / "b" / f"{i}.png", 1) for i in range(4)] \
        + [(tree / "c" / "0.png", 2)]
    train, test = holdout_split(samples, tree, 3)
    assert [label for _, label in test].count(0) == 2 and [label for _, label in test].count(1) == 1
    assert (tree / "c" / "0.png", 2) in train and len(train) + len(test) == 30
    # the held-out images depend on the paths only: more images in one class leave another's choice alone
    held_red = [p for p in first.test.paths if p.parent.name == "red"]
    write_image(tree / "blue" / "99.png", COLOURS["blue"])
    assert [p for p in load_dataset(folder(tree), workers=0).test.paths if p.parent.name == "red"] == held_red


def test_train_and_val_folders_are_the_splits(tmp_path):
    root = tmp_path / "set"
    write_tree(root / "train", per_class=6)
    write_tree(root / "val", per_class=2)
    splits = load_dataset(folder(root), workers=0)
    assert (len(splits.train), len(splits.test)) == (18, 6)
    assert all(p.parts[-3] == "val" for p in splits.test.paths)
    assert "held out" not in splits.note and str(root / "val") in splits.note
    (root / "val").rename(root / "test")  # test/ when there is no val/
    splits = load_dataset(folder(root), workers=0)
    assert len(splits.test) == 6 and all(p.parts[-3] == "test" for p in splits.test.paths)


def test_image_extensions_any_case_hidden_and_other_files_skipped(tmp_path):
    root = tmp_path / "mixed"
    for name in ("a.PNG", "b.jpg", "c.JPEG", "d.bmp", "e.gif", "f.webp", "nested/g.png"):
        write_image(root / "cls" / name, (200, 100, 50))
    for name in (".hidden.png", ".cache/h.png", "notes.txt", "i.tiff"):
        write_image(root / "cls" / name, (200, 100, 50)) if name.endswith(("png", "tiff")) else \
            (root / "cls" / name).write_text("not an image")
    write_tree(root, per_class=2, classes={"other": (0, 0, 0)})
    (root / ".git").mkdir()  # a hidden folder is no class
    samples = list_samples(root, ["cls", "other"])
    names = sorted(p.name for p, label in samples if label == 0)
    assert names == ["a.PNG", "b.jpg", "c.JPEG", "d.bmp", "e.gif", "f.webp", "g.png"]
    assert load_dataset(folder(root), workers=0).info.class_names == ("cls", "other")


def test_grayscale_transparent_and_16_bit_images_become_rgb(tmp_path):
    root = tmp_path / "modes"
    write_image(root / "x" / "gray.png", (90, 90, 90), mode="L")
    write_image(root / "x" / "rgba.png", (10, 200, 30), mode="RGBA")
    write_image(root / "x" / "palette.gif", (10, 200, 30), mode="P")
    Image.fromarray(np.full((16, 16), 128 * 257, dtype=np.uint16)).save(root / "x" / "deep.png")
    write_tree(root, per_class=1, classes={"y": (0, 0, 0)})
    ds = load_dataset(folder(root), image_size=8, augment="none", workers=0).train
    raw = {p.name: ds.read(i, None)[0] for i, p in enumerate(ds.paths)}
    assert all(img.shape == (3, 8, 8) and img.dtype == torch.uint8 for img in raw.values())
    gray = raw["gray.png"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert raw["deep.png"].unique().tolist() == [128]  # scaled from 16 bits, not clipped to 255
    assert raw["rgba.png"][1].float().mean() > 150 > raw["rgba.png"][0].float().mean()


def _gradient_image(path, size=(24, 16)):
    """A left-to-right ramp (so a flip shows) in red, constant green and blue."""
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    pixels[..., 1:] = 60
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("augment", ["none", "flip", "crop-flip"])
def test_augmentation_presets_give_square_batches(tmp_path, augment):
    root = tmp_path / "ramp"
    for i in range(8):
        _gradient_image(root / "a" / f"{i}.png")
        _gradient_image(root / "b" / f"{i}.png", size=(16, 30))  # portrait
    splits = load_dataset(folder(root), image_size=12, augment=augment, workers=0)
    train = splits.train
    plain = torch.stack([train[i][0] for i in range(len(train))])  # indexing never augments
    assert plain.shape == (len(train), 3, 12, 12)
    g = torch.Generator().manual_seed(0)
    augmented = torch.cat([x for _, x, _ in iterate_batches(train, 5, generator=g)])
    assert augmented.shape == plain.shape
    if augment == "none":
        assert torch.equal(augmented, plain)
    elif augment == "flip":
        flipped = [torch.equal(a, p.flip(-1)) for a, p in zip(augmented, plain)]
        assert all(f or torch.equal(a, p) for f, a, p in zip(flipped, augmented, plain))
        assert 0 < sum(flipped) < len(train)
    else:
        assert not any(torch.equal(a, p) or torch.equal(a, p.flip(-1)) for a, p in zip(augmented, plain))
    again = torch.cat([x for _, x, _ in iterate_batches(train, 5, generator=torch.Generator().manual_seed(0))])
    other = torch.cat([x for _, x, _ in iterate_batches(train, 5, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(again, augmented) and (augment == "none") == torch.equal(other, augmented)
    assert torch.equal(torch.stack([splits.test[i][0] for i in range(len(splits.test))]),
                       torch.cat([x for _, x, _ in iterate_batches(splits.test, 4)]))  # test: never augmented


def test_evaluation_resizes_the_shorter_side_and_crops_the_centre():
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)  # 30 wide, 10 high: black | white | black thirds
    pixels[:, 10:20] = 255
    out = ImageTransform(5)(Image.fromarray(pixels))
    assert out.shape == (3, 5, 5) and bool((out[..., 1:4] == 255).all())
    assert bool((out > 200).all())  # the black sides only blur the border (squashed, columns 0 and 4 were black)


def test_workers_give_the_same_batches_as_the_main_process(tree):
    splits = load_dataset(folder(tree), image_size=16, workers=2)
    try:
        for ds, shuffle in ((splits.test, False), (splits.train, False), (splits.train, True)):
            runs = []
            for workers in (0, 2):
                g = torch.Generator().manual_seed(3)
                runs.append([(i, x, y) for i, x, y in iterate_batches(ds, 7, shuffle=shuffle, generator=g,
                                                                       workers=workers)])
            assert len(runs[0]) == len(runs[1]) == -(-len(ds) // 7)
            for (i0, x0, y0), (i1, x1, y1) in zip(*runs):
                assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
        loader = splits.train._loader
        workers = set(multiprocessing.active_children())
        list(iterate_batches(splits.train, 7, shuffle=True, generator=torch.Generator().manual_seed(4), workers=2))
        assert splits.train._loader is loader and loader.persistent_workers  # workers kept across epochs
        assert set(multiprocessing.active_children()) == workers and len(workers) >= 4  # 2 per split
    finally:
        splits.close()
    assert not workers & set(multiprocessing.active_children())  # close() stopped them


def test_command_line_records_the_folder_as_an_absolute_path(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    args = cli.build_parser().parse_args(["prune", "--model", "lenet5", "--data", f"folder:{tree.name}",
                                          "--budget", "2x", "--out", "run"])
    assert cli._given_options(args, PruneConfig())["data"] == folder(tree)


# -- bad input: one line naming the problem and the fix ------------------------------------

def _no_classes(root):
    root.mkdir()
    write_image(root / "loose.png", (0, 0, 0))


def _empty_class(root):
    write_tree(root, per_class=2)
    (root / "yellow" / "sub").mkdir(parents=True)
    (root / "yellow" / "readme.txt").write_text("no images here")


def _mismatch(root):
    write_tree(root / "train", per_class=2)
    write_tree(root / "val", per_class=1, classes={"red": (1, 1, 1), "purple": (2, 2, 2)})


def _stray_folder(root):
    write_tree(root / "train", per_class=2)
    write_tree(root / "val", per_class=1)
    write_tree(root, per_class=1, classes={"cat": (1, 1, 1)})


@pytest.mark.parametrize("make, words", [
    (lambda root: None, ["does not exist", "one sub-folder of images per class"]),
    (lambda root: root.write_text("a file"), ["is not a folder"]),
    (lambda root: root.mkdir(), ["holds no class folders", "sub-folder named after the class"]),
    (_no_classes, ["holds images but no class folders"]),
    (_empty_class, ["yellow holds no images", ".png", "add images to it or remove it"]),
    (_mismatch, ["hold different classes", "blue, green only in", "purple only in", "same class folders"]),
    (_stray_folder, ["also cat/", "inside train/"]),
    (lambda root: write_tree(root, per_class=1), ["holds two images", "none can be held out"]),
])
def test_bad_trees_are_one_line_errors(tmp_path, make, words):
    root = tmp_path / "tree"
    make(root)
    with pytest.raises(DataError) as info:
        load_dataset(folder(root), workers=0)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "folder:"}, "needs the folder's path"),
    ({"image_size": 0}, "--image-size must be a positive"),
    ({"augment": "zoom"}, "unknown augmentation 'zoom'"),
    ({"workers": -1}, "--workers must be 0"),
    ({"download": True}, "drop --download"),
    ({"name": "demo", "image_size": 32}, "apply to --data folder:PATH only"),
    ({"name": "demo", "augment": "flip"}, "apply to --data folder:PATH only"),
])
def test_bad_options_are_one_line_errors(tree, kwargs, words):
    kwargs = {"name": folder(tree), **kwargs}
    with pytest.raises(ConfigError, match=words):
        load_dataset(**kwargs)
    config_fields = {k: v for k, v in kwargs.items() if k in ("image_size", "augment", "workers")}
    if config_fields:  # the run's options are checked the same way before anything trains
        with pytest.raises(ConfigError, match=words):
            PruneConfig(data=kwargs["name"], **config_fields).validate()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_names_the_file_from_any_worker(tree, workers):
    bad = tree / "green" / "05.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    splits = load_dataset(folder(tree), workers=workers)
    ds = splits.train if bad in splits.train.paths else splits.test
    try:
        with pytest.raises(DataError) as info:
            list(iterate_batches(ds, 4))
    finally:
        ds.close()
    msg = str(info.value)
    assert str(bad) in msg and "\n" not in msg and "remove the file or replace it" in msg and "Traceback" not in msg


def test_cli_errors_exit_2_with_one_line(tree, tmp_path, capsys):
    (tree / "red" / "03.png").write_bytes(b"GIF89a garbage")
    cases = [(["--data", folder(tmp_path / "nowhere")], "does not exist"),
             (["--data", folder(tree)], str(tree / "red" / "03.png")),  # found while training
             (["--data", "demo", "--image-size", "16"], "folder:PATH only")]
    for i, (args, words) in enumerate(cases):
        code = cli.main(["prune", "--model", "lenet5", "--budget", "2x", "--out", str(tmp_path / f"run{i}"),
                         "--image-size", "16", "--workers", "0", "--no-progress", *FAST, *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("budgetprune: error: ") and err.count("\n") == 1, err
        assert words in err


# -- whole runs ---------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_prune_on_an_image_folder_meets_its_budget(tree, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["prune", "--model", "lenet5", "--data", folder(tree), "--image-size", "16", "--budget", "2x",
                     "--lr", "3e-3", "--workers", "2", "--out", str(out), "--no-progress", *FAST])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "3 classes, 33 train and 3 test images, 16x16 RGB" in stdout and "held out" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == folder(tree) and m["pruned"]["volume"] <= m["budget"] + 1e-9
    assert m["budget_ratio"] <= 1.0 and m["compaction_max_abs_diff"] <= 1e-5
    assert m["unpruned_test_accuracy"] >= 2 / 3  # the colours are learnt (chance: 1/3)
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["augment"], config["workers"]) == (16, None, 2)
    assert (out / "model.pt").is_file() and (out / "report.md").is_file()
    # evaluate finds the model's input size and scores the images the run held out
    assert cli.main(["evaluate", str(out / "model.pt"), "--data", folder(tree), "--workers", "0"]) == 0
    stdout = capsys.readouterr().out
    assert "test (3 images): accuracy" in stdout
    # --workers is how the data is read, not what the run computes: a resume may change it
    assert cli.main(["prune", "--out", str(out), "--resume", "--workers", "0", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == m["test_accuracy"]


@pytest.mark.slow
def test_api_prunes_on_a_folder_name_with_teacher_outputs_computed_per_batch(tree, monkeypatch):
    import budgetprune.pipeline as pipeline

    def no_table(*args, **kwargs):
        raise AssertionError("teacher logits of streamed data must not be tabulated in memory")

    monkeypatch.setattr(pipeline, "predict_logits", no_table)
    lines = []
    model = budgetprune.create_model("lenet5", in_channels=3, num_classes=3, input_size=(16, 16))
    small, metrics = budgetprune.prune(model, data=folder(tree), image_size=16, augment="none", workers=0,
                                       budget="2x", teacher_epochs=0, epochs=1, finetune_epochs=1, lowlr_epochs=0,
                                       progress=False, log=lines.append)
    assert metrics["data"] == folder(tree) and metrics["pruned"]["volume"] <= metrics["budget"] + 1e-9
    assert any("held out" in line for line in lines)
    assert small(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(ConfigError, match="test_data is given with the dataset name"):
        budgetprune.prune(model, folder(tree), object(), budget="2x", image_size=16)
    with pytest.raises(ConfigError, match="no data"):
        budgetprune.prune(model, budget="2x")
