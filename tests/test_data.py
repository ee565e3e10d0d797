"""Tests of budgetprune.data: idx and CIFAR readers, ImageDataset, demo set, downloads.

Everything runs offline: CIFAR files and idx files are written by the tests in the exact
publisher formats, and downloads are served by a local http.server on 127.0.0.1.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from budgetprune.data import (
    DataSplits,
    DatasetInfo,
    ImageDataset,
    available_datasets,
    download,
    load_dataset,
)
from budgetprune.data.cifar import RestrictedUnpickler, load_pickle
from budgetprune.data.demo import DEMO_TEST_PER_CLASS, DEMO_TRAIN_PER_CLASS, demo_folder
from budgetprune.data.idx import parse_idx, read_idx, write_idx
from budgetprune.data.registry import REGISTRY, Resource, resolve_root
from budgetprune.errors import DataError, DownloadError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- helpers


def write_mnist_folder(folder: Path, n_train=30, n_test=10, gz=True, seed=0) -> dict[str, np.ndarray]:
    """Four small MNIST-format idx files in ``folder``; returns the arrays by base name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for base, arr in arrays.items():
        write_idx(folder / (base + (".gz" if gz else "")), arr)
    return arrays


def cifar_batch(n: int, label_key: str, num_classes: int, seed: int) -> dict:
    """A batch dict as in the CIFAR python version (bytes keys, as ``encoding="bytes"`` gives)."""
    rng = np.random.default_rng(seed)
    entry = {
        b"batch_label": f"batch {seed}".encode(),
        label_key.encode(): [int(v) for v in rng.integers(0, num_classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    if label_key == "fine_labels":
        entry[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
    return entry


def dump(path: Path, obj, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(folder: Path, n=20) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n, "labels", 10, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n, "labels", 10, 99)
    for name, entry in batches.items():
        dump(folder / name, entry)
    dump(folder / "batches.meta", {b"label_names": [f"c10_{i}".encode() for i in range(10)], b"num_vis": 3072})
    return batches


def write_cifar100(folder: Path, n=20) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {"train": cifar_batch(3 * n, "fine_labels", 100, 1), "test": cifar_batch(n, "fine_labels", 100, 2)}
    for name, entry in batches.items():
        dump(folder / name, entry)
    dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        },
    )
    return batches


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- registry


def test_available_datasets():
    assert available_datasets() == ["cifar10", "cifar100", "demo", "fashion-mnist", "mnist"]


def test_unknown_dataset_lists_choices_and_suggests():
    with pytest.raises(DataError) as err:
        load_dataset("fashon-mnist")
    msg = str(err.value)
    assert "unknown dataset 'fashon-mnist'" in msg and "did you mean 'fashion-mnist'" in msg
    assert "cifar10, cifar100, demo, fashion-mnist, mnist" in msg and "\n" not in msg
    with pytest.raises(DataError, match="choose one of cifar10, cifar100, demo, fashion-mnist, mnist"):
        load_dataset("imagenet")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("BUDGETPRUNE_DATA", str(tmp_path))
    assert resolve_root(None) == tmp_path
    monkeypatch.delenv("BUDGETPRUNE_DATA")
    assert resolve_root(None) == Path.home() / ".cache" / "budgetprune" / "data"
    assert resolve_root("~/x") == Path.home() / "x"


# --------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, gz, dtype):
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(7, 5, 3)) * 100).astype(dtype)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), arr)
    if gz:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_header_layout():
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    np.testing.assert_array_equal(parse_idx(raw, "x"), arr)
    # int32 is big-endian on disk
    raw32 = bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big") + (1).to_bytes(4, "big") + (258).to_bytes(4, "big")
    np.testing.assert_array_equal(parse_idx(raw32, "x"), np.array([1, 258], dtype=np.int32))


def test_write_idx_gz_is_deterministic(tmp_path):
    arr = np.arange(100, dtype=np.uint8).reshape(10, 10)
    a = write_idx(tmp_path / "a.gz", arr).read_bytes()
    b = write_idx(tmp_path / "b.gz", arr).read_bytes()
    assert a == b


def _good_idx() -> bytes:
    return bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)) + bytes(2 * 784)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"\x00\x00", "too short"),
        (b"\x08\x03\x00\x00" + _good_idx()[4:], "bad magic"),
        (bytes([0, 0, 0x07, 3]) + _good_idx()[4:], "bad magic"),
        (_good_idx()[:10], "truncated inside its header"),
        (_good_idx()[:-5], "truncated"),
        (_good_idx() + b"\x00", "1 bytes follow"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_malformed_idx_raises_naming_file(tmp_path, raw, fragment, gz):
    path = tmp_path / ("bad-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_damaged_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_good_idx())[:-30])
    with pytest.raises(DataError, match="damaged gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    path.write_bytes(_good_idx())  # plain content under a .gz name
    with pytest.raises(DataError, match="not gzip-compressed"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_folder_loads_exactly(tmp_path, gz):
    arrays = write_mnist_folder(tmp_path / "mnist", gz=gz)
    splits = load_dataset("mnist", tmp_path)
    assert isinstance(splits, DataSplits) and splits.info.name == "mnist"
    assert splits.info == DatasetInfo("mnist", 1, (28, 28), 10, tuple("0123456789"))
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (30, 1, 28, 28)
    assert splits.train.labels.dtype == torch.int64
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays[IDX_NAMES[0]]))
    assert torch.equal(splits.train.labels, torch.from_numpy(arrays[IDX_NAMES[1]]).long())
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays[IDX_NAMES[2]]))
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays[IDX_NAMES[3]]).long())
    assert splits.train.mean == (0.1307,) and splits.train.std == (0.3081,)
    assert not splits.train.augment and not splits.test.augment


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    write_mnist_folder(tmp_path / "somewhere")
    splits = load_dataset("fashion-mnist", tmp_path / "somewhere")
    assert len(splits.train) == 30 and splits.info.class_names[0] == "T-shirt/top"
    assert splits.train.mean == (0.2860,) and splits.train.std == (0.3530,)


def test_missing_folder_names_expected_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "fashion-mnist") in msg and "--download" in msg and "\n" not in msg
    for base in IDX_NAMES:
        assert f"{base}(.gz)" in msg


def test_incomplete_folder_names_only_missing_files(tmp_path):
    write_mnist_folder(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert "is missing t10k-labels-idx1-ubyte(.gz)" in msg and "train-images" not in msg


def test_label_image_count_mismatch(tmp_path):
    write_mnist_folder(tmp_path / "mnist", n_train=30)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(29, dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert "train-labels-idx1-ubyte.gz holds 29 labels" in msg and "holds 30 images" in msg


def test_label_out_of_range_and_wrong_kind(tmp_path):
    arrays = write_mnist_folder(tmp_path / "mnist")
    labels = arrays[IDX_NAMES[3]].copy()
    labels[3] = 10
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz holds label 10 but MNIST has 10 classes"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", arrays[IDX_NAMES[3]])
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz holds uint8 values of shape \(10, 32, 32\)"):
        load_dataset("mnist", tmp_path)


def test_malformed_file_in_folder_is_named(tmp_path):
    write_mnist_folder(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-100]))
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset("mnist", tmp_path)
    assert str(bad) in str(err.value)


# --------------------------------------------------------------------------- CIFAR


def _expected_images(entries: list[dict]) -> torch.Tensor:
    data = np.concatenate([e[b"data"] for e in entries])
    out = np.empty((len(data), 3, 32, 32), dtype=np.uint8)
    for k, row in enumerate(data):  # the documented layout: 1024 R, then 1024 G, then 1024 B, row-major
        for c in range(3):
            out[k, c] = row[c * 1024 : (c + 1) * 1024].reshape(32, 32)
    return torch.from_numpy(out)


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_python_layout(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path / "my-cifar"
    batches = write_cifar10(folder)
    splits = load_dataset("cifar10", tmp_path if nested else folder)
    train_entries = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert splits.train.images.shape == (100, 3, 32, 32) and splits.test.images.shape == (20, 3, 32, 32)
    assert torch.equal(splits.train.images, _expected_images(train_entries))
    assert torch.equal(splits.test.images, _expected_images([batches["test_batch"]]))
    assert splits.train.labels.tolist() == sum((e[b"labels"] for e in train_entries), [])
    assert splits.test.labels.tolist() == batches["test_batch"][b"labels"]
    assert splits.train.augment and not splits.test.augment
    assert splits.train.mean == (0.4914, 0.4822, 0.4465) and splits.train.std == (0.2470, 0.2435, 0.2616)
    assert splits.info.name == "cifar10" and splits.info.in_channels == 3 and splits.info.image_size == (32, 32)
    assert splits.info.class_names == tuple(f"c10_{i}" for i in range(10))


def test_cifar100_python_layout(tmp_path):
    batches = write_cifar100(tmp_path / "cifar-100-python")
    splits = load_dataset("cifar100", tmp_path)
    assert splits.train.images.shape == (60, 3, 32, 32) and splits.test.images.shape == (20, 3, 32, 32)
    assert torch.equal(splits.train.images, _expected_images([batches["train"]]))
    assert splits.train.labels.tolist() == batches["train"][b"fine_labels"]
    assert splits.test.labels.tolist() == batches["test"][b"fine_labels"]
    assert splits.info.num_classes == 100 and splits.info.class_names[7] == "fine_7"
    assert splits.train.mean == (0.5071, 0.4865, 0.4409) and splits.train.std == (0.2673, 0.2564, 0.2762)
    assert splits.train.augment and not splits.test.augment


def test_cifar_without_meta_uses_builtin_names(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "meta").unlink()
    info = load_dataset("cifar100", tmp_path).info
    assert info.class_names[:3] == ("apple", "aquarium_fish", "baby") and info.class_names[-1] == "worm"


def test_cifar_missing_files(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="is missing data_batch_3: extract cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


def test_cifar_forbidden_global_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    marker = tmp_path / "pwned"
    dump(folder / "data_batch_2", {b"data": Evil(marker), b"labels": []})
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    assert str(folder / "data_batch_2") in str(err.value)
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    assert not marker.exists()


def test_cifar_damaged_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="is not a readable CIFAR python-version pickle") as err:
        load_dataset("cifar10", tmp_path)
    assert str(folder / "test_batch") in str(err.value)
    dump(folder / "test_batch", cifar_batch(20, "fine_labels", 100, 3))  # a CIFAR-100 batch in CIFAR-10
    with pytest.raises(DataError, match="has no 'labels' entry"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_loads_numpy(protocol):
    obj = {b"a": np.arange(12, dtype=np.uint8).reshape(3, 4), b"b": [1, 2], b"c": np.ones(3, dtype=np.float32)}
    back = RestrictedUnpickler(io.BytesIO(pickle.dumps(obj, protocol=protocol))).load()
    assert back.keys() == obj.keys()
    np.testing.assert_array_equal(back[b"a"], obj[b"a"])
    np.testing.assert_array_equal(back[b"c"], obj[b"c"])
    assert back[b"b"] == [1, 2]


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Evil(Path("/nonexistent/x"))),
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"cnumpy\nload\n(S'x'\ntR.",
        pickle.dumps(collections.OrderedDict(a=1)),
    ],
)
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(DataError, match="which is not allowed"):
        RestrictedUnpickler(io.BytesIO(payload), path="f.pkl").load()


def test_load_pickle_uses_bytes_encoding(tmp_path):
    # a Python 2 str (opcode U/S) must come back as bytes, as the CIFAR format requires
    path = tmp_path / "p"
    path.write_bytes(b"(dp0\nS'data'\np1\nS'xyz'\np2\ns.")
    assert load_pickle(path) == {b"data": b"xyz"}


# --------------------------------------------------------------------------- ImageDataset


def _dataset(augment=False, n=16, channels=3, size=32, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    mean, std = (0.4914, 0.4822, 0.4465)[:channels], (0.2470, 0.2435, 0.2616)[:channels]
    return ImageDataset(images, labels, mean, std, augment=augment)


def test_batch_normalisation_matches_manual():
    ds = _dataset()
    idx = torch.tensor([3, 0, 7])
    x, y = ds.batch(idx)
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    manual = (ds.images[idx].float() / 255 - mean) / std
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(x, manual, rtol=0, atol=1e-6)
    assert torch.equal(y, ds.labels[idx]) and y.dtype == torch.int64
    x1, y1 = ds[7]
    torch.testing.assert_close(x1, manual[2], rtol=0, atol=1e-6)
    assert y1 == int(ds.labels[7]) and isinstance(y1, int)
    assert len(ds) == 16


def test_subset_keeps_flags():
    ds = _dataset(augment=True)
    sub = ds.subset([1, 5, 9])
    assert len(sub) == 3 and sub.augment and sub.mean == ds.mean and sub.std == ds.std
    assert torch.equal(sub.images, ds.images[[1, 5, 9]]) and torch.equal(sub.labels, ds.labels[[1, 5, 9]])
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[2, 4]] = True
    assert torch.equal(ds.subset(mask).labels, ds.labels[[2, 4]])
    assert len(ds.subset(range(4))) == 4


def test_augmentation_deterministic_and_a_real_crop_flip():
    ds = _dataset(augment=True)
    idx = torch.arange(16)
    a, ya = ds.batch(idx, torch.Generator().manual_seed(123))
    b, _ = ds.batch(idx, torch.Generator().manual_seed(123))
    c, _ = ds.batch(idx, torch.Generator().manual_seed(124))
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ya, ds.labels)
    # every augmented image is one of the 9x9x2 crops/flips of the zero-padded original
    plain = _dataset(augment=False)
    padded = torch.nn.functional.pad(plain.batch(idx)[0], (4, 4, 4, 4), value=0.0)
    pad_value = ((0 - torch.tensor(ds.mean)) / torch.tensor(ds.std)).view(3, 1, 1)
    flips_seen = set()
    for k in range(16):
        canvas = padded[k].clone()
        border = torch.ones(40, 40, dtype=torch.bool)
        border[4:36, 4:36] = False
        canvas[:, border] = pad_value.expand(3, 40, 40)[:, border]
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.allclose(
                a[k], canvas[:, dy : dy + 32, dx : dx + 32].flip(-1) if f else canvas[:, dy : dy + 32, dx : dx + 32]
            )
        ]
        assert matches, f"image {k} is not a crop/flip of its original"
        flips_seen.add(matches[0][2])
    assert flips_seen == {False, True}


def test_no_augmentation_for_test_like_sets():
    ds = _dataset(augment=False)
    idx = torch.arange(4)
    a, _ = ds.batch(idx, torch.Generator().manual_seed(1))
    b, _ = ds.batch(idx, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_dataloader_compatible():
    loader = torch.utils.data.DataLoader(_dataset(augment=True), batch_size=5)
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 32, 32) and y.shape == (5,)


# --------------------------------------------------------------------------- demo


def test_demo_loads_offline_balanced(tmp_path):
    splits = load_dataset("demo", root=tmp_path / "does-not-exist")
    assert splits.info.name == "demo" and splits.info.num_classes == 10
    assert splits.info.class_names == (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip
    assert len(splits.train) == 10 * DEMO_TRAIN_PER_CLASS == 5000
    assert len(splits.test) == 10 * DEMO_TEST_PER_CLASS == 1000
    assert torch.bincount(splits.train.labels, minlength=10).tolist() == [DEMO_TRAIN_PER_CLASS] * 10
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [DEMO_TEST_PER_CLASS] * 10
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.train.mean == (0.2860,) and splits.train.std == (0.3530,)
    assert not splits.train.augment
    assert int(splits.train.images.max()) > 200  # real images, not blanks
    assert not torch.equal(splits.train.images[0], splits.train.images[1])


def test_demo_files_small_and_credited():
    folder = Path(str(demo_folder()))
    files = [folder / f"{b}.gz" for b in IDX_NAMES]
    assert all(f.is_file() for f in files)
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert total <= 3 * 1024 * 1024
    assert "Zalando SE" in (folder / "LICENSE.txt").read_text(encoding="utf-8")
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "Xiao" in readme and "Rasul" in readme and "Vollgraf" in readme


# --------------------------------------------------------------------------- download


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving ``served/``; records the paths requested."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/files", dir=served, requests=requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve_mnist(server, monkeypatch, corrupt: str | None = None) -> dict[str, np.ndarray]:
    files = server.dir / "files"
    arrays = write_mnist_folder(files)
    resources = []
    for base in IDX_NAMES:
        name = f"{base}.gz"
        md5 = md5_of(files / name)
        if name == corrupt:
            md5 = "0" * 32
        resources.append(Resource(name, md5, ("http://invalid.invalid/" + name,)))
    monkeypatch.setitem(REGISTRY, "mnist", dataclasses.replace(REGISTRY["mnist"], resources=tuple(resources)))
    return arrays


def test_download_good_files_verified_and_skipped_when_present(http_server, monkeypatch, tmp_path):
    arrays = _serve_mnist(http_server, monkeypatch)
    root = tmp_path / "data"
    folder = download("mnist", root, mirror=http_server.url, progress=False)
    assert folder == root / "mnist"
    for base in IDX_NAMES:
        assert md5_of(folder / f"{base}.gz") == md5_of(http_server.dir / "files" / f"{base}.gz")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{b}.gz" for b in IDX_NAMES)  # no temp files
    assert len(http_server.requests) == 4
    splits = load_dataset("mnist", root)
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays[IDX_NAMES[3]]).long())
    download("mnist", root, mirror=http_server.url, progress=False)
    assert len(http_server.requests) == 4  # nothing fetched again


def test_download_refetches_a_file_with_wrong_checksum(http_server, monkeypatch, tmp_path):
    _serve_mnist(http_server, monkeypatch)
    folder = download("mnist", tmp_path, mirror=http_server.url, progress=False)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    download("mnist", tmp_path, mirror=http_server.url, progress=False)
    assert http_server.requests[-1].endswith("/t10k-labels-idx1-ubyte.gz") and len(http_server.requests) == 5
    load_dataset("mnist", tmp_path)


def test_download_corrupt_file_is_removed(http_server, monkeypatch, tmp_path):
    _serve_mnist(http_server, monkeypatch, corrupt="train-labels-idx1-ubyte.gz")
    with pytest.raises(DownloadError) as err:
        download("mnist", tmp_path, mirror=http_server.url, progress=False)
    msg = str(err.value)
    actual = md5_of(http_server.dir / "files" / "train-labels-idx1-ubyte.gz")
    assert "train-labels-idx1-ubyte.gz" in msg and "0" * 32 in msg and actual in msg and "removed" in msg
    left = sorted(p.name for p in (tmp_path / "mnist").iterdir())
    assert left == ["train-images-idx3-ubyte.gz"]  # fetched before the bad one; no partial or bad file


def test_load_dataset_download_flag(http_server, monkeypatch, tmp_path):
    _serve_mnist(http_server, monkeypatch)
    with pytest.raises(DataError):
        load_dataset("mnist", tmp_path)
    splits = load_dataset("mnist", tmp_path, download=True, mirror=http_server.url, progress=False)
    assert len(splits.train) == 30 and len(http_server.requests) == 4


def test_download_network_failure_names_url(http_server, monkeypatch, tmp_path):
    _serve_mnist(http_server, monkeypatch)
    mirror = http_server.url + "/nothing-here"
    with pytest.raises(DownloadError) as err:
        download("mnist", tmp_path, mirror=mirror, progress=False)
    msg = str(err.value)
    assert f"{mirror}/train-images-idx3-ubyte.gz" in msg and "404" in msg
    assert "by hand" in msg and str(tmp_path / "mnist") in msg and "\n" not in msg
    assert not any((tmp_path / "mnist").iterdir())


def _tar_gz(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


def _serve_cifar10(server, monkeypatch, tmp_path, extra=()) -> dict[str, dict]:
    src = tmp_path / "src" / "cifar-10-batches-py"
    batches = write_cifar10(src, n=10)
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in sorted(src.iterdir())}
    archive = server.dir / "files" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    _tar_gz(archive, members, list(extra))
    resource = Resource(
        "cifar-10-python.tar.gz",
        md5_of(archive),
        ("http://invalid.invalid/cifar-10-python.tar.gz",),
        members=tuple((name, hashlib.md5(data).hexdigest()) for name, data in members.items()),
    )
    monkeypatch.setitem(REGISTRY, "cifar10", dataclasses.replace(REGISTRY["cifar10"], resources=(resource,)))
    return batches


def test_download_cifar_archive_extracted(http_server, monkeypatch, tmp_path):
    batches = _serve_cifar10(http_server, monkeypatch, tmp_path)
    root = tmp_path / "data"
    folder = download("cifar10", root, mirror=http_server.url, progress=False)
    assert folder == root / "cifar-10-batches-py"
    assert not (folder / "cifar-10-python.tar.gz").exists()
    splits = load_dataset("cifar10", root)
    assert len(splits.train) == 50 and splits.test.labels.tolist() == batches["test_batch"][b"labels"]
    download("cifar10", root, mirror=http_server.url, progress=False)
    assert len(http_server.requests) == 1


def test_download_cifar_unsafe_archive_refused(http_server, monkeypatch, tmp_path):
    evil = tarfile.TarInfo("../evil.txt")
    evil.size = 3
    _serve_cifar10(http_server, monkeypatch, tmp_path, extra=[evil])
    root = tmp_path / "data" / "inner"
    with pytest.raises(DownloadError, match=r"unsafe member '\.\./evil\.txt'"):
        download("cifar10", root, mirror=http_server.url, progress=False)
    assert not list((tmp_path / "data").rglob("evil.txt"))
    assert not (root / "cifar-10-batches-py" / "cifar-10-python.tar.gz").exists()
    assert not (root / "cifar-10-batches-py" / "test_batch").exists()

    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _serve_cifar10(http_server, monkeypatch, tmp_path, extra=[link])
    with pytest.raises(DownloadError, match="a link or special file"):
        download("cifar10", root, mirror=http_server.url, progress=False)


def test_download_demo_needs_nothing(tmp_path):
    folder = download("demo", tmp_path, progress=False)
    assert (folder / "train-images-idx3-ubyte.gz").is_file()
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- shared copy


@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist").is_dir(), reason="no shared Fashion-MNIST copy")
def test_shared_fashion_mnist():
    splits = load_dataset("fashion-mnist", SHARED_DATA)
    assert len(splits.train) == 60000 and len(splits.test) == 10000
    assert torch.bincount(splits.train.labels, minlength=10).tolist() == [6000] * 10
    # the published normalisation constants fit the data
    assert abs(splits.train.images.float().mean().item() / 255 - 0.2860) < 1e-3
