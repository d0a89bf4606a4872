"""The one prediction path: M draws from a fitted guide (``pyro.infer.Predictive``) and the network under each.

:func:`draw_posterior` draws every latent site and eps M times from the guide; :func:`predictive_outputs` applies
each draw theta_m to all N examples, batch by batch, through the model's own forward pass (:func:`draw_logits`).
Evaluation (:func:`inference.evaluate.predictive_draws`) and the ArviZ adapter (:mod:`inference.diagnostics`)
both go through it. Torch and Pyro only.

Shapes: ``x (N, C, H, W)``, site draws ``(M, *event)``, eps ``(M, S, K)``, outputs ``(M, N, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer import Predictive

from models.config import FirstLayer
from models.network import InvariantNet
from models.priors import EtaPrior
from models.transforms import NUM_GENERATORS


@dataclass
class GuideDraws:
    """Draws from the guide, split by kind.

    Attributes
    ----------
    random : dict
        Sites the guide has a distribution over: ``name -> (M, *event)``.
    point : dict
        Sites the guide point-estimates (``AutoDelta``): ``name -> event``; the same in every draw.
    eps : torch.Tensor
        Transformation noise ``(M, S, K)``, or ``(1, S, K)`` when shared by all draws.
    log_q : torch.Tensor or None
        ``(M,)``: log q(theta_m) over the random sites, when drawn with it (the guide's k-hat).
    """

    random: dict[str, torch.Tensor]
    point: dict[str, torch.Tensor]
    eps: torch.Tensor
    log_q: torch.Tensor | None = None

    @property
    def num_draws(self) -> int:
        """M."""
        for value in self.random.values():
            return int(value.shape[0])
        return int(self.eps.shape[0])

    def leading(self, name: str) -> torch.Tensor:
        """Site ``name`` with a leading draw dimension (size M, or 1 for a point estimate)."""
        return self.random[name] if name in self.random else self.point[name].unsqueeze(0)

    def draw(self, m: int) -> dict[str, torch.Tensor]:
        """All site values of draw ``m`` (eps included), for ``poutine.condition``."""
        values = {name: v[m] for name, v in self.random.items()}
        values.update(self.point)
        values["eps"] = self.eps[min(m, self.eps.shape[0] - 1)]
        return values


def blank_image(model: InvariantNet) -> torch.Tensor:
    """One zero image ``(1, C, H, W)`` on the model's device: the input of a run that only draws weights."""
    return torch.zeros(1, *model.config.image_shape, device=model.prior_loc.device, dtype=model.prior_loc.dtype)


def site_kinds(model: InvariantNet, guide: Callable) -> dict[str, str]:
    """``"point"`` or ``"random"`` for each latent site of ``model`` but eps.

    A site is a point estimate when two guide traces give it the same value (``AutoDelta``); the
    distribution type does not tell, since autoguides emit every site as a ``Delta`` of their own draws.
    """
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        first, second = (poutine.trace(guide).get_trace(blank_image(model), None, 1) for _ in range(2))
    kinds = {}
    for name in model.latent_sites():
        if name not in first.nodes:
            raise ValueError(f"the guide has no site {name!r}")
        same = torch.equal(first.nodes[name]["value"], second.nodes[name]["value"])
        kinds[name] = "point" if same else "random"
    return kinds


@torch.no_grad()
def draw_posterior(
    model: InvariantNet, guide: Callable, num_draws: int, num_transforms: int | None = None
) -> GuideDraws:
    """M draws theta_m ~ q of every latent site, each with its own eps_m ``(S, K)``, through ``Predictive``.

    The guide is run M times one after another, so draw 0 is the same whatever M is (under the same seed).
    Point-estimated sites are kept once; the random ones are ``(M, *event)``.
    """
    S = model.config.num_transforms if num_transforms is None else int(num_transforms)
    M = int(num_draws)
    kinds = site_kinds(model, guide)
    random = [n for n, k in kinds.items() if k == "random"]
    samples = Predictive(model, guide=guide, num_samples=M, return_sites=[*random, "eps"])(blank_image(model), None, S)
    trace = poutine.trace(guide).get_trace(blank_image(model), None, 1)
    point = {n: trace.nodes[n]["value"].detach() for n, k in kinds.items() if k == "point"}
    shapes = {name: tuple(site["fn"].event_shape) for name, site in model.latent_sites().items()}
    shapes["eps"] = (S, NUM_GENERATORS)  # Predictive pads a slot for the data plate: (M, 1, *event)
    return GuideDraws({n: samples[n].detach().reshape(M, *shapes[n]) for n in random}, point,
                      samples["eps"].detach().reshape(M, *shapes["eps"]))


# --------------------------------------------------------------------------- the network under each draw
def _first_layer(model: InvariantNet, draws: GuideDraws) -> tuple[torch.Tensor, torch.Tensor]:
    if model.config.first_layer is FirstLayer.RFF:
        return model.W1.unsqueeze(0), model.b1.unsqueeze(0)  # fixed buffers
    return draws.leading("W1"), draws.leading("b1")


def _eta(model: InvariantNet, draws: GuideDraws) -> torch.Tensor:
    """(K,) under empirical Bayes, (M, 1, K) under full Bayes."""
    if model.config.eta_prior is EtaPrior.NONE:
        return model.eta_effective.detach()
    return (draws.leading("eta") * model.generator_mask).unsqueeze(1)


def _shares_features(model: InvariantNet, draws: GuideDraws) -> bool:
    """Whether several draws have the same first layer, eta and eps (then the features are computed once)."""
    W1, b1 = _first_layer(model, draws)
    eta = _eta(model, draws)
    same = W1.shape[0] == b1.shape[0] == draws.eps.shape[0] == 1 and (eta.dim() == 1 or eta.shape[0] == 1)
    return same and draws.num_draws > 1


@torch.no_grad()
def draw_logits(model: InvariantNet, draws: GuideDraws, x: torch.Tensor) -> Iterable[tuple[slice, torch.Tensor]]:
    """The network's transformed outputs f_s(x; theta_m) (:meth:`InvariantNet.transformed_logits`), in blocks of draws.

    A draw is computed alone (so its outputs do not depend on M), unless every draw shares the first layer,
    eta and eps: then the features are computed once and only the output layer varies.

    Yields
    ------
    (slice, torch.Tensor)
        Draw indices and their outputs ``(m, S', B, outputs)``.
    """
    W1, b1 = _first_layer(model, draws)
    W2, b2 = draws.leading("W2"), draws.leading("b2")
    eta, M = _eta(model, draws), draws.num_draws
    if _shares_features(model, draws):
        # The model's forward pass with an identity output layer gives the hidden features h_s(x), once.
        D = model.config.hidden
        eye, zero = torch.eye(D, dtype=x.dtype, device=x.device)[None], x.new_zeros(1, D)
        h = model.transformed_logits(x, W1, b1, eye, zero, draws.eps, eta if eta.dim() == 1 else eta[:1])[0]
        for start in range(0, M, 25):  # (m, S', B, outputs) without materialising (M, S', B, D)
            rows = slice(start, min(start + 25, M))
            yield rows, torch.einsum("sbd,mcd->msbc", h, W2[rows]) + b2[rows, None, None, :]
        return

    def pick(t: torch.Tensor, m: int) -> torch.Tensor:
        return t[min(m, t.shape[0] - 1)].unsqueeze(0)

    for m in range(M):
        eta_m = eta if eta.dim() == 1 else pick(eta, m)
        yield slice(m, m + 1), model.transformed_logits(x, pick(W1, m), pick(b1, m), pick(W2, m), pick(b2, m),
                                                        pick(draws.eps, m), eta_m)


@torch.no_grad()
def predictive_outputs(
    model: InvariantNet, draws: GuideDraws, x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 250
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-draw class log-probabilities of every example, and the per-draw log-likelihood of labels ``y``.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)``, taken ``batch_size`` examples at a time.
    y : torch.Tensor, optional
        Labels ``(N,)`` (categorical) or targets ``(N, outputs)`` (Gaussian likelihood).

    Returns
    -------
    log_lik : torch.Tensor or None
        ``(M, N)``: log p(y_n | x_n, theta_m, eps_m), the model's S-averaged likelihood (None without ``y``).
    log_probs : torch.Tensor
        ``(M, N, classes)`` normalised class log-probabilities (categorical), or the predictive means
        ``(M, N, outputs)`` (Gaussian likelihood).
    """
    M, N = draws.num_draws, x.shape[0]
    out = x.new_empty(M, N, model.config.num_classes)
    log_lik = None if y is None else x.new_empty(M, N)
    for start in range(0, N, batch_size):
        cols = slice(start, min(start + batch_size, N))
        for rows, logits in draw_logits(model, draws, x[cols]):
            out[rows, cols], obs_dist = model.likelihood.combine(logits)  # (m, B, outputs), batch (m, B)
            if log_lik is not None:
                log_lik[rows, cols] = obs_dist.log_prob(y[cols])
    return log_lik, out
