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
    return dg.to_inference_data(model, guide, x, y, num_draws=8, eta_history=([1, 5, 9], torch.rand(3, K)),
                                losses=list(np.linspace(5, 2, 30)))


# --------------------------------------------------------------------------- filters
def test_filter_bank_draws_one_28x28_image_per_filter(tmp_path):
    W1 = np.random.default_rng(0).normal(size=(40, 784))
    fig = plots.plot_filter_bank(W1, tmp_path / "f" / "filters.png", num_filters=12, ncols=4)
    assert_png(tmp_path / "f" / "filters.png")
    axes = image_axes(fig)
    assert len(axes) == 12
    assert axes[0].images[0].get_array().shape == (28, 28)
    np.testing.assert_allclose(axes[3].images[0].get_array(), W1[3].reshape(28, 28))
    vmin, vmax = axes[0].images[0].get_clim()
    assert vmin == pytest.approx(-vmax)  # a symmetric colour scale: white is 0


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
    assert len(image_axes(fig)) == 8 and "rotate 1.00" in fig.get_suptitle() and fig.get_suptitle().startswith("run")


# --------------------------------------------------------------------------- curves
def test_eta_trajectories_one_line_per_generator_and_true_extent_dashed(tmp_path):
    steps = np.arange(0, 101, 10)
    eta = np.outer(np.linspace(0.1, 3.0, len(steps)), eta_with(rotate=1.0, shear=0.01) + 0.01)
    fig = plots.plot_eta_trajectories(steps, eta, {"rotate": math.pi, "shear": 0.0}, tmp_path / "eta.png")
    assert_png(tmp_path / "eta.png")
    ax = fig.axes[0]
    solid = [line for line in ax.lines if line.get_linestyle() == "-"]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(solid) == K and len(dashed) == 1  # a zero true extent is not drawn
    assert dashed[0].get_ydata()[0] == pytest.approx(math.pi)
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > math.pi
    assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] >= 100
    assert ax.get_xlabel() == "SVI step"


def test_elbo_curve_and_moving_average(tmp_path):
    elbo = -5 + np.log1p(np.arange(200)) + np.random.default_rng(0).normal(0, 0.1, 200)
    fig = plots.plot_elbo(np.arange(1, 201), elbo, tmp_path / "elbo.png", final_elbo=0.2, window=10)
    assert_png(tmp_path / "elbo.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 1  # raw, smoothed, final point
    lo, hi = ax.get_ylim()
    assert lo < np.percentile(elbo, 5) and hi > elbo.max()
    np.testing.assert_allclose(plots.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])


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
    assert "ECE" in top.get_title()


# --------------------------------------------------------------------------- transformed digits
def test_transform_samples_shapes_and_identity():
    x = torch.rand(3, 1, 28, 28)
    out = plots.transform_samples(x, eta_with(rotate=math.pi), num_samples=5)
    assert out.shape == (3, 5, 1, 28, 28)
    np.testing.assert_allclose(plots.transform_samples(x, np.zeros(K), 2)[:, 1], x.numpy(), atol=1e-5)


def test_transformed_digits_grid(tmp_path):
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 5:23, 12:16] = 1.0  # a vertical bar
    fig = plots.plot_transformed_digits(x, eta_with(rotate=math.pi), tmp_path / "digits.png", num_samples=4)
    assert_png(tmp_path / "digits.png")
    axes = image_axes(fig)
    assert len(axes) == 2 * 5 and axes[0].get_title() == "original"
    np.testing.assert_allclose(axes[0].images[0].get_array(), x[0, 0].numpy())


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
def test_weight_forest_of_selected_units(idata, tmp_path):
    hidden = figures.top_hidden_units(idata, 2)
    assert len(hidden) == 2
    fig = figures.plot_weight_forest(idata, tmp_path / "forest.png", hidden=hidden)
    assert_png(tmp_path / "forest.png")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 10 * 2 and any(str(hidden[0]) in label for label in labels)


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


def test_pareto_k_and_loo_comparison_figures(idata, tmp_path):
    k = dg.pointwise_pareto_k(idata)
    fig = figures.plot_pareto_k(k, tmp_path / "k.png", good_k=0.3)
    assert_png(tmp_path / "k.png")
    assert len(fig.axes[0].collections[0].get_offsets()) == k.size
    worse = idata.copy()
    worse.log_likelihood["y"] = worse.log_likelihood["y"] - 0.5
    table, _ = dg.compare_models({"a": idata, "b": worse})
    fig = figures.plot_loo_comparison(table, tmp_path / "loo.png", elpd_test={"a": -40.0, "b": -50.0})
    assert_png(tmp_path / "loo.png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b"]


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
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()[:6]] == list(ISOTROPIC_NAMES)
    assert sorted(line.get_xdata()[0] for line in ax.get_lines()[6:]) == [10, 20]  # two vertical marks
    assert {t.get_text() for t in ax.texts} == {"burn-in ends", "phase 2"}
