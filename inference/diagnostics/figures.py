"""Posterior figures, drawn with ArviZ where it has the plot, headless and in the style of :mod:`inference.plots`:
each takes an ``arviz.InferenceData`` (or numbers or a table made from one) and an optional output path, and returns
the ``Figure``.

* :func:`plot_eta_posterior`: q(eta) under full Bayes;
* :func:`plot_trace`, :func:`plot_reference_comparison`: a NUTS reference and the guide beside it;
* :func:`plot_pareto_k`, :func:`plot_loo_comparison`: PSIS-LOO diagnostics on the training data and model
  comparison, with the held-out test elpd apart.

:func:`top_hidden_units` ranks hidden units by the size of their output weights (the filters worth drawing).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from inference.diagnostics.arviz_io import az, site_mean
from inference.plots import finish, new_figure, styled


class _ArvizPlotWarnings(warnings.catch_warnings):
    """Ignore the one known-harmless warning of ArviZ 0.23's matplotlib backend under matplotlib >= 3.11
    (``normalize_kwargs`` called with a dict alias map); nothing else."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message=r"Passing a dict or None as alias_mapping to normalize_kwargs",
                                category=DeprecationWarning)


def top_hidden_units(idata: Any, num: int = 4) -> list[int] | None:
    """Hidden units whose output weights W2 have the largest posterior-mean norm (None without W2 in ``idata``)."""
    W2 = site_mean(idata, "W2")  # (class, hidden)
    return None if W2 is None else [int(i) for i in np.argsort(-np.linalg.norm(W2, axis=0))[:num]]


@styled
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


@styled
def plot_trace(idata: Any, path: str | Path | None = None, var_names: Sequence[str] = ("W2", "b2"),
               title: str = "NUTS reference: trace") -> Figure:
    """ArviZ trace plot of an MCMC posterior: per variable, the density of every element in each chain (left) and its
    trace (right); one colour per element, one line style per chain."""
    fig = new_figure(10, 2.4 * len(var_names) + 0.8)
    axes = fig.subplots(len(var_names), 2, squeeze=False)
    with _ArvizPlotWarnings():
        az.plot_trace(idata, var_names=list(var_names), compact=True, axes=axes)
    for density, trace in axes:
        density.set(xlabel="value", ylabel="density")
        trace.set(xlabel="draw (after warm-up)", ylabel="value")
    chains = idata.posterior.sizes["chain"]
    fig.suptitle(f"{title}\none colour per element, one line style per chain ({chains} chains)")
    return finish(fig, path)


@styled
def plot_pareto_k(k: np.ndarray, path: str | Path | None = None, good_k: float = 0.7, num_draws: int | None = None,
                  title: str = "PSIS-LOO Pareto k per training example", labels: Sequence[int] | None = None) -> Figure:
    """Pareto k of each observation ``(N,)`` in ArviZ's categories for this many draws: good (``k <= good_k``,
    ArviZ's threshold min(1 - 1/log10 M, 0.7)), bad (up to 1) and very bad (above 1), each colour explained.
    With ``labels`` ``(N,)`` the examples are grouped by class along the x axis."""
    k = np.asarray(k, dtype=float)
    order = np.argsort(np.asarray(labels), kind="stable") if labels is not None else np.arange(len(k))
    k_sorted = k[order]
    fig = new_figure(7.5, 3.9)
    ax = fig.subplots()
    idx = np.arange(len(k))
    shown = np.clip(k_sorted, -0.5, 2.0)
    bins = ((k_sorted <= good_k, "tab:blue", f"k <= {good_k:.2f}: leaving the example out is estimated reliably"),
            ((k_sorted > good_k) & (k_sorted <= 1), "tab:orange", f"{good_k:.2f} < k <= 1: unreliable (biased, noisy)"),
            (k_sorted > 1, "tab:red", "k > 1: unusable (the importance ratios have no finite mean)"))
    for mask, color, text in bins:
        ax.scatter(idx[mask], shown[mask], s=5, color=color, label=f"{text}: {int(mask.sum())} of {len(k)}")
    draws = f" for M = {num_draws} draws" if num_draws else ""
    ax.axhline(good_k, color="k", ls="--", lw=0.8, label=f"ArviZ's threshold{draws}: min(1 - 1/log10 M, 0.7)")
    ax.axhline(1.0, color="k", ls=":", lw=0.8)
    if labels is not None:
        classes, starts = np.unique(np.asarray(labels)[order], return_index=True)
        ends = np.append(starts[1:], len(k))
        for start in starts[1:]:
            ax.axvline(start - 0.5, color="0.8", lw=0.6, zorder=0)
        ax.set_xticks((starts + ends - 1) / 2, [str(int(c)) for c in classes])
        ax.set_xlabel("training examples, grouped by class")
    else:
        ax.set_xlabel("training example")
    ax.set_ylabel("Pareto k (clipped to [-0.5, 2])")
    ax.set_title(title + (f"\nM = {num_draws} draws from q: below 100 draws the threshold is strict and k itself "
                          "noisy; rerun with more --draws" if num_draws and num_draws < 100 else ""))
    ax.legend(loc="upper left", fontsize=7)
    ax.set_ylim(-0.55, 2.25)
    return finish(fig, path)


@styled
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


@styled
def plot_loo_comparison(table: Any, path: str | Path | None = None,
                        title: str = "model comparison: PSIS-LOO on the training data, elpd of the test data",
                        elpd_test: Mapping[str, tuple[float, float]] | None = None) -> Figure:
    """Left: elpd_loo +- se of each model on the training data (ArviZ's comparison table, best first). Right, given
    ``elpd_test`` (name -> (elpd, se)): the direct elpd of the held-out test data, a different set and size."""
    names = list(table.index)
    col = "elpd_loo" if "elpd_loo" in table else "elpd_waic"
    fig = new_figure(9 if elpd_test else 5.5, 1.6 + 0.6 * len(names))
    axes = fig.subplots(1, 2 if elpd_test else 1, sharey=True, squeeze=False)[0]
    y = np.arange(len(names))
    axes[0].errorbar(table[col], y, xerr=table["se"], fmt="o", color="tab:blue", capsize=4)
    axes[0].set(xlabel=f"{col} (nats, training data) +- se", title="PSIS-LOO, training data")
    if elpd_test:
        test = np.array([elpd_test[n] for n in names], dtype=float)
        axes[1].errorbar(test[:, 0], y, xerr=test[:, 1], fmt="s", color="tab:red", capsize=4)
        axes[1].set(xlabel="elpd_test (nats, held-out test data) +- se", title="direct estimate, test data")
    axes[0].set_yticks(y, names)
    axes[0].set_ylim(len(names) - 0.5, -0.5)  # best first, at the top
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return finish(fig, path)
