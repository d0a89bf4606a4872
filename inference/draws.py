"""Draws from a fitted guide and the model's likelihood under each (torch and Pyro only; ArviZ lives in
:mod:`inference.diagnostics`).

:func:`draw_posterior` takes M independent draws of every latent site from the guide through
``pyro.infer.Predictive`` (split into the sites it has a distribution over and the ones it point-estimates);
:func:`draw_logits` and :func:`predictive_outputs` run the network under each draw (all draws in one batched
pass when they share the first layer), giving the per-draw log-likelihood of held-out examples and the
per-draw predictions; :func:`draw_with_log_q` and :func:`log_prior` give what the guide's PSIS k-hat needs.

Shapes: ``x (N, C, H, W)``, site draws ``(M, *event)``, outputs ``(M, N, ...)``.
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
        ``(M,)``: log q(theta_m) over the random sites (when drawn by :func:`draw_with_log_q`).
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


def site_kinds(model: InvariantNet, guide: Callable) -> dict[str, str]:
    """``"point"`` or ``"random"`` for each latent site of ``model`` but eps.

    A site is a point estimate when two guide traces give it the same value (``AutoDelta``); reading
    the distribution type is not enough, since autoguides emit every site as a ``Delta`` of their
    auxiliary draws.
    """
    x = torch.zeros(1, *model.config.image_shape, device=model.prior_loc.device, dtype=model.prior_loc.dtype)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        first, second = (poutine.trace(guide).get_trace(x, None, 1) for _ in range(2))
    kinds = {}
    for name in model.latent_sites():
        if name not in first.nodes:
            raise ValueError(f"the guide has no site {name!r}")
        same = torch.equal(first.nodes[name]["value"], second.nodes[name]["value"])
        kinds[name] = "point" if same else "random"
    return kinds


def _blank(model: InvariantNet) -> torch.Tensor:
    return torch.zeros(1, *model.config.image_shape, device=model.prior_loc.device, dtype=model.prior_loc.dtype)


@torch.no_grad()
def draw_posterior(
    model: InvariantNet, guide: Callable, num_draws: int, num_transforms: int | None = None
) -> GuideDraws:
    """M draws of every latent site and of eps from the guide, with ``pyro.infer.Predictive``.

    Parameters
    ----------
    model, guide : the fitted model and guide.
    num_draws : int
        M.
    num_transforms : int, optional
        S of each draw's eps (default: the model's).

    Returns
    -------
    GuideDraws
        Point-estimated sites once, the others ``(M, *event)``, eps ``(M, S, K)``.
    """
    S = model.config.num_transforms if num_transforms is None else int(num_transforms)
    kinds = site_kinds(model, guide)
    random = [n for n, k in kinds.items() if k == "random"]
    predictive = Predictive(model, guide=guide, num_samples=int(num_draws), return_sites=[*random, "eps"])
    samples = predictive(_blank(model), None, S)
    trace = poutine.trace(guide).get_trace(_blank(model), None, 1)
    point = {n: trace.nodes[n]["value"].detach() for n, k in kinds.items() if k == "point"}
    M = int(num_draws)
    shapes = {name: tuple(site["fn"].event_shape) for name, site in model.latent_sites().items()}
    shapes["eps"] = (S, NUM_GENERATORS)  # Predictive pads a slot for the data plate: (M, 1, *event)
    return GuideDraws({n: samples[n].detach().reshape(M, *shapes[n]) for n in random}, point,
                      samples["eps"].detach().reshape(M, *shapes["eps"]))


@torch.no_grad()
def draw_with_log_q(
    model: InvariantNet, guide: Callable, num_draws: int, num_transforms: int | None = None,
    shared_eps: bool = False,
) -> GuideDraws:
    """M guide draws with log q(theta_m) over the random sites (point estimates contribute log 1 = 0).

    eps is excluded from log q: q(eps) = p(eps) cancels in log p - log q. With ``shared_eps`` one eps
    ``(1, S, K)`` drawn from the prior serves every draw.
    """
    S = model.config.num_transforms if num_transforms is None else int(num_transforms)
    kinds = site_kinds(model, guide)
    random: dict[str, list[torch.Tensor]] = {n: [] for n, k in kinds.items() if k == "random"}
    eps, log_q, point = [], [], {}
    for _ in range(int(num_draws)):
        trace = poutine.trace(guide).get_trace(_blank(model), None, S)
        trace.compute_log_prob(site_filter=lambda name, site: name != "eps")
        log_q.append(sum((site["log_prob_sum"] for name, site in trace.nodes.items()
                          if site["type"] == "sample" and name != "eps"), torch.tensor(0.0)))
        for name in random:
            random[name].append(trace.nodes[name]["value"])
        eps.append(trace.nodes["eps"]["value"])
        point = {n: trace.nodes[n]["value"] for n, k in kinds.items() if k == "point"}
    eps_t = model.eps_prior(S).sample().unsqueeze(0) if shared_eps else torch.stack(eps)
    return GuideDraws({n: torch.stack(v) for n, v in random.items()}, point, eps_t, torch.stack(log_q).reshape(-1))


# --------------------------------------------------------------------------- likelihood per draw
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
    """Whether every draw has the same first layer, eta and eps (then the features are computed once)."""
    W1, b1 = _first_layer(model, draws)
    eta = _eta(model, draws)
    return W1.shape[0] == 1 and b1.shape[0] == 1 and draws.eps.shape[0] == 1 and (eta.dim() == 1 or eta.shape[0] == 1)


@torch.no_grad()
def draw_logits(model: InvariantNet, draws: GuideDraws, x: torch.Tensor) -> Iterable[tuple[slice, torch.Tensor]]:
    """The network's transformed outputs f_s(x; theta_m) for every draw, in blocks of draws.

    Uses :meth:`InvariantNet.transformed_logits`, the model's own forward pass. When the first layer,
    eta and eps are the same in every draw (a point-estimated W1 and shared eps), the features are
    computed once and only the output layer varies.

    Yields
    ------
    (slice, torch.Tensor)
        Draw indices and their outputs ``(m, S', B, outputs)``.
    """
    W1, b1 = _first_layer(model, draws)
    W2, b2 = draws.leading("W2"), draws.leading("b2")
    eta, M = _eta(model, draws), draws.num_draws
    if _shares_features(model, draws):
        # The model's forward pass with an identity output layer returns the hidden features h_s(x), once.
        D = model.config.hidden
        eye = torch.eye(D, dtype=x.dtype, device=x.device)[None]
        zero = torch.zeros(1, D, dtype=x.dtype, device=x.device)
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
    model: InvariantNet, draws: GuideDraws, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw log-likelihood of each example, and per-draw class log-probabilities.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)``.
    y : torch.Tensor
        Labels ``(N,)`` (categorical) or targets ``(N, outputs)`` (Gaussian likelihood).

    Returns
    -------
    log_lik : torch.Tensor
        ``(M, N)``: log p(y_n | x_n, theta_m, eps_m), the model's S-averaged likelihood.
    log_probs : torch.Tensor
        ``(M, N, classes)`` normalised class log-probabilities (categorical), or the predictive means
        ``(M, N, outputs)`` (Gaussian likelihood).
    """
    M, N = draws.num_draws, x.shape[0]
    log_lik = torch.empty(M, N, dtype=x.dtype)
    out = torch.empty(M, N, model.config.num_classes, dtype=x.dtype)
    for start in range(0, N, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        cols = slice(start, start + xb.shape[0])
        for rows, logits in draw_logits(model, draws, xb):
            lp, obs_dist = model.likelihood.combine(logits)  # (m, B, outputs), batch (m, B)
            log_lik[rows, cols] = obs_dist.log_prob(yb).cpu()
            out[rows, cols] = lp.cpu()
    return log_lik, out



@torch.no_grad()
def log_prior(model: InvariantNet, draws: GuideDraws) -> torch.Tensor:
    """log p(theta_m) over the latent sites but eps, ``(M,)``, with the model's masks (a hybrid guide's W1
    prior is masked out)."""
    out = []
    for m in range(draws.num_draws):
        values = draws.draw(m)
        values["eps"] = model.eps_prior(1).sample()  # S = 1: the prior needs no transformations
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(_blank(model), None, 1)
        trace.compute_log_prob(site_filter=lambda name, site: name not in ("eps", "obs"))
        out.append(sum((site["log_prob_sum"] for name, site in trace.nodes.items()
                        if site["type"] == "sample" and name not in ("eps", "obs")), torch.tensor(0.0)))
    return torch.stack(out).reshape(-1)
