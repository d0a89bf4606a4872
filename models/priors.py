"""Weight priors p(theta) and the optional prior over eta (full Bayes), as small factories.

Every factory returns a distribution whose event shape is the weight site's shape, so a prior is a
one-word change (``ModelConfig(prior="laplace")``) and guides need no change.

=================  ======================================================================
``normal``         iid N(0, alpha^2) (the paper, alpha = 1)
``fan-in``         iid N(0, alpha^2 / fan_in): the prior variance of He/LeCun initialisation
``laplace``        iid Laplace(0, alpha / sqrt 2): heavier tails, the same variance as ``normal``
``hierarchical``   per-layer scale tau_l ~ HalfCauchy(alpha), weights iid N(0, tau_l^2)
=================  ======================================================================
"""

from __future__ import annotations

import math
from enum import StrEnum

import pyro.distributions as dist
import torch


class PriorKind(StrEnum):
    """Families of weight priors."""

    NORMAL = "normal"
    FAN_IN = "fan-in"
    LAPLACE = "laplace"
    HIERARCHICAL = "hierarchical"


class EtaPrior(StrEnum):
    """How eta is treated: a point estimate (empirical Bayes) or a random variable (full Bayes)."""

    NONE = "none"  # eta is a pyro.param, learned by maximising the ELBO (the paper)
    UNIFORM = "uniform"  # eta_k ~ U(0, eta_max) a priori; q(eta) is learned by the guide


ETA_MAX = math.pi
"""Upper end of the uniform eta prior: a full turn for rotations (pi), 42 px for translations."""


def layer_of(site: str) -> str:
    """``"W1" -> "1"``: the layer a weight site belongs to (its hierarchical scale is ``tau_1``)."""
    return site[-1]


def weight_prior(
    kind: PriorKind, shape: tuple[int, ...], fan_in: int, loc: torch.Tensor, alpha: torch.Tensor,
    tau: torch.Tensor | None = None,
) -> dist.Distribution:
    """p(theta_site) with event shape ``shape``.

    Parameters
    ----------
    kind : PriorKind
        The family.
    shape : tuple of int
        Event shape of the site, e.g. ``(D, C*H*W)``.
    fan_in : int
        Inputs per unit of the layer (``C*H*W`` for layer 1, D for layer 2).
    loc, alpha : torch.Tensor
        Scalar buffers (zero and the prior scale) on the model's device.
    tau : torch.Tensor, optional
        The sampled layer scale, for ``hierarchical`` only; shape ``(*lead,)``.
    """
    if kind is PriorKind.NORMAL:
        base: dist.Distribution = dist.Normal(loc, alpha)
    elif kind is PriorKind.FAN_IN:
        base = dist.Normal(loc, alpha / math.sqrt(fan_in))
    elif kind is PriorKind.LAPLACE:
        base = dist.Laplace(loc, alpha / math.sqrt(2.0))
    else:
        if tau is None:
            raise ValueError("the hierarchical prior needs the sampled layer scale tau")
        scale = tau.reshape(tau.shape + (1,) * len(shape))  # broadcast over the event dims
        return dist.Normal(loc, scale).expand(tau.shape + shape).to_event(len(shape))
    return base.expand(shape).to_event(len(shape))


def tau_prior(alpha: torch.Tensor) -> dist.Distribution:
    """p(tau_l) = HalfCauchy(alpha), the hierarchical prior's layer scale."""
    return dist.HalfCauchy(alpha)


def eta_prior(num_generators: int, like: torch.Tensor) -> dist.Distribution:
    """p(eta) = U(0, ETA_MAX)^K, event shape ``(K,)``, on the device and dtype of ``like``."""
    high = torch.full((num_generators,), ETA_MAX, device=like.device, dtype=like.dtype)
    return dist.Uniform(torch.zeros_like(high), high).to_event(1)
