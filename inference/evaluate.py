"""Evaluation: posterior predictive accuracy and NLL, and the ELBO per training example."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inference.data import Split
from inference.draws import draw_posterior, predictive_outputs
from inference.elbo_terms import trace_terms
from inference.svi import TrainConfig, make_elbo
from models.config import check_positive_int
from models.network import InvariantNet

DRAW_CHUNK = 32
"""Guide draws held in memory at once (32 draws of the paper's W1, 1024 x 784, are 100 MB; at CIFAR-10's
1024 x 3072, 400 MB)."""


@torch.no_grad()
def predictive_draws(
    model: InvariantNet, guide: Callable, x: torch.Tensor, num_samples: int = 1, num_transforms: int | None = None,
    batch_size: int = 500,
) -> torch.Tensor:
    """log p(y | x, theta_m) = log (1/S) sum_s softmax f_s(x; theta_m) for M draws theta_m ~ q.

    Each theta_m (with its eps_m) is drawn once from q through ``pyro.infer.Predictive``
    (:func:`inference.draws.draw_posterior`, ``DRAW_CHUNK`` draws at a time) and applied to all N examples;
    draw 0 is exactly what a one-draw evaluation gives under the same seed.

    Parameters
    ----------
    model, guide : the fitted model and guide.
    x : torch.Tensor
        ``(N, C, H, W)``.
    num_samples : int
        M weight samples from the guide.
    num_transforms : int, optional
        S transformation samples per weight sample (default: the model's).
    batch_size : int
        Examples per forward pass (memory grows as ``S * batch_size * hidden``).

    Returns
    -------
    torch.Tensor
        ``(M, N, classes)`` normalised log-probabilities, one slice per draw.
    """
    M = check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    chunks = []
    for start in range(0, M, DRAW_CHUNK):
        draws = draw_posterior(model, guide, min(DRAW_CHUNK, M - start), num_transforms)
        chunks.append(predictive_outputs(model, draws, x, batch_size=batch_size)[1])
    return torch.cat(chunks)


def average_draws(draws: torch.Tensor) -> torch.Tensor:
    """The posterior predictive from ``(M, N, classes)`` per-draw log-probabilities: log (1/M) sum_m p_m."""
    return torch.logsumexp(draws, 0) - math.log(draws.shape[0])


def predictive_log_probs(
    model: InvariantNet, guide: Callable, x: torch.Tensor, num_samples: int = 1, num_transforms: int | None = None,
    batch_size: int = 500,
) -> torch.Tensor:
    """log p(y | x, D) ~= log (1/M) sum_m (1/S) sum_s softmax f_s(x; theta_m), theta_m ~ q.

    Returns ``(N, classes)`` normalised log-probabilities; the arguments are those of :func:`predictive_draws`.
    """
    return average_draws(predictive_draws(model, guide, x, num_samples, num_transforms, batch_size))


def accuracy_and_nll(log_probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean negative log-likelihood of labels ``y`` under ``log_probs (N, classes)``."""
    num_classes = log_probs.shape[-1]
    if log_probs.dim() != 2 or tuple(y.shape) != (log_probs.shape[0],) or y.numel() == 0:
        raise ValueError(f"expected log_probs (N, classes) and labels (N,) with N >= 1, got "
                         f"{tuple(log_probs.shape)} and {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found values from {int(y.min())} to {int(y.max())}")
    acc = (log_probs.argmax(-1) == y).float().mean().item()
    nll = -log_probs.gather(1, y[:, None]).mean().item()
    return acc, nll


@torch.no_grad()
def elbo_per_example(
    model: InvariantNet, guide: Callable, data: Split, cfg: TrainConfig, batch_size: int = 500
) -> float:
    """ELBO / N over the whole training set: sum_b (B_b / N) ELBO_b, each ELBO_b scaled by N / B_b.

    The KL term is counted once and every example's likelihood once: one unbiased pass (Pyro's ``Trace_ELBO``,
    ``cfg.num_particles`` weight samples per minibatch); :func:`elbo_estimate` repeats passes.
    """
    elbo = make_elbo(cfg)
    n = len(data)
    total = 0.0
    for xb, yb in zip(torch.split(data.x, batch_size), torch.split(data.y, batch_size), strict=True):
        total += -elbo.loss(model, guide, xb, yb) * len(yb) / n
    return total / n


@torch.no_grad()
def elbo_terms(
    model: InvariantNet, guide: Callable, data: Split, batch_size: int = 100
) -> tuple[float, float]:
    """The two terms of one ELBO / N pass: ``(expected log-likelihood / N, KL / N)``.

    ELBO = E_q[log p(y | x, theta, eta)] - KL(q(theta) || p(theta)) (the paper's Eq. 6 with the
    multi-sample likelihood), each estimated with one draw of theta and eps per minibatch
    (:func:`inference.elbo_terms.trace_terms`), so that ``loglik - kl`` equals :func:`elbo_per_example`
    under the same random numbers. "KL" is E_q[log q - log p] over every latent site (eps cancels:
    q(eps) = p(eps)); for point estimates it is -log p(theta), and 0 for parameters without a prior
    (maximum likelihood).
    """
    n = len(data)
    loglik, kl = 0.0, 0.0
    for xb, yb in zip(torch.split(data.x, batch_size), torch.split(data.y, batch_size), strict=True):
        batch_loglik, batch_kl = trace_terms(model, guide, xb, yb)
        weight = len(yb) / n  # each minibatch's likelihood is scaled by N / B; its KL counts B / N of once
        loglik += batch_loglik * weight
        kl += batch_kl * weight
    return loglik / n, kl / n


@dataclass(frozen=True)
class ElboEstimate:
    """ELBO / N averaged over passes over the training set (see :func:`elbo_estimate`).

    Attributes
    ----------
    mean : float
        ELBO / example, the mean over passes.
    stderr : float
        Its Monte-Carlo standard error (0.0 for a single pass: unknown, not zero).
    expected_loglik, kl : float
        The two terms per example, averaged over the same passes: ``mean = expected_loglik - kl``.
    """

    mean: float
    stderr: float
    expected_loglik: float
    kl: float


def elbo_estimate(
    model: InvariantNet, guide: Callable, data: Split, num_passes: int = 8, batch_size: int = 100
) -> ElboEstimate:
    """ELBO / N and its terms from ``num_passes`` independent passes of :func:`elbo_terms`.

    Each pass draws fresh weights and eps per minibatch, so the spread of the passes is the Monte-Carlo error.
    Most of a pass's noise is each weight draw's common effect on its batch: smaller batches give a smaller
    error for about the same arithmetic (Table 1 RFF network, 4,000 images: std 0.13 / example with batches
    of 500, 0.05 with 100, 0.035 with 50, at 1 : 1.3 : 2 the time).
    """
    check_positive_int("num_passes", num_passes)
    terms = torch.tensor([elbo_terms(model, guide, data, batch_size) for _ in range(num_passes)],
                         dtype=torch.float64)  # (passes, 2): expected log-likelihood, KL
    values = terms[:, 0] - terms[:, 1]
    stderr = values.std().item() / math.sqrt(num_passes) if num_passes > 1 else 0.0
    loglik, kl = terms.mean(0).tolist()
    return ElboEstimate(values.mean().item(), stderr, loglik, kl)
