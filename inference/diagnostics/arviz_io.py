"""InferenceData of a fitted model and guide: building it, netCDF save / load, reading it back.

The one module of the project that imports ``arviz``; the rest of :mod:`inference.diagnostics` takes ``az`` from
here, so that a move to ArviZ 1.x stays local.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import pyro.distributions as dist
import torch
import xarray as xr

from inference.draws import GuideDraws, draw_posterior, predictive_outputs
from models.network import InvariantNet
from models.priors import EtaPrior


def _import_arviz() -> Any:
    """``import arviz``. ArviZ 0.2x announces its 1.x refactor once a day on import, and writes a stamp under the
    user's cache folder for it; where that folder cannot be written (a read-only home, a container), the import
    fails. Then the stamp goes to a temporary folder (``XDG_CACHE_HOME`` for the import only)."""
    cache = Path(platformdirs.user_cache_dir("arviz", "arviz"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    before = os.environ.get("XDG_CACHE_HOME")
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
        if not writable:
            os.environ["XDG_CACHE_HOME"] = scratch
        try:
            import arviz
        finally:
            if not writable and before is None:
                del os.environ["XDG_CACHE_HOME"]
            elif not writable:
                os.environ["XDG_CACHE_HOME"] = before
    return arviz


az = _import_arviz()

SITE_DIMS: dict[str, tuple[str, ...]] = {
    "W1": ("hidden", "pixel"), "b1": ("hidden",), "W2": ("class", "hidden"), "b2": ("class",),
    "eta": ("generator",), "tau_1": (), "tau_2": (), "eps": ("transform", "generator"),
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

_KNOWN_WARNINGS = (  # ArviZ's and pandas' warnings that the summaries report as flags instead
    (UserWarning, r"Estimated shape parameter of Pareto distribution is greater than"),
    (UserWarning, r"For one or more samples the posterior variance of the log predictive densities exceeds"),
    (Warning, r"The inplace keyword in DataFrame\.sort_values is deprecated"),  # pandas 3 inside az.compare
)


class Recorded:
    """Context manager that swallows the known ArviZ warnings into ``messages``; any other is re-raised."""

    def __enter__(self) -> Recorded:
        self._ctx = warnings.catch_warnings(record=True)
        self.records = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        known = [r for r in self.records if any(issubclass(r.category, c) and re.search(p, str(r.message))
                                                for c, p in _KNOWN_WARNINGS)]
        for r in self.records:  # anything else is re-raised as a warning (an error under pytest)
            if r not in known:
                warnings.warn_explicit(r.message, r.category, r.filename, r.lineno)
        self.messages = [str(r.message).strip().splitlines()[0] for r in known]


def coords_of(model: InvariantNet, num_obs: int) -> dict[str, Any]:
    """Coordinates of the named dims of :data:`SITE_DIMS` and ``obs``."""
    cfg = model.config
    return {"hidden": np.arange(cfg.hidden), "pixel": np.arange(cfg.num_pixels), "class": np.arange(cfg.num_classes),
            "generator": list(model.generator_names), "obs": np.arange(num_obs)}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array (on the CPU)."""
    return t.detach().cpu().numpy()


def _attr_value(value: Any) -> Any:
    """netCDF attributes hold strings and numbers only."""
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (int, float, str, np.integer, np.floating)) else str(value)


# --------------------------------------------------------------------------- building
def to_inference_data(
    model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor, *, num_draws: int = 20,
    num_transforms: int | None = None, batch_size: int = 250, max_site_elements: int = 4_000_000,
    eta_history: tuple[Sequence[int], torch.Tensor] | None = None, losses: Sequence[float] | None = None,
    eta_true: Mapping[str, float] | None = None, attrs: Mapping[str, Any] | None = None,
) -> az.InferenceData:
    """The fitted model and guide as an ``arviz.InferenceData``.

    Parameters
    ----------
    model, guide : the fitted model and guide.
    x, y : torch.Tensor
        Test images ``(N, C, H, W)`` and labels ``(N,)``: ``log_likelihood`` and ``posterior_predictive``
        have dims ``(chain=1, draw=M, obs=N)``.
    num_draws : int
        M draws from the guide (:func:`inference.draws.draw_posterior`, eps included).
    num_transforms : int, optional
        S transformation samples inside each draw's likelihood (default: the model's).
    batch_size : int
        Test examples per forward pass.
    max_site_elements : int
        A random site with more numbers than this over all draws (M * size; W1 of the paper's network under
        a Gaussian guide) keeps only its mean and std over the draws, in group ``posterior_moments``.
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
        Groups ``posterior``, ``posterior_predictive``, ``log_likelihood`` (log (1/S) sum_s p(y_n | f_s(x_n;
        theta_m))), ``observed_data``, ``predictions`` (class log-probabilities ``(chain, draw, obs, class)``),
        ``point_estimates`` (Delta sites of the guide, eta under empirical Bayes), and when they apply
        ``constant_data``, ``training``, ``posterior_moments``.
    """
    start = time.perf_counter()
    draws = draw_posterior(model, guide, num_draws, num_transforms)
    log_lik, log_probs = predictive_outputs(model, draws, x, y, batch_size)
    posterior, moments, point = _site_groups(model, draws, max_site_elements)
    idata = _from_dict(model, posterior, log_lik, log_probs, y, eta_true)
    idata.posterior.attrs.update(inference=VI_NOTE, point_estimate_sites=",".join(draws.point) or "none",
                                 eps="transformation noise of each draw, drawn from its prior (q(eps) = p(eps))")
    idata.log_likelihood.attrs.update(note=LOO_NOTE, definition="log (1/S) sum_s p(y_n | f_s(x_n; theta_m))")
    common = {"guide_draws": int(log_lik.shape[0]), "num_transforms": int(draws.eps.shape[-2]),
              "likelihood": model.config.likelihood.value,
              "eta_treatment": "empirical Bayes (pyro.param)" if model.config.eta_prior is EtaPrior.NONE
              else "full Bayes (sample site)", **{k: _attr_value(v) for k, v in (attrs or {}).items()}}
    coords = coords_of(model, len(y))

    def dataset(variables: Mapping[str, tuple], note: str) -> xr.Dataset:
        used = {d for dims_, _ in variables.values() for d in dims_}
        return xr.Dataset(variables, coords={d: coords[d] for d in used if d in coords}, attrs={**common, "note": note})

    extra = {POINT_GROUP: dataset(point, "point estimates, not posterior draws: Delta sites of the guide and eta "
                                         "when it is a pyro.param (empirical Bayes)")}
    if moments:
        extra[MOMENTS_GROUP] = dataset(moments, "mean and std over the guide draws of sites too large to store "
                                                "every draw of")
    if eta_history is not None or losses is not None:
        extra[TRAINING_GROUP] = _training_dataset(eta_history, losses, common, model.generator_names)
    idata.add_groups(extra)
    for group in idata.groups():
        idata[group].attrs.update(common, seconds_to_build=round(time.perf_counter() - start, 2))
    return idata


def _from_dict(
    model: InvariantNet, posterior: dict, log_lik: torch.Tensor, log_probs: torch.Tensor, y: torch.Tensor,
    eta_true: Mapping[str, float] | None,
) -> az.InferenceData:
    """ArviZ's groups: ``posterior``, ``posterior_predictive`` (a replicate y per draw), ``log_likelihood``
    ``(M, N)``, ``predictions`` (class log-probabilities ``(M, N, classes)``), ``observed_data``, ``constant_data``."""
    categorical = model.likelihood.has_classes
    if categorical:
        y_rep = dist.Categorical(logits=log_probs).sample()  # (M, N)
    else:
        y_rep = log_probs + model.config.noise_scale * torch.randn_like(log_probs)  # (M, N, outputs)
    coords = coords_of(model, len(y))
    dims = {name: list(d) for name, d in SITE_DIMS.items()}
    dims.update(y=["obs"] if categorical else ["obs", "class"], log_probs=["obs", "class"], eta_true=["generator"])
    return az.from_dict(
        posterior=posterior, posterior_predictive={"y": to_numpy(y_rep)[None]},
        log_likelihood={"y": to_numpy(log_lik)[None]},
        predictions={"log_probs": to_numpy(log_probs)[None]} if categorical else None,
        observed_data={"y": to_numpy(y)},
        constant_data={"eta_true": [float(eta_true[g]) for g in model.generator_names]} if eta_true else None,
        coords=coords, dims=dims, pred_dims={"log_probs": ["obs", "class"]}, pred_coords=coords,
    )


def _site_groups(model: InvariantNet, draws: GuideDraws, max_site_elements: int) -> tuple[dict, dict, dict]:
    """The draws of each site as ``posterior`` (``(1, M, *event)``), ``posterior_moments`` or ``point_estimates``."""
    posterior, moments = {}, {}
    for name, value in draws.random.items():
        if value.numel() > max_site_elements:
            moments[f"{name}_mean"] = (SITE_DIMS[name], to_numpy(value.mean(0)))
            moments[f"{name}_std"] = (SITE_DIMS[name], to_numpy(value.std(0)))
        else:
            posterior[name] = to_numpy(value)[None]
    posterior["eps"] = to_numpy(draws.eps)[None]  # q(eps) = p(eps); the only randomness left under a MAP guide
    point = {name: (SITE_DIMS[name], to_numpy(value)) for name, value in draws.point.items()}
    if model.config.eta_prior is EtaPrior.NONE:
        point["eta"] = (("generator",), to_numpy(model.eta_effective))
    return posterior, moments, point


def _training_dataset(
    eta_history: tuple[Sequence[int], torch.Tensor] | None, losses: Sequence[float] | None, attrs: Mapping,
    names: Sequence[str],
) -> xr.Dataset:
    data, coords = {}, {"generator": list(names)}
    if eta_history is not None:
        steps, eta = eta_history
        data["eta"] = (("step", "generator"), to_numpy(torch.as_tensor(eta)).reshape(len(steps), len(names)))
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


# --------------------------------------------------------------------------- reading
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
    return np.exp(idata.predictions["log_probs"].values).mean(axis=(0, 1))  # from (chain, draw, obs, class)


def observed(idata: az.InferenceData) -> np.ndarray:
    """The observed labels ``(obs,)``."""
    return idata.observed_data["y"].values


def training_history(idata: az.InferenceData) -> dict[str, np.ndarray]:
    """``{"step", "eta" (T, K), "iteration", "elbo"}`` from the ``training`` group (what it holds)."""
    if TRAINING_GROUP not in idata.groups():
        return {}
    ds, out = idata[TRAINING_GROUP], {}
    if "eta" in ds:
        out.update(step=ds["step"].values, eta=ds["eta"].values)
    if "elbo" in ds:
        out.update(iteration=ds["iteration"].values, elbo=ds["elbo"].values)
    return out
