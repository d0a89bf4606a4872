"""Figures of the posterior predictive: calibration (reliability diagram) and uncertainty against the rotation of
the input (:mod:`inference.uncertainty`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from inference.plots.style import finish, new_figure, styled
from inference.uncertainty import RotationSweep


# --------------------------------------------------------------------------- calibration
def reliability_bins(probs: np.ndarray, y: np.ndarray, num_bins: int = 10) -> dict[str, np.ndarray | float]:
    """Accuracy and mean confidence per confidence bin, and the expected calibration error.

    Parameters
    ----------
    probs : ``(N, classes)`` predictive probabilities; y : ``(N,)`` labels.

    Returns
    -------
    dict
        ``edges (num_bins + 1,)``, ``confidence``, ``accuracy``, ``count`` ``(num_bins,)`` (NaN in empty bins)
        and ``ece`` = sum_b (n_b / N) |acc_b - conf_b|.
    """
    probs, y = np.asarray(probs, dtype=float), np.asarray(y)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, num_bins - 1)
    count = np.bincount(which, minlength=num_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=correct, minlength=num_bins) / count
        confidence = np.bincount(which, weights=conf, minlength=num_bins) / count
    ece = float(np.nansum(count / count.sum() * np.abs(accuracy - confidence)))
    return {"edges": edges, "confidence": confidence, "accuracy": accuracy, "count": count, "ece": ece}


@styled
def plot_reliability(
    probs: np.ndarray, y: np.ndarray, path: str | Path | None = None, num_bins: int = 10,
    title: str = "reliability diagram (test set)",
) -> Figure:
    """Accuracy against confidence per bin (bars) and the diagonal of perfect calibration; counts below."""
    bins = reliability_bins(probs, y, num_bins)
    fig = new_figure(5.5, 5.8)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    edges = bins["edges"]
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    acc = np.nan_to_num(bins["accuracy"])
    top.bar(centers, acc, width=width, edgecolor="k", color="tab:blue", alpha=0.8, label="accuracy")
    filled = bins["count"] > 0
    top.scatter(centers[filled], bins["confidence"][filled], color="tab:red", marker="_", s=400, lw=2.5, zorder=3,
                label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    accuracy = float((np.asarray(probs).argmax(1) == np.asarray(y)).mean())
    top.set_title(f"{title}\naccuracy {accuracy:.3f}, expected calibration error {bins['ece']:.3f}", fontsize=9)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    bottom.bar(centers, bins["count"], width=width, edgecolor="k", color="0.6")
    bottom.set_xlabel("confidence (max predictive probability)")
    bottom.set_ylabel("examples")
    top.set_xlabel("")
    return finish(fig, path)


# --------------------------------------------------------------------------- uncertainty against input rotation
@styled
def plot_rotation_sweep(
    sweeps: Mapping[str, RotationSweep], path: str | Path | None = None, data_range_deg: float | None = None,
    eta_deg: Mapping[str, float] | None = None, title: str = "predictive uncertainty against input rotation",
) -> Figure:
    """Accuracy and predictive entropy (total, and its epistemic part, the mutual information) of each model's
    posterior predictive against the rotation of its input.

    Parameters
    ----------
    sweeps : mapping
        Model name -> :class:`~inference.uncertainty.RotationSweep` (the same examples and angles for all).
    data_range_deg : float, optional
        The training data were rotated by U[-a, a] degrees: shaded.
    eta_deg : mapping, optional
        Model name -> its eta_rotate in degrees: dotted lines at +- eta (T's rotations reach that far).
    """
    first = next(iter(sweeps.values()))
    fig = new_figure(10, 3.9)
    ax_acc, ax_ent = fig.subplots(1, 2, sharex=True)
    for i, (name, sweep) in enumerate(sweeps.items()):
        color = f"C{i % 10}"
        ax_acc.plot(sweep.angles_deg, 100 * sweep.accuracy, "o-", ms=3, color=color, label=name)
        ax_ent.plot(sweep.angles_deg, sweep.entropy, "o-", ms=3, color=color, label=f"{name}: total")
        ax_ent.plot(sweep.angles_deg, sweep.mutual_information, "s--", ms=3, color=color,
                    label=f"{name}: epistemic (mutual information)")
        eta = (eta_deg or {}).get(name)
        if eta is not None and eta > 0.5:
            for ax in (ax_acc, ax_ent):
                for sign in (-1, 1):
                    label = f"{name}: T's rotations reach +- eta_rotate ({eta:.0f} deg)"
                    ax.axvline(sign * min(eta, 180), color=color, ls=":", lw=1.2,
                               label=label if ax is ax_acc and sign > 0 else None)
    for ax in (ax_acc, ax_ent):
        if data_range_deg:
            ax.axvspan(-data_range_deg, data_range_deg, color="0.95", zorder=0,
                       label=f"training data rotated within +-{data_range_deg:.0f} deg" if ax is ax_acc else None)
        ax.set_xlabel("rotation of the input (degrees)")
        ax.set_xticks(np.arange(-180, 181, 45))
        ax.set_xlim(-185, 185)
        ax.grid(alpha=0.3)
    ax_acc.set(ylabel="accuracy (%)", ylim=(0, 100), title="accuracy of the posterior predictive")
    top = math.log(first.num_classes)
    highest = max(float(np.max(sweep.entropy)) for sweep in sweeps.values())
    ax_ent.set(ylabel="entropy (nats)", ylim=(0, min(top, 1.3 * highest) * 1.02),
               title=f"predictive entropy (uniform over {first.num_classes} classes: {top:.2f})")
    ax_acc.legend(loc="lower center")
    ax_ent.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"{title}: {first.num_examples} upright test examples, each rotated by every angle; "
                 f"{first.num_draws} weight draws")
    return finish(fig, path)
