"""Posterior diagnostics through ArviZ: the one module of the project that imports ``arviz``.

Keeping every ArviZ call here keeps a move to ArviZ 1.x local. What it does:

* :func:`to_inference_data`: a fitted model + guide as an ``arviz.InferenceData`` with the groups
  ``posterior`` (guide draws from ``pyro.infer.Predictive``, eps included; dims ``hidden``, ``pixel``,
  ``class``, ``generator``, ``transform``), ``posterior_predictive``, ``log_likelihood`` (per test example),
  ``observed_data``, ``predictions`` (class log-probabilities per draw, for calibration), ``constant_data``
  (the true extent of the data's transformations), and three groups of its own:
  ``point_estimates`` (sites the guide point-estimates, e.g. the hybrid guide's W1, and eta under
  empirical Bayes), ``posterior_moments`` (mean and std of a site too large to keep every draw of) and
  ``training`` (eta's trajectory and the ELBO per step). :func:`save_inference_data` /
  :func:`load_inference_data` write and read it as netCDF.
* :func:`loo_summary`, :func:`waic_summary`, :func:`compare_models`: PSIS-LOO / WAIC and model comparison
  with Pareto-k counts.
* :func:`guide_khat`: the PSIS k-hat of the guide against the model's joint.
* :func:`nuts_reference`, :func:`reference_summary`, :func:`compare_with_reference`: a NUTS reference
  posterior for a small model (R-hat, ESS) and the guide's moments beside it.
* :func:`plot_forest`, :func:`plot_posterior`, :func:`plot_trace`: ArviZ's plots, for :mod:`inference.plots`.

Honesty notes, also written into the attributes of the groups:

* The draws are independent draws from the variational distribution q, stored as one chain. R-hat and
  ESS of them say nothing about convergence and are not reported; k-hat is the diagnostic that applies.
* ``log_likelihood`` holds log p(y_n | x_n, theta_m) = log (1/S) sum_s p(y_n | f_s(x_n; theta_m)), the
  model's S-averaged likelihood, for *held-out test* examples. PSIS-LOO on it is PSIS-LOO on variational
  draws: it treats the draws from q as draws from a posterior that saw every example and reweights them
  by 1 / p(y_n | theta) to leave example n out. q never saw the test examples, so this removes
  information that was never there, and ``elpd_loo`` comes out below the direct held-out estimate
  ``elpd_test`` = sum_n log mean_m p(y_n | x_n, theta_m), which is reported beside it and is the one to
  quote for test data. Pareto-k says where the importance weights cannot be trusted; with few draws
  ArviZ's threshold min(1 - 1 / log10 M, 0.7) is stricter than 0.7.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
import xarray as xr

from inference.draws import draw_posterior, draw_with_log_q, log_prior, predictive_outputs, site_kinds
from inference.nuts import run_nuts
from models.network import InvariantNet
from models.priors import EtaPrior

with warnings.catch_warnings():  # ArviZ 0.2x announces its 1.x refactor once a day on import
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
    import arviz as az

SITE_DIMS: dict[str, tuple[str, ...]] = {
    "W1": ("hidden", "pixel"),
    "b1": ("hidden",),
    "W2": ("class", "hidden"),
    "b2": ("class",),
    "eta": ("generator",),
    "tau_1": (),
    "tau_2": (),
    "eps": ("transform", "generator"),
}
"""Named dims of each latent site (after ``chain``, ``draw``)."""

POINT_GROUP, MOMENTS_GROUP, TRAINING_GROUP = "point_estimates", "posterior_moments", "training"

VI_NOTE = ("independent draws from the variational distribution q (pyro.infer.Predictive with the guide), "
           "stored as one chain: R-hat and ESS do not apply to them; use the guide's PSIS k-hat")
LOO_NOTE = ("PSIS-LOO / WAIC on variational draws over held-out test examples: the importance weights reweight "
            "draws from q (not MCMC draws), and the test examples were never in the fit, so leaving one out "
            "removes information q never had and elpd_loo is pessimistic; elpd_test, the direct held-out "
            "estimate sum_n log mean_m p(y_n | x_n, theta_m), is the one to quote; Pareto-k flags examples "
            "where the reweighting is unreliable")

_KNOWN_WARNINGS = (  # ArviZ's and pandas' warnings that the summaries below report as flags instead
    (UserWarning, r"Estimated shape parameter of Pareto distribution is greater than"),
    (UserWarning, r"For one or more samples the posterior variance of the log predictive densities exceeds"),
    (Warning, r"The inplace keyword in DataFrame\.sort_values is deprecated"),  # pandas 3 inside az.compare
)


class _Recorded:
    """Context manager that swallows the known ArviZ warnings and remembers whether any fired."""

    def __enter__(self) -> _Recorded:
        self._ctx = warnings.catch_warnings(record=True)
        self.records = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        known = [r for r in self.records if any(issubclass(r.category, c) and _match(p, str(r.message))
                                                for c, p in _KNOWN_WARNINGS)]
        for r in self.records:  # anything else is re-raised as a warning (an error under pytest)
            if r not in known:
                warnings.warn_explicit(r.message, r.category, r.filename, r.lineno)
        self.messages = [str(r.message).strip().splitlines()[0] for r in known]


def _match(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


# --------------------------------------------------------------------------- InferenceData
def _coords(model: InvariantNet, num_obs: int) -> dict[str, Any]:
    cfg = model.config
    return {"hidden": np.arange(cfg.hidden), "pixel": np.arange(cfg.num_pixels), "class": np.arange(cfg.num_classes),
            "generator": list(model.generator_names), "obs": np.arange(num_obs)}


def _attr_value(value: Any) -> Any:
    """netCDF attributes hold strings and numbers only."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    return str(value)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_inference_data(
    model: InvariantNet,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_draws: int = 20,
    num_transforms: int | None = None,
    batch_size: int = 250,
    max_site_elements: int = 4_000_000,
    eta_history: tuple[Sequence[int], torch.Tensor] | None = None,
    losses: Sequence[float] | None = None,
    eta_true: Mapping[str, float] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> az.InferenceData:
    """The fitted model and guide as an ``arviz.InferenceData``.

    Parameters
    ----------
    model, guide : the fitted model and guide.
    x, y : torch.Tensor
        Test images ``(N, C, H, W)`` and labels ``(N,)``: ``log_likelihood`` and ``posterior_predictive``
        have dims ``(chain=1, draw=M, obs=N)``.
    num_draws : int
        M draws from the guide.
    num_transforms : int, optional
        S transformation samples inside each draw's likelihood (default: the model's).
    batch_size : int
        Test examples per forward pass.
    max_site_elements : int
        A random site with more than this many numbers over all draws (M * size; W1 of the paper's
        network under a Gaussian guide) keeps only its mean and std over the draws, in ``posterior_moments``.
    eta_history : (steps, eta), optional
        ``(T,)`` steps and ``(T, K)`` eta from training: group ``training``, dims ``(step, generator)``.
    losses : sequence of float, optional
        -ELBO / N per step: ``training.elbo`` with dim ``iteration`` (the ELBO, sign flipped).
    eta_true : mapping, optional
        True extent of the data's transformations per generator: ``constant_data.eta_true``.
    attrs : mapping, optional
        Extra attributes of every group (run directory, dataset, guide...).

    Returns
    -------
    arviz.InferenceData
        Groups ``posterior``, ``posterior_predictive``, ``log_likelihood``, ``observed_data``, ``predictions``
        (class log-probabilities per draw, ``(chain, draw, obs, class)``), ``point_estimates``, and when
        given ``constant_data``, ``training``, ``posterior_moments``.
    """
    start = time.perf_counter()
    draws = draw_posterior(model, guide, num_draws, num_transforms)
    log_lik, log_probs = predictive_outputs(model, draws, x, y, batch_size)
    categorical = model.likelihood.has_classes
    if categorical:
        y_rep = dist.Categorical(logits=log_probs).sample()  # (M, N)
    else:
        y_rep = log_probs + model.config.noise_scale * torch.randn_like(log_probs)  # (M, N, outputs)
    M, N = log_lik.shape
    dims = {name: list(d) for name, d in SITE_DIMS.items()}
    dims.update({"y": ["obs"] if categorical else ["obs", "class"], "log_probs": ["obs", "class"]})
    posterior, moments = {}, {}
    for name, value in draws.random.items():
        if value.numel() > max_site_elements:
            moments[f"{name}_mean"] = (SITE_DIMS[name], _np(value.mean(0)))
            moments[f"{name}_std"] = (SITE_DIMS[name], _np(value.std(0)))
        else:
            posterior[name] = _np(value)[None]
    posterior["eps"] = _np(draws.eps)[None]  # q(eps) = p(eps); the only randomness left under a MAP guide
    point = {name: (SITE_DIMS[name], _np(value)) for name, value in draws.point.items()}
    if model.config.eta_prior is EtaPrior.NONE:
        point["eta"] = (("generator",), _np(model.eta_effective))
    common = {"guide_draws": M, "num_transforms": int(draws.eps.shape[-2]), "likelihood": model.config.likelihood.value,
              "eta_treatment": "empirical Bayes (pyro.param)" if model.config.eta_prior is EtaPrior.NONE
              else "full Bayes (sample site)", **{k: _attr_value(v) for k, v in (attrs or {}).items()}}
    idata = az.from_dict(
        posterior=posterior,
        posterior_predictive={"y": _np(y_rep)[None]},
        log_likelihood={"y": _np(log_lik)[None]},
        predictions={"log_probs": _np(log_probs)[None]} if categorical else None,
        observed_data={"y": _np(y)},
        constant_data={"eta_true": [float(eta_true[g]) for g in model.generator_names]} if eta_true else None,
        coords=_coords(model, N),
        dims={**dims, "eta_true": ["generator"]},
        pred_dims={"log_probs": ["obs", "class"]},
        pred_coords=_coords(model, N),
    )
    idata.posterior.attrs.update(inference=VI_NOTE, point_estimate_sites=",".join(draws.point) or "none",
                                 eps="transformation noise of each draw, drawn from its prior (q(eps) = p(eps))")
    idata.log_likelihood.attrs.update(note=LOO_NOTE, definition="log (1/S) sum_s p(y_n | f_s(x_n; theta_m))")
    coords = _coords(model, N)

    def used(variables: Mapping[str, tuple]) -> dict[str, Any]:
        names = {d for dims_, _ in variables.values() for d in dims_}
        return {d: coords[d] for d in names if d in coords}

    extra = {POINT_GROUP: xr.Dataset(point, coords=used(point), attrs={
        **common, "note": "point estimates, not posterior draws: Delta sites of the guide and eta when it is a "
                          "pyro.param (empirical Bayes)"})}
    if moments:
        note = "mean and std over the guide draws of sites too large to store every draw of"
        extra[MOMENTS_GROUP] = xr.Dataset(moments, coords=used(moments), attrs={**common, "note": note})
    if eta_history is not None or losses is not None:
        extra[TRAINING_GROUP] = _training_dataset(eta_history, losses, common, model.generator_names)
    idata.add_groups(extra)
    for group in idata.groups():
        idata[group].attrs.update(common, seconds_to_build=round(time.perf_counter() - start, 2))
    return idata


def _training_dataset(
    eta_history: tuple[Sequence[int], torch.Tensor] | None, losses: Sequence[float] | None, attrs: Mapping,
    names: Sequence[str],
) -> xr.Dataset:
    data, coords = {}, {"generator": list(names)}
    if eta_history is not None:
        steps, eta = eta_history
        data["eta"] = (("step", "generator"), _np(torch.as_tensor(eta)).reshape(len(steps), len(names)))
        coords["step"] = np.asarray(steps, dtype=np.int64)
    if losses is not None:
        data["elbo"] = (("iteration",), -np.asarray(losses, dtype=np.float64))
        coords["iteration"] = np.arange(1, len(losses) + 1)
    return xr.Dataset(data, coords=coords, attrs={**attrs, "elbo": "-loss per step: minibatch ELBO estimate / N"})


def save_inference_data(idata: az.InferenceData, path: str | Path) -> Path:
    """Write ``idata`` to netCDF (h5netcdf); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path))
    return path


def load_inference_data(path: str | Path) -> az.InferenceData:
    """Read a netCDF file written by :func:`save_inference_data` (every group, into memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no InferenceData file at {path}")
    with az.rc_context({"data.load": "eager"}):  # read into memory and close the file
        return az.from_netcdf(str(path))


# --------------------------------------------------------------------------- reading an InferenceData
def w1_mean(idata: az.InferenceData) -> np.ndarray | None:
    """Posterior mean (or point estimate) of W1, ``(hidden, pixel)``; None for an RFF first layer."""
    if POINT_GROUP in idata.groups() and "W1" in idata[POINT_GROUP]:
        return idata[POINT_GROUP]["W1"].values
    if "W1" in idata.posterior:
        return idata.posterior["W1"].mean(("chain", "draw")).values
    if MOMENTS_GROUP in idata.groups() and "W1_mean" in idata[MOMENTS_GROUP]:
        return idata[MOMENTS_GROUP]["W1_mean"].values
    return None


def eta_values(idata: az.InferenceData) -> np.ndarray:
    """eta per generator: ``(K,)`` under empirical Bayes, the draws ``(M, K)`` under full Bayes."""
    if "eta" in idata.posterior:
        return idata.posterior["eta"].stack(sample=("chain", "draw")).transpose("sample", "generator").values
    return idata[POINT_GROUP]["eta"].values


def class_probabilities(idata: az.InferenceData) -> np.ndarray:
    """Posterior predictive class probabilities ``(obs, class)``: the mean over draws of p(y | x, theta_m)."""
    log_probs = idata.predictions["log_probs"].values  # (chain, draw, obs, class)
    return np.exp(log_probs).mean(axis=(0, 1))


def observed(idata: az.InferenceData) -> np.ndarray:
    """The observed labels ``(obs,)``."""
    return idata.observed_data["y"].values


def training_history(idata: az.InferenceData) -> dict[str, np.ndarray]:
    """``{"step", "eta" (T, K), "iteration", "elbo"}`` from the ``training`` group (what it holds)."""
    if TRAINING_GROUP not in idata.groups():
        return {}
    ds = idata[TRAINING_GROUP]
    out = {}
    if "eta" in ds:
        out.update(step=ds["step"].values, eta=ds["eta"].values)
    if "elbo" in ds:
        out.update(iteration=ds["iteration"].values, elbo=ds["elbo"].values)
    return out


# --------------------------------------------------------------------------- LOO, WAIC, comparison
def elpd_test(idata: az.InferenceData) -> tuple[float, float]:
    """Direct held-out estimate: sum_n log mean_m p(y_n | x_n, theta_m), and its standard error."""
    ll = idata.log_likelihood["y"].stack(sample=("chain", "draw")).transpose("obs", "sample").values.astype(np.float64)
    pointwise = np.logaddexp.reduce(ll, axis=1) - math.log(ll.shape[1])
    return float(pointwise.sum()), float(math.sqrt(len(pointwise)) * pointwise.std())


def pareto_k_counts(k: np.ndarray, good_k: float = 0.5) -> dict[str, int]:
    """Counts of Pareto k in the usual bins, and ``k<=good_k``: below ArviZ's threshold for this many draws."""
    k = np.asarray(k, dtype=float)
    return {
        "k<=0.5": int((k <= 0.5).sum()),
        "0.5<k<=0.7": int(((k > 0.5) & (k <= 0.7)).sum()),
        "0.7<k<=1": int(((k > 0.7) & (k <= 1.0)).sum()),
        "k>1": int((k > 1.0).sum()),
        "k<=good_k": int((k <= good_k).sum()),
    }


def loo_summary(idata: az.InferenceData) -> dict[str, Any]:
    """PSIS-LOO of ``idata`` (on variational draws, see the module notes) with Pareto-k counts.

    Returns
    -------
    dict
        ``elpd_loo``, ``se``, ``p_loo``, ``elpd_test`` (direct held-out), ``elpd_test_se``, ``n_draws``,
        ``n_obs``, ``good_k`` (ArviZ's threshold min(1 - 1/log10 M, 0.7)), ``pareto_k`` (counts),
        ``max_k``, ``warnings`` and ``note``.
    """
    with _Recorded() as rec:
        loo = az.loo(idata, pointwise=True)
    k = np.asarray(loo.pareto_k)
    test, test_se = elpd_test(idata)
    good_k = float(loo.get("good_k", 0.7))
    return {"elpd_loo": float(loo.elpd_loo), "se": float(loo.se), "p_loo": float(loo.p_loo),
            "elpd_test": test, "elpd_test_se": test_se, "n_draws": int(loo.n_samples),
            "n_obs": int(loo.n_data_points), "good_k": good_k, "pareto_k": pareto_k_counts(k, good_k),
            "max_k": float(np.max(k)), "warnings": rec.messages, "note": LOO_NOTE}


def pointwise_pareto_k(idata: az.InferenceData) -> np.ndarray:
    """PSIS-LOO Pareto k of every observation ``(obs,)``."""
    with _Recorded():
        return np.asarray(az.loo(idata, pointwise=True).pareto_k)


def waic_summary(idata: az.InferenceData) -> dict[str, Any]:
    """WAIC of ``idata``: ``elpd_waic``, ``se``, ``p_waic``, ``warnings``."""
    with _Recorded() as rec:
        waic = az.waic(idata, pointwise=True)
    return {"elpd_waic": float(waic.elpd_waic), "se": float(waic.se), "p_waic": float(waic.p_waic),
            "warnings": rec.messages}


def compare_models(idatas: Mapping[str, az.InferenceData], ic: str = "loo") -> tuple[Any, list[str]]:
    """``az.compare`` of models evaluated on the same observations.

    Returns
    -------
    (pandas.DataFrame, list of str)
        ArviZ's table (rank, elpd_<ic>, p_<ic>, elpd_diff, weight, se, dse, warning) and the warnings
        it raised (Pareto k above its threshold...).

    Raises
    ------
    ValueError
        When the models were evaluated on different observations.
    """
    items = list(idatas.items())
    first = observed(items[0][1])
    for name, idata in items[1:]:
        other = observed(idata)
        if other.shape != first.shape or not np.array_equal(other, first):
            raise ValueError(f"{name!r} was evaluated on other observations than {items[0][0]!r}: "
                             "compare runs on the same dataset and test subset")
    with _Recorded() as rec:
        table = az.compare(dict(items), ic=ic)
    return table, rec.messages


# --------------------------------------------------------------------------- VI quality: PSIS k-hat
def psis_khat(log_weights: np.ndarray | torch.Tensor) -> float:
    """Pareto k-hat of importance weights given as log weights ``(M,)`` (``az.psislw``, reff = 1).

    Equal weights (q proportional to p) give -inf, where ``az.psislw`` would report inf from a degenerate fit.
    """
    lw = np.asarray(log_weights.detach().cpu() if isinstance(log_weights, torch.Tensor) else log_weights,
                    dtype=np.float64).reshape(-1)
    if np.ptp(lw) <= 1e-9 * max(1.0, float(np.abs(lw).max())):
        return float("-inf")
    with _Recorded():
        _, k = az.psislw(lw - lw.max(), reff=1.0)
    return float(k)


@dataclass
class KhatResult:
    """PSIS k-hat of the guide against the model's joint.

    Attributes
    ----------
    khat : float
        Pareto k-hat (NaN when the guide has no random site).
    log_weights : np.ndarray
        ``(M,)`` log p(y, theta_m) - log q(theta_m), not normalised.
    sites : list of str
        The random sites the weights are over; the point-estimated ones are conditioned on.
    ess : float
        Importance-sampling effective sample size 1 / sum w_m^2 of the normalised weights.
    shared_eps : bool
        Whether one eps served every draw (see :func:`guide_khat`).
    seconds : float
    note : str
    """

    khat: float
    log_weights: np.ndarray
    sites: list[str]
    ess: float
    shared_eps: bool
    seconds: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the weights; a non-finite k-hat is None, spelled out in ``khat_str``)."""
        finite = math.isfinite(self.khat)
        return {"khat": self.khat if finite else None, "khat_str": f"{self.khat:.3g}",
                "num_draws": int(self.log_weights.size), "sites": self.sites,
                "ess": self.ess if math.isfinite(self.ess) else None, "shared_eps": self.shared_eps,
                "seconds": round(self.seconds, 2), "note": self.note}


def guide_khat(
    model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor, num_draws: int = 100,
    num_transforms: int | None = None, shared_eps: bool = False, batch_size: int = 250,
) -> KhatResult:
    """PSIS k-hat of the guide, importance weights log p(y, theta) - log q(theta) over guide draws.

    theta is every latent site but eps. eps is drawn from its prior in both model and guide, so its
    density cancels. Sites the guide point-estimates (``AutoDelta``: the hybrid guide's W1, b1) have
    log q = 0; they are held fixed, so the k-hat is that of q over the random sites against the
    posterior *given* the point estimates. A guide with no random site (``map``, ``ml``) gets NaN.

    Parameters
    ----------
    x, y : torch.Tensor
        The training data the guide was fitted to (the joint is over all of it, unscaled).
    num_draws : int
        M importance draws (k-hat is unreliable below ~100).
    num_transforms : int, optional
        S inside the likelihood (default: the model's).
    shared_eps : bool
        False: each draw has its own eps, the k-hat of q(theta) p(eps) against p(theta, eps | y).
        True: one eps for all draws, the k-hat of q(theta) against p(theta | y, eps_0); with a
        point-estimated first layer the features are then computed once (many times faster on the paper's
        network).
    """
    start = time.perf_counter()
    kinds = site_kinds(model, guide)
    random = [n for n, k in kinds.items() if k == "random"]
    if not random:
        return KhatResult(float("nan"), np.zeros(0), [], float("nan"), shared_eps, time.perf_counter() - start,
                          "not applicable: the guide point-estimates every site (log q is 0, all weights equal)")
    draws = draw_with_log_q(model, guide, num_draws, num_transforms, shared_eps)
    log_lik, _ = predictive_outputs(model, draws, x, y, batch_size)
    log_w = log_prior(model, draws) + log_lik.sum(1) - draws.log_q
    lw = _np(log_w).astype(np.float64)
    w = np.exp(lw - np.logaddexp.reduce(lw))
    point = [n for n, k in kinds.items() if k == "point"]
    note = ("weights over " + ", ".join(random) + (f", conditioned on the point estimates {', '.join(point)}"
                                                    if point else "")
            + ("; one eps shared by all draws" if shared_eps else "; fresh eps per draw (extended space)"))
    return KhatResult(psis_khat(lw), lw, random, float(1.0 / np.sum(w**2)), shared_eps,
                      time.perf_counter() - start, note)


# --------------------------------------------------------------------------- NUTS reference
def nuts_reference(
    model: InvariantNet, x: torch.Tensor, y: torch.Tensor, num_warmup: int = 300, num_samples: int = 300,
    num_chains: int = 2, seed: int = 0, max_tree_depth: int = 8, init_scale: float = 2.0,
) -> az.InferenceData:
    """A NUTS reference posterior over (W2, b2) of a small model (:func:`inference.nuts.run_nuts`), as InferenceData.

    Parameters
    ----------
    model : InvariantNet
        A small model with a fixed RFF first layer and no active generator (a Bayesian multinomial
        regression on fixed features), e.g. a few hidden units.
    x, y : torch.Tensor
        ``(N, C, H, W)`` and ``(N,)``; the model's ``num_data`` should be N.
    num_chains : int
        Chains, each with its own seed and an over-dispersed start ``U(-init_scale, init_scale)``
        (sequential: no multiprocessing).

    Returns
    -------
    arviz.InferenceData
        ``posterior`` ``(chain, draw, ...)`` with named dims, ``sample_stats.diverging``; attrs hold the
        seconds taken.
    """
    posterior, diverging, seconds = run_nuts(model, x, y, num_warmup, num_samples, num_chains, seed, max_tree_depth,
                                             init_scale)
    return az.from_dict(posterior=posterior, sample_stats={"diverging": diverging},
                        coords=_coords(model, x.shape[0]), dims={n: list(SITE_DIMS[n]) for n in posterior},
                        attrs={"inference": "NUTS (pyro.infer.MCMC), chains run sequentially",
                               "num_warmup": num_warmup, "seconds": round(seconds, 2)})


def reference_summary(idata: az.InferenceData, var_names: Sequence[str] | None = None) -> Any:
    """``az.summary`` (mean, sd, HDI, R-hat, ESS bulk/tail) of an MCMC posterior, as a DataFrame."""
    return az.summary(idata, var_names=list(var_names) if var_names else None)


def guide_draws_to_inference_data(
    model: InvariantNet, guide: Callable, num_draws: int = 1000, sites: Sequence[str] = ("W2", "b2")
) -> az.InferenceData:
    """Draws of ``sites`` from the guide as a one-chain ``posterior`` (for comparing moments, not R-hat)."""
    draws = draw_posterior(model, guide, num_draws, 1)
    posterior = {n: _np(draws.leading(n).expand(num_draws, *draws.leading(n).shape[1:]))[None] for n in sites}
    idata = az.from_dict(posterior=posterior, coords=_coords(model, 1), dims={n: list(SITE_DIMS[n]) for n in sites})
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
    with _Recorded():  # one chain: ArviZ may warn about R-hat, which is not asked for here
        app = az.summary(approx, kind="stats", stat_focus="mean")[["mean", "sd"]]
    table = ref.rename(columns={"mean": "nuts_mean", "sd": "nuts_sd"}).join(
        app.rename(columns={"mean": "guide_mean", "sd": "guide_sd"}), how="inner")
    table["z"] = (table["guide_mean"] - table["nuts_mean"]) / table["nuts_sd"]
    table["sd_ratio"] = table["guide_sd"] / table["nuts_sd"]
    return table


# --------------------------------------------------------------------------- ArviZ plots (for inference.plots)
class _ArvizPlotWarnings(warnings.catch_warnings):
    """Ignore one known-harmless warning that ArviZ 0.23's matplotlib backend triggers under matplotlib >= 3.11
    (``normalize_kwargs`` called with a dict alias map, deprecated in 3.11); nothing else."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message=r"Passing a dict or None as alias_mapping to normalize_kwargs",
                                category=DeprecationWarning)


def plot_forest(idata: az.InferenceData, var_names: Sequence[str], coords: Mapping | None = None, ax=None,
                **kwargs: Any) -> Any:
    """``az.plot_forest`` (94% HDI) of ``var_names``; returns the axes."""
    with _ArvizPlotWarnings():
        return az.plot_forest(idata, var_names=list(var_names), coords=dict(coords or {}), combined=True, ax=ax,
                              **kwargs)


def plot_posterior(idata: az.InferenceData, var_names: Sequence[str], coords: Mapping | None = None, ax=None,
                   **kwargs: Any) -> Any:
    """``az.plot_posterior`` of ``var_names``; returns the axes."""
    with _ArvizPlotWarnings():
        return az.plot_posterior(idata, var_names=list(var_names), coords=dict(coords or {}), ax=ax, **kwargs)


def plot_trace(idata: az.InferenceData, var_names: Sequence[str], coords: Mapping | None = None,
               **kwargs: Any) -> Any:
    """``az.plot_trace`` of ``var_names`` (density and trace per chain); returns the axes ``(rows, 2)``."""
    with _ArvizPlotWarnings():
        return az.plot_trace(idata, var_names=list(var_names), coords=dict(coords or {}), compact=True, **kwargs)


def summary_rhat_ess(idata: az.InferenceData, var_names: Sequence[str] | None = None) -> dict[str, float]:
    """Worst R-hat and smallest bulk / tail ESS over the parameters of an MCMC posterior."""
    table = reference_summary(idata, var_names)
    return {"max_rhat": float(table["r_hat"].max()), "min_ess_bulk": float(table["ess_bulk"].min()),
            "min_ess_tail": float(table["ess_tail"].min()), "num_parameters": int(len(table))}


def num_divergences(idata: az.InferenceData) -> int:
    """Divergent transitions after warm-up."""
    return int(idata.sample_stats["diverging"].values.sum())
