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
import sys
from pathlib import Path

import torch

from inference.cli import run_cli
from inference.diagnostics.nuts import reference_data
from inference.diagnostics.runs import DiagnoseOptions, diagnose_run, nuts_reference_run, to_json


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
    p.add_argument("--test-size", type=int, default=None,
                   help="a class-balanced, shuffled subset of N test examples, drawn with --seed (default: all)")
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


# --------------------------------------------------------------------------- CLI
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

    def report(args: argparse.Namespace) -> None:
        summary = main(args)
        out = args.out or args.nuts_reference or str(Path(args.run_dir) / "diagnostics")
        print(f"wrote {out}: " + to_json(_headline(summary), indent=None))

    return run_cli(report, args)


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
