"""How much translation a dataset holds: each example's shift from its class template (command line).

Usage::

    python -m inference.shifts --data-dir ../shared/data --dataset mnist
    python -m inference.shifts --data-dir ../shared/data --dataset translated-mnist --translation-px 2

"Untransformed" digits are not unshifted: MNIST centres each digit's centre of mass, and the strokes vary about it.
This measures that spread independently of any model, as a reference for the learned eta_translate (README, *How
much invariance*): every training image is aligned with the mean image of its class (the template) by the shift that
maximises their cross-correlation, with a parabolic sub-pixel peak; the template is re-centred on the aligned images
``iterations`` times (default none). The spread is reported as the half-width ``a = sqrt(3) std`` of the uniform
shift U[-a, a] with the same standard deviation, the units of eta_translate (pixels). For independent shifts the
spreads add in quadrature: digits shifted by U[-a, a] measure about ``sqrt(a^2 + a_0^2)``, ``a_0`` the untransformed
digits' spread. Shape variation also moves the correlation peak, so this tends to overstate the translation alone,
the more so the sharper the template (re-centring it raises the reading).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from inference import train
from inference.cli import run_cli
from inference.data import DatasetName, load_datasets


def template_shifts(images: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """The shift ``(dy, dx)`` in pixels of each image relative to ``template``: the peak of their cross-correlation
    (zero-padded to twice the size, so shifts do not wrap), refined by a parabola through the peak and its
    neighbours along each axis.

    Parameters
    ----------
    images : Tensor, shape (N, H, W)
    template : Tensor, shape (H, W)

    Returns
    -------
    Tensor, shape (N, 2): ``images[n]`` is about ``template`` moved down by ``dy`` and right by ``dx`` pixels.
    """
    n, h, w = images.shape
    size = (2 * h, 2 * w)
    spectrum = torch.fft.rfft2(images.double(), s=size) * torch.fft.rfft2(template.double(), s=size).conj()
    corr = torch.fft.irfft2(spectrum, s=size)
    corr = torch.fft.fftshift(corr, dim=(-2, -1))  # zero shift at (h, w)
    flat = corr.reshape(n, -1).argmax(dim=1)
    i, j = flat // size[1], flat % size[1]
    rows = torch.arange(n)

    def vertex(left: torch.Tensor, mid: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        curvature = left - 2 * mid + right
        return torch.where(curvature < 0, 0.5 * (left - right) / curvature.where(curvature < 0, -1.0), 0.0)

    i_in, j_in = i.clamp(1, size[0] - 2), j.clamp(1, size[1] - 2)
    dy = vertex(corr[rows, i_in - 1, j], corr[rows, i, j], corr[rows, i_in + 1, j])
    dx = vertex(corr[rows, i, j_in - 1], corr[rows, i, j], corr[rows, i, j_in + 1])
    return torch.stack([i - h + dy, j - w + dx], dim=1)


def class_shifts(images: torch.Tensor, labels: torch.Tensor, iterations: int = 0) -> torch.Tensor:
    """Each image's shift ``(dy, dx)`` from its class template, centred to mean zero within each class.

    Parameters
    ----------
    images : Tensor, shape (N, H, W)
    labels : Tensor, shape (N,)
    iterations : int
        How often the template (first the class mean) is rebuilt from its images moved back by their rounded shifts.

    Returns
    -------
    Tensor, shape (N, 2)
    """
    out = torch.zeros(len(images), 2, dtype=torch.float64)
    for k in labels.unique():
        members = (labels == k).nonzero().squeeze(1)
        x = images[members].double()
        template = x.mean(0)
        for _ in range(iterations):
            back = (-template_shifts(x, template)).round().long()
            moved = [torch.roll(img, tuple(s.tolist()), dims=(0, 1)) for img, s in zip(x, back, strict=True)]
            template = torch.stack(moved).mean(0)
        s = template_shifts(x, template)
        out[members] = s - s.mean(0)
    return out


def uniform_half_width(shifts: torch.Tensor) -> torch.Tensor:
    """Per axis, the half-width ``a`` of U[-a, a] with the shifts' standard deviation: ``sqrt(3) std``, shape (2,)."""
    return math.sqrt(3.0) * shifts.std(dim=0)


def build_parser() -> argparse.ArgumentParser:
    """The data flags of ``python -m inference.train`` (``--dataset`` defaults to ``mnist``) plus ``--iterations``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train.add_data_args(p)
    p.set_defaults(dataset=DatasetName.MNIST)  # the untransformed digits, unlike training's default
    p.add_argument("--iterations", type=int, default=0,
                   help="template re-centrings (default 0: the class mean; a sharper template reads more spread)")
    return p


def main(args: argparse.Namespace) -> dict[str, float]:
    """Print (and return) the spread of a dataset's training images about their class templates."""
    data = load_datasets(train.data_config_from_args(args)).train
    shifts = class_shifts(data.x.mean(dim=1), data.y, args.iterations)  # channels averaged: one image per example
    a = uniform_half_width(shifts)
    result = {"std_y_px": float(shifts[:, 0].std()), "std_x_px": float(shifts[:, 1].std()),
              "half_width_y_px": float(a[0]), "half_width_x_px": float(a[1]), "half_width_px": float(a.mean())}
    print(f"{args.dataset} ({len(shifts)} training images): shift from the class template, "
          f"std y {result['std_y_px']:.2f} / x {result['std_x_px']:.2f} px; as U[-a, a]: "
          f"a = {result['half_width_y_px']:.2f} (y) / {result['half_width_x_px']:.2f} (x) px, "
          f"mean {result['half_width_px']:.2f} px")
    return result


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (``invw-shifts``): a missing dataset or a bad flag is one line and exit code 2."""
    return run_cli(main, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
