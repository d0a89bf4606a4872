"""Exact answers for the generators, the exponential map and the image / filter warps.

Grid convention (``align_corners=True``): pixel centres of the outer rows/columns sit at -1 and +1,
so translating by ``2 / (W - 1)`` normalised units is exactly one pixel, and a rotation by pi/2
maps pixel centres onto pixel centres. ``warp_images(x, T)(p) = x(T p)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.transforms import (
    GENERATOR_NAMES,
    ISOTROPIC_NAMES,
    NUM_GENERATORS,
    affine_generators,
    affine_matrices,
    generator_basis,
    warp_filters,
    warp_images,
)

IDX = {name: i for i, name in enumerate(GENERATOR_NAMES)}
ATOL = 1e-5  # float32 interpolation / matrix_exp round-off (cos(pi/2) is ~ -4e-8, not 0)


def single(name: str, value: float, dtype=torch.float64) -> torch.Tensor:
    """T = expm(value * G_name), shape (3, 3).

    float64 by default so that cos(pi/2) rounds to ~0; the warps cast T to the image dtype.
    """
    eta = torch.zeros(NUM_GENERATORS, dtype=dtype)
    eps = torch.zeros(NUM_GENERATORS, dtype=dtype)
    eta[IDX[name]] = abs(value)
    eps[IDX[name]] = math.copysign(1.0, value)
    return affine_matrices(eta, eps, affine_generators(dtype=dtype))


def zero_border(H: int, W: int, C: int = 1, N: int = 1) -> torch.Tensor:
    x = torch.zeros(N, C, H, W)
    x[..., 1:-1, 1:-1] = torch.rand(N, C, H - 2, W - 2)
    return x


# --------------------------------------------------------------------------- generators / expm
def test_generators_shape_order_and_last_row():
    G = affine_generators(dtype=torch.float64)
    assert G.shape == (6, 3, 3) and G.dtype == torch.float64
    assert GENERATOR_NAMES == ("translate_x", "translate_y", "rotate", "scale_x", "scale_y", "shear")
    assert torch.equal(G[:, 2, :], torch.zeros(6, 3, dtype=torch.float64))


def test_identity_at_eta_zero_is_exact():
    G = affine_generators()
    eps = torch.rand(5, NUM_GENERATORS) * 2 - 1
    T = affine_matrices(torch.zeros(NUM_GENERATORS), eps, G)
    assert T.shape == (5, 3, 3)
    assert torch.equal(T, torch.eye(3).expand(5, 3, 3))
    # eps = 0 with any eta is the identity as well
    T0 = affine_matrices(torch.rand(NUM_GENERATORS) + 0.5, torch.zeros(2, NUM_GENERATORS), G)
    assert torch.equal(T0, torch.eye(3).expand(2, 3, 3))


def test_warps_are_identity_at_eta_zero():
    C, H, W = 2, 9, 7
    x = torch.rand(3, C, H, W)
    T = affine_matrices(torch.zeros(NUM_GENERATORS), torch.rand(3, NUM_GENERATORS), affine_generators())
    torch.testing.assert_close(warp_images(x, T), x, atol=1e-6, rtol=0)
    filt = torch.randn(4, C * H * W)
    out = warp_filters(filt, T, (C, H, W))
    assert out.shape == (3, 4, C * H * W)
    torch.testing.assert_close(out, filt.expand(3, 4, C * H * W), atol=1e-6, rtol=0)


def test_expm_A_times_expm_minus_A_is_identity():
    G = affine_generators(dtype=torch.float64)
    eta = torch.rand(NUM_GENERATORS, dtype=torch.float64) + 0.1
    eps = torch.rand(16, NUM_GENERATORS, dtype=torch.float64) * 2 - 1
    T, T_inv = affine_matrices(eta, eps, G), affine_matrices(eta, -eps, G)
    eye = torch.eye(3, dtype=torch.float64).expand(16, 3, 3)
    torch.testing.assert_close(T @ T_inv, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(T_inv @ T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(T), T_inv, atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None, database=None)
@given(
    eta=st.lists(st.floats(0.0, 2.0), min_size=6, max_size=6),
    eps=st.lists(st.floats(-1.0, 1.0), min_size=6, max_size=6),
)
def test_expm_inverse_and_affine_last_row_property(eta, eps):
    G = affine_generators(dtype=torch.float64)
    eta_t, eps_t = torch.tensor(eta, dtype=torch.float64), torch.tensor(eps, dtype=torch.float64)
    T, T_inv = affine_matrices(eta_t, eps_t, G), affine_matrices(eta_t, -eps_t, G)
    torch.testing.assert_close(T @ T_inv, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    # mathematically exactly (0, 0, 1); matrix_exp's Pade approximant leaves round-off
    torch.testing.assert_close(T[2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("theta", [0.3, -1.1, math.pi / 2, 2.5])
def test_rotation_closed_form(theta):
    T = single("rotate", theta, torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    expected = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(T, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("t", [0.25, -0.7])
def test_translation_scale_and_shear_closed_forms(t):
    f64 = torch.float64
    ch, sh, ex = math.cosh(t), math.sinh(t), math.exp(t)
    expected = {
        "translate_x": [[1, 0, t], [0, 1, 0], [0, 0, 1.0]],
        "translate_y": [[1, 0, 0], [0, 1, t], [0, 0, 1.0]],
        "scale_x": [[ex, 0, 0], [0, 1, 0], [0, 0, 1.0]],
        "scale_y": [[1, 0, 0], [0, ex, 0], [0, 0, 1.0]],
        "shear": [[ch, sh, 0], [sh, ch, 0], [0, 0, 1.0]],
    }
    for name, matrix in expected.items():
        torch.testing.assert_close(single(name, t, f64), torch.tensor(matrix, dtype=f64), atol=1e-12, rtol=0)


def test_eta_and_eps_multiply_per_generator():
    """T depends on eta_k * eps_k only, and generators combine inside one expm (Eq. 3)."""
    G = affine_generators(dtype=torch.float64)
    eta = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64)
    eps = torch.tensor([[0.5, -1.0, 0.25, 1.0, -0.5, 0.1]], dtype=torch.float64)
    A = torch.einsum("k,kij->ij", eta * eps[0], G)
    torch.testing.assert_close(affine_matrices(eta, eps, G)[0], torch.linalg.matrix_exp(A), atol=1e-12, rtol=0)
    torch.testing.assert_close(affine_matrices(eta * 2, eps / 2, G), affine_matrices(eta, eps, G), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- exact pixel warps
@pytest.mark.parametrize("size", [7, 28])
@pytest.mark.parametrize(("angle", "k"), [(math.pi / 2, 1), (-math.pi / 2, -1), (math.pi, 2)])
def test_rotation_filter_warp_is_rot90(size, angle, k):
    """Rotate generator with eta * eps = pi/2 is torch.rot90(k=1) over dims (H, W) of the filter image."""
    C, D = 2, 3
    filt = torch.rand(D, C * size * size)
    T = single("rotate", angle)[None]  # (S=1, 3, 3)
    out = warp_filters(filt, T, (C, size, size))
    assert out.shape == (1, D, C * size * size)
    expected = torch.rot90(filt.reshape(D, C, size, size), k, dims=(-2, -1)).reshape(D, -1)
    torch.testing.assert_close(out[0], expected, atol=ATOL, rtol=0)
    # the same convention for warp_images
    x = filt.reshape(D, C, size, size)
    torch.testing.assert_close(warp_images(x, T.expand(D, 3, 3)), torch.rot90(x, k, dims=(-2, -1)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [7, 10])
@pytest.mark.parametrize("pixels", [1, -1, 2])
def test_translation_by_whole_pixels_is_a_shift(size, pixels):
    """Translating by 2/(W-1) normalised units samples one pixel to the right: out = roll(x, -1)."""
    x = zero_border(size, size)
    if abs(pixels) == 2:
        x[..., :, 1] = 0  # two-pixel zero border on the side that wraps around
        x[..., :, -2] = 0
        x[..., 1, :] = 0
        x[..., -2, :] = 0
    unit = 2.0 / (size - 1)
    out_x = warp_images(x, single("translate_x", pixels * unit)[None])
    torch.testing.assert_close(out_x, torch.roll(x, -pixels, dims=-1), atol=ATOL, rtol=0)
    out_y = warp_images(x, single("translate_y", pixels * unit)[None])
    torch.testing.assert_close(out_y, torch.roll(x, -pixels, dims=-2), atol=ATOL, rtol=0)


def test_scale_x_by_two_samples_every_other_column():
    """scale_x with t = log 2 samples at (2x, y): on a 9-wide grid column c reads column 2c - 4."""
    H, W = 5, 9
    x = torch.rand(1, 1, H, W)
    out = warp_images(x, single("scale_x", math.log(2.0))[None])
    expected = torch.zeros_like(x)
    for c in range(W):
        src = 2 * c - (W - 1) // 2 * 1  # 2 * (c - 4) + 4
        if 0 <= src < W:
            expected[..., c] = x[..., src]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "value_fn"),
    [
        ("rotate", lambda W: math.pi / 2),
        ("rotate", lambda W: -math.pi / 2),
        ("rotate", lambda W: math.pi),
        ("translate_x", lambda W: 2.0 / (W - 1)),
        ("translate_y", lambda W: -4.0 / (W - 1)),
    ],
)
def test_filter_warp_is_adjoint_of_inverse_image_warp(name, value_fn):
    """<W1 o T, x> == <W1, T^{-1} x> exactly when T permutes pixel centres."""
    C, H, W, D, B = 2, 8, 8, 5, 4
    filt = torch.randn(D, C * H * W)
    x = torch.rand(B, C, H, W)
    v = value_fn(W)
    T, T_inv = single(name, v)[None], single(name, -v)[None]
    lhs = x.reshape(B, -1) @ warp_filters(filt, T, (C, H, W))[0].T  # (B, D)
    rhs = warp_images(x, T_inv.expand(B, 3, 3)).reshape(B, -1) @ filt.T
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- batching
def _loop_reference(filt: torch.Tensor, T: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(P, D, CHW) x (P, S, 3, 3) -> (P, S, D, CHW), one warp_images call per (p, s, d)."""
    P, D = filt.shape[:2]
    S = T.shape[1]
    out = torch.empty(P, S, D, filt.shape[-1])
    for p in range(P):
        for s in range(S):
            for d in range(D):
                img = filt[p, d].reshape(1, *shape)
                out[p, s, d] = warp_images(img, T[p, s][None]).reshape(-1)
    return out


def test_batched_warp_filters_matches_per_sample_loop():
    shape = (2, 6, 5)
    P, S, D = 3, 4, 5
    G = affine_generators()
    eta = torch.rand(NUM_GENERATORS) * 0.5 + 0.1
    T = affine_matrices(eta, torch.rand(P, S, NUM_GENERATORS) * 2 - 1, G)  # (P, S, 3, 3)
    filt = torch.randn(P, D, math.prod(shape))
    out = warp_filters(filt, T, shape)
    assert out.shape == (P, S, D, math.prod(shape))
    torch.testing.assert_close(out, _loop_reference(filt, T, shape), atol=1e-6, rtol=0)

    # shared filters (D, CHW) with per-particle transforms (P, S, 3, 3)
    shared = filt[0]
    out_shared = warp_filters(shared, T, shape)
    assert out_shared.shape == (P, S, D, math.prod(shape))
    torch.testing.assert_close(out_shared, _loop_reference(shared.expand(P, D, -1), T, shape), atol=1e-6, rtol=0)

    # per-particle filters (P, D, CHW) with shared transforms (S, 3, 3)
    out_T_shared = warp_filters(filt, T[0], shape)
    assert out_T_shared.shape == (P, S, D, math.prod(shape))
    torch.testing.assert_close(out_T_shared, _loop_reference(filt, T[0].expand(P, S, 3, 3), shape), atol=1e-6, rtol=0)

    # no leading P at all: (D, CHW) x (S, 3, 3) -> (S, D, CHW)
    out_plain = warp_filters(shared, T[1], shape)
    assert out_plain.shape == (S, D, math.prod(shape))
    torch.testing.assert_close(out_plain, out_shared[1], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- gradients
def test_gradcheck_eta_through_affine_matrices_and_warp_filters():
    f64 = torch.float64
    shape = (1, 5, 5)
    G = affine_generators(dtype=f64)
    gen = torch.Generator().manual_seed(3)
    eps = (torch.rand(3, NUM_GENERATORS, generator=gen, dtype=f64) * 2 - 1)
    filt = torch.randn(4, 25, generator=gen, dtype=f64)
    probe = torch.randn(3, 4, 25, generator=gen, dtype=f64)
    eta = (torch.rand(NUM_GENERATORS, generator=gen, dtype=f64) * 0.3 + 0.05).requires_grad_()

    def fn(eta_):
        return (warp_filters(filt, affine_matrices(eta_, eps, G), shape) * probe).sum()

    assert torch.autograd.gradcheck(fn, (eta,), eps=1e-6, atol=1e-5, rtol=1e-4)
    (grad,) = torch.autograd.grad(fn(eta), eta)
    assert torch.all(torch.isfinite(grad))
    assert torch.all(grad.abs() > 1e-8), f"every generator should receive gradient, got {grad}"


def test_isotropic_basis_scales_both_axes_and_stretch_changes_the_aspect_exactly():
    G = dict(zip(ISOTROPIC_NAMES, affine_generators(ISOTROPIC_NAMES, dtype=torch.float64), strict=True))
    t = 0.3
    np.testing.assert_allclose(torch.linalg.matrix_exp(t * G["scale"]), torch.diag(torch.tensor(
        [math.exp(t), math.exp(t), 1.0], dtype=torch.float64)), atol=1e-12)
    np.testing.assert_allclose(torch.linalg.matrix_exp(t * G["stretch"]), torch.diag(torch.tensor(
        [math.exp(t), math.exp(-t), 1.0], dtype=torch.float64)), atol=1e-12)
    # the two bases span the same algebra: scale = scale_x + scale_y, stretch = scale_x - scale_y
    A = dict(zip(GENERATOR_NAMES, affine_generators(dtype=torch.float64), strict=True))
    assert torch.equal(G["scale"], A["scale_x"] + A["scale_y"])
    assert torch.equal(G["stretch"], A["scale_x"] - A["scale_y"])
    for name in ("translate_x", "translate_y", "rotate", "shear"):
        assert torch.equal(G[name], A[name])


def test_generator_basis_picks_one_basis_and_refuses_a_mix():
    assert generator_basis(("rotate",)) == GENERATOR_NAMES
    assert generator_basis(("scale_x",)) == GENERATOR_NAMES
    assert generator_basis(("scale", "rotate")) == ISOTROPIC_NAMES
    with pytest.raises(ValueError, match="exclude each other"):
        generator_basis(("scale", "scale_x"))
    with pytest.raises(ValueError, match="unknown generator"):
        generator_basis(("zoom",))
