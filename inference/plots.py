"""Figures of a fitted run, headless: each ``plot_*`` function takes arrays and an optional output path and returns
the ``matplotlib.figure.Figure`` (saved when a path is given), drawn on its own Agg canvas without pyplot.

The paper's pictures (van der Ouderaa & van der Wilk, 2022, Figs. 4-5): :func:`plot_filter_bank` (rows of W1 as
images), :func:`plot_invariant_filters` (the filters averaged over transformations from the learned distribution,
rings on rotated MNIST), :func:`plot_eta_trajectories` (eta during training against the true extent); and
:func:`plot_elbo`, :func:`plot_reliability`, :func:`plot_transformed_digits`. The posterior figures drawn with
ArviZ are in :mod:`inference.diagnostics.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.transforms import (
    ALL_GENERATOR_NAMES,
    GENERATOR_NAMES,
    affine_generators,
    affine_matrices,
    warp_filters,
    warp_images,
)

GENERATOR_COLORS = dict(zip(ALL_GENERATOR_NAMES, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:olive",
                                                  "tab:purple", "tab:green", "tab:olive"), strict=True))


# --------------------------------------------------------------------------- helpers
def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def finish(fig: Figure, path: str | Path | None, dpi: int = 110) -> Figure:
    """Save ``fig`` to ``path`` (creating folders) when a path is given; return the figure."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def _as_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def sample_transforms(
    eta: np.ndarray | torch.Tensor, num: int, seed: int = 0, names: Sequence[str] = GENERATOR_NAMES
) -> torch.Tensor:
    """``num`` transformations from the learned distribution, T = expm(sum_k eps_k eta_k G_k), ``(num, 3, 3)``.

    eps ~ U[-1, 1]^K from a private generator seeded with ``seed`` (the global RNG is untouched); ``eta`` is
    ``(K,)`` (empirical Bayes) or draws ``(M, K)`` (full Bayes: a random draw per transformation).
    """
    eta_t = torch.as_tensor(_as_numpy(eta), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.rand(num, len(names), generator=gen) * 2 - 1  # (num, K)
    if eta_t.dim() == 2:
        eta_t = eta_t[torch.randint(0, eta_t.shape[0], (num,), generator=gen)]
    return affine_matrices(eta_t, eps, affine_generators(tuple(names)))


# --------------------------------------------------------------------------- filters
def invariant_filters(
    W1: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, image_shape: tuple[int, int, int] = (1, 28, 28),
    num_samples: int = 128, seed: int = 0, names: Sequence[str] = GENERATOR_NAMES,
) -> np.ndarray:
    """Filters ``(F, C*H*W)`` averaged over ``num_samples`` transformations from the learned distribution
    (:func:`sample_transforms`): ``mean_s W1 o T_s``, ``(F, C*H*W)``."""
    W = torch.as_tensor(_as_numpy(W1), dtype=torch.float32)
    with torch.no_grad():
        return warp_filters(W, sample_transforms(eta, num_samples, seed, names), image_shape).mean(0).numpy()


def _image_grid(fig: Figure, images: np.ndarray, ncols: int, titles: Sequence[str] | None = None,
                symmetric: bool = True, cmap: str = "RdBu_r") -> list[Axes]:
    """Images ``(n, C, H, W)`` in a grid of ``ncols`` columns, one colour scale per image (:func:`show_image`)."""
    n = images.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.set_axis_off()
            continue
        show_image(ax, images[i], symmetric, cmap)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    return [ax for ax in axes.flat][:n]


def show_image(ax: Axes, img: np.ndarray | torch.Tensor, symmetric: bool = False, cmap: str = "gray") -> None:
    """Draw one image ``(C, H, W)`` on ``ax``: three channels in colour (RGB; signed values, ``symmetric``, around
    mid-grey at 0, scaled by the image's largest magnitude), otherwise the channel mean with ``cmap``
    (``symmetric``: on a scale centred at 0). Pictures of any dataset, MNIST's or CIFAR-10's, go through here."""
    img = _as_numpy(img)
    if img.shape[0] == 3:
        rgb = np.moveaxis(img, 0, -1)
        if symmetric:
            rgb = 0.5 + 0.5 * rgb / (float(np.abs(rgb).max()) or 1.0)
        ax.imshow(np.clip(rgb, 0.0, 1.0), interpolation="nearest")
        return
    img = img.mean(0)
    if symmetric:
        vmax = float(np.abs(img).max()) or 1.0
        ax.imshow(img, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(img, cmap=cmap, interpolation="nearest")


def _filter_figure(W: np.ndarray, image_shape: tuple[int, int, int], ncols: int, title: str,
                   path: str | Path | None) -> Figure:
    """Filters ``(F, C*H*W)`` as images with a scale of their own: in colour for three channels (mid-grey = 0),
    else blue < 0 < red over the channel mean."""
    fig = new_figure(1.3 * ncols, 1.3 * math.ceil(W.shape[0] / ncols) + 0.5)
    _image_grid(fig, W.reshape(W.shape[0], *image_shape), ncols)
    fig.suptitle(title)
    return finish(fig, path)


def plot_filter_bank(
    W1: np.ndarray | torch.Tensor, path: str | Path | None = None, image_shape: tuple[int, int, int] = (1, 28, 28),
    num_filters: int = 32, ncols: int = 8, title: str = "learned filters (posterior mean of W1)",
) -> Figure:
    """The first ``num_filters`` rows of W1 ``(D, C*H*W)`` as images."""
    return _filter_figure(_as_numpy(W1)[:num_filters], image_shape, ncols, title, path)


def plot_invariant_filters(
    W1: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, path: str | Path | None = None,
    image_shape: tuple[int, int, int] = (1, 28, 28), num_filters: int = 32, ncols: int = 8, num_samples: int = 128,
    title: str | None = None, seed: int = 0, names: Sequence[str] = GENERATOR_NAMES,
) -> Figure:
    """The first ``num_filters`` filters averaged over ``num_samples`` transformations from the learned eta (the
    paper's figure); ``title`` (e.g. the run's name) goes in front of the standard title, ``names`` is eta's basis."""
    inv = invariant_filters(_as_numpy(W1)[:num_filters], eta, image_shape, num_samples, seed, names)
    return _filter_figure(inv, image_shape, ncols, f"{title + ': ' if title else ''}invariant filters, mean over "
                          f"{num_samples} T ~ learned distribution ({_eta_text(eta, names)})", path)


def _eta_text(eta: np.ndarray | torch.Tensor, names: Sequence[str] = GENERATOR_NAMES) -> str:
    e = _as_numpy(eta)
    e = np.median(e, axis=0) if e.ndim == 2 else e
    parts = [f"{name} {value:.2f}" for name, value in zip(names, e, strict=True) if value > 0.05]
    return "eta: " + (", ".join(parts) if parts else "all < 0.05")


# --------------------------------------------------------------------------- training curves
def plot_eta_trajectories(
    steps: Sequence[int] | np.ndarray, eta: np.ndarray | torch.Tensor, true_extent: Mapping[str, float] | None = None,
    path: str | Path | None = None, title: str = "eta during training", ax: Axes | None = None,
    names: Sequence[str] = GENERATOR_NAMES, marks: Mapping[str, int] | None = None,
) -> Figure:
    """eta of each generator against the training step, the true extent of the data dashed.

    Parameters
    ----------
    steps : ``(T,)``; eta : ``(T, K)`` in the units of T (rad for rotate, normalised units for translations,
        log-scale for scales).
    true_extent : mapping, optional
        Generator -> extent of the data's transformation; non-zero ones are drawn as dashed lines.
    names : sequence of str
        eta's generators (the run's basis), one per column of ``eta``.
    marks : mapping, optional
        Label -> step, drawn as dotted vertical lines (the end of eta's burn-in, the start of the
        predicting phase of the sequential schedule).
    """
    eta = _as_numpy(eta)
    fig = ax.figure if ax is not None else new_figure(7, 4.2)
    ax = ax if ax is not None else fig.subplots()
    for k, name in enumerate(names):
        ax.plot(steps, eta[:, k], color=GENERATOR_COLORS[name], label=name, lw=1.6)
    for name, value in (true_extent or {}).items():
        if value > 0:
            ax.axhline(value, color=GENERATOR_COLORS[name], ls="--", lw=1.2,
                       label=f"true extent {name} = {value:.3g}")
    for label, step in (marks or {}).items():
        ax.axvline(step, color="0.4", ls=":", lw=1.2)
        ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=7, color="0.3")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("eta (rad | normalised units | log-scale)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return finish(fig, path)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average of the same length (shorter windows at the start)."""
    values = np.asarray(values, dtype=float)
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_elbo(
    iterations: Sequence[int] | np.ndarray, elbo: Sequence[float] | np.ndarray, path: str | Path | None = None,
    final_elbo: float | None = None, window: int = 25, title: str = "ELBO per training example",
) -> Figure:
    """Minibatch ELBO / N per step, its moving average, and the full-data ELBO / N at the end if given."""
    elbo = np.asarray(elbo, dtype=float)
    fig = new_figure(7, 4)
    ax = fig.subplots()
    ax.plot(iterations, elbo, color="0.7", lw=0.8, label="minibatch estimate")
    ax.plot(iterations, moving_average(elbo, window), color="tab:blue", lw=1.6, label=f"moving average ({window})")
    if final_elbo is not None:
        ax.scatter([iterations[-1]], [final_elbo], color="tab:red", zorder=3, label=f"full data: {final_elbo:.3f}")
    lo, hi = np.percentile(elbo, [2, 100])
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO / N (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return finish(fig, path)


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


def plot_reliability(
    probs: np.ndarray, y: np.ndarray, path: str | Path | None = None, num_bins: int = 10,
    title: str = "reliability diagram (test set)",
) -> Figure:
    """Accuracy against confidence per bin (bars) and the diagonal of perfect calibration; counts below."""
    bins = reliability_bins(probs, y, num_bins)
    fig = new_figure(5, 5.5)
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
    top.set_title(f"{title}\naccuracy {accuracy:.3f}, ECE {bins['ece']:.3f}", fontsize=10)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centers, bins["count"], width=width, edgecolor="k", color="0.6")
    bottom.set_xlabel("confidence (max predictive probability)")
    bottom.set_ylabel("examples")
    return finish(fig, path)


# --------------------------------------------------------------------------- transformed digits
def transform_samples(
    images: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, num_samples: int = 8, seed: int = 0,
    names: Sequence[str] = GENERATOR_NAMES,
) -> np.ndarray:
    """Images ``(n, C, H, W)``, each warped by ``num_samples`` transformations from the learned distribution
    (:func:`sample_transforms`), ``(n, num_samples, C, H, W)``."""
    x = torch.as_tensor(_as_numpy(images), dtype=torch.float32)
    n = x.shape[0]
    T = sample_transforms(eta, n * num_samples, seed, names)  # (n * samples, 3, 3)
    with torch.no_grad():
        return warp_images(x.repeat_interleave(num_samples, dim=0), T).reshape(n, num_samples, *x.shape[1:]).numpy()


def plot_transformed_digits(
    images: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, path: str | Path | None = None,
    num_samples: int = 8, seed: int = 0, title: str | None = None, names: Sequence[str] = GENERATOR_NAMES,
) -> Figure:
    """Test images ``(n, C, H, W)`` (first column; colour for three channels) and ``num_samples`` warps of each
    by T ~ the learned distribution.

    ``names`` is eta's generator basis.
    """
    x = _as_numpy(images)
    warped = transform_samples(x, eta, num_samples, seed, names)
    n = x.shape[0]
    grid = np.concatenate([x[:, None], warped], axis=1)  # (n, 1 + samples, C, H, W)
    fig = new_figure(1.1 * (num_samples + 1), 1.1 * n + 0.6)
    titles = ["original"] + [f"T{i + 1}" for i in range(num_samples)]
    axes = _image_grid(fig, grid.reshape(-1, *grid.shape[2:]), num_samples + 1,
                       titles=titles + [""] * (grid.shape[0] * grid.shape[1] - len(titles)),
                       symmetric=False, cmap="gray_r")
    for ax in axes[:: num_samples + 1]:
        for spine in ax.spines.values():
            spine.set_edgecolor("tab:red")
    fig.suptitle(f"{title + ': ' if title else ''}{'digits' if x.shape[1] == 1 else 'images'} transformed by the "
                 "learned distribution "
                 f"({_eta_text(eta, names)})")
    return finish(fig, path)
