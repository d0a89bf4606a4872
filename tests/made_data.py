"""Tiny datasets written in torchvision's exact on-disk formats, for tests that cannot use the real ones.

* idx files (MNIST, Fashion-MNIST): big-endian header ``0 0 0x08 ndim`` + one 4-byte size per dimension, then
  the bytes; ``ROOT/MNIST/raw`` or ``ROOT/FashionMNIST/raw``, plain or ``.gz``.
* CIFAR-10: ``ROOT/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, pickled dicts with ``data`` (uint8
  ``(n, 3072)``, each row the R, G and B planes of a 32 x 32 image, row-major) and ``labels`` (a list of ints),
  and ``batches.meta`` with ``label_names``.

torchvision's ``CIFAR10`` checks every file's md5 sum against the published CIFAR-10 files, which made files
cannot match; :func:`vouch_for_cifar10` puts the made files' own sums into torchvision's checklist for one test,
so that torchvision's unchanged loader reads them.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def idx_bytes(array: torch.Tensor, type_code: int = 0x08) -> bytes:
    """``array`` as an idx file's bytes (type ``type_code``; 0x08 is unsigned bytes)."""
    header = bytes([0, 0, type_code, array.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def write_idx(path: Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path``, gzipped when the name ends in ``.gz``."""
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def made_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 images of ``shape`` and labels cycling through the ten classes (every class present)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen), torch.arange(n) % 10


def write_fashion_mnist(root: Path, num_train: int = 40, num_test: int = 20, seed: int = 0,
                        gzip_train: bool = True) -> dict[str, tuple]:
    """A Fashion-MNIST folder ``root/FashionMNIST/raw`` (28 x 28; the training images gzipped unless not
    ``gzip_train``, the rest plain: torchvision's download leaves both); returns ``{"train": (images (N, 28, 28),
    labels), "test": ...}``."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for split, prefix, n in (("train", "train", num_train), ("test", "t10k", num_test)):
        x, y = made_images(n, (28, 28), seed + (split == "test"))
        suffix = ".gz" if split == "train" and gzip_train else ""
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(x))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", idx_bytes(y))
        written[split] = (x, y)
    return written


def write_cifar10(root: Path, num_train: int = 50, num_test: int = 20, seed: int = 0) -> dict[str, tuple]:
    """A CIFAR-10 folder ``root/cifar-10-batches-py``: ``num_train`` images over the five training batches,
    ``num_test`` in ``test_batch``; returns ``{"train": (images (N, 3, 32, 32), labels), "test": ...}``."""
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True)
    written = {}
    for split, n in (("train", num_train), ("test", num_test)):
        x, y = made_images(n, (3, 32, 32), seed + (split == "test"))
        written[split] = (x, y)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        for name, rows in zip(names, np.array_split(np.arange(n), len(names)), strict=True):
            batch = {"batch_label": name, "labels": y[rows].tolist(), "data": x[rows].reshape(len(rows), -1).numpy(),
                     "filenames": [f"made_{i}.png" for i in rows]}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": -(-num_train // 5), "label_names": CIFAR_CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def vouch_for_cifar10(monkeypatch, root: Path) -> None:
    """Put the md5 sums of the files under ``root/cifar-10-batches-py`` into torchvision's ``CIFAR10`` checklist
    (for the current test only), in place of the published CIFAR-10 sums."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR_FOLDER

    def sums(entries: list) -> list:
        return [[name, md5(folder / name) if (folder / name).is_file() else sum_] for name, sum_ in entries]

    monkeypatch.setattr(CIFAR10, "train_list", sums(CIFAR10.train_list))
    monkeypatch.setattr(CIFAR10, "test_list", sums(CIFAR10.test_list))
    (_, meta_md5), = sums([[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=meta_md5))
