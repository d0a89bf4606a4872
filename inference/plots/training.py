"""Training curves: eta of each generator and the ELBO with its two terms, against the SVI step.

eta is drawn in the units a reader knows, one panel per unit: the rotation in degrees (with the line at 180 deg,
from which on T covers the full circle), translations in pixels, scale, stretch and shear as their dimensionless
coefficients (a scale coefficient c multiplies lengths by e^c). The ELBO / N is drawn with its expected
log-likelihood and KL, each on its own axis (their sizes differ by orders of magnitude between guides).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from inference.data import pixels_per_unit
from inference.plots.images import as_numpy
from inference.plots.style import finish, new_figure, styled
from models.transforms import ALL_GENERATOR_NAMES, GENERATOR_NAMES

GENERATOR_COLORS = dict(zip(ALL_GENERATOR_NAMES, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:olive",
                                                  "tab:purple", "tab:green", "tab:olive"), strict=True))

ETA_PANELS = (
    ("rotation", ("rotate",), "eta_rotate (degrees)"),
    ("translation", ("translate_x", "translate_y"), "eta (pixels)"),
    ("scale and shear", ("scale_x", "scale_y", "scale", "stretch", "shear"),
     "eta (coefficient; a scale up to x e^eta)"),
)
"""The panels of :func:`plot_eta_trajectories`: name, generators, y label."""


def eta_in_units(name: str, values: np.ndarray, image_size: int) -> np.ndarray:
    """eta of generator ``name`` in the units of its panel: degrees for rotation, pixels for translations (on
    images ``image_size`` pixels wide, :func:`inference.data.pixels_per_unit`), the coefficient otherwise."""
    if name == "rotate":
        return np.degrees(values)
    if name.startswith("translate"):
        return np.asarray(values) * pixels_per_unit(image_size)
    return np.asarray(values)


def mark_steps(ax: Axes, marks: Mapping[str, int] | None, label: bool = True) -> None:
    """Dotted vertical lines at the steps of ``marks`` (label -> step), labelled at the top when ``label``."""
    for text, step in (marks or {}).items():
        ax.axvline(step, color="0.4", ls=":", lw=1.2)
        if label:
            ax.annotate(text, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=7, color="0.3")


@styled
def plot_eta_trajectories(
    steps: Sequence[int] | np.ndarray, eta: np.ndarray | torch.Tensor, true_extent: Mapping[str, float] | None = None,
    path: str | Path | None = None, title: str = "eta during training", names: Sequence[str] = GENERATOR_NAMES,
    marks: Mapping[str, int] | None = None, image_size: int = 28,
) -> Figure:
    """eta of each generator against the training step, one panel per unit (:data:`ETA_PANELS`), the true extent of
    the data dashed.

    Parameters
    ----------
    steps : ``(T,)``; eta : ``(T, K)`` in the units of T (rad for rotate, normalised units for translations,
        coefficients for the others), converted for drawing (:func:`eta_in_units`).
    true_extent : mapping, optional
        Generator -> extent of the data's transformation (units of T); non-zero ones are drawn dashed.
    names : sequence of str
        eta's generators (the run's basis), one per column of ``eta``.
    marks : mapping, optional
        Label -> step, drawn as dotted vertical lines (the end of eta's burn-in, the start of the
        predicting phase of the sequential schedule).
    image_size : int
        Width of the images in pixels (translations are drawn in pixels).
    """
    eta = as_numpy(eta)
    panels = [(t, [n for n in gens if n in names], label) for t, gens, label in ETA_PANELS]
    panels = [p for p in panels if p[1]]
    fig = new_figure(4.2 * len(panels) + 0.4, 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    extent = true_extent or {}
    for i, (ax, (panel, gens, ylabel)) in enumerate(zip(axes, panels, strict=True)):
        for name in gens:
            values = eta_in_units(name, eta[:, list(names).index(name)], image_size)
            ax.plot(steps, values, color=GENERATOR_COLORS[name], label=name)
            true = float(eta_in_units(name, np.array(extent.get(name, 0.0)), image_size))
            full_circle = name == "rotate" and abs(true - 180) < 0.5
            if true > 0:
                ax.axhline(true, color=GENERATOR_COLORS[name], ls="--", lw=1.2,
                           label="true extent of the data: 180 deg, the full circle" if full_circle
                           else f"true extent of the data ({name}: {true:.3g})")
            if name == "rotate" and not full_circle:
                ax.axhline(180, color="0.3", ls="-.", lw=1, label="180 deg: T covers the full circle")
        mark_steps(ax, marks, label=i == 0)
        ax.set(xlabel="SVI step", ylabel=ylabel, title=", ".join(gens) if panel != "rotation" else panel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(title)
    return finish(fig, path)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average of the same length (shorter windows at the start)."""
    values = np.asarray(values, dtype=float)
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


@styled
def plot_elbo(
    iterations: Sequence[int] | np.ndarray, elbo: Sequence[float] | np.ndarray, path: str | Path | None = None,
    final_elbo: float | None = None, window: int = 25, title: str = "ELBO per training example",
    terms: Mapping[str, Sequence[float]] | None = None, final_terms: Mapping[str, float] | None = None,
    marks: Mapping[str, int] | None = None, final_step: int | None = None,
) -> Figure:
    """The ELBO / N of every step (its minibatch estimate, and its moving average) and, given ``terms``, its two
    terms at the logged steps on axes of their own.

    Parameters
    ----------
    iterations, elbo : ``(T,)``
        Step and minibatch ELBO / N (-loss / N) of every step.
    final_elbo : float, optional
        The ELBO / N of the trained guide over the whole training set, drawn at ``final_step`` (default: the last
        step; on the sequential schedule the evidence guide stops at the end of its phase).
    terms : mapping, optional
        ``{"step", "expected_loglik", "kl"}``, each ``(L,)``: the terms per example at the logged steps.
    final_terms : mapping, optional
        ``{"expected_loglik", "kl"}`` over the whole training set at the end (``metrics.json``'s ``elbo_terms``).
    marks : mapping, optional
        Label -> step, dotted vertical lines (e.g. where the sequential schedule changes guide).
    """
    elbo = np.asarray(elbo, dtype=float)
    end = int(iterations[-1]) if final_step is None else int(final_step)
    rows = 3 if terms else 1
    fig = new_figure(7, 3.2 + 2.3 * (rows - 1))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(iterations, elbo, color="0.7", lw=0.8, label="minibatch estimate (every step)")
    ax.plot(iterations, moving_average(elbo, window), color="tab:blue", label=f"moving average ({window} steps)")
    if final_elbo is not None:
        ax.scatter([end], [final_elbo], color="tab:red", zorder=3,
                   label=f"whole training set, end: {final_elbo:.3f}")
    ax.set(ylabel="ELBO / N (nats)", title=title)
    panels = (("expected_loglik", "expected log-likelihood / N (nats)", "tab:blue"),
              ("kl", "KL(q || prior) / N (nats)", "tab:green"))
    for ax_term, (key, label, color) in zip(axes[1:], panels, strict=False):
        ax_term.plot(terms["step"], terms[key], ".-", color=color, lw=1, ms=3,
                     label="one draw on the step's minibatch (logged steps)")
        if final_terms is not None and key in final_terms:
            ax_term.scatter([end], [final_terms[key]], color="tab:red", zorder=3,
                            label=f"whole training set, end: {final_terms[key]:.3f}")
        ax_term.set_ylabel(label)
    for i, a in enumerate(axes):
        mark_steps(a, marks, label=i == 0)
        a.grid(alpha=0.3)
        a.legend(loc="best")
    axes[-1].set_xlabel("SVI step")
    if terms:
        axes[0].text(0.99, 0.03, "ELBO = expected log-likelihood - KL", transform=axes[0].transAxes, ha="right",
                     fontsize=7, color="0.3")
    return finish(fig, path)
