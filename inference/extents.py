"""Calibration of learned invariance: learned extent against the data's true extent.

Usage::

    python -m inference.extents --data-dir ../shared/data --out runs/extents --seeds 0,1,2

trains one model per (transformation family, true extent, seed) with every flag of
``python -m inference.train``, defaulting to the recommended setting for relaxed invariance
(:data:`RECOMMENDED`: the ``evidence`` objective on the ``sequential`` schedule, 2,000 steps per phase, a 200-step
eta burn-in, eta's learning rate 0.1, all six generators in the isotropic basis) on MNIST transformed by that family
and extent,
and writes

* ``OUT/<family>-<extent>/seed-<s>/`` one training run each (``metrics.json``, ``eta_history.csv``); every
  family's a = 0 is untransformed MNIST, one run per seed in ``OUT/untransformed/seed-<s>/``,
* ``OUT/extents.csv`` one row per run, ``OUT/extents.md`` mean +- std over seeds per cell,
* ``OUT/extents.png`` learned against true extent with the line y = x, one panel per family.

Families and the units of their extent (the data's transformation is U[-a, a] in these units):

===========  ==================================  ==================================================
family       data                                learned extent
===========  ==================================  ==================================================
rotation     rotated by U[-a, a] degrees         eta_rotate in degrees, at most 180 (a full turn)
translation  shifted by U[-a, a] px along x, y   mean of eta_translate_x, _y, in pixels
scale        magnified by exp(U[-a, a])          eta_scale (isotropic basis) or the mean of
                                                 eta_scale_x, _y (paper's basis), in log units
===========  ==================================  ==================================================

"others" is the largest eta of the generators outside the family, in the units of T (radians for
rotation). A finished run (its ``metrics.json`` exists) is not trained again, so an interrupted
calibration continues where it stopped when the same command is run again; a finished run made with other
settings is refused, never mixed in. ``--collect`` trains nothing and builds the table and figure from the
cells finished so far (e.g. by several processes sharing ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from inference import grid, report, train  # noqa: E402
from inference.config import RunConfig, derive  # noqa: E402
from inference.data import pixels_per_unit  # noqa: E402
from inference.eta_objectives import EtaObjective, EvidenceSchedule  # noqa: E402
from inference.runner import RunControl
from models.config import GENERATOR_PRESETS  # noqa: E402
from models.transforms import ALL_GENERATOR_NAMES  # noqa: E402


@dataclass(frozen=True)
class Family:
    """One transformation family of the calibration: its dataset, extent grid and read-out."""

    name: str
    dataset: str
    data_flag: str  # the train flag that sets the data's extent
    unit: str
    grid: tuple[float, ...]
    generators: tuple[str, ...]  # the generators whose eta measures the family's extent
    to_unit: float | None  # multiply eta (units of T) by this to get the extent's unit; None: pixels
    most: float | None = None  # the largest extent there is, in the family's unit (a full turn: 180 deg)

    def learned(self, eta: dict[str, float], image_size: int = 28) -> float:
        """The learned extent in this family's unit (mean over its generators in the run's basis); pixels on
        ``image_size``-pixel sides. Rotation saturates at 180 deg: U[-eta, eta] with eta >= pi already covers
        every angle (the raw eta stays in the ``eta_rotate`` column)."""
        to_unit = pixels_per_unit(image_size) if self.to_unit is None else self.to_unit
        extent = statistics.fmean(eta[g] for g in self.generators if g in eta) * to_unit
        return extent if self.most is None else min(extent, self.most)

    def others(self, eta: dict[str, float]) -> float:
        """The largest eta outside the family (units of T)."""
        return max(value for g, value in eta.items() if g not in self.generators)


FAMILIES: dict[str, Family] = {
    "rotation": Family("rotation", "partially-rotated-mnist", "rotation_deg", "deg", (0, 45, 90, 135, 180),
                       ("rotate",), math.degrees(1.0), most=180.0),
    "translation": Family("translation", "translated-mnist", "translation_px", "px", (0, 2, 4, 8),
                          ("translate_x", "translate_y"), None),
    "scale": Family("scale", "scaled-mnist", "log_scale", "log", (0, math.log(1.5), math.log(2)),
                    ("scale_x", "scale_y", "scale"), 1.0),  # the paper's basis has the first two, the isotropic one
}

RECOMMENDED = {  # the recommended setting for relaxed invariance (README, "How much invariance")
    "eta_objective": EtaObjective.EVIDENCE,  # eta from a bound on the evidence of the model with priors on every weight
    "first_layer_prior": "on",  # that model: W1 random under its prior (masked in the predicting phase)
    "evidence_schedule": EvidenceSchedule.SEQUENTIAL,  # learn eta first, then the predicting network at that eta
    "num_steps": 2000,  # per phase: the mean-field guide settles (KL ~10 nats / example, ~50 after 1,000 steps)
    "eta_burnin": 200,  # eta waits while the mean-field guide is still noise (early on, averaging helps a noisy net)
    "eta_lr": 0.1,  # after the burn-in, eta can still travel from 5 deg to a full turn before the cosine ends
    "generators": GENERATOR_PRESETS["affine-iso"],  # six generators, one isotropic scale (the data's) + aspect change
}
"""``inference.train`` flags the calibration sets by default (each can be overridden on its command line)."""

COLUMNS = ["family", "true_extent", "unit", "seed", "learned_extent", "ratio", "max_other_eta",
           *(f"eta_{g}" for g in ALL_GENERATOR_NAMES), "test_accuracy", "test_accuracy_one_draw", "eval_samples",
           "test_nll", "elbo_per_example", "train_seconds"]


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The training CLI's flags plus the calibration's own."""
    p = train.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(**RECOMMENDED)
    g = p.add_argument_group("calibration")
    g.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma list of {list(FAMILIES)}")
    g.add_argument("--seeds", type=grid.parse_seeds, default=(0,),
                   help="comma list of seeds, one run per cell and seed")
    g.add_argument("--jobs", type=int, default=1,
                   help="worker processes training cells in parallel (inference.grid: threads split between them)")
    g.add_argument("--collect", action="store_true",
                   help="train nothing: build the table and figure from the cells already finished in --out")
    for fam in FAMILIES.values():
        g.add_argument(f"--{fam.name}-grid", type=parse_floats, default=fam.grid, metavar="A,B,...",
                       help=f"true extents of the {fam.name} family, in {fam.unit}")
    return p


def cells(args: argparse.Namespace) -> list[tuple[Family, float, int]]:
    """``(family, true extent, seed)`` of every run, in order."""
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown or no families {unknown}; choose from {list(FAMILIES)}")
    out = []
    for name in names:
        grid = getattr(args, f"{name}_grid")
        if not grid or min(grid) < 0:
            raise ValueError(f"--{name}-grid needs extents >= 0, got {grid}")
        out += [(FAMILIES[name], a, s) for a in grid for s in args.seeds]
    return out


def cell_dir(out: Path, fam: Family, extent: float, seed: int) -> Path:
    """A cell's run folder; every family's a = 0 is untransformed MNIST, so they share ``untransformed/``."""
    return out / ("untransformed" if extent == 0 else f"{fam.name}-{extent:.4g}") / f"seed-{seed}"


def cell_config(base: RunConfig, fam: Family, extent: float, seed: int) -> RunConfig:
    """The run of one cell (a = 0: plain MNIST, one run shared by the families)."""
    if extent == 0:
        return derive(base, data={"dataset": train.DatasetName.MNIST}, train={"seed": seed})
    return derive(base, data={"dataset": train.DatasetName(fam.dataset), fam.data_flag: extent}, train={"seed": seed})


def row(fam: Family, extent: float, seed: int, metrics: dict) -> dict:
    eta = metrics["eta"]
    learned = fam.learned(eta, image_size=metrics["config"]["model"]["image_shape"][-1])
    return {
        "family": fam.name, "true_extent": extent, "unit": fam.unit, "seed": seed, "learned_extent": learned,
        "ratio": learned / extent if extent > 0 else float("nan"), "max_other_eta": fam.others(eta),
        **{f"eta_{g}": value for g, value in eta.items()},
        **{k: metrics[k] for k in ("test_accuracy", "test_nll", "elbo_per_example", "train_seconds")},
        "test_accuracy_one_draw": report.one_draw(metrics)[0],
        "eval_samples": metrics.get("config", {}).get("eval", {}).get("num_samples", 1),
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (family, true extent), in first-seen order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["true_extent"]), []).append(r)

    out = []
    for (family, extent), rs in groups.items():
        s = {"family": family, "true_extent": extent, "unit": rs[0]["unit"], "seeds": len(rs),
             "eval_samples": sorted({r["eval_samples"] for r in rs})}
        for key in ("learned_extent", "ratio", "max_other_eta", "test_accuracy_one_draw"):
            s[f"{key}_mean"], s[f"{key}_std"] = report.mean_std([r[key] for r in rs])
        posterior = [r["test_accuracy"] for r in rs if r["eval_samples"] > 1]  # M-draw accuracy, where measured
        complete = posterior if len(posterior) == len(rs) else []
        s["test_accuracy_mean"], s["test_accuracy_std"] = report.mean_std(complete)
        out.append(s)
    return out


def write_tables(rows: list[dict], out: Path) -> None:
    with open(out / "extents.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| family | true extent | learned extent | learned / true | max other eta | test acc. (%, one draw) | "
             "test acc. (%, M draws) | seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summarise(rows):
        ratio = "-" if s["true_extent"] == 0 else f"{s['ratio_mean']:.2f} ± {s['ratio_std']:.2f}"
        posterior = ("-" if s["test_accuracy_mean"] != s["test_accuracy_mean"] else
                     f"{100 * s['test_accuracy_mean']:.1f} ± {100 * s['test_accuracy_std']:.1f} "
                     f"(M = {'/'.join(map(str, s['eval_samples']))})")
        lines.append(f"| {s['family']} | {s['true_extent']:.3g} {s['unit']} | {s['learned_extent_mean']:.3g} ± "
                     f"{s['learned_extent_std']:.2g} {s['unit']} | {ratio} | {s['max_other_eta_mean']:.3f} | "
                     f"{100 * s['test_accuracy_one_draw_mean']:.1f} ± {100 * s['test_accuracy_one_draw_std']:.1f} | "
                     f"{posterior} | {s['seeds']} |")
    (out / "extents.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> Path:
    """One panel per family: learned against true extent (mean +- std over seeds, and each seed) and y = x.

    The axes end at 1.6 times the largest true extent; a seed beyond that is drawn as a triangle at the top
    edge labelled with its value, so one run-away seed does not hide the others.
    """
    summary = summarise(rows)
    names = list(dict.fromkeys(s["family"] for s in summary))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ss = [s for s in summary if s["family"] == name]
        true = [s["true_extent"] for s in ss]
        hi = 1.6 * max(true) or 1.0
        ax.plot([0, hi], [0, hi], color="0.5", ls="--", lw=1, label="y = x (learned = true)")
        ax.fill_between([0, hi], [0, 0.75 * hi], [0, 1.5 * hi], color="0.9", label="learned / true in [0.75, 1.5]")
        ax.errorbar(true, [s["learned_extent_mean"] for s in ss], yerr=[s["learned_extent_std"] for s in ss],
                    fmt="o-", capsize=3, label=f"mean ± std over {max(s['seeds'] for s in ss)} seed(s)")
        for r in (r for r in rows if r["family"] == name):
            if r["learned_extent"] <= hi:
                ax.plot(r["true_extent"], r["learned_extent"], ".", color="tab:orange", alpha=0.7)
            else:
                ax.plot(r["true_extent"], 0.97 * hi, "^", color="tab:red")
                ax.annotate(f"{r['learned_extent']:.3g} (seed {r['seed']})", (r["true_extent"], 0.97 * hi),
                            textcoords="offset points", xytext=(-6, -4), ha="right", fontsize=7, color="tab:red")
        ax.plot([], [], ".", color="tab:orange", label="one seed")
        unit = ss[0]["unit"]
        ax.set(xlabel=f"true extent a ({unit})", ylabel=f"learned extent ({unit})", title=name, xlim=(0, hi),
               ylim=(0, hi))
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Learned invariance against the data's transformation U[-a, a]")
    fig.tight_layout()
    path = out / "extents.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> list[dict]:
    """Train (or reuse) every cell, then write the tables and the figure; returns the rows."""
    if args.out is None:
        raise ValueError("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = train.config_from_args(args)
    jobs, cell_of = [], {}
    for fam, extent, seed in cells(args):
        run_dir = cell_dir(out, fam, extent, seed)
        jobs.append(grid.Job(f"{fam.name} a={extent:.4g} {fam.unit} seed={seed}", run_dir,
                             cell_config(base, fam, extent, seed)))
        cell_of[id(jobs[-1])] = (fam, extent, seed)
    rows: list[dict] = []

    def add(job: grid.Job, metrics: dict) -> None:
        rows.append(row(*cell_of[id(job)], metrics))
        write_tables(rows, out)  # the table stays current while later cells run

    control = RunControl(out, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                               threads=args.threads, progress=not args.no_progress)
    results = grid.run_jobs(jobs, control, args.jobs, collect_only=args.collect, on_result=add)
    if not results:
        raise ValueError(f"no finished cell in {out} to collect")
    rows = [row(*cell_of[id(job)], metrics) for job, metrics in results]  # in the planned order
    write_tables(rows, out)
    plot(rows, out)
    print((out / "extents.md").read_text())
    return rows


def cli(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one-line messages and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        main(args)
    except train.USER_ERRORS as err:
        print(f"error: {train.one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
