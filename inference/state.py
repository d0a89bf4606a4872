"""A training run's state: what a checkpoint holds, when it is written, how it comes back.

:func:`capture_training_state` gathers what :func:`inference.svi.fit` has learned as plain types,
:class:`Checkpointer` writes it as a :class:`CheckpointPolicy` says, and :func:`restore_training_state` puts it
back, so that a resumed run ends exactly where an uninterrupted one ends.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.util
import torch
from pyro import poutine

from inference.checkpoint import (
    Checkpoint,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    check_compatible,
    save_checkpoint,
)
from inference.draws import blank_image
from inference.optim import ParamAdam, named_params
from inference.stopping import NonFiniteError, TrainingInterrupted
from models.config import check_positive_int
from models.network import InvariantNet

if TYPE_CHECKING:
    from inference.svi import FitResult


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where and when :func:`fit` saves checkpoints, and the config they carry.

    Parameters
    ----------
    directory : str or Path
        Folder of the checkpoint files (created when needed).
    every : int
        Save after every ``every`` steps; 0 saves only at the last step and on Ctrl-C.
    keep : int
        How many of the newest checkpoints to keep.
    config : Mapping, optional
        What defines the run (a resumed run must match it); by default the model's config, the ``TrainConfig``
        and the number of training examples.
    data_sha256 : str, optional
        Hash of the data's content (:func:`inference.data.content_sha256`); a resumed run must train on the same.
    """

    directory: str | Path
    every: int = 100
    keep: int = 3
    config: Mapping | None = None
    data_sha256: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"checkpoint every must be an integer >= 0, got {self.every!r}")
        check_positive_int("keep", self.keep)


def get_rng_state() -> dict[str, Any]:
    """torch (and CUDA, once initialised), python and numpy RNG states, as types ``torch.load`` reads safely."""
    state = pyro.util.get_rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"torch": state["torch"], "random": state["random"],
           "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                     float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    version, internal, gauss = state["random"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    pyro.util.set_rng_state({"torch": state["torch"], "random": (version, tuple(internal), gauss),
                             "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_training_state(step: int, result: FitResult, optim: ParamAdam, model: InvariantNet,
                           guides: Sequence[Callable]) -> dict[str, Any]:
    """The state after ``step`` steps, as plain types: the ``state_dict()`` of the model (eta and every buffer,
    the random-feature layer's included) and of each guide, the optimiser and schedules, the RNGs, the history."""

    def copy(module: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    return {"step": int(step), "num_data": model.num_data, "model": copy(model),
            "guides": [copy(guide) for guide in guides], "optimizer": optim.state_dict(), "rng": get_rng_state(),
            "losses": list(result.losses), "eta_history": [dict(row) for row in result.eta_history],
            "seconds": float(result.seconds), "elbo_history": [dict(row) for row in result.elbo_history]}


STATE_KEYS = ("step", "num_data", "model", "guides", "optimizer", "rng", "losses", "eta_history", "seconds")
"""What a resumed run needs (older checkpoints lack ``elbo_history``)."""


def check_state(checkpoint: Checkpoint, keys: Sequence[str] = STATE_KEYS) -> dict[str, Any]:
    """``checkpoint.state`` if it holds ``keys``; else a :class:`CorruptCheckpointError` naming the missing ones."""
    missing = [key for key in keys if key not in checkpoint.state]
    if missing:
        raise CorruptCheckpointError(f"checkpoint {checkpoint.path} lacks {missing}: it was not written by "
                                     "inference.train's fit")
    return checkpoint.state


def load_modules(state: Mapping[str, Any], model: InvariantNet, guides: Sequence[Callable],
                 trained: Sequence[Callable] | None = None) -> None:
    """Load the model's and the guides' ``state_dict``s from ``state`` (:func:`capture_training_state`).

    Autoguides create their parameters on their first call, so the guides in ``trained`` (default: all) are first
    run once on a blank image, which draws random numbers (a guide not yet trained is loaded as it is).

    Raises
    ------
    IncompatibleCheckpointError
        When the saved names or shapes do not match the model and guides.
    """
    if len(state["guides"]) != len(guides):
        raise IncompatibleCheckpointError(f"the checkpoint holds {len(state['guides'])} guide(s), the run has "
                                          f"{len(guides)}")
    x = blank_image(model)
    y = model.likelihood.blank_labels(1, x)
    for guide in guides if trained is None else trained:
        poutine.replay(model, trace=poutine.trace(guide).get_trace(x, y))(x, y)
    try:
        model.load_state_dict(state["model"])
        for guide, saved in zip(guides, state["guides"], strict=True):
            guide.load_state_dict(saved)
    except RuntimeError as err:
        raise IncompatibleCheckpointError(f"checkpoint parameters do not match the model and guides: "
                                          f"{' '.join(str(err).split())}") from None


def restore_training_state(start: Checkpoint, config: Mapping, model: InvariantNet, guides: Sequence[Callable],
                           optim: ParamAdam, result: FitResult, trained: Sequence[Callable] | None = None,
                           data_sha256: str | None = None) -> int:
    """Resume from ``start`` (refused unless written with ``config`` and data of hash ``data_sha256``): load the
    model, guides (:func:`load_modules`), ``optim`` (keeping its learning rates) and RNGs, and the history into
    ``result``; returns the step."""
    check_compatible(start, config, data_sha256)
    state = check_state(start)
    load_modules(state, model, guides, trained)
    try:
        optim.load_state_dict(state["optimizer"], named_params(model, *guides))
    except KeyError as err:
        raise IncompatibleCheckpointError(str(err)) from None
    set_rng_state(state["rng"])
    result.losses, result.seconds = list(state["losses"]), float(state["seconds"])
    result.eta_history = [dict(row) for row in state["eta_history"]]
    result.elbo_history = [dict(row) for row in state.get("elbo_history", [])]
    return int(state["step"])


class Checkpointer:
    """Saves checkpoints of ``config`` for :func:`fit` as ``policy`` says, and remembers the newest one on disk.

    ``capture(step)`` returns the state to save and the names of its non-finite parameters (a state with any is
    refused with a :class:`NonFiniteError`).
    """

    def __init__(self, policy: CheckpointPolicy | None, config: Mapping, num_steps: int, last: Checkpoint | None,
                 capture: Callable[[int], tuple[dict, list[str]]]) -> None:
        self.policy, self.config, self.num_steps, self.capture = policy, config, num_steps, capture
        self.last_path = last.path if last is not None else None
        self.last_step = last.step if last is not None else None

    def due(self, step: int) -> bool:
        if self.policy is None or step == self.last_step:
            return False
        return step == self.num_steps or (self.policy.every > 0 and step % self.policy.every == 0)

    def save(self, step: int) -> None:
        state, bad = self.capture(step)
        if bad:
            raise NonFiniteError(f"non-finite parameter(s) {bad}", step, self.last_path)
        self.last_path = save_checkpoint(self.policy.directory, step, state, self.config, keep=self.policy.keep,
                                         data_sha256=self.policy.data_sha256)
        self.last_step = step

    def interrupted(self, done: int, in_step: bool, signum: int | None) -> TrainingInterrupted:
        """The error for a stop signal after ``done`` steps, having saved their state unless the signal came inside
        a step (whose state is incomplete) or it is on disk already."""
        if self.policy is not None and not in_step and done > 0 and self.last_step != done:
            self.save(done)
        saved = self.policy is not None and self.last_step == done
        return TrainingInterrupted(done, self.num_steps, self.last_path, saved, signum or signal.SIGINT)
