"""What a run writes while it trains, so that it can be watched: ``eta_history.csv``, ``elbo_history.csv`` and, with
``--tensorboard``, TensorBoard event files in ``RUN/tensorboard/``.

:func:`inference.svi.fit` hands every logged step's two rows to ``on_record(eta_row, elbo_row)``;
:class:`TrainingRecord` is that callback for :func:`inference.runner.run`. TensorBoard is optional: the
``tensorboard`` package is not a dependency, and asking for it without the package is a one-line error before
training starts (:func:`require_tensorboard`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ELBO_FIELDS = ("step", "elbo", "expected_loglik", "kl")
"""Columns of ``elbo_history.csv`` (per example; ``elbo = expected_loglik - kl``)."""


class CsvRows:
    """Rows streamed to a CSV file while training, flushed after each one."""

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self.path, self.fields, self.file = Path(path), list(fields), None

    def open(self, rows: Iterable[Mapping] = ()) -> None:
        """Start the file afresh with ``rows`` already recorded (a resumed run's history up to its checkpoint)."""
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def __call__(self, row: Mapping) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; a ``ValueError`` saying what to install when the ``tensorboard``
    package is missing (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(f"--tensorboard needs the tensorboard package, which is not installed ({err}): "
                         "python -m pip install tensorboard") from None
    return SummaryWriter


class TensorBoardLog:
    """The ELBO's terms and eta of each logged step as TensorBoard scalars: ``elbo/elbo``, ``elbo/expected_loglik``,
    ``elbo/kl`` (per example) and ``eta/<generator>`` (units of T; ``eta/rotate_deg`` in degrees).

    A resumed run purges the events past its checkpoint (``purge_step``), so a step is never shown twice.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        self.writer = require_tensorboard()(log_dir=str(log_dir), purge_step=purge_step)

    def __call__(self, eta_row: Mapping[str, float], elbo_row: Mapping[str, float]) -> None:
        step = int(eta_row["step"])
        for key in ELBO_FIELDS[1:]:
            self.writer.add_scalar(f"elbo/{key}", float(elbo_row[key]), step)
        for name, value in eta_row.items():
            if name != "step":
                self.writer.add_scalar(f"eta/{name}", float(value), step)
        if "rotate" in eta_row:
            self.writer.add_scalar("eta/rotate_deg", math.degrees(float(eta_row["rotate"])), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrainingRecord:
    """``fit``'s ``on_record``: eta rows to ``eta_path``, ELBO rows to ``elbo_path`` and, when ``tensorboard_dir`` is
    given, both to TensorBoard."""

    def __init__(self, eta_path: Path, elbo_path: Path, names: Iterable[str], tensorboard_dir: Path | None = None
                 ) -> None:
        self.eta = CsvRows(eta_path, ["step", *names])
        self.elbo = CsvRows(elbo_path, ELBO_FIELDS)
        self.tensorboard_dir, self.tensorboard = tensorboard_dir, None

    def open(self, result: Any) -> None:
        """Start the files with the rows of ``result`` (a :class:`~inference.svi.FitResult`, empty unless resumed)."""
        self.eta.open(result.eta_history)
        self.elbo.open(result.elbo_history)
        if self.tensorboard_dir is not None:
            done = result.eta_history[-1]["step"] if result.eta_history else None
            self.tensorboard = TensorBoardLog(self.tensorboard_dir, None if done is None else done + 1)

    def __call__(self, eta_row: Mapping[str, float], elbo_row: Mapping[str, float]) -> None:
        self.eta(eta_row)
        self.elbo(elbo_row)
        if self.tensorboard is not None:
            self.tensorboard(eta_row, elbo_row)

    def close(self) -> None:
        self.eta.close()
        self.elbo.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_history_csv(path: str | Path, names: Sequence[str] | None = None) -> tuple[list[int], dict[str, list[float]]]:
    """``eta_history.csv``: the steps and one list of eta per generator (``names``, default: every column).

    Raises
    ------
    ValueError
        The file cannot be read, lacks a column, or holds a value that is not a number.
    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns, rows = list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a readable eta history ({type(err).__name__}: {err})") from None
    names = [c for c in columns if c != "step"] if names is None else list(names)
    missing = [c for c in ("step", *names) if c not in columns]
    if missing:
        raise ValueError(f"{path} is not an eta history: it lacks the column(s) {missing}")
    try:
        return [int(float(r["step"])) for r in rows], {name: [float(r[name]) for r in rows] for name in names}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds a value that is not a number ({type(err).__name__}: {err})") from None
