"""Stochastic variational inference: maximise the ELBO over q(theta) and eta (empirical Bayes).

The objective (Eq. 8 of van der Ouderaa & van der Wilk, 2022) is the multi-sample Jensen bound

    L(q, eta) = sum_n E_q(theta) E_eps log (1/S) sum_s p(y_n | f_s(x_n)) - KL(q(theta) || p(theta)),

estimated on minibatches with ``Trace_ELBO(num_particles=K)``; eta is a parameter of the model, learned with
the guide's parameters by :class:`inference.optim.ParamAdam` (Adam per parameter, eta with its own learning
rate, cosine annealing to 0). What eta maximises is :mod:`inference.eta_objectives`'s choice.

Every ``log_every`` steps :func:`fit` records eta and the ELBO's two terms, expected log-likelihood and KL per
example (:mod:`inference.elbo_terms`: one more draw on that step's minibatch, with random numbers of its own, so
recording leaves the training's random stream, and so its result, unchanged).

Reliability (:mod:`inference.state`, :mod:`inference.stopping`): :func:`fit` can save checkpoints and resume
from one, ending exactly where an uninterrupted run with the same seed ends; a NaN/inf loss or parameter stops it
with a :class:`~inference.stopping.NonFiniteError` naming the step and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from guides.factory import eta_guide_of
from guides.meanfield import EVIDENCE_GUIDE_NAME
from inference.checkpoint import Checkpoint
from inference.cpu import tune_for_training
from inference.data import Split, check_seed, validate_split
from inference.elbo_terms import logged_terms
from inference.eta_objectives import (
    EtaObjective,
    EvidenceEtaLoss,
    EvidenceSchedule,
    HeldOutEtaLoss,
    SequentialEvidenceLoss,
    eta_dict,
    eta_held,
    reported_guide,
)
from inference.optim import ParamAdam, svi_step
from inference.state import Checkpointer, CheckpointPolicy, capture_training_state, restore_training_state
from inference.stopping import DeferredInterrupt, NonFiniteError, nonfinite_params, nonfinite_problem
from models.config import check_positive_float, check_positive_int
from models.network import InvariantNet
from models.priors import EtaPrior

if TYPE_CHECKING:
    from inference.distributed import GradientSync


@dataclass
class FitResult:
    """What :func:`fit` returns: the loss per step, eta's trajectory and the ELBO's terms at the logged steps."""

    losses: list[float] = field(default_factory=list)  # -ELBO / N per step (minibatch estimate)
    eta_history: list[dict[str, float]] = field(default_factory=list)  # {"step": t, name: eta}
    seconds: float = 0.0
    # {"step": t, "elbo", "expected_loglik", "kl"} per example, one extra draw on step t's minibatch
    elbo_history: list[dict[str, float]] = field(default_factory=list)


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


def make_optimizer(cfg: TrainConfig) -> ParamAdam:
    """Adam with per-parameter learning rates, optionally cosine-annealed (:class:`inference.optim.ParamAdam`).

    ``eta_lr`` for ``eta``, ``evidence_lr`` for the ``evidence`` objective's mean-field guide (its
    parameters are named ``EvidenceGuide.*``), ``lr`` for everything else.
    """

    def lr_of(name: str) -> float:
        if name == "eta" or name.endswith(".eta"):  # the param, or q(eta) under full Bayes
            return cfg.eta_lr
        if name.startswith(EVIDENCE_GUIDE_NAME + ".") and cfg.evidence_lr is not None:
            return cfg.evidence_lr
        return cfg.lr

    return ParamAdam(lr_of, cfg.betas, cfg.num_steps if cfg.cosine else None)


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


def _train_step(objective: Callable, model: InvariantNet, guide: Callable, optim: ParamAdam,
                batch: tuple[torch.Tensor, ...], scale: int, step: int, last_checkpoint: Path | None) -> float:
    """:func:`svi_step` and one scheduler step; a NaN/inf loss or parameter becomes a :class:`NonFiniteError`."""
    try:
        loss = svi_step(objective, model, guide, optim, *batch) / scale
    except ValueError as err:  # distribution validation rejects NaN/inf before any loss exists
        problem = nonfinite_problem(err, optim)
        if problem is None:
            raise
        raise NonFiniteError(problem, step, last_checkpoint) from err
    if not math.isfinite(loss):
        raise NonFiniteError(f"non-finite loss {loss}", step, last_checkpoint)
    optim.schedule_step()
    return loss


def _record(result: FitResult, objective: Callable, model: InvariantNet, guide: Callable, optim: ParamAdam, step: int,
            loss: float, batch: tuple[torch.Tensor, ...], cfg: TrainConfig) -> tuple[dict, dict] | None:
    """Append the step's loss; at a logged step also eta and the ELBO's terms (one more draw of the guide whose ELBO
    the loss is, on the step's minibatch, after the update, with random numbers of its own), and return them. A step
    whose update overflows the model is left unlogged: the next step reports it, after this one's checkpoint."""
    result.losses.append(loss)
    if step % cfg.log_every == 0 or step == 1 or step == cfg.total_steps:
        eta = {"step": step, **eta_dict(model, guide)}
        reported, context = reported_guide(objective, model, guide)
        try:
            with context:
                terms = {"step": step, **logged_terms(model, reported, batch[0], batch[1], model.num_data)}
        except ValueError as err:  # distribution validation rejects NaN/inf
            if nonfinite_problem(err, optim) is None:
                raise
            return None
        result.eta_history.append(eta)
        result.elbo_history.append(terms)
        return eta, terms
    return None


def _steps(objective: Callable, model: InvariantNet, guide: Callable, evidence_guide: Callable | None,
           optim: ParamAdam, data: Split, heldout: Split | None, cfg: TrainConfig, done: int,
           saver: Checkpointer, sync: GradientSync | None) -> Iterator[tuple[int, float, tuple[torch.Tensor, ...]]]:
    """Take the steps ``done + 1, ..., cfg.total_steps``, yielding ``(step, loss, batch)`` after each."""
    batches = minibatches(len(data), cfg.batch_size, torch.Generator().manual_seed(cfg.seed), skip=done)
    held = (minibatches(len(heldout), cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 1), skip=done)
            if heldout is not None else None)
    if sync is not None:  # data-parallel: this rank's shard of every global batch
        batches, held = sync.shard(batches), sync.shard(held)
    for step in range(done + 1, cfg.total_steps + 1):
        if sync is not None:  # data-parallel: this rank's noise for this step
            sync.begin_step(step)
        idx = next(batches).to(data.x.device)
        batch: tuple[torch.Tensor, ...] = (data.x[idx], data.y[idx])
        if held is not None:
            idx = next(held).to(heldout.x.device)
            batch += (heldout.x[idx], heldout.y[idx])
        if cfg.sequential:  # steps 1..N: eta and the evidence guide; N+1..2N: the predicting guide
            objective.predicting = step > cfg.num_steps
        with eta_held(model, guide, evidence_guide) if step <= cfg.eta_burnin else contextlib.nullcontext():
            loss = _train_step(objective, model, guide, optim, batch, len(data), step, saver.last_path)
        yield step, loss, batch


def _setup(model: InvariantNet, guide: Callable, data: Split, cfg: TrainConfig, checkpoints: CheckpointPolicy | None,
           start: Checkpoint | None, heldout: Split | None, evidence_guide: Callable | None, sync: GradientSync | None,
           ) -> tuple[Mapping, Callable, ParamAdam, list[Callable], FitResult, int]:
    """Check :func:`fit`'s inputs; its run's config, loss, optimiser, guides and history, and the steps done."""
    if model.num_data != len(data):
        raise ValueError(f"model.num_data = {model.num_data} but the training set has {len(data)} examples")
    validate_split(data, model.config.image_shape, model.config.num_classes, "training")
    if data.x.device.type == "cpu":
        tune_for_training()  # process-wide (inference.cpu): the same step time from Python and the CLI
    # what a checkpoint says about its run: the caller's config, else what fit knows
    config = getattr(checkpoints, "config", None) or {"model": model.config, "train": cfg, "num_data": len(data)}
    objective = eta_loss(model, cfg, heldout, evidence_guide, guide)
    optim = make_optimizer(cfg)
    if sync is not None:  # data-parallel: Adam on gradients averaged over the ranks
        optim = sync.optimizer(optim)
    guides = [guide] if evidence_guide is None else [guide, evidence_guide]
    result, done = FitResult(), 0
    if start is not None:
        # on the sequential schedule the predicting guide first runs at step N + 1: a phase-1 checkpoint has none
        # of its parameters, and they are created then, from the same random stream as in an unbroken run
        phase1 = cfg.sequential and start.step <= cfg.num_steps
        done = restore_training_state(start, config, model, guides, optim, result,
                                      [evidence_guide] if phase1 else guides,
                                      checkpoints.data_sha256 if checkpoints is not None else None)
    return config, objective, optim, guides, result, done


def fit(model: InvariantNet, guide: Callable, data: Split, cfg: TrainConfig,
        callback: Callable[[int, float], None] | None = None, on_record: Callable[[dict, dict], None] | None = None,
        progress: bool = True, *, on_start: Callable[[FitResult], None] | None = None,
        checkpoints: CheckpointPolicy | None = None, start: Checkpoint | None = None, heldout: Split | None = None,
        evidence_guide: Callable | None = None, sync: GradientSync | None = None) -> FitResult:
    """Fit ``guide`` and ``eta`` to ``data`` with SVI, optionally checkpointed and resumed.

    Parameters
    ----------
    model, guide : InvariantNet, callable
        The model (``num_data`` must equal ``len(data)``) and its guide (:func:`guides.make_guide`).
    data, heldout : Split
        Training images ``(N, C, H, W)`` and labels ``(N,)`` on the model's device; under the ``heldout``
        objective its fitting part A, and ``heldout`` part B (:func:`inference.eta_objectives.split_holdout`).
    cfg : TrainConfig
        Optimisation settings.
    callback, on_record, on_start : callable, optional
        ``callback(step, loss)`` after every step; ``on_record(eta_row, elbo_row)`` with the rows ``{"step": t,
        <generator>: eta}`` and ``{"step": t, "elbo", "expected_loglik", "kl"}`` at every logged step;
        ``on_start(result)`` with the history so far once ``start`` is loaded, before the first step.
    progress : bool
        Show a tqdm progress bar.
    checkpoints, start : CheckpointPolicy, Checkpoint, optional
        Where and when to save checkpoints; the checkpoint to continue from (build ``model`` and ``guide`` and
        seed as for a fresh run: the result then equals that of the uninterrupted run).
    evidence_guide : callable, optional
        The ``evidence`` objective's mean-field guide over every weight (:func:`guides.make_evidence_guide`);
        eta follows its ELBO, ``guide`` is fitted with eta held fixed.
    sync : GradientSync, optional
        This process's rank in data-parallel training (:mod:`inference.distributed`): minibatch shards, per-rank
        noise, gradients averaged over the ranks. Only rank 0 should pass ``checkpoints`` and ``progress``.

    Returns
    -------
    FitResult
        Losses, eta history and the ELBO's terms of the whole run, the steps before ``start`` included.

    Raises
    ------
    NonFiniteError
        A NaN/inf loss or parameter; names the step and the last good checkpoint.
    TrainingInterrupted
        Ctrl-C or a stop signal: the current step is finished and, with ``checkpoints``, saved first.
    IncompatibleCheckpointError
        ``start`` comes from another configuration.
    """
    config, objective, optim, guides, result, done = _setup(model, guide, data, cfg, checkpoints, start, heldout,
                                                            evidence_guide, sync)
    if on_start is not None:
        on_start(result)
    if sync is not None:  # data-parallel: every rank continues from rank 0's step, parameters and optimiser
        done = sync.start(model, guides, optim, done)
    seconds_before, clock = result.seconds, time.perf_counter()

    def capture(step: int) -> tuple[dict, list[str]]:
        result.seconds = seconds_before + time.perf_counter() - clock
        return capture_training_state(step, result, optim, model, guides), nonfinite_params(optim)

    saver = Checkpointer(checkpoints, config, cfg.total_steps, start, capture)
    steps = _steps(objective, model, guide, evidence_guide, optim, data, heldout, cfg, done, saver, sync)
    bar = tqdm(steps, initial=done, total=cfg.total_steps, disable=not progress, desc="SVI", dynamic_ncols=True)
    in_step = True  # an interrupt now falls inside a step, whose state is incomplete
    stop = None  # the stop signal acted on after this step
    try:
        with bar, DeferredInterrupt() as interrupt:
            for step, loss, batch in bar:
                if sync is not None:  # data-parallel: the global batch's loss; every rank stops after the same step
                    loss, agreed = sync.after_step(loss, interrupt.requested)
                rows = _record(result, objective, model, guide, optim, step, loss, batch, cfg)
                done, in_step = step, False
                if rows is not None:
                    bar.set_postfix(elbo=f"{-loss:.3f}", eta_rot=f"{rows[0]['rotate']:.2f}")
                    if on_record is not None:
                        on_record(*rows)
                if callback is not None:
                    callback(step, loss)
                if saver.due(step):
                    saver.save(step)
                stop = agreed if sync is not None else interrupt.requested  # a signal during this step's work too
                if stop is not None:
                    raise KeyboardInterrupt
                in_step = True
    except KeyboardInterrupt:
        raise saver.interrupted(done, in_step, stop if stop is not None else interrupt.requested) from None
    result.seconds = seconds_before + time.perf_counter() - clock
    return result
