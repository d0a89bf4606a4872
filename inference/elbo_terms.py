"""The ELBO's two terms from one draw: the expected log-likelihood and the KL (the paper's Eq. 6).

    ELBO = E_q[log p(y | x, theta, eta)] - KL(q(theta) || p(theta)),

estimated, like Pyro's ``Trace_ELBO`` with one particle, from one draw of theta (and eps) from the guide: the
model's log-likelihood of ``y`` under that draw (scaled to the whole data set by the model's ``data`` plate
when ``x`` is a minibatch) and log q(theta) - log p(theta) over every latent site. eps cancels (q(eps) =
p(eps)); a point estimate contributes -log p(theta), a parameter without a prior nothing.

:func:`trace_terms` is shared by training (:func:`inference.svi.fit` records the terms at every logged step) and
evaluation (:func:`inference.evaluate.elbo_terms` sums them over a pass through the training set).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine


@torch.no_grad()
def trace_terms(model: Callable, guide: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(log-likelihood, log q - log p)`` of one draw theta ~ q on the batch ``x (B, C, H, W)``, ``y (B,)``.

    The log-likelihood is the model's ``obs`` site, scaled by its plate (N / B for a minibatch of a data set
    of N); both are sums, not per example: ``(loglik - kl) / N`` is one draw's ELBO / N.
    """
    guide_trace = poutine.trace(guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    loglik = model_trace.nodes["obs"]["log_prob_sum"].item()
    return loglik, _latent_log_prob(guide_trace) - _latent_log_prob(model_trace)


def _latent_log_prob(trace: poutine.Trace) -> float:
    return sum(site["log_prob_sum"].item() for site in trace.nodes.values()
               if site["type"] == "sample" and not site["is_observed"])


def logged_terms(model: Callable, guide: Callable, x: torch.Tensor, y: torch.Tensor, num_data: int) -> dict[str, float]:
    """One draw's ELBO / N and its terms on a minibatch, ``{"elbo", "expected_loglik", "kl"}`` per example, drawn
    with random numbers of their own: the global random stream (and so the training it serves) is untouched."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loglik, kl = trace_terms(model, guide, x, y)
    return {"elbo": (loglik - kl) / num_data, "expected_loglik": loglik / num_data, "kl": kl / num_data}
