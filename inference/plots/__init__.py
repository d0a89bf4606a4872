"""Figures of a fitted run, headless: each ``plot_*`` function takes arrays and an optional output path and returns
the ``matplotlib.figure.Figure`` (written when a path is given, in the format of its suffix), drawn on its own Agg
canvas without pyplot, in one style (:mod:`~inference.plots.style`).

* :mod:`~inference.plots.style`: :data:`STYLE`, :class:`FigureFormat` (``--format png|pdf|svg``, ``--dpi``),
  :func:`new_figure`, :func:`finish`;
* :mod:`~inference.plots.images`: data (:func:`show_image`), the paper's pictures (van der Ouderaa & van der Wilk,
  2022, Figs. 4-5): :func:`plot_filter_bank` (rows of W1), :func:`plot_invariant_filters` (the filters averaged
  over the learned transformations), :func:`plot_transformed_digits` (test examples under sampled T);
* :mod:`~inference.plots.training`: :func:`plot_eta_trajectories` (eta in degrees, pixels and coefficients against
  the true extent), :func:`plot_elbo` (the ELBO with its expected log-likelihood and KL);
* :mod:`~inference.plots.predictive`: :func:`plot_reliability`, :func:`plot_rotation_sweep` (accuracy and
  predictive entropy against the rotation of the input).

The posterior figures drawn with ArviZ are in :mod:`inference.diagnostics.figures`.
"""

from inference.plots.images import (
    as_numpy,
    eta_text,
    invariant_filters,
    per_filter_scale,
    plot_filter_bank,
    plot_invariant_filters,
    plot_transformed_digits,
    sample_coefficients,
    sample_transforms,
    show_image,
    transform_samples,
)
from inference.plots.predictive import plot_reliability, plot_rotation_sweep, reliability_bins
from inference.plots.style import DPI, FORMATS, STYLE, FigureFormat, finish, new_figure, styled
from inference.plots.training import (
    GENERATOR_COLORS,
    eta_in_units,
    mark_steps,
    moving_average,
    plot_elbo,
    plot_eta_trajectories,
)

__all__ = [
    "DPI", "FORMATS", "GENERATOR_COLORS", "STYLE", "FigureFormat", "as_numpy", "eta_in_units", "eta_text", "finish",
    "invariant_filters", "mark_steps", "moving_average", "new_figure", "per_filter_scale", "plot_elbo",
    "plot_eta_trajectories", "plot_filter_bank", "plot_invariant_filters", "plot_reliability", "plot_rotation_sweep",
    "plot_transformed_digits", "reliability_bins", "sample_coefficients", "sample_transforms", "show_image", "styled",
    "transform_samples",
]
