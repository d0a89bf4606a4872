"""The image sources on disk, in torchvision's layouts: MNIST, Fashion-MNIST and CIFAR-10.

Under the data root (``--data-dir`` > ``$INVW_DATA_DIR`` > ``./data``, :func:`inference.data.resolve_data_dir`):

=============  =================================  =================================================
source         files                              read by
=============  =================================  =================================================
MNIST          ``MNIST/raw/*-ubyte[.gz]``         :func:`read_idx` (checked idx reader)
Fashion-MNIST  ``FashionMNIST/raw/*-ubyte[.gz]``  :func:`read_idx`; the same four file names as MNIST
CIFAR-10       ``cifar-10-batches-py/``           ``torchvision.datasets.CIFAR10`` (``data_batch_1..5``,
                                                  ``test_batch``, ``batches.meta``: pickles)
=============  =================================  =================================================

With ``allow_download`` a missing source is fetched by torchvision's own class (``MNIST``, ``FashionMNIST``,
``CIFAR10`` with ``download=True``), which puts it in exactly these places. torchvision's ``CIFAR10`` checks the
md5 sum of every batch file and of ``batches.meta`` against the published CIFAR-10 files each time it loads; a
file that fails is a :class:`CorruptDataError` naming it. Its idx loaders check nothing when loading, so
MNIST-style files are read by :func:`read_idx`, which checks magic number, header and size.

Images come back as they are stored, one byte per pixel: ``uint8 (N, C, H, W)``, a quarter of the memory of a
float copy (CIFAR-10's 50,000 training images: 154 MB as bytes, 614 MB as float32).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

DATA_ENV_VAR = "INVW_DATA_DIR"
_IDX_DTYPES = {0x08: torch.uint8}
_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10
"""Every source has ten classes."""


class DataNotFoundError(FileNotFoundError):
    """The dataset is not under the data root and downloading was not allowed (or failed)."""


class CorruptDataError(ValueError):
    """A data file is truncated, fails its checksum, has a bad header or disagrees with its labels."""


class Source(StrEnum):
    """Where the images come from (before any one-off transformation)."""

    MNIST = "mnist"
    FASHION_MNIST = "fashion-mnist"
    CIFAR10 = "cifar10"


@dataclass(frozen=True)
class SourceInfo:
    """How a source is stored and how large it is."""

    title: str  # for messages: "MNIST", "Fashion-MNIST", "CIFAR-10"
    folder: str  # under the data root, torchvision's layout
    torchvision_class: str  # the torchvision.datasets class that downloads it
    image_shape: tuple[int, int, int]  # (C, H, W)
    full_sizes: tuple[int, int]  # (train, test) of the published dataset


SOURCES: dict[Source, SourceInfo] = {
    Source.MNIST: SourceInfo("MNIST", "MNIST/raw", "MNIST", (1, 28, 28), (60_000, 10_000)),
    Source.FASHION_MNIST: SourceInfo("Fashion-MNIST", "FashionMNIST/raw", "FashionMNIST", (1, 28, 28),
                                     (60_000, 10_000)),
    Source.CIFAR10: SourceInfo("CIFAR-10", "cifar-10-batches-py", "CIFAR10", (3, 32, 32), (50_000, 10_000)),
}


RawSplit = tuple[torch.Tensor, torch.Tensor]
"""One split as stored: images ``uint8 (N, C, H, W)`` and labels ``int64 (N,)`` in ``[0, 10)``."""


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an idx file (plain or gzip) as a uint8 tensor, checking magic number and size.

    Raises
    ------
    CorruptDataError
        On a bad magic number, an unsupported type, or a file shorter or longer than its header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip raises these on truncated, corrupt or non-gzip files
        raise CorruptDataError(f"cannot read idx file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDataError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise CorruptDataError(f"{path} has {len(raw)} bytes but its header {shape} needs {expected} (truncated?)")
    if expected == header:  # a zero-sized dimension: torch.frombuffer refuses empty buffers
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load_source(source: Source, root: Path, allow_download: bool = False) -> dict[str, RawSplit]:
    """The ``"train"`` and ``"test"`` splits of ``source`` under ``root`` (downloading first if allowed).

    Raises
    ------
    DataNotFoundError
        Files are missing (the message names the folder, the files and the flags that help).
    CorruptDataError
        A file cannot be read, fails its checksum, or its images and labels disagree.
    """
    source = Source(source)
    info = SOURCES[source]
    folder = root / info.folder
    if _missing(source, folder) and allow_download:
        _download(info, root)
    missing = _missing(source, folder)
    if missing:
        raise DataNotFoundError(
            f"{info.title} not found under {folder} (missing {', '.join(missing)}); point --data-dir or "
            f"${DATA_ENV_VAR} at a folder holding {info.folder}, or pass --download to fetch it"
        )
    splits = _read_cifar10(root, folder) if source is Source.CIFAR10 else _read_idx_pair(folder)
    for split, raw in splits.items():
        _check_split(info, split, raw, folder)
    return splits


def _check_split(info: SourceInfo, split: str, raw: RawSplit, folder: Path) -> None:
    x, y = raw
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise CorruptDataError(f"{info.title} {split} images {tuple(x.shape)} and labels {tuple(y.shape)} disagree")
    if x.numel() == 0:
        raise CorruptDataError(f"{info.title} {split} images under {folder} hold no pixels (shape {tuple(x.shape)})")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= NUM_CLASSES:
        found = f"min {low}" if low < 0 else f"max {high}"
        raise CorruptDataError(f"{info.title} {split} labels out of range 0..{NUM_CLASSES - 1} ({found})")


def _download(info: SourceInfo, root: Path) -> None:
    import torchvision  # imported lazily: only needed for downloading

    dataset = getattr(torchvision.datasets, info.torchvision_class)
    try:
        for train in (True, False):
            dataset(str(root), train=train, download=True)
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise DataNotFoundError(f"{info.title} download into {root} failed: {err}") from None


# --------------------------------------------------------------------------- idx (MNIST, Fashion-MNIST)
def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(source: Source, folder: Path) -> list[str]:
    if source is Source.CIFAR10:
        return [name for name, _ in _cifar10_files() if not (folder / name).is_file()]
    return [name for name in _IDX_FILES.values() if _find_idx(folder, name) is None]


def _read_idx_pair(folder: Path) -> dict[str, RawSplit]:
    splits = {}
    for split in ("train", "test"):
        x = read_idx(_find_idx(folder, _IDX_FILES[(split, "images")]))  # type: ignore[arg-type]
        y = read_idx(_find_idx(folder, _IDX_FILES[(split, "labels")]))  # type: ignore[arg-type]
        splits[split] = (x.unsqueeze(1), y.long())  # (N, 1, H, W); load_source checks the shapes
    return splits


# --------------------------------------------------------------------------- CIFAR-10
def _cifar10_files() -> list[tuple[str, str]]:
    """``(file name, md5)`` of every file torchvision's ``CIFAR10`` checks, as torchvision lists them."""
    from torchvision.datasets import CIFAR10

    meta = CIFAR10.meta
    return [*((n, m) for n, m in CIFAR10.train_list + CIFAR10.test_list), (meta["filename"], meta["md5"])]


def _read_cifar10(root: Path, folder: Path) -> dict[str, RawSplit]:
    """Both splits through ``torchvision.datasets.CIFAR10`` (which verifies every file's md5 first)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = CIFAR10(str(root), train=train)
        except RuntimeError as err:  # "... not found or corrupted": the files are there, so a checksum failed
            failed = [name for name, md5 in _cifar10_files() if not check_integrity(str(folder / name), md5)]
            if not failed:
                raise CorruptDataError(f"cannot read CIFAR-10 {split} batches under {folder}: {err}") from None
            raise CorruptDataError(
                f"{folder / failed[0]} fails torchvision's md5 check"
                f"{f' (and {len(failed) - 1} more file(s))' if len(failed) > 1 else ''}: not the published "
                "CIFAR-10 file (truncated or altered?); delete the folder and pass --download to fetch it again"
            ) from None
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:  # a checksum list
            # that vouches for an unreadable file (only where the list was changed)
            raise CorruptDataError(f"cannot read CIFAR-10 {split} batches under {folder}: "
                                   f"{type(err).__name__}: {err}") from None
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # HWC -> (N, 3, 32, 32), a view, no copy
        splits[split] = (images, torch.as_tensor(dataset.targets, dtype=torch.long))
    return splits
