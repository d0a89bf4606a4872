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
import sys

from inference import train
from inference.alignment import class_shifts, uniform_half_width
from inference.cli import run_cli
from inference.data import DatasetName, load_datasets


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
