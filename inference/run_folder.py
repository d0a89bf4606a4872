"""A run's folder: one writer at a time, and never the files of two runs mixed.

:func:`claim`, held by :func:`inference.runner.run` for the whole of a run, refuses an empty ``--out``, takes an
exclusive ``flock`` on the folder (released by the kernel when the process ends, even by ``kill -9``), and refuses
a folder that holds a run (:data:`RUN_FILES`) unless the run resumes (``--resume``) or replaces it
(``--overwrite``: every file of the old run is removed once the new one starts training, :func:`clear`). Files
that are not a run's (a grid's ``train.log``, the user's notes) neither count nor are removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from inference.checkpoint import CHECKPOINT_DIRNAME
from inference.config import CONFIG_FILENAME

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

METRICS_FILENAME, HISTORY_FILENAME, MODEL_FILENAME = "metrics.json", "eta_history.csv", "model.pt"
ELBO_HISTORY_FILENAME, TENSORBOARD_DIRNAME = "elbo_history.csv", "tensorboard"
RUN_FILES = (CONFIG_FILENAME, METRICS_FILENAME, HISTORY_FILENAME, ELBO_HISTORY_FILENAME, MODEL_FILENAME,
             CHECKPOINT_DIRNAME, TENSORBOARD_DIRNAME, "diagnostics")
"""What a run writes into its folder (``diagnostics/`` by ``inference.diagnose``, ``tensorboard/`` with
``--tensorboard``)."""


class RunFolderError(ValueError):
    """The folder cannot take this run: not a folder, already holding a run, or in use by another process."""


def run_files(out: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a path; an empty name is an error, not the current directory."""
    if not str(out).strip():
        raise RunFolderError("--out must name a directory (an empty name would write into the current directory)")
    return Path(out)


@contextlib.contextmanager
def claim(out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``out`` for one run: create it if needed, lock it, and check that it may take the run, which
    continues (``resume``) or replaces (``overwrite``; call :func:`clear` when it starts training) the one there.

    Raises
    ------
    RunFolderError
        ``out`` is empty or a file, another process holds it, or it holds a run and neither ``resume`` nor
        ``overwrite`` is given. A folder this call created is removed again if the run leaves it empty.
    """
    out = check_out(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        _lock(fd, out)
        present = run_files(out)
        if present and not (resume or overwrite):
            raise RunFolderError(f"{out} already holds a run ({', '.join(present)}): pass --resume {out} to continue "
                                 "it, or --overwrite to replace it")
        yield out
    finally:
        os.close(fd)  # releases the lock
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if the run wrote nothing


def _lock(fd: int, out: Path) -> None:
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"{out} is in use by another run (its folder is locked): wait for that process "
                                 "to end, or choose another --out") from None
        raise


def clear(out: Path) -> list[str]:
    """Remove every run file (:data:`RUN_FILES`) from ``out``; returns the names removed."""
    removed = run_files(out)
    for name in removed:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed
