"""The paper's variational family for the output layer: one full-covariance Gaussian per class."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from models.config import check_positive_float


class ClasswiseFullCovGuide(PyroModule):
    """q(W2) = prod_c N(W2[c] | mu_c, L_c L_c^T): full covariance over each class's D weights.

    van der Ouderaa & van der Wilk (2022, Sec. 5 and supplement) use this family for the Bayesian
    output layer, with a Cholesky factor per output class, initialised at the prior. Memory grows
    as ``classes * D^2`` (10.5M numbers for D = 1024).

    The Cholesky factor is ``L_c = diag(sigma_c) + tril(V_c, -1) / sqrt(D)`` with ``sigma_c > 0``.
    The ``1 / sqrt(D)`` keeps Adam's steps, which are about the learning rate for every entry
    whatever its gradient, from growing a row's norm (the predictive std) ``sqrt(D)`` times faster
    through the ``D (D - 1) / 2`` off-diagonal entries than through the diagonal: with the plain
    ``lower_cholesky`` parameterisation the rows grew by ~0.005 * sqrt(D / 2) per step and the
    sampled logits overflowed within ten steps at D = 1024.

    Parameters
    ----------
    init_loc : torch.Tensor
        Initial means, ``(classes, D)``.
    init_scale : float
        Initial Cholesky factors are ``init_scale * I`` (``init_scale = alpha`` starts at the prior
        covariance).

    Examples
    --------
    >>> guide = ClasswiseFullCovGuide(torch.zeros(10, 16), init_scale=1.0)
    """

    def __init__(self, init_loc: torch.Tensor, init_scale: float = 0.1) -> None:
        super().__init__(name="ClasswiseFullCovGuide")
        check_positive_float("init_scale", init_scale)
        C, D = init_loc.shape
        self.loc = PyroParam(init_loc.detach().clone())  # (classes, D)
        self.scale_diag = PyroParam(torch.full_like(init_loc, init_scale), constraint=constraints.positive)
        self.scale_offdiag = PyroParam(torch.zeros(C, D, D, dtype=init_loc.dtype, device=init_loc.device))

    @property
    def scale_tril(self) -> torch.Tensor:
        """The Cholesky factors ``L_c``, ``(classes, D, D)``."""
        D = self.loc.shape[-1]
        return torch.diag_embed(self.scale_diag) + torch.tril(self.scale_offdiag, -1) / math.sqrt(D)

    def forward(self, *args, **kwargs) -> dict:
        """Sample ``W2`` (event shape ``(classes, D)``)."""
        q = dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril).to_event(1)
        return {"W2": pyro.sample("W2", q)}
