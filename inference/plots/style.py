"""One style and one way of writing figures, shared by every figure of the project.

Each ``plot_*`` function draws on a :func:`new_figure` (its own Agg canvas, no pyplot, so nothing global changes)
inside :func:`styled` (the fonts and line widths of :data:`STYLE`), and returns the ``Figure``; given a path it
also writes it there, in the format the path's suffix names (:func:`finish`). Command lines choose the format and
resolution with ``--format png|pdf|svg`` and ``--dpi`` (:class:`FigureFormat`). PDF and SVG keep their text as
text (TrueType in PDF), as journals ask, and carry no creation date, so the same figure gives the same file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FORMATS = ("png", "pdf", "svg")
"""The file formats a figure command writes (``--format``)."""

DPI = 150
"""Default resolution of PNG figures (``--dpi``); PDF and SVG are vector graphics (images inside them, the filter
banks, keep their pixels)."""

STYLE: dict[str, Any] = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "figure.titlesize": 11, "legend.framealpha": 0.9, "axes.grid": False, "lines.linewidth": 1.6,
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "svg.hashsalt": "invariant-weights",
}
"""rcParams of every figure: readable at a journal's column width, text kept as text in PDF and SVG."""

_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}  # no time stamps: the same figure, the same file

F = TypeVar("F", bound=Callable[..., Any])


def styled(func: F) -> F:
    """Draw ``func``'s figure under :data:`STYLE` (a decorator; settings are read when artists are made)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context(STYLE):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class FigureFormat:
    """How a command writes its figures: ``format`` (png, pdf or svg) and ``dpi`` (PNG resolution)."""

    format: str = "png"
    dpi: int = DPI

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown figure format {self.format!r}; choose from {list(FORMATS)}")
        if isinstance(self.dpi, bool) or not isinstance(self.dpi, int) or not 20 <= self.dpi <= 1200:
            raise ValueError(f"--dpi must be an integer in [20, 1200], got {self.dpi!r}")

    def path(self, folder: str | Path, name: str) -> Path:
        """``folder/name.<format>``."""
        return Path(folder) / f"{name}.{self.format}"

    def save(self, fig: Figure, folder: str | Path, name: str) -> Path:
        """Write ``fig`` as ``folder/name.<format>``; returns the path."""
        path = self.path(folder, name)
        finish(fig, path, self.dpi)
        return path


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches with its own Agg canvas (no pyplot) and constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def finish(fig: Figure, path: str | Path | None, dpi: int = DPI) -> Figure:
    """Write ``fig`` to ``path`` (creating folders; the format from its suffix) when a path is given; return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = path.suffix.lstrip(".").lower()
        with matplotlib.rc_context(STYLE):
            fig.savefig(path, dpi=dpi, metadata=_METADATA.get(fmt))
    return fig
