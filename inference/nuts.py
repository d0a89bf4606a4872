"""The NUTS reference posterior of a small model: the output layer of a fixed random-feature network.

A Bayesian multinomial regression on fixed features is the one setting here where an exact-in-the-limit
posterior is cheap: :func:`output_layer_potential` computes the features once and gives NUTS a potential that
costs one matrix product per call; :func:`run_nuts` runs the chains one after another on one thread. The
samples go into an ``arviz.InferenceData`` in :func:`inference.diagnostics.nuts_reference`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

from models.config import FirstLayer
from models.network import InvariantNet
from models.priors import EtaPrior
from models.transforms import NUM_GENERATORS


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after).

    NUTS on a small model does thousands of tiny tensor operations; a second thread only adds
    synchronisation, and on a busy machine it made the reference several times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def output_layer_potential(
    model: InvariantNet, x: torch.Tensor, y: torch.Tensor
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """-log p(y, W2, b2) of a model whose only latent sites are the output layer's.

    For a fixed first layer (RFF) and no active generator, the hidden features phi(x) do not depend
    on any latent variable: they are computed once, by the model's own forward pass with an identity
    output layer, and the potential costs one small matrix product per call instead of a Pyro trace
    (the NUTS reference then runs tens of times faster). ``tests/test_diagnostics.py`` checks it
    against the log joint of the Pyro trace.

    Returns
    -------
    callable
        ``potential({"W2": (classes, D), "b2": (classes,)}) -> scalar``.
    """
    cfg = model.config
    if cfg.first_layer is not FirstLayer.RFF or model.has_transforms or cfg.eta_prior is not EtaPrior.NONE:
        raise ValueError("the NUTS reference needs a fixed (RFF) first layer and no active generator")
    if not cfg.output_layer_prior or cfg.prior.value == "hierarchical":
        raise ValueError("the NUTS reference needs the plain output-layer prior (not hierarchical, not masked)")
    D = cfg.hidden
    eye, zero = torch.eye(D, dtype=x.dtype)[None], torch.zeros(1, D, dtype=x.dtype)
    eps = torch.zeros(1, 1, NUM_GENERATORS, dtype=x.dtype)
    with torch.no_grad():
        h = model.transformed_logits(x, model.W1[None], model.b1[None], eye, zero, eps)[0, 0]  # (N, D)
    priors = model.weight_priors()
    scale = model.num_data / x.shape[0]  # the data plate's N / B, as in the model

    def potential(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        W2, b2 = params["W2"], params["b2"]
        f = (h @ W2.T + b2).unsqueeze(0)  # (S' = 1, N, outputs)
        log_lik = model.likelihood.combine(f)[1].log_prob(y).sum()
        return -(scale * log_lik + priors["W2"].log_prob(W2) + priors["b2"].log_prob(b2))

    return potential


def run_nuts(
    model: InvariantNet, x: torch.Tensor, y: torch.Tensor, num_warmup: int, num_samples: int, num_chains: int,
    seed: int, max_tree_depth: int, init_scale: float,
) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """NUTS chains over (W2, b2), one after another on one thread, each with its own seed and an over-dispersed
    start ``U(-init_scale, init_scale)``.

    Returns
    -------
    (dict, np.ndarray, float)
        ``name -> (chain, draw, *event)`` samples, ``diverging (chain, draw)`` and the seconds taken.
    """
    start = time.perf_counter()
    with single_thread():
        potential = output_layer_potential(model, x, y)
        shapes = {name: shape for name, shape in model.weight_shapes().items() if name in ("W2", "b2")}
        chains: dict[str, list[np.ndarray]] = {name: [] for name in shapes}
        diverging = np.zeros((num_chains, num_samples), dtype=bool)
        for c in range(num_chains):
            gen = torch.Generator().manual_seed(seed + 1000 * c)
            init = {n: (torch.rand(shape, generator=gen, dtype=x.dtype) * 2 - 1) * init_scale
                    for n, shape in shapes.items()}
            pyro.set_rng_seed(seed + 1000 * c)
            kernel = NUTS(potential_fn=potential, max_tree_depth=max_tree_depth)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=1, initial_params=init,
                        disable_progbar=True)
            mcmc.run()
            samples = mcmc.get_samples()
            for name in shapes:
                chains[name].append(samples[name].detach().cpu().numpy())
            diverging[c, mcmc.diagnostics()["divergences"]["chain 0"]] = True
    return {name: np.stack(v) for name, v in chains.items()}, diverging, time.perf_counter() - start
