"""Posterior figures, drawn with ArviZ where it has the plot, headless like :mod:`inference.plots`: each takes an
``arviz.InferenceData`` (or a table made from one) and an optional output path, and returns the ``Figure``.

* :func:`plot_weight_forest`: HDIs of q(W2) for the hidden units that matter most (:func:`top_hidden_units`);
* :func:`plot_eta_posterior`: q(eta) under full Bayes, or the point value under empirical Bayes;
* :func:`plot_trace`, :func:`plot_reference_comparison`: a NUTS reference and the guide beside it;
* :func:`plot_pareto_k`, :func:`plot_loo_comparison`: PSIS-LOO diagnostics and model comparison.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from inference.diagnostics.arviz_io import az
from inference.plots import finish, new_figure


class _ArvizPlotWarnings(warnings.catch_warnings):
    """Ignore the one known-harmless warning of ArviZ 0.23's matplotlib backend under matplotlib >= 3.11
    (``normalize_kwargs`` called with a dict alias map); nothing else."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message=r"Passing a dict or None as alias_mapping to normalize_kwargs",
                                category=DeprecationWarning)


def top_hidden_units(idata: Any, num: int = 4) -> list[int]:
    """Hidden units whose output weights W2 have the largest posterior-mean norm."""
    W2 = idata.posterior["W2"].mean(("chain", "draw")).values  # (class, hidden)
    return [int(i) for i in np.argsort(-np.linalg.norm(W2, axis=0))[:num]]


def plot_weight_forest(
    idata: Any, path: str | Path | None = None, hidden: Sequence[int] | None = None, num_hidden: int = 3,
) -> Figure:
    """ArviZ forest plot (94% HDI of the guide draws) of W2 for a few hidden units, every class."""
    hidden = list(hidden) if hidden is not None else top_hidden_units(idata, num_hidden)
    rows = len(hidden) * idata.posterior.sizes["class"]
    fig = new_figure(6, 0.25 * rows + 1.5)
    ax = fig.subplots()
    with _ArvizPlotWarnings():
        az.plot_forest(idata, var_names=["W2"], coords={"hidden": hidden}, combined=True, ax=ax)
    ax.set_title(f"q(W2) for hidden units {hidden}: 94% HDI of {idata.posterior.sizes['draw']} guide draws")
    ax.set_xlabel("weight")
    return finish(fig, path)


def plot_eta_posterior(idata: Any, path: str | Path | None = None,
                       true_extent: Mapping[str, float] | None = None) -> Figure:
    """ArviZ posterior plot of q(eta) per generator (full Bayes only), the true extent as reference value.

    Raises
    ------
    ValueError
        When eta is a point estimate (empirical Bayes): there is no distribution to plot.
    """
    if "eta" not in idata.posterior:
        raise ValueError("eta is a point estimate (empirical Bayes) in this run: no posterior to plot")
    fig = new_figure(10, 5.5)
    axes = fig.subplots(2, 3)
    marked = [{"generator": g, "ref_val": float(v)} for g, v in (true_extent or {}).items() if v > 0]
    ref = {"eta": marked} if marked else None  # only the generators the data was transformed with
    with _ArvizPlotWarnings():
        az.plot_posterior(idata, var_names=["eta"], ax=axes, ref_val=ref, textsize=8)
    fig.suptitle("q(eta) under full Bayes (prior U(0, pi)); orange line: true extent of the data")
    return finish(fig, path)


def plot_trace(idata: Any, path: str | Path | None = None, var_names: Sequence[str] = ("W2", "b2"),
               title: str = "NUTS reference: trace") -> Figure:
    """ArviZ trace plot (densities per chain, traces) of an MCMC posterior."""
    fig = new_figure(10, 2.2 * len(var_names) + 0.6)
    axes = fig.subplots(len(var_names), 2, squeeze=False)
    with _ArvizPlotWarnings():
        az.plot_trace(idata, var_names=list(var_names), compact=True, axes=axes)
    fig.suptitle(title)
    return finish(fig, path)


def plot_pareto_k(k: np.ndarray, path: str | Path | None = None, good_k: float = 0.7,
                  title: str = "PSIS-LOO Pareto k per test example (variational draws)") -> Figure:
    """Pareto k of each observation, with the 0.5 / 0.7 / good_k thresholds."""
    k = np.asarray(k, dtype=float)
    fig = new_figure(7, 3.5)
    ax = fig.subplots()
    ax.scatter(np.arange(len(k)), np.clip(k, -0.5, 2.0), s=6, c=np.where(k > 0.7, "tab:red", "tab:blue"))
    for value, style in ((0.5, ":"), (0.7, "--"), (good_k, "-.")):
        ax.axhline(value, color="k", ls=style, lw=0.8, label=f"k = {value:.2f}")
    ax.set_xlabel("test example")
    ax.set_ylabel("Pareto k (clipped to [-0.5, 2])")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return finish(fig, path)


def plot_reference_comparison(table: Any, path: str | Path | None = None,
                              title: str = "guide against the NUTS reference") -> Figure:
    """Posterior means and standard deviations of the guide against NUTS (from
    :func:`inference.diagnostics.nuts.compare_with_reference`), one point per parameter."""
    fig = new_figure(9, 4.2)
    ax_mean, ax_sd = fig.subplots(1, 2)
    for ax, col, label in ((ax_mean, "mean", "posterior mean"), (ax_sd, "sd", "posterior std")):
        ref, app = table[f"nuts_{col}"].to_numpy(), table[f"guide_{col}"].to_numpy()
        lo, hi = float(min(ref.min(), app.min())), float(max(ref.max(), app.max()))
        pad = 0.05 * (hi - lo + 1e-9)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
        ax.scatter(ref, app, s=14)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(f"NUTS {label}")
        ax.set_ylabel(f"guide {label}")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return finish(fig, path)


def plot_loo_comparison(table: Any, path: str | Path | None = None,
                        title: str = "PSIS-LOO on variational draws (test set)",
                        elpd_test: Mapping[str, float] | None = None) -> Figure:
    """elpd_loo +- se of each model (ArviZ's comparison table), and the direct held-out elpd if given."""
    fig = new_figure(7, 1.2 + 0.7 * len(table))
    ax = fig.subplots()
    names = list(table.index)
    col = "elpd_loo" if "elpd_loo" in table else "elpd_waic"
    y = np.arange(len(names))
    ax.errorbar(table[col], y, xerr=table["se"], fmt="o", color="tab:blue", capsize=4, label=f"{col} +- se")
    if elpd_test:
        ax.scatter([elpd_test[n] for n in names], y + 0.15, marker="s", color="tab:red",
                   label="direct held-out elpd")
    ax.set_yticks(y, names)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel("expected log predictive density (nats, test set)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return finish(fig, path)
