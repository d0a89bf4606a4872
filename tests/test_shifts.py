"""The translation a dataset holds, measured without a model (inference.shifts)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.shifts import class_shifts, template_shifts, uniform_half_width

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
