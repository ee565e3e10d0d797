#!/usr/bin/env python3
"""Build the embedded ``demo`` dataset: a class-balanced subset of Fashion-MNIST.

Usage: python scripts/make_demo_dataset.py [FASHION_MNIST_DIR] [--train-per-class 500]
       [--test-per-class 100] [--seed 2017] [--out src/budgetprune/data/demo]

FASHION_MNIST_DIR (default ../shared/data/fashion-mnist relative to the repository root)
holds the four idx files, plain or .gz. From each class the script keeps the
``--train-per-class`` training and ``--test-per-class`` test images whose keys
``blake2b("<seed>:<split>:<index>")`` are smallest (a seeded choice that needs no random
number generator and so does not depend on library versions), in their original order,
and writes them as gzip idx files (mtime 0, level 9): the same input gives the same bytes.
It also writes README.md with the sizes and sha256 of the files, and fails if they take
more than 3 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from budgetprune.data.idx import find_idx_file, read_idx, write_idx  # noqa: E402
from budgetprune.data.mnist import FASHION_CLASSES, IDX_FILES  # noqa: E402

MAX_BYTES = 3 * 1024 * 1024
SPLITS = (("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          ("test", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))  # fmt: skip


def choose(labels: np.ndarray, per_class: int, seed: int, split: str) -> np.ndarray:
    """Indices of ``per_class`` images of each class, picked by seeded hash, sorted."""
    chosen = []
    for c in range(len(FASHION_CLASSES)):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise SystemExit(f"class {c} has only {len(members)} {split} images, fewer than {per_class}")
        keys = [hashlib.blake2b(f"{seed}:{split}:{i}".encode(), digest_size=8).digest() for i in members]
        order = sorted(range(len(members)), key=keys.__getitem__)
        chosen.append(members[order[:per_class]])
    return np.sort(np.concatenate(chosen))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def readme(args, counts: dict[str, int], files: list[Path]) -> str:
    rows = "\n".join(f"| `{p.name}` | {p.stat().st_size:,} | `{sha256(p)}` |" for p in files)
    total = sum(p.stat().st_size for p in files)
    return f"""# The `demo` dataset

A small, class-balanced subset of **Fashion-MNIST**, shipped inside budgetprune so that
`budgetprune demo` and the tests run offline: {counts['train']:,} training images
({args.train_per_class} per class) and {counts['test']:,} test images ({args.test_per_class} per class),
28x28 grey, 10 classes (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker,
Bag, Ankle boot), stored as gzip idx files in the same format as the original.

## Credit and licence

Fashion-MNIST is by Zalando Research: Han Xiao, Kashif Rasul, Roland Vollgraf,
"Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms",
arXiv:1708.07747, 2017 (https://github.com/zalandoresearch/fashion-mnist).
It is distributed under the MIT licence, Copyright (c) 2017 Zalando SE; see `LICENSE.txt`.

## How the subset was made

`python scripts/make_demo_dataset.py` (source: the four Fashion-MNIST idx files, by default
`../shared/data/fashion-mnist`). For every class it keeps the images whose key
`blake2b("{args.seed}:<split>:<index in the original file>")` (8-byte digest) is smallest,
{args.train_per_class} from the training set and {args.test_per_class} from the test set, in their
original order. Files are gzip'd with mtime 0 and level 9, so running the script again gives
the same bytes:

| file | bytes | sha256 |
|---|---|---|
{rows}

Total: {total:,} bytes.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("source", nargs="?", type=Path, default=REPO.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2017)
    parser.add_argument("--out", type=Path, default=REPO / "src" / "budgetprune" / "data" / "demo")
    args = parser.parse_args(argv)

    missing = [b for b in IDX_FILES if find_idx_file(args.source, b) is None]
    if missing:
        print(f"error: {args.source} is missing {', '.join(missing)}(.gz): pass the Fashion-MNIST folder",
              file=sys.stderr)  # fmt: skip
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    counts: dict[str, int] = {}
    for split, images_base, labels_base in SPLITS:
        images = read_idx(find_idx_file(args.source, images_base))
        labels = read_idx(find_idx_file(args.source, labels_base))
        per_class = args.train_per_class if split == "train" else args.test_per_class
        idx = choose(labels, per_class, args.seed, split)
        counts[split] = len(idx)
        written.append(write_idx(args.out / f"{images_base}.gz", images[idx]))
        written.append(write_idx(args.out / f"{labels_base}.gz", labels[idx]))
    total = sum(p.stat().st_size for p in written)
    (args.out / "README.md").write_text(readme(args, counts, written), encoding="utf-8")
    for p in written:
        print(f"{p.stat().st_size:>10,}  {sha256(p)}  {p.name}")
    print(f"{total:>10,}  total ({counts['train']} train + {counts['test']} test images) in {args.out}")
    if total > MAX_BYTES:
        print(f"error: {total:,} bytes is over the 3 MB budget: use --train-per-class 450 --test-per-class 90",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
