"""Tables and figures of a comparison: per-seed rows, mean +- std over seeds, the fixed-eta sweep (Table 1).

:mod:`inference.compare` trains the runs; this module turns their ``metrics.json`` into

* ``runs.csv``: one row per run (dataset, configuration, seed),
* ``comparison.csv``: one row per (dataset, configuration) with ``<metric>_mean`` and ``<metric>_std`` columns
  (standard deviation over seeds, 0 with one seed) for every eta, test accuracy and NLL (M draws and one draw),
  and the ELBO with its terms,
* ``comparison.md``: the same rounded, a configuration x dataset accuracy matrix when there are several
  datasets (the layout of the paper's Table 2), and the sweep's outcome under each dataset's table,
* ``comparison.<format>`` (:func:`plot`; png, pdf or svg): per dataset, eta_rotate over training in degrees, test
  accuracy and ELBO with error bars, and with a sweep the Occam picture (:func:`plot_occam_panels`): the ELBO
  against the fixed angle and its two terms, expected log-likelihood and KL, with the learned eta marked.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from inference.history import read_history_csv
from inference.plots import FigureFormat, new_figure, styled
from models.transforms import ALL_GENERATOR_NAMES

METRICS = [*(f"eta_{g}" for g in ALL_GENERATOR_NAMES), "test_accuracy", "test_nll", "test_accuracy_one_draw",
           "test_nll_one_draw", "elbo_per_example", "elbo_stderr", "elbo_loglik", "elbo_kl", "constant_loglik",
           "eta_unsupported", "train_seconds"]
"""Numeric columns of a run, averaged over seeds (eta columns stay empty for generators outside the run's basis;
``eta_unsupported`` is 1 where the bound that set eta fit the labels no better than the constant prediction
(:mod:`inference.evidence_check`), 0 where it did, empty where no bound set eta: its mean is the share of seeds)."""

RUN_COLUMNS = ["dataset", "config", "seed", "guide", "generators", "eta_fixed", *METRICS]
SUMMARY_COLUMNS = ["dataset", "config", "seeds", "guide", "generators", "eta_fixed",
                   *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))]


def one_draw(metrics: dict) -> tuple[float, float]:
    """Test accuracy and NLL of one weight draw; runs from before they were recorded evaluated one draw by default."""
    if "test_accuracy_one_draw" in metrics:
        return metrics["test_accuracy_one_draw"], metrics["test_nll_one_draw"]
    if metrics.get("config", {}).get("eval", {}).get("num_samples", 1) == 1:
        return metrics["test_accuracy"], metrics.get("test_nll", math.nan)
    return math.nan, math.nan


def run_row(dataset: str, config: str, seed: int, metrics: dict) -> dict:
    """One row of ``runs.csv`` from a run's ``metrics.json``."""
    model = metrics["config"]["model"]
    out = {"dataset": dataset, "config": config, "seed": seed, "guide": metrics["config"]["guide"]["kind"],
           "generators": "+".join(model["generators"]) or "none", "eta_fixed": not model["learn_eta"],
           **{f"eta_{g}": value for g, value in metrics["eta"].items()}}
    out.update({k: metrics[k] for k in ("test_accuracy", "test_nll", "elbo_per_example", "train_seconds")})
    out["test_accuracy_one_draw"], out["test_nll_one_draw"] = one_draw(metrics)
    out["elbo_stderr"] = metrics.get("elbo_stderr", math.nan)
    terms = metrics.get("elbo_terms", {})
    out["elbo_loglik"], out["elbo_kl"] = terms.get("expected_loglik", math.nan), terms.get("kl", math.nan)
    check = metrics.get("evidence_check")  # None where no bound set eta; absent in runs from before the check
    out["constant_loglik"] = math.nan if check is None else check["constant_loglik"]
    out["eta_unsupported"] = math.nan if check is None else float(not check["fits_labels"])
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for no finite value."""
    finite = [float(v) for v in values if v is not None and v == v]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def group_rows(rows: Sequence[dict], *keys: str) -> dict[tuple, list[dict]]:
    """The rows of each value of ``keys`` (one row per seed), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (dataset, configuration), in first-seen order, with mean and std over its seeds."""
    out = []
    for (dataset, config), rs in group_rows(rows, "dataset", "config").items():
        s = {"dataset": dataset, "config": config, "seeds": len(rs),
             **{k: rs[0][k] for k in ("guide", "generators", "eta_fixed")}}
        for m in METRICS:
            s[f"{m}_mean"], s[f"{m}_std"] = mean_std([r.get(m, math.nan) for r in rs])
        out.append(s)
    return out


def _pm(mean: float, std: float, fmt: str, scale: float = 1.0) -> str:
    if mean != mean:
        return "-"
    return f"{format(scale * mean, fmt)} ± {format(scale * std, fmt)}"


def sweep_summary(summary: list[dict]) -> dict | None:
    """The fixed-eta sweep of one dataset (Table 1 of the paper) from its summary rows, or None without a sweep.

    Returns
    -------
    dict or None
        ``angles_deg``, ``elbos``, ``elbo_stds`` (over seeds), ``stderrs`` (Monte-Carlo, mean over seeds),
        ``logliks``, ``kls`` and ``accuracies`` of the ``fixed-A`` rows sorted by angle; ``best_deg``,
        ``best_elbo``, ``best_std`` (the highest mean fixed ELBO); ``learned_deg``, ``learned_elbo``,
        ``learned_std``, ``learned_loglik``, ``learned_kl``, ``learned_accuracy`` (None without a ``learned``
        row); ``learned_minus_best`` and its ``noise`` (the two standard deviations combined, or the Monte-Carlo
        errors with one seed).
    """
    fixed = sorted((r for r in summary if r["config"].startswith("fixed-") and r["config"] != "fixed-aug"),
                   key=lambda r: r["eta_rotate_mean"])
    if not fixed:
        return None
    best = max(fixed, key=lambda r: r["elbo_per_example_mean"])
    learned = next((r for r in summary if r["config"] == "learned"), None)

    def spread(r: dict) -> float:
        return r["elbo_per_example_std"] if r["seeds"] > 1 else r["elbo_stderr_mean"]

    out = {
        "angles_deg": [math.degrees(r["eta_rotate_mean"]) for r in fixed],
        "elbos": [r["elbo_per_example_mean"] for r in fixed],
        "elbo_stds": [spread(r) for r in fixed],
        "stderrs": [r["elbo_stderr_mean"] for r in fixed],
        "logliks": [r["elbo_loglik_mean"] for r in fixed],
        "kls": [r["elbo_kl_mean"] for r in fixed],
        "accuracies": [r["test_accuracy_mean"] for r in fixed],
        "best_deg": math.degrees(best["eta_rotate_mean"]),
        "best_elbo": best["elbo_per_example_mean"],
        "best_std": spread(best),
        "learned_deg": None, "learned_elbo": None, "learned_std": None, "learned_loglik": None, "learned_kl": None,
        "learned_accuracy": None, "learned_minus_best": None, "noise": None,
    }
    if learned is not None:
        out.update(learned_deg=math.degrees(learned["eta_rotate_mean"]), learned_elbo=learned["elbo_per_example_mean"],
                   learned_std=spread(learned), learned_loglik=learned["elbo_loglik_mean"],
                   learned_kl=learned["elbo_kl_mean"], learned_accuracy=learned["test_accuracy_mean"],
                   learned_minus_best=learned["elbo_per_example_mean"] - out["best_elbo"],
                   noise=math.hypot(spread(learned), out["best_std"]))
    return out


def describe_sweep(summary: dict) -> str:
    """Markdown lines stating the sweep's outcome, with the noise that decides "beats or ties"."""
    by_angle = ", ".join(f"{a:g} deg: {e:.3f}" for a, e in zip(summary["angles_deg"], summary["elbos"], strict=True))
    lines = [f"Fixed-eta sweep, ELBO / example by fixed eta_rotate: {by_angle}.",
             f"Best fixed: {summary['best_deg']:g} deg ({summary['best_elbo']:.3f})."]
    if summary["learned_elbo"] is not None:
        gap, noise = summary["learned_minus_best"], summary["noise"]
        verdict = "beats" if gap > noise else ("ties with" if gap >= -noise else "falls short of")
        lines.append(f"Learned: eta_rotate = {summary['learned_deg']:.1f} deg, ELBO {summary['learned_elbo']:.3f} "
                     f"(learned - best fixed = {gap:+.3f} ± {noise:.3f} per example: it {verdict} the best fixed "
                     "eta within noise).")
    return "\n".join(lines)


def write_tables(rows: list[dict], out: Path) -> list[dict]:
    """``runs.csv``, ``comparison.csv`` and ``comparison.md``; returns the summary rows."""
    summary = summarise(rows)
    for name, columns, table in (("runs.csv", RUN_COLUMNS, rows), ("comparison.csv", SUMMARY_COLUMNS, summary)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(table)
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    lines = []
    if len(datasets) > 1:
        configs = list(dict.fromkeys(s["config"] for s in summary))
        cell = {(s["dataset"], s["config"]): s for s in summary}
        lines += ["Test accuracy (%), mean ± std over seeds:", "",
                  "| config | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
        for c in configs:
            values = [_pm(cell[d, c]["test_accuracy_mean"], cell[d, c]["test_accuracy_std"], ".2f", 100)
                      if (d, c) in cell else "" for d in datasets]
            lines.append(f"| {c} | " + " | ".join(values) + " |")
        lines.append("")
    for d in datasets:
        ds = [s for s in summary if s["dataset"] == d]
        if len(datasets) > 1:
            lines += [f"### {d}", ""]
        lines += ["| config | seeds | guide | generators | eta_rotate (deg) | max other eta | test acc % | "
                  "one draw % | test NLL | ELBO / example | = log-lik | - KL | train s |", "|---" * 13 + "|"]
        for s in ds:
            others = [v for g in ALL_GENERATOR_NAMES if g != "rotate" and (v := s[f"eta_{g}_mean"]) == v]
            lines.append(
                f"| {s['config']} | {s['seeds']} | {s['guide']} | {s['generators']} | "
                f"{_pm(s['eta_rotate_mean'], s['eta_rotate_std'], '.1f', 180 / math.pi)} | "
                f"{max(others, default=math.nan):.3f} | "
                f"{_pm(s['test_accuracy_mean'], s['test_accuracy_std'], '.2f', 100)} | "
                f"{_pm(s['test_accuracy_one_draw_mean'], s['test_accuracy_one_draw_std'], '.2f', 100)} | "
                f"{_pm(s['test_nll_mean'], s['test_nll_std'], '.3f')} | "
                f"{_pm(s['elbo_per_example_mean'], s['elbo_per_example_std'], '.3f')} | {s['elbo_loglik_mean']:.3f} | "
                f"{s['elbo_kl_mean']:.3f} | {s['train_seconds_mean']:.0f} |")
        lines += unsupported_notes(ds)
        sweep = sweep_summary(ds)
        lines += ["", describe_sweep(sweep), ""] if sweep is not None else [""]
    (out / "comparison.md").write_text("\n".join(lines))
    return summary


def unsupported_notes(summary: Sequence[dict]) -> list[str]:
    """Markdown lines naming each configuration whose eta was chosen by the bound's KL term alone in some seeds."""
    lines = []
    for s in summary:
        share = s["eta_unsupported_mean"]
        if share == share and share > 0:
            lines += ["", f"**{s['config']}: eta is not the data's in {share:.0%} of the seeds checked.** The bound "
                      "that set it fits the labels no better than a prediction that ignores the images (expected "
                      f"log-likelihood {s['elbo_loglik_mean']:.3f} against {s['constant_loglik_mean']:.3f} per "
                      "example, means over seeds), so its KL term alone chose eta."]
    return lines


def _learned_x(sweep: dict) -> tuple[float, str]:
    """Where the learned eta goes on a fixed-angle axis, and its label: beyond 180 deg T covers the full circle, so
    a larger learned angle is drawn at 180 and named."""
    deg = sweep["learned_deg"]
    return min(deg, 180.0), f"learned eta ({deg:.0f} deg{': the full circle' if deg >= 180 else ''})"


def plot_sweep(ax: Axes, sweep: dict, title: str = "") -> None:
    """The ELBO / example of the fixed-eta runs against their angle (+- std over seeds, or the Monte-Carlo error
    with one seed), the learned run as a star."""
    ax.errorbar(sweep["angles_deg"], sweep["elbos"], yerr=sweep["elbo_stds"], fmt="o-", color="tab:red", capsize=3,
                label="eta_rotate fixed")
    if sweep["learned_elbo"] is not None:
        x, label = _learned_x(sweep)
        ax.errorbar([x], [sweep["learned_elbo"]], yerr=[sweep["learned_std"]], fmt="*", ms=14, color="k", label=label)
    ax.set(xlabel="eta_rotate (degrees)", ylabel="ELBO / example (nats)", title=f"{title}ELBO against a fixed eta")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def plot_terms(ax: Axes, sweep: dict, title: str = "") -> None:
    """The sweep's ELBO split into its terms, each relative to its value at the smallest fixed angle (the Occam
    trade-off: what the fit loses and what the complexity term gains as eta widens), the learned run's as stars, and
    test accuracy on a second axis."""
    angles = sweep["angles_deg"]
    learned = sweep["learned_elbo"] is not None
    for key, learned_key, label, sign, color in (
            ("elbos", "learned_elbo", "ELBO", 1, "tab:red"),
            ("logliks", "learned_loglik", "expected log-likelihood", 1, "tab:blue"),
            ("kls", "learned_kl", "-KL (the Occam term)", -1, "tab:green")):
        values = [sign * v for v in sweep[key]]
        ax.plot(angles, [v - values[0] for v in values], "o-", color=color, label=label)
        if learned and sweep.get(learned_key) is not None:
            ax.plot([_learned_x(sweep)[0]], [sign * sweep[learned_key] - values[0]], "*", ms=12, color=color)
    if learned:
        ax.axvline(_learned_x(sweep)[0], color="k", ls=":", lw=1, label=_learned_x(sweep)[1] + " (stars)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="fixed eta_rotate (degrees)", ylabel=f"change from {angles[0]:g} deg (nats / example)",
           title=f"{title}the ELBO's terms against a fixed eta")
    ax_acc = ax.twinx()
    ax_acc.plot(angles, [100 * a for a in sweep["accuracies"]], "s:", color="0.6", label="test accuracy (right axis)")
    ax_acc.set_ylabel("test accuracy (%, grey squares)", color="0.4")
    ax.set_zorder(ax_acc.get_zorder() + 1)  # the terms and their stars in front of the accuracy
    ax.patch.set_visible(False)
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = ax_acc.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
              fontsize=7)


@styled
def plot_occam(sweep: dict, path: str | Path | None = None, title: str = "", fmt: FigureFormat | None = None
               ) -> Figure:
    """The Occam picture of one sweep (:func:`sweep_summary`): :func:`plot_sweep` and :func:`plot_terms` side by side;
    written to ``path`` when given."""
    fig = new_figure(11, 4.2)
    ax_elbo, ax_terms = fig.subplots(1, 2)
    plot_sweep(ax_elbo, sweep)
    plot_terms(ax_terms, sweep)
    if title:
        fig.suptitle(title)
    if path is not None:
        (fmt or FigureFormat()).save(fig, Path(path).parent, Path(path).stem)
    return fig


def _plot_dataset(axes: Sequence[Axes], summary: list[dict], histories: dict[str, list[Path]], title: str) -> None:
    ax_eta, ax_acc = axes[0], axes[1]
    for i, s in enumerate(summary):
        for k, path in enumerate(histories.get(s["config"], [])):
            steps, eta = read_history_csv(path)
            ax_eta.plot(steps, [math.degrees(v) for v in eta["rotate"]], color=f"C{i % 10}",
                        ls="--" if s["eta_fixed"] else "-", lw=1, label=s["config"] if k == 0 else None)
    ax_eta.axhline(180, color="0.3", lw=0.8, ls="-.", label="180 deg: the full circle")
    ax_eta.set(xlabel="SVI step", ylabel="eta_rotate (degrees)", title=f"{title}eta_rotate over training (each seed)")
    ax_eta.legend(fontsize=7)
    xs = list(range(len(summary)))
    ax_acc.bar(xs, [100 * s["test_accuracy_mean"] for s in summary],
               yerr=[100 * s["test_accuracy_std"] for s in summary], color="tab:blue", alpha=0.7, capsize=3)
    ax_acc.set_xticks(xs, [s["config"] for s in summary], rotation=30, ha="right")
    ax_acc.set_ylabel("test accuracy (%, mean ± std)", color="tab:blue")
    lo = min(100 * (s["test_accuracy_mean"] - s["test_accuracy_std"]) for s in summary)
    ax_acc.set_ylim(max(0.0, lo - 10), 100)
    ax_elbo = ax_acc.twinx()
    ax_elbo.errorbar(xs, [s["elbo_per_example_mean"] for s in summary],
                     yerr=[s["elbo_per_example_std"] for s in summary], fmt="o", color="tab:red", capsize=3)
    ax_elbo.set_ylabel("ELBO / example (ml / map: their objective)", color="tab:red")
    ax_acc.set_title(f"{title}test accuracy (bars) and ELBO (dots)")
    sweep = sweep_summary(summary)
    if sweep is not None and len(axes) > 2:
        plot_sweep(axes[2], sweep, title)
        plot_terms(axes[3], sweep, title)


@styled
def plot(summary: list[dict], histories: dict[tuple[str, str], list[Path]], out: Path,
         fmt: FigureFormat | None = None) -> Path:
    """``comparison.<format>``: one row of panels per dataset (``histories``: ``eta_history.csv`` paths per run)."""
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    sweeps = any(sweep_summary([s for s in summary if s["dataset"] == d]) is not None for d in datasets)
    cols = 4 if sweeps else 2
    fig = new_figure(5.5 * cols, 4.5 * len(datasets))
    axes = fig.subplots(len(datasets), cols, squeeze=False)
    for row, d in zip(axes, datasets, strict=True):
        ds = [s for s in summary if s["dataset"] == d]
        _plot_dataset(row, ds, {c: paths for (dd, c), paths in histories.items() if dd == d},
                      f"{d}: " if len(datasets) > 1 else "")
        if cols == 4 and sweep_summary(ds) is None:
            row[2].axis("off")
            row[3].axis("off")
    return (fmt or FigureFormat()).save(fig, out, "comparison")
