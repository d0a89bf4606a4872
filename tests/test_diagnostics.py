"""The ArviZ adapter (inference/diagnostics/), run loading (inference/run_io.py) and the diagnose CLI.

Tiny models on random images keep every test to a few seconds; the NUTS reference test stays well under a
minute on two busy cores. The CLI tests train a tiny run on the MNIST subset (skipped without it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from guides import make_guide
from inference import diagnostics as dg
from inference import draws as dr
from inference.data import true_extent
from inference.diagnose import cli as diagnose_cli
from inference.diagnostics import criteria, nuts
from inference.diagnostics.nuts import fit_reference_guide, reference_data, reference_model
from inference.run_io import RunError, load_run, load_run_data, read_eta_history
from inference.train import cli as train_cli
from models import GENERATOR_NAMES, InvariantNet, ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
N, D, S, M = 24, 8, 3, 6


def tiny(kind: str = "hybrid", **overrides) -> tuple[InvariantNet, object, torch.Tensor, torch.Tensor]:
    """A tiny invariant network, a guide of ``kind`` and random data (no training needed for shapes)."""
    first_layer_prior = kind not in ("hybrid", "paper")
    cfg = ModelConfig(hidden=D, num_transforms=S, first_layer_prior=first_layer_prior, **overrides)
    model = InvariantNet(cfg, num_data=N)
    guide = make_guide(model, kind)
    x = torch.rand(N, 1, 28, 28)
    y = torch.randint(0, 10, (N,)) if cfg.likelihood.value == "categorical" else torch.randn(N, 10)
    return model, guide, x, y


def trace_log_lik(model, draws: dr.GuideDraws, m: int, x, y) -> torch.Tensor:
    """log p(y_n | x_n, theta_m, eps_m) read off the Pyro trace of the model (the reference)."""
    values = draws.draw(m)
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y, values["eps"].shape[0])
    site = trace.nodes["obs"]
    return site["fn"].log_prob(site["value"])


# --------------------------------------------------------------------------- draws and likelihood
def test_site_kinds_tell_point_estimates_from_distributions():
    assert dr.site_kinds(*tiny("hybrid")[:2]) == {"W1": "point", "b1": "point", "W2": "random", "b2": "random"}
    assert set(dr.site_kinds(*tiny("normal")[:2]).values()) == {"random"}
    assert set(dr.site_kinds(*tiny("map")[:2]).values()) == {"point"}


def test_draws_have_one_leading_draw_dimension():
    model, guide, *_ = tiny("hybrid")
    draws = dr.draw_posterior(model, guide, M, num_transforms=5)
    assert draws.random["W2"].shape == (M, 10, D) and draws.random["b2"].shape == (M, 10)
    assert draws.point["W1"].shape == (D, 784) and draws.point["b1"].shape == (D,)
    assert draws.eps.shape == (M, 5, len(GENERATOR_NAMES))
    assert not torch.equal(draws.random["W2"][0], draws.random["W2"][1])


@pytest.mark.parametrize("kind, overrides", [
    ("hybrid", {}),
    ("normal", {}),
    ("hybrid", {"eta_prior": "uniform"}),
    ("normal", {"likelihood": "gaussian"}),
    ("hybrid", {"averaging": "logits"}),
])
def test_log_likelihood_per_draw_equals_the_model_trace(kind, overrides):
    model, guide, x, y = tiny(kind, **overrides)
    draws = dr.draw_posterior(model, guide, 3)
    log_lik, _ = dr.predictive_outputs(model, draws, x, y, batch_size=7)  # batches that do not divide N
    assert log_lik.shape == (3, N)
    for m in range(3):
        torch.testing.assert_close(log_lik[m], trace_log_lik(model, draws, m, x, y), atol=1e-5, rtol=1e-5)


def test_shared_features_path_equals_the_model_trace():
    """One eps and a point-estimated W1: features computed once, the output layer per draw."""
    model, guide, x, y = tiny("hybrid")
    draws = criteria.draw_with_log_q(model, guide, 4, shared_eps=True)
    assert draws.eps.shape[0] == 1 and dr._shares_features(model, draws)
    log_lik, _ = dr.predictive_outputs(model, draws, x, y, batch_size=10)
    for m in range(4):
        torch.testing.assert_close(log_lik[m], trace_log_lik(model, draws, m, x, y), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- InferenceData
N_TEST = 10
TERMS = [{"step": 1, "elbo": -3.0, "expected_loglik": -2.0, "kl": 1.0},
         {"step": 10, "elbo": -2.5, "expected_loglik": -1.7, "kl": 0.8}]


@pytest.fixture
def idata_hybrid():
    model, guide, x, y = tiny("hybrid")
    x_test, y_test = torch.rand(N_TEST, 1, 28, 28), torch.randint(0, 10, (N_TEST,))
    history = ([1, 10, 20], torch.rand(3, len(GENERATOR_NAMES)))
    idata = dg.to_inference_data(model, guide, x, y, test=(x_test, y_test), num_draws=M, eta_history=history,
                                 losses=[3.0, 2.0, 1.5], elbo_history=TERMS,
                                 eta_true={g: (math.pi if g == "rotate" else 0.0) for g in GENERATOR_NAMES},
                                 attrs={"run_dir": "/tmp/run", "flag": True})
    return model, idata, x, y, history


def test_inference_data_groups_dims_and_coords(idata_hybrid):
    model, idata, x, y, history = idata_hybrid
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "predictions", "constant_data",
            dg.POINT_GROUP, dg.TRAINING_GROUP} <= set(idata.groups())
    post = idata.posterior
    assert post["W2"].dims == ("chain", "draw", "class", "hidden") and post["W2"].shape == (1, M, 10, D)
    assert post["b2"].dims == ("chain", "draw", "class")
    assert post["eps"].dims == ("chain", "draw", "transform", "generator")
    assert "W1" not in post  # a point estimate under the hybrid guide
    point = idata[dg.POINT_GROUP]
    assert point["W1"].dims == ("hidden", "pixel") and point["W1"].shape == (D, 784)
    assert list(point["eta"].coords["generator"].values) == list(GENERATOR_NAMES)
    np.testing.assert_allclose(point["eta"].values, model.eta_effective.detach().numpy())
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs") and idata.log_likelihood["y"].shape == (1, M, N)
    assert (idata.log_likelihood["y"].values <= 0).all()
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    assert idata.posterior_predictive["y"].shape == (1, M, N)
    pred = idata.predictions
    assert pred["log_probs"].dims == ("chain", "draw", "test_obs", "class") and pred["log_probs"].shape[2] == N_TEST
    np.testing.assert_allclose(np.exp(pred["log_probs"].values).sum(-1), 1.0, rtol=1e-5)
    y_test = dg.test_labels(idata)
    assert y_test.shape == (N_TEST,) and pred["log_lik"].dims == ("chain", "draw", "test_obs")
    picked = np.take_along_axis(pred["log_probs"].values, y_test[None, None, :, None], -1)[..., 0]
    np.testing.assert_allclose(pred["log_lik"].values, picked, rtol=1e-5)  # log p(y_test | x_test, theta_m)
    train = idata[dg.TRAINING_GROUP]
    assert train["eta"].dims == ("step", "generator") and list(train["step"].values) == history[0]
    np.testing.assert_allclose(train["elbo"].values, [-3.0, -2.0, -1.5])
    assert list(train["logged_step"].values) == [1, 10]
    np.testing.assert_allclose(train["kl"].values, [1.0, 0.8])
    np.testing.assert_allclose(dg.training_history(idata)["expected_loglik"], [-2.0, -1.7])
    assert idata.constant_data["eta_true"].sel(generator="rotate") == pytest.approx(math.pi)
    assert "R-hat and ESS do not apply" in post.attrs["inference"]
    assert post.attrs["point_estimate_sites"] == "W1,b1"
    assert "training examples" in idata.log_likelihood.attrs["note"] and "held-out" in pred.attrs["note"]
    assert post.attrs["flag"] == 1 and post.attrs["run_dir"] == "/tmp/run"


def test_netcdf_round_trip_keeps_every_group_value_coord_and_attr(idata_hybrid, tmp_path):
    _, idata, *_ = idata_hybrid
    path = dg.save_inference_data(idata, tmp_path / "sub" / "idata.nc")
    back = dg.load_inference_data(path)
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        a, b = idata[group], back[group]
        assert set(a.data_vars) == set(b.data_vars), group
        for name in a.data_vars:
            assert a[name].dims == b[name].dims
            np.testing.assert_array_equal(a[name].values, b[name].values)
        for coord in a.coords:
            np.testing.assert_array_equal(a[coord].values, b[coord].values)
        for key, value in a.attrs.items():
            assert b.attrs[key] == value, (group, key)
    dg.save_inference_data(back, path)  # the loaded file was closed: it can be overwritten
    assert dg.load_inference_data(path).posterior["W2"].shape == (1, M, 10, D)


def test_load_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no InferenceData file"):
        dg.load_inference_data(tmp_path / "missing.nc")


def test_shared_eps_is_one_eps_for_every_draw_and_the_likelihood_is_the_models():
    model, guide, x, y = tiny("hybrid")
    idata = dg.to_inference_data(model, guide, x, y, num_draws=M, shared_eps=True)
    eps = idata.posterior["eps"].values[0]  # (M, S, K)
    assert (eps == eps[:1]).all() and idata.posterior.attrs["shared_eps"] == 1
    values = {"W1": torch.as_tensor(idata[dg.POINT_GROUP]["W1"].values),
              "b1": torch.as_tensor(idata[dg.POINT_GROUP]["b1"].values), "eps": torch.as_tensor(eps[0])}
    for m in (0, M - 1):
        values.update(W2=torch.as_tensor(idata.posterior["W2"].values[0, m]),
                      b2=torch.as_tensor(idata.posterior["b2"].values[0, m]))
        with torch.no_grad():
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y, S)
        expected = trace.nodes["obs"]["fn"].log_prob(y)
        np.testing.assert_allclose(idata.log_likelihood["y"].values[0, m], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_full_bayes_eta_is_in_the_posterior():
    model, guide, x, y = tiny("hybrid", eta_prior="uniform")
    idata = dg.to_inference_data(model, guide, x, y, num_draws=M)
    assert idata.posterior["eta"].dims == ("chain", "draw", "generator")
    assert "eta" not in idata[dg.POINT_GROUP]
    eta = dg.eta_values(idata)
    assert eta.shape == (M, len(GENERATOR_NAMES)) and (eta >= 0).all() and (eta <= math.pi).all()
    assert idata.posterior.attrs["eta_treatment"].startswith("full Bayes")


def test_large_sites_keep_only_their_moments():
    model, guide, x, y = tiny("normal")
    idata = dg.to_inference_data(model, guide, x, y, num_draws=M, max_site_elements=1000)
    assert "W1" not in idata.posterior and "W2" in idata.posterior  # M * D * 784 > 1000 >= M * 10 * D
    moments = idata[dg.MOMENTS_GROUP]
    assert moments["W1_mean"].dims == ("hidden", "pixel") and moments["W1_std"].shape == (D, 784)
    np.testing.assert_array_equal(dg.w1_mean(idata), moments["W1_mean"].values)


# --------------------------------------------------------------------------- LOO, WAIC, comparison
def test_loo_is_on_the_training_data_and_the_test_elpd_is_apart(idata_hybrid):
    _, idata, *_ = idata_hybrid
    worse = idata.copy()
    worse.log_likelihood["y"] = worse.log_likelihood["y"] - 1.0
    worse.predictions["log_lik"] = worse.predictions["log_lik"] - 1.0
    loo = dg.loo_summary(idata)
    assert loo["n_obs"] == N and loo["n_draws"] == M and loo["per_example"] == pytest.approx(loo["elpd_loo"] / N)
    assert sum(loo["pareto_k"].values()) == N
    assert loo["good_k"] == pytest.approx(min(1 - 1 / math.log10(M), 0.7))
    ll = idata.log_likelihood["y"].values[0].astype(np.float64)  # (M, N)
    lppd = float((np.logaddexp.reduce(ll, axis=0) - math.log(M)).sum())
    assert loo["elpd_loo"] <= lppd + 1e-9  # leaving an example out can only cost: p_loo >= 0
    assert "training examples" in loo["note"]
    test = dg.test_summary(idata)
    ll_test = idata.predictions["log_lik"].values[0].astype(np.float64)  # (M, N_TEST)
    assert test["elpd"] == pytest.approx(float((np.logaddexp.reduce(ll_test, axis=0) - math.log(M)).sum()))
    assert test["n_obs"] == N_TEST and test["per_example"] == pytest.approx(test["elpd"] / N_TEST)
    assert dg.test_summary(worse)["elpd"] == pytest.approx(test["elpd"] - N_TEST, abs=1e-3)
    assert dg.loo_summary(worse)["elpd_loo"] == pytest.approx(loo["elpd_loo"] - N, abs=1e-3)
    assert math.isfinite(dg.waic_summary(idata)["elpd_waic"])
    table, _ = dg.compare_models({"better": idata, "worse": worse})
    assert list(table.index) == ["better", "worse"]
    assert table.loc["worse", "elpd_diff"] == pytest.approx(N, abs=1e-3)


def test_comparison_refuses_different_observations(idata_hybrid):
    _, idata, *_ = idata_hybrid
    other = idata.copy()
    other.observed_data["y"] = (other.observed_data["y"] + 1) % 10
    with pytest.raises(ValueError, match="other observations"):
        dg.compare_models({"a": idata, "b": other})


# --------------------------------------------------------------------------- VI quality
def test_psis_khat_separates_light_and_heavy_tailed_weights():
    rng = np.random.default_rng(0)
    assert dg.psis_khat(rng.normal(0.0, 0.1, 1000)) < 0.5
    assert dg.psis_khat(-2.0 * np.log(rng.uniform(size=1000))) > 1.0  # Pareto weights with shape k = 2
    assert dg.psis_khat(np.full(50, -3.0)) == -math.inf  # equal weights


def conjugate_model_and_exact_guide():
    """Bayesian linear regression on fixed RFF features (as in test_conjugate.py) and q = its exact posterior."""
    image, hidden, out, n, sigma = (1, 3, 3), 5, 2, 40, 0.5
    cfg = ModelConfig(image_shape=image, hidden=hidden, first_layer="rff", generators=(), learn_eta=False,
                      likelihood="gaussian", num_classes=out, noise_scale=sigma, num_transforms=1)
    model = InvariantNet(cfg, num_data=n).double()
    x = torch.rand(n, *image, dtype=torch.float64)
    h = math.sqrt(2.0 / hidden) * torch.cos(x.reshape(n, -1) @ model.W1.T + model.b1)
    phi = torch.cat([h, torch.ones(n, 1, dtype=torch.float64)], 1)
    y = phi @ torch.randn(hidden + 1, out, dtype=torch.float64) + sigma * torch.randn(n, out, dtype=torch.float64)
    precision = phi.T @ phi / sigma**2 + torch.eye(hidden + 1, dtype=torch.float64)
    mean = torch.linalg.solve(precision, phi.T @ y) / sigma**2
    cov_y = phi @ phi.T + sigma**2 * torch.eye(n, dtype=torch.float64)
    log_z = sum(float(dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov_y).log_prob(y[:, c]))
                for c in range(out))

    def exact_posterior(x, y=None, num_transforms=None):
        w = pyro.sample("w", dist.MultivariateNormal(mean.T, precision_matrix=precision).to_event(1),
                        infer={"is_auxiliary": True})
        pyro.sample("W2", dist.Delta(w[..., :hidden], event_dim=2))
        pyro.sample("b2", dist.Delta(w[..., hidden], event_dim=1))
        pyro.sample("eps", model.eps_prior(1 if num_transforms is None else num_transforms))

    return model, exact_posterior, x, y, log_z


def test_guide_khat_weights_are_log_p_minus_log_q():
    """At the exact posterior log p(y, theta) - log q(theta) = log Z for every draw: bookkeeping is exact."""
    model, guide, x, y, log_z = conjugate_model_and_exact_guide()
    result = dg.guide_khat(model, guide, x, y, num_draws=30)
    np.testing.assert_allclose(result.log_weights, log_z, rtol=0, atol=1e-6)
    assert result.khat == -math.inf and result.ess == pytest.approx(30)
    assert result.sites == ["W2", "b2"]


def test_guide_khat_of_a_far_too_narrow_guide_is_large_and_map_is_not_applicable():
    model, _, x, y = tiny("hybrid")
    guide = make_guide(model, "hybrid", init_scale=0.01)  # untrained, q(W2) 100 times narrower than the prior
    result = dg.guide_khat(model, guide, x, y, num_draws=100, shared_eps=True)
    assert result.sites == ["W2", "b2"] and "conditioned on the point estimates W1, b1" in result.note
    assert result.khat > 0.7 and result.log_weights.shape == (100,)
    model, guide, x, y = tiny("map")
    result = dg.guide_khat(model, guide, x, y, num_draws=10)
    assert math.isnan(result.khat) and "not applicable" in result.note


# --------------------------------------------------------------------------- NUTS reference
def test_reference_potential_is_the_model_log_joint():
    data = reference_data(None, num_data=30, synthetic=True)
    model = reference_model(len(data))
    potential = nuts.output_layer_potential(model, data.x, data.y)
    for _ in range(3):
        values = {"W2": torch.randn(3, 6), "b2": torch.randn(3), "eps": torch.zeros(1, len(GENERATOR_NAMES))}
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(data.x, data.y, 1)
        trace.compute_log_prob(site_filter=lambda name, site: name != "eps")
        joint = sum(site["log_prob_sum"] for name, site in trace.nodes.items()
                    if site["type"] == "sample" and name != "eps")
        assert float(-potential(values)) == pytest.approx(float(joint), rel=1e-5)


def test_nuts_reference_converges_fast_and_the_guide_is_close():
    start = time.perf_counter()
    data = reference_data(None, num_data=45, synthetic=True)
    model = reference_model(len(data))
    reference = dg.nuts_reference(model, data.x, data.y, num_warmup=200, num_samples=200, num_chains=2)
    assert reference.posterior["W2"].shape == (2, 200, 3, 6)
    stats = dg.summary_rhat_ess(reference)
    assert stats["max_rhat"] < 1.05, stats
    assert stats["min_ess_bulk"] > 100, stats
    assert dg.num_divergences(reference) == 0
    guide = fit_reference_guide(model, data, steps=600)
    table = dg.compare_with_reference(reference, dg.guide_draws_to_inference_data(model, guide, 500))
    assert len(table) == 21 and table["z"].abs().max() < 0.5  # means agree within half a posterior std
    assert (table["sd_ratio"] < 1.2).all()  # mean field does not overestimate the spread
    assert time.perf_counter() - start < 60


# --------------------------------------------------------------------------- run loading and the CLI
def tiny_train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--train-size", "60", "--test-size", "30",
            "--hidden", "8", "--num-steps", "6", "--num-transforms", "2", "--eval-transforms", "2",
            "--batch-size", "20", "--checkpoint-every", "3", "--threads", "1", "--no-progress", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def tiny_runs(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two finished tiny runs on the same data: affine invariance learned, and eta = 0."""
    root = tmp_path_factory.mktemp("diagnose")
    runs = root / "invariant", root / "eta0"
    assert train_cli(tiny_train_args(data_dir, runs[0])) == 0
    assert train_cli(tiny_train_args(data_dir, runs[1], "--generators", "none")) == 0
    return runs


def test_load_run_restores_the_fitted_parameters(tiny_runs):
    run = load_run(tiny_runs[0])
    metrics = json.loads((tiny_runs[0] / "metrics.json").read_text())
    eta = run.model.eta_effective.detach()
    np.testing.assert_allclose(eta.numpy(), [metrics["eta"][g] for g in GENERATOR_NAMES], rtol=1e-6)
    assert run.checkpoint.step == 6 and len(run.losses) == 6
    data = load_run_data(run)
    assert len(data.test) == 30 and len(data.train) == 60
    steps, history = read_eta_history(run)
    assert steps[-1] == 6 and history.shape == (len(steps), len(GENERATOR_NAMES))
    assert true_extent(run.config.data)["rotate"] == pytest.approx(math.pi)


def test_diagnose_test_size_takes_a_class_balanced_subset(tiny_runs):
    from inference.diagnostics.runs import DiagnoseOptions, eval_splits

    run = load_run(tiny_runs[0])
    _, test = eval_splits(run, DiagnoseOptions(test_size=10))
    assert torch.equal(torch.bincount(test.y, minlength=10), torch.ones(10, dtype=torch.long))
    _, again = eval_splits(load_run(tiny_runs[1]), DiagnoseOptions(test_size=10))
    assert torch.equal(again.x, test.x)  # the same examples for every run on the same data (--compare)


def test_load_run_errors_are_one_line(tiny_runs, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no metrics.json"):
        load_run(tmp_path / "empty")
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text((tiny_runs[0] / "metrics.json").read_text())
    with pytest.raises(RunError, match="no checkpoints/ folder") as err:
        load_run(old)
    command = str(err.value).split("train it again, ")[1].replace("NEW", str(tmp_path / "new")).split()
    assert command[:4] == ["python", "-m", "inference.train", "--config"]  # the command the message offers works:
    (old / "config.json").write_text((tiny_runs[0] / "config.json").read_text())
    assert train_cli([*command[3:], "--no-progress"]) == 0
    assert load_run(tmp_path / "new").metrics["test_accuracy"] == load_run(tiny_runs[0]).metrics["test_accuracy"]


def test_diagnose_without_checkpoints_is_a_one_line_error(tiny_runs, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text((tiny_runs[0] / "metrics.json").read_text())
    assert diagnose_cli([str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "checkpoints" in err[0]


def test_diagnose_argument_errors_are_one_line(capsys):
    assert diagnose_cli([]) == 2
    assert diagnose_cli(["somewhere", "--draws", "2"]) == 2
    assert diagnose_cli(["somewhere", "--dpi", "5"]) == 2
    assert diagnose_cli(["somewhere", "--rotation-step", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: give either RUN_DIR or --nuts-reference OUT",
                     "error: --draws must be at least 4 for PSIS-LOO",
                     "error: --dpi must be an integer in [20, 1200], got 5",
                     "error: --rotation-step must lie in (0, 180] degrees"]
    with pytest.raises(SystemExit) as stop:
        diagnose_cli(["somewhere", "--format", "jpg"])  # not a choice: argparse's usage error
    assert stop.value.code == 2


def test_diagnose_cli_in_a_subprocess_writes_the_file_and_figures(tiny_runs, tmp_path):
    out, figs = tmp_path / "diag", tmp_path / "figs"
    env = {k: v for k, v in os.environ.items() if k != "INVW_DATA_DIR"}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "inference.diagnose", str(tiny_runs[0]), "--out", str(out),
         "--compare", str(tiny_runs[1]), "--draws", "6", "--khat-draws", "20", "--num-filters", "8",
         "--rotation-examples", "10", "--rotation-step", "90", "--format", "pdf", "--figures-dir", str(figs)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}")
    idata = dg.load_inference_data(out / "inference_data.nc")
    assert idata.log_likelihood["y"].shape == (1, 6, 60)  # LOO over the 60 training examples
    assert idata.predictions["log_lik"].shape == (1, 6, 30)  # the 30 test examples apart
    summary = json.loads((out / "summary.json").read_text())
    assert summary["guide_khat"]["num_draws"] == 20 and summary["guide_khat"]["shared_eps"] is True
    check = json.loads((tiny_runs[0] / "metrics.json").read_text())["evidence_check"]
    assert summary["evidence_check"] == check  # the run's own check, repeated where diagnostics are read
    assert ("eta was chosen by the bound's KL term alone" in proc.stdout) is (not check["fits_labels"])
    assert summary["shared_eps"] is True and summary["draws"] == 6
    assert summary["loo_train"]["n_obs"] == 60 and sum(summary["loo_train"]["pareto_k"].values()) == 60
    assert summary["elpd_test"]["n_obs"] == 30 and summary["predictive_test"]["n_obs"] == 30
    assert summary["elpd_test"]["elpd"] == pytest.approx(dg.elpd_test(idata)[0])
    assert set(summary["comparison"]["table_loo_train"]) == {"invariant", "eta0"}
    assert set(summary["rotation_sweep"]) == {"invariant", "eta0"}
    assert summary["rotation_sweep"]["invariant"]["angles_deg"] == [-180.0, -90.0, 0.0, 90.0, 180.0]
    for name in ("filters", "invariant_filters", "eta_trajectories", "elbo", "reliability", "transformed_digits",
                 "pareto_k", "loo_comparison", "rotation_uncertainty"):
        path = Path(summary["figures"][name])
        assert path.parent == figs and path.suffix == ".pdf", name
        assert path.read_bytes()[:5] == b"%PDF-", name
    assert summary["figures"]["eta_posterior"].startswith("skipped")
    assert not list(figs.glob("*.png")) and not (out / "figures").exists()
    assert (out / "loo_comparison.csv").is_file() and (out / "inference_data-eta0.nc").is_file()


def test_diagnose_draws_follow_the_eps_policy(tiny_runs):
    from inference.diagnostics.runs import FRESH_DRAWS, SHARED_DRAWS, DiagnoseOptions, num_draws, shared_eps

    run = load_run(tiny_runs[0])  # hybrid guide: W1 and eta are point estimates
    assert shared_eps(run, "auto") and not shared_eps(run, "fresh")
    assert num_draws(run, DiagnoseOptions()) == SHARED_DRAWS
    assert num_draws(run, DiagnoseOptions(eps="fresh")) == FRESH_DRAWS
    assert num_draws(run, DiagnoseOptions(draws=7)) == 7


def test_phase_marks_follow_the_training_schedule():
    from inference.diagnostics.run_figures import phase_marks
    from inference.svi import TrainConfig

    assert phase_marks(TrainConfig()) == {}
    marks = phase_marks(TrainConfig(num_steps=50, eta_objective="evidence", evidence_schedule="sequential",
                                     eta_burnin=10))
    assert sorted(marks.values()) == [10, 50]
