"""inference/plots.py: every figure is written, has sane axes, and the invariant filters are invariant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from guides import make_guide
from inference import diagnostics as dg
from inference import plots
from inference.diagnostics import figures
from models import GENERATOR_NAMES, ISOTROPIC_NAMES, InvariantNet, ModelConfig

PNG = b"\x89PNG\r\n\x1a\n"
K = len(GENERATOR_NAMES)


def assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 2000
    assert path.read_bytes()[:8] == PNG


def eta_with(**values: float) -> np.ndarray:
    return np.array([values.get(g, 0.0) for g in GENERATOR_NAMES])


def image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images]


@pytest.fixture(scope="module")
def idata():
    """A tiny network's InferenceData (hybrid guide, empirical Bayes eta)."""
    model = InvariantNet(ModelConfig(hidden=8, num_transforms=3, first_layer_prior=False), num_data=20)
    guide = make_guide(model, "hybrid")
    x, y = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
    return dg.to_inference_data(model, guide, x, y, test=(x[:10], y[:10]), num_draws=8,
                                eta_history=([1, 5, 9], torch.rand(3, K)), losses=list(np.linspace(5, 2, 30)))


# --------------------------------------------------------------------------- filters
def test_filter_bank_draws_one_28x28_image_per_filter(tmp_path):
    W1 = np.random.default_rng(0).normal(size=(40, 784))
    fig = plots.plot_filter_bank(W1, tmp_path / "f" / "filters.png", num_filters=12, ncols=4)
    assert_png(tmp_path / "f" / "filters.png")
    axes = image_axes(fig)
    assert len(axes) == 12
    assert axes[0].images[0].get_array().shape == (28, 28)
    np.testing.assert_allclose(axes[3].images[0].get_array(), W1[3].reshape(28, 28) / np.abs(W1[3]).max())
    assert all(ax.images[0].get_clim() == (-1.0, 1.0) for ax in axes)  # one scale: w / max |w|, white is 0
    (key,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]  # one colour key for all of them
    assert "max |w|" in key.get_ylabel()


def test_three_channel_filters_are_drawn_in_colour_around_grey():
    """3 x 32 x 32 filters are RGB pictures: each channel is its own colour, 0 is mid-grey, the scale the filter's."""
    W1 = np.random.default_rng(1).normal(size=(10, 3 * 32 * 32))
    fig = plots.plot_filter_bank(W1, image_shape=(3, 32, 32), num_filters=4, ncols=4)
    rgb = image_axes(fig)[2].images[0].get_array()
    assert rgb.shape == (32, 32, 3)
    filt = W1[2].reshape(3, 32, 32)
    np.testing.assert_allclose(rgb, np.moveaxis(0.5 + 0.5 * filt / np.abs(filt).max(), 0, -1))
    inv = plots.plot_invariant_filters(W1, eta_with(rotate=math.pi), image_shape=(3, 32, 32), num_filters=4,
                                       num_samples=8)
    assert image_axes(inv)[0].images[0].get_array().shape == (32, 32, 3)


def test_invariant_filters_under_full_rotation_are_rotation_symmetric():
    """Averaged over rotations in [-pi, pi], a filter is (nearly) unchanged by a quarter turn."""
    yy, xx = np.mgrid[-1:1:28j, -1:1:28j]
    bar = np.exp(-((xx - 0.3) ** 2) / 0.02 - (yy**2) / 0.2)  # an off-centre vertical blob
    W1 = np.stack([bar.ravel(), np.rot90(bar).ravel()])
    inv = plots.invariant_filters(W1, eta_with(rotate=math.pi), num_samples=512).reshape(2, 28, 28)
    for f in inv:
        assert np.abs(f - np.rot90(f)).max() < 0.15 * np.abs(f).max()
    raw_asymmetry = np.abs(bar - np.rot90(bar)).max() / bar.max()
    assert raw_asymmetry > 0.9  # the raw filter is not symmetric at all
    np.testing.assert_allclose(inv[0], inv[1], atol=0.15 * np.abs(inv).max())  # rotated inputs, same average


def test_invariant_filters_with_eta_zero_are_the_filters():
    W1 = np.random.default_rng(1).normal(size=(3, 784))
    np.testing.assert_allclose(plots.invariant_filters(W1, np.zeros(K), num_samples=4), W1, atol=1e-5)


def test_invariant_filters_accept_eta_draws_and_write_a_figure(tmp_path):
    W1 = np.random.default_rng(2).normal(size=(8, 784))
    draws = np.abs(np.random.default_rng(3).normal(size=(5, K)))
    assert plots.invariant_filters(W1, draws, num_samples=16).shape == (8, 784)
    fig = plots.plot_invariant_filters(W1, eta_with(rotate=1.0), tmp_path / "inv.png", num_filters=8, title="run")
    assert_png(tmp_path / "inv.png")
    title = fig.get_suptitle()
    assert len(image_axes(fig)) == 8 and "rotate 1.00 rad (57 deg)" in title and title.startswith("run")
    assert "not its filters" in title  # what the network computes is said, not implied


# --------------------------------------------------------------------------- curves
def test_eta_trajectories_in_degrees_pixels_and_coefficients_one_panel_each(tmp_path):
    steps = np.arange(0, 101, 10)
    eta = np.outer(np.linspace(0.1, 3.0, len(steps)), eta_with(rotate=1.0, translate_x=0.1, shear=0.01) + 0.01)
    fig = plots.plot_eta_trajectories(steps, eta, {"rotate": math.pi, "translate_x": 8 / 13.5}, tmp_path / "eta.png")
    assert_png(tmp_path / "eta.png")
    rot, trans, rest = fig.axes
    assert rot.get_ylabel() == "eta_rotate (degrees)" and trans.get_ylabel() == "eta (pixels)"
    assert "coefficient" in rest.get_ylabel()
    solid = {line.get_label(): line for ax in fig.axes for line in ax.lines if line.get_linestyle() == "-"}
    assert set(solid) == set(GENERATOR_NAMES)
    np.testing.assert_allclose(solid["rotate"].get_ydata(), np.degrees(eta[:, 2]))
    np.testing.assert_allclose(solid["translate_x"].get_ydata(), eta[:, 0] * 13.5)  # pixels on 28-pixel images
    np.testing.assert_allclose(solid["shear"].get_ydata(), eta[:, 5])
    dashed = [line for ax in fig.axes for line in ax.lines if line.get_linestyle() == "--"]
    assert sorted(line.get_ydata()[0] for line in dashed) == pytest.approx([8.0, 180.0])  # true extents
    (true_rotate,) = [line for line in rot.lines if line.get_linestyle() == "--"]
    assert "full circle" in true_rotate.get_label()  # a 180-deg true extent is the full circle: one line, not two
    assert not [line for line in rot.lines if line.get_linestyle() == "-."]
    partial = plots.plot_eta_trajectories(steps, eta, {"rotate": math.pi / 2})
    (circle,) = [line for line in partial.axes[0].lines if line.get_linestyle() == "-."]
    assert circle.get_ydata()[0] == 180 and "full circle" in circle.get_label()
    assert all(ax.get_xlabel() == "SVI step" and ax.get_ylim()[0] == 0 for ax in fig.axes)


def test_eta_trajectories_draw_only_the_panels_of_the_basis():
    fig = plots.plot_eta_trajectories([1, 2], np.ones((2, 1)), names=("rotate",))
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "rotation"


def test_elbo_curve_moving_average_and_its_two_terms(tmp_path):
    elbo = -5 + np.log1p(np.arange(200)) + np.random.default_rng(0).normal(0, 0.1, 200)
    fig = plots.plot_elbo(np.arange(1, 201), elbo, tmp_path / "elbo.png", final_elbo=0.2, window=10)
    assert_png(tmp_path / "elbo.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 1  # raw, smoothed, final point
    lo, hi = ax.get_ylim()
    assert lo < elbo.min() and hi > elbo.max()  # every step is shown, the first ones too
    np.testing.assert_allclose(plots.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    terms = {"step": np.array([1, 100, 200]), "expected_loglik": np.array([-3.0, -1.0, -0.5]),
             "kl": np.array([4.0, 2.5, 2.0])}
    fig = plots.plot_elbo(np.arange(1, 201), elbo, final_elbo=-2.4, terms=terms,
                          final_terms={"expected_loglik": -0.4, "kl": 2.0}, final_step=150)
    top, loglik, kl = fig.axes
    np.testing.assert_allclose(loglik.lines[0].get_ydata(), terms["expected_loglik"])
    np.testing.assert_allclose(kl.lines[0].get_ydata(), terms["kl"])
    assert "log-likelihood" in loglik.get_ylabel() and "KL" in kl.get_ylabel() and kl.get_xlabel() == "SVI step"
    assert [tuple(c.get_offsets()[0]) for c in (top.collections[0], kl.collections[0])] == [(150, -2.4), (150, 2.0)]


# --------------------------------------------------------------------------- calibration
def test_reliability_bins_and_ece():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 1, 0, 1])
    bins = plots.reliability_bins(probs, y, num_bins=10)
    assert bins["count"].sum() == 4 and bins["count"][9] == 2 and bins["count"][5] == 2
    assert bins["accuracy"][9] == pytest.approx(0.5) and bins["confidence"][9] == pytest.approx(0.95)
    assert bins["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert np.isnan(bins["accuracy"][0])  # empty bins are NaN, not 0


def test_reliability_diagram_axes(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 10)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 10, 300)
    fig = plots.plot_reliability(probs, y, tmp_path / "rel.png")
    assert_png(tmp_path / "rel.png")
    top, bottom = fig.axes
    assert top.get_xlim() == (0.0, 1.0) and top.get_ylim() == (0.0, 1.0)
    assert len(top.patches) == 10 and sum(p.get_height() for p in bottom.patches) == pytest.approx(300)
    assert f"expected calibration error {plots.reliability_bins(probs, y)['ece']:.3f}" in top.get_title()


# --------------------------------------------------------------------------- transformed digits
def test_transform_samples_shapes_and_identity():
    x = torch.rand(3, 1, 28, 28)
    out = plots.transform_samples(x, eta_with(rotate=math.pi), num_samples=5)
    assert out.shape == (3, 5, 1, 28, 28)
    np.testing.assert_allclose(plots.transform_samples(x, np.zeros(K), 2)[:, 1], x.numpy(), atol=1e-5)


def test_transformed_digits_grid_is_labelled_with_the_sampled_transformations(tmp_path):
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 5:23, 12:16] = 1.0  # a vertical bar
    eta = eta_with(rotate=math.pi)
    fig = plots.plot_transformed_digits(x, eta, tmp_path / "digits.png", num_samples=4, seed=3, labels=[0, 7])
    assert_png(tmp_path / "digits.png")
    axes = image_axes(fig)
    assert len(axes) == 2 * 5 and axes[0].get_title() == "original" and axes[5].get_ylabel() == "class 7"
    np.testing.assert_allclose(axes[0].images[0].get_array(), x[0, 0].numpy())
    T = plots.sample_transforms(eta, 8, seed=3)  # the same draws: the angle of each T is its label
    angles = np.degrees(np.arctan2(T[:, 1, 0].numpy(), T[:, 0, 0].numpy()))
    shown = [ax.get_title() for i, ax in enumerate(axes) if i % 5]
    assert shown == [f"{a:+.0f}°" for a in angles]
    np.testing.assert_allclose(axes[1].images[0].get_array(), plots.transform_samples(x, eta, 4, seed=3)[0, 0, 0])


def test_sampled_translations_are_labelled_in_pixels_and_scales_as_factors():
    labels = plots.images.coefficient_labels(np.array([[0.1, 0.0, 0.5, 0.2, 0.0, 0.0]]), GENERATOR_NAMES,
                                             [True, False, True, True, False, False], 28)
    assert labels == ["x +1.4px +29°\nscale_x ×1.22"]
    small = plots.images.coefficient_labels(np.array([[0.0, 0.0, 0.03, 0.01, 0.0, 0.0]]), GENERATOR_NAMES,
                                            [False] * 6, 28)
    assert small == ["+2°"]  # a small rotation is still shown: the picture is not the identity


def test_transformed_colour_images_keep_their_colours(tmp_path):
    x = torch.zeros(2, 3, 32, 32)
    x[:, 0, 8:24, 8:24] = 1.0  # a red square
    fig = plots.plot_transformed_digits(x, eta_with(rotate=math.pi), tmp_path / "images.png", num_samples=3)
    assert_png(tmp_path / "images.png")
    axes = image_axes(fig)
    assert len(axes) == 2 * 4
    np.testing.assert_allclose(axes[0].images[0].get_array(), np.moveaxis(x[0].numpy(), 0, -1))
    warped = np.asarray(axes[1].images[0].get_array())
    assert warped.shape == (32, 32, 3) and warped[..., 1:].max() == 0 and warped[..., 0].max() > 0.9  # red only


# --------------------------------------------------------------------------- ArviZ plots through the adapter
def test_top_hidden_units_rank_by_the_output_weights(idata):
    W2 = idata.posterior["W2"].mean(("chain", "draw")).values
    hidden = figures.top_hidden_units(idata, 2)
    assert hidden == list(np.argsort(-np.linalg.norm(W2, axis=0))[:2])


def test_eta_posterior_only_under_full_bayes(idata, tmp_path):
    with pytest.raises(ValueError, match="point estimate"):
        figures.plot_eta_posterior(idata, tmp_path / "eta_post.png")
    model = InvariantNet(ModelConfig(hidden=4, num_transforms=2, first_layer_prior=False, eta_prior="uniform"),
                         num_data=10)
    full = dg.to_inference_data(model, make_guide(model, "hybrid"), torch.rand(10, 1, 28, 28),
                                torch.randint(0, 10, (10,)), num_draws=30)
    fig = figures.plot_eta_posterior(full, tmp_path / "eta_post.png", {"rotate": math.pi})
    assert_png(tmp_path / "eta_post.png")
    assert len(fig.axes) == K and all("eta" in ax.get_title() for ax in fig.axes)


def test_trace_plot_of_an_mcmc_posterior(tmp_path):
    rng = np.random.default_rng(0)
    posterior = dg.az.from_dict(posterior={"W2": rng.normal(size=(2, 50, 2, 3)), "b2": rng.normal(size=(2, 50, 2))},
                                dims={"W2": ["class", "hidden"], "b2": ["class"]})
    fig = figures.plot_trace(posterior, tmp_path / "trace.png")
    assert_png(tmp_path / "trace.png")
    assert len(fig.axes) == 4  # (W2, b2) x (density, trace)
    assert fig.axes[1].get_xlim()[1] >= 49  # the trace runs over the draws


def test_pareto_k_in_arviz_categories_and_loo_comparison_figures(idata, tmp_path):
    k, good_k = dg.pointwise_pareto_k(idata)
    assert good_k == pytest.approx(min(1 - 1 / math.log10(8), 0.7))
    made = np.array([0.1, 0.2, 0.5, 0.9, 1.5])
    fig = figures.plot_pareto_k(made, tmp_path / "k.png", good_k=0.4, num_draws=8)
    assert_png(tmp_path / "k.png")
    ax = fig.axes[0]
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 2, 1]  # good, bad, very bad
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("k <= 0.40") and labels[0].endswith("2 of 5")
    assert "min(1 - 1/log10 M, 0.7)" in labels[-1] and "M = 8" in labels[-1]
    assert "more --draws" in ax.get_title()  # 8 draws are too few for a verdict, and the figure says so
    worse = idata.copy()
    worse.log_likelihood["y"] = worse.log_likelihood["y"] - 0.5
    table, _ = dg.compare_models({"a": idata, "b": worse})
    fig = figures.plot_loo_comparison(table, tmp_path / "loo.png", elpd_test={"a": (-40.0, 2.0), "b": (-50.0, 3.0)})
    assert_png(tmp_path / "loo.png")
    train, test = fig.axes
    assert [t.get_text() for t in train.get_yticklabels()] == ["a", "b"]
    assert "training" in train.get_xlabel() and "test" in test.get_xlabel()


def test_reference_comparison_scatter(tmp_path):
    import pandas as pd

    table = pd.DataFrame({"nuts_mean": [0.0, 1.0, -1.0], "nuts_sd": [1.0, 0.5, 0.8],
                          "guide_mean": [0.1, 0.9, -1.1], "guide_sd": [0.7, 0.4, 0.6]})
    fig = figures.plot_reference_comparison(table, tmp_path / "ref.png")
    assert_png(tmp_path / "ref.png")
    ax_mean, ax_sd = fig.axes
    assert ax_mean.get_xlim() == ax_mean.get_ylim() and ax_sd.get_xlabel() == "NUTS posterior std"


def test_eta_trajectories_mark_the_burn_in_and_the_predicting_phase(tmp_path):
    steps = np.arange(0, 40, 10)
    eta = np.full((4, 6), 0.1)
    fig = plots.plot_eta_trajectories(steps, eta, names=ISOTROPIC_NAMES, marks={"burn-in ends": 10, "phase 2": 20})
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [n for n in labels if n in ISOTROPIC_NAMES] == ["rotate", "translate_x", "translate_y", "scale", "stretch",
                                                          "shear"]
    for ax in fig.axes:  # the marks on every panel, named once
        assert sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":") == [10, 20]
    assert {t.get_text() for t in fig.axes[0].texts} == {"burn-in ends", "phase 2"}


# --------------------------------------------------------------------------- format and style
@pytest.mark.parametrize(("fmt", "magic"), [("png", PNG), ("pdf", b"%PDF-"), ("svg", b"<?xml")])
def test_every_format_is_written_by_its_suffix_and_the_same_figure_gives_the_same_file(tmp_path, fmt, magic):
    W1 = np.random.default_rng(0).normal(size=(4, 784))
    paths = [plots.FigureFormat(fmt).save(plots.plot_filter_bank(W1, num_filters=4), tmp_path / str(i), "filters")
             for i in range(2)]
    assert paths[0] == tmp_path / "0" / f"filters.{fmt}"
    data = [p.read_bytes() for p in paths]
    assert data[0].startswith(magic) and data[0] == data[1]  # no time stamp in the file


def test_dpi_sets_the_png_resolution(tmp_path):
    fig = plots.plot_eta_trajectories([1, 2], np.ones((2, 1)), names=("rotate",))
    sizes = []
    for dpi in (50, 100):
        path = plots.FigureFormat("png", dpi).save(fig, tmp_path, f"eta-{dpi}")
        sizes.append(int.from_bytes(path.read_bytes()[16:20], "big"))  # the PNG header's width in pixels
    assert sizes[1] == pytest.approx(2 * sizes[0], abs=2)


def test_figure_format_refuses_unknown_formats_and_resolutions():
    with pytest.raises(ValueError, match="unknown figure format"):
        plots.FigureFormat("jpg")
    with pytest.raises(ValueError, match="--dpi"):
        plots.FigureFormat("png", 5)


def test_figures_share_one_style_and_leave_the_global_settings_alone():
    import matplotlib

    before = dict(matplotlib.rcParams)
    fig = plots.plot_eta_trajectories([1, 2], np.ones((2, 1)), names=("rotate",))
    ax = fig.axes[0]
    assert ax.xaxis.label.get_fontsize() == plots.STYLE["axes.labelsize"]
    assert fig._suptitle.get_fontsize() == plots.STYLE["figure.titlesize"]
    assert dict(matplotlib.rcParams) == before
