"""The state of a training run and how it is kept: what a checkpoint holds, when it is written, how it comes back.

:func:`capture_training_state` gathers what :func:`inference.svi.fit` has learned as plain types (the
``state_dict()`` of the model and guides, the optimiser's, every RNG, the history), :class:`Checkpointer`
writes it (:mod:`inference.checkpoint`) as a :class:`CheckpointPolicy` says, and :func:`restore_training_state`
puts it back so that a resumed run ends exactly where an uninterrupted one ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from inference.stopping import NonFiniteError
from inference.stopping import TrainingInterrupted as TrainingInterrupted  # importable from here too
from models.config import check_positive_int
from models.network import InvariantNet


@dataclass
class FitResult:
    """What :func:`fit` returns: the loss per step, eta's trajectory and the ELBO's terms at the logged steps."""

    losses: list[float] = field(default_factory=list)  # -ELBO / N per step (minibatch estimate)
    eta_history: list[dict[str, float]] = field(default_factory=list)  # {"step": t, name: eta}
    seconds: float = 0.0
    # {"step": t, "elbo", "expected_loglik", "kl"} per example, one extra draw on step t's minibatch
    elbo_history: list[dict[str, float]] = field(default_factory=list)


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
        What defines the run, stamped (with its hash) on every checkpoint; a resumed run must match it. A
        run of :mod:`inference.runner` gives :meth:`inference.config.RunConfig.training_dict`; by default
        ``fit`` uses the model's config, its ``TrainConfig`` and the number of training examples.
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
"""What a checkpoint must hold to be resumed (:func:`capture_training_state` also records ``elbo_history``, which
checkpoints from before it was recorded lack: a run resumed from one has the terms of the later steps only)."""


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
    run once on a blank image, which draws random numbers. A guide not yet trained (the predicting guide in the
    first phase of the sequential schedule) is loaded as it is.

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
                           optim: ParamAdam, trained: Sequence[Callable] | None = None,
                           data_sha256: str | None = None) -> tuple[int, FitResult]:
    """Resume from ``start``: refuse it unless it was written with ``config`` and data of hash ``data_sha256``, then
    load its state into the model, the guides (see :func:`load_modules`), ``optim`` (at ``optim``'s learning rates,
    which may differ: :data:`inference.checkpoint.RESUMABLE_CHANGES`) and the RNGs; returns its step and history."""
    check_compatible(start, config, data_sha256)
    state = check_state(start)
    load_modules(state, model, guides, trained)
    try:
        optim.load_state_dict(state["optimizer"], named_params(model, *guides))
    except KeyError as err:
        raise IncompatibleCheckpointError(str(err)) from None
    set_rng_state(state["rng"])
    history = [dict(row) for row in state["eta_history"]]
    terms = [dict(row) for row in state.get("elbo_history", [])]
    return int(state["step"]), FitResult(list(state["losses"]), history, float(state["seconds"]), terms)


class Checkpointer:
    """Saves checkpoints of ``config`` for :func:`fit` as ``policy`` says, and remembers the newest one on disk."""

    def __init__(self, policy: CheckpointPolicy | None, config: Mapping, num_steps: int,
                 last: Checkpoint | None) -> None:
        self.policy, self.config, self.num_steps = policy, config, num_steps
        self.last_path = last.path if last is not None else None
        self.last_step = last.step if last is not None else None

    def due(self, step: int) -> bool:
        if self.policy is None or step == self.last_step:
            return False
        return step == self.num_steps or (self.policy.every > 0 and step % self.policy.every == 0)

    def save(self, step: int, state: dict, bad: list[str]) -> Path | None:
        """Write ``state`` unless checkpointing is off; refuses a state with NaN/inf parameters (``bad``)."""
        if self.policy is None:
            return None
        if bad:
            raise NonFiniteError(f"non-finite parameter(s) {bad}", step, self.last_path)
        self.last_path = save_checkpoint(self.policy.directory, step, state, self.config, keep=self.policy.keep,
                                         data_sha256=self.policy.data_sha256)
        self.last_step = step
        return self.last_path
