"""What every command-line tool shares: its errors (a user error is one line and exit code 2, a stop signal
(Ctrl-C, SIGTERM, SIGHUP) one line and exit code 128 + its number; a bug keeps its traceback) and, for the tools
that draw, the figure flags ``--format png|pdf|svg`` and ``--dpi``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

from inference.data import CorruptDataError, DataNotFoundError
from inference.plots.style import DPI, FORMATS, FigureFormat
from inference.stopping import stop_signals_raise

USER_ERRORS = (DataNotFoundError, CorruptDataError, ValueError, FloatingPointError, OSError)
"""Errors caused by the arguments, the data or the machine, reported in one line (``ValueError`` covers
bad settings, invalid data and unusable checkpoints or run folders; ``FloatingPointError`` a diverged run)."""


def one_line(err: BaseException) -> str:
    """The first line of an error message (torch's validation errors append tensor dumps)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def run_cli(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace,
            interrupted: Callable[[KeyboardInterrupt], str] | None = None,
            error: Callable[[BaseException], str] = one_line) -> int:
    """Run ``main(args)``; returns the exit code: 0, 2 on a user error (:data:`USER_ERRORS`, printed by ``error``),
    128 + the signal's number when stopped (printed by ``interrupted``)."""
    try:
        with stop_signals_raise():
            main(args)
    except KeyboardInterrupt as err:
        print(interrupted(err) if interrupted is not None else f"interrupted: {one_line(err)}", file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    except USER_ERRORS as err:
        print(f"error: {error(err)}", file=sys.stderr)
        return 2
    return 0


def add_figure_flags(parser: argparse.ArgumentParser) -> None:
    """``--format`` and ``--dpi`` (:class:`~inference.plots.style.FigureFormat`) in a group of their own."""
    g = parser.add_argument_group("figures")
    g.add_argument("--format", choices=FORMATS, default="png", dest="figure_format",
                   help="file format of every figure (pdf and svg: vector graphics, text kept as text)")
    g.add_argument("--dpi", type=int, default=DPI, help="resolution of PNG figures (and of images inside PDF / SVG)")


def figure_format(args: argparse.Namespace) -> FigureFormat:
    """The :class:`~inference.plots.style.FigureFormat` of the flags of :func:`add_figure_flags`."""
    return FigureFormat(args.figure_format, args.dpi)
