"""MNIST variants: reading idx files, one-off fixed-seed transformations, subsetting.

The data root is resolved as ``--data-dir`` > ``$INVW_DATA_DIR`` > ``./data``. Under the root the
files are laid out as torchvision's ``MNIST`` expects: ``ROOT/MNIST/raw/train-images-idx3-ubyte``
(plain or ``.gz``). When ``allow_download`` is set and nothing is found, torchvision downloads
full MNIST there; otherwise a :class:`DataNotFoundError` names the root and the flag.

Each variant transforms every example once, with a generator seeded by ``data_seed``
(REFERENCE.md: "Each transformed once per example with a fixed seed"):

=========================  ================================================
rotated-mnist              rotation ~ U[-rotation, rotation], default 180 deg
partially-rotated-mnist    rotation ~ U[-90, 90] deg
translated-mnist           dx, dy ~ U[-translation, translation], default 8 px
scaled-mnist               exp(s), s ~ U[-log 2, log 2]
mnist                      untouched
=========================  ================================================
"""

from __future__ import annotations

import gzip
import hashlib
import math
import numbers
import os
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from models.config import check_positive_int
from models.transforms import GENERATOR_NAMES, affine_generators, warp_images

DATA_ENV_VAR = "INVW_DATA_DIR"
_IDX_DTYPES = {0x08: torch.uint8}
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not under the data root and downloading was not allowed (or failed)."""


class CorruptDataError(ValueError):
    """An idx file is truncated, has a bad magic number or disagrees with its labels."""


class InvalidDataError(ValueError):
    """Images or labels in memory do not fit the model: shape, channels, label range or NaN/inf values."""


class DatasetName(StrEnum):
    """The MNIST variants of REFERENCE.md."""

    MNIST = "mnist"
    ROTATED = "rotated-mnist"
    PARTIALLY_ROTATED = "partially-rotated-mnist"
    TRANSLATED = "translated-mnist"
    SCALED = "scaled-mnist"


_TRANSFORM_RANGES = {"rotation_deg": 360.0, "translation_px": 1e6, "log_scale": 10.0}
"""Upper ends of the transformation ranges: beyond them the one-off warps overflow (or mean nothing more)."""


@dataclass(frozen=True)
class DataConfig:
    """Which data, how transformed, how much of it."""

    dataset: DatasetName = DatasetName.ROTATED
    data_dir: str | None = None  # None: $INVW_DATA_DIR, else ./data
    allow_download: bool = False  # let torchvision download full MNIST when it is missing
    train_size: int | None = None  # None: all training examples (class-balanced subset otherwise)
    test_size: int | None = None
    rotation_deg: float | None = None  # None: 180 (rotated) or 90 (partially rotated)
    translation_px: float = 8.0
    log_scale: float = math.log(2.0)
    data_seed: int = 0  # seed of the one-off transformation and of subsetting

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "dataset", DatasetName(self.dataset))
        except ValueError:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose from {[d.value for d in DatasetName]}"
            ) from None
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name, high in _TRANSFORM_RANGES.items():
            value = getattr(self, name)
            if value is not None and not (isinstance(value, numbers.Real) and 0 <= value <= high):
                raise ValueError(f"{name} must be a number in [0, {high:g}], got {value!r}")
        check_seed("data_seed", self.data_seed)


def check_seed(name: str, value: object) -> int:
    """``value`` as an ``int`` if it is a valid seed, an integer in ``[0, 2**32)`` (numpy's range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**32:
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


@dataclass
class Split:
    """Images ``x: (N, 1, 28, 28)`` in [0, 1] (float32) and labels ``y: (N,)`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def validate_split(split: Split, image_shape: tuple[int, int, int], num_classes: int, name: str = "training") -> None:
    """Check once per dataset that ``split`` fits a model with ``image_shape`` and ``num_classes``.

    One pass over the data (shape, dtype, label range, NaN/inf), so the training loop need not
    check every minibatch.

    Raises
    ------
    InvalidDataError
        With a one-line message naming the split and the problem.
    """
    x, y = split.x, split.y
    C, H, W = image_shape
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        kinds = f"{type(x).__name__}, {type(y).__name__}"
        raise InvalidDataError(f"{name} images and labels must be torch tensors, got {kinds}")
    if x.dim() != 4:
        raise InvalidDataError(f"{name} images must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != C:
        raise InvalidDataError(f"{name} images have {x.shape[1]} channel(s) but the model expects {C}")
    if tuple(x.shape[2:]) != (H, W):
        raise InvalidDataError(f"{name} images are {x.shape[2]}x{x.shape[3]} pixels but the model expects {H}x{W}")
    if x.shape[0] == 0:
        raise InvalidDataError(f"the {name} set is empty")
    if tuple(y.shape) != (x.shape[0],):
        raise InvalidDataError(
            f"{name} labels must have shape ({x.shape[0]},) to match the images, got {tuple(y.shape)}"
        )
    if not x.is_floating_point():
        raise InvalidDataError(f"{name} images must be floating point, got {x.dtype}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InvalidDataError(f"{name} labels must be integers, got {y.dtype}")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise InvalidDataError(f"{name} labels must lie in [0, {num_classes}), found values from {low} to {high}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise InvalidDataError(f"{name} images contain {bad} NaN/inf value(s)")


@dataclass
class Datasets:
    """Train and test splits plus provenance recorded in ``metrics.json``."""

    train: Split
    test: Split
    info: dict


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` if given, else ``$INVW_DATA_DIR``, else ``./data``."""
    return Path(data_dir or os.environ.get(DATA_ENV_VAR) or "data").expanduser()


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


def _find(raw_dir: Path, name: str) -> Path | None:
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_raw(root: Path, allow_download: bool = False) -> dict[str, Split]:
    """Read the four MNIST idx files under ``root/MNIST/raw`` (downloading first if allowed)."""
    raw_dir = root / "MNIST" / "raw"
    if any(_find(raw_dir, n) is None for n in _FILES.values()) and allow_download:
        import torchvision  # imported lazily: only needed for downloading

        try:
            torchvision.datasets.MNIST(str(root), train=True, download=True)
            torchvision.datasets.MNIST(str(root), train=False, download=True)
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            raise DataNotFoundError(f"MNIST download into {root} failed: {err}") from None
    missing = [n for n in _FILES.values() if _find(raw_dir, n) is None]
    if missing:
        raise DataNotFoundError(
            f"MNIST not found under {raw_dir} (missing {', '.join(missing)}); point --data-dir or "
            f"${DATA_ENV_VAR} at a folder holding MNIST/raw, or pass --download to fetch it"
        )
    splits = {}
    for split in ("train", "test"):
        x = read_idx(_find(raw_dir, _FILES[(split, "images")]))  # type: ignore[arg-type]
        y = read_idx(_find(raw_dir, _FILES[(split, "labels")]))  # type: ignore[arg-type]
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise CorruptDataError(f"MNIST {split} images {tuple(x.shape)} and labels {tuple(y.shape)} disagree")
        if x.numel() == 0:
            raise CorruptDataError(f"MNIST {split} images under {raw_dir} hold no pixels (shape {tuple(x.shape)})")
        if int(y.max()) > 9:
            raise CorruptDataError(f"MNIST {split} labels out of range 0..9 (max {int(y.max())})")
        splits[split] = Split(x.unsqueeze(1).float() / 255.0, y.long())
    return splits


def balanced_subset(y: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a class-balanced random subset of ``size`` examples (sorted, original order kept)."""
    classes = torch.unique(y)
    per_class, extra = divmod(size, len(classes))
    picks = []
    for i, c in enumerate(classes):
        idx = torch.nonzero(y == c).squeeze(1)
        take = min(per_class + (1 if i < extra else 0), len(idx))
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:take]])
    return torch.sort(torch.cat(picks)).values


def pixels_per_unit(image_size: int) -> float:
    """Pixels per unit of the normalised [-1, 1] coordinates of T (``align_corners=True``): ``(size - 1) / 2``."""
    return (image_size - 1) / 2


def true_extent(data_cfg: DataConfig, image_size: int = 28,
                names: tuple[str, ...] = GENERATOR_NAMES) -> dict[str, float]:
    """The extent of the transformation applied to the data, per generator of the basis ``names``, in the units of T.

    rotated: pi (180 deg); partially rotated: pi / 2; translated: 8 px = 8 / 13.5 normalised units on
    ``translate_x`` and ``translate_y``; scaled: log 2 on ``scale_x`` and ``scale_y`` (the paper's basis)
    or on ``scale`` (the isotropic basis; ``stretch`` 0); plain MNIST: 0. Generators the data does not
    use get 0.
    """
    extent = dict.fromkeys(names, 0.0)
    if data_cfg.dataset in (DatasetName.ROTATED, DatasetName.PARTIALLY_ROTATED):
        default = 180.0 if data_cfg.dataset is DatasetName.ROTATED else 90.0
        extent["rotate"] = math.radians(data_cfg.rotation_deg if data_cfg.rotation_deg is not None else default)
    elif data_cfg.dataset is DatasetName.TRANSLATED:
        extent["translate_x"] = extent["translate_y"] = data_cfg.translation_px / pixels_per_unit(image_size)
    elif data_cfg.dataset is DatasetName.SCALED:
        for name in {"scale_x", "scale_y", "scale"} & set(names):
            extent[name] = float(data_cfg.log_scale)
    return extent


def transformation_matrices(
    cfg: DataConfig, n: int, image_size: int, generator: torch.Generator
) -> torch.Tensor | None:
    """One affine matrix per example for the chosen variant, ``(n, 3, 3)`` (None for plain MNIST).

    The matrices act on output coordinates, ``x'(p) = x(T p)``, like :func:`models.warp_images`.
    """
    G = affine_generators()
    u = torch.rand(n, 2, generator=generator) * 2 - 1  # U[-1, 1]
    if cfg.dataset in (DatasetName.ROTATED, DatasetName.PARTIALLY_ROTATED):
        default = 180.0 if cfg.dataset is DatasetName.ROTATED else 90.0
        angle = math.radians(cfg.rotation_deg if cfg.rotation_deg is not None else default)
        A = (u[:, 0] * angle)[:, None, None] * G[2]
    elif cfg.dataset is DatasetName.TRANSLATED:
        shift = cfg.translation_px / pixels_per_unit(image_size)  # pixels -> normalised units
        A = (u[:, 0] * shift)[:, None, None] * G[0] + (u[:, 1] * shift)[:, None, None] * G[1]
    elif cfg.dataset is DatasetName.SCALED:
        s = u[:, 0] * cfg.log_scale  # sampling at p / exp(s) magnifies by exp(s)
        A = -s[:, None, None] * (G[3] + G[4])
    else:
        return None
    return torch.linalg.matrix_exp(A)


def load_datasets(cfg: DataConfig) -> Datasets:
    """Load, subset and transform the dataset named in ``cfg``.

    Returns
    -------
    Datasets
        ``train`` and ``test`` splits of shape ``(N, 1, 28, 28)`` and ``info`` with the root,
        sizes and whether the full 60k/10k MNIST or a subset was found.
    """
    root = resolve_data_dir(cfg.data_dir)
    raw = load_mnist_raw(root, cfg.allow_download)
    info = {
        "dataset": cfg.dataset.value,
        "root": str(root.resolve()),
        "available_train": len(raw["train"]),
        "available_test": len(raw["test"]),
        "full_mnist": len(raw["train"]) == 60000 and len(raw["test"]) == 10000,
    }
    splits = {}
    for i, (name, size) in enumerate((("train", cfg.train_size), ("test", cfg.test_size))):
        gen = torch.Generator().manual_seed(2 * cfg.data_seed + i)  # one stream per split
        split = raw[name]
        if size is not None and size < len(split):
            idx = balanced_subset(split.y, size, gen)
            split = Split(split.x[idx], split.y[idx])
        T = transformation_matrices(cfg, len(split), split.x.shape[-1], gen)
        x = split.x if T is None else warp_images(split.x, T).clamp_(0.0, 1.0)
        splits[name] = Split(x.contiguous(), split.y)
        info[f"{name}_size"] = len(split)
    info["sha256"] = content_sha256(splits["train"], splits["test"])
    return Datasets(splits["train"], splits["test"], info)


def content_sha256(*splits: Split) -> str:
    """sha256 of the splits' images and labels (dtype, shape and bytes): the data a run trains and is tested on,
    whatever folder or link its files were read through (the resume check of :mod:`inference.checkpoint`)."""
    digest = hashlib.sha256()
    for split in splits:
        for t in (split.x, split.y):
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
