"""Stochastic variational inference: maximise the ELBO over q(theta) and eta (empirical Bayes).

The objective (Eq. 8 of van der Ouderaa & van der Wilk, 2022) is the multi-sample Jensen bound

    L(q, eta) = sum_n E_q(theta) E_eps log (1/S) sum_s p(y_n | f_s(x_n)) - KL(q(theta) || p(theta)),

estimated on minibatches with ``Trace_ELBO(num_particles=K)``; eta is a ``pyro.param`` learned
by the same optimiser with its own learning rate. Adam with cosine annealing to 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from tqdm.auto import tqdm

from inference.data import Split
from models.network import InvariantNet
from models.transforms import GENERATOR_NAMES


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: REFERENCE.md, except the shorter run and eta's own rate)."""

    num_steps: int = 2000
    batch_size: int = 128  # B
    lr: float = 1e-3  # Adam, every variational parameter
    eta_lr: float = 2e-2  # Adam on log(eta) (eta is positive): a relative step of ~2% per step
    betas: tuple[float, float] = (0.9, 0.999)
    num_particles: int = 1  # K weight samples per step
    vectorize_particles: bool = True
    cosine: bool = True  # cosine annealing of every learning rate to 0 over num_steps
    log_every: int = 10  # record eta and the loss every this many steps
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size", "num_particles", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "eta_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class FitResult:
    """What :func:`fit` returns: the loss per step and eta's trajectory."""

    losses: list[float] = field(default_factory=list)  # -ELBO / N per step (minibatch estimate)
    eta_history: list[dict[str, float]] = field(default_factory=list)  # {"step": t, name: eta}
    seconds: float = 0.0


def make_optimizer(cfg: TrainConfig) -> pyro.optim.PyroOptim:
    """Adam with per-parameter learning rates (``eta_lr`` for ``eta``), optionally cosine-annealed."""

    def optim_args(param_name: str) -> dict:
        return {"lr": cfg.eta_lr if param_name == "eta" else cfg.lr, "betas": cfg.betas}

    if not cfg.cosine:
        return pyro.optim.Adam(optim_args)
    return pyro.optim.CosineAnnealingLR({"optimizer": torch.optim.Adam, "optim_args": optim_args, "T_max": cfg.num_steps})


def make_elbo(cfg: TrainConfig) -> Trace_ELBO:
    """``Trace_ELBO`` with K particles; one plate (``data``) in the model."""
    return Trace_ELBO(num_particles=cfg.num_particles, vectorize_particles=cfg.vectorize_particles, max_plate_nesting=1)


def eta_dict(model: InvariantNet) -> dict[str, float]:
    """Current effective eta per generator (0 for inactive generators)."""
    return dict(zip(GENERATOR_NAMES, model.eta_effective.detach().cpu().tolist()))


def minibatches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of shuffled index batches (a new permutation every epoch, last batch dropped)."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def fit(
    model: InvariantNet,
    guide: Callable,
    data: Split,
    cfg: TrainConfig,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit ``guide`` and ``eta`` to ``data`` with SVI.

    Parameters
    ----------
    model : InvariantNet
        The model; its ``num_data`` should equal ``len(data)`` so the ELBO has the right scale.
    guide : callable
        From :func:`guides.make_guide`.
    data : Split
        Training images ``(N, C, H, W)`` and labels ``(N,)`` on the model's device.
    cfg : TrainConfig
        Optimisation settings.
    callback : callable, optional
        Called as ``callback(step, loss)`` after every step.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    FitResult
    """
    if model.num_data != len(data):
        raise ValueError(f"model.num_data = {model.num_data} but the training set has {len(data)} examples")
    optim = make_optimizer(cfg)
    svi = SVI(model, guide, optim, loss=make_elbo(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = minibatches(len(data), cfg.batch_size, gen)
    result = FitResult()
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.num_steps + 1), disable=not progress, desc="SVI", dynamic_ncols=True)
    for step in bar:
        idx = next(batches).to(data.x.device)
        loss = svi.step(data.x[idx], data.y[idx]) / len(data)
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite loss {loss} at step {step}; lower --lr or --eta-lr")
        if isinstance(optim, pyro.optim.PyroLRScheduler):
            optim.step()
        result.losses.append(loss)
        if step % cfg.log_every == 0 or step == 1 or step == cfg.num_steps:
            eta = eta_dict(model)
            result.eta_history.append({"step": step, **eta})
            bar.set_postfix(elbo=f"{-loss:.3f}", eta_rot=f"{eta['rotate']:.2f}")
        if callback is not None:
            callback(step, loss)
    result.seconds = time.perf_counter() - start
    return result
