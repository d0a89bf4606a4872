"""idx reading, error types and messages, and the MNIST variants built from the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.data import (
    CorruptDataError,
    DataConfig,
    DataNotFoundError,
    DatasetName,
    balanced_subset,
    load_datasets,
    resolve_data_dir,
    transformation_matrices,
    true_extent,
)
from inference.sources import Source, read_idx
from models.transforms import warp_images
from tests.made_data import idx_bytes, write_idx


# --------------------------------------------------------------------------- read_idx
@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzip"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 1, 3, 3)], ids=str)
def test_read_idx_round_trip(tmp_path, suffix, shape):
    array = torch.randint(0, 256, shape, dtype=torch.uint8)
    path = write_idx(tmp_path / f"arr-idx{len(shape)}-ubyte{suffix}", idx_bytes(array))
    out = read_idx(path)
    assert out.dtype == torch.uint8 and out.shape == shape
    assert torch.equal(out, array)


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzip"])
def test_read_idx_truncated_payload(tmp_path, suffix):
    payload = idx_bytes(torch.randint(0, 256, (4, 5, 5), dtype=torch.uint8))
    path = write_idx(tmp_path / f"x-ubyte{suffix}", payload[:-7])
    with pytest.raises(CorruptDataError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    payload = idx_bytes(torch.zeros(4, 5, 5, dtype=torch.uint8))
    path = write_idx(tmp_path / "x-ubyte", payload[:9])  # 3 dims announced, header cut inside
    with pytest.raises(CorruptDataError, match="truncated inside its header"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    payload = idx_bytes(torch.zeros(2, 3, dtype=torch.uint8)) + b"\x00\x01"
    with pytest.raises(CorruptDataError, match="bytes but its header"):
        read_idx(write_idx(tmp_path / "x-ubyte", payload))


def test_read_idx_truncated_gzip_stream(tmp_path):
    """A cut .gz file (not just a short payload) is a CorruptDataError, not a raw EOFError."""
    good = write_idx(tmp_path / "good-ubyte.gz", idx_bytes(torch.randint(0, 256, (20, 9, 9), dtype=torch.uint8)))
    raw = good.read_bytes()
    bad = tmp_path / "cut-ubyte.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptDataError, match="cannot read idx file"):
        read_idx(bad)
    notgz = tmp_path / "plain-named-ubyte.gz"
    notgz.write_bytes(idx_bytes(torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(CorruptDataError):
        read_idx(notgz)


@pytest.mark.parametrize(
    "header",
    [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"\x00\x00\x0d\x01", b"\x00\x00\x09\x01", b"\x00\x00"],
    ids=["byte0", "byte1", "float-type", "signed-type", "short"],
)
def test_read_idx_bad_magic(tmp_path, header):
    payload = header + (3).to_bytes(4, "big") + b"\x01\x02\x03" if len(header) == 4 else header
    with pytest.raises(CorruptDataError, match="bad magic number"):
        read_idx(write_idx(tmp_path / "x-ubyte", payload))


# --------------------------------------------------------------------------- data root
def test_missing_root_names_root_and_flag(tmp_path):
    root = tmp_path / "no-such-root"
    with pytest.raises(DataNotFoundError) as info:
        load_datasets(DataConfig(data_dir=str(root)))
    message = str(info.value)
    assert str(root) in message
    assert "--data-dir" in message
    assert isinstance(info.value, FileNotFoundError)


def test_partial_root_lists_missing_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", idx_bytes(torch.zeros(2, 28, 28, dtype=torch.uint8)))
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_datasets(DataConfig(data_dir=str(tmp_path)))
    assert "missing train-images" not in str(info.value)


def test_labels_disagreeing_with_images_are_corrupt(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 6), ("t10k", 4)):
        write_idx(raw / f"{split}-images-idx3-ubyte", idx_bytes(torch.zeros(n, 28, 28, dtype=torch.uint8)))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", idx_bytes(torch.zeros(n + 1, dtype=torch.uint8)))
    with pytest.raises(CorruptDataError, match="disagree"):
        load_datasets(DataConfig(data_dir=str(tmp_path)))


def test_tiny_synthetic_root_loads(tmp_path):
    """A hand-made idx root (mixed plain / gzip files) loads without any real MNIST."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        y = torch.arange(n) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", idx_bytes(x))
        write_idx(raw / f"{split}-labels-idx1-ubyte", idx_bytes(y))
    data = load_datasets(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert data.train.x.shape == (20, 1, 28, 28) and data.test.x.shape == (10, 1, 28, 28)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert data.info["full_set"] is False


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("INVW_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("INVW_DATA_DIR")
    assert resolve_data_dir(None) == Path("data")


@pytest.mark.parametrize("field", ["train_size", "test_size"])
def test_data_config_rejects_nonpositive_sizes(field):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        DataConfig(**{field: 0})
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        DataConfig(dataset="svhn")


# --------------------------------------------------------------------------- real (shared) MNIST subset
@pytest.mark.parametrize("dataset", [d for d in DatasetName if d.source is Source.MNIST], ids=lambda d: d.value)
def test_load_datasets_balanced_shapes_and_range(data_dir, dataset):
    data = load_datasets(DataConfig(dataset=dataset, data_dir=str(data_dir), train_size=100, test_size=50))
    for split, n in ((data.train, 100), (data.test, 50)):
        assert split.x.shape == (n, 1, 28, 28) and split.y.shape == (n,)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
        assert torch.equal(torch.bincount(split.y, minlength=10), torch.full((10,), n // 10))
        assert not torch.equal(split.y, torch.sort(split.y).values)  # shuffled: the source is stored by class
        assert split.x.is_contiguous()
    assert data.info["train_size"] == 100 and data.info["test_size"] == 50
    assert data.info["dataset"] == dataset.value
    assert data.info["full_set"] is False  # the shared data is a 4000 / 1000 subset
    assert data.info["available_train"] < 60000 and data.info["available_test"] < 10000
    assert Path(data.info["root"]) == data_dir.resolve()


def test_a_subset_is_shuffled_and_every_example_keeps_its_transformation(data_dir):
    """The subset and the transformation drawn for each of its examples are those of the stored order; only the
    order is random (so the picks do not depend on how the subset is ordered)."""
    cfg = DataConfig(dataset="rotated-mnist", data_dir=str(data_dir), train_size=50, test_size=20)
    train = load_datasets(cfg).train
    stored = load_datasets(DataConfig(dataset="mnist", data_dir=str(data_dir))).train
    gen = torch.Generator().manual_seed(2 * cfg.data_seed)  # the training split's stream
    idx = balanced_subset(stored.y, 50, gen)
    expected = warp_images(stored.x[idx], transformation_matrices(cfg, 50, gen)).clamp(0.0, 1.0)
    same = (train.x.flatten(1)[:, None] == expected.flatten(1)[None]).all(-1)  # (loaded row, expected row)
    assert torch.equal(same.sum(1), torch.ones(50, dtype=torch.long))
    assert torch.equal(train.y, stored.y[idx][same.int().argmax(1)])
    assert not torch.equal(train.y, stored.y[idx])  # not the stored (class) order


def test_uneven_subset_sizes_are_as_balanced_as_possible(data_dir):
    data = load_datasets(DataConfig(dataset="mnist", data_dir=str(data_dir), train_size=23, test_size=10))
    counts = torch.bincount(data.train.y, minlength=10)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1


def test_rotated_variant_is_deterministic_per_seed(data_dir):
    def load(seed):
        return load_datasets(DataConfig(dataset="rotated-mnist", data_dir=str(data_dir), data_seed=seed))

    a, b, c = load(0), load(0), load(1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert torch.equal(a.train.y, b.train.y)
    # no subsetting here, so another seed changes only the rotation angles
    assert torch.equal(a.train.y, c.train.y)
    assert not torch.equal(a.train.x, c.train.x)
    per_example_same = (a.train.x == c.train.x).flatten(1).all(1)
    assert per_example_same.float().mean() < 0.01


def test_rotated_variant_preserves_subset_labels_and_rotates_images(data_dir):
    plain = load_datasets(DataConfig(dataset="mnist", data_dir=str(data_dir), train_size=50, test_size=20))
    rot = load_datasets(DataConfig(dataset="rotated-mnist", data_dir=str(data_dir), train_size=50, test_size=20))
    assert torch.equal(plain.train.y, rot.train.y)  # same seed -> same class-balanced subset
    assert not torch.equal(plain.train.x, rot.train.x)
    # rotations about the centre keep the total ink roughly (bilinear blur loses a little)
    ratio = rot.train.x.sum((1, 2, 3)) / plain.train.x.sum((1, 2, 3))
    assert ratio.min() > 0.6 and ratio.max() < 1.1


def test_test_split_does_not_depend_on_train_size(data_dir):
    def load(train_size):
        return load_datasets(DataConfig(dataset="rotated-mnist", data_dir=str(data_dir), train_size=train_size))

    a, b = load(100), load(200)
    assert torch.equal(a.test.y, b.test.y)
    assert torch.equal(a.test.x, b.test.x)


# --------------------------------------------------------------------------- canvas
def test_a_canvas_puts_the_images_in_the_middle_of_a_frame_of_zeros(data_dir):
    plain = load_datasets(DataConfig(dataset="mnist", data_dir=str(data_dir), train_size=30, test_size=10))
    cfg = DataConfig(dataset="mnist", data_dir=str(data_dir), train_size=30, test_size=10, canvas=44)
    padded = load_datasets(cfg)
    assert cfg.image_shape == (1, 44, 44) and padded.train.x.shape == (30, 1, 44, 44)
    assert torch.equal(padded.train.x[..., 8:36, 8:36], plain.train.x)
    frame = padded.train.x.clone()
    frame[..., 8:36, 8:36] = 0
    assert not frame.any()
    assert torch.equal(padded.train.y, plain.train.y)


def test_on_a_canvas_with_room_a_translation_crops_nothing(data_dir):
    """The paper's 8-px shifts push strokes out of MNIST's 28-px frame; with 8 px of margin they stay in it, so
    every shifted digit keeps its ink (bilinear resampling moves it, it does not lose it)."""

    def ink(dataset, canvas=None):
        cfg = DataConfig(dataset=dataset, data_dir=str(data_dir), train_size=500, test_size=10, canvas=canvas)
        return load_datasets(cfg).train.x.sum((1, 2, 3))

    kept_28 = ink("translated-mnist") / ink("mnist")
    kept_44 = ink("translated-mnist", 44) / ink("mnist", 44)
    assert kept_44.min() > 0.97 and kept_44.max() < 1.03
    assert kept_28.min() < 0.8  # some digits lose a fifth of their ink or more in the 28-px frame


def test_the_true_extent_of_a_translation_is_in_the_units_of_the_canvas():
    cfg = DataConfig(dataset="translated-mnist", translation_px=8.0, canvas=44)
    assert true_extent(cfg)["translate_x"] == pytest.approx(8.0 / 21.5)
    assert true_extent(DataConfig(dataset="translated-mnist"))["translate_y"] == pytest.approx(8.0 / 13.5)


@pytest.mark.parametrize("canvas", [0, 27, 20])
def test_a_canvas_smaller_than_the_images_is_refused(canvas):
    with pytest.raises(ValueError, match="canvas"):
        DataConfig(dataset="mnist", canvas=canvas)
