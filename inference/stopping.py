"""How training stops before its last step: Ctrl-C and divergence.

:class:`DeferredInterrupt` lets the running step of :func:`inference.svi.fit` finish, and be saved, before a
Ctrl-C stops it with :class:`TrainingInterrupted`; a NaN/inf loss or parameter stops it with a
:class:`NonFiniteError` naming the step and the last good checkpoint.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from inference.optim import ParamAdam


class NonFiniteError(FloatingPointError):
    """The loss or a parameter became NaN/inf at ``step``; names the newest checkpoint written before it."""

    def __init__(self, problem: str, step: int, last_checkpoint: Path | None) -> None:
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = (f"the last good checkpoint is kept at {last_checkpoint}" if last_checkpoint is not None
                else "no checkpoint was written before it")
        super().__init__(f"{problem} at step {step}; {kept}; lower the learning rates (--lr, --eta-lr) "
                         "or the initial eta")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit` after ``step`` of ``num_steps`` steps; ``checkpoint`` is the newest one on
    disk, which holds the state after ``step`` steps when ``saved`` (not after a second Ctrl-C inside a step)."""

    def __init__(self, step: int, num_steps: int, checkpoint: Path | None, saved: bool) -> None:
        self.step, self.num_steps, self.checkpoint, self.saved = step, num_steps, checkpoint, saved
        if saved:
            where = f"checkpoint saved to {checkpoint}"
        elif checkpoint is not None:
            where = f"the newest checkpoint, of an earlier step, is {checkpoint}"
        else:
            where = "no checkpoint was saved"
        super().__init__(f"interrupted after step {step} of {num_steps}; {where}")


class DeferredInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``, so the running step can finish
    and be saved; a second one raises ``KeyboardInterrupt`` at once. Inactive outside the main thread
    and where SIGINT is ignored."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (None, signal.SIG_IGN):
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


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
