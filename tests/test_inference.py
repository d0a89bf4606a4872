"""SVI loop pieces and evaluation: per-parameter learning rates, minibatches, fit, predictive, ELBO scaling."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from guides import make_guide
from inference import evaluate
from inference.data import Split
from inference.draws import draw_posterior
from inference.eta_objectives import eta_dict
from inference.evaluate import (
    accuracy_and_nll,
    average_draws,
    elbo_estimate,
    elbo_per_example,
    elbo_terms,
    predictive_draws,
    predictive_log_probs,
)
from inference.optim import named_params
from inference.svi import TrainConfig, fit, make_elbo, make_optimizer, minibatches, svi_step
from models import GENERATOR_NAMES, InvariantNet, ModelConfig
from tests.conftest import priors_for

IMAGE = (1, 5, 5)


def tiny(device, n: int = 12, **overrides):
    kwargs = dict(image_shape=IMAGE, hidden=6, num_transforms=2)
    kwargs.update(overrides)
    model = InvariantNet(ModelConfig(**kwargs), num_data=n).to(device)
    data = Split(torch.rand(n, *IMAGE, device=device), torch.arange(n, device=device) % 10)
    return model, data


def param_lrs(optim) -> dict[str, float]:
    return {name: optim.lr(name) for name in optim.optimizers}


@pytest.mark.parametrize("cosine", [False, True])
def test_optimizer_gives_eta_its_own_learning_rate(device, cosine):
    model, data = tiny(device)
    guide = make_guide(model, "hybrid")
    cfg = TrainConfig(num_steps=4, batch_size=4, lr=1e-3, eta_lr=5e-2, cosine=cosine, log_every=2)
    optim = make_optimizer(cfg)
    svi_step(make_elbo(cfg), model, guide, optim, data.x[:4], data.y[:4])
    lrs = param_lrs(optim)
    assert lrs.pop("eta") == pytest.approx(5e-2)
    assert lrs and all(lr == pytest.approx(1e-3) for lr in lrs.values())


def test_a_step_keeps_a_learned_eta_rotate_at_most_pi(device):
    """Past pi the bound is flat in eta_rotate (a full turn either way); svi_step projects eta back onto
    eta_rotate <= pi, so a push upwards leaves it at pi instead of growing without end, while the uncapped
    generators keep moving, and a push downwards moves eta_rotate off the cap (it is not stuck there)."""
    torch.manual_seed(0)
    model, data = tiny(device, eta_init=3.0, generators=("rotate", "shear"))
    optim = make_optimizer(TrainConfig(num_steps=10, batch_size=4, lr=1e-3, eta_lr=0.2))

    def push(sign: float):
        def objective(model, guide, x, y):
            model(x, y)  # records the param site "eta"
            return sign * model.eta_effective.sum()
        return objective

    for _ in range(10):
        svi_step(push(-1.0), model, lambda x, y: None, optim, data.x[:4], data.y[:4])
    eta = dict(zip(model.generator_names, model.eta.detach().tolist(), strict=True))
    assert eta["rotate"] == pytest.approx(math.pi, rel=1e-6) and eta["rotate"] <= math.pi * (1 + 1e-6)
    assert eta["shear"] > 2 * math.pi  # the same steps, uncapped
    for _ in range(10):  # once Adam's momentum has turned
        svi_step(push(1.0), model, lambda x, y: None, optim, data.x[:4], data.y[:4])
    assert model.eta[GENERATOR_NAMES.index("rotate")].item() < math.pi * (1 - 1e-3)


def test_fit_records_losses_and_eta_history(device):
    model, data = tiny(device)
    guide = make_guide(model, "hybrid")
    cfg = TrainConfig(num_steps=5, batch_size=4, log_every=2, num_particles=2)
    calls = []
    result = fit(model, guide, data, cfg, callback=lambda step, loss: calls.append(step), progress=False)
    assert len(result.losses) == 5 and all(math.isfinite(v) for v in result.losses)
    assert calls == [1, 2, 3, 4, 5]
    assert [h["step"] for h in result.eta_history] == [1, 2, 4, 5]
    assert set(result.eta_history[-1]) == {"step", *GENERATOR_NAMES}
    assert result.eta_history[-1] == {"step": 5, **eta_dict(model)}
    assert result.eta_history[0]["rotate"] != result.eta_history[-1]["rotate"]  # eta is learned
    assert result.seconds > 0
    assert [h["step"] for h in result.elbo_history] == [1, 2, 4, 5]
    for row in result.elbo_history:
        assert set(row) == {"step", "elbo", "expected_loglik", "kl"}
        assert row["elbo"] == pytest.approx(row["expected_loglik"] - row["kl"], abs=1e-9)
        assert row["expected_loglik"] < 0 < row["kl"]


def test_recording_the_elbo_terms_leaves_the_training_unchanged(device):
    """The terms are drawn with random numbers of their own: logging every step or almost never trains the same."""
    runs = []
    for log_every in (1, 100):
        pyro.set_rng_seed(0)
        model, data = tiny(device)
        guide = make_guide(model, "hybrid")
        result = fit(model, guide, data, TrainConfig(num_steps=6, batch_size=4, log_every=log_every), progress=False)
        runs.append((result, {k: v.detach().clone() for k, v in named_params(model, guide).items()}))
    (every, params_every), (rarely, params_rarely) = runs
    assert len(every.elbo_history) == 6 and len(rarely.elbo_history) == 2
    assert every.losses == rarely.losses
    assert all(torch.equal(params_every[k], params_rarely[k]) for k in params_every)
    assert every.elbo_history[-1] == rarely.elbo_history[-1]  # the same draw at the same step


def test_recorded_terms_of_a_deterministic_model_are_its_exact_minibatch_objective(device):
    """Maximum likelihood without transformations: no randomness, no KL; the recorded ELBO is the log-likelihood
    of the step's minibatch scaled to N, the same number Trace_ELBO gives after the step."""
    model, data = tiny(device, generators=(), first_layer_prior=False, output_layer_prior=False)
    guide = make_guide(model, "ml")
    cfg = TrainConfig(num_steps=3, batch_size=4, log_every=1)
    result = fit(model, guide, data, cfg, progress=False)
    batches = minibatches(len(data), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    for row in result.elbo_history:
        idx = next(batches).to(device)
        assert row["kl"] == 0.0
    exact = -make_elbo(cfg).loss(model, guide, data.x[idx], data.y[idx]) / len(data)
    assert result.elbo_history[-1]["elbo"] == pytest.approx(exact, rel=1e-6)


def test_cosine_schedule_reaches_zero_after_num_steps(device):
    model, data = tiny(device)
    guide = make_guide(model, "meanfield")
    cfg = TrainConfig(num_steps=4, batch_size=6, cosine=True)
    optim = make_optimizer(cfg)
    for _ in range(cfg.num_steps):
        svi_step(make_elbo(cfg), model, guide, optim, data.x[:6], data.y[:6])
        optim.schedule_step()
    assert all(lr == pytest.approx(0.0, abs=1e-12) for lr in param_lrs(optim).values())


def test_fit_rejects_num_data_mismatch(device):
    model, data = tiny(device, n=12)
    with pytest.raises(ValueError, match="model.num_data = 12 but the training set has 8"):
        fit(model, make_guide(model), Split(data.x[:8], data.y[:8]), TrainConfig(num_steps=1), progress=False)


def test_minibatches_are_epoch_permutations():
    gen = torch.Generator().manual_seed(0)
    stream = minibatches(10, 4, gen)
    epoch = [next(stream) for _ in range(2)]  # 10 // 4 = 2 full batches, the last 2 dropped
    assert all(b.shape == (4,) for b in epoch)
    assert len(torch.unique(torch.cat(epoch))) == 8
    big = next(minibatches(5, 64, gen))  # batch larger than the data: one batch of everything
    assert sorted(big.tolist()) == [0, 1, 2, 3, 4]


def test_train_config_validation():
    for field in ("num_steps", "batch_size", "num_particles", "log_every"):
        with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
            TrainConfig(**{field: 0})
    with pytest.raises(ValueError, match="eta_lr must be > 0"):
        TrainConfig(eta_lr=0.0)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_predictive_log_probs_are_normalised(device, num_samples):
    model, data = tiny(device)
    guide = make_guide(model, "hybrid")
    guide(data.x, data.y)
    log_p = predictive_log_probs(model, guide, data.x, num_samples=num_samples, num_transforms=5, batch_size=5)
    assert log_p.shape == (12, 10) and not log_p.requires_grad
    torch.testing.assert_close(torch.logsumexp(log_p, -1), torch.zeros(12, device=device), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        predictive_log_probs(model, guide, data.x, num_samples=0)


def test_predictive_draws_average_to_the_posterior_predictive_and_draw_0_is_the_one_draw_evaluation(device):
    """Reference: the M-draw predictive is log (1/M) sum_m p_m of the per-draw predictives, and under the same
    seed the first draw is exactly what a one-draw evaluation gives (batch by batch)."""
    model, data = tiny(device)
    guide = make_guide(model, "normal")
    guide(data.x, data.y)
    pyro.set_rng_seed(7)
    draws = predictive_draws(model, guide, data.x, num_samples=4, num_transforms=3, batch_size=5)
    pyro.set_rng_seed(7)
    one = predictive_log_probs(model, guide, data.x, num_samples=1, num_transforms=3, batch_size=5)
    assert draws.shape == (4, 12, 10)
    torch.testing.assert_close(draws[0], one, rtol=0, atol=0)
    assert not torch.allclose(draws[0], draws[1])  # different weight draws
    want = torch.log(draws.exp().mean(0))
    torch.testing.assert_close(average_draws(draws), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["normal", "hybrid", "paper", "lowrank", "map"])
def test_predictive_draws_apply_each_guide_draw_to_every_example(device, kind, monkeypatch):
    """Reference: slice m is the model's own forward pass over all N examples at once, conditioned on the m-th
    draw of the guide (one theta and one eps per draw, whatever the batch size; draws taken in chunks)."""
    first, output = priors_for(kind)
    model, data = tiny(device, first_layer_prior=first, output_layer_prior=output)
    guide = make_guide(model, kind)
    guide(data.x, data.y)
    monkeypatch.setattr(evaluate, "DRAW_CHUNK", 2)  # M = 3 draws: chunks of 2 and 1
    pyro.set_rng_seed(3)
    got = predictive_draws(model, guide, data.x, num_samples=3, num_transforms=4, batch_size=5)
    pyro.set_rng_seed(3)
    chunks = [draw_posterior(model, guide, 2, num_transforms=4), draw_posterior(model, guide, 1, num_transforms=4)]
    values = [chunk.draw(m) for chunk in chunks for m in range(chunk.num_draws)]
    assert got.shape == (3, 12, 10)
    for m, theta in enumerate(values):
        want = pyro.poutine.condition(model, data=theta)(data.x, None, 4)  # (N, classes)
        torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-6)
    pyro.set_rng_seed(3)
    whole = predictive_draws(model, guide, data.x, num_samples=3, num_transforms=4, batch_size=12)
    torch.testing.assert_close(whole, got, rtol=1e-5, atol=1e-6)


def test_accuracy_and_nll_exact():
    log_p = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))
    y = torch.tensor([0, 1, 0, 2])
    acc, nll = accuracy_and_nll(log_p, y)
    assert acc == pytest.approx(0.75)
    assert nll == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.6)) / 4)


def test_elbo_per_example_counts_kl_once_and_every_example_once(device):
    """With a point-mass guide and no active generator the ELBO is deterministic:
    ELBO = log p(theta) + sum_n log p(y_n | x_n, theta), whatever the evaluation batch size."""
    model, data = tiny(device, n=12, generators=())
    theta = {name: 0.5 * torch.randn(shape, device=device) for name, shape in model.weight_shapes().items()}

    def delta_guide(x, y=None, num_transforms=None):
        for name, value in theta.items():
            pyro.sample(name, dist.Delta(value, event_dim=value.dim()))
        pyro.sample("eps", model.eps_prior(int(num_transforms or model.config.num_transforms)))

    log_prior = sum(p.log_prob(theta[n]) for n, p in model.weight_priors().items())
    log_lik = pyro.poutine.condition(model, data={**theta, "eps": torch.zeros(2, 6, device=device)})(data.x, data.y)
    log_lik = log_lik.gather(1, data.y[:, None]).sum()
    expected = ((log_prior + log_lik) / len(data)).item()
    cfg = TrainConfig()
    for batch_size in (12, 5, 1):
        value = elbo_per_example(model, delta_guide, data, cfg, batch_size=batch_size)
        assert value == pytest.approx(expected, rel=1e-5), batch_size



def test_elbo_estimate_reports_the_monte_carlo_error(device):
    """Passes are independent draws: the mean is their average, the standard error is std / sqrt(passes)
    and the terms add up to the mean; a deterministic objective (point-mass guide, no generator) has
    standard error exactly 0."""
    model, data = tiny(device, n=12)
    guide = make_guide(model, "hybrid")
    guide(data.x, data.y)
    cfg = TrainConfig()
    pyro.set_rng_seed(3)
    passes = torch.tensor([elbo_per_example(model, guide, data, cfg, batch_size=5) for _ in range(4)],
                          dtype=torch.float64)
    pyro.set_rng_seed(3)
    est = elbo_estimate(model, guide, data, num_passes=4, batch_size=5)
    assert est.mean == pytest.approx(passes.mean().item(), rel=1e-5)
    assert est.stderr == pytest.approx(passes.std().item() / 2, rel=1e-3) and est.stderr > 0
    assert est.expected_loglik - est.kl == pytest.approx(est.mean, rel=1e-9)
    assert elbo_estimate(model, guide, data, num_passes=1).stderr == 0.0
    with pytest.raises(ValueError, match="num_passes"):
        elbo_estimate(model, guide, data, num_passes=0)

    point, _ = tiny(device, n=12, generators=())
    delta = make_guide(point, "map")
    delta(data.x, data.y)
    est = elbo_estimate(point, delta, data, num_passes=3)
    assert est.stderr == 0.0 and est.mean == pytest.approx(elbo_per_example(point, delta, data, cfg), rel=1e-6)


@pytest.mark.parametrize("kind", ["hybrid", "normal", "map", "ml"])
def test_elbo_terms_add_up_to_the_elbo(device, kind):
    """loglik - KL is Trace_ELBO's estimate under the same random numbers; KL >= 0 for a Gaussian guide
    (in expectation; here far from 0), and exactly 0 without priors (maximum likelihood)."""
    first, output = priors_for(kind)
    model, data = tiny(device, n=12, first_layer_prior=first, output_layer_prior=output)
    guide = make_guide(model, kind)
    guide(data.x, data.y)
    cfg = TrainConfig()
    pyro.set_rng_seed(5)
    elbo = elbo_per_example(model, guide, data, cfg, batch_size=5)
    pyro.set_rng_seed(5)
    loglik, kl = elbo_terms(model, guide, data, batch_size=5)
    assert loglik - kl == pytest.approx(elbo, rel=1e-5, abs=1e-6)
    assert loglik < 0
    if kind == "ml":
        assert kl == 0.0
    elif kind != "map":
        assert kl > 0

def test_full_bayes_eta_is_read_from_the_guide():
    """Under full Bayes eta is latent: eta_dict reads q(eta) (median of draws) and leaves the RNG untouched."""
    model = InvariantNet(ModelConfig(image_shape=(1, 5, 5), hidden=4, num_transforms=2, eta_prior="uniform",
                                     generators=("rotate",)), num_data=10)
    guide = make_guide(model, "normal")
    with pytest.raises(ValueError, match="pass the guide"):
        eta_dict(model)
    state = torch.get_rng_state()
    eta = eta_dict(model, guide)
    assert torch.equal(state, torch.get_rng_state())
    assert 0 < eta["rotate"] < math.pi and all(eta[g] == 0 for g in eta if g != "rotate")


def test_two_models_in_one_process_keep_their_own_parameters(device):
    """Parameters live in their modules: training a second model (same names, same seed) leaves the first
    model's eta and guide untouched, and each ends where it would have ended alone."""
    def trained(seed: int, steps: int):
        pyro.set_rng_seed(seed)
        model, data = tiny(device)
        guide = make_guide(model, "hybrid")
        fit(model, guide, data, TrainConfig(num_steps=steps, batch_size=4, eta_lr=0.1), progress=False)
        return model, guide

    alone_model, alone_guide = trained(0, 6)
    alone = {k: v.detach().clone() for k, v in named_params(alone_model, alone_guide).items()}
    first_model, first_guide = trained(0, 6)
    second_model, second_guide = trained(1, 3)  # same parameter names, another trajectory
    first = named_params(first_model, first_guide)
    second = named_params(second_model, second_guide)
    assert first.keys() == second.keys() == alone.keys()
    for name in first:
        assert first[name] is not second[name]
        torch.testing.assert_close(first[name].detach(), alone[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(first_model.eta_effective, second_model.eta_effective)
