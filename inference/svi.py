"""Stochastic variational inference: maximise the ELBO over q(theta) and eta (empirical Bayes).

The objective (Eq. 8 of van der Ouderaa & van der Wilk, 2022) is the multi-sample Jensen bound

    L(q, eta) = sum_n E_q(theta) E_eps log (1/S) sum_s p(y_n | f_s(x_n)) - KL(q(theta) || p(theta)),

estimated on minibatches with ``Trace_ELBO(num_particles=K)``; eta is a ``pyro.param`` learned
by the same optimiser with its own learning rate. Adam with cosine annealing to 0.

Reliability: :func:`fit` can save checkpoints (:mod:`inference.checkpoint`) at intervals, at the
last step and on Ctrl-C, and resume from one so that the run ends exactly where an uninterrupted
run with the same seed ends (the parameters, the optimiser and scheduler state, every random
number generator and the position in the minibatch stream are restored). A NaN/inf loss or
parameter stops training with a :class:`NonFiniteError` naming the step and the last good
checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.optim
import pyro.util
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from tqdm.auto import tqdm

from guides.factory import eta_guide_of
from guides.meanfield import EVIDENCE_GUIDE_NAME
from inference.checkpoint import (
    Checkpoint,
    IncompatibleCheckpointError,
    check_compatible,
    save_checkpoint,
    to_jsonable,
)
from inference.data import Split, check_seed, validate_split
from inference.eta_objectives import (
    EtaObjective,
    EvidenceEtaLoss,
    EvidenceSchedule,
    HeldOutEtaLoss,
    SequentialEvidenceLoss,
    eta_held,
)
from models.config import ModelConfig, check_positive_float, check_positive_int
from models.network import InvariantNet
from models.priors import EtaPrior


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: the paper's Adam + cosine schedule, shortened to 1k steps with larger rates."""

    num_steps: int = 1000
    batch_size: int = 128  # B
    lr: float = 5e-3  # Adam, every variational parameter (the paper: 1e-3 for 40k steps)
    eta_lr: float = 3e-2  # Adam on log(eta) (eta is positive): a relative step of up to ~3% per step
    betas: tuple[float, float] = (0.9, 0.999)
    num_particles: int = 1  # K weight samples per step
    vectorize_particles: bool = True
    cosine: bool = True  # cosine annealing of every learning rate to 0 over num_steps
    log_every: int = 10  # record eta and the loss every this many steps
    seed: int = 0
    eta_objective: EtaObjective = EtaObjective.ELBO  # what sets eta (inference/eta_objectives.py)
    eta_holdout: float = 0.25  # the "heldout" objective only: fraction of the training set held out for eta
    evidence_lr: float | None = None  # the "evidence" objective only: Adam on its mean-field guide (None: lr)
    eta_burnin: int = 0  # eta stays at its initial value for this many first steps while the guide(s) settle
    evidence_schedule: EvidenceSchedule = EvidenceSchedule.JOINT  # "evidence" only: joint or sequential guides

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size", "num_particles", "log_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "eta_lr"):
            check_positive_float(name, getattr(self, name))
        if isinstance(self.eta_burnin, bool) or not isinstance(self.eta_burnin, int) or self.eta_burnin < 0:
            raise ValueError(f"eta_burnin must be an integer >= 0, got {self.eta_burnin!r}")
        if self.evidence_lr is not None:
            object.__setattr__(self, "evidence_lr", check_positive_float("evidence_lr", self.evidence_lr))
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        check_seed("seed", self.seed)
        try:
            object.__setattr__(self, "eta_objective", EtaObjective(self.eta_objective))
            object.__setattr__(self, "evidence_schedule", EvidenceSchedule(self.evidence_schedule))
        except ValueError:
            raise ValueError(f"unknown eta objective {self.eta_objective!r} or evidence schedule "
                             f"{self.evidence_schedule!r}; choose from {[o.value for o in EtaObjective]} and "
                             f"{[s.value for s in EvidenceSchedule]}") from None
        if isinstance(self.eta_holdout, bool) or not (0 < float(self.eta_holdout) < 1):
            raise ValueError(f"eta_holdout must lie in (0, 1), got {self.eta_holdout!r}")

    @property
    def total_steps(self) -> int:
        """SVI steps of the run: ``num_steps``, twice that on the sequential evidence schedule (one guide a step)."""
        return self.num_steps * (2 if self.sequential else 1)

    @property
    def sequential(self) -> bool:
        """True on the ``evidence`` objective's sequential schedule."""
        return self.eta_objective is EtaObjective.EVIDENCE and self.evidence_schedule is EvidenceSchedule.SEQUENTIAL


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where and when :func:`fit` saves checkpoints.

    Parameters
    ----------
    directory : str or Path
        Folder of the checkpoint files (created when needed).
    every : int
        Save after every ``every`` steps; 0 saves only at the last step and on Ctrl-C.
    keep : int
        How many of the newest checkpoints to keep.
    run_config : Mapping
        Settings beyond the model and :class:`TrainConfig` that define the run (data, guide,
        device); they enter the fingerprint that a resumed run must match.
    """

    directory: str | Path
    every: int = 100
    keep: int = 3
    run_config: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"checkpoint every must be an integer >= 0, got {self.every!r}")
        check_positive_int("keep", self.keep)


class NonFiniteError(FloatingPointError):
    """The loss or a parameter became NaN/inf; the message names the step and the last good checkpoint.

    Attributes
    ----------
    step : int
        The step at which it was detected.
    last_checkpoint : Path or None
        The newest checkpoint written before it (kept on disk), if any.
    """

    def __init__(self, problem: str, step: int, last_checkpoint: Path | None) -> None:
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = (f"the last good checkpoint is kept at {last_checkpoint}" if last_checkpoint is not None
                else "no checkpoint was written before it")
        super().__init__(f"{problem} at step {step}; {kept}; lower the learning rates (--lr, --eta-lr) "
                         "or the initial eta")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit` after ``step`` completed steps.

    Attributes
    ----------
    step : int
        Steps completed.
    num_steps : int
        Steps the run was meant to take.
    checkpoint : Path or None
        The newest checkpoint on disk: the state after ``step`` steps when ``saved`` is True, an
        earlier one otherwise (a second Ctrl-C inside a step, or no checkpointing).
    saved : bool
        Whether ``checkpoint`` holds the state after ``step`` steps.
    """

    def __init__(self, step: int, num_steps: int, checkpoint: Path | None, saved: bool) -> None:
        self.step, self.num_steps, self.checkpoint, self.saved = step, num_steps, checkpoint, saved
        if saved:
            where = f"checkpoint saved to {checkpoint}"
        elif checkpoint is not None:
            where = f"the newest checkpoint, of an earlier step, is {checkpoint}"
        else:
            where = "no checkpoint was saved"
        super().__init__(f"interrupted after step {step} of {num_steps}; {where}")


@dataclass
class FitResult:
    """What :func:`fit` returns: the loss per step and eta's trajectory."""

    losses: list[float] = field(default_factory=list)  # -ELBO / N per step (minibatch estimate)
    eta_history: list[dict[str, float]] = field(default_factory=list)  # {"step": t, name: eta}
    seconds: float = 0.0


def make_optimizer(cfg: TrainConfig) -> pyro.optim.PyroOptim:
    """Adam with per-parameter learning rates, optionally cosine-annealed.

    ``eta_lr`` for ``eta``, ``evidence_lr`` for the ``evidence`` objective's mean-field guide (its
    parameters are named ``EvidenceGuide.*``), ``lr`` for everything else.
    """

    def optim_args(param_name: str) -> dict:
        if param_name == "eta" or param_name.endswith(".eta"):  # the param, or q(eta) under full Bayes
            lr = cfg.eta_lr
        elif param_name.startswith(EVIDENCE_GUIDE_NAME + ".") and cfg.evidence_lr is not None:
            lr = cfg.evidence_lr
        else:
            lr = cfg.lr
        return {"lr": lr, "betas": cfg.betas}

    if not cfg.cosine:
        return pyro.optim.Adam(optim_args)
    return pyro.optim.CosineAnnealingLR(
        {"optimizer": torch.optim.Adam, "optim_args": optim_args, "T_max": cfg.num_steps}
    )


def make_elbo(cfg: TrainConfig) -> Trace_ELBO:
    """``Trace_ELBO`` with K particles; one plate (``data``) in the model."""
    return Trace_ELBO(num_particles=cfg.num_particles, vectorize_particles=cfg.vectorize_particles, max_plate_nesting=1)


def eta_loss(
    model: InvariantNet, cfg: TrainConfig, heldout: Split | None = None, evidence_guide: Callable | None = None,
    guide: Callable | None = None,
) -> Callable:
    """SVI's loss for ``cfg.eta_objective`` (see :mod:`inference.eta_objectives`), after checking its inputs."""
    objective = cfg.eta_objective
    if (objective is EtaObjective.HELDOUT) != (heldout is not None):
        raise ValueError("pass the held-out split exactly when the eta objective is 'heldout'")
    if (objective is EtaObjective.EVIDENCE) != (evidence_guide is not None):
        raise ValueError("pass the evidence guide exactly when the eta objective is 'evidence'")
    full_bayes = model.config.eta_prior is not EtaPrior.NONE
    eta_is_param = not full_bayes and model.config.learn_eta
    if objective is EtaObjective.HELDOUT and not eta_is_param:
        raise ValueError("the 'heldout' eta objective learns eta as a parameter: it needs eta prior 'none' and a "
                         "learned eta")
    if objective is EtaObjective.EVIDENCE and not eta_is_param and not (full_bayes and cfg.sequential):
        raise ValueError("the 'evidence' eta objective learns eta as a parameter, or, under full Bayes (eta prior "
                         "'uniform'), q(eta) on the 'sequential' schedule; it needs a learned eta")
    if cfg.eta_burnin and not eta_is_param and eta_guide_of(evidence_guide or guide) is None:
        raise ValueError("an eta burn-in holds a learned eta fixed: it needs a learned eta parameter (eta prior "
                         "'none') or, under full Bayes, a guide with a separate q(eta) ('normal', 'hybrid', 'paper')")
    if objective is EtaObjective.HELDOUT:
        return HeldOutEtaLoss(make_elbo(cfg), len(heldout))
    if cfg.sequential:
        return SequentialEvidenceLoss(make_elbo(cfg), evidence_guide)
    if objective is EtaObjective.EVIDENCE:
        return EvidenceEtaLoss(make_elbo(cfg), evidence_guide)
    return make_elbo(cfg)


def eta_dict(model: InvariantNet, guide: Callable | None = None, num_samples: int = 64) -> dict[str, float]:
    """Current effective eta per generator (0 for inactive generators).

    Under full Bayes (``eta_prior != "none"``) eta is a latent variable: this is then the median of
    ``num_samples`` draws from q(eta), taken without disturbing the global random stream.
    """
    if model.config.eta_prior is EtaPrior.NONE:
        return dict(zip(model.generator_names, model.eta_effective.detach().cpu().tolist(), strict=True))
    piece = eta_guide_of(guide)
    if piece is not None:  # a separate q(eta): its exact median
        eta = piece.median() * model.generator_mask
        return dict(zip(model.generator_names, eta.cpu().tolist(), strict=True))
    if guide is None:
        raise ValueError("under full Bayes eta is latent: pass the guide to read q(eta)")
    eta = _eta_draws(model, guide, num_samples).median(0).values * model.generator_mask
    return dict(zip(model.generator_names, eta.cpu().tolist(), strict=True))


def _eta_draws(model: InvariantNet, guide: Callable, num_samples: int) -> torch.Tensor:
    """``(num_samples, K)`` draws of eta from a guide that covers it inside its own family, taken without
    disturbing the global random stream."""
    x = torch.zeros(1, *model.config.image_shape, device=model.prior_loc.device, dtype=model.prior_loc.dtype)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return torch.stack([poutine.trace(guide).get_trace(x, None, 1).nodes["eta"]["value"].reshape(-1)
                            for _ in range(num_samples)])


def eta_interval(model: InvariantNet, guide: Callable, level: float = 0.9) -> dict[str, list[float]] | None:
    """Full Bayes: the central ``level`` interval of q(eta) per generator, ``{name: [low, high]}``; None otherwise.

    Exact for a separate q(eta) piece; from 256 draws (without disturbing the global random stream) for
    guides that cover eta inside their own family.
    """
    if model.config.eta_prior is EtaPrior.NONE:
        return None
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    piece = eta_guide_of(guide)
    if piece is not None:
        low, high = piece.quantile(lo_q), piece.quantile(hi_q)
    else:
        draws = _eta_draws(model, guide, 256)
        low, high = torch.quantile(draws, lo_q, dim=0), torch.quantile(draws, hi_q, dim=0)
    low, high = (t * model.generator_mask for t in (low, high))
    return {name: [float(a), float(b)] for name, a, b in zip(model.generator_names, low, high, strict=True)}


def minibatches(n: int, batch_size: int, generator: torch.Generator, skip: int = 0) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled index batches (a new permutation every epoch, last batch dropped).

    Parameters
    ----------
    n, batch_size : int
        Examples and batch size (a batch larger than ``n`` becomes one batch of everything).
    generator : torch.Generator
        Source of the permutations, freshly seeded for a reproducible stream.
    skip : int
        Batches to skip, e.g. the steps already taken by a resumed run: the stream then continues
        exactly where a stream that was never stopped would be. Whole epochs are skipped by
        drawing their permutations, so skipping costs one ``randperm`` per epoch.
    """
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epochs, offset = divmod(skip, per_epoch)
    for _ in range(epochs):
        torch.randperm(n, generator=generator)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(offset * batch_size, per_epoch * batch_size, batch_size):
            yield perm[i : i + batch_size]
        offset = 0


# --------------------------------------------------------------------------- training state
def fingerprint_config(
    model_config: ModelConfig, cfg: TrainConfig, num_data: int, extra: Mapping | None = None
) -> dict:
    """Everything that determines the training trajectory, as JSON: a resumed run must match it."""
    return {"model": to_jsonable(model_config), "train": to_jsonable(cfg), "num_data": int(num_data),
            **to_jsonable(dict(extra or {}))}


def get_rng_state() -> dict[str, Any]:
    """torch (and CUDA, once initialised), python and numpy RNG states, as types ``torch.load`` reads safely."""
    state = pyro.util.get_rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "torch": state["torch"],
        "random": state["random"],
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    version, internal, gauss = state["random"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    pyro.util.set_rng_state({
        "torch": state["torch"],
        "random": (version, tuple(internal), gauss),
        "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
    })
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def nonfinite_params() -> list[str]:
    """Names of parameters in the param store that hold a NaN or inf."""
    return [name for name, p in pyro.get_param_store().named_parameters() if not bool(torch.isfinite(p).all())]


def capture_training_state(step: int, result: FitResult, optim: pyro.optim.PyroOptim) -> dict[str, Any]:
    """The state after ``step`` steps: unconstrained parameters, optimiser + scheduler, RNGs, history.

    The parameters are those the optimiser updates (the ``eta`` param and the guide's).
    """
    optimizer = optim.get_state()
    store = dict(pyro.get_param_store().named_parameters())
    return {
        "step": int(step),
        "params": {name: store[name].detach().clone() for name in optimizer},
        "optimizer": optimizer,
        "rng": get_rng_state(),
        "losses": list(result.losses),
        "eta_history": [dict(row) for row in result.eta_history],
        "seconds": float(result.seconds),
    }


def materialise_params(
    model: InvariantNet, guides: Callable | Sequence[Callable], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Run each guide and the model once so that lazily created params exist; ``{name: unconstrained}``.

    Autoguides create their parameters on their first call, so a checkpoint can only be loaded
    into them afterwards. ``guides`` is one guide or several (the ``evidence`` objective trains
    two). This draws random numbers: restore the RNG state after calling it.
    """
    with poutine.trace(param_only=True) as capture:
        for guide in [guides] if callable(guides) else guides:
            guide_trace = poutine.trace(guide).get_trace(x, y)
            poutine.replay(model, trace=guide_trace)(x, y)
    return {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}


def restore_training_state(
    state: Mapping[str, Any], model: InvariantNet, guides: Callable | Sequence[Callable], data: Split,
    optim: pyro.optim.PyroOptim,
) -> int:
    """Load ``state`` (from :func:`capture_training_state`) into the param store, ``optim`` and the RNGs.

    Returns
    -------
    int
        The step the state was captured at.

    Raises
    ------
    IncompatibleCheckpointError
        When the saved parameters do not match the model and guide by name and shape.
    """
    params = materialise_params(model, guides, data.x[:1], data.y[:1])
    saved = state["params"]
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise IncompatibleCheckpointError(
            f"checkpoint parameters do not match the model and guide (missing {missing}, unexpected {unexpected})"
        )
    for name, value in saved.items():
        if params[name].shape != value.shape:
            raise IncompatibleCheckpointError(
                f"checkpoint parameter {name!r} has shape {tuple(value.shape)}, the model's {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    optim.set_state(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


class _DeferredInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``, so the running step can finish
    and be saved; a second one raises ``KeyboardInterrupt`` at once. Inactive outside the main thread
    and where SIGINT is ignored."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _DeferredInterrupt:
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


class _Checkpointer:
    """Saves checkpoints for :func:`fit` and remembers the newest one on disk."""

    def __init__(self, policy: CheckpointPolicy | None, config: dict, num_steps: int, last: Checkpoint | None) -> None:
        self.policy, self.config, self.num_steps = policy, config, num_steps
        self.last_path = last.path if last is not None else None
        self.last_step = last.step if last is not None else None

    def due(self, step: int) -> bool:
        if self.policy is None or step == self.last_step:
            return False
        return step == self.num_steps or (self.policy.every > 0 and step % self.policy.every == 0)

    def save(self, step: int, state: dict) -> Path | None:
        """Write ``state`` unless checkpointing is off; refuses a state with NaN/inf parameters."""
        if self.policy is None:
            return None
        bad = [name for name, value in state["params"].items() if not bool(torch.isfinite(value).all())]
        if bad:
            raise NonFiniteError(f"non-finite parameter(s) {bad}", step, self.last_path)
        self.last_path = save_checkpoint(self.policy.directory, step, state, self.config, keep=self.policy.keep)
        self.last_step = step
        return self.last_path


def _svi_step(svi: SVI, optim: pyro.optim.PyroOptim, batch: tuple[torch.Tensor, ...], scale: int, step: int,
              last_checkpoint: Path | None) -> float:
    """One SVI step and one scheduler step; a NaN/inf loss or parameter becomes a :class:`NonFiniteError`."""
    try:
        loss = svi.step(*batch) / scale
    except ValueError as err:  # distribution validation rejects NaN/inf before any loss exists
        problem = _nonfinite_problem(err)
        if problem is None:
            raise
        raise NonFiniteError(problem, step, last_checkpoint) from err
    if not math.isfinite(loss):
        raise NonFiniteError(f"non-finite loss {loss}", step, last_checkpoint)
    if isinstance(optim, pyro.optim.PyroLRScheduler):
        optim.step()
    return loss


_INVALID_VALUES = re.compile(r"Expected parameter (\w+) .* of distribution (\w+).* but found invalid values")


def _nonfinite_problem(err: ValueError) -> str | None:
    """What went non-finite when distribution validation raised ``err``; None if it is another error.

    NaN/inf parameters are named; finite parameters that overflow inside the model (huge weights
    or eta) show up as invalid distribution parameters, which torch reports with a fixed phrase.
    """
    bad = nonfinite_params()
    if bad:
        return f"non-finite parameter(s) {bad}"
    match = _INVALID_VALUES.search(str(err).split("\n", 1)[0])
    if match:
        return f"non-finite {match.group(1)} of a {match.group(2)} distribution inside the model"
    return None


def _record(
    result: FitResult, model: InvariantNet, guide: Callable, step: int, loss: float, cfg: TrainConfig
) -> dict | None:
    result.losses.append(loss)
    if step % cfg.log_every == 0 or step == 1 or step == cfg.total_steps:
        eta = eta_dict(model, guide)
        result.eta_history.append({"step": step, **eta})
        return eta
    return None


def fit(
    model: InvariantNet,
    guide: Callable,
    data: Split,
    cfg: TrainConfig,
    callback: Callable[[int, float], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
    progress: bool = True,
    *,
    checkpoints: CheckpointPolicy | None = None,
    start: Checkpoint | None = None,
    heldout: Split | None = None,
    evidence_guide: Callable | None = None,
) -> FitResult:
    """Fit ``guide`` and ``eta`` to ``data`` with SVI, optionally checkpointed and resumed.

    Parameters
    ----------
    model : InvariantNet
        The model; its ``num_data`` should equal ``len(data)`` so the ELBO has the right scale.
    guide : callable
        From :func:`guides.make_guide`.
    data : Split
        Training images ``(N, C, H, W)`` and labels ``(N,)`` on the model's device; checked once
        (shape, channels, label range, NaN/inf) before training.
    cfg : TrainConfig
        Optimisation settings.
    callback : callable, optional
        Called as ``callback(step, loss)`` after every step.
    on_record : callable, optional
        Called with each row ``{"step": t, <generator>: eta}`` as it is added to ``eta_history``
        (every ``cfg.log_every`` steps, the first and the last), e.g. to stream it to a file.
    progress : bool
        Show a tqdm progress bar.
    checkpoints : CheckpointPolicy, optional
        Save checkpoints there: every ``checkpoints.every`` steps, at the last step and on Ctrl-C.
    start : Checkpoint, optional
        Continue from this checkpoint (written with the same config: model, ``cfg``, data size and
        ``checkpoints.run_config``). Build ``model`` and ``guide`` as for a fresh run and seed as for
        a fresh run; the result then equals that of the uninterrupted run.
    heldout : Split, optional
        The ``heldout`` objective's part B (``data`` is then the fitting part A, see
        :func:`inference.eta_objectives.split_holdout`).
    evidence_guide : callable, optional
        The ``evidence`` objective's mean-field guide over every weight
        (:func:`guides.make_evidence_guide`); eta follows its ELBO, ``guide`` is fitted with eta held fixed.

    Returns
    -------
    FitResult
        Losses and eta history of the whole run, including the steps before ``start``.

    Raises
    ------
    NonFiniteError
        A NaN/inf loss or parameter; names the step and the last good checkpoint.
    TrainingInterrupted
        Ctrl-C: the current step is finished and, with ``checkpoints``, saved before this is raised.
    IncompatibleCheckpointError
        ``start`` comes from another configuration.
    """
    if model.num_data != len(data):
        raise ValueError(f"model.num_data = {model.num_data} but the training set has {len(data)} examples")
    validate_split(data, model.config.image_shape, model.config.num_classes, "training")
    config = fingerprint_config(model.config, cfg, len(data), checkpoints.run_config if checkpoints else None)
    objective = eta_loss(model, cfg, heldout, evidence_guide, guide)
    optim = make_optimizer(cfg)
    svi = SVI(model, guide, optim, loss=objective)
    guides = [guide] if evidence_guide is None else [guide, evidence_guide]
    result, done = FitResult(), 0
    if start is not None:
        check_compatible(start, config)
        # on the sequential schedule the predicting guide first runs at step N + 1: a phase-1 checkpoint has none
        # of its parameters, and they are created then, from the same random stream as in an unbroken run
        phase1 = cfg.sequential and start.step <= cfg.num_steps
        done = restore_training_state(start.state, model, [evidence_guide] if phase1 else guides, data, optim)
        result = FitResult(list(start.state["losses"]), [dict(r) for r in start.state["eta_history"]],
                           float(start.state["seconds"]))
    saver = _Checkpointer(checkpoints, config, cfg.total_steps, start)
    batches = minibatches(len(data), cfg.batch_size, torch.Generator().manual_seed(cfg.seed), skip=done)
    held_batches = (minibatches(len(heldout), cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 1), skip=done)
                    if heldout is not None else None)
    seconds_before, clock = result.seconds, time.perf_counter()

    def state_now(step: int) -> dict:
        result.seconds = seconds_before + time.perf_counter() - clock
        return capture_training_state(step, result, optim)

    bar = tqdm(range(done + 1, cfg.total_steps + 1), initial=done, total=cfg.total_steps, disable=not progress,
               desc="SVI", dynamic_ncols=True)
    in_step = False
    try:
        with _DeferredInterrupt() as interrupt:
            for step in bar:
                in_step = True
                idx = next(batches).to(data.x.device)
                batch: tuple[torch.Tensor, ...] = (data.x[idx], data.y[idx])
                if held_batches is not None:
                    idx = next(held_batches).to(heldout.x.device)
                    batch += (heldout.x[idx], heldout.y[idx])
                if cfg.sequential:  # steps 1..N: eta and the evidence guide; N+1..2N: the predicting guide
                    objective.predicting = step > cfg.num_steps
                with eta_held(model, guide, evidence_guide) if step <= cfg.eta_burnin else contextlib.nullcontext():
                    loss = _svi_step(svi, optim, batch, len(data), step, saver.last_path)
                eta = _record(result, model, guide, step, loss, cfg)
                done, in_step = step, False
                if eta is not None:
                    bar.set_postfix(elbo=f"{-loss:.3f}", eta_rot=f"{eta['rotate']:.2f}")
                    if on_record is not None:
                        on_record(result.eta_history[-1])
                if callback is not None:
                    callback(step, loss)
                if saver.due(step):
                    saver.save(step, state_now(step))
                if interrupt.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if checkpoints is not None and not in_step and done > 0 and saver.last_step != done:
            saver.save(done, state_now(done))  # the state after `done` steps is complete: keep it
        saved = checkpoints is not None and saver.last_step == done
        raise TrainingInterrupted(done, cfg.total_steps, saver.last_path, saved) from None
    finally:
        bar.close()
    result.seconds = seconds_before + time.perf_counter() - clock
    return result
