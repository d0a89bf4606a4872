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
LOO_NOTE = ("PSIS-LOO / WAIC over the training examples (log_likelihood, observed_data): the expected log "
            "predictive density of an example left out of the fit, estimated by reweighting draws from q (not MCMC "
            "draws) by 1 / p(y_n | theta_m), q standing in for the posterior; Pareto k flags examples where the "
            "reweighting is unreliable (ArviZ's threshold min(1 - 1/log10 M, 0.7) for M draws). The held-out test "
            "examples are scored apart, directly: elpd_test = sum_n log mean_m p(y_n | x_n, theta_m) (predictions)")
TEST_NOTE = ("held-out test examples (never in the fit): per-draw log p(y_n | x_n, theta_m) and class "
             "log-probabilities; elpd_test = sum_n log mean_m p(y_n | x_n, theta_m) is the direct estimate of the "
             "test elpd")

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
    model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor, *,
    test: tuple[torch.Tensor, torch.Tensor] | None = None, num_draws: int = 20, num_transforms: int | None = None,
    shared_eps: bool = False, batch_size: int = 250, max_site_elements: int = 8_000_000,
    eta_history: tuple[Sequence[int], torch.Tensor] | None = None, losses: Sequence[float] | None = None,
    elbo_history: Sequence[Mapping[str, float]] | None = None, eta_true: Mapping[str, float] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> az.InferenceData:
    """The fitted model and guide as an ``arviz.InferenceData``, in ArviZ's layout: the training data are the
    observed data (for PSIS-LOO), the held-out test data are predictions.

    Parameters
    ----------
    model, guide : the fitted model and guide.
    x, y : torch.Tensor
        Training images ``(N, C, H, W)`` and labels ``(N,)`` the guide was fitted to: ``log_likelihood`` and
        ``posterior_predictive`` have dims ``(chain=1, draw=M, obs=N)``.
    test : (x, y), optional
        Held-out images ``(N_test, C, H, W)`` and labels: group ``predictions`` (per-draw class log-probabilities
        ``(chain, draw, test_obs, class)``, per-draw log-likelihood ``log_lik``, a sampled label ``y``) and
        ``predictions_constant_data`` (the labels, ``y_test``).
    num_draws, num_transforms : int
        M draws from the guide (:func:`inference.draws.draw_posterior`, eps included) and S transformation samples
        inside each draw's likelihood (default: the model's).
    shared_eps : bool
        One eps ``(S, K)`` (the first draw's) for every draw: the likelihood at one fixed set of S transformations,
        so that with a point-estimated first layer and eta the features are computed once and M can be large.
    batch_size, max_site_elements : int
        Examples per forward pass; a random site with more numbers than this over all draws (M * size) keeps only
        its mean and std over the draws, in group ``posterior_moments``.
    eta_history, losses, elbo_history : optional
        The training history, group ``training``: ``(T,)`` steps and ``(T, K)`` eta (dims ``(step, generator)``),
        -ELBO / N per step (``elbo``, sign flipped, dim ``iteration``) and the ELBO's terms at the logged steps
        (``{"step", "elbo", "expected_loglik", "kl"}`` rows: ``logged_elbo``, ``expected_loglik``, ``kl``).
    eta_true, attrs : mapping, optional
        The data's true extent per generator (``constant_data.eta_true``); attributes of every group.

    Returns
    -------
    arviz.InferenceData
        Groups ``posterior``, ``posterior_predictive``, ``log_likelihood`` (log (1/S) sum_s p(y_n | f_s(x_n;
        theta_m)) of the training data), ``observed_data``, ``point_estimates`` (Delta sites of the guide, eta under
        empirical Bayes), and when they apply ``predictions``, ``predictions_constant_data``, ``constant_data``,
        ``training``, ``posterior_moments``.
    """
    start = time.perf_counter()
    draws = draw_posterior(model, guide, num_draws, num_transforms)
    if shared_eps:
        draws.eps = draws.eps[:1]
    log_lik, train_out = predictive_outputs(model, draws, x, y, batch_size)
    held_out = predictive_outputs(model, draws, test[0], test[1], batch_size) if test is not None else None
    posterior, moments, point = _site_groups(model, draws, max_site_elements)
    idata = _from_dict(model, posterior, (log_lik, train_out), y, held_out, None if test is None else test[1],
                       eta_true)
    common = _add_notes(idata, model, draws, int(log_lik.shape[0]), shared_eps, attrs)
    idata.add_groups(_extra_groups(model, len(y), point, moments, common, eta_history, losses, elbo_history))
    for group in idata.groups():
        idata[group].attrs.update(common, seconds_to_build=round(time.perf_counter() - start, 2))
    return idata


def _add_notes(idata: az.InferenceData, model: InvariantNet, draws: GuideDraws, num_draws: int, shared_eps: bool,
               attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Say in the groups' attributes what their numbers are; returns the attributes common to every group."""
    idata.posterior.attrs.update(
        inference=VI_NOTE, point_estimate_sites=",".join(draws.point) or "none",
        eps=("one eps shared by every draw (the likelihood at one fixed set of S transformations)" if shared_eps
             else "transformation noise of each draw, drawn from its prior (q(eps) = p(eps))"))
    idata.log_likelihood.attrs.update(note=LOO_NOTE, data="training examples",
                                      definition="log (1/S) sum_s p(y_n | f_s(x_n; theta_m))")
    if "predictions" in idata.groups():
        idata.predictions.attrs.update(note=TEST_NOTE, data="held-out test examples")
    return {"guide_draws": num_draws, "num_transforms": int(draws.eps.shape[-2]), "shared_eps": int(shared_eps),
            "likelihood": model.config.likelihood.value,
            "eta_treatment": "empirical Bayes (pyro.param)" if model.config.eta_prior is EtaPrior.NONE
            else "full Bayes (sample site)", **{k: _attr_value(v) for k, v in (attrs or {}).items()}}


def _extra_groups(model: InvariantNet, num_obs: int, point: Mapping[str, tuple], moments: Mapping[str, tuple],
                  common: Mapping[str, Any], eta_history: tuple[Sequence[int], torch.Tensor] | None,
                  losses: Sequence[float] | None, elbo_history: Sequence[Mapping[str, float]] | None,
                  ) -> dict[str, xr.Dataset]:
    """The groups ArviZ does not know: point estimates, the moments of large sites and the training history."""
    coords = coords_of(model, num_obs)

    def dataset(variables: Mapping[str, tuple], note: str) -> xr.Dataset:
        used = {d for dims_, _ in variables.values() for d in dims_}
        return xr.Dataset(variables, coords={d: coords[d] for d in used if d in coords}, attrs={**common, "note": note})

    extra = {POINT_GROUP: dataset(point, "point estimates, not posterior draws: Delta sites of the guide and eta "
                                         "when it is a pyro.param (empirical Bayes)")}
    if moments:
        extra[MOMENTS_GROUP] = dataset(moments, "mean and std over the guide draws of sites too large to store "
                                                "every draw of")
    if eta_history is not None or losses is not None or elbo_history:
        extra[TRAINING_GROUP] = _training_dataset(eta_history, losses, elbo_history, common, model.generator_names)
    return extra


def _replicate(model: InvariantNet, outputs: torch.Tensor) -> torch.Tensor:
    """One label per draw and example from per-draw outputs ``(M, N, classes)``: sampled from the class
    log-probabilities, or the predictive mean plus the model's noise (Gaussian likelihood)."""
    if model.likelihood.has_classes:
        return dist.Categorical(logits=outputs).sample()  # (M, N)
    return outputs + model.config.noise_scale * torch.randn_like(outputs)  # (M, N, outputs)


def _from_dict(
    model: InvariantNet, posterior: dict, train: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor,
    held_out: tuple[torch.Tensor, torch.Tensor] | None, y_test: torch.Tensor | None,
    eta_true: Mapping[str, float] | None,
) -> az.InferenceData:
    """ArviZ's groups: ``posterior``; ``log_likelihood`` ``(M, N)`` and ``posterior_predictive`` (a replicate y per
    draw) of the training data from ``train`` (per-draw log-likelihood and outputs ``(M, N, classes)``);
    ``observed_data``, ``constant_data``; with ``held_out`` (the same for the test set), ``predictions`` and
    ``predictions_constant_data``."""
    log_lik, train_out = train
    categorical = model.likelihood.has_classes
    obs_dims = ["obs"] if categorical else ["obs", "class"]
    coords = {**coords_of(model, len(y)), "test_obs": np.arange(0 if y_test is None else len(y_test))}
    dims = {name: list(d) for name, d in SITE_DIMS.items()}
    dims.update(y=obs_dims, eta_true=["generator"])
    predictions, pred_dims = None, {}
    if held_out is not None:
        test_lik, test_out = held_out
        predictions = {"y": to_numpy(_replicate(model, test_out))[None], "log_lik": to_numpy(test_lik)[None]}
        pred_dims = {"y": ["test_obs"] if categorical else ["test_obs", "class"], "log_lik": ["test_obs"]}
        if categorical:
            predictions["log_probs"], pred_dims["log_probs"] = to_numpy(test_out)[None], ["test_obs", "class"]
    return az.from_dict(
        posterior=posterior, posterior_predictive={"y": to_numpy(_replicate(model, train_out))[None]},
        log_likelihood={"y": to_numpy(log_lik)[None]}, observed_data={"y": to_numpy(y)},
        predictions=predictions,
        predictions_constant_data={"y_test": to_numpy(y_test)} if y_test is not None else None,
        constant_data={"eta_true": [float(eta_true[g]) for g in model.generator_names]} if eta_true else None,
        coords=coords, dims={**dims, "y_test": ["test_obs"]}, pred_dims={**pred_dims, "y_test": ["test_obs"]},
        pred_coords=coords,
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
    M = draws.num_draws  # eps (M, S, K), or one shared eps (1, S, K) stored with every draw
    posterior["eps"] = to_numpy(draws.eps.expand(M, *draws.eps.shape[1:]))[None]  # q(eps) = p(eps)
    point = {name: (SITE_DIMS[name], to_numpy(value)) for name, value in draws.point.items()}
    if model.config.eta_prior is EtaPrior.NONE:
        point["eta"] = (("generator",), to_numpy(model.eta_effective))
    return posterior, moments, point


def _training_dataset(
    eta_history: tuple[Sequence[int], torch.Tensor] | None, losses: Sequence[float] | None,
    elbo_history: Sequence[Mapping[str, float]] | None, attrs: Mapping, names: Sequence[str],
) -> xr.Dataset:
    data, coords = {}, {"generator": list(names)}
    if eta_history is not None:
        steps, eta = eta_history
        data["eta"] = (("step", "generator"), to_numpy(torch.as_tensor(eta)).reshape(len(steps), len(names)))
        coords["step"] = np.asarray(steps, dtype=np.int64)
    if losses is not None:
        data["elbo"] = (("iteration",), -np.asarray(losses, dtype=np.float64))
        coords["iteration"] = np.arange(1, len(losses) + 1)
    if elbo_history:
        coords["logged_step"] = np.asarray([int(r["step"]) for r in elbo_history], dtype=np.int64)
        for key, name in (("elbo", "logged_elbo"), ("expected_loglik", "expected_loglik"), ("kl", "kl")):
            data[name] = (("logged_step",), np.asarray([float(r[key]) for r in elbo_history]))
    return xr.Dataset(data, coords=coords, attrs={
        **attrs, "elbo": "-loss per step: minibatch ELBO estimate / N",
        "logged_elbo": "ELBO / N = expected_loglik - kl per example, one more draw on the logged step's minibatch"})


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
def site_mean(idata: az.InferenceData, name: str) -> np.ndarray | None:
    """Posterior mean (or point estimate) of site ``name`` over the draws, wherever ``idata`` keeps it; None if it
    has no such site (W1 of a random-feature first layer)."""
    if POINT_GROUP in idata.groups() and name in idata[POINT_GROUP]:
        return idata[POINT_GROUP][name].values
    if name in idata.posterior:
        return idata.posterior[name].mean(("chain", "draw")).values
    if MOMENTS_GROUP in idata.groups() and f"{name}_mean" in idata[MOMENTS_GROUP]:
        return idata[MOMENTS_GROUP][f"{name}_mean"].values
    return None


def w1_mean(idata: az.InferenceData) -> np.ndarray | None:
    """Posterior mean (or point estimate) of W1, ``(hidden, pixel)``; None for an RFF first layer."""
    return site_mean(idata, "W1")


def eta_values(idata: az.InferenceData) -> np.ndarray:
    """eta per generator: ``(K,)`` under empirical Bayes, the draws ``(M, K)`` under full Bayes."""
    if "eta" in idata.posterior:
        return idata.posterior["eta"].stack(sample=("chain", "draw")).transpose("sample", "generator").values
    return idata[POINT_GROUP]["eta"].values


def class_probabilities(idata: az.InferenceData) -> np.ndarray:
    """Posterior predictive class probabilities of the test examples ``(test_obs, class)``: the mean over draws of
    p(y | x, theta_m)."""
    return np.exp(idata.predictions["log_probs"].values).mean(axis=(0, 1))  # from (chain, draw, test_obs, class)


def observed(idata: az.InferenceData) -> np.ndarray:
    """The observed (training) labels ``(obs,)``."""
    return idata.observed_data["y"].values


def test_labels(idata: az.InferenceData) -> np.ndarray:
    """The held-out test labels ``(test_obs,)``."""
    return idata.predictions_constant_data["y_test"].values


def training_history(idata: az.InferenceData) -> dict[str, np.ndarray]:
    """``{"step", "eta" (T, K), "iteration", "elbo", "logged_step", "logged_elbo", "expected_loglik", "kl"}`` from the
    ``training`` group (what it holds)."""
    if TRAINING_GROUP not in idata.groups():
        return {}
    ds, out = idata[TRAINING_GROUP], {}
    if "eta" in ds:
        out.update(step=ds["step"].values, eta=ds["eta"].values)
    if "elbo" in ds:
        out.update(iteration=ds["iteration"].values, elbo=ds["elbo"].values)
    if "kl" in ds:
        out.update({k: ds[k].values for k in ("logged_step", "logged_elbo", "expected_loglik", "kl")})
    return out
