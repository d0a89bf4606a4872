"""The Pyro model: sites and shapes, vectorised particles, eta, averaging rules, transform modes, input checks."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from guides import make_guide
from inference.optim import named_params
from models import GENERATOR_NAMES, InvariantNet, ModelConfig
from models.network import rff_weights

IMAGE = (1, 6, 6)
D, S, B, N = 8, 3, 5, 20
K = len(GENERATOR_NAMES)


def tiny_config(**overrides) -> ModelConfig:
    kwargs = dict(image_shape=IMAGE, hidden=D, num_transforms=S, eta_init=0.3)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def make_model(device, **overrides) -> InvariantNet:
    return InvariantNet(tiny_config(**overrides), num_data=N).to(device)


def batch(device, b: int = B, shape=IMAGE):
    return torch.rand(b, *shape, device=device), torch.randint(0, 10, (b,), device=device)


def weights_for(model: InvariantNet) -> dict[str, torch.Tensor]:
    """One fixed draw of every weight site, so that two models can be compared on the same theta."""
    dev = model.prior_loc.device
    return {name: torch.randn(shape, device=dev) for name, shape in model.weight_shapes().items()}


def sample_sites(trace) -> dict[str, dict]:
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}


def particles(fn, num: int):
    """Run ``fn`` inside the vectorised-particle plate that Trace_ELBO uses (dim -2 with one model plate)."""

    def wrapped(*args, **kwargs):
        with pyro.plate("num_particles_vectorized", num, dim=-2):
            return fn(*args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------- sites and shapes
@pytest.mark.parametrize("transform_mode", ["weights", "inputs"])
def test_relu_sites_and_shapes(device, transform_mode):
    model = make_model(device, transform_mode=transform_mode)
    x, y = batch(device)
    trace = poutine.trace(model).get_trace(x, y)
    trace.compute_log_prob()
    shapes = trace.format_shapes()
    assert "eta" in shapes and "W1" in shapes
    sites = sample_sites(trace)
    assert list(sites) == ["W1", "b1", "W2", "b2", "eps", "data", "obs"]
    P = math.prod(IMAGE)
    expected = {"W1": (D, P), "b1": (D,), "W2": (10, D), "b2": (10,), "eps": (S, K), "obs": (B,)}
    for name, shape in expected.items():
        assert tuple(sites[name]["value"].shape) == shape, name
    assert sites["obs"]["is_observed"] and torch.equal(sites["obs"]["value"], y)
    assert sites["obs"]["log_prob"].shape == (B,)
    assert sites["obs"]["scale"] == pytest.approx(N / B)  # minibatch likelihood scaled by N / B
    assert tuple(sites["eps"]["fn"].event_shape) == (S, K)
    assert trace.nodes["eta"]["type"] == "param" and tuple(trace.nodes["eta"]["value"].shape) == (K,)
    assert tuple(trace.nodes["_RETURN"]["value"].shape) == (B, 10)


def test_num_transforms_argument_overrides_config(device):
    model = make_model(device)
    x, _ = batch(device)
    trace = poutine.trace(model).get_trace(x, None, 7)
    assert tuple(trace.nodes["eps"]["value"].shape) == (7, K)
    assert not trace.nodes["obs"]["is_observed"]  # y=None samples labels from the predictive


def test_rff_first_layer_has_no_W1_sample_site(device):
    model = make_model(device, first_layer="rff")
    x, y = batch(device)
    sites = sample_sites(poutine.trace(model).get_trace(x, y))
    assert "W1" not in sites and "b1" not in sites
    assert list(sites) == ["W2", "b2", "eps", "data", "obs"]
    assert set(model.weight_shapes()) == {"W2", "b2"}
    buffers = dict(model.named_buffers())
    assert buffers["W1"].shape == (D, math.prod(IMAGE)) and buffers["b1"].shape == (D,)



def test_rff_weights_blur_keeps_the_scale_and_smooths_the_filters():
    """blur = 0 is the white-noise draw itself; blur > 0 is that draw convolved with a normalised Gaussian:
    a constant image projects the same in expectation, the per-entry variance drops by sum(g^2) ~ 1 / (4 pi),
    and neighbouring pixels correlate (exp(-1/4) = 0.78 for a std of 1 px, away from the border)."""
    shape, scale = (1, 28, 28), 8.0
    torch.manual_seed(0)
    white = rff_weights(512, shape, scale)
    torch.manual_seed(0)
    assert torch.equal(white, torch.randn(512, 784) * scale / 28)
    torch.manual_seed(0)
    smooth = rff_weights(512, shape, scale, blur=1.0)
    interior = smooth.reshape(-1, 28, 28)[:, 4:24, 4:24]
    assert interior.pow(2).mean().sqrt().item() == pytest.approx(scale / 28 / math.sqrt(4 * math.pi), rel=0.05)

    def neighbour_correlation(w):
        img = w.reshape(-1, 28, 28)[:, 8:20, 8:20]
        return torch.corrcoef(torch.stack([img[:, :, :-1].flatten(), img[:, :, 1:].flatten()]))[0, 1].item()

    assert abs(neighbour_correlation(white)) < 0.02
    assert neighbour_correlation(smooth) == pytest.approx(math.exp(-0.25), abs=0.02)
    with pytest.raises(ValueError, match="rff_blur"):
        ModelConfig(first_layer="rff", rff_blur=-1.0)

@pytest.mark.parametrize("first_layer", ["relu", "rff"])
@pytest.mark.parametrize("transform_mode", ["weights", "inputs"])
def test_vectorized_particle_shapes(device, first_layer, transform_mode):
    model = make_model(device, first_layer=first_layer, transform_mode=transform_mode)
    guide = make_guide(model, "hybrid")
    x, y = batch(device)
    Pn = 3
    guide_trace = poutine.trace(particles(guide, Pn)).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(particles(model, Pn), trace=guide_trace)).get_trace(x, y)
    sites = sample_sites(model_trace)
    for name, shape in model.weight_shapes().items():
        assert tuple(sites[name]["value"].shape) == (Pn, 1, *shape), name
    assert tuple(sites["eps"]["value"].shape) == (Pn, 1, S, K)
    assert tuple(sites["obs"]["fn"].batch_shape) == (Pn, B)
    assert tuple(model_trace.nodes["_RETURN"]["value"].shape) == (Pn, B, 10)

    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss(model, guide, x, y)
    assert math.isfinite(loss)


def test_vectorized_particle_rows_equal_single_particle_runs(device):
    """Row p of the vectorised forward pass is exactly the unvectorised model run on particle p."""
    model = make_model(device)
    x, y = batch(device)
    Pn = 3
    trace = poutine.trace(particles(model, Pn)).get_trace(x, y)
    out = trace.nodes["_RETURN"]["value"]
    for p in range(Pn):
        data = {n: trace.nodes[n]["value"][p, 0] for n in (*model.weight_shapes(), "eps")}
        single = poutine.condition(model, data=data)(x, y)
        torch.testing.assert_close(out[p], single, atol=1e-5, rtol=1e-5)


def test_vectorized_and_sequential_particle_elbo_agree_in_expectation(device):
    """Both particle estimators target the same ELBO.

    Vectorised: 10 calls x 200 particles (2000 in all); sequential: one call with 40 particles.
    The single-particle standard deviation sd is estimated from the spread of the 10 vectorised
    means (sd = std(means) * sqrt(200)); the two estimates must agree within 5 standard errors,
    se = sd * sqrt(1/40 + 1/2000).
    """
    model = InvariantNet(ModelConfig(image_shape=(1, 4, 4), hidden=4, num_transforms=2, eta_init=0.5), num_data=8)
    model = model.to(device)
    guide = make_guide(model, "normal", init_scale=0.1)
    x, y = batch(device, 8, (1, 4, 4))
    guide(x, y)  # set up the guide's params before drawing the estimates
    n_calls, n_per_call, n_seq = 10, 200, 40
    vec_elbo = Trace_ELBO(num_particles=n_per_call, vectorize_particles=True, max_plate_nesting=1)
    means = torch.tensor([vec_elbo.loss(model, guide, x, y) for _ in range(n_calls)], dtype=torch.float64)
    vec, sd = means.mean().item(), means.std().item() * math.sqrt(n_per_call)
    seq = Trace_ELBO(num_particles=n_seq, vectorize_particles=False, max_plate_nesting=1).loss(model, guide, x, y)
    se = sd * math.sqrt(1 / n_seq + 1 / (n_calls * n_per_call))
    assert math.isfinite(vec) and math.isfinite(seq) and sd > 0
    assert abs(seq - vec) < 5 * se, (seq, vec, se)


# --------------------------------------------------------------------------- eta
def test_eta_is_a_positive_param_with_one_entry_per_generator(device):
    model = make_model(device)
    x, y = batch(device)
    poutine.trace(model).get_trace(x, y)
    params = named_params(model)
    assert list(params) == ["eta"]  # the model's only parameter, in the model (module-local)
    eta = model.eta
    assert eta.shape == (K,) and torch.all(eta > 0)
    torch.testing.assert_close(eta, torch.full((K,), 0.3, device=device))
    # the unconstrained value is log(eta): any real number maps to a positive eta
    unconstrained = params["eta"]
    torch.testing.assert_close(unconstrained.exp(), eta)
    with torch.no_grad():
        unconstrained.fill_(-50.0)
    assert torch.all(model.eta > 0)


def test_fixed_eta_is_a_buffer_not_a_param(device):
    model = make_model(device, learn_eta=False)
    x, y = batch(device)
    trace = poutine.trace(model).get_trace(x, y)
    assert "eta" not in trace.nodes and "eta" not in named_params(model)
    assert "eta" in dict(model.named_buffers())


@pytest.mark.parametrize("generators", [(), ("rotate",), ("scale_x", "translate_y"), GENERATOR_NAMES])
def test_inactive_generators_have_zero_effective_eta(device, generators):
    model = make_model(device, generators=generators)
    eff = model.eta_effective.detach()
    assert eff.shape == (K,)
    for k, name in enumerate(GENERATOR_NAMES):
        if name in generators:
            assert eff[k].item() == pytest.approx(0.3)
        else:
            assert eff[k].item() == 0.0
    assert model.has_transforms == bool(generators)


def test_max_shift_bounds_only_the_translations_smoothly(device):
    """With max_shift b, eta_translate is b tanh(eta / b): near eta for small extents, never above b (no sampled
    shift moves a filter's centre off the frame at b = 1); the other generators are untouched."""
    model = InvariantNet(ModelConfig(hidden=4, num_transforms=2, max_shift=1.0), num_data=10).to(device)
    for raw in (0.05, 0.5, 3.0, 40.0):
        with torch.no_grad():
            model.eta = torch.full((len(GENERATOR_NAMES),), raw, device=device)
        eff = dict(zip(model.generator_names, model.eta_effective.tolist(), strict=True))
        for name in ("translate_x", "translate_y"):
            assert eff[name] == pytest.approx(math.tanh(raw), rel=1e-6) and eff[name] <= 1.0
        assert eff["rotate"] == pytest.approx(min(raw, math.pi)) and eff["shear"] == pytest.approx(raw)
    assert model.eta_effective.requires_grad  # eta still learns through the bound


@pytest.mark.parametrize("eta_rotate", [math.pi, 4.0, 50.0])
def test_a_rotation_extent_past_pi_is_the_full_turn(device, eta_rotate):
    """U[-eta, eta] with eta >= pi covers every angle, so the model uses min(eta_rotate, pi): eta = 4 or 50 rad
    gives exactly the network of eta = pi (same weights, same eps); the other generators are not capped."""
    torch.manual_seed(0)
    every = make_model(device, learn_eta=False, eta_init=eta_rotate).eta_effective
    assert every[GENERATOR_NAMES.index("rotate")].item() == pytest.approx(math.pi)
    assert every[GENERATOR_NAMES.index("shear")].item() == pytest.approx(eta_rotate)
    x, y = batch(device)
    theta = weights_for(make_model(device))
    eps = torch.rand(S, K, device=device) * 2 - 1
    model = make_model(device, generators=("rotate",), learn_eta=False, eta_init=eta_rotate)
    reference = make_model(device, generators=("rotate",), learn_eta=False, eta_init=math.pi)
    out = poutine.condition(model, data={**theta, "eps": eps})(x, y)
    torch.testing.assert_close(out, poutine.condition(reference, data={**theta, "eps": eps})(x, y), rtol=0, atol=0)


def test_eta_rotate_at_pi_still_gets_its_gradient(device):
    """At the cap the gradient of the bound reaches eta (a learned eta can come back below pi)."""
    model = make_model(device, eta_init=math.pi)
    (model.eta_effective * torch.arange(1.0, K + 1, device=device)).sum().backward()
    grad = model.eta_unconstrained.grad  # d/du of sum_k k eta_k with eta = exp(u)
    torch.testing.assert_close(grad, torch.arange(1.0, K + 1, device=device) * math.pi)


def test_inactive_generators_do_not_change_the_output(device):
    """With only "rotate" active, the eps entries of the other generators have no effect."""
    model = make_model(device, generators=("rotate",))
    x, y = batch(device)
    theta = weights_for(model)
    eps = torch.rand(S, K, device=device) * 2 - 1
    eps2 = torch.rand(S, K, device=device) * 2 - 1
    eps2[:, GENERATOR_NAMES.index("rotate")] = eps[:, GENERATOR_NAMES.index("rotate")]
    a = poutine.condition(model, data={**theta, "eps": eps})(x, y)
    b = poutine.condition(model, data={**theta, "eps": eps2})(x, y)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- averaging
@pytest.mark.parametrize("averaging", ["probs", "logits"])
@pytest.mark.parametrize("transform_mode", ["weights", "inputs"])
def test_averaging_rules_give_normalised_log_probs(device, averaging, transform_mode):
    model = make_model(device, averaging=averaging, transform_mode=transform_mode, eta_init=0.8)
    x, y = batch(device)
    log_p = model(x, y)
    assert log_p.shape == (B, 10)
    assert torch.all(log_p <= 1e-6)
    torch.testing.assert_close(torch.logsumexp(log_p, -1), torch.zeros(B, device=device), atol=1e-5, rtol=0)


def _both_rules(device, **overrides):
    probs = make_model(device, averaging="probs", **overrides)
    logits = make_model(device, averaging="logits", **overrides)
    data = {**weights_for(probs), "eps": torch.rand(S, K, device=device) * 2 - 1}
    x, y = batch(device)
    return poutine.condition(probs, data=data)(x, y), poutine.condition(logits, data=data)(x, y)


def test_averaging_rules_agree_without_transforms(device):
    """generators=(): all S copies coincide (S' = 1) and both rules are log_softmax(f)."""
    a, b = _both_rules(device, generators=())
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_averaging_rules_agree_for_vanishing_eta(device):
    a, b = _both_rules(device, eta_init=1e-7)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_averaging_rules_differ_for_distinct_transforms(device):
    """Sanity check that the two rules above are not trivially identical."""
    a, b = _both_rules(device, eta_init=math.pi)
    assert (a - b).abs().max() > 1e-4


# --------------------------------------------------------------------------- exact transform equivalences
def _rotation_eps(rot_eps: list[float], device) -> torch.Tensor:
    eps = torch.rand(len(rot_eps), K, device=device) * 2 - 1  # other generators are masked anyway
    eps[:, GENERATOR_NAMES.index("rotate")] = torch.tensor(rot_eps, device=device)
    return eps


@pytest.mark.parametrize("first_layer", ["relu", "rff"])
@pytest.mark.parametrize("averaging", ["probs", "logits"])
@pytest.mark.parametrize(
    ("generators", "eta_init", "gen_eps"),
    [
        # eta = pi/2 with eps = +-1: rotations by +-90 degrees (eps on the closed boundary of
        # U[-1, 1] is fine here: conditioning only sets the value, no log-prob is taken)
        (("rotate",), math.pi / 2, [1.0, 1.0, -1.0, 0.0]),
        (("rotate",), math.pi, [0.5, -0.5, 0.0]),  # +-90 degrees and the identity
        (("translate_x",), 2 * 2.0 / 6, [0.5, -0.5, 0.0]),  # +-1 pixel on a 7-wide image
    ],
    ids=["rot90-eta-pi/2", "rot90-eta-pi", "shift-1px"],
)
@pytest.mark.parametrize("channels", [1, 3], ids=["1-channel", "3-channel"])
def test_input_mode_equals_weight_mode_for_pixel_permutations(
    device, first_layer, averaging, generators, eta_init, gen_eps, channels
):
    """(W1 o T) x == W1 (T^-1 x) exactly when every sampled T permutes pixel centres (on 3-channel images too: every
    channel of a filter moves with the same T)."""
    shape = (channels, 7, 7)
    common = dict(image_shape=shape, hidden=D, num_transforms=len(gen_eps), generators=generators,
                  eta_init=eta_init, learn_eta=False, first_layer=first_layer, averaging=averaging)
    pyro.set_rng_seed(1)
    m_w = InvariantNet(ModelConfig(transform_mode="weights", **common), num_data=N).to(device)
    pyro.set_rng_seed(1)  # the same fixed RFF features
    m_i = InvariantNet(ModelConfig(transform_mode="inputs", **common), num_data=N).to(device)
    if first_layer == "rff":
        assert torch.equal(m_w.W1, m_i.W1)
    k = GENERATOR_NAMES.index(generators[0])
    eps = torch.rand(len(gen_eps), K, device=device) * 2 - 1
    eps[:, k] = torch.tensor(gen_eps, device=device)
    data = {**weights_for(m_w), "eps": eps}
    x, y = batch(device, B, shape)
    out_w = poutine.condition(m_w, data=data)(x, y)
    out_i = poutine.condition(m_i, data=data)(x, y)
    torch.testing.assert_close(out_w, out_i, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("transform_mode", ["weights", "inputs"])
@pytest.mark.parametrize("averaging", ["probs", "logits"])
def test_exact_c4_average_is_rotation_invariant(device, transform_mode, averaging):
    """Averaging over the four 90-degree rotations makes the network exactly invariant to rot90 of x."""
    shape = (1, 7, 7)
    eta = math.pi  # eps in {0, 1/2, 1, -1/2} -> angles {0, 90, 180, -90} degrees
    model = InvariantNet(ModelConfig(image_shape=shape, hidden=D, num_transforms=4, generators=("rotate",),
                                     eta_init=eta, learn_eta=False, transform_mode=transform_mode,
                                     averaging=averaging), num_data=N).to(device)
    data = {**weights_for(model), "eps": _rotation_eps([0.0, 0.5, 1.0, -0.5], device)}
    x, y = batch(device, B, shape)
    conditioned = poutine.condition(model, data=data)
    out = conditioned(x, y)
    for k in (1, 2, 3):
        torch.testing.assert_close(conditioned(torch.rot90(x, k, dims=(-2, -1)), y), out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(num_transforms=0), "num_transforms must be a positive integer"),
        (dict(hidden=0), "hidden must be a positive integer"),
        (dict(num_classes=0), "num_classes must be a positive integer"),
        (dict(generators=("rotation",)), r"unknown generator\(s\) \['rotation'\]; choose from"),
        (dict(generators=("rotate", "zoom")), r"unknown generator\(s\) \['zoom'\]"),
        (dict(image_shape=(28, 28)), r"image_shape must be \(C, H, W\)"),
        (dict(image_shape=(1, 0, 28)), r"image_shape must be \(C, H, W\)"),
        (dict(eta_init=0.0), "eta_init must be > 0"),
        (dict(prior_scale=-1.0), "prior_scale must be > 0"),
        (dict(first_layer="tanh"), "tanh"),
        (dict(averaging="mean"), "mean"),
        (dict(transform_mode="both"), "both"),
    ],
)
def test_bad_config_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_bad_num_data_raises():
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        InvariantNet(tiny_config(), num_data=0)


@pytest.mark.parametrize(
    "x_shape", [(B, 6, 6), (B, 1, 6, 7), (B, 2, 6, 6), (B, 36), (1, B, 1, 6, 6)], ids=str
)
def test_wrong_image_shape_raises(device, x_shape):
    model = make_model(device)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 6, 6\), got"):
        model(torch.rand(*x_shape, device=device), None)


@pytest.mark.parametrize("y_shape", [(B, 1), (B + 1,), (), (1, B)], ids=str)
def test_wrong_label_shape_raises(device, y_shape):
    model = make_model(device)
    x, _ = batch(device)
    with pytest.raises(ValueError, match=rf"expected labels of shape \({B},\), got"):
        model(x, torch.zeros(y_shape, dtype=torch.long, device=device))


def test_negative_num_transforms_at_call_raises(device):
    model = make_model(device)
    x, y = batch(device)
    with pytest.raises(ValueError, match="num_transforms must be a positive integer"):
        model(x, y, -1)


def test_zero_num_transforms_at_call_raises(device):
    model = make_model(device)
    x, y = batch(device)
    with pytest.raises(ValueError, match="num_transforms must be a positive integer"):
        model(x, y, 0)


# --------------------------------------------------------------------------- first-layer prior mask
def test_first_layer_prior_false_masks_only_the_first_layer_log_prior(device):
    x, y = batch(device)
    on = make_model(device)
    off = make_model(device, first_layer_prior=False)
    data = {**weights_for(on), "eps": torch.rand(S, K, device=device) * 2 - 1}
    traces = {}
    for key, model in (("on", on), ("off", off)):
        trace = poutine.trace(poutine.condition(model, data=data)).get_trace(x, y)
        trace.compute_log_prob()
        traces[key] = trace
    for name in ("W1", "b1"):
        assert traces["on"].nodes[name]["log_prob_sum"].item() < 0
        assert traces["off"].nodes[name]["log_prob_sum"].item() == 0.0
    for name in ("W2", "b2", "eps", "obs"):
        torch.testing.assert_close(traces["on"].nodes[name]["log_prob_sum"], traces["off"].nodes[name]["log_prob_sum"])
    # the forward pass itself is unchanged
    torch.testing.assert_close(traces["on"].nodes["_RETURN"]["value"], traces["off"].nodes["_RETURN"]["value"])


# --------------------------------------------------------------------------- devices
@pytest.mark.cuda
@pytest.mark.parametrize("transform_mode", ["weights", "inputs"])
def test_cuda_forward_matches_cpu(transform_mode):
    cpu = make_model("cpu", transform_mode=transform_mode)
    gpu = InvariantNet(cpu.config, num_data=N).to("cuda")
    data = {**weights_for(cpu), "eps": torch.rand(S, K) * 2 - 1}
    x, y = batch("cpu")
    out_cpu = poutine.condition(cpu, data=data)(x, y)
    out_gpu = poutine.condition(gpu, data={k: v.cuda() for k, v in data.items()})(x.cuda(), y.cuda())
    assert out_gpu.device.type == "cuda"
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)
    guide = make_guide(gpu, "hybrid")
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss(gpu, guide, x.cuda(), y.cuda())
    assert math.isfinite(loss)
