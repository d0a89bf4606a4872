"""One factory for variational families: ``make_guide(model, kind=...)``.

Every guide draws the transformation noise from its prior (q(eps) = p(eps)): eps is a
nuisance variable averaged over, not inferred. The choices are a string Enum so that the CLI,
the docs and the code share one list.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import pyro
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal, init_to_mean, init_to_sample, init_to_value

from guides.meanfield import MeanFieldGuide
from models.network import InvariantNet


class GuideKind(str, Enum):
    """Variational families for q(theta)."""

    NORMAL = "normal"  # AutoNormal: mean-field Gaussian over every weight and bias
    MEANFIELD = "meanfield"  # the hand-written mean-field Gaussian (same family as "normal")
    HYBRID = "hybrid"  # W1, b1 point estimates (AutoDelta) + mean-field Gaussian over W2, b2


class InitLoc(str, Enum):
    """How the means (or point estimates) of the guide start."""

    XAVIER = "xavier"  # Xavier-uniform weights, zero biases (the paper's initialisation)
    MEDIAN = "median"  # the prior median = mean (all zeros for the Normal priors)
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
        return init_to_value(values=model.initial_values())
    if init_loc is InitLoc.MEDIAN:
        return init_to_mean
    return init_to_sample


def make_guide(
    model: InvariantNet,
    kind: GuideKind | str = GuideKind.HYBRID,
    init_scale: float = 0.01,
    init_loc: InitLoc | str = InitLoc.XAVIER,
) -> Callable:
    """Build a guide for ``model``.

    Parameters
    ----------
    model : InvariantNet
        The Pyro model.
    kind : GuideKind or str
        One of :class:`GuideKind` ("normal", "meanfield", "hybrid").
    init_scale : float
        Initial standard deviation of the Gaussian factors.
    init_loc : InitLoc or str
        Initial means / point estimates: "xavier", "median" or "sample".

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
        raise ValueError(f"{err}; guides: {[k.value for k in GuideKind]}, init locs: {[i.value for i in InitLoc]}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    has_W1_site = "W1" in model.weight_shapes()
    if kind is not GuideKind.HYBRID and has_W1_site and not model.config.first_layer_prior:
        raise ValueError(
            f"the {kind.value!r} guide puts a Gaussian over W1, which needs its prior: build the model with "
            "first_layer_prior=True (only point estimates of W1, the 'hybrid' guide, can go without it)"
        )
    if kind is GuideKind.HYBRID and has_W1_site and init_loc is InitLoc.MEDIAN:
        raise ValueError(
            "a point-estimated W1 initialised at the prior median 0 never moves (all ReLU gradients are 0): "
            "use init_loc 'xavier' or 'sample' with the 'hybrid' guide"
        )
    if kind is GuideKind.MEANFIELD:
        if init_loc is InitLoc.XAVIER:
            values = model.initial_values()
        else:
            priors = model.weight_priors()
            values = {k: p.mean if init_loc is InitLoc.MEDIAN else p.sample() for k, p in priors.items()}
        return MeanFieldGuide(model, values, init_scale=init_scale)
    loc_fn = _init_loc_fn(model, init_loc)
    guide = AutoGuideList(model)
    weights = list(model.weight_shapes())
    if kind is GuideKind.HYBRID:
        point = [n for n in weights if n in ("W1", "b1")]
        if point:
            guide.append(AutoDelta(poutine.block(model, expose=point), init_loc_fn=loc_fn))
        weights = [n for n in weights if n not in point]
    guide.append(AutoNormal(poutine.block(model, expose=weights), init_loc_fn=loc_fn, init_scale=init_scale))
    guide.append(EpsFromPrior(model))
    return guide

