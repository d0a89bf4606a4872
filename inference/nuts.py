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

from guides.factory import make_guide
from inference.data import DataConfig, Split, load_datasets
from inference.svi import TrainConfig, fit
from models.config import FirstLayer, ModelConfig
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


# --------------------------------------------------------------------------- the reference problem
REFERENCE_CLASSES = (0, 1, 2)


def reference_model(num_data: int, hidden: int = 6, num_classes: int = 3, image_size: int = 7,
                    seed: int = 0) -> InvariantNet:
    """A small Bayesian classifier: fixed RFF first layer, no transformations, latent W2 ``(classes, hidden)``, b2."""
    pyro.set_rng_seed(seed)  # draws the fixed RFF features
    cfg = ModelConfig(image_shape=(1, image_size, image_size), hidden=hidden, first_layer="rff", generators=(),
                      learn_eta=False, num_classes=num_classes, num_transforms=1, rff_scale=3.0)
    return InvariantNet(cfg, num_data=num_data)


def reference_data(data_dir: str | None, num_data: int = 60, image_size: int = 7, synthetic: bool = False,
                   seed: int = 0) -> Split:
    """``num_data`` digits of classes 0-2 average-pooled to ``image_size`` pixels (or synthetic images)."""
    if synthetic:
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(num_data) % len(REFERENCE_CLASSES)
        centres = torch.rand(len(REFERENCE_CLASSES), 1, image_size, image_size, generator=gen)
        x = (centres[y] + 0.3 * torch.rand(num_data, 1, image_size, image_size, generator=gen)).clamp(0, 1)
        return Split(x, y)
    data = load_datasets(DataConfig(dataset="mnist", data_dir=data_dir, train_size=None, test_size=10, data_seed=seed))
    keep = torch.isin(data.train.y, torch.tensor(REFERENCE_CLASSES))
    x, y = data.train.x[keep], data.train.y[keep]
    per_class = num_data // len(REFERENCE_CLASSES)
    idx = torch.cat([torch.nonzero(y == c).squeeze(1)[:per_class] for c in REFERENCE_CLASSES])
    pooled = torch.nn.functional.adaptive_avg_pool2d(x[idx], image_size)
    return Split(pooled / pooled.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6), y[idx])


def fit_reference_guide(model: InvariantNet, data: Split, steps: int = 1500, seed: int = 0) -> Callable:
    """A mean-field Gaussian guide (``normal``) fitted by SVI to the whole of ``data``."""
    pyro.set_rng_seed(seed)
    guide = make_guide(model, "normal", init_scale=0.1, init_loc="median")
    cfg = TrainConfig(num_steps=steps, batch_size=len(data), lr=0.02, num_particles=8, log_every=steps, seed=seed)
    with single_thread():
        fit(model, guide, data, cfg, progress=False)
    return guide
