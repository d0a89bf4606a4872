"""A hand-written mean-field Gaussian guide, q(theta) = prod_j N(theta_j | mu_j, sigma_j^2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def site_distribution(loc: torch.Tensor, scale: torch.Tensor, support: constraints.Constraint,
                      event_dim: int) -> dist.Distribution:
    """N(loc, scale^2) on the unconstrained space, pushed into ``support``; event dim ``event_dim``."""
    q = dist.Normal(loc, scale)
    if support is not constraints.real and not isinstance(support, constraints.independent):
        q = dist.TransformedDistribution(q, biject_to(support))
    elif isinstance(support, constraints.independent) and support.base_constraint is not constraints.real:
        q = dist.TransformedDistribution(q, biject_to(support.base_constraint))
    return q.to_event(event_dim)


class EtaGuide(PyroModule):
    """q(eta) under full Bayes (``eta_prior="uniform"``): a Gaussian on the logit of eta / eta_max, per generator.

    One piece of a guide, so that it can be held fixed (:meth:`frozen`) and shared: on the ``evidence``
    objective's sequential schedule the evidence guide learns q(eta) with its mean-field q over every
    weight, and the predicting guide then trains and predicts at that q(eta), held fixed (the full-Bayes
    counterpart of freezing the empirical-Bayes eta).

    Parameters
    ----------
    model : InvariantNet
        A full-Bayes model (eta is a sample site).
    init_eta : torch.Tensor
        Initial median of q(eta), ``(K,)``, inside the prior's support.
    init_scale : float
        Initial standard deviation on the unconstrained (logit) scale.
    """

    def __init__(self, model: InvariantNet, init_eta: torch.Tensor, init_scale: float = 0.1,
                 name: str = "EtaGuide") -> None:
        super().__init__(name=name)
        check_positive_float("init_scale", init_scale)
        site = model.latent_sites().get("eta")
        if site is None:
            raise ValueError("q(eta) needs a full-Bayes model: build it with eta_prior='uniform'")
        self._support, self._event_dim = site["support"], site["event_dim"]
        self._frozen = False
        unconstrained = biject_to(self._support).inv(init_eta.detach()).clone()
        self.locs, self.scales = PyroModule(), PyroModule()  # names end in ".eta": the optimiser gives them eta_lr
        self.locs.eta = PyroParam(unconstrained)
        self.scales.eta = PyroParam(torch.full_like(unconstrained, init_scale), constraint=constraints.positive)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Within this block q(eta) is used as it is but passes its parameters no gradient."""
        before, self._frozen = self._frozen, True
        try:
            yield
        finally:
            self._frozen = before

    def quantile(self, q: float) -> torch.Tensor:
        """The ``q``-quantile of q(eta), ``(K,)``: exact, the logit map being monotone."""
        if not 0 < q < 1:
            raise ValueError(f"a quantile level must lie in (0, 1), got {q}")
        z = torch.special.ndtri(torch.tensor(float(q), dtype=self.locs.eta.dtype))
        return biject_to(self._support)(self.locs.eta.detach() + z * self.scales.eta.detach())

    def median(self) -> torch.Tensor:
        """The median of q(eta), ``(K,)``."""
        return self.quantile(0.5)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample ``eta`` from q(eta); returns ``{"eta": value}`` (an autoguide part's convention)."""
        loc, scale = self.locs.eta, self.scales.eta
        if self._frozen:
            loc, scale = loc.detach(), scale.detach()
        return {"eta": pyro.sample("eta", site_distribution(loc, scale, self._support, self._event_dim))}


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
    eta_guide : EtaGuide, optional
        Full Bayes: q(eta) borrowed from another guide (the predicting one), which owns its parameters;
        this guide then has no factor of its own for eta.

    Examples
    --------
    >>> from models import InvariantNet, ModelConfig
    >>> model = InvariantNet(ModelConfig(hidden=8, num_transforms=2), num_data=10)
    >>> guide = MeanFieldGuide(model, model.initial_values(), init_scale=0.01)
    """

    def __init__(self, model: InvariantNet, init_values: dict[str, torch.Tensor], init_scale: float = 0.1,
                 name: str = "MeanFieldGuide", eta_guide: EtaGuide | None = None) -> None:
        super().__init__(name=name)
        check_positive_float("init_scale", init_scale)
        self._eps_prior = model.eps_prior
        self._default_S = model.config.num_transforms
        sites = model.latent_sites()
        self._borrowed = {"eta": eta_guide} if eta_guide is not None else {}  # a dict: not registered as a child
        if eta_guide is not None and "eta" not in sites:
            raise ValueError("a borrowed q(eta) needs a full-Bayes model (eta_prior='uniform')")
        sites = {name: site for name, site in sites.items() if name not in self._borrowed}
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

    @property
    def eta_guide(self) -> EtaGuide | None:
        """The borrowed q(eta), if any."""
        return self._borrowed.get("eta")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_transforms: int | None = None) -> dict:
        """Sample every latent site from q and ``eps`` from its prior; returns the latent samples."""
        samples = {}
        for name, (support, event_dim) in self._sites.items():
            loc, scale = getattr(self.locs, name), getattr(self.scales, name)
            samples[name] = pyro.sample(name, site_distribution(loc, scale, support, event_dim))
        if self.eta_guide is not None:
            samples.update(self.eta_guide())
        S = self._default_S if num_transforms is None else int(num_transforms)
        pyro.sample("eps", self._eps_prior(S))
        return samples
