"""How training stops before its last step: Ctrl-C, termination signals and divergence.

:class:`DeferredInterrupt` lets the running step of :func:`inference.svi.fit` finish, and be saved, before a
Ctrl-C (SIGINT), a SIGTERM (schedulers, ``docker stop``, ``kill``) or a SIGHUP (a closed terminal) stops it with
:class:`TrainingInterrupted`; a NaN/inf loss or parameter stops it with a :class:`NonFiniteError` naming the step
and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from inference.optim import ParamAdam


class NonFiniteError(FloatingPointError):
    """The loss or a parameter became NaN/inf at ``step``; names the newest checkpoint written before it."""

    def __init__(self, problem: str, step: int, last_checkpoint: Path | None) -> None:
        self.problem, self.step, self.last_checkpoint = problem, step, last_checkpoint
        kept = (f"the last good checkpoint is kept at {last_checkpoint}" if last_checkpoint is not None
                else "no checkpoint was written before it")
        super().__init__(f"{problem} at step {step}; {kept}; lower the learning rates (--lr, --eta-lr) "
                         "and continue from it with --resume, or lower the initial eta")

    def __reduce__(self) -> tuple:  # picklable, so that a grid's worker process can report it
        return type(self), (self.problem, self.step, self.last_checkpoint)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that stop training after the running step, with a checkpoint (SIGHUP does not exist on Windows)."""


class Stopped(KeyboardInterrupt):
    """A stop signal (``signum``) arrived outside the training loop (loading data, evaluating), where there is no
    step to finish: the command ends at once."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    def __reduce__(self) -> tuple:  # picklable, so that a grid's worker process can report it
        return type(self), (self.signum,)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM and SIGHUP raise :class:`Stopped`, as Ctrl-C raises
    ``KeyboardInterrupt``: a command cleans up and reports in one line instead of dying. :class:`DeferredInterrupt`
    takes them over inside the training loop. Signals the process ignores stay ignored."""
    previous = {}

    def handle(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signum != signal.SIGINT and signal.getsignal(signum) not in (None, signal.SIG_IGN):
                previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal (``signum``, SIGINT for Ctrl-C) ended :func:`fit` after ``step`` of ``num_steps`` steps;
    ``checkpoint`` is the newest one on disk, which holds the state after ``step`` steps when ``saved`` (not after
    a second signal inside a step)."""

    def __init__(self, step: int, num_steps: int, checkpoint: Path | None, saved: bool,
                 signum: int = signal.SIGINT) -> None:
        self.step, self.num_steps, self.checkpoint, self.saved, self.signum = step, num_steps, checkpoint, saved, signum
        if saved:
            where = f"checkpoint saved to {checkpoint}"
        elif checkpoint is not None:
            where = f"the newest checkpoint, of an earlier step, is {checkpoint}"
        else:
            where = "no checkpoint was saved"
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        super().__init__(f"interrupted{by} after step {step} of {num_steps}; {where}")

    def __reduce__(self) -> tuple:  # picklable, so that a grid's worker process can report it
        return type(self), (self.step, self.num_steps, self.checkpoint, self.saved, self.signum)


class DeferredInterrupt:
    """While active, the first stop signal (:data:`STOP_SIGNALS`) only records itself in ``requested``, so the
    running step can finish and be saved; a second one raises ``KeyboardInterrupt`` at once. Inactive outside
    the main thread; a signal the process ignores (``nohup``, a background job's SIGINT) stays ignored."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal number received, None before any
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                previous = signal.getsignal(signum)
                if previous not in (None, signal.SIG_IGN):
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def nonfinite_params(optim: ParamAdam) -> list[str]:
    """Names of the trained parameters that hold a NaN or inf."""
    return [name for name, p in optim.params.items() if not bool(torch.isfinite(p).all())]


_INVALID_VALUES = re.compile(r"Expected parameter (\w+) .* of distribution (\w+).* but found invalid values")


def nonfinite_problem(err: ValueError, optim: ParamAdam) -> str | None:
    """What went non-finite when distribution validation raised ``err``; None if it is another error.

    NaN/inf parameters are named; finite parameters that overflow inside the model (huge weights
    or eta) show up as invalid distribution parameters, which torch reports with a fixed phrase.
    """
    bad = nonfinite_params(optim)
    if bad:
        return f"non-finite parameter(s) {bad}"
    match = _INVALID_VALUES.search(str(err).split("\n", 1)[0])
    if match:
        return f"non-finite {match.group(1)} of a {match.group(2)} distribution inside the model"
    return None
