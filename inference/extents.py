"""Calibration of learned invariance: learned extent against the data's true extent (command line).

Usage::

    python -m inference.extents --data-dir ../shared/data --out runs/extents --seeds 0,1,2

trains one model per (transformation family, true extent, seed) with every flag of ``python -m inference.train``,
defaulting to the recommended setting for relaxed invariance (:data:`inference.calibration.RECOMMENDED`: the
``evidence`` objective with priors on every weight, on the ``sequential`` schedule, 2,000 steps per phase, a
200-step eta burn-in, eta's learning rate 0.02, all six generators in the isotropic basis, translations bounded by
half the frame), and writes ``OUT/<family>-<extent>/seed-<s>/`` (one run each; for a = 0
``OUT/untransformed/seed-<s>/``, MNIST, and ``OUT/centred-mnist/seed-<s>/``, the digits centred on their class
templates that the translation family shifts), ``OUT/extents.csv``, ``OUT/extents.md`` and ``OUT/extents.png``
(``--format pdf`` or ``svg``, ``--dpi``; :mod:`inference.calibration`).
Running the same command again continues where it stopped; ``--collect`` trains nothing and builds the table and
figure from the cells finished so far (e.g. by several processes sharing ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inference import grid, train
from inference.calibration import DEFAULT_FAMILIES, FAMILIES, Cell, calibrate, recommended_flags
from inference.cli import add_figure_flags, figure_format


def build_parser() -> argparse.ArgumentParser:
    """The training CLI's flags plus the calibration's own."""
    p = train.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(**recommended_flags())
    g = p.add_argument_group("calibration")
    g.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                   help=f"comma list of {list(FAMILIES)} (default: {','.join(DEFAULT_FAMILIES)})")
    g.add_argument("--seeds", type=grid.parse_seeds, default=(0,),
                   help="comma list of seeds, one run per cell and seed")
    g.add_argument("--jobs", type=int, default=1,
                   help="worker processes training cells in parallel (inference.grid: threads split between them)")
    g.add_argument("--collect", action="store_true",
                   help="train nothing: build the table and figure from the cells already finished in --out")
    for fam in FAMILIES.values():
        g.add_argument(f"--{fam.name}-grid", type=grid.parse_floats, default=fam.grid, metavar="A,B,...",
                       help=f"true extents of the {fam.name} family, in {fam.unit}")
    add_figure_flags(p)
    return p


def cells(args: argparse.Namespace) -> list[Cell]:
    """``(family, true extent, seed)`` of every run, in order."""
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown or no families {unknown}; choose from {list(FAMILIES)}")
    out = []
    for name in names:
        grid = getattr(args, f"{name.replace('-', '_')}_grid")
        if not grid or min(grid) < 0:
            raise ValueError(f"--{name}-grid needs extents >= 0, got {grid}")
        out += [(FAMILIES[name], a, s) for a in grid for s in args.seeds]
    return out


def main(args: argparse.Namespace) -> list[dict]:
    """Train (or reuse) every cell, then write the tables and the figure; returns the rows."""
    if args.out is None:
        raise ValueError("--out is required")
    rows = calibrate(train.config_from_args(args), cells(args), args.out, grid.grid_control(args), args.jobs,
                     args.collect, figure_format(args))
    print((Path(args.out) / "extents.md").read_text())
    return rows


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (:func:`inference.grid.grid_cli`)."""
    return grid.grid_cli(main, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
