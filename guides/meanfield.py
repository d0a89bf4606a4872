"""A hand-written mean-field Gaussian guide, q(theta) = prod_j N(theta_j | mu_j, sigma_j^2)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from models.config import check_positive_float
from models.network import InvariantNet

EVIDENCE_GUIDE_NAME = "EvidenceGuide"
"""Name (parameter prefix) of the ``evidence`` objective's mean-field guide over every weight."""


class MeanFieldGuide(PyroModule):
    """Fully factorised Gaussian over every latent site of an :class:`~models.InvariantNet` but eps.

    It is the hand-written twin of ``AutoNormal``: each site is Gaussian in the unconstrained
    space (weights are unconstrained; a layer scale tau lives on its log, a full-Bayes eta on the
    logit of eta / pi), and given the same initial values, scale and random stream both give the
    same ELBO. The transformation noise ``eps`` is drawn from its prior, q(eps) = p(eps), so it
    contributes log p(eps) - log q(eps) = 0 to the ELBO and no variational parameters are learned
    for it.

    Parameters
    ----------
    model : InvariantNet
        The model whose latent sites are approximated.
    init_values : dict of str to torch.Tensor
        Initial values in the constrained space, one per latent site (``model.initial_values()``).
    init_scale : float
        Initial standard deviation of every unconstrained coordinate.
    name : str
        The module's name, the prefix of its parameters' names (the ``evidence`` objective's second
        guide is named :data:`EVIDENCE_GUIDE_NAME`, which gives it its own learning rate).

    Examples
    --------
    >>> from models import InvariantNet, ModelConfig
    >>> model = InvariantNet(ModelConfig(hidden=8, num_transforms=2), num_data=10)
    >>> guide = MeanFieldGuide(model, model.initial_values(), init_scale=0.01)
    """

    def __init__(self, model: InvariantNet, init_values: dict[str, torch.Tensor], init_scale: float = 0.1,
                 name: str = "MeanFieldGuide") -> None:
        super().__init__(name=name)
        check_positive_float("init_scale", init_scale)
        self._eps_prior = model.eps_prior
        self._default_S = model.config.num_transforms
        sites = model.latent_sites()
        missing = sorted(set(sites) - set(init_values))
        if missing:
            raise ValueError(f"init_values lacks the latent site(s) {missing}")
        self._sites = {name: (site["support"], site["event_dim"]) for name, site in sites.items()}
        self.locs = PyroModule()
        self.scales = PyroModule()
        for name, (support, _) in self._sites.items():
            unconstrained = biject_to(support).inv(init_values[name].detach()).clone()
            setattr(self.locs, name, PyroParam(unconstrained))
            setattr(self.scales, name, PyroParam(torch.full_like(unconstrained, init_scale),
                                                 constraint=constraints.positive))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_transforms: int | None = None) -> dict:
        """Sample every latent site from q and ``eps`` from its prior; returns the latent samples."""
        samples = {}
        for name, (support, event_dim) in self._sites.items():
            loc, scale = getattr(self.locs, name), getattr(self.scales, name)
            q = dist.Normal(loc, scale)
            if support is not constraints.real and not isinstance(support, constraints.independent):
                q = dist.TransformedDistribution(q, biject_to(support))
            elif isinstance(support, constraints.independent) and support.base_constraint is not constraints.real:
                q = dist.TransformedDistribution(q, biject_to(support.base_constraint))
            samples[name] = pyro.sample(name, q.to_event(event_dim))
        S = self._default_S if num_transforms is None else int(num_transforms)
        pyro.sample("eps", self._eps_prior(S))
        return samples
