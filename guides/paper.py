"""The paper's variational family for the output layer: one full-covariance Gaussian per class."""

from __future__ import annotations

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
        eye = torch.eye(D, dtype=init_loc.dtype, device=init_loc.device)
        self.scale_tril = PyroParam(init_scale * eye.expand(C, D, D).clone(), constraint=constraints.lower_cholesky)

    def forward(self, *args, **kwargs) -> dict:
        """Sample ``W2`` (event shape ``(classes, D)``)."""
        q = dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril).to_event(1)
        return {"W2": pyro.sample("W2", q)}
