"""Train several configurations on the same data and seeds; write one table and one figure.

Usage::

    python -m inference.compare --dataset rotated-mnist --data-dir ../shared/data --out runs/compare \\
        --configs elbo,map,ml --seeds 0,1,2
    python -m inference.compare --preset table1 --data-dir ../shared/data --out runs/table1 --seeds 0,1,2 --jobs 2
    python -m inference.compare --preset table2 --data-dir ../shared/data --out runs/table2 --seeds 0,1,2 --jobs 2
    python -m inference.compare --preset table3 --data-dir DATA --out runs/table3    # DATA/cifar-10-batches-py

Every configuration is a run of :func:`inference.train.main` with the shared flags (any flag of
``python -m inference.train``) plus a few overrides:

===================  ==========================================================================
``elbo``             eta learned with the guide given by ``--guide`` (default ``hybrid``) by ``--eta-objective``
                     (default ``elbo``, the paper's; ``evidence`` for partial invariance, see
                     :mod:`inference.eta_objectives`): empirical Bayes
``paper``            the ELBO with the paper's family (W1 point estimate, full-covariance q(W2) per class)
``meanfield``        the ELBO with ``AutoNormal`` over every weight (priors on both layers)
``map``              maximum a posteriori: point estimates with the priors (``AutoDelta``)
``ml``               maximum likelihood: point estimates without any prior, the non-Bayesian baseline
``inv-<family>``     eta learned on one family's generators: ``none``, ``rotation``, ``translation``, ``scale``,
                     ``affine`` (Table 2's rows), in the basis of ``--generators`` (isotropic or the paper's)
``fixed-aug``        eta fixed at the data's true extent on the generators the data use, the same S in
                     training and test: averaging over a known augmentation, the baseline of learned invariance
``fixed-A``          eta fixed at A degrees on the generators of ``--sweep-generators`` (the Table 1 sweep)
``learned``          eta learned on the same generators as the sweep (the sweep's last row)
===================  ==========================================================================

A run whose eta is not learned (fixed, or no generator) trains with the paper's ELBO: the ``evidence``
objective's first phase would have nothing to learn.

``--datasets`` runs every configuration on several datasets (labels from :data:`DATASETS`, e.g.
``rotated,translated,scaled,regular``), ``--seeds`` on several seeds, ``--jobs N`` in N worker processes
(:mod:`inference.grid`; finished runs in OUT are reused, so an interrupted grid continues). Presets
(``--preset``, :data:`PRESETS`; explicit flags override them): ``table1``, the paper's Table 1 (the RFF network
with a Bayesian output layer, eta_rotate fixed at five angles vs learned, on fully rotated, partially rotated and
regular digits); ``table2``, the paper's Table 2 grid (no invariance, rotation, translation, scale, affine and the
fixed augmentation on rotated, translated, scaled and regular digits) with the recommended setting for relaxed
invariance (:data:`inference.calibration.RECOMMENDED`), where the paper's objective learns too little of a partial
invariance; ``table3``, the paper's Table 3 grid (no invariance against affine on rotated, translated, scaled and
regular CIFAR-10) with the same setting.

Writes ``OUT/[<dataset>/]<config>/seed-<s>/`` per run and the tables and figure of :mod:`inference.report`
(``runs.csv``, ``comparison.csv`` with mean and std over seeds, ``comparison.md``, ``comparison.png``).

Beyond one machine (:mod:`inference.commands`): ``--print-commands`` trains nothing and writes one self-contained
``python -m inference.train`` command per run to ``OUT/commands.txt`` (one job each of a job array or any
scheduler); ``--collect OUT`` then writes the same tables and figure from the finished run folders alone.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from guides.factory import GuideKind
from inference import calibration, commands, distributed, grid, report, train
from inference.cli import add_figure_flags, figure_format
from inference.config import RunConfig, derive
from inference.data import DatasetName, Variant, true_extent
from inference.eta_objectives import EtaObjective
from models.config import GENERATOR_PRESETS
from models.transforms import ISOTROPIC_NAMES

NAMED: dict[str, tuple[GuideKind, bool, bool] | None] = {  # configuration -> its guide and its model's weight
    "elbo": None,  # priors (first_layer_prior, output_layer_prior); None: the base run as it is
    "paper": (GuideKind.PAPER, False, True),  # W1 a hyperparameter, a full-covariance Gaussian per class over W2
    "meanfield": (GuideKind.NORMAL, True, True),  # every weight random, under its prior
    "map": (GuideKind.MAP, True, True),
    "ml": (GuideKind.ML, False, False),  # no prior at all
}
FAMILIES = ("none", "rotation", "translation", "scale", "affine")
"""``inv-<family>`` configurations: Table 2's rows."""

PAPER_RANGES: dict[Variant, dict] = {  # the paper's transformation of each variant (../shared/REFERENCE.md)
    Variant.ROTATED: {"rotation_deg": None},  # U[-180, 180] deg
    Variant.PARTIALLY_ROTATED: {"rotation_deg": 90.0},
    Variant.TRANSLATED: {"translation_px": 8.0},
    Variant.SCALED: {"log_scale": math.log(2.0)},
    Variant.PLAIN: {},
}
DATASETS: dict[str, dict] = {
    **{label: {"dataset": name, **PAPER_RANGES[name.variant]} for label, name in (
        ("rotated", DatasetName.ROTATED), ("partially-rotated", DatasetName.PARTIALLY_ROTATED),
        ("translated", DatasetName.TRANSLATED), ("scaled", DatasetName.SCALED), ("regular", DatasetName.MNIST))},
    **{name.value: {"dataset": name, **PAPER_RANGES[name.variant]} for name in DatasetName},
}
"""``--datasets`` labels and the data settings each makes: the MNIST variants by their short names, and every
dataset by its own name (``rotated-cifar10``, ...), each transformed over the paper's range."""
TABLE3_DATASETS = ("rotated-cifar10", "translated-cifar10", "scaled-cifar10", "cifar10")
"""The columns of the paper's Table 3."""

_TABLE1_RFF = {  # see the note above PRESETS
    "first_layer": "rff", "rff_scale": 8.0, "rff_blur": 1.0, "prior_scale": 4.0, "init_scale": 1.0, "lr": 0.03,
    "eta_lr": 0.1, "num_steps": 2000, "elbo_passes": 32}
PRESETS: dict[str, dict] = {
    # Table 1 of the paper: random Fourier features (fixed random W1, cosine activation) with a
    # Bayesian output layer, eta_rotate fixed at five angles vs learned. On the 4,000-image subset the
    # settings are chosen for a converged comparison in ~2,000 steps: smooth random filters
    # (blur 1 px; white-noise filters make the gradient in eta mostly interpolation noise), an RBF
    # lengthscale of sqrt(784) / 8 = 3.5, about half the median distance between blurred training
    # images (7.8 on [0, 1] pixels), a prior wide enough for confident logits (alpha = 4) and the
    # guide started nearer the posterior's scale (init scale 1 instead of 0.1). 32 passes for the ELBO
    # put its standard error near 0.01 / example, the precision the comparison needs. The RFF layer has
    # no W1 to point-estimate, so the paper's ELBO is a bound on the evidence here (README, "When can the
    # ELBO set eta?").
    "table1": {"configs": "", "sweep_deg": "5,45,90,135,175", "datasets": "rotated,partially-rotated,regular",
               **_TABLE1_RFF},
    # Table 2 of the paper: the ReLU network (1,024 units) with each family's generators learnable, on each
    # transformed dataset, with the recommended setting for relaxed invariance (the paper's ELBO learns too
    # little of a partial invariance), plus the fixed augmentation at the data's true extent.
    "table2": {"configs": ",".join([*(f"inv-{f}" for f in FAMILIES), "fixed-aug"]),
               "datasets": "rotated,translated,scaled,regular", **calibration.recommended_flags()},
    # Table 3 of the paper: the same ReLU network on CIFAR-10 (3 x 32 x 32 inputs, so 3-channel first-layer
    # filters), no invariance against affine, on the rotated, translated, scaled and regular images, with the
    # recommended setting as in table2.
    "table3": {"configs": "inv-none,inv-affine", "datasets": ",".join(TABLE3_DATASETS),
               **calibration.recommended_flags()},
}
"""Named sets of defaults (``--preset``); flags given on the command line still override them."""


def build_parser() -> argparse.ArgumentParser:
    """The training CLI's flags plus the comparison's own."""
    p = train.build_parser()
    p.description = __doc__.split("\n\n")[0]
    g = p.add_argument_group("comparison")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="defaults for a known experiment (table1, table2, table3: the paper's tables); explicit flags "
                   "override them")
    g.add_argument("--configs", default="elbo,map,ml",
                   help=f"comma list of {sorted(NAMED)}, inv-<family> ({', '.join(FAMILIES)}) or fixed-aug")
    g.add_argument("--sweep-deg", default="", type=grid.parse_floats,
                   help="comma list of fixed eta in degrees, e.g. 5,45,90,135,175; "
                   "adds one 'fixed-A' run per angle and a 'learned' run on the same generators")
    g.add_argument("--sweep-generators", default="rotation", type=train.parse_generators,
                   help="generators whose eta is fixed in the sweep (preset or comma list)")
    g.add_argument("--datasets", default="",
                   help="comma list of rotated, partially-rotated, translated, scaled, regular (MNIST) or dataset "
                   "names (rotated-cifar10, ...): every configuration on each, transformed over the paper's range "
                   "(default: --dataset)")
    g.add_argument("--seeds", type=grid.parse_seeds, default=None, metavar="S1,S2,...",
                   help="one run per configuration and seed, summarised as mean and std (default: --seed)")
    g.add_argument("--jobs", type=int, default=1,
                   help="worker processes training runs in parallel (threads split between them; one GPU each "
                   "with --device cuda on a machine with several)")
    g.add_argument("--collect", nargs="?", const=True, default=False, metavar="DIR",
                   help="train nothing: write the tables and the figure from the finished runs in --out (the runs the "
                   "flags plan), or, given DIR, from every finished run folder under DIR (no other flag needed)")
    g.add_argument("--print-commands", action="store_true",
                   help="train nothing: print one self-contained inference.train command per run (also written to "
                   "OUT/commands.txt), for a job array or any scheduler; then --collect OUT")
    add_figure_flags(p)
    return p


def family_generators(family: str, basis: tuple[str, ...]) -> tuple[str, ...]:
    """The generators of ``family`` in the basis ``basis`` belongs to (isotropic or the paper's)."""
    iso = any(name in ISOTROPIC_NAMES and name not in GENERATOR_PRESETS["affine"] for name in basis)
    if iso and family in ("scale", "affine"):
        return GENERATOR_PRESETS[f"{family}-iso"]
    return GENERATOR_PRESETS[family]


def fixed_augmentation(cfg: RunConfig) -> dict:
    """Model settings of the ``fixed-aug`` run: eta fixed at the data's true extent on the generators the data use,
    unbounded (``max_shift`` bounds a *learned* translation; a fixed one must average over exactly the true shift)."""
    basis = family_generators("affine", cfg.model.generators or GENERATOR_PRESETS["affine"])
    extent = {name: value for name, value in true_extent(cfg.data, names=basis).items() if value > 0}
    if len(set(extent.values())) > 1:
        raise ValueError(f"the fixed augmentation needs one extent for all of the data's generators, got {extent}")
    if not extent:  # untransformed data: nothing to average over
        return {"generators": (), "learn_eta": False}
    return {"generators": tuple(extent), "learn_eta": False, "eta_init": next(iter(extent.values())), "max_shift": None}


def swap_guide(cfg: RunConfig, kind: GuideKind, first_layer_prior: bool, output_layer_prior: bool) -> RunConfig:
    """``cfg`` with another guide and the model it is fitted to (its weight priors)."""
    return derive(cfg, guide={"kind": kind},
                  model={"first_layer_prior": first_layer_prior, "output_layer_prior": output_layer_prior})


def fixed_eta_run(cfg: RunConfig) -> RunConfig:
    """A run with nothing for an eta objective to learn trains its guide by the ELBO: on the ``sequential``
    schedule, the network its second phase trains (W1's prior masked: a hyperparameter)."""
    if cfg.train.eta_objective is EtaObjective.EVIDENCE and cfg.train.sequential:
        cfg = derive(cfg, model={"first_layer_prior": False})
    return derive(cfg, train={"eta_objective": EtaObjective.ELBO, "eta_burnin": 0})


def configurations(base: RunConfig, args: argparse.Namespace) -> list[tuple[str, RunConfig]]:
    """``(name, run config)`` of every configuration on the data of ``base``, in order."""
    runs: list[tuple[str, RunConfig]] = []
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--configs names {repeated} more than once (each configuration trains into its own folder)")
    for name in names:
        if name in NAMED:
            runs.append((name, base if NAMED[name] is None else swap_guide(base, *NAMED[name])))
        elif name.startswith("inv-") and name[4:] in FAMILIES:
            runs.append((name, derive(base, model={"generators": family_generators(name[4:], base.model.generators)})))
        elif name == "fixed-aug":
            runs.append((name, derive(base, model=fixed_augmentation(base))))
        else:
            raise ValueError(f"unknown configuration {name!r}; choose from {sorted(NAMED)}, "
                             f"{[f'inv-{f}' for f in FAMILIES]} or 'fixed-aug'")
    angles = list(args.sweep_deg)
    if 0 in angles:
        raise ValueError("--sweep-deg angles must be > 0 (eta = 0 is the 'none' configuration's, inv-none)")
    for deg in angles:
        runs.append((f"fixed-{deg:g}", derive(base, model={"generators": args.sweep_generators, "learn_eta": False,
                                                          "eta_init": math.radians(deg)})))
    if angles:
        runs.append(("learned", derive(base, model={"generators": args.sweep_generators})))
    if not runs:
        raise ValueError("nothing to compare: give --configs and/or --sweep-deg")
    out = []
    for name, cfg in runs:
        if not cfg.model.learn_eta or not cfg.model.generators:  # nothing for an eta objective to learn
            cfg = fixed_eta_run(cfg)
        out.append((name, cfg))
    return out


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, RunConfig]]:
    """``(dataset label, configuration, seed, run config)`` of every run, in order."""
    labels = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in labels if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    base = train.config_from_args(args)
    seeds = args.seeds if args.seeds is not None else (base.train.seed,)
    out = []
    for label in labels or [""]:
        on_data = derive(base, data=DATASETS.get(label, {}))
        for name, cfg in configurations(on_data, args):
            out += [(label, name, seed, derive(cfg, train={"seed": seed})) for seed in seeds]
    return out


def main(args: argparse.Namespace) -> list[dict]:
    """Run (or reuse) every planned run and write the tables and the figure; returns the summary rows."""
    if isinstance(args.collect, str):  # --collect DIR: from the run folders alone (inference/commands.py)
        return commands.collect(Path(args.collect), figure_format(args))
    if args.out is None:
        raise ValueError("--out is required")
    if args.print_commands:  # one inference.train command per run (inference/commands.py)
        return commands.print_commands(plan(args), args)
    if distributed.requested(args):
        raise ValueError("compare trains its runs in this process or in --jobs workers: for data-parallel runs add "
                         "--print-commands and run each command it prints")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, keys = [], {}
    for label, name, seed, cfg in plan(args):
        run_dir = commands.run_folder(out, label, name, seed)
        jobs.append(grid.Job(f"{label + ' ' if label else ''}{name} seed={seed}", run_dir, cfg))
        keys[run_dir] = (label or cfg.data.dataset.value, name, seed)
    rows: list[dict] = []

    def add(job: grid.Job, metrics: dict) -> None:
        rows.append(report.run_row(*keys[job.run_dir], metrics))
        report.write_tables(rows, out)  # keep the tables current while later runs go on

    results = grid.run_jobs(jobs, grid.grid_control(args), args.jobs, collect_only=args.collect, on_result=add)
    if not results:
        raise ValueError(f"no finished run in {out} to collect")
    # in the planned order
    return commands.write_report([(keys[job.run_dir], job.run_dir, metrics) for job, metrics in results], out,
                                 figure_format(args))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--preset`` sets defaults first, so explicit flags win over it."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset is not None:
        parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (:func:`inference.grid.grid_cli`)."""
    return grid.grid_cli(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
