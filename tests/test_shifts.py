"""The translation a dataset holds, measured without a model (inference.shifts, inference.alignment), and the
digits moved onto their class templates (centred-mnist)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.alignment import centre_on_templates, class_shifts, template_shifts, uniform_half_width
from inference.data import DataConfig, load_datasets

ROOT = Path(__file__).resolve().parents[1]


def blob(cy: float, cx: float, size: int = 28) -> torch.Tensor:
    """An anisotropic Gaussian stroke centred at (cy, cx) pixels, shape (size, size)."""
    r = torch.arange(size, dtype=torch.float64)
    return torch.exp(-((r[:, None] - cy) ** 2) / 18.0 - ((r[None, :] - cx) ** 2) / 8.0)


def pattern(seed: int, size: int = 28, border: int = 8) -> torch.Tensor:
    """Random strokes inside a zero frame ``border`` pixels wide: rolled by fewer pixels, nothing wraps around."""
    img = torch.zeros(size, size, dtype=torch.float64)
    img[border:-border, border:-border] = torch.rand(size - 2 * border, size - 2 * border,
                                                     generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return img


def test_integer_shifts_are_recovered_exactly():
    template = pattern(0)
    shifts = [(0, 0), (3, -2), (-4, 5), (1, 1)]
    images = torch.stack([torch.roll(template, s, dims=(0, 1)) for s in shifts])
    torch.testing.assert_close(template_shifts(images, template), torch.tensor(shifts, dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_sub_pixel_shifts_are_found_to_a_tenth_of_a_pixel():
    template = blob(14.0, 14.0)
    images = torch.stack([blob(14.0 + dy, 14.0 + dx) for dy, dx in [(0.3, -0.6), (-1.5, 2.25)]])
    found = template_shifts(images, template)
    torch.testing.assert_close(found, torch.tensor([[0.3, -0.6], [-1.5, 2.25]], dtype=torch.float64), atol=0.1,
                               rtol=0)


def test_class_shifts_are_centred_per_class_and_the_half_width_is_sqrt3_std():
    torch.manual_seed(0)
    moves = torch.randint(-3, 4, (40, 2))
    labels = torch.arange(40) % 2
    templates = [pattern(1), pattern(2)]
    images = torch.stack([torch.roll(templates[int(k)], tuple(m.tolist()), dims=(0, 1))
                          for m, k in zip(moves, labels, strict=True)])
    shifts = class_shifts(images.float(), labels, iterations=1)
    for k in (0, 1):
        expected = moves[labels == k].double()
        torch.testing.assert_close(shifts[labels == k], expected - expected.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(uniform_half_width(shifts), math.sqrt(3) * shifts.std(0))


def run(data_dir: Path, *flags: str) -> float:
    proc = subprocess.run([sys.executable, "-m", "inference.shifts", "--data-dir", str(data_dir), "--train-size",
                           "500", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.rsplit("mean", 1)[1].split()[0])


def test_shifting_digits_adds_to_their_own_spread_in_quadrature(data_dir):
    own = run(data_dir)  # untransformed digits: about 1.3 px on the shared subset
    shifted = run(data_dir, "--dataset", "translated-mnist", "--translation-px", "4")
    assert 0.5 < own < 2.5
    assert shifted == pytest.approx(math.sqrt(4.0**2 + own**2), rel=0.15)


def test_centring_moves_every_image_back_onto_its_class_pattern_exactly():
    """Two classes, each one pattern rolled by whole-pixel moves of mean zero: centring undoes every move, in each
    channel, and keeps the dtype (MNIST's bytes)."""
    moves = [(0, 0), (2, -1), (-2, 1), (3, 3), (-3, -3), (1, -2), (-1, 2)]
    patterns = [(pattern(3) * 255).to(torch.uint8), (pattern(4) * 255).to(torch.uint8)]
    images, labels = [], []
    for k, base in enumerate(patterns):
        for m in moves:
            moved = torch.roll(base, m, dims=(0, 1))
            images.append(torch.stack([moved, moved // 2]))  # two channels, moved together
            labels.append(k)
    images, labels = torch.stack(images), torch.tensor(labels)
    centred = centre_on_templates(images, labels)
    assert centred.dtype == torch.uint8 and centred.shape == images.shape
    for img, k in zip(centred, labels, strict=True):
        assert torch.equal(img[0], patterns[int(k)]) and torch.equal(img[1], patterns[int(k)] // 2)


def test_centring_drops_what_leaves_the_frame_instead_of_wrapping_it():
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    for n, at in enumerate((2, 3, 4)):  # one bright square, moved (-1, -1), (0, 0), (1, 1) about the middle image
        images[n, 0, at:at + 2, at:at + 2] = 200
    images[2, 0, 0, 0] = 1  # a faint pixel in the corner of the image that moves up and left
    centred = centre_on_templates(images, torch.zeros(3, dtype=torch.long))
    expected = torch.zeros(8, 8, dtype=torch.uint8)
    expected[3:5, 3:5] = 200
    for img in centred:
        assert torch.equal(img[0], expected)  # the faint pixel left the frame; rolled, it would be at (7, 7)


def test_centred_digits_hold_less_than_half_the_translation_of_the_untouched_ones(data_dir):
    """centred-mnist: the same digits, labels and pixel mass as mnist, each moved by whole pixels onto its class
    template, so their measured spread drops from about 1.3 px to under half of it (the rounding to whole pixels
    remains, at most half a pixel)."""
    spread = {}
    for name in ("mnist", "centred-mnist"):
        data = load_datasets(DataConfig(dataset=name, data_dir=str(data_dir), train_size=1000, test_size=100))
        spread[name] = float(uniform_half_width(class_shifts(data.train.x.mean(1), data.train.y)).mean())
        if name == "mnist":
            plain = data
    assert torch.equal(data.train.y, plain.train.y) and torch.equal(data.test.y, plain.test.y)
    assert data.train.x.sum() == pytest.approx(float(plain.train.x.sum()), rel=1e-3)  # almost nothing is cropped
    assert not torch.equal(data.train.x, plain.train.x)
    assert 0.5 < spread["mnist"] < 2.5 and spread["centred-mnist"] < 0.5 * spread["mnist"]


def test_centred_digits_shifted_by_a_hold_a_translation_of_a(data_dir):
    """translated-centred-mnist, the calibration's translation family: the centred digits, each shifted by U[-a, a]
    px. At a = 0 they are centred-mnist; at a = 4 their measured spread is within 10 % of 4 px, where MNIST's own
    spread adds to the shift of translated-mnist (README, *How much invariance*)."""
    def load(name: str, px: float):
        return load_datasets(DataConfig(dataset=name, data_dir=str(data_dir), train_size=1000, test_size=100,
                                        translation_px=px))

    centred, unshifted = load("centred-mnist", 8.0), load("translated-centred-mnist", 0.0)
    torch.testing.assert_close(unshifted.train.x, centred.train.x, atol=1e-5, rtol=0)  # identity warp
    assert torch.equal(unshifted.train.y, centred.train.y)
    spread = {name: float(uniform_half_width(class_shifts(d.train.x.mean(1), d.train.y)).mean())
              for name, d in (("centred", load("translated-centred-mnist", 4.0)),
                              ("plain", load("translated-mnist", 4.0)))}
    assert spread["centred"] == pytest.approx(4.0, rel=0.1)
    assert spread["centred"] < spread["plain"]
