"""Diagnose a finished run: the ArviZ file, LOO / WAIC, the guide's k-hat and the paper's figures.

Usage::

    python -m inference.diagnose RUN_DIR                                   # writes RUN_DIR/diagnostics/
    python -m inference.diagnose RUN_DIR --compare OTHER_RUN_DIR           # + PSIS-LOO comparison of the two
    python -m inference.diagnose --nuts-reference OUT --data-dir ../shared/data   # small NUTS reference

For a run directory of ``python -m inference.train`` it writes to ``--out`` (default ``RUN_DIR/diagnostics``):

* ``inference_data.nc``: the ArviZ InferenceData (:func:`inference.diagnostics.to_inference_data`);
* ``summary.json``: test accuracy / NLL of the draws, PSIS-LOO and WAIC with Pareto-k counts, the guide's
  PSIS k-hat, the comparison with ``--compare`` runs, timings;
* ``figures/``: ``filters.png``, ``invariant_filters.png``, ``eta_trajectories.png``, ``elbo.png``,
  ``reliability.png``, ``transformed_digits.png``, ``forest_W2.png``, ``pareto_k.png``, and
  ``eta_posterior.png`` (full Bayes) and ``loo_comparison.png`` (with ``--compare``) where they apply.

``--nuts-reference OUT`` instead fits the small classifier of :mod:`inference.diagnostics.nuts` with NUTS and with a
mean-field guide, and writes R-hat, ESS, the trace plot and the guide's moments beside NUTS's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from inference import diagnostics, plots
from inference.data import Split
from inference.diagnostics import figures
from inference.diagnostics.nuts import fit_reference_guide, reference_data, reference_model
from inference.draws import site_kinds
from inference.run_io import LoadedRun, load_run, load_run_data, read_eta_history, true_extent
from inference.svi import TrainConfig
from inference.train import USER_ERRORS, one_line
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
    num_digits: int = 6
    data_dir: str | None = None
    seed: int = 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DiagnoseOptions()
    p.add_argument("run_dir", nargs="?", default=None, help="output directory of inference.train (with checkpoints)")
    p.add_argument("--out", default=None, help="where to write (default RUN_DIR/diagnostics, or the NUTS folder)")
    p.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                   help="another run on the same data (e.g. --generators none) to compare by PSIS-LOO; repeatable")
    p.add_argument("--draws", type=int, default=d.draws, help="M draws from the guide for the ArviZ file and LOO")
    p.add_argument("--num-transforms", type=int, default=None,
                   help="S inside the likelihood of each draw (default: the run's evaluation S)")
    p.add_argument("--test-size", type=int, default=None, help="use the first N test examples (default: all)")
    p.add_argument("--khat-draws", type=int, default=None,
                   help="importance draws for the guide's PSIS k-hat on the training set (0: skip; default 100 "
                        "with shared eps, 32 with fresh eps, where every draw costs a forward pass over the data)")
    p.add_argument("--khat-eps", choices=["auto", "shared", "fresh"], default=d.khat_eps,
                   help="eps of the k-hat draws: fresh per draw (exact extended-space weights) or one shared eps "
                        "(k-hat against p(theta | y, eps_0); features computed once); auto: shared when the first "
                        "layer and eta are point estimates")
    p.add_argument("--num-filters", type=int, default=d.num_filters, help="filters in the filter figures")
    p.add_argument("--data-dir", default=None, help="data root (default: the one recorded by the run)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more threads oversubscribe the cores, slower)")
    g = p.add_argument_group("NUTS reference (instead of RUN_DIR)")
    g.add_argument("--nuts-reference", default=None, metavar="OUT", help="run the small NUTS reference into OUT")
    g.add_argument("--nuts-chains", type=int, default=2)
    g.add_argument("--nuts-warmup", type=int, default=300)
    g.add_argument("--nuts-samples", type=int, default=300)
    g.add_argument("--synthetic", action="store_true", help="NUTS reference on synthetic data instead of MNIST")
    return p


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
    """The run's training set and its test set (the first ``opts.test_size`` examples)."""
    data = load_run_data(run, opts.data_dir)
    test = data.test
    if opts.test_size is not None:
        test = Split(test.x[: opts.test_size], test.y[: opts.test_size])
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
    plots.plot_transformed_digits(test.x[: opts.num_digits], eta, out("transformed_digits"), seed=opts.seed,
                                  title=name, names=cfg.generator_names)
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


# --------------------------------------------------------------------------- CLI
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


def _check_args(args: argparse.Namespace) -> None:
    if (args.run_dir is None) == (args.nuts_reference is None):
        raise ValueError("give either RUN_DIR or --nuts-reference OUT")
    for name in ("draws", "nuts_chains", "nuts_warmup", "nuts_samples", "num_filters", "num_transforms", "test_size",
                 "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # None: the default
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.khat_draws is not None and args.khat_draws < 0:
        raise ValueError("--khat-draws must be >= 0")
    if args.draws < 4:
        raise ValueError("--draws must be at least 4 for PSIS-LOO")


def main(args: argparse.Namespace) -> dict:
    """Diagnose ``args.run_dir`` (or run the NUTS reference); returns the summary written to ``summary.json``."""
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nuts_reference is not None:
        out = Path(args.out or args.nuts_reference)
        data = reference_data(args.data_dir, synthetic=args.synthetic, seed=args.seed)
        return nuts_reference_run(out, data, args.nuts_chains, args.nuts_warmup, args.nuts_samples, seed=args.seed)
    opts = DiagnoseOptions(draws=args.draws, num_transforms=args.num_transforms, test_size=args.test_size,
                           khat_draws=args.khat_draws, khat_eps=args.khat_eps, num_filters=args.num_filters,
                           data_dir=args.data_dir, seed=args.seed)
    out = Path(args.out) if args.out else Path(args.run_dir) / "diagnostics"
    return diagnose_run(args.run_dir, out, opts, list(args.compare))


def cli(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 with a one-line ``error:`` message on a user error."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        summary = main(args)
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    out = args.out or args.nuts_reference or str(Path(args.run_dir) / "diagnostics")
    print(f"wrote {out}: " + to_json(_headline(summary), indent=None))
    return 0


def _headline(summary: dict) -> dict:
    """The few numbers printed on the console."""
    if "max_rhat" in summary:
        return {k: summary[k] for k in ("max_rhat", "min_ess_bulk", "min_ess_tail", "divergences", "seconds")}
    head = {"predictive": summary.get("predictive"),
            "elpd_loo": round(summary["loo"]["elpd_loo"], 1), "elpd_test": round(summary["loo"]["elpd_test"], 1),
            "pareto_k": summary["loo"]["pareto_k"], "guide_khat": summary.get("guide_khat", {}).get("khat"),
            "seconds": summary["seconds"]["total"]}
    if "comparison" in summary:
        head["preferred_by_loo"] = summary["comparison"]["preferred_by_loo"]
    return head


if __name__ == "__main__":
    sys.exit(cli())
