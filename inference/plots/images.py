"""Pictures: data, first-layer filters, filters averaged over the learned transformations, transformed examples.

Filters (rows of W1) are drawn each on a scale of its own, ``w / max |w|`` in [-1, 1] with one colour key
(blue < 0 < red); three-channel filters (CIFAR-10) in colour around mid-grey at 0. Images of data are drawn as
they are, grey in [0, 1] for one channel (one colour key), in colour for three.

Shapes: filters ``(F, C*H*W)``, images ``(n, C, H, W)``, eta ``(K,)`` (empirical Bayes) or draws ``(M, K)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from inference.data import pixels_per_unit
from inference.plots.style import finish, new_figure, styled
from models.transforms import GENERATOR_NAMES, affine_generators, affine_matrices, warp_filters, warp_images

FILTER_CMAP, IMAGE_CMAP = "RdBu_r", "gray_r"


def as_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """A tensor or array as a numpy array (on the CPU)."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# --------------------------------------------------------------------------- transformations from the learned eta
def sample_coefficients(
    eta: np.ndarray | torch.Tensor, num: int, seed: int = 0, names: Sequence[str] = GENERATOR_NAMES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` draws of the learned distribution's Lie-algebra coordinates: ``(eta_s, eps_s)``, each ``(num, K)``.

    eps ~ U[-1, 1]^K from a private generator seeded with ``seed`` (the global RNG is untouched); ``eta`` is
    ``(K,)`` (empirical Bayes) or draws ``(M, K)`` (full Bayes: a random draw per transformation).
    T_s = expm(sum_k eps_sk eta_sk G_k); ``eps_s * eta_s`` is the sampled coefficient of each generator
    (for rotation alone, the angle in radians).
    """
    eta_t = torch.as_tensor(as_numpy(eta), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.rand(num, len(names), generator=gen) * 2 - 1  # (num, K)
    if eta_t.dim() == 2:
        eta_t = eta_t[torch.randint(0, eta_t.shape[0], (num,), generator=gen)]
    return eta_t.expand(num, len(names)), eps


def sample_transforms(
    eta: np.ndarray | torch.Tensor, num: int, seed: int = 0, names: Sequence[str] = GENERATOR_NAMES
) -> torch.Tensor:
    """``num`` transformations from the learned distribution, T = expm(sum_k eps_k eta_k G_k), ``(num, 3, 3)``
    (:func:`sample_coefficients`)."""
    eta_s, eps = sample_coefficients(eta, num, seed, names)
    return affine_matrices(eta_s, eps, affine_generators(tuple(names)))


def eta_text(eta: np.ndarray | torch.Tensor, names: Sequence[str] = GENERATOR_NAMES) -> str:
    """``"eta: rotate 2.77 rad (159 deg), ..."`` for the generators above 0.05 (the median of draws)."""
    e = as_numpy(eta)
    e = np.median(e, axis=0) if e.ndim == 2 else e
    parts = [f"{name} {value:.2f}" + (f" rad ({math.degrees(value):.0f} deg)" if name == "rotate" else "")
             for name, value in zip(names, e, strict=True) if value > 0.05]
    return "eta: " + (", ".join(parts) if parts else "all < 0.05")


# --------------------------------------------------------------------------- drawing images
def show_image(ax: Axes, img: np.ndarray | torch.Tensor, symmetric: bool = False, cmap: str = "gray"
               ) -> mpl.cm.ScalarMappable:
    """Draw one image ``(C, H, W)`` on ``ax`` and return its mappable (for a colour key).

    Three channels: in colour (RGB; ``symmetric``: signed values around mid-grey at 0, scaled by the image's largest
    magnitude). One channel (or the channel mean): with ``cmap``, on [-m, m] for ``symmetric`` (m the largest
    magnitude), on [0, 1] for images within it, else on their own range. Pictures of any dataset, MNIST's or
    CIFAR-10's, go through here.
    """
    img = as_numpy(img)
    if img.shape[0] == 3:
        rgb = np.moveaxis(img, 0, -1)
        if symmetric:
            rgb = 0.5 + 0.5 * rgb / (float(np.abs(rgb).max()) or 1.0)
        return ax.imshow(np.clip(rgb, 0.0, 1.0), interpolation="nearest")
    img = img.mean(0)
    if symmetric:
        vmax = float(np.abs(img).max()) or 1.0
        return ax.imshow(img, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    unit = img.min() >= 0 and img.max() <= 1
    return ax.imshow(img, cmap=cmap, vmin=0 if unit else None, vmax=1 if unit else None, interpolation="nearest")


def _image_grid(fig: Figure, images: np.ndarray, ncols: int, titles: Sequence[str] | None = None,
                symmetric: bool = True, cmap: str = FILTER_CMAP) -> list[Axes]:
    """Images ``(n, C, H, W)`` in a grid of ``ncols`` columns (:func:`show_image`)."""
    n = images.shape[0]
    axes = fig.subplots(max(1, math.ceil(n / ncols)), ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.set_axis_off()
            continue
        show_image(ax, images[i], symmetric, cmap)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    return list(axes.flat)[:n]


# --------------------------------------------------------------------------- filters
def per_filter_scale(W: np.ndarray) -> np.ndarray:
    """Each filter ``(F, P)`` divided by its largest magnitude: ``w / max |w|`` in [-1, 1] (an all-zero filter
    stays 0)."""
    m = np.abs(W).max(axis=1, keepdims=True)
    return W / np.where(m > 0, m, 1.0)


def _filter_figure(W: np.ndarray, image_shape: tuple[int, int, int], ncols: int, title: str,
                   path: str | Path | None) -> Figure:
    """Filters ``(F, C*H*W)`` as images, each scaled to [-1, 1] by its largest magnitude, with one colour key (one
    channel) or in colour around mid-grey = 0 (three channels)."""
    W = per_filter_scale(W.reshape(W.shape[0], -1))
    fig = new_figure(1.25 * ncols + 0.9, 1.25 * math.ceil(W.shape[0] / ncols) + 0.8)
    axes = _image_grid(fig, W.reshape(W.shape[0], *image_shape), ncols)
    if image_shape[0] != 3:
        key = mpl.cm.ScalarMappable(mpl.colors.Normalize(-1, 1), FILTER_CMAP)
        fig.colorbar(key, ax=axes, shrink=0.8, label="w / max |w| (each filter on its own scale)")
    else:
        title += "\ncolour: the three channels; mid-grey = 0, each filter scaled by its largest |w|"
    fig.suptitle(title)
    return finish(fig, path)


@styled
def plot_filter_bank(
    W1: np.ndarray | torch.Tensor, path: str | Path | None = None, image_shape: tuple[int, int, int] = (1, 28, 28),
    num_filters: int = 32, ncols: int = 8, title: str = "learned filters (posterior mean of W1)",
) -> Figure:
    """The first ``num_filters`` rows of W1 ``(D, C*H*W)`` as images."""
    return _filter_figure(as_numpy(W1)[:num_filters], image_shape, ncols, title, path)


def invariant_filters(
    W1: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, image_shape: tuple[int, int, int] = (1, 28, 28),
    num_samples: int = 128, seed: int = 0, names: Sequence[str] = GENERATOR_NAMES,
) -> np.ndarray:
    """Filters ``(F, C*H*W)`` averaged over ``num_samples`` transformations from the learned distribution
    (:func:`sample_transforms`): ``mean_s W1 o T_s``, ``(F, C*H*W)``.

    A picture of the learned invariance, not a part of the network: the network averages its *predictions* over
    T, after the ReLU and the output layer, and ``mean_s relu((W1 o T_s) x)`` is not ``relu((mean_s W1 o T_s) x)``.
    """
    W = torch.as_tensor(as_numpy(W1), dtype=torch.float32)
    with torch.no_grad():
        return warp_filters(W, sample_transforms(eta, num_samples, seed, names), image_shape).mean(0).numpy()


@styled
def plot_invariant_filters(
    W1: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, path: str | Path | None = None,
    image_shape: tuple[int, int, int] = (1, 28, 28), num_filters: int = 32, ncols: int = 8, num_samples: int = 128,
    title: str | None = None, seed: int = 0, names: Sequence[str] = GENERATOR_NAMES,
) -> Figure:
    """The first ``num_filters`` filters averaged over ``num_samples`` transformations from the learned eta (the
    paper's figure; :func:`invariant_filters`); ``title`` (e.g. the run's name) goes in front of the standard title,
    ``names`` is eta's basis."""
    inv = invariant_filters(as_numpy(W1)[:num_filters], eta, image_shape, num_samples, seed, names)
    head = f"{title}: " if title else ""
    return _filter_figure(inv, image_shape, ncols,
                          f"{head}filters averaged over {num_samples} T from the learned distribution "
                          f"({eta_text(eta, names)})\na picture of the invariance: the network averages its "
                          "predictions over T after the ReLU, not its filters", path)


# --------------------------------------------------------------------------- transformed examples
def _warp_samples(images: np.ndarray, eta: np.ndarray | torch.Tensor, num_samples: int, seed: int,
                  names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(n, num_samples, C, H, W)`` warps of ``images (n, C, H, W)`` and the sampled coefficients eps * eta of each
    transformation, ``(n * num_samples, K)`` (:func:`sample_coefficients`)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    n = x.shape[0]
    eta_s, eps = sample_coefficients(eta, n * num_samples, seed, names)
    T = affine_matrices(eta_s, eps, affine_generators(tuple(names)))  # (n * samples, 3, 3)
    with torch.no_grad():
        warped = warp_images(x.repeat_interleave(num_samples, dim=0), T)
    return warped.reshape(n, num_samples, *x.shape[1:]).numpy(), (eps * eta_s).numpy()


def transform_samples(
    images: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, num_samples: int = 8, seed: int = 0,
    names: Sequence[str] = GENERATOR_NAMES,
) -> np.ndarray:
    """Images ``(n, C, H, W)``, each warped by ``num_samples`` transformations from the learned distribution
    (:func:`sample_transforms`), ``(n, num_samples, C, H, W)``."""
    return _warp_samples(as_numpy(images), eta, num_samples, seed, names)[0]


def coefficient_labels(coefficients: np.ndarray, names: Sequence[str], active: Sequence[bool],
                       image_size: int) -> list[str]:
    """Panel labels of sampled transformations ``(num, K)``: the rotation in degrees (always, when the basis has it),
    translations in pixels, scales as factors e^c and shear as its coefficient for the ``active`` generators."""
    units = {"rotate": lambda c: f"{math.degrees(c):+.0f}°",
             "translate_x": lambda c: f"x {c * pixels_per_unit(image_size):+.1f}px",
             "translate_y": lambda c: f"y {c * pixels_per_unit(image_size):+.1f}px",
             "shear": lambda c: f"sh {c:+.2f}"}
    labels = []
    for row in coefficients:
        parts = [units.get(name, lambda c, n=name: f"{n} ×{math.exp(c):.2f}")(float(c))
                 for name, c, on in zip(names, row, active, strict=True) if on or name == "rotate"]
        labels.append("\n".join([" ".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]) or "others < 0.05")
    return labels


@styled
def plot_transformed_digits(
    images: np.ndarray | torch.Tensor, eta: np.ndarray | torch.Tensor, path: str | Path | None = None,
    num_samples: int = 8, seed: int = 0, title: str | None = None, names: Sequence[str] = GENERATOR_NAMES,
    labels: Sequence[int] | None = None,
) -> Figure:
    """Test images ``(n, C, H, W)`` (first column, framed in red; colour for three channels) and ``num_samples`` warps
    of each by T ~ the learned distribution, each titled with its sampled transformation (the angle in degrees, and
    shifts in pixels, scale factors, shear for the generators whose eta exceeds 0.05); ``labels``: the class of each
    row. ``names`` is eta's basis."""
    x = as_numpy(images)
    n = x.shape[0]
    warped, coefficients = _warp_samples(x, eta, num_samples, seed, names)
    e = as_numpy(eta)
    active = (np.median(e, axis=0) if e.ndim == 2 else e) > 0.05
    sampled = coefficient_labels(coefficients, names, active, x.shape[-1])
    grid = np.concatenate([x[:, None], warped], axis=1)  # (n, 1 + samples, C, H, W)
    titles = [t for i in range(n) for t in ["original", *sampled[i * num_samples:(i + 1) * num_samples]]]
    fig = new_figure(1.05 * (num_samples + 1) + 0.9, 1.3 * n + 0.8)
    axes = _image_grid(fig, grid.reshape(-1, *grid.shape[2:]), num_samples + 1, titles, symmetric=False,
                       cmap=IMAGE_CMAP)
    for row, ax in enumerate(axes[:: num_samples + 1]):
        for spine in ax.spines.values():
            spine.set_edgecolor("tab:red")
        if labels is not None:
            ax.set_ylabel(f"class {int(labels[row])}", fontsize=8)
    if x.shape[1] != 3:
        key = mpl.cm.ScalarMappable(mpl.colors.Normalize(0, 1), IMAGE_CMAP)
        fig.colorbar(key, ax=axes, shrink=min(0.8, 2.5 / n), aspect=15, label="pixel intensity")
    kind = "digits" if x.shape[1] == 1 else "images"
    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}test {kind} (red frame) and {num_samples} draws of T from the learned distribution\n"
                 f"({eta_text(eta, names)}); above each: the sampled transformation (angles counter-clockwise)")
    return finish(fig, path)
