"""Diagnose a finished run: the ArviZ file, LOO / WAIC on the training data, the test data's elpd, the guide's k-hat
and the paper's figures.

Usage::

    python -m inference.diagnose RUN_DIR                                   # writes RUN_DIR/diagnostics/
    python -m inference.diagnose RUN_DIR --compare OTHER_RUN_DIR           # + the comparison of the two
    python -m inference.diagnose RUN_DIR --format pdf                      # every figure as PDF
    python -m inference.diagnose --nuts-reference OUT --data-dir ../shared/data   # small NUTS reference

For a run directory of ``python -m inference.train`` it writes to ``--out`` (default ``RUN_DIR/diagnostics``):

* ``inference_data.nc``: the ArviZ InferenceData (:func:`inference.diagnostics.to_inference_data`): the training
  data as observed data with their log-likelihood, the test data as predictions;
* ``summary.json``: ``loo_train`` and ``waic_train`` (PSIS-LOO and WAIC of the training examples, Pareto-k counts in
  ArviZ's categories), ``elpd_test`` (the direct elpd of the held-out test examples), ``predictive_test`` (their
  accuracy and NLL), the guide's PSIS k-hat, ``rotation_sweep``, the comparison with ``--compare`` runs, timings;
* ``figures/`` (or ``--figures-dir``), in ``--format`` png, pdf or svg: ``filters``, ``invariant_filters``,
  ``eta_trajectories``, ``elbo``, ``reliability``, ``transformed_digits``, ``pareto_k``, ``rotation_uncertainty``,
  and ``eta_posterior`` (full Bayes) and ``loo_comparison`` (with ``--compare``) where they apply.

``--nuts-reference OUT`` instead fits the small classifier of :mod:`inference.diagnostics.nuts` with NUTS and with a
mean-field guide, and writes R-hat, ESS, the trace plot and the guide's moments beside NUTS's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from inference.cli import add_figure_flags, figure_format, run_cli
from inference.diagnostics.nuts import reference_data
from inference.diagnostics.runs import (
    FRESH_DRAWS,
    SHARED_DRAWS,
    DiagnoseOptions,
    diagnose_run,
    nuts_reference_run,
    to_json,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DiagnoseOptions()
    p.add_argument("run_dir", nargs="?", default=None, help="output directory of inference.train (with checkpoints)")
    p.add_argument("--out", default=None, help="where to write (default RUN_DIR/diagnostics, or the NUTS folder)")
    p.add_argument("--figures-dir", default=None, metavar="DIR",
                   help="where to write the figures (default OUT/figures)")
    p.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                   help="another run on the same data (e.g. --generators none) to compare by PSIS-LOO on the training "
                        "data and by the test data's elpd; repeatable")
    p.add_argument("--draws", type=int, default=None,
                   help=f"M draws from the guide for the ArviZ file, LOO and the test predictive (default "
                        f"{SHARED_DRAWS} with shared eps, where the features are computed once, else {FRESH_DRAWS})")
    p.add_argument("--num-transforms", type=int, default=None,
                   help="S inside the likelihood of each draw (default: the run's evaluation S)")
    p.add_argument("--test-size", type=int, default=None,
                   help="a class-balanced, shuffled subset of N test examples, drawn with --seed (default: all)")
    p.add_argument("--khat-draws", type=int, default=None,
                   help="importance draws for the guide's PSIS k-hat on the training set (0: skip; default 100 "
                        "with shared eps, 32 with fresh eps, where every draw costs a forward pass over the data)")
    p.add_argument("--eps", "--khat-eps", choices=["auto", "shared", "fresh"], default=d.eps, dest="eps",
                   help="eps of the draws from q (InferenceData, LOO, k-hat): fresh per draw (for the k-hat the exact "
                        "extended-space weights) or one shared eps (the likelihood at one fixed set of S "
                        "transformations; features computed once); auto: shared when the first layer and eta are "
                        "point estimates")
    p.add_argument("--rotation-examples", type=int, default=d.rotation_examples,
                   help="upright test examples (class-balanced) rotated by every angle for the rotation figure")
    p.add_argument("--rotation-step", type=float, default=d.rotation_step,
                   help="degrees between the input rotations of the rotation figure, from -180 to 180")
    p.add_argument("--num-filters", type=int, default=d.num_filters, help="filters in the filter figures")
    p.add_argument("--data-dir", default=None, help="data root (default: the one recorded by the run)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more threads oversubscribe the cores, slower)")
    add_figure_flags(p)
    g = p.add_argument_group("NUTS reference (instead of RUN_DIR)")
    g.add_argument("--nuts-reference", default=None, metavar="OUT", help="run the small NUTS reference into OUT")
    g.add_argument("--nuts-chains", type=int, default=2)
    g.add_argument("--nuts-warmup", type=int, default=300)
    g.add_argument("--nuts-samples", type=int, default=300)
    g.add_argument("--synthetic", action="store_true", help="NUTS reference on synthetic data instead of MNIST")
    return p


# --------------------------------------------------------------------------- CLI
def _check_args(args: argparse.Namespace) -> None:
    if (args.run_dir is None) == (args.nuts_reference is None):
        raise ValueError("give either RUN_DIR or --nuts-reference OUT")
    for name in ("draws", "nuts_chains", "nuts_warmup", "nuts_samples", "num_filters", "num_transforms", "test_size",
                 "threads", "rotation_examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # None: the default
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.khat_draws is not None and args.khat_draws < 0:
        raise ValueError("--khat-draws must be >= 0")
    if args.draws is not None and args.draws < 4:
        raise ValueError("--draws must be at least 4 for PSIS-LOO")
    if not 0 < args.rotation_step <= 180:
        raise ValueError("--rotation-step must lie in (0, 180] degrees")


def main(args: argparse.Namespace) -> dict:
    """Diagnose ``args.run_dir`` (or run the NUTS reference); returns the summary written to ``summary.json``."""
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nuts_reference is not None:
        out = Path(args.out or args.nuts_reference)
        data = reference_data(args.data_dir, synthetic=args.synthetic, seed=args.seed)
        return nuts_reference_run(out, data, args.nuts_chains, args.nuts_warmup, args.nuts_samples, seed=args.seed,
                                  fmt=figure_format(args))
    opts = DiagnoseOptions(draws=args.draws, num_transforms=args.num_transforms, test_size=args.test_size,
                           khat_draws=args.khat_draws, eps=args.eps, num_filters=args.num_filters,
                           rotation_examples=args.rotation_examples, rotation_step=args.rotation_step,
                           data_dir=args.data_dir, seed=args.seed, figures=figure_format(args),
                           figures_dir=args.figures_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "diagnostics"
    return diagnose_run(args.run_dir, out, opts, list(args.compare))


def cli(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 with a one-line ``error:`` message on a user error."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))

    def report(args: argparse.Namespace) -> None:
        summary = main(args)
        out = args.out or args.nuts_reference or str(Path(args.run_dir) / "diagnostics")
        print(f"wrote {out}: " + to_json(_headline(summary), indent=None))

    return run_cli(report, args)


def _headline(summary: dict) -> dict:
    """The few numbers printed on the console."""
    if "max_rhat" in summary:
        return {k: summary[k] for k in ("max_rhat", "min_ess_bulk", "min_ess_tail", "divergences", "seconds")}
    head = {"predictive_test": summary.get("predictive_test"),
            "elpd_loo_train": round(summary["loo_train"]["elpd_loo"], 1),
            "elpd_test": round(summary["elpd_test"]["elpd"], 1), "pareto_k_train": summary["loo_train"]["pareto_k"],
            "guide_khat": summary.get("guide_khat", {}).get("khat"), "seconds": summary["seconds"]["total"]}
    if "comparison" in summary:
        head["preferred_by_loo_train"] = summary["comparison"]["preferred_by_loo_train"]
    check = summary.get("evidence_check")
    if check is not None and not check["fits_labels"]:
        head["warning"] = (f"eta was chosen by the bound's KL term alone: its data term {check['expected_loglik']:.3f} "
                           f"is no better than the constant prediction's {check['constant_loglik']:.3f}")
    return head


if __name__ == "__main__":
    sys.exit(cli())
