"""A hand-written mean-field Gaussian guide, q(theta) = prod_j N(theta_j | mu_j, sigma_j^2)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from models.network import InvariantNet


class MeanFieldGuide(PyroModule):
    """Fully factorised Gaussian over every weight site of an :class:`~models.InvariantNet`.

    It is the hand-written twin of ``AutoNormal``: given the same initial locations and scale,
    and the same random stream, both give the same ELBO. The transformation noise ``eps`` is
    drawn from its prior, q(eps) = p(eps), so it contributes log p(eps) - log q(eps) = 0 to the
    ELBO and no variational parameters are learned for it.

    Parameters
    ----------
    model : InvariantNet
        The model whose latent weights are approximated.
    init_values : dict of str to torch.Tensor
        Initial means, one per weight site (e.g. ``model.initial_values()``).
    init_scale : float
        Initial standard deviation of every weight.

    Examples
    --------
    >>> from models import InvariantNet, ModelConfig
    >>> model = InvariantNet(ModelConfig(hidden=8, num_transforms=2), num_data=10)
    >>> guide = MeanFieldGuide(model, model.initial_values(), init_scale=0.01)
    """

    def __init__(self, model: InvariantNet, init_values: dict[str, torch.Tensor], init_scale: float = 0.01) -> None:
        super().__init__(name="MeanFieldGuide")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self._eps_prior = model.eps_prior
        self._default_S = model.config.num_transforms
        self.site_names = tuple(init_values)
        self.locs = PyroModule()
        self.scales = PyroModule()
        for name, value in init_values.items():
            setattr(self.locs, name, PyroParam(value.detach().clone()))
            setattr(self.scales, name, PyroParam(torch.full_like(value, init_scale), constraint=constraints.positive))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_transforms: int | None = None) -> dict:
        """Sample every weight from q and ``eps`` from its prior; returns the weight samples."""
        samples = {}
        for name in self.site_names:
            loc, scale = getattr(self.locs, name), getattr(self.scales, name)
            samples[name] = pyro.sample(name, dist.Normal(loc, scale).to_event(loc.dim()))
        pyro.sample("eps", self._eps_prior(self._default_S if num_transforms is None else int(num_transforms)))
        return samples
