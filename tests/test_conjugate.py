"""Exact answers for inference: the conjugate case and unbiased minibatching.

With eta = 0 (no generators), a fixed random-Fourier-feature first layer and a Gaussian likelihood
with known noise, the model is Bayesian linear regression on fixed features phi(x) = [h(x), 1]:

    w_c ~ N(0, alpha^2 I),  y_c | X ~ N(Phi w_c, sigma^2 I),   c = 1..outputs

    posterior precision  Lambda = Phi^T Phi / sigma^2 + I / alpha^2
    posterior mean       m_c    = Lambda^-1 Phi^T y_c / sigma^2
    log evidence         log Z  = sum_c log N(y_c | 0, alpha^2 Phi Phi^T + sigma^2 I)

The mean-field optimum for a Gaussian target has means m_c and variances 1 / diag(Lambda), and
its ELBO falls short of log Z by KL(q || posterior) = outputs * (sum_i log Lambda_ii - log det Lambda) / 2.
At the exact posterior the ELBO is log Z for every draw (log p(y, w) - log q(w) is constant).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from guides import make_guide
from models import InvariantNet, ModelConfig

IMAGE, D, OUT, N, ALPHA, SIGMA = (1, 3, 3), 5, 2, 40, 1.0, 0.5


def conjugate_problem():
    cfg = ModelConfig(image_shape=IMAGE, hidden=D, first_layer="rff", generators=(), learn_eta=False,
                      likelihood="gaussian", num_classes=OUT, noise_scale=SIGMA, prior_scale=ALPHA, num_transforms=1)
    model = InvariantNet(cfg, num_data=N).double()
    x = torch.rand(N, *IMAGE, dtype=torch.float64)
    h = math.sqrt(2.0 / D) * torch.cos(x.reshape(N, -1) @ model.W1.T + model.b1)
    phi = torch.cat([h, torch.ones(N, 1, dtype=torch.float64)], 1)  # (N, D + 1)
    w_true = torch.randn(D + 1, OUT, dtype=torch.float64) * ALPHA
    y = phi @ w_true + SIGMA * torch.randn(N, OUT, dtype=torch.float64)
    precision = phi.T @ phi / SIGMA**2 + torch.eye(D + 1, dtype=torch.float64) / ALPHA**2
    mean = torch.linalg.solve(precision, phi.T @ y) / SIGMA**2  # (D + 1, OUT)
    cov_y = ALPHA**2 * phi @ phi.T + SIGMA**2 * torch.eye(N, dtype=torch.float64)
    log_z = sum(torch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov_y).log_prob(y[:, c])
                for c in range(OUT))
    return model, x, y, precision, mean, float(log_z)


def fit_guide(model, guide, x, y, steps=2500):
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.9985})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(steps):
        svi.step(x, y)


def exact_elbo(model, guide, x, y, particles=20000):
    return -Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x, y)


@pytest.mark.slow
def test_mean_field_guide_reaches_the_mean_field_optimum():
    model, x, y, precision, mean, log_z = conjugate_problem()
    guide = make_guide(model, "meanfield", init_scale=0.1)
    fit_guide(model, guide, x, y)
    locs_W2, locs_b2 = guide.locs.W2.detach(), guide.locs.b2.detach()  # (OUT, D), (OUT,)
    q_mean = torch.cat([locs_W2.T, locs_b2[None]], 0)  # (D + 1, OUT), the layout of `mean`
    q_std = torch.cat([guide.scales.W2.detach().T, guide.scales.b2.detach()[None]], 0)
    torch.testing.assert_close(q_mean, mean, atol=0.05, rtol=0)  # means = exact posterior means
    expected_std = (1.0 / torch.diag(precision)).sqrt()[:, None].expand(-1, OUT)  # 1 / diag(Lambda)
    torch.testing.assert_close(q_std, expected_std, rtol=0.05, atol=0)
    # ELBO = log Z - KL(q || posterior), the KL in closed form for the mean-field optimum
    gap = OUT * 0.5 * (torch.log(torch.diag(precision)).sum() - torch.logdet(precision)).item()
    assert exact_elbo(model, guide, x, y) == pytest.approx(log_z - gap, abs=0.05)
    assert gap > 0.1  # the test discriminates: mean field is visibly below the evidence here


def test_elbo_at_the_exact_posterior_is_the_log_evidence():
    """q = the exact posterior makes log p(y, w) - log q(w) = log Z for every draw: the ELBO estimator is exact."""
    model, x, y, precision, mean, log_z = conjugate_problem()

    def exact_posterior(x, y=None, num_transforms=None):
        q = dist.MultivariateNormal(mean.T, precision_matrix=precision).to_event(1)  # (OUT, D + 1)
        w = pyro.sample("w", q, infer={"is_auxiliary": True})
        pyro.sample("W2", dist.Delta(w[..., :D], event_dim=2))
        pyro.sample("b2", dist.Delta(w[..., D], event_dim=1))
        pyro.sample("eps", model.eps_prior(1))

    for particles in (1, 7):
        assert exact_elbo(model, exact_posterior, x, y, particles) == pytest.approx(log_z, abs=1e-8)


def test_minibatch_elbos_average_to_the_full_batch_elbo():
    """E over minibatches of the N/B-scaled minibatch ELBO = the full-batch ELBO (exact over a partition)."""
    model, x, y, *_ = conjugate_problem()
    guide = make_guide(model, "map")  # deterministic guide: the only randomness is the minibatch
    elbo = Trace_ELBO(max_plate_nesting=1)
    full = elbo.loss(model, guide, x, y)
    perm = torch.randperm(N)
    parts = [elbo.loss(model, guide, x[idx], y[idx]) for idx in perm.split(8)]  # 5 minibatches of B = 8
    assert sum(parts) / len(parts) == pytest.approx(full, rel=1e-10)
