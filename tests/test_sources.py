"""CIFAR-10 and Fashion-MNIST through torchvision's on-disk formats, on tiny data the tests write themselves.

The made files are read by torchvision's own code: ``torchvision.datasets.CIFAR10`` (with the made files' md5
sums in its checklist, :func:`tests.made_data.vouch_for_cifar10`) and, for the idx files, compared with
``torchvision.datasets.FashionMNIST``.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from inference.data import DataConfig, DatasetName, Variant, load_datasets, one_per_class, true_extent
from inference.sources import SOURCES, CorruptDataError, DataNotFoundError, Source
from models.transforms import affine_generators, warp_images
from tests.made_data import CIFAR_FOLDER, vouch_for_cifar10, write_cifar10, write_fashion_mnist

CIFAR_NAMES = [d for d in DatasetName if d.source is Source.CIFAR10]
FASHION_NAMES = [d for d in DatasetName if d.source is Source.FASHION_MNIST]


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A made CIFAR-10 (50 training, 20 test images) that torchvision's checklist vouches for."""
    written = write_cifar10(tmp_path)
    vouch_for_cifar10(monkeypatch, tmp_path)
    return tmp_path, written


# --------------------------------------------------------------------------- names
def test_every_dataset_name_is_its_variant_and_its_source():
    for name in DatasetName:
        parts = [] if name.variant is Variant.PLAIN else [name.variant.value]
        parts += ["centred"] if name.centred else []
        assert name.value == "-".join([*parts, name.source.value])
        assert name.image_shape == SOURCES[name.source].image_shape
    assert [d.value for d in DatasetName if d.centred] == ["centred-mnist", "translated-centred-mnist"]
    assert {d.variant for d in CIFAR_NAMES} == {Variant.PLAIN, Variant.ROTATED, Variant.TRANSLATED, Variant.SCALED}
    assert {d.variant for d in FASHION_NAMES} == {d.variant for d in CIFAR_NAMES}
    assert DatasetName("rotated-fashion-mnist").source is Source.FASHION_MNIST  # not MNIST


# --------------------------------------------------------------------------- CIFAR-10
def test_made_cifar10_loads_through_torchvision_with_its_channels_in_order(cifar_root):
    root, written = cifar_root
    data = load_datasets(DataConfig(dataset="cifar10", data_dir=str(root)))
    for split, name in ((data.train, "train"), (data.test, "test")):
        x, y = written[name]
        assert split.x.shape == (len(y), 3, 32, 32) and split.x.dtype == torch.float32
        torch.testing.assert_close(split.x, x.float() / 255.0, rtol=0, atol=0)  # R, G, B planes as written
        assert torch.equal(split.y, y)
    assert data.info["source"] == "CIFAR-10" and data.info["full_set"] is False
    assert (data.info["available_train"], data.info["available_test"]) == (50, 20)


def test_made_cifar10_fails_torchvision_md5_check_without_its_own_sums(tmp_path):
    """Without the test's checklist torchvision compares the made files with the published CIFAR-10 sums."""
    write_cifar10(tmp_path)
    with pytest.raises(CorruptDataError, match="md5") as info:
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert str(tmp_path / CIFAR_FOLDER / "data_batch_1") in str(info.value)
    assert "and 6 more file(s)" in str(info.value)  # the other four batches, test_batch and batches.meta


def test_a_file_changed_after_its_sum_was_taken_is_named(cifar_root):
    root, _ = cifar_root
    batch = root / CIFAR_FOLDER / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10])
    with pytest.raises(CorruptDataError, match="fails torchvision's md5 check") as info:
        load_datasets(DataConfig(dataset="rotated-cifar10", data_dir=str(root)))
    assert str(batch) in str(info.value) and "more file" not in str(info.value)


@pytest.mark.parametrize("missing", ["data_batch_5", "test_batch", "batches.meta"])
def test_missing_cifar10_files_are_listed(cifar_root, missing):
    root, _ = cifar_root
    (root / CIFAR_FOLDER / missing).unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(root)))
    message = str(info.value)
    assert f"CIFAR-10 not found under {root / CIFAR_FOLDER} (missing {missing})" in message
    assert "--data-dir" in message and "--download" in message


def test_unreadable_batch_that_its_checksum_vouches_for_is_corrupt(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    (tmp_path / CIFAR_FOLDER / "test_batch").write_bytes(b"not a pickle")
    vouch_for_cifar10(monkeypatch, tmp_path)
    with pytest.raises(CorruptDataError, match="cannot read CIFAR-10 test batches"):
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_cifar10_labels_out_of_range_are_corrupt(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    path = tmp_path / CIFAR_FOLDER / "data_batch_2"
    batch = pickle.loads(path.read_bytes())
    batch["labels"][0] = 10
    path.write_bytes(pickle.dumps(batch, protocol=2))
    vouch_for_cifar10(monkeypatch, tmp_path)
    with pytest.raises(CorruptDataError, match=r"CIFAR-10 train labels out of range 0..9 \(max 10\)"):
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_download_goes_through_torchvision_into_the_data_root(tmp_path, monkeypatch):
    """``allow_download`` calls ``CIFAR10(root, download=True)``; here its download writes the made files."""
    from torchvision.datasets import CIFAR10

    calls = []

    def fake_download(self):
        calls.append(self.root)
        if not (tmp_path / CIFAR_FOLDER).is_dir():
            write_cifar10(tmp_path)
            vouch_for_cifar10(monkeypatch, tmp_path)

    monkeypatch.setattr(CIFAR10, "download", fake_download)
    with pytest.raises(DataNotFoundError):
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))  # no download unless allowed
    data = load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path), allow_download=True))
    assert len(data.train) == 50 and calls and all(c == str(tmp_path) for c in calls)


@pytest.mark.parametrize("name", [d for d in CIFAR_NAMES if d.variant is not Variant.PLAIN], ids=str)
def test_cifar10_variants_transform_each_image_once_with_a_fixed_seed(cifar_root, name):
    root, _ = cifar_root

    def load(dataset, seed=0):
        return load_datasets(DataConfig(dataset=dataset, data_dir=str(root), data_seed=seed))

    plain, a, b, other = load("cifar10"), load(name), load(name), load(name, seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert torch.equal(a.train.y, plain.train.y)
    changed = (a.train.x != plain.train.x).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # (almost) every image moved
    assert not torch.equal(a.train.x, other.train.x)
    assert 0 <= float(a.train.x.min()) and float(a.train.x.max()) <= 1


def test_translated_cifar10_shifts_by_whole_pixels_on_32_pixel_images(cifar_root):
    """8 px is 8 / 15.5 normalised units on 32-pixel sides (13.5 on MNIST's 28): a shift of exactly 8 px moves the
    image by 8 pixels, all three channels alike."""
    root, _ = cifar_root
    cfg = DataConfig(dataset="translated-cifar10", data_dir=str(root))
    extent = true_extent(cfg)
    assert extent["translate_x"] == pytest.approx(8 / 15.5) and extent["rotate"] == 0.0
    assert true_extent(DataConfig(dataset="translated-mnist"))["translate_x"] == pytest.approx(8 / 13.5)
    plain = load_datasets(DataConfig(dataset="cifar10", data_dir=str(root))).train.x[:1]
    T = torch.linalg.matrix_exp(extent["translate_x"] * affine_generators()[0])[None]
    torch.testing.assert_close(warp_images(plain, T)[..., :-8], plain[..., 8:], atol=1e-5, rtol=0)


def test_rotated_cifar10_extent_is_a_full_turn():
    assert true_extent(DataConfig(dataset="rotated-cifar10"))["rotate"] == pytest.approx(math.pi)
    assert true_extent(DataConfig(dataset="scaled-cifar10"))["scale_x"] == pytest.approx(math.log(2.0))


def test_cifar10_subsets_are_class_balanced(cifar_root):
    root, _ = cifar_root
    data = load_datasets(DataConfig(dataset="cifar10", data_dir=str(root), train_size=20, test_size=10))
    assert torch.equal(torch.bincount(data.train.y, minlength=10), torch.full((10,), 2))
    assert torch.equal(torch.bincount(data.test.y, minlength=10), torch.ones(10, dtype=torch.long))


# --------------------------------------------------------------------------- Fashion-MNIST
def test_made_fashion_mnist_loads_as_torchvision_reads_it(tmp_path):
    from torchvision.datasets import FashionMNIST

    written = write_fashion_mnist(tmp_path, gzip_train=False)  # torchvision's loader reads plain files only
    data = load_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)))
    for split, name, train in ((data.train, "train", True), (data.test, "test", False)):
        x, y = written[name]
        assert split.x.shape == (len(y), 1, 28, 28)
        torch.testing.assert_close(split.x[:, 0], x.float() / 255.0, rtol=0, atol=0)
        assert torch.equal(split.y, y)
        reference = FashionMNIST(str(tmp_path), train=train)  # torchvision reads the same tensors
        assert torch.equal(reference.data, x) and torch.equal(reference.targets, y)
    assert data.info["source"] == "Fashion-MNIST"


@pytest.mark.parametrize("name", FASHION_NAMES, ids=str)
def test_fashion_mnist_variants_load(tmp_path, name):
    write_fashion_mnist(tmp_path)
    data = load_datasets(DataConfig(dataset=name, data_dir=str(tmp_path), train_size=20))
    assert data.train.x.shape == (20, 1, 28, 28) and data.info["dataset"] == name.value


def test_fashion_mnist_is_not_read_from_the_mnist_folder(data_dir):
    with pytest.raises(DataNotFoundError, match="Fashion-MNIST not found under .*FashionMNIST/raw"):
        load_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(data_dir)))


# --------------------------------------------------------------------------- pictures
def test_one_per_class_takes_the_first_example_of_each_class(data_dir):
    """The shared MNIST subset is stored sorted by class: the first ten test digits are all zeros."""
    test = load_datasets(DataConfig(dataset="mnist", data_dir=str(data_dir))).test
    assert set(test.y[:10].tolist()) == {0}
    picks = one_per_class(test)
    assert picks.y.tolist() == list(range(10))
    for c in range(10):
        assert torch.equal(picks.x[c], test.x[test.y == c][0])
    assert one_per_class(test, 6).y.tolist() == list(range(6))
