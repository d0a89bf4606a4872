"""The first layer's fast kernels: warped filters by a gather, and the float32 CPU GEMM through oneDNN.

``warp_filters`` + matmul (the reference) runs ``grid_sample`` over S * D filter images and, in
the backward pass, ``grid_sample``'s scatter into every one of them, which dominates a CPU step.
Bilinear resampling with zero padding is linear in the image: output pixel p of ``W o T`` is
``sum_j weights[p, j] * W[index[p, j]]`` over four taps (``bilinear_taps``). The taps depend on
T only, so one set per transform serves all D filters and every channel, and the warp of all
P * S * D filters is a single ``embedding_bag`` over the rows of ``W^T`` (one row per pixel, D
wide): a gather forward, a sorted segment-sum and a row-wise dot product backward, all
vectorised over D. The first layer of every transformed copy is then one GEMM,
``x (B, C*H*W) @ [W o T_1, ..., W o T_PS]^T (C*H*W, P*S*D)``.

:func:`warped_linear` is the one function the network calls for ``(W1 o T_s) x``; it computes the same
function as the reference ``x @ warp_filters(W1, T).mT`` of :mod:`models.transforms` (tested equal, with
gradients). :func:`batched_linear` is the plain GEMM of the other paths.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

USE_ONEDNN = os.environ.get("INVW_ONEDNN", "1") != "0"
"""Route float32 CPU GEMMs of the first layer through oneDNN (``INVW_ONEDNN=0`` switches it off).

On AVX-512 machines whose MKL falls back to AVX2 kernels (e.g. AMD EPYC) oneDNN's fp32 GEMM is
about twice as fast as ``torch.mm``; it computes the same IEEE float32 product (no reduced precision).
"""


ONEDNN_MIN_MACS = 1 << 24
"""Smaller GEMMs stay on ``torch.mm``: oneDNN builds (and caches) a kernel per shape, worth it for big ones only."""


def _onednn_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        USE_ONEDNN
        and not torch.compiler.is_compiling()  # inductor lowers the op only for constant weights; it has its own GEMMs
        and a.shape[0] * a.shape[1] * b.shape[1] >= ONEDNN_MIN_MACS
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (a, b))
    )


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors of any strides; oneDNN for big float32 CPU products (no autograd)."""
    if _onednn_ok(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")  # a @ (b^T)^T
    return a @ b


class _Matmul(torch.autograd.Function):
    """``a @ b`` whose forward and backward GEMMs all go through :func:`_mm`.

    Both gradients come out contiguous in their input's own layout (``a.T @ grad`` for ``b``,
    ``grad @ b.T`` for ``a``), so no transpose copies follow.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _mm(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = _mm(grad, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = _mm(a.t(), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def matmul2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors, differentiable; oneDNN GEMMs for big float32 CPU products (:data:`USE_ONEDNN`)."""
    if not _onednn_ok(a, b):
        return a @ b
    return _Matmul.apply(a, b)


def batched_linear(xs: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``xs @ W^T`` for every weight sample, as one GEMM when the samples share ``W``.

    Parameters
    ----------
    xs : torch.Tensor
        ``(P|1, S, B, F)`` inputs of every copy of the network.
    W : torch.Tensor
        ``(P|1, D, F)``. A ``W`` expanded along P (stride 0, e.g. a point estimate shared by the
        particles) is used once rather than copied.

    Returns
    -------
    torch.Tensor
        ``(P, S, B, D)``.
    """
    P = max(xs.shape[0], W.shape[0])
    S, B, F_ = xs.shape[1:]
    if W.shape[0] == 1 or W.stride(0) == 0:  # one W: fold P * S * B into the rows of a single GEMM
        pre = matmul2d(xs.reshape(-1, F_), W[0].t())
        return pre.view(xs.shape[0], S, B, -1).expand(P, S, B, -1)
    xs = xs.expand(P, S, B, F_).reshape(P, S * B, F_)
    return torch.bmm(xs, W.transpose(1, 2)).view(P, S, B, -1)


def _normalised_coords(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``affine_grid``'s base coordinates along one axis with align_corners=True."""
    if n <= 1:
        return torch.zeros(n, dtype=dtype, device=device)
    return torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)


def bilinear_taps(T: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse bilinear-interpolation matrix of :func:`warp_images`: four taps per output pixel.

    ``warp_images(img, T)`` (bilinear, zero padding, ``align_corners=True``) equals, for every
    output pixel ``p`` (row-major over ``(H, W)``) and channel ``c``,
    ``sum_j weights[..., p, j] * img[c].flatten()[index[..., p, j]]``.

    Parameters
    ----------
    T : torch.Tensor
        ``(..., 3, 3)`` (or ``(..., 2, 3)``); the weights get T's dtype.
    size : tuple of int
        ``(H, W)`` of the image.

    Returns
    -------
    index : torch.Tensor
        ``(..., H*W, 4)`` int64 source pixels in ``[0, H*W)``. Taps outside the image are clamped
        onto it and carry weight 0 (zero padding); non-finite coordinates get a NaN weight.
    weights : torch.Tensor
        ``(..., H*W, 4)`` bilinear weights, differentiable in ``T`` with ``grid_sample``'s grid
        gradient (the floor of the sampling coordinates is piecewise constant).
    """
    H, W = int(size[0]), int(size[1])
    xs = _normalised_coords(W, T.dtype, T.device)  # (W,)
    ys = _normalised_coords(H, T.dtype, T.device)[:, None]  # (H, 1)
    t = T[..., :2, :, None, None]  # (..., 2, 3, 1, 1)
    gx = t[..., 0, 0, :, :] * xs + t[..., 0, 1, :, :] * ys + t[..., 0, 2, :, :]  # (..., H, W)
    gy = t[..., 1, 0, :, :] * xs + t[..., 1, 1, :, :] * ys + t[..., 1, 2, :, :]
    ix = (gx + 1) * (0.5 * (W - 1))  # grid_sample's unnormalisation with align_corners=True
    iy = (gy + 1) * (0.5 * (H - 1))
    ix0, iy0 = torch.floor(ix.detach()), torch.floor(iy.detach())
    tx, ty = ix - ix0, iy - iy0
    cx = torch.stack([ix0, ix0 + 1, ix0, ix0 + 1], -1)
    cy = torch.stack([iy0, iy0, iy0 + 1, iy0 + 1], -1)
    weights = torch.stack([(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty], -1)
    inside = (cx >= 0) & (cx <= W - 1) & (cy >= 0) & (cy <= H - 1)
    # non-finite coordinates (a NaN eta) read pixel 0 with a NaN weight: the NaN reaches the output
    index = (cy.nan_to_num(0.0).clamp(0, H - 1) * W + cx.nan_to_num(0.0).clamp(0, W - 1)).long()
    return index.flatten(-3, -2), (weights * inside).flatten(-3, -2)


class TapGather(torch.autograd.Function):
    """``out[i] = sum_j weights[i, j] * table[index[i, j]]``: a weighted gather of table rows.

    ``table (R, D)``, ``index (N, J)`` int64 in ``[0, R)``, ``weights (N, J)`` -> ``(N, D)``.
    Forward: one ``embedding_bag``. Backward: the table gradient as a second ``embedding_bag``
    over the taps sorted by row (a segment sum, instead of ``embedding_bag``'s generic dense
    backward), and the weight gradient as one row-wise dot product per tap. Differentiable in
    ``table`` and ``weights``.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        table, weights = table.detach().contiguous(), weights.detach().contiguous()
        ctx.save_for_backward(table, index, weights)
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, index, weights = ctx.saved_tensors
        grad = grad.contiguous()
        N, J = index.shape
        flat = index.reshape(-1)
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            order = torch.argsort(flat)
            rows = torch.arange(table.shape[0], device=flat.device)
            offsets = torch.searchsorted(flat[order], rows)  # start of every table row's taps
            bags = torch.div(order, J, rounding_mode="floor")
            grad_table = F.embedding_bag(bags, grad, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])
        if ctx.needs_input_grad[2]:
            grad_weights = _rowwise_dots(grad, table, index)
        return grad_table, None, grad_weights


def _rowwise_dots(grad: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = <grad[i], table[index[i, j]]>``, ``(N, J)``, without an ``(N, J, D)`` temporary."""
    N, J = index.shape
    backward = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if backward is not None:  # embedding_bag's own per-sample-weight gradient: exactly these dots
        offsets = torch.arange(N, device=index.device) * J
        offset2bag = torch.arange(N * J, device=index.device) // J
        return backward(grad, table, index.reshape(-1), offsets, offset2bag, 0, -1).view(N, J)
    return torch.stack([(table.index_select(0, index[:, j]) * grad).sum(-1) for j in range(J)], -1)


def _warped_filter_matrix(W: torch.Tensor, T: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """All warped filters as one ``(C*H*W, Q*D)`` matrix, column block q = ``(W o T_q)^T``.

    ``W`` is ``(P, D, C*H*W)`` (P = 1 or Q's leading particle dimension, stride 0 allowed),
    ``T`` is ``(P|1, S, 3, 3)``; Q = max(P, P_T) * S.
    """
    C, H, Wd = image_shape
    n = H * Wd
    shared = W.shape[0] == 1 or W.stride(0) == 0
    P = max(W.shape[0], T.shape[0])
    S, D = T.shape[1], W.shape[1]
    index, weights = bilinear_taps(T.to(W.dtype).expand(P, S, *T.shape[2:]), (H, Wd))  # (P, S, n, 4)
    index = index.permute(2, 0, 1, 3)  # (n, P, S, 4): bags in (c, p, q) order -> rows of the result
    weights = weights.permute(2, 0, 1, 3)
    channel = torch.arange(C, device=W.device).view(C, 1, 1, 1, 1) * n
    if shared:
        table = W[0].t()  # (C*n, D): one row per (channel, pixel)
        rows = channel + index  # (C, n, P, S, 4)
    else:  # per-particle filters: stack the P tables, offset each particle's taps
        table = W.transpose(1, 2).reshape(P * C * n, D)
        particle = torch.arange(P, device=W.device).view(1, 1, P, 1, 1) * (C * n)
        rows = channel + particle + index
    rows = rows.expand(C, n, P, S, 4).reshape(-1, 4)
    taps = weights.unsqueeze(0).expand(C, n, P, S, 4).reshape(-1, 4)
    return TapGather.apply(table, rows, taps).view(C * n, P * S * D)


def warp_filters_gather(W: torch.Tensor, T: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """:func:`warp_filters` through :func:`bilinear_taps` and one ``embedding_bag`` (same shapes, same values)."""
    C, H, Wd = image_shape
    squeeze = W.dim() == 2 and T.dim() == 3
    W_ = W if W.dim() == 3 else W.unsqueeze(0)
    T_ = T if T.dim() == 4 else T.unsqueeze(0)
    P, S, D = max(W_.shape[0], T_.shape[0]), T_.shape[1], W_.shape[1]
    out = _warped_filter_matrix(W_, T_, image_shape).view(C * H * Wd, P, S, D).permute(1, 2, 3, 0)
    return out[0] if squeeze else out


def warped_linear(
    x: torch.Tensor, W: torch.Tensor, T: torch.Tensor, image_shape: tuple[int, int, int], contiguous: bool = True
) -> torch.Tensor:
    """First-layer pre-activations of every transformed filter bank, ``x @ (W o T_s)^T``.

    The same function as ``torch.matmul(x.flatten(1), warp_filters(W, T, image_shape).mT)``
    (bilinear, zero padding, ``align_corners=True``; equal to float round-off, gradients in ``W``
    and through ``T`` included), computed as one gather-warp of all P * S * D filters
    (:func:`bilinear_taps` once per transform, shared by the D filters) and one GEMM
    ``(B, C*H*W) @ (C*H*W, P*S*D)``. No Python loop over samples or particles.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, H, W)`` or ``(B, C*H*W)``.
    W : torch.Tensor
        ``(D, C*H*W)`` or ``(P, D, C*H*W)`` (stride 0 along P: shared filters, warped once per transform).
    T : torch.Tensor
        ``(S, 3, 3)`` or ``(P, S, 3, 3)``.
    image_shape : tuple of int
        ``(C, H, W)``.
    contiguous : bool
        Return a contiguous tensor (else a permuted view of the GEMM's ``(B, P, S, D)`` output).

    Returns
    -------
    torch.Tensor
        ``(S, B, D)``, or ``(P, S, B, D)`` when either ``W`` or ``T`` has the leading P.
    """
    B = x.shape[0]
    squeeze = W.dim() == 2 and T.dim() == 3
    W_ = W if W.dim() == 3 else W.unsqueeze(0)  # (P|1, D, CHW)
    T_ = T if T.dim() == 4 else T.unsqueeze(0)  # (P|1, S, 3, 3)
    P, S, D = max(W_.shape[0], T_.shape[0]), T_.shape[1], W_.shape[1]
    filters = _warped_filter_matrix(W_, T_, image_shape)  # (CHW, P*S*D)
    pre = matmul2d(x.reshape(B, -1).to(filters.dtype), filters)  # (B, P*S*D)
    pre = pre.view(B, P, S, D).permute(1, 2, 0, 3)  # (P, S, B, D)
    if contiguous:
        pre = pre.contiguous()
    return pre[0] if squeeze else pre
