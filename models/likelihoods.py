"""Observation models p(y | f_1..f_S): they own how the S transformed copies of the network are combined.

The network computes f_s(x) for s = 1..S (``(*lead, S, B, outputs)``); a likelihood turns them into the
distribution of the labels and a prediction (Eq. 7 of the paper and its supplement):

===============  =====================================================  =========================================
``categorical``  ``probs``: p(y | x) = (1/S) sum_s softmax f_s(x)          prediction: normalised class
                 ``logits``: p(y | x) = softmax((1/S) sum_s f_s(x))      log-probabilities ``(*lead, B, classes)``
``gaussian``     ``probs``: (1/S) sum_s N(y; f_s(x), sigma^2 I)            prediction: the mean of the f_s,
                 ``logits``: N(y; (1/S) sum_s f_s(x), sigma^2 I)         ``(*lead, B, outputs)``
===============  =====================================================  =========================================

``probs`` is the paper's (the average of the transformed models' predictive distributions); ``logits``
averages the functions first.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from models.config import Averaging, Likelihood, ModelConfig


class CategoricalLikelihood:
    """Classification: y in {0, ..., classes - 1}."""

    has_classes = True  # predictions are class probabilities (accuracy, reliability, a Categorical to sample)

    def __init__(self, num_classes: int, averaging: Averaging) -> None:
        self.num_classes, self.averaging = num_classes, Averaging(averaging)

    def label_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the labels of ``batch`` examples."""
        return (batch,)

    def blank_labels(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Labels of the right shape and type (class 0), e.g. to run a guide once."""
        return torch.zeros(batch, dtype=torch.long, device=like.device)

    def combine(self, f: torch.Tensor) -> tuple[torch.Tensor, dist.Distribution]:
        """``(*lead, S, B, classes)`` -> log-probabilities ``(*lead, B, classes)`` and p(y | x) (batch ``(*lead, B)``).
        """
        if self.averaging is Averaging.PROBS:
            log_p = torch.logsumexp(torch.log_softmax(f, -1), dim=-3) - math.log(f.shape[-3])
        else:
            log_p = torch.log_softmax(f.mean(-3), -1)
        return log_p, dist.Categorical(logits=log_p)

    def constant_loglik(self, y: torch.Tensor) -> float:
        """Log-likelihood per example of ``y (N,)`` under the best prediction that ignores the images: the labels'
        own frequencies p_k, sum_k p_k log p_k (-log C for C balanced classes: chance)."""
        p = torch.bincount(y.flatten(), minlength=self.num_classes).double() / y.numel()
        p = p[p > 0]
        return float((p * p.log()).sum())


class GaussianLikelihood:
    """Regression with known noise: y in R^outputs, y ~ N(f(x), sigma^2 I) (the conjugate test case)."""

    has_classes = False

    def __init__(self, num_outputs: int, averaging: Averaging, noise_scale: float) -> None:
        self.num_outputs, self.averaging, self.noise_scale = num_outputs, Averaging(averaging), float(noise_scale)

    def label_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.num_outputs)

    def blank_labels(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch, self.num_outputs, device=like.device, dtype=like.dtype)

    def combine(self, f: torch.Tensor) -> tuple[torch.Tensor, dist.Distribution]:
        """``(*lead, S, B, outputs)`` -> the predictive mean ``(*lead, B, outputs)`` and p(y | x)."""
        mean = f.mean(-3)
        if self.averaging is Averaging.LOGITS or f.shape[-3] == 1:
            return mean, dist.Normal(mean, self.noise_scale).to_event(1)
        components = dist.Normal(f.movedim(-3, -2), self.noise_scale).to_event(1)  # batch (*lead, B, S)
        mixing = dist.Categorical(logits=torch.zeros(components.batch_shape, device=f.device, dtype=f.dtype))
        return mean, dist.MixtureSameFamily(mixing, components)

    def constant_loglik(self, y: torch.Tensor) -> float:
        """Log-likelihood per example of ``y (N, outputs)`` under the best prediction that ignores the inputs, their
        mean: -D/2 log(2 pi sigma^2) - sum_d Var(y_d) / (2 sigma^2), Var over the N examples."""
        variance = y.double().var(0, correction=0).sum()
        return float(-0.5 * self.num_outputs * math.log(2 * math.pi * self.noise_scale**2)
                     - variance / (2 * self.noise_scale**2))


def likelihood_of(config: ModelConfig) -> CategoricalLikelihood | GaussianLikelihood:
    """The observation model ``config`` asks for."""
    if config.likelihood is Likelihood.CATEGORICAL:
        return CategoricalLikelihood(config.num_classes, config.averaging)
    return GaussianLikelihood(config.num_classes, config.averaging, config.noise_scale)
