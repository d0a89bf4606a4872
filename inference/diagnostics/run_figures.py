"""The figures of a diagnosed run (``python -m inference.diagnose``), each saying in its title what it draws.

* ``filters``, ``invariant_filters``: the filters of W1 the output layer uses most, and the same averaged over
  the learned transformations (a picture of the invariance, not the network's computation);
* ``eta_trajectories``: eta in degrees, pixels and coefficients against the data's true extent;
* ``elbo``: the ELBO / N of every step with its expected log-likelihood and KL at the logged steps;
* ``reliability``: calibration of the test predictive;
* ``transformed_digits``: one test example per class under transformations from the learned distribution;
* ``pareto_k``: PSIS-LOO's Pareto k of every training example in ArviZ's categories;
* ``rotation_uncertainty`` (:func:`write_rotation_figure`): accuracy and predictive entropy against the rotation
  of upright test examples, for the run and every ``--compare`` run;
* ``eta_posterior`` under full Bayes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inference import diagnostics, plots
from inference.data import Split, one_per_class, true_extent
from inference.diagnostics import figures
from inference.draws import site_kinds
from inference.plots import FigureFormat
from inference.run_io import LoadedRun
from inference.svi import TrainConfig
from inference.uncertainty import RotationSweep


def phase_marks(cfg: TrainConfig) -> dict[str, int]:
    """Steps worth marking on the training curves: the end of eta's burn-in, the start of the predicting phase."""
    marks = {"burn-in ends": cfg.eta_burnin} if cfg.eta_burnin else {}
    if cfg.sequential:
        marks["predicting guide starts (eta fixed)"] = cfg.num_steps
    return marks


def run_label(run: LoadedRun) -> str:
    """The run's folder name, with its dataset when they differ."""
    dataset = run.config.data.dataset.value
    return run.name if run.name == dataset else f"{run.name} ({dataset})"


def _filter_figures(run: LoadedRun, idata: Any, save: Any, num_filters: int, seed: int) -> dict[str, Any]:
    W1 = diagnostics.w1_mean(idata)
    if W1 is None:
        return {"filters": "skipped: fixed random-Fourier-feature first layer"}
    cfg, name = run.config.model, run_label(run)
    point = diagnostics.POINT_GROUP in idata.groups() and "W1" in idata[diagnostics.POINT_GROUP]
    ranked = figures.top_hidden_units(idata, num_filters)
    if ranked is not None:  # the filters the output layer uses most, not the first (often near their random init)
        W1 = W1[ranked]
    order = "largest ||E[W2[:, d]]|| first" if ranked is not None else "first filters"
    kind = "point estimate" if point else "posterior mean"
    return {"filters": save(plots.plot_filter_bank(W1, None, cfg.image_shape, num_filters,
                                                   title=f"{name}: learned filters ({kind} of W1; {order})"),
                            "filters"),
            "invariant_filters": save(plots.plot_invariant_filters(W1, diagnostics.eta_values(idata), None,
                                                                   cfg.image_shape, num_filters, title=name,
                                                                   seed=seed, names=cfg.generator_names),
                                      "invariant_filters")}


def _elbo_figure(run: LoadedRun, history: Mapping[str, np.ndarray]) -> Any:
    """The ELBO curve with its terms; the whole-training-set values of ``metrics.json`` at the step where the guide
    they belong to stopped training (none under the joint evidence objective, whose loss is another guide's)."""
    cfg, metrics = run.config.train, run.metrics
    evidence = metrics.get("elbo_guide") == "evidence"
    end = cfg.num_steps if evidence and cfg.sequential else None if evidence else int(history["iteration"][-1])
    terms = {"step": history["logged_step"], "expected_loglik": history["expected_loglik"], "kl": history["kl"]} \
        if "kl" in history else None
    guide = f"{run.config.guide.kind.value} guide"
    if evidence:
        guide = ("evidence guide, then the predicting guide" if cfg.sequential
                 else "predicting guide (eta follows the evidence guide's ELBO)")
    kinds = site_kinds(run.model, run.guide)
    random = ", ".join(n for n, k in kinds.items() if k == "random") or "none"
    point = ", ".join(n for n, k in kinds.items() if k == "point")
    sites = f"KL of q over {random}" + (f"; point estimates {point} (their -log prior, if any, in it)" if point else "")
    return plots.plot_elbo(history["iteration"], history["elbo"], None,
                           final_elbo=metrics.get("elbo_per_example") if end is not None else None, terms=terms,
                           final_terms=metrics.get("elbo_terms") if end is not None else None,
                           marks=phase_marks(cfg), final_step=end,
                           title=f"{run_label(run)}: ELBO / N of the {guide} during training\n{sites}")


def write_figures(run: LoadedRun, idata: Any, test: Split, fig_dir: Path, fmt: FigureFormat, num_filters: int = 32,
                  seed: int = 0) -> dict[str, str]:
    """Every figure of the run that applies (all but ``rotation_uncertainty``) as ``fig_dir/<name>.<format>``;
    returns ``{name: path}`` and, for those skipped, why."""

    def save(fig: Any, name: str) -> str:
        return str(fmt.save(fig, fig_dir, name))

    cfg, name = run.config.model, run_label(run)
    eta = diagnostics.eta_values(idata)
    extent = true_extent(run.config.data, names=cfg.generator_names)
    written = _filter_figures(run, idata, save, num_filters, seed)
    history = diagnostics.training_history(idata)
    if "eta" in history:
        written["eta_trajectories"] = save(plots.plot_eta_trajectories(
            history["step"], history["eta"], extent, None, title=f"{name}: eta during training (dashed: the data's "
            "true extent)", names=cfg.generator_names, marks=phase_marks(run.config.train),
            image_size=cfg.image_shape[-1]), "eta_trajectories")
    if "elbo" in history:
        written["elbo"] = save(_elbo_figure(run, history), "elbo")
    if run.model.likelihood.has_classes:
        draws = idata.predictions.sizes["draw"]
        written["reliability"] = save(plots.plot_reliability(
            diagnostics.class_probabilities(idata), diagnostics.test_labels(idata), None,
            title=f"{name}: reliability, test set\nposterior predictive over {draws} weight draws"), "reliability")
    examples = one_per_class(test)
    written["transformed_digits"] = save(plots.plot_transformed_digits(
        examples.x, eta, None, seed=seed, title=f"{name}: one test example per class", names=cfg.generator_names,
        labels=examples.y.tolist()), "transformed_digits")
    if "eta" in idata.posterior:
        written["eta_posterior"] = save(figures.plot_eta_posterior(idata, None, extent), "eta_posterior")
    else:
        written["eta_posterior"] = "skipped: eta is a point estimate (empirical Bayes)"
    k, good_k = diagnostics.pointwise_pareto_k(idata)
    written["pareto_k"] = save(figures.plot_pareto_k(
        k, None, good_k=good_k, num_draws=int(idata.log_likelihood.sizes["draw"]),
        title=f"{name}: PSIS-LOO Pareto k per training example",
        labels=diagnostics.observed(idata) if run.model.likelihood.has_classes else None), "pareto_k")
    return written


def write_rotation_figure(sweeps: Mapping[str, RotationSweep], runs: Mapping[str, LoadedRun], fig_dir: Path,
                          fmt: FigureFormat) -> str:
    """``rotation_uncertainty``: every run's :class:`~inference.uncertainty.RotationSweep` in one figure, with the
    first run's data range and each run's learned eta_rotate."""
    first = next(iter(runs.values()))
    data_range = math.degrees(true_extent(first.config.data).get("rotate", 0.0))
    learned = {name: math.degrees(float(run.metrics.get("eta", {}).get("rotate", 0.0))) for name, run in runs.items()}
    fig = plots.plot_rotation_sweep(sweeps, None, data_range_deg=data_range, eta_deg=learned,
                                    title=f"trained on {first.config.data.dataset.value}")
    return str(fmt.save(fig, fig_dir, "rotation_uncertainty"))
