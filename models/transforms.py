"""Affine generators, the exponential map and image warps (pure torch, no Pyro).

Shape vocabulary (also in the README): S transform samples, K = 6 generators (two bases),
D hidden units, C/H/W image channels/height/width, B batch.

Coordinates are ``torch.nn.functional.affine_grid``'s normalised [-1, 1] coordinates with
``align_corners=True``: pixel centres of the outermost rows/columns sit at -1 and +1, so one
unit of translation is (W - 1) / 2 pixels (13.5 px on 28 x 28 MNIST) and a rotation by a
multiple of pi/2 maps pixel centres exactly onto pixel centres.

References
----------
van der Ouderaa, T. F. A. and van der Wilk, M. (2022). Learning Invariant Weights in Neural
Networks. UAI 2022, Sec. 3 (transformations as Lie-group elements T = expm(sum_i eps_i eta_i G_i)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GENERATOR_NAMES: tuple[str, ...] = (
    "translate_x",
    "translate_y",
    "rotate",
    "scale_x",
    "scale_y",
    "shear",
)
"""The paper's K = 6 generators (the ``axes`` basis), in the order of :func:`affine_generators`."""

ISOTROPIC_NAMES: tuple[str, ...] = (
    "translate_x",
    "translate_y",
    "rotate",
    "scale",
    "stretch",
    "shear",
)
"""The ``isotropic`` basis of the same affine algebra: one isotropic scale (both axes by e^t) and one
aspect-ratio change (x by e^t, y by e^-t) in place of the paper's independent scale_x, scale_y. Data
scaled by one factor for both axes need only ``scale``; under the paper's basis, covering its range with
scale_x and scale_y also averages over aspect changes the data never show (README, "How much invariance")."""

NUM_GENERATORS = len(GENERATOR_NAMES)
"""K: every basis has six generators (six slots of eta and eps)."""

ALL_GENERATOR_NAMES: tuple[str, ...] = (*GENERATOR_NAMES, "scale", "stretch")
"""Every generator name of either basis."""

_ENTRIES: dict[str, tuple[tuple[int, int, float], ...]] = {  # (row, col, value) of each 3 x 3 generator
    "translate_x": ((0, 2, 1.0),),
    "translate_y": ((1, 2, 1.0),),
    "rotate": ((0, 1, -1.0), (1, 0, 1.0)),  # counter-clockwise in (x, y)
    "scale_x": ((0, 0, 1.0),),
    "scale_y": ((1, 1, 1.0),),
    "shear": ((0, 1, 1.0), (1, 0, 1.0)),  # symmetric shear
    "scale": ((0, 0, 1.0), (1, 1, 1.0)),
    "stretch": ((0, 0, 1.0), (1, 1, -1.0)),
}


def generator_basis(active: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The six generator names (:data:`GENERATOR_NAMES` or :data:`ISOTROPIC_NAMES`) that ``active`` belongs to.

    ``active`` names the learnable generators; ``scale``/``stretch`` select the isotropic basis,
    anything else the paper's. Mixing ``scale_x``/``scale_y`` with ``scale``/``stretch`` is an error
    (the eight would not be independent).
    """
    unknown = sorted(set(active) - set(ALL_GENERATOR_NAMES))
    if unknown:
        raise ValueError(f"unknown generator(s) {unknown}; choose from {list(ALL_GENERATOR_NAMES)}")
    iso, axes = set(active) & {"scale", "stretch"}, set(active) & {"scale_x", "scale_y"}
    if iso and axes:
        raise ValueError(f"generators {sorted(axes)} (the paper's axes basis) and {sorted(iso)} (the isotropic "
                         "basis) exclude each other: choose one basis")
    return ISOTROPIC_NAMES if iso else GENERATOR_NAMES


def affine_generators(
    names: tuple[str, ...] = GENERATOR_NAMES,
    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Generators of the 2-D affine group in homogeneous coordinates.

    Parameters
    ----------
    names : tuple of str
        The basis, :data:`GENERATOR_NAMES` (the paper's) or :data:`ISOTROPIC_NAMES`; any names from
        :data:`ALL_GENERATOR_NAMES` are accepted.

    Returns
    -------
    torch.Tensor
        Shape ``(K, 3, 3)``, ordered as ``names``. The last row of every generator is zero, so
        ``expm`` of any combination is an affine matrix whose last row is ``(0, 0, 1)``.

    Examples
    --------
    >>> G = affine_generators()
    >>> torch.linalg.matrix_exp(torch.pi / 2 * G[2])[:2, :2].round()
    tensor([[0., -1.],
            [1., 0.]])
    """
    G = torch.zeros(len(names), 3, 3, dtype=dtype, device=device)
    for k, name in enumerate(names):
        for row, col, value in _ENTRIES[name]:
            G[k, row, col] = value
    return G


def affine_matrices(eta: torch.Tensor, eps: torch.Tensor, generators: torch.Tensor) -> torch.Tensor:
    """Sampled transformations ``T = expm(sum_k eps_k eta_k G_k)`` (Eq. 3 of the paper).

    Parameters
    ----------
    eta : torch.Tensor
        Extent of each invariance, shape ``(K,)`` (or broadcastable to ``eps``).
    eps : torch.Tensor
        Transformation noise, shape ``(..., K)``, typically ``(S, K)`` with eps ~ U[-1, 1].
    generators : torch.Tensor
        Shape ``(K, 3, 3)`` from :func:`affine_generators`.

    Returns
    -------
    torch.Tensor
        Shape ``(..., 3, 3)``: one homogeneous affine matrix per sample, batched through a
        single ``torch.linalg.matrix_exp`` call.
    """
    coeffs = eps * eta  # (..., K)
    lie_algebra = torch.einsum("...k,kij->...ij", coeffs, generators)  # (..., 3, 3)
    return torch.linalg.matrix_exp(lie_algebra)


def warp_images(images: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Resample images at transformed coordinates: ``out(p) = images(T p)``, bilinear, zero padding.

    Parameters
    ----------
    images : torch.Tensor
        Shape ``(N, C, H, W)``.
    T : torch.Tensor
        Shape ``(N, 3, 3)`` (or ``(N, 2, 3)``): one affine map per image, acting on
        normalised output coordinates (see module docstring).

    Returns
    -------
    torch.Tensor
        Shape ``(N, C, H, W)``.
    """
    theta = T[..., :2, :].to(images.dtype)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)  # (N, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def warp_filters(W: torch.Tensor, T: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Transform first-layer filters, ``W o T`` (Sec. 3.2 of the paper), all samples in one call.

    Each row of ``W`` is reshaped to an image of shape ``(C, H, W)`` and resampled at ``T p``.
    Because ``<W o T, x> = <W, T^{-1} x>`` (up to interpolation and the Jacobian of ``T``), the
    cost grows with the number of hidden units D and samples S, not with the batch.

    The same sampling grid serves every filter of a sample: the D filters of sample s are stacked
    as channels of one image, so the grid is computed S times (not S * D times) and one
    ``grid_sample`` call warps all ``S * D`` filters.

    Parameters
    ----------
    W : torch.Tensor
        Shape ``(D, C*H*W)`` shared by all samples, or ``(P, D, C*H*W)`` with a leading
        weight-sample dimension P.
    T : torch.Tensor
        Shape ``(S, 3, 3)`` or ``(P, S, 3, 3)``.
    image_shape : tuple of int
        ``(C, H, W)`` of the inputs the filters act on.

    Returns
    -------
    torch.Tensor
        Shape ``(S, D, C*H*W)``, or ``(P, S, D, C*H*W)`` when either input has the leading P.
    """
    C, H, Wd = image_shape
    squeeze = W.dim() == 2 and T.dim() == 3
    W_ = W if W.dim() == 3 else W.unsqueeze(0)  # (P|1, D, CHW)
    T_ = T if T.dim() == 4 else T.unsqueeze(0)  # (P|1, S, 3, 3)
    P = max(W_.shape[0], T_.shape[0])
    S, D = T_.shape[1], W_.shape[1]
    W_ = W_.expand(P, D, C * H * Wd)
    T_ = T_.expand(P, S, 3, 3)
    filters = W_.reshape(P, 1, D * C, H, Wd).expand(P, S, D * C, H, Wd)  # filters as channels
    warped = warp_images(filters.reshape(P * S, D * C, H, Wd), T_.reshape(P * S, 3, 3))
    out = warped.reshape(P, S, D, C * H * Wd)
    return out[0] if squeeze else out
