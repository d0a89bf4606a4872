"""Diagnose one finished run (the library behind ``python -m inference.diagnose``).

:func:`diagnose_run` rebuilds a run folder of ``python -m inference.train``, draws M times from its guide and writes
``inference_data.nc`` (:func:`inference.diagnostics.to_inference_data`), ``summary.json`` (test accuracy / NLL of
the draws, PSIS-LOO and WAIC with Pareto-k counts, the guide's PSIS k-hat, ``--compare`` results, timings) and the
figures; :func:`nuts_reference_run` fits the small NUTS reference of :mod:`inference.diagnostics.nuts`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from inference import diagnostics, plots
from inference.data import Split, balanced_subset, one_per_class
from inference.diagnostics import figures
from inference.diagnostics.nuts import fit_reference_guide, reference_model
from inference.draws import site_kinds
from inference.run_io import LoadedRun, load_run, load_run_data, read_eta_history, true_extent
from inference.svi import TrainConfig
from models.config import FirstLayer
from models.priors import EtaPrior

IDATA_FILE, SUMMARY_FILE, FIGURES_DIR = "inference_data.nc", "summary.json", "figures"


@dataclass(frozen=True)
class DiagnoseOptions:
    """Settings of :func:`diagnose_run` (see the CLI's help)."""

    draws: int = 32
    num_transforms: int | None = None
    test_size: int | None = None
    khat_draws: int | None = None  # None: 100 when the features can be shared, else 32 (see --khat-draws)
    khat_eps: str = "auto"
    num_filters: int = 32
    num_digits: int = 10  # test examples in the transformed-examples figure, one per class
    data_dir: str | None = None
    seed: int = 0


# --------------------------------------------------------------------------- one run
def _phase_marks(cfg: TrainConfig) -> dict[str, int]:
    """Steps worth marking on eta's trajectory: the end of its burn-in, the start of the predicting phase."""
    marks = {"burn-in ends": cfg.eta_burnin} if cfg.eta_burnin else {}
    if cfg.sequential:
        marks["predicting guide starts (eta fixed)"] = cfg.num_steps
    return marks


def _eval_transforms(run: LoadedRun) -> int:
    return int(run.metrics["config"].get("eval", {}).get("num_transforms", run.model_config.num_transforms))


def _shared_eps(run: LoadedRun, choice: str) -> bool:
    if choice != "auto":
        return choice == "shared"
    kinds = site_kinds(run.model, run.guide)
    first_layer_fixed = run.model_config.first_layer is FirstLayer.RFF or kinds.get("W1") == "point"
    return first_layer_fixed and run.model_config.eta_prior is EtaPrior.NONE


def eval_splits(run: LoadedRun, opts: DiagnoseOptions) -> tuple[Split, Split]:
    """The run's training set and its test set (a class-balanced, shuffled subset of ``opts.test_size`` examples,
    the same for every run on the same test set)."""
    data = load_run_data(run, opts.data_dir)
    test = data.test
    if opts.test_size is not None and opts.test_size < len(test):
        idx = balanced_subset(test.y, opts.test_size, torch.Generator().manual_seed(opts.seed))
        test = Split(test.x[idx], test.y[idx])
    return data.train, test


def run_inference_data(run: LoadedRun, test: Split, opts: DiagnoseOptions) -> Any:
    """The run's InferenceData on ``test`` (guide draws, log-likelihood, training history)."""
    pyro.set_rng_seed(opts.seed)
    S = opts.num_transforms or _eval_transforms(run)
    attrs = {"run_dir": str(run.run_dir), "dataset": run.data_config.dataset.value,
             "guide": run.guide_kind.value, "checkpoint_step": run.checkpoint.step,
             "num_train_steps": run.train_config.num_steps, "hidden": run.model_config.hidden}
    return diagnostics.to_inference_data(
        run.model, run.guide, test.x, test.y, num_draws=opts.draws, num_transforms=S,
        eta_history=read_eta_history(run), losses=run.losses,
        eta_true=true_extent(run.data_config, names=run.model_config.generator_names), attrs=attrs)


def predictive_metrics(idata: Any) -> dict[str, float]:
    """Accuracy and NLL of the posterior predictive mean over the guide draws."""
    probs = diagnostics.class_probabilities(idata)
    y = diagnostics.observed(idata)
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
    return {"accuracy": float((probs.argmax(1) == y).mean()), "nll": float(-np.log(p_true).mean())}


def write_figures(run: LoadedRun, idata: Any, test: Split, fig_dir: Path, opts: DiagnoseOptions) -> dict[str, str]:
    """Every figure that applies to the run; returns ``{name: path}`` and notes for those skipped."""
    written: dict[str, str] = {}
    cfg, dataset = run.model_config, run.data_config.dataset.value
    name = run.name if run.name == dataset else f"{run.name} ({dataset})"
    eta = diagnostics.eta_values(idata)
    extent = true_extent(run.data_config, names=run.model_config.generator_names)

    def out(fig_name: str) -> Path:
        written[fig_name] = str(fig_dir / f"{fig_name}.png")
        return fig_dir / f"{fig_name}.png"

    W1 = diagnostics.w1_mean(idata)
    if W1 is not None:
        kind = "point estimate" if diagnostics.POINT_GROUP in idata.groups() and \
            "W1" in idata[diagnostics.POINT_GROUP] else "posterior mean"
        ranked = "W2" in idata.posterior
        if ranked:  # the filters the output layer uses most, not the first (often near their random init)
            W1 = W1[figures.top_hidden_units(idata, opts.num_filters)]
        order = "largest ||E[W2[:, d]]|| first" if ranked else "first filters"
        plots.plot_filter_bank(W1, out("filters"), cfg.image_shape, opts.num_filters,
                               title=f"{name}: learned filters ({kind} of W1; {order})")
        plots.plot_invariant_filters(W1, eta, out("invariant_filters"), cfg.image_shape, opts.num_filters,
                                     title=name, seed=opts.seed, names=cfg.generator_names)
    else:
        written["filters"] = "skipped: fixed random-Fourier-feature first layer"
    history = diagnostics.training_history(idata)
    if "eta" in history:
        plots.plot_eta_trajectories(history["step"], history["eta"], extent, out("eta_trajectories"),
                                    title=f"{name}: eta during training (dashed: true extent)",
                                    names=cfg.generator_names, marks=_phase_marks(run.train_config))
    if "elbo" in history:
        plots.plot_elbo(history["iteration"], history["elbo"], out("elbo"),
                        final_elbo=run.metrics.get("elbo_per_example"), title=f"{name}: ELBO / N")
    if run.model.likelihood.has_classes:
        plots.plot_reliability(diagnostics.class_probabilities(idata), diagnostics.observed(idata),
                               out("reliability"), title=f"{name}: reliability, {opts.draws} guide draws")
    plots.plot_transformed_digits(one_per_class(test, opts.num_digits).x, eta, out("transformed_digits"),
                                  seed=opts.seed, title=name, names=cfg.generator_names)
    if "W2" in idata.posterior:
        figures.plot_weight_forest(idata, out("forest_W2"))
    if "eta" in idata.posterior:
        figures.plot_eta_posterior(idata, out("eta_posterior"), extent)
    else:
        written["eta_posterior"] = "skipped: eta is a point estimate (empirical Bayes)"
    k = diagnostics.pointwise_pareto_k(idata)
    good_k = min(1 - 1 / math.log10(idata.posterior.sizes["draw"]), 0.7)
    figures.plot_pareto_k(k, out("pareto_k"), good_k=good_k)
    return written


def diagnose_run(run_dir: str | Path, out: Path, opts: DiagnoseOptions, compare: list[str]) -> dict:
    """Write the ArviZ file, ``summary.json`` and the figures of one run (and the comparison runs)."""
    clock = time.perf_counter()
    run = load_run(run_dir)
    train, test = eval_splits(run, opts)
    t = time.perf_counter()
    idata = run_inference_data(run, test, opts)
    timings = {"inference_data": time.perf_counter() - t}
    summary: dict[str, Any] = {
        "run_dir": str(run.run_dir), "dataset": run.data_config.dataset.value, "guide": run.guide_kind.value,
        "checkpoint_step": run.checkpoint.step, "eta": run.metrics.get("eta"),
        "eta_true": true_extent(run.data_config, names=run.model_config.generator_names),
        "num_test": len(test), "draws": opts.draws,
        "num_transforms": int(idata.posterior.attrs["num_transforms"]),
        "predictive": predictive_metrics(idata) if run.model.likelihood.has_classes else None,
        "loo": diagnostics.loo_summary(idata), "waic": diagnostics.waic_summary(idata),
    }
    shared = _shared_eps(run, opts.khat_eps)
    khat_draws = opts.khat_draws if opts.khat_draws is not None else (100 if shared else 32)
    if khat_draws > 0:
        t = time.perf_counter()
        pyro.set_rng_seed(opts.seed)
        khat = diagnostics.guide_khat(run.model, run.guide, train.x, train.y, khat_draws, shared_eps=shared)
        summary["guide_khat"] = khat.as_dict()
        idata.posterior.attrs["guide_khat"] = khat.khat
        idata.posterior.attrs["guide_khat_note"] = khat.note
        timings["guide_khat"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    diagnostics.save_inference_data(idata, out / IDATA_FILE)
    t = time.perf_counter()
    summary["figures"] = write_figures(run, idata, test, out / FIGURES_DIR, opts)
    timings["figures"] = time.perf_counter() - t
    if compare:
        t = time.perf_counter()
        summary["comparison"] = compare_runs(run.name, idata, compare, out, opts)
        summary["figures"]["loo_comparison"] = str(out / FIGURES_DIR / "loo_comparison.png")
        timings["comparison"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - clock
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    (out / SUMMARY_FILE).write_text(to_json(summary))
    return summary


def compare_runs(name: str, idata: Any, others: list[str], out: Path, opts: DiagnoseOptions) -> dict:
    """PSIS-LOO comparison of the main run with ``others`` on the same test examples."""
    idatas, elpd_test = {name: idata}, {name: diagnostics.elpd_test(idata)[0]}
    for other_dir in others:
        other = load_run(other_dir)
        _, test = eval_splits(other, opts)
        other_name = other.name if other.name not in idatas else f"{other.name}-{len(idatas)}"
        other_idata = run_inference_data(other, test, opts)
        diagnostics.save_inference_data(other_idata, out / f"inference_data-{other_name}.nc")
        idatas[other_name] = other_idata
        elpd_test[other_name] = diagnostics.elpd_test(other_idata)[0]
    table, warnings_ = diagnostics.compare_models(idatas)
    table.to_csv(out / "loo_comparison.csv")
    figures.plot_loo_comparison(table, out / FIGURES_DIR / "loo_comparison.png", elpd_test=elpd_test,
                              title="PSIS-LOO on variational draws (test set)\nsquares: direct held-out elpd")
    return {"table": json.loads(table.to_json(orient="index")), "warnings": warnings_,
            "loo": {n: diagnostics.loo_summary(i) for n, i in idatas.items() if n != name},
            "elpd_test": elpd_test, "preferred_by_loo": str(table.index[0]),
            "note": diagnostics.LOO_NOTE}


# --------------------------------------------------------------------------- NUTS reference
def nuts_reference_run(out: Path, data: Split, chains: int = 2, warmup: int = 300, samples: int = 300,
                       svi_steps: int = 1500, seed: int = 0) -> dict:
    """NUTS and a mean-field guide on the small model; writes the trace plot, tables and ``summary.json``."""
    clock = time.perf_counter()
    model = reference_model(len(data), seed=seed)
    reference = diagnostics.nuts_reference(model, data.x, data.y, warmup, samples, chains, seed=seed)
    nuts_seconds = time.perf_counter() - clock
    stats = diagnostics.summary_rhat_ess(reference)
    guide = fit_reference_guide(model, data, svi_steps, seed)
    approx = diagnostics.guide_draws_to_inference_data(model, guide, num_draws=2000)
    table = diagnostics.compare_with_reference(reference, approx)
    khat = diagnostics.guide_khat(model, guide, data.x, data.y, num_draws=1000)
    out.mkdir(parents=True, exist_ok=True)
    diagnostics.save_inference_data(reference, out / "nuts_reference.nc")
    diagnostics.reference_summary(reference).to_csv(out / "nuts_summary.csv")
    table.to_csv(out / "guide_vs_nuts.csv")
    figures.plot_trace(reference, out / FIGURES_DIR / "nuts_trace.png",
                     title=f"NUTS reference, {chains} chains: max R-hat {stats['max_rhat']:.3f}, "
                           f"min ESS bulk {stats['min_ess_bulk']:.0f}")
    figures.plot_reference_comparison(table, out / FIGURES_DIR / "guide_vs_nuts.png",
                                    title="mean-field guide against NUTS (small RFF classifier)")
    summary = {
        "model": "RFF first layer (fixed), hidden 6, classes 3, no transformations; latent W2 (3, 6), b2 (3)",
        "num_data": len(data), "chains": chains, "warmup": warmup, "samples": samples, **stats,
        "divergences": diagnostics.num_divergences(reference), "nuts_seconds": round(nuts_seconds, 1),
        "guide": "normal (mean-field Gaussian), SVI", "guide_khat": khat.as_dict(),
        "mean_abs_z": float(table["z"].abs().mean()), "median_sd_ratio": float(table["sd_ratio"].median()),
        "seconds": round(time.perf_counter() - clock, 1),
    }
    (out / SUMMARY_FILE).write_text(to_json(summary))
    return summary


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON: numpy scalars as Python numbers, Enums as values, NaN / inf as null (k-hat of a MAP guide...)."""
    return json.dumps(_plain(obj), indent=indent, allow_nan=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):  # numpy scalars: bool_, integer, floating
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj.value if isinstance(obj, Enum) else obj
