"""The datasets of the paper: a source (MNIST, Fashion-MNIST, CIFAR-10), a one-off fixed-seed transformation, a subset.

The data root is ``--data-dir`` > ``$INVW_DATA_DIR`` > ``./data``, each source in torchvision's layout
(:mod:`inference.sources`); with ``allow_download`` torchvision fetches a missing source there, otherwise a
:class:`DataNotFoundError` names the folder and the flag. A dataset is named ``<variant>-<source>`` (plain: the
source's name alone); each :class:`Variant` transforms every example once, with a generator seeded by
``data_seed`` (REFERENCE.md): rotated by U[-180, 180] deg, partially rotated by U[-90, 90] deg (MNIST only),
translated by U[-8, 8] px, scaled by exp(s), s ~ U[-log 2, log 2] (the defaults; README, "Data"). ``centred``
before the source (``centred-mnist``, ``translated-centred-mnist``) first moves each image onto the mean image of its
class by whole pixels (:func:`inference.alignment.centre_on_templates`), which removes most of the translation MNIST
holds of itself: digits whose translation is known, for the calibration of the learned eta_translate.
``canvas`` puts every image in the middle of a larger frame of zeros before it is centred or transformed, so that
shifts crop nothing; the transformation's pixels are then the canvas's.

Memory: the source is read as bytes, subset, and converted to float32 and warped :data:`CHUNK` images at a time
into one preallocated ``(N, C, H, W)`` tensor, so the only whole-set float copy is the result.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from inference.alignment import centre_on_templates
from inference.sources import DATA_ENV_VAR, SOURCES, Source, load_source
from inference.sources import CorruptDataError as CorruptDataError  # re-exported: the data errors live here too
from inference.sources import DataNotFoundError as DataNotFoundError
from models.config import check_positive_int
from models.transforms import GENERATOR_NAMES, affine_generators, warp_images

CHUNK = 4096
"""Images converted to float and warped at a time (CIFAR-10: 50 MB of float32 and 34 MB of sampling grid)."""


class InvalidDataError(ValueError):
    """Images or labels in memory do not fit the model: shape, channels, label range or NaN/inf values."""


class Variant(StrEnum):
    """The one-off transformation of a dataset."""

    PLAIN = "plain"
    ROTATED = "rotated"
    PARTIALLY_ROTATED = "partially-rotated"
    TRANSLATED = "translated"
    SCALED = "scaled"


class DatasetName(StrEnum):
    """The datasets of REFERENCE.md: ``<variant>-<source>``, or the source's name for the untouched images."""

    MNIST = "mnist"
    ROTATED = "rotated-mnist"
    PARTIALLY_ROTATED = "partially-rotated-mnist"
    TRANSLATED = "translated-mnist"
    SCALED = "scaled-mnist"
    CENTRED = "centred-mnist"
    TRANSLATED_CENTRED = "translated-centred-mnist"
    FASHION_MNIST = "fashion-mnist"
    ROTATED_FASHION_MNIST = "rotated-fashion-mnist"
    TRANSLATED_FASHION_MNIST = "translated-fashion-mnist"
    SCALED_FASHION_MNIST = "scaled-fashion-mnist"
    CIFAR10 = "cifar10"
    ROTATED_CIFAR10 = "rotated-cifar10"
    TRANSLATED_CIFAR10 = "translated-cifar10"
    SCALED_CIFAR10 = "scaled-cifar10"

    @property
    def source(self) -> Source:
        """Where the images come from: the longest source name the dataset's name ends with."""
        longest_first = sorted(Source, key=len, reverse=True)  # fashion-mnist before mnist
        return next(s for s in longest_first if self.value == s or self.value.endswith(f"-{s}"))

    @property
    def centred(self) -> bool:
        """Whether every image is first moved onto its class template (``[<variant>-]centred-<source>``: the source
        with most of its own translation removed, :func:`inference.alignment.centre_on_templates`)."""
        return self._prefix.split("-")[-1] == "centred"

    @property
    def variant(self) -> Variant:
        """The one-off transformation: the name less its source (and less ``centred``)."""
        prefix = self._prefix.removesuffix("centred").rstrip("-")
        return Variant(prefix or Variant.PLAIN)

    @property
    def _prefix(self) -> str:
        return self.value[: -len(self.source)].rstrip("-")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images."""
        return SOURCES[self.source].image_shape


_TRANSFORM_RANGES = {"rotation_deg": 360.0, "translation_px": 1e6, "log_scale": 10.0}
"""Upper ends of the transformation ranges: beyond them the one-off warps overflow (or mean nothing more)."""


@dataclass(frozen=True)
class DataConfig:
    """Which data, how transformed, how much of it."""

    dataset: DatasetName = DatasetName.ROTATED
    data_dir: str | None = None  # None: $INVW_DATA_DIR, else ./data
    allow_download: bool = False  # let torchvision download the source when it is missing
    train_size: int | None = None  # None: all training examples (a class-balanced subset in random order otherwise)
    test_size: int | None = None
    rotation_deg: float | None = None  # None: 180 (rotated) or 90 (partially rotated)
    translation_px: float = 8.0
    log_scale: float = math.log(2.0)
    data_seed: int = 0  # seed of the one-off transformation and of subsetting
    canvas: int | None = None  # pad every image with zeros to canvas x canvas pixels first; None: the source's size

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
        if self.canvas is not None:
            check_positive_int("canvas", self.canvas)
            C, H, W = self.dataset.image_shape
            if self.canvas < max(H, W):
                raise ValueError(f"canvas must be at least the images' size, {max(H, W)} px, got {self.canvas}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this config loads: the source's, or ``canvas`` pixels square."""
        C, H, W = self.dataset.image_shape
        return (C, H, W) if self.canvas is None else (C, self.canvas, self.canvas)

    @property
    def rotation(self) -> float:
        """The rotation range in radians: ``rotation_deg``, or 180 / 90 degrees by the variant."""
        default = 90.0 if self.dataset.variant is Variant.PARTIALLY_ROTATED else 180.0
        return math.radians(self.rotation_deg if self.rotation_deg is not None else default)


def check_seed(name: str, value: object) -> int:
    """``value`` as an ``int`` if it is a valid seed, an integer in ``[0, 2**32)`` (numpy's range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**32:
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


@dataclass
class Split:
    """Images ``x: (N, C, H, W)`` in [0, 1] (float32) and labels ``y: (N,)`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def validate_split(split: Split, image_shape: tuple[int, int, int], num_classes: int, name: str = "training") -> None:
    """Check once per dataset that ``split`` fits a model with ``image_shape`` and ``num_classes``.

    One pass over the data (shape, dtype, label range, NaN/inf, the last in chunks of :data:`CHUNK` images),
    so the training loop need not check every minibatch.

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
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in x.split(CHUNK))
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


def balanced_subset(y: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a class-balanced random subset of ``size`` examples (sorted, the stored order kept).

    Every class gets ``size // classes`` examples (the first ``size % classes`` classes one more, as far as
    they have them), so a small subset of data stored sorted by class still holds every class.
    """
    classes = torch.unique(y)
    per_class, extra = divmod(size, len(classes))
    picks = []
    for i, c in enumerate(classes):
        idx = torch.nonzero(y == c).squeeze(1)
        take = min(per_class + (1 if i < extra else 0), len(idx))
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:take]])
    return torch.sort(torch.cat(picks)).values


def one_per_class(split: Split, num: int | None = None) -> Split:
    """The first example of each class, in the order of the classes (the first ``num`` classes): pictures that
    show every class, whatever order the data is stored in. ``x: (classes, C, H, W)``."""
    classes = torch.unique(split.y)[:num]
    idx = torch.stack([torch.nonzero(split.y == c)[0, 0] for c in classes])
    return Split(split.x[idx], split.y[idx])


def pixels_per_unit(image_size: int) -> float:
    """Pixels per unit of the normalised [-1, 1] coordinates of T (``align_corners=True``): ``(size - 1) / 2``."""
    return (image_size - 1) / 2


def true_extent(data_cfg: DataConfig, image_size: int | None = None,
                names: tuple[str, ...] = GENERATOR_NAMES) -> dict[str, float]:
    """The extent of the transformation applied to the data, per generator of the basis ``names``, in the units of T.

    rotated: pi (180 deg); partially rotated: pi / 2; translated: 8 px on ``translate_x`` and ``translate_y``
    (8 / 13.5 normalised units on 28-pixel images, 8 / 15.5 on CIFAR-10's 32; ``image_size`` defaults to the
    dataset's); scaled: log 2 on ``scale_x`` and ``scale_y`` (the paper's basis) or on ``scale`` (the
    isotropic basis; ``stretch`` 0); untouched data: 0. Generators the data does not use get 0.
    """
    extent = dict.fromkeys(names, 0.0)
    variant = data_cfg.dataset.variant
    size = data_cfg.image_shape[-1] if image_size is None else image_size
    if variant in (Variant.ROTATED, Variant.PARTIALLY_ROTATED):
        extent["rotate"] = data_cfg.rotation
    elif variant is Variant.TRANSLATED:
        extent["translate_x"] = extent["translate_y"] = data_cfg.translation_px / pixels_per_unit(size)
    elif variant is Variant.SCALED:
        for name in {"scale_x", "scale_y", "scale"} & set(names):
            extent[name] = float(data_cfg.log_scale)
    return extent


def transformation_matrices(cfg: DataConfig, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """One affine matrix per example for the chosen variant, ``(n, 3, 3)`` (None for untouched data).

    The matrices act on output coordinates, ``x'(p) = x(T p)``, like :func:`models.warp_images`.
    """
    G = affine_generators()
    u = torch.rand(n, 2, generator=generator) * 2 - 1  # U[-1, 1]
    variant = cfg.dataset.variant
    if variant in (Variant.ROTATED, Variant.PARTIALLY_ROTATED):
        A = (u[:, 0] * cfg.rotation)[:, None, None] * G[2]
    elif variant is Variant.TRANSLATED:
        shift = cfg.translation_px / pixels_per_unit(cfg.image_shape[-1])  # pixels -> normalised units (canvas)
        A = (u[:, 0] * shift)[:, None, None] * G[0] + (u[:, 1] * shift)[:, None, None] * G[1]
    elif variant is Variant.SCALED:
        s = u[:, 0] * cfg.log_scale  # sampling at p / exp(s) magnifies by exp(s)
        A = -s[:, None, None] * (G[3] + G[4])
    else:
        return None
    return torch.linalg.matrix_exp(A)


def pad_to_canvas(images: torch.Tensor, canvas: int) -> torch.Tensor:
    """``images (N, C, H, W)`` in the middle of a ``canvas`` x ``canvas`` frame of zeros (an odd margin puts the
    extra pixel below and to the right), so that shifts within the margin crop nothing."""
    H, W = images.shape[-2:]
    top, left = (canvas - H) // 2, (canvas - W) // 2
    return torch.nn.functional.pad(images, (left, canvas - W - left, top, canvas - H - top))


def float_images(images: torch.Tensor, T: torch.Tensor | None) -> torch.Tensor:
    """Bytes ``uint8 (N, C, H, W)`` as float32 in [0, 1], each warped by its ``T (N, 3, 3)`` (bilinear, zero
    padding, clamped to [0, 1]) when given; :data:`CHUNK` images at a time into one preallocated result."""
    out = torch.empty(images.shape, dtype=torch.float32)
    for start in range(0, len(images), CHUNK):
        rows = slice(start, start + CHUNK)
        x = images[rows].float() / 255.0
        out[rows] = x if T is None else warp_images(x, T[rows]).clamp_(0.0, 1.0)
    return out


def load_datasets(cfg: DataConfig) -> Datasets:
    """Load, subset and transform the dataset named in ``cfg``.

    Returns
    -------
    Datasets
        ``train`` and ``test`` splits of shape ``(N, C, H, W)`` (``cfg.image_shape``) and ``info`` with the
        root, the source, the sizes and whether the whole published dataset (``full_set``) or a part was found.
    """
    root = resolve_data_dir(cfg.data_dir)
    source = SOURCES[cfg.dataset.source]
    raw = load_source(cfg.dataset.source, root, cfg.allow_download)  # split -> (images, labels)
    available = (len(raw["train"][1]), len(raw["test"][1]))
    info = {
        "dataset": cfg.dataset.value,
        "source": source.title,
        "root": str(root.resolve()),
        "available_train": available[0],
        "available_test": available[1],
        "full_set": available == source.full_sizes,
    }
    splits = {}
    for i, (name, size) in enumerate((("train", cfg.train_size), ("test", cfg.test_size))):
        gen = torch.Generator().manual_seed(2 * cfg.data_seed + i)  # one stream per split
        images, labels = raw[name]
        idx = balanced_subset(labels, size, gen) if size is not None and size < len(labels) else None
        T = transformation_matrices(cfg, len(labels) if idx is None else len(idx), gen)
        if idx is not None:  # the subset in random order, every example keeping the transformation drawn for it
            order = torch.randperm(len(idx), generator=gen)
            idx, T = idx[order], None if T is None else T[order]
            images, labels = images[idx], labels[idx]
        if cfg.canvas is not None:  # the source's images in the middle of a larger frame, before anything moves them
            images = pad_to_canvas(images, cfg.canvas)
        if cfg.dataset.centred:  # the split's own class templates (labels are known), before the transformation
            images = centre_on_templates(images, labels)
        splits[name] = Split(float_images(images, T), labels)
        info[f"{name}_size"] = len(labels)
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
