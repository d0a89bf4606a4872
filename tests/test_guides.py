"""Variational families: every GuideKind x InitLoc builds, steps and matches the model; MeanField == AutoNormal."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.util import check_model_guide_match  # lives in pyro.util in pyro 1.9

from guides import POINT_FIRST_LAYER, EpsFromPrior, GuideKind, InitLoc, MeanFieldGuide, make_guide
from inference.optim import SVI, ParamAdam, named_params
from models import GENERATOR_NAMES, InvariantNet, ModelConfig
from models.priors import EtaPrior, PriorKind
from tests.conftest import priors_for

IMAGE = (1, 5, 5)
D, S, B, N = 6, 2, 4, 12
K = len(GENERATOR_NAMES)


def tiny_model(device, first_layer="relu", **overrides) -> InvariantNet:
    cfg = ModelConfig(image_shape=IMAGE, hidden=D, num_transforms=S, first_layer=first_layer, **overrides)
    return InvariantNet(cfg, num_data=N).to(device)


def model_for(device, kind, **overrides) -> InvariantNet:
    """A tiny model with the priors of :func:`priors_for`."""
    fp, op = priors_for(kind)
    return tiny_model(device, first_layer_prior=fp, output_layer_prior=op, **overrides)


def tiny_batch(device):
    return torch.rand(B, *IMAGE, device=device), torch.randint(0, 10, (B,), device=device)


def latent_sites(trace) -> set[str]:
    return {
        n for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and type(s["fn"]).__name__ != "_Subsample"
    }


def traces(model, guide, *args):
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    return model_trace, guide_trace


def guide_locs(model: InvariantNet, guide, kind: GuideKind) -> dict[str, torch.Tensor]:
    """Current means / point estimates of the guide, by weight site (unconstrained = constrained: real-valued)."""
    store = named_params(guide)
    out = {}
    for name in model.weight_shapes():
        candidates = [k for k in store.keys() if k.endswith(f"locs.{name}") or k.endswith(f".{name}")]
        candidates = [k for k in candidates if "scales" not in k]
        assert len(candidates) == 1, (kind, name, candidates)
        out[name] = store[candidates[0]].detach()
    return out


@pytest.mark.parametrize("first_layer", ["relu", "rff"])
@pytest.mark.parametrize("init_loc", list(InitLoc), ids=lambda i: i.value)
@pytest.mark.parametrize("kind", list(GuideKind), ids=lambda k: k.value)
def test_every_guide_builds_steps_and_matches_model(device, kind, init_loc, first_layer):
    fp, op = priors_for(kind)
    model = tiny_model(device, first_layer, first_layer_prior=fp, output_layer_prior=op)
    point_W1 = kind in (*POINT_FIRST_LAYER, GuideKind.MAP, GuideKind.ML)
    if point_W1 and init_loc is InitLoc.MEDIAN and first_layer == "relu":
        # W1 = 0 exactly would be a dead first layer (zero ReLU gradients): refused with a clear message
        with pytest.raises(ValueError, match="never moves"):
            make_guide(model, kind, init_loc=init_loc)
        return
    guide = make_guide(model, kind, init_loc=init_loc)
    x, y = tiny_batch(device)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, ParamAdam(lambda name: 1e-2), loss=elbo)
    eta_before = model.eta.detach().clone()  # the model registers eta on first access
    loss = svi.step(x, y)
    assert math.isfinite(loss)
    if init_loc is InitLoc.MEDIAN and kind in (GuideKind.MAP, GuideKind.ML):
        svi.step(x, y)  # point estimates W2 = 0 hide eta from the first gradient; the second step sees it
    assert not torch.equal(model.eta.detach(), eta_before), "eta should be learned by the SVI step"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_trace, guide_trace = traces(model, guide, x, y)
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting=1)
        # and at a different number of transformation samples (evaluation uses another S)
        model_trace7, guide_trace7 = traces(model, guide, x, y, 7)
        check_model_guide_match(model_trace7, guide_trace7, max_plate_nesting=1)
    assert tuple(guide_trace7.nodes["eps"]["value"].shape) == (7, K)
    expected = set(model.weight_shapes()) | {"eps"}
    assert latent_sites(model_trace) == expected
    assert expected <= latent_sites(guide_trace)
    if kind is GuideKind.ML:  # maximum likelihood: no prior term anywhere in the objective
        model_trace.compute_log_prob()
        assert all(torch.count_nonzero(model_trace.nodes[n]["log_prob"]) == 0 for n in model.weight_shapes())

    # every variational parameter (and eta) is updated by a further step; none belongs to eps
    store = named_params(model, guide)
    before = {n: store[n].detach().clone() for n in store.keys()}
    assert len(before) > 1 and not any("eps" in n for n in before)
    assert math.isfinite(svi.step(x, y))
    unchanged = [n for n, v in before.items() if torch.equal(store[n].detach(), v)]
    assert not unchanged, f"params without updates: {unchanged}"


@pytest.mark.parametrize("first_layer", ["relu", "rff"])
@pytest.mark.parametrize("eta_prior", list(EtaPrior), ids=lambda e: e.value)
@pytest.mark.parametrize("prior", list(PriorKind), ids=lambda p: p.value)
@pytest.mark.parametrize("kind", list(GuideKind), ids=lambda k: k.value)
def test_every_guide_and_prior_combination(device, kind, prior, eta_prior, first_layer):
    """Guide x prior x (empirical / full Bayes eta): builds, runs one SVI step, matches the model."""
    fp, op = priors_for(kind, hierarchical=prior is PriorKind.HIERARCHICAL)
    if kind is GuideKind.ML and prior is PriorKind.HIERARCHICAL:  # no prior, hence no prior scale to infer
        with pytest.raises(ValueError, match="hierarchical prior needs the weight priors"):
            tiny_model(device, first_layer, prior=prior, eta_prior=eta_prior, first_layer_prior=fp,
                       output_layer_prior=op)
        return
    model = tiny_model(device, first_layer, prior=prior, eta_prior=eta_prior, first_layer_prior=fp,
                       output_layer_prior=op)
    guide = make_guide(model, kind)
    x, y = tiny_batch(device)
    svi = SVI(model, guide, ParamAdam(lambda name: 1e-2),
              loss=Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1))
    assert math.isfinite(svi.step(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_trace, guide_trace = traces(model, guide, x, y)
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting=1)
    expected = set(model.latent_sites()) | {"eps"}
    assert latent_sites(model_trace) == expected
    assert ("eta" in expected) == (eta_prior is EtaPrior.UNIFORM)
    assert any(n.startswith("tau_") for n in expected) == (prior is PriorKind.HIERARCHICAL)


def _built_locs(device, kind, init_loc):
    """Build a guide with a fixed seed; returns (model, its guide's initial locs, the Xavier values of that seed)."""
    x, y = tiny_batch(device)
    pyro.set_rng_seed(5)
    model = tiny_model(device)
    pyro.set_rng_seed(5)
    expected_xavier = model.initial_values()
    pyro.set_rng_seed(5)
    guide = make_guide(model, kind, init_loc=init_loc)
    guide(x, y)
    return model, guide_locs(model, guide, kind), expected_xavier


PER_SITE_KINDS = [GuideKind.NORMAL, GuideKind.MEANFIELD, GuideKind.HYBRID, GuideKind.MAP]  # one param per site


@pytest.mark.parametrize("kind", PER_SITE_KINDS, ids=lambda k: k.value)
def test_xavier_init_locs(device, kind):
    model, locs, expected = _built_locs(device, kind, InitLoc.XAVIER)
    for name, shape in model.weight_shapes().items():
        loc = locs[name]
        assert loc.shape == shape
        torch.testing.assert_close(loc, expected[name], atol=1e-6, rtol=1e-6)
        if len(shape) == 2:  # Xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out))
            bound = math.sqrt(6.0 / sum(shape))
            assert bound / 2 < loc.abs().max() <= bound, name
        else:  # zero biases
            assert torch.count_nonzero(loc) == 0, name


@pytest.mark.parametrize("kind", PER_SITE_KINDS, ids=lambda k: k.value)
def test_sample_init_locs(device, kind):
    model, locs, xavier = _built_locs(device, kind, InitLoc.SAMPLE)
    for name, shape in model.weight_shapes().items():
        loc = locs[name]
        assert loc.shape == shape
        assert torch.count_nonzero(loc) == loc.numel(), name  # one draw from N(0, 1)
        assert not torch.allclose(loc, xavier[name]), name
    w1 = locs["W1"]
    assert 0.5 < w1.std().item() < 1.5  # prior scale alpha = 1, 150 draws


@pytest.mark.parametrize("kind", [GuideKind.NORMAL, GuideKind.MEANFIELD], ids=lambda k: k.value)
def test_median_init_locs_are_the_prior_median_zero(device, kind):
    model, locs, _ = _built_locs(device, kind, InitLoc.MEDIAN)
    for name, shape in model.weight_shapes().items():
        assert locs[name].shape == shape
        assert torch.count_nonzero(locs[name]) == 0, name


@pytest.mark.parametrize("first_layer", ["relu", "rff"])
def test_meanfield_and_autonormal_give_the_same_elbo(device, first_layer):
    """Same init values, init scale and random stream -> the same ELBO (Trace_ELBO is a one-sample estimate)."""
    x, y = tiny_batch(device)
    pyro.set_rng_seed(1)
    model = tiny_model(device, first_layer)
    values = model.initial_values()
    scale = 0.05

    # AutoNormal over the weights exactly as make_guide builds it, from the same values dict
    from pyro.infer.autoguide import AutoGuideList, AutoNormal, init_to_value

    auto = AutoGuideList(model)
    auto.append(AutoNormal(poutine.block(model, expose=list(model.weight_shapes())),
                           init_loc_fn=init_to_value(values=values), init_scale=scale))
    auto.append(EpsFromPrior(model))
    hand = MeanFieldGuide(model, values, init_scale=scale)
    auto(x, y)  # set up the autoguide's params (its prototype trace consumes random numbers)
    hand(x, y)

    for name, value in values.items():  # constrained values, read off the modules that own them
        torch.testing.assert_close(getattr(auto[0].locs, name).detach(), value)
        torch.testing.assert_close(getattr(hand.locs, name).detach(), value)
        torch.testing.assert_close(getattr(auto[0].scales, name).detach(), getattr(hand.scales, name).detach(),
                                   atol=1e-7, rtol=1e-5)

    elbo = Trace_ELBO(max_plate_nesting=1)
    for seed in (11, 12, 13):
        pyro.set_rng_seed(seed)
        loss_auto = elbo.loss(model, auto, x, y)
        pyro.set_rng_seed(seed)
        loss_hand = elbo.loss(model, hand, x, y)
        assert loss_hand == pytest.approx(loss_auto, rel=1e-5), seed
    # a different random stream gives a different one-sample estimate (the comparison above is not vacuous)
    pyro.set_rng_seed(99)
    assert elbo.loss(model, hand, x, y) != pytest.approx(loss_auto, rel=1e-5)


def test_make_guide_normal_and_meanfield_share_initialisation(device):
    """make_guide draws the Xavier values from model.initial_values(): same seed -> same means."""
    x, y = tiny_batch(device)
    model = tiny_model(device)
    pyro.set_rng_seed(2)
    auto = make_guide(model, "normal")
    pyro.set_rng_seed(2)
    hand = make_guide(model, "meanfield")
    auto(x, y)
    hand(x, y)
    for name in model.weight_shapes():
        auto_loc, hand_loc = getattr(auto[0].locs, name), getattr(hand.locs, name)
        torch.testing.assert_close(auto_loc, hand_loc)
    elbo = Trace_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(3)
    loss_auto = elbo.loss(model, auto, x, y)
    pyro.set_rng_seed(3)
    assert elbo.loss(model, hand, x, y) == pytest.approx(loss_auto, rel=1e-5)


@pytest.mark.parametrize("kind", list(GuideKind), ids=lambda k: k.value)
def test_eps_is_drawn_from_its_prior_not_learned(device, kind):
    model = model_for(device, kind)
    guide = make_guide(model, kind)
    x, y = tiny_batch(device)
    svi = SVI(model, guide, ParamAdam(lambda name: 1e-2), loss=Trace_ELBO(max_plate_nesting=1))
    svi.step(x, y)
    assert not [n for n in named_params(model, guide) if "eps" in n]
    guide_trace = poutine.trace(guide).get_trace(x, y)
    site = guide_trace.nodes["eps"]
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    assert isinstance(fn, torch.distributions.Uniform)
    assert torch.all(fn.low == -1) and torch.all(fn.high == 1)
    assert tuple(site["value"].shape) == (S, K)
    # q(eps) = p(eps): the log densities cancel in the ELBO
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    torch.testing.assert_close(guide_trace.nodes["eps"]["fn"].log_prob(site["value"]),
                               model_trace.nodes["eps"]["fn"].log_prob(site["value"]))


def test_make_guide_rejects_bad_arguments(device):
    model = tiny_model(device)
    all_kinds = r"guides: \['normal', 'meanfield', 'hybrid', 'paper', 'lowrank', 'map', 'ml'\]"
    with pytest.raises(ValueError, match=all_kinds):
        make_guide(model, "laplace")
    with pytest.raises(ValueError, match=r"init locs: \['xavier', 'median', 'sample'\]"):
        make_guide(model, "normal", init_loc="zeros")
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        make_guide(model, "normal", init_scale=0.0)
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        MeanFieldGuide(model, model.initial_values(), init_scale=-1.0)


def test_hybrid_guide_point_estimates_first_layer(device):
    """hybrid: W1, b1 are Delta (point) sites, W2, b2 Gaussian."""
    model = tiny_model(device)
    guide = make_guide(model, "hybrid")
    x, y = tiny_batch(device)
    guide_trace = poutine.trace(guide).get_trace(x, y)
    for name in ("W1", "b1"):
        assert type(guide_trace.nodes[name]["fn"]).__name__ == "Delta"
        assert f"{name}_unconstrained" not in guide_trace.nodes
    for name in ("W2", "b2"):
        assert f"{name}_unconstrained" in guide_trace.nodes  # AutoNormal's auxiliary Gaussian site


def _check_predictive(pred: dict, num_samples: int) -> None:
    assert tuple(pred["obs"].shape) == (num_samples, B)
    assert tuple(pred["_RETURN"].shape) == (num_samples, B, 10)
    torch.testing.assert_close(torch.logsumexp(pred["_RETURN"], -1), torch.zeros(num_samples, B), atol=1e-5, rtol=0)


def test_prior_predictive_parallel(device):
    model = tiny_model(device)
    x, _ = tiny_batch(device)
    pred = Predictive(model, num_samples=5, parallel=True, return_sites=["obs", "_RETURN"])(x)
    _check_predictive({k: v.cpu() for k, v in pred.items()}, 5)


@pytest.mark.parametrize(
    "parallel",
    [
        False,
        True,
    ],
    ids=["sequential", "parallel"],
)
@pytest.mark.parametrize("kind", list(GuideKind), ids=lambda k: k.value)
def test_posterior_predictive(device, kind, parallel):
    model = model_for(device, kind)
    guide = make_guide(model, kind)
    x, y = tiny_batch(device)
    guide(x, y)
    pred = Predictive(model, guide=guide, num_samples=4, parallel=parallel, return_sites=["obs", "_RETURN"])(x)
    _check_predictive({k: v.cpu() for k, v in pred.items()}, 4)


def test_gaussian_guides_need_the_first_layer_prior(device):
    """Without log p(W1, b1) only a point estimate of W1 is proper (the ELBO's entropy term would diverge)."""
    model = tiny_model(device, first_layer_prior=False)
    for kind in (GuideKind.NORMAL, GuideKind.MEANFIELD, GuideKind.LOWRANK):
        with pytest.raises(ValueError, match="first_layer_prior"):
            make_guide(model, kind)
    with pytest.raises(ValueError, match="maximum likelihood"):
        make_guide(model, GuideKind.ML)  # the output layer's prior is still on
    guide = make_guide(model, GuideKind.HYBRID)
    x, y = tiny_batch(device)
    assert math.isfinite(Trace_ELBO(max_plate_nesting=1).loss(model, guide, x, y))


def test_paper_guide_rows_grow_no_faster_through_the_off_diagonal_than_through_the_diagonal():
    """Adam moves every entry by about the learning rate per step whatever its gradient. With D = 1024 the
    D - 1 off-diagonal entries of a Cholesky row would then grow its norm (the predictive std of W2) about
    sqrt(D) times faster than the diagonal, which overflowed the logits within ten steps at the paper's size;
    the 1 / sqrt(D) scaling keeps a row's growth at most about twice the diagonal's."""
    from guides.paper import ClasswiseFullCovGuide

    D, lr, steps, init = 1024, 5e-3, 20, 0.1
    guide = ClasswiseFullCovGuide(torch.zeros(2, D), init_scale=init)
    guide()  # register the parameters
    params = [p.unconstrained() for p in (guide.scale_diag, guide.scale_offdiag)]
    optim = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):  # the worst case for the row norm: a gradient of one sign on every entry
        optim.zero_grad()
        for p in params:
            p.grad = -torch.ones_like(p) - 0.1 * torch.rand(p.shape, generator=g)
        optim.step()
    rows = guide.scale_tril.detach().norm(dim=-1)  # (classes, D)
    diag_growth = init * (math.exp(lr * steps) - 1)
    assert rows.max() <= init + diag_growth + lr * steps * 1.01  # off-diagonal part: <= lr * steps in norm
    assert rows.max() > init + diag_growth  # the off-diagonal entries did move


def test_eta_guide_quantiles_are_exact_and_it_is_one_piece_of_the_guide():
    """Under full Bayes the autoguide families keep q(eta) apart: its quantiles are those of its draws."""
    pyro.set_rng_seed(3)
    from guides.factory import eta_guide_of

    model = InvariantNet(ModelConfig(image_shape=(1, 8, 8), hidden=4, num_transforms=2, eta_prior="uniform",
                                     eta_init=1.0), num_data=10)
    guide = make_guide(model, "hybrid", init_scale=0.5)
    piece = eta_guide_of(guide)
    assert piece is not None and eta_guide_of(make_guide(model, "lowrank")) is None
    x = torch.rand(2, 1, 8, 8)
    draws = torch.stack([poutine.trace(guide).get_trace(x).nodes["eta"]["value"] for _ in range(20000)])
    for q in (0.05, 0.5, 0.95):
        torch.testing.assert_close(piece.quantile(q), torch.quantile(draws, q, dim=0), rtol=0.03, atol=0.01)
    torch.testing.assert_close(piece.median(), torch.full((6,), 1.0), rtol=1e-5, atol=1e-6)  # starts at eta_init
    assert ((draws > 0) & (draws < math.pi)).all()  # inside the prior's support
