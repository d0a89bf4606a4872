"""The NUTS reference posterior of a small model, the output layer of a fixed random-feature network, and a guide
beside it.

A Bayesian multinomial regression on fixed features is the one setting here where an exact-in-the-limit
posterior is cheap: :func:`output_layer_potential` computes the features once, so a NUTS step costs a few matrix
products; :func:`nuts_reference` runs the chains one after another on one thread into an ``InferenceData``;
:func:`compare_with_reference` puts the guide's moments beside NUTS's. :func:`reference_model`,
:func:`reference_data` and :func:`fit_reference_guide` make the problem.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

from guides.factory import make_guide
from inference.data import DataConfig, Split, load_datasets
from inference.diagnostics.arviz_io import SITE_DIMS, VI_NOTE, Recorded, az, coords_of, to_numpy
from inference.draws import draw_posterior
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
    """-log p(y, W2, b2) of a model whose only latent sites are the output layer's (fixed RFF first layer, no
    active generator).

    The hidden features phi(x) depend on no latent variable: the model's own forward pass with an identity
    output layer computes them once, and the potential is one small matrix product per call instead of a Pyro
    trace (tens of times faster). ``tests/test_diagnostics.py`` checks it against the Pyro trace's log joint.

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


def nuts_reference(
    model: InvariantNet, x: torch.Tensor, y: torch.Tensor, num_warmup: int = 300, num_samples: int = 300,
    num_chains: int = 2, seed: int = 0, max_tree_depth: int = 8, init_scale: float = 2.0,
) -> az.InferenceData:
    """NUTS over (W2, b2) of a small model (see :func:`output_layer_potential`), as an InferenceData.

    Parameters
    ----------
    x, y : torch.Tensor
        ``(N, C, H, W)`` and ``(N,)``; the model's ``num_data`` should be N.
    num_chains : int
        Chains run one after another on one thread, each with its own seed and an over-dispersed start
        ``U(-init_scale, init_scale)``.

    Returns
    -------
    arviz.InferenceData
        ``posterior`` ``(chain, draw, ...)`` with named dims, ``sample_stats.diverging``; attrs hold the seconds.
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
            mcmc = MCMC(NUTS(potential_fn=potential, max_tree_depth=max_tree_depth), num_samples=num_samples,
                        warmup_steps=num_warmup, num_chains=1, initial_params=init, disable_progbar=True)
            mcmc.run()
            for name, value in mcmc.get_samples().items():
                chains[name].append(to_numpy(value))
            diverging[c, mcmc.diagnostics()["divergences"]["chain 0"]] = True
    posterior = {name: np.stack(v) for name, v in chains.items()}
    return az.from_dict(posterior=posterior, sample_stats={"diverging": diverging},
                        coords=coords_of(model, x.shape[0]), dims={n: list(SITE_DIMS[n]) for n in posterior},
                        attrs={"inference": "NUTS (pyro.infer.MCMC), chains run sequentially",
                               "num_warmup": num_warmup, "seconds": round(time.perf_counter() - start, 2)})


def reference_summary(idata: az.InferenceData, var_names: Sequence[str] | None = None) -> Any:
    """``az.summary`` (mean, sd, HDI, R-hat, ESS bulk/tail) of an MCMC posterior, as a DataFrame."""
    return az.summary(idata, var_names=list(var_names) if var_names else None)


def summary_rhat_ess(idata: az.InferenceData, var_names: Sequence[str] | None = None) -> dict[str, float]:
    """Worst R-hat and smallest bulk / tail ESS over the parameters of an MCMC posterior."""
    table = reference_summary(idata, var_names)
    return {"max_rhat": float(table["r_hat"].max()), "min_ess_bulk": float(table["ess_bulk"].min()),
            "min_ess_tail": float(table["ess_tail"].min()), "num_parameters": int(len(table))}


def num_divergences(idata: az.InferenceData) -> int:
    """Divergent transitions after warm-up."""
    return int(idata.sample_stats["diverging"].values.sum())


def guide_draws_to_inference_data(
    model: InvariantNet, guide: Callable, num_draws: int = 1000, sites: Sequence[str] = ("W2", "b2")
) -> az.InferenceData:
    """Draws of ``sites`` from the guide as a one-chain ``posterior`` (for comparing moments, not R-hat)."""
    draws = draw_posterior(model, guide, num_draws, 1)
    posterior = {n: to_numpy(draws.leading(n).expand(num_draws, *draws.leading(n).shape[1:]))[None] for n in sites}
    idata = az.from_dict(posterior=posterior, coords=coords_of(model, 1), dims={n: list(SITE_DIMS[n]) for n in sites})
    idata.posterior.attrs["inference"] = VI_NOTE
    return idata


def compare_with_reference(reference: az.InferenceData, approx: az.InferenceData) -> Any:
    """Posterior means and standard deviations of the reference (NUTS) and the guide, per parameter.

    Returns
    -------
    pandas.DataFrame
        Index: parameter (``W2[0, 3]``...); columns ``nuts_mean``, ``nuts_sd``, ``guide_mean``, ``guide_sd``,
        ``z`` = (guide_mean - nuts_mean) / nuts_sd, ``sd_ratio`` = guide_sd / nuts_sd.
    """
    ref = az.summary(reference, kind="stats", stat_focus="mean")[["mean", "sd"]]
    with Recorded():  # one chain: ArviZ may warn about R-hat, which is not asked for here
        app = az.summary(approx, kind="stats", stat_focus="mean")[["mean", "sd"]]
    table = ref.rename(columns={"mean": "nuts_mean", "sd": "nuts_sd"}).join(
        app.rename(columns={"mean": "guide_mean", "sd": "guide_sd"}), how="inner")
    table["z"] = (table["guide_mean"] - table["nuts_mean"]) / table["nuts_sd"]
    table["sd_ratio"] = table["guide_sd"] / table["nuts_sd"]
    return table


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
