"""Calibration of learned invariance: learned extent against the data's true extent (the library behind
``python -m inference.extents``).

:func:`calibrate` trains (or reuses) one run per cell ``(family, true extent a, seed)``, each derived from a base
:class:`~inference.config.RunConfig` (:func:`cell_config`: MNIST transformed by U[-a, a] of the family; a = 0 is
the family's untransformed digits, one run per seed shared by the families on the same digits), and writes
``extents.csv`` (one row per run), ``extents.md`` (mean +- std over seeds per cell) and ``extents.<format>`` (png,
pdf or svg: learned against true extent with y = x, one panel per family). :func:`recommended` applies the
recommended setting for relaxed invariance (:data:`RECOMMENDED`).

Families and the units of their extent (the data's transformation is U[-a, a] in these units):

===========  ==================================  ==================================================
family       data                                learned extent
===========  ==================================  ==================================================
rotation     rotated by U[-a, a] degrees         eta_rotate in degrees, at most 180 (a full turn)
translation  centred on their class templates,   mean of eta_translate_x, _y, in pixels
             then shifted by U[-a, a] px along
             x, y (``translated-centred-mnist``)
scale        magnified by exp(U[-a, a])          eta_scale (isotropic basis) or the mean of
                                                 eta_scale_x, _y (paper's basis), in log units
translation  MNIST as it is, shifted by U[-a, a]  as translation (not a default family: MNIST's own
-uncentred   px (``translated-mnist``)            translation adds to a; README)
===========  ==================================  ==================================================

"others" is the largest eta of the generators outside the family, in the units of T (radians for rotation).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from inference import grid, report
from inference.config import RunConfig, derive
from inference.data import DatasetName, pixels_per_unit
from inference.eta_objectives import EtaObjective, EvidenceSchedule
from inference.plots import FigureFormat, new_figure, styled
from inference.runner import RunControl
from models.config import GENERATOR_PRESETS
from models.transforms import ALL_GENERATOR_NAMES

Cell = tuple["Family", float, int]
"""``(family, true extent, seed)``."""


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
    untransformed: str = "mnist"  # the dataset at a = 0, which the family's dataset transforms

    def learned(self, eta: dict[str, float], image_size: int = 28) -> float:
        """The learned extent in this family's unit (mean over its generators in the run's basis); pixels on
        ``image_size``-pixel sides. Rotation saturates at 180 deg: U[-eta, eta] with eta >= pi already covers
        every angle (the model caps eta_rotate at pi; a run made before the cap keeps its raw eta in the
        ``eta_rotate`` column)."""
        to_unit = pixels_per_unit(image_size) if self.to_unit is None else self.to_unit
        extent = statistics.fmean(eta[g] for g in self.generators if g in eta) * to_unit
        return extent if self.most is None else min(extent, self.most)

    def others(self, eta: dict[str, float]) -> float:
        """The largest eta outside the family (units of T)."""
        return max(value for g, value in eta.items() if g not in self.generators)


_TRANSLATION = Family("translation", "translated-centred-mnist", "translation_px", "px", (0, 2, 4, 8),
                      ("translate_x", "translate_y"), None, untransformed="centred-mnist")
"""Digits centred on their class templates first: MNIST holds ~1.35 px of translation of its own (README)."""

FAMILIES: dict[str, Family] = {
    "rotation": Family("rotation", "partially-rotated-mnist", "rotation_deg", "deg", (0, 45, 90, 135, 180),
                       ("rotate",), math.degrees(1.0), most=180.0),
    "translation": _TRANSLATION,
    "scale": Family("scale", "scaled-mnist", "log_scale", "log", (0, math.log(1.5), math.log(2)),
                    ("scale_x", "scale_y", "scale"), 1.0),  # the paper's basis has the first two, the isotropic one
    # MNIST shifted as it is: the learned extent then reads the shift and MNIST's own translation together
    "translation-uncentred": replace(_TRANSLATION, name="translation-uncentred", dataset="translated-mnist",
                                     untransformed="mnist"),
}
DEFAULT_FAMILIES = ("rotation", "translation", "scale")
"""The families ``python -m inference.extents`` calibrates unless ``--families`` says otherwise."""

RECOMMENDED: dict[str, dict] = {  # the recommended setting for relaxed invariance (README, "How much invariance")
    "model": {
        "first_layer_prior": True,  # the evidence is that of the model with priors on every weight
        "generators": GENERATOR_PRESETS["affine-iso"],  # six generators, one isotropic scale (the data's) + aspect
        "max_shift": 1.0,  # translations bounded by half the frame: no sampled shift deletes the input (README)
    },
    "train": {
        "eta_objective": EtaObjective.EVIDENCE,  # eta from a bound on the evidence (a mean-field q over every weight)
        "evidence_schedule": EvidenceSchedule.SEQUENTIAL,  # eta first, then the predicting network at that eta
        "num_steps": 2000,  # per phase: the mean-field guide settles (KL ~10 nats / example, ~50 after 1,000 steps)
        "eta_burnin": 200,  # eta waits while the mean-field guide is still noise (averaging helps a noisy net)
        "eta_lr": 0.02,  # 5 deg to a full turn is ~180 full-rate steps (reached by step 600 to 1,100 on fully rotated
        # digits); a larger rate makes eta random-walk on its gradient noise (README, "How much invariance")
    },
}
"""The recommended setting, as :func:`inference.config.derive` sections: :func:`recommended` applies it to a run,
:func:`recommended_flags` gives it as ``inference.train`` flag defaults (``extents`` and ``compare --preset
table2``)."""


def recommended(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the recommended setting for relaxed invariance (:data:`RECOMMENDED`)."""
    return derive(cfg, **RECOMMENDED)


def recommended_flags() -> dict:
    """:data:`RECOMMENDED` as defaults of ``inference.train``'s argument parser."""
    flags = {**RECOMMENDED["model"], **RECOMMENDED["train"]}
    flags["first_layer_prior"] = "on" if flags["first_layer_prior"] else "off"
    return flags


COLUMNS = ["family", "true_extent", "unit", "seed", "learned_extent", "ratio", "max_other_eta",
           *(f"eta_{g}" for g in ALL_GENERATOR_NAMES), "test_accuracy", "test_accuracy_one_draw", "eval_samples",
           "test_nll", "elbo_per_example", "train_seconds"]


def cell_dir(out: Path, fam: Family, extent: float, seed: int) -> Path:
    """A cell's run folder; a = 0 is the family's untransformed dataset, shared by the families on MNIST
    (``untransformed/``; ``centred-mnist/`` for translation)."""
    if extent == 0:
        name = "untransformed" if fam.untransformed == DatasetName.MNIST else fam.untransformed
    else:
        name = f"{fam.name}-{extent:.4g}"
    return out / name / f"seed-{seed}"


def cell_config(base: RunConfig, fam: Family, extent: float, seed: int) -> RunConfig:
    """The run of one cell (a = 0: the family's untransformed dataset, one run shared by the families on it)."""
    if extent == 0:
        return derive(base, data={"dataset": DatasetName(fam.untransformed)}, train={"seed": seed})
    return derive(base, data={"dataset": DatasetName(fam.dataset), fam.data_flag: extent}, train={"seed": seed})


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
    out = []
    for (family, extent), rs in report.group_rows(rows, "family", "true_extent").items():
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


@styled
def plot(rows: list[dict], out: Path, fmt: FigureFormat | None = None) -> Path:
    """One panel per family: learned against true extent (mean +- std over seeds, and each seed) and y = x.

    The axes end at 1.6 times the largest true extent; a seed beyond that is drawn as a triangle at the top
    edge labelled with its value, so one run-away seed does not hide the others.
    """
    summary = summarise(rows)
    names = list(dict.fromkeys(s["family"] for s in summary))
    fig = new_figure(4.2 * len(names), 4.2)
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ss = [s for s in summary if s["family"] == name]
        true = [s["true_extent"] for s in ss]
        hi = 1.6 * max(true) or 1.0
        ax.plot([0, hi], [0, hi], color="0.5", ls="--", lw=1, label="y = x (learned = true)")
        ax.fill_between([0, hi], [0, 0.75 * hi], [0, 1.5 * hi], color="0.9", label="learned / true in [0.75, 1.5]")
        ax.errorbar(true, [s["learned_extent_mean"] for s in ss], yerr=[s["learned_extent_std"] for s in ss],
                    fmt="o-", capsize=3, label=f"mean ± std over {max(s['seeds'] for s in ss)} seed(s)")
        beyond: dict[float, int] = {}  # seeds drawn at the top edge so far, per true extent (labels stack)
        for r in (r for r in rows if r["family"] == name):
            if r["learned_extent"] <= hi:
                ax.plot(r["true_extent"], r["learned_extent"], ".", color="tab:orange", alpha=0.7)
            else:
                k = beyond[r["true_extent"]] = beyond.get(r["true_extent"], -1) + 1
                ax.plot(r["true_extent"], 0.97 * hi, "^", color="tab:red")
                ax.annotate(f"{r['learned_extent']:.3g} (seed {r['seed']})", (r["true_extent"], 0.97 * hi),
                            textcoords="offset points", xytext=(6, -4 - 9 * k), ha="left", fontsize=7,
                            color="tab:red")
        ax.plot([], [], ".", color="tab:orange", label="one seed")
        unit = ss[0]["unit"]
        ax.set(xlabel=f"true extent a ({unit})", ylabel=f"learned extent ({unit})", title=name, xlim=(0, hi),
               ylim=(0, hi))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    sep = "\n" if len(names) == 1 else " "  # one panel is too narrow for the title on one line
    fig.suptitle(f"Learned invariance against the data's{sep}transformation U[-a, a]")
    return (fmt or FigureFormat()).save(fig, out, "extents")


def calibrate(base: RunConfig, cells: Sequence[Cell], out: str | Path, control: RunControl | None = None,
              jobs: int = 1, collect_only: bool = False, fmt: FigureFormat | None = None) -> list[dict]:
    """Train (or reuse) the run of every cell, derived from ``base``, into ``out``; write the tables and the
    figure (in ``fmt``, default PNG) there; return one row per run (the columns of ``extents.csv``) in the order of
    ``cells``.

    A finished run (its ``metrics.json`` exists) is reused, a run interrupted part-way resumes from its checkpoint,
    and a finished run made with other settings is refused, never mixed in. ``control`` says how to run (default:
    checkpoints every 100 steps, a progress bar); ``jobs`` worker processes train cells in parallel;
    ``collect_only`` trains nothing and builds the tables from the cells finished so far.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs_, cell_of = [], {}
    for fam, extent, seed in cells:
        jobs_.append(grid.Job(f"{fam.name} a={extent:.4g} {fam.unit} seed={seed}", cell_dir(out, fam, extent, seed),
                              cell_config(base, fam, extent, seed)))
        cell_of[id(jobs_[-1])] = (fam, extent, seed)
    rows: list[dict] = []

    def add(job: grid.Job, metrics: dict) -> None:
        rows.append(row(*cell_of[id(job)], metrics))
        write_tables(rows, out)  # the table stays current while later cells run

    results = grid.run_jobs(jobs_, control or RunControl(out), jobs, collect_only=collect_only, on_result=add)
    if not results:
        raise ValueError(f"no finished cell in {out} to collect")
    rows = [row(*cell_of[id(job)], metrics) for job, metrics in results]  # in the planned order
    write_tables(rows, out)
    plot(rows, out, fmt)
    return rows
