"""One factory for variational families: ``make_guide(model, kind=...)``.

Every guide draws the transformation noise from its prior (q(eps) = p(eps)): eps is a nuisance
variable averaged over, not inferred. The choices are a string Enum so that the CLI, the docs and
the code share one list.

===========  =====================================================================================
``normal``   ``AutoNormal``: mean-field Gaussian over every latent site
``meanfield``  the hand-written mean-field Gaussian (the same family as ``normal``)
``hybrid``   W1, b1 point estimates (``AutoDelta``) + mean-field Gaussian over the rest
``paper``    W1, b1 point estimates + a full-covariance Gaussian per class over W2 (the paper's)
``lowrank``  ``AutoLowRankMultivariateNormal`` over every latent site (rank ``rank``)
``map``      ``AutoDelta`` over every latent site, with the priors: maximum a posteriori
``ml``       ``AutoDelta`` with every prior switched off: maximum likelihood, the non-Bayesian baseline
===========  =====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_mean,
    init_to_sample,
    init_to_value,
)

from guides.meanfield import EVIDENCE_GUIDE_NAME, EtaGuide, MeanFieldGuide
from guides.paper import ClasswiseFullCovGuide
from models.config import check_positive_float, check_positive_int
from models.network import InvariantNet
from models.priors import EtaPrior


class GuideKind(StrEnum):
    """Variational families for q(theta) (see the module docstring)."""

    NORMAL = "normal"
    MEANFIELD = "meanfield"
    HYBRID = "hybrid"
    PAPER = "paper"
    LOWRANK = "lowrank"
    MAP = "map"
    ML = "ml"


POINT_FIRST_LAYER = (GuideKind.HYBRID, GuideKind.PAPER)
"""Guides with a point-estimated W1 (a hyperparameter when the first-layer prior is off)."""


class InitLoc(StrEnum):
    """How the means (or point estimates) of the guide start."""

    XAVIER = "xavier"  # Xavier-uniform weights, zero biases (the paper's initialisation)
    MEDIAN = "median"  # the prior median = mean (all zeros for the weight priors)
    SAMPLE = "sample"  # one draw from the prior


class EpsFromPrior:
    """Guide piece that samples ``eps`` from the model's prior, q(eps) = p(eps)."""

    def __init__(self, model: InvariantNet) -> None:
        self.model = model

    def __call__(self, x, y=None, num_transforms: int | None = None):
        S = self.model.config.num_transforms if num_transforms is None else int(num_transforms)
        return {"eps": pyro.sample("eps", self.model.eps_prior(S))}


def _init_loc_fn(model: InvariantNet, init_loc: InitLoc) -> Callable:
    if init_loc is InitLoc.XAVIER:
        fn = init_to_value(values=model.initial_values())
    elif init_loc is InitLoc.MEDIAN:
        fn = init_to_mean
    else:
        fn = init_to_sample

    def contiguous(site: dict):  # a prior's mean is an expanded view; a module-local parameter needs its own memory
        return fn(site).clone()

    return contiguous


def _initial_values(model: InvariantNet, init_loc: InitLoc) -> dict:
    """Constrained initial values of every latent site, for the hand-written guides."""
    values = model.initial_values()
    if init_loc is InitLoc.XAVIER:
        return values
    sites = model.latent_sites()
    return {name: site["fn"].mean if init_loc is InitLoc.MEDIAN else site["fn"].sample()
            for name, site in sites.items()}


def _initial_eta(model: InvariantNet, init_loc: InitLoc):
    """Initial median of a full-Bayes q(eta) as the autoguides' ``init_loc_fn`` would choose it."""
    if init_loc is InitLoc.XAVIER:
        return model.initial_eta()
    prior = model.latent_sites()["eta"]["fn"]
    return prior.mean if init_loc is InitLoc.MEDIAN else prior.sample()


def eta_guide_of(guide: Callable | None) -> EtaGuide | None:
    """The :class:`~guides.meanfield.EtaGuide` piece of ``guide`` (owned or borrowed), None if it has none."""
    if guide is None:
        return None
    if isinstance(guide, EtaGuide):
        return guide
    if isinstance(guide, MeanFieldGuide) and guide.eta_guide is not None:
        return guide.eta_guide
    modules = guide.modules() if isinstance(guide, torch.nn.Module) else ()
    return next((m for m in modules if isinstance(m, EtaGuide)), None)


def _check(model: InvariantNet, kind: GuideKind, init_loc: InitLoc) -> None:
    cfg = model.config
    has_W1_site = "W1" in model.weight_shapes()
    if kind not in (*POINT_FIRST_LAYER, GuideKind.MAP, GuideKind.ML) and has_W1_site and not cfg.first_layer_prior:
        raise ValueError(
            f"the {kind.value!r} guide puts a distribution over W1, which needs its prior: build the model with "
            "first_layer_prior=True (only point estimates of W1 can go without it)"
        )
    if kind not in (GuideKind.MAP, GuideKind.ML) and not cfg.output_layer_prior:
        raise ValueError(f"the {kind.value!r} guide needs the output-layer prior (output_layer_prior=True)")
    if kind is GuideKind.ML and (cfg.first_layer_prior or cfg.output_layer_prior):
        raise ValueError("the 'ml' guide is maximum likelihood: build the model with first_layer_prior=False and "
                         "output_layer_prior=False (use 'map' to keep the priors)")
    if kind in (*POINT_FIRST_LAYER, GuideKind.MAP, GuideKind.ML) and has_W1_site and init_loc is InitLoc.MEDIAN:
        raise ValueError(
            "a point-estimated W1 initialised at the prior median 0 never moves (all ReLU gradients are 0): "
            f"use init_loc 'xavier' or 'sample' with the {kind.value!r} guide"
        )


def make_guide(
    model: InvariantNet,
    kind: GuideKind | str = GuideKind.HYBRID,
    init_scale: float = 0.1,
    init_loc: InitLoc | str = InitLoc.XAVIER,
    rank: int = 10,
) -> Callable:
    """Build a guide for ``model``.

    Parameters
    ----------
    model : InvariantNet
        The Pyro model.
    kind : GuideKind or str
        One of :class:`GuideKind`.
    init_scale : float
        Initial standard deviation of the Gaussian factors (Cholesky diagonal for ``paper``).
    init_loc : InitLoc or str
        Initial means / point estimates: "xavier", "median" or "sample".
    rank : int
        Rank of the ``lowrank`` guide's covariance factor.

    Returns
    -------
    callable
        A guide taking the model's arguments ``(x, y=None, num_transforms=None)``.

    Examples
    --------
    >>> from models import InvariantNet, ModelConfig
    >>> guide = make_guide(InvariantNet(ModelConfig(hidden=8), num_data=10), "normal")
    """
    try:
        kind, init_loc = GuideKind(kind), InitLoc(init_loc)
    except ValueError as err:
        raise ValueError(
            f"{err}; guides: {[k.value for k in GuideKind]}, init locs: {[i.value for i in InitLoc]}"
        ) from None
    check_positive_float("init_scale", init_scale)
    check_positive_int("rank", rank)
    _check(model, kind, init_loc)
    return GUIDES[kind](Recipe(model, kind, init_scale, init_loc, rank))


@dataclass(frozen=True)
class Recipe:
    """What a guide builder gets: the model and the options of :func:`make_guide` (checked)."""

    model: InvariantNet
    kind: GuideKind
    init_scale: float
    init_loc: InitLoc
    rank: int

    def latent(self) -> list[str]:
        return list(self.model.latent_sites())

    def loc_fn(self) -> Callable:
        return _init_loc_fn(self.model, self.init_loc)


def _finish(recipe: Recipe, guide: AutoGuideList) -> AutoGuideList:
    guide.append(EpsFromPrior(recipe.model))  # q(eps) = p(eps) in every family
    return guide


def _meanfield(r: Recipe) -> Callable:
    return MeanFieldGuide(r.model, _initial_values(r.model, r.init_loc), init_scale=r.init_scale)


def _point(r: Recipe) -> Callable:
    """``map`` and ``ml``: a point estimate of every latent site (the model decides which priors count)."""
    loc_fn, latent = r.loc_fn(), r.latent()  # in this order: both draw random numbers
    guide = AutoGuideList(r.model)
    guide.append(AutoDelta(poutine.block(r.model, expose=latent), init_loc_fn=loc_fn))
    return _finish(r, guide)


def _lowrank(r: Recipe) -> Callable:
    loc_fn, latent = r.loc_fn(), r.latent()  # in this order: both draw random numbers
    guide = AutoGuideList(r.model)
    guide.append(AutoLowRankMultivariateNormal(poutine.block(r.model, expose=latent), init_loc_fn=loc_fn,
                                               init_scale=r.init_scale, rank=r.rank))
    return _finish(r, guide)


def _gaussian(r: Recipe) -> Callable:
    """``normal``, ``hybrid``, ``paper``: W1, b1 point-estimated for the last two, the paper's full-covariance
    q(W2) per class for ``paper``, mean-field Gaussians for the rest; a full-Bayes eta gets its own piece."""
    loc_fn, latent = r.loc_fn(), r.latent()  # in this order: both draw random numbers
    guide = AutoGuideList(r.model)
    full_bayes = "eta" in latent
    if full_bayes:
        latent.remove("eta")
    if r.kind in POINT_FIRST_LAYER:
        point = [n for n in latent if n in ("W1", "b1")]
        if point:
            guide.append(AutoDelta(poutine.block(r.model, expose=point), init_loc_fn=loc_fn))
        latent = [n for n in latent if n not in point]
    if r.kind is GuideKind.PAPER:
        guide.append(ClasswiseFullCovGuide(_initial_values(r.model, r.init_loc)["W2"], init_scale=r.init_scale))
        latent.remove("W2")
    guide.append(AutoNormal(poutine.block(r.model, expose=latent), init_loc_fn=loc_fn, init_scale=r.init_scale))
    if full_bayes:
        guide.append(EtaGuide(r.model, _initial_eta(r.model, r.init_loc), init_scale=r.init_scale))
    return _finish(r, guide)


GUIDES: dict[GuideKind, Callable[[Recipe], Callable]] = {
    GuideKind.NORMAL: _gaussian,
    GuideKind.MEANFIELD: _meanfield,
    GuideKind.HYBRID: _gaussian,
    GuideKind.PAPER: _gaussian,
    GuideKind.LOWRANK: _lowrank,
    GuideKind.MAP: _point,
    GuideKind.ML: _point,
}
"""The registry :func:`make_guide` builds from: one builder per family (add a family by adding an entry)."""


def make_evidence_guide(model: InvariantNet, kind: GuideKind | str, init_scale: float = 0.1,
                        predicting_guide: Callable | None = None) -> MeanFieldGuide:
    """The mean-field guide over every weight whose ELBO sets eta under the ``evidence`` objective.

    ``kind`` is the predictive guide's: it must point-estimate W1 (``hybrid`` or ``paper``), since a guide
    with a distribution over W1 needs no second guide for the evidence (use the ``elbo`` objective).
    The model must carry the first layer's prior (``first_layer_prior=True``): the evidence is that of
    the model with priors on every weight. Under full Bayes (``eta_prior="uniform"``) pass the
    predicting guide: the evidence guide borrows its q(eta), so that the q(eta) the evidence learns is
    the one the predicting guide trains and predicts with.
    """
    kind = GuideKind(kind)
    if kind not in POINT_FIRST_LAYER:
        point = [k.value for k in POINT_FIRST_LAYER]
        raise ValueError(f"the evidence objective pairs a point-estimate guide ({point}) with a mean-field guide "
                         f"over every weight; the {kind.value!r} guide already has one objective for both "
                         "(use eta objective 'elbo')")
    if "W1" in model.weight_shapes() and not model.config.first_layer_prior:
        raise ValueError("the evidence objective needs the first layer's prior: build the model with "
                         "first_layer_prior=True")
    check_positive_float("init_scale", init_scale)
    eta_guide = None
    if model.config.eta_prior is not EtaPrior.NONE:
        eta_guide = eta_guide_of(predicting_guide)
        if eta_guide is None:
            raise ValueError("under full Bayes the evidence guide shares q(eta) with the predicting guide: pass "
                             "predicting_guide, built by make_guide with the 'hybrid' or 'paper' family")
    return MeanFieldGuide(model, _initial_values(model, InitLoc.XAVIER), init_scale=init_scale,
                          name=EVIDENCE_GUIDE_NAME, eta_guide=eta_guide)

