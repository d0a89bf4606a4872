"""Each image's shift from its class template, and images moved onto it (the maths of :mod:`inference.shifts`).

:func:`template_shifts` finds the shift of each image relative to a template by cross-correlation,
:func:`class_shifts` relative to the mean image of its class, :func:`uniform_half_width` reads their spread in the
units of eta_translate, and :func:`centre_on_templates` moves every image onto its class template by whole pixels:
the data of ``centred-mnist``, MNIST with most of its own translation removed (README, *How much invariance*).
"""

from __future__ import annotations

import math

import torch


def template_shifts(images: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """The shift ``(dy, dx)`` in pixels of each image relative to ``template``: the peak of their cross-correlation
    (zero-padded to twice the size, so shifts do not wrap), refined by a parabola through the peak and its
    neighbours along each axis.

    Parameters
    ----------
    images : Tensor, shape (N, H, W)
    template : Tensor, shape (H, W)

    Returns
    -------
    Tensor, shape (N, 2): ``images[n]`` is about ``template`` moved down by ``dy`` and right by ``dx`` pixels.
    """
    n, h, w = images.shape
    size = (2 * h, 2 * w)
    spectrum = torch.fft.rfft2(images.double(), s=size) * torch.fft.rfft2(template.double(), s=size).conj()
    corr = torch.fft.irfft2(spectrum, s=size)
    corr = torch.fft.fftshift(corr, dim=(-2, -1))  # zero shift at (h, w)
    flat = corr.reshape(n, -1).argmax(dim=1)
    i, j = flat // size[1], flat % size[1]
    rows = torch.arange(n)

    def vertex(left: torch.Tensor, mid: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        curvature = left - 2 * mid + right
        return torch.where(curvature < 0, 0.5 * (left - right) / curvature.where(curvature < 0, -1.0), 0.0)

    i_in, j_in = i.clamp(1, size[0] - 2), j.clamp(1, size[1] - 2)
    dy = vertex(corr[rows, i_in - 1, j], corr[rows, i, j], corr[rows, i_in + 1, j])
    dx = vertex(corr[rows, i, j_in - 1], corr[rows, i, j], corr[rows, i, j_in + 1])
    return torch.stack([i - h + dy, j - w + dx], dim=1)


def class_shifts(images: torch.Tensor, labels: torch.Tensor, iterations: int = 0) -> torch.Tensor:
    """Each image's shift ``(dy, dx)`` from its class template, centred to mean zero within each class.

    Parameters
    ----------
    images : Tensor, shape (N, H, W)
    labels : Tensor, shape (N,)
    iterations : int
        How often the template (first the class mean) is rebuilt from its images moved back by their rounded shifts.

    Returns
    -------
    Tensor, shape (N, 2)
    """
    out = torch.zeros(len(images), 2, dtype=torch.float64)
    for k in labels.unique():
        members = (labels == k).nonzero().squeeze(1)
        x = images[members].double()
        template = x.mean(0)
        for _ in range(iterations):
            back = (-template_shifts(x, template)).round().long()
            moved = [torch.roll(img, tuple(s.tolist()), dims=(0, 1)) for img, s in zip(x, back, strict=True)]
            template = torch.stack(moved).mean(0)
        s = template_shifts(x, template)
        out[members] = s - s.mean(0)
    return out


def uniform_half_width(shifts: torch.Tensor) -> torch.Tensor:
    """Per axis, the half-width ``a`` of U[-a, a] with the shifts' standard deviation: ``sqrt(3) std``, shape (2,)."""
    return math.sqrt(3.0) * shifts.std(dim=0)


def centre_on_templates(images: torch.Tensor, labels: torch.Tensor, passes: int = 4) -> torch.Tensor:
    """``images`` each moved by whole pixels onto the mean image of its class: moved by its rounded
    :func:`class_shifts`, then again against the template of the moved images (sharper, so it reads shifts the blurred
    first one missed), ``passes`` times or until no image moves. What moves out of the frame is lost, what moves in is
    zero. On the shared MNIST subset the spread read by :func:`class_shifts` falls from 1.35 px to 0.67 / 0.58 / 0.51
    / 0.49 px after one to four passes (whole-pixel moves leave up to half a pixel).

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W), any dtype (MNIST's bytes)
    labels : Tensor, shape (N,)
    passes : int
        Most alignments against a rebuilt template (each applied to the original images, so nothing a pass moves
        out of the frame is lost for the next).

    Returns
    -------
    Tensor, shape (N, C, H, W), dtype of ``images``: ``out[n, :, i, j] = images[n, :, i + dy_n, j + dx_n]`` with the
    total move ``(dy_n, dx_n)``.
    """
    n, c, h, w = images.shape
    total = torch.zeros(n, 2, dtype=torch.long)
    out = images
    for _ in range(passes):
        step = class_shifts(out.double().mean(dim=1), labels).round().long()  # (N, 2): (dy, dx)
        if not step.any():
            break
        total += step
        pad = int(total.abs().max())
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        rows = torch.arange(h)[None, :] + total[:, :1] + pad  # (N, H)
        cols = torch.arange(w)[None, :] + total[:, 1:] + pad  # (N, W)
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    return out
