"""Diagnose one finished run (the library behind ``python -m inference.diagnose``).

:func:`diagnose_run` rebuilds a run folder of ``python -m inference.train``, draws M times from its guide and writes
``inference_data.nc`` (:func:`inference.diagnostics.to_inference_data`: the training data as observed data, the
test data as predictions), ``summary.json`` and the figures (:mod:`inference.diagnostics.run_figures`).
``summary.json`` keeps the training and the test data apart: ``loo_train`` and ``waic_train`` (PSIS-LOO and WAIC
of the training examples, Pareto-k counts in ArviZ's categories), ``elpd_test`` (the direct elpd of the held-out
test examples) and ``predictive_test`` (their accuracy and NLL); then the guide's PSIS k-hat (on the training
data), ``rotation_sweep`` (accuracy and entropies against the rotation of upright test examples), the
``--compare`` results and timings. :func:`nuts_reference_run` fits the small NUTS reference of
:mod:`inference.diagnostics.nuts`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from inference import diagnostics
from inference.data import DatasetName, Split, balanced_subset, true_extent
from inference.diagnostics import figures
from inference.diagnostics.nuts import fit_reference_guide, reference_model
from inference.diagnostics.run_figures import run_label, write_figures, write_rotation_figure
from inference.draws import draw_posterior, site_kinds
from inference.plots import FigureFormat
from inference.run_io import LoadedRun, load_run, load_run_data, read_eta_history
from inference.uncertainty import RotationSweep, rotation_sweep
from models.config import FirstLayer
from models.priors import EtaPrior

IDATA_FILE, SUMMARY_FILE, FIGURES_DIR = "inference_data.nc", "summary.json", "figures"

SHARED_DRAWS, FRESH_DRAWS = 500, 32
"""Default M: with one eps shared by every draw and a point-estimated first layer the features are computed once,
and 500 draws put ArviZ's Pareto-k threshold at 0.63 (enough for a verdict on most examples); where every draw
needs its own pass through the first layer, 32."""


@dataclass(frozen=True)
class DiagnoseOptions:
    """Settings of :func:`diagnose_run` (see the CLI's help)."""

    draws: int | None = None  # None: SHARED_DRAWS with shared eps, else FRESH_DRAWS
    num_transforms: int | None = None
    test_size: int | None = None
    khat_draws: int | None = None  # None: 100 when the features can be shared, else 32 (see --khat-draws)
    eps: str = "auto"  # eps of the draws from q: auto, shared or fresh (see --eps)
    num_filters: int = 32
    rotation_examples: int = 200  # upright test examples in the rotation sweep (class-balanced)
    rotation_step: float = 15.0  # degrees between the sweep's input rotations, from -180 to 180
    rotation_draws: int = 100  # at most this many of the draws in the rotation sweep
    data_dir: str | None = None
    seed: int = 0
    figures: FigureFormat = field(default_factory=FigureFormat)
    figures_dir: str | None = None  # None: OUT/figures


# --------------------------------------------------------------------------- one run
def _eval_transforms(run: LoadedRun) -> int:
    return int(run.metrics["config"].get("eval", {}).get("num_transforms", run.config.model.num_transforms))


def shared_eps(run: LoadedRun, choice: str) -> bool:
    """Whether the run's draws share one eps: ``choice`` (``shared``, ``fresh``) or, for ``auto``, when the first
    layer and eta are point estimates (or fixed), so that sharing eps lets the features be computed once."""
    if choice != "auto":
        return choice == "shared"
    kinds = site_kinds(run.model, run.guide)
    first_layer_fixed = run.config.model.first_layer is FirstLayer.RFF or kinds.get("W1") == "point"
    return first_layer_fixed and run.config.model.eta_prior is EtaPrior.NONE


def num_draws(run: LoadedRun, opts: DiagnoseOptions) -> int:
    """M: ``opts.draws``, else :data:`SHARED_DRAWS` or :data:`FRESH_DRAWS` by :func:`shared_eps`."""
    if opts.draws is not None:
        return opts.draws
    return SHARED_DRAWS if shared_eps(run, opts.eps) else FRESH_DRAWS


def eval_splits(run: LoadedRun, opts: DiagnoseOptions) -> tuple[Split, Split]:
    """The run's training set and its test set (a class-balanced, shuffled subset of ``opts.test_size`` examples,
    the same for every run on the same test set)."""
    data = load_run_data(run, opts.data_dir)
    test = data.test
    if opts.test_size is not None and opts.test_size < len(test):
        idx = balanced_subset(test.y, opts.test_size, torch.Generator().manual_seed(opts.seed))
        test = Split(test.x[idx], test.y[idx])
    return data.train, test


def upright_examples(run: LoadedRun, opts: DiagnoseOptions) -> Split:
    """``opts.rotation_examples`` class-balanced test examples of the run's source, untransformed (the same for
    every run on the same source)."""
    source = DatasetName(run.config.data.dataset.source.value)
    test = load_run_data(run, opts.data_dir, dataset=source, train_size=10, test_size=None).test
    idx = balanced_subset(test.y, min(opts.rotation_examples, len(test)), torch.Generator().manual_seed(opts.seed))
    return Split(test.x[idx], test.y[idx])


def run_inference_data(run: LoadedRun, train: Split, test: Split, opts: DiagnoseOptions) -> Any:
    """The run's InferenceData: M guide draws, the training data's log-likelihood, the test data's predictions, the
    training history."""
    pyro.set_rng_seed(opts.seed)
    S = opts.num_transforms or _eval_transforms(run)
    shared = shared_eps(run, opts.eps)
    attrs = {"run_dir": str(run.run_dir), "dataset": run.config.data.dataset.value,
             "guide": run.config.guide.kind.value, "checkpoint_step": run.checkpoint.step,
             "num_train_steps": run.config.train.num_steps, "hidden": run.config.model.hidden}
    return diagnostics.to_inference_data(
        run.model, run.guide, train.x, train.y, test=(test.x, test.y), num_draws=num_draws(run, opts),
        num_transforms=S, shared_eps=shared, eta_history=read_eta_history(run), losses=run.losses,
        elbo_history=run.checkpoint.state.get("elbo_history"),
        eta_true=true_extent(run.config.data, names=run.config.model.generator_names), attrs=attrs)


def run_rotation_sweep(run: LoadedRun, opts: DiagnoseOptions) -> RotationSweep:
    """:func:`inference.uncertainty.rotation_sweep` of the run on :func:`upright_examples`, with up to
    ``opts.rotation_draws`` draws (eps as for the InferenceData)."""
    pyro.set_rng_seed(opts.seed)
    examples = upright_examples(run, opts)
    draws = draw_posterior(run.model, run.guide, min(num_draws(run, opts), opts.rotation_draws),
                           opts.num_transforms or _eval_transforms(run))
    if shared_eps(run, opts.eps):
        draws.eps = draws.eps[:1]
    angles = np.arange(-180.0, 180.0 + 1e-9, opts.rotation_step)
    return rotation_sweep(run.model, draws, examples.x, examples.y, angles)


def predictive_metrics(idata: Any) -> dict[str, float]:
    """Accuracy and NLL of the posterior predictive mean over the guide draws, on the test data."""
    probs = diagnostics.class_probabilities(idata)
    y = diagnostics.test_labels(idata)
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
    return {"accuracy": float((probs.argmax(1) == y).mean()), "nll": float(-np.log(p_true).mean()),
            "n_obs": int(len(y))}


def summarise(run: LoadedRun, idata: Any) -> dict[str, Any]:
    """The numbers of ``summary.json`` that come from ``idata``: the training data's LOO and WAIC, the test data's
    elpd and predictive accuracy, named so."""
    return {
        "run_dir": str(run.run_dir), "dataset": run.config.data.dataset.value, "guide": run.config.guide.kind.value,
        "checkpoint_step": run.checkpoint.step, "eta": run.metrics.get("eta"),
        "eta_true": true_extent(run.config.data, names=run.config.model.generator_names),
        "num_train": int(idata.observed_data.sizes["obs"]), "num_test": int(idata.predictions.sizes["test_obs"]),
        "draws": int(idata.posterior.sizes["draw"]), "shared_eps": bool(idata.posterior.attrs["shared_eps"]),
        "num_transforms": int(idata.posterior.attrs["num_transforms"]),
        "loo_train": diagnostics.loo_summary(idata), "waic_train": diagnostics.waic_summary(idata),
        "elpd_test": diagnostics.test_summary(idata),
        "predictive_test": predictive_metrics(idata) if run.model.likelihood.has_classes else None,
    }


def diagnose_run(run_dir: str | Path, out: Path, opts: DiagnoseOptions, compare: list[str]) -> dict:
    """Write the ArviZ file, ``summary.json`` and the figures of one run (and the comparison runs)."""
    clock = time.perf_counter()
    run = load_run(run_dir)
    train, test = eval_splits(run, opts)
    fig_dir = Path(opts.figures_dir) if opts.figures_dir else out / FIGURES_DIR
    t = time.perf_counter()
    idata = run_inference_data(run, train, test, opts)
    timings = {"inference_data": time.perf_counter() - t}
    summary = summarise(run, idata)
    summary["evidence_check"] = run.metrics.get("evidence_check")  # did the data, or the KL term alone, choose eta?
    shared = shared_eps(run, opts.eps)
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
    summary["figures"] = write_figures(run, idata, test, fig_dir, opts.figures, opts.num_filters, opts.seed)
    timings["figures"] = time.perf_counter() - t
    runs, sweeps = {run.name: run}, {}
    if compare:
        t = time.perf_counter()
        summary["comparison"] = compare_runs(run.name, idata, compare, out, fig_dir, opts, runs)
        summary["figures"]["loo_comparison"] = str(opts.figures.path(fig_dir, "loo_comparison"))
        timings["comparison"] = time.perf_counter() - t
    if run.model.likelihood.has_classes:
        t = time.perf_counter()
        sweeps = {name: run_rotation_sweep(r, opts) for name, r in runs.items()}
        summary["rotation_sweep"] = {name: sweep.as_dict() for name, sweep in sweeps.items()}
        summary["figures"]["rotation_uncertainty"] = write_rotation_figure(sweeps, runs, fig_dir, opts.figures)
        timings["rotation_sweep"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - clock
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    (out / SUMMARY_FILE).write_text(to_json(summary))
    return summary


def compare_runs(name: str, idata: Any, others: list[str], out: Path, fig_dir: Path, opts: DiagnoseOptions,
                 runs: dict[str, LoadedRun]) -> dict:
    """PSIS-LOO comparison of the main run with ``others`` on the same training examples, and their test elpd on
    the same test examples; adds each other run to ``runs``."""
    idatas, elpd_test = {name: idata}, {name: diagnostics.elpd_test(idata)}
    for other_dir in others:
        other = load_run(other_dir)
        train, test = eval_splits(other, opts)
        other_name = other.name if other.name not in idatas else f"{other.name}-{len(idatas)}"
        other_idata = run_inference_data(other, train, test, opts)
        diagnostics.save_inference_data(other_idata, out / f"inference_data-{other_name}.nc")
        idatas[other_name], runs[other_name] = other_idata, other
        elpd_test[other_name] = diagnostics.elpd_test(other_idata)
    table, warnings_ = diagnostics.compare_models(idatas)
    table.to_csv(out / "loo_comparison.csv")
    point_w1 = [n for n, r in runs.items() if site_kinds(r.model, r.guide).get("W1") == "point"]
    which = "every run" if len(point_w1) == len(runs) else ", ".join(point_w1)
    note = (f"\nW1 is a point estimate in {which}, fitted to every training example:\nleaving one out reweights "
            "q(W2, b2) only" if point_w1 else "")
    fig = figures.plot_loo_comparison(table, elpd_test=elpd_test,
                                      title=f"{run_label(runs[name])} against " + ", ".join(list(idatas)[1:]) + note)
    opts.figures.save(fig, fig_dir, "loo_comparison")
    return {"table_loo_train": json.loads(table.to_json(orient="index")), "warnings": warnings_,
            "loo_train": {n: diagnostics.loo_summary(i) for n, i in idatas.items() if n != name},
            "elpd_test": {n: diagnostics.test_summary(i) for n, i in idatas.items()},
            "predictive_test": {n: predictive_metrics(i) for n, i in idatas.items()
                                if runs[n].model.likelihood.has_classes},
            "preferred_by_loo_train": str(table.index[0]),
            "preferred_by_elpd_test": max(elpd_test, key=lambda n: elpd_test[n][0]), "note": diagnostics.LOO_NOTE}


# --------------------------------------------------------------------------- NUTS reference
def nuts_reference_run(out: Path, data: Split, chains: int = 2, warmup: int = 300, samples: int = 300,
                       svi_steps: int = 1500, seed: int = 0, fmt: FigureFormat | None = None) -> dict:
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
    fmt = fmt or FigureFormat()
    fmt.save(figures.plot_trace(reference, title=f"NUTS reference, {chains} chains: max R-hat "
                                                 f"{stats['max_rhat']:.3f}, min ESS bulk {stats['min_ess_bulk']:.0f}"),
             out / FIGURES_DIR, "nuts_trace")
    fmt.save(figures.plot_reference_comparison(table, title="mean-field guide against NUTS (small RFF classifier)"),
             out / FIGURES_DIR, "guide_vs_nuts")
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
