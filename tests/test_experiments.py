"""Every command-line entry point runs end to end with tiny settings (Pyro's tests/test_examples.py style).

A coverage test fails when a new script (a module with ``if __name__ == "__main__"``) is not listed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference import compare, grid, plots, report
from models.network import InvariantNet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-size", "100", "--test-size", "50", "--hidden", "8", "--num-steps", "3", "--num-transforms", "2",
        "--eval-transforms", "2", "--no-progress"]

# script -> the test that runs it end to end in a subprocess with tiny settings
SCRIPTS: dict[str, str] = {
    "inference/train.py": "tests/test_train_cli.py, tests/test_resume_cli.py",
    "inference/compare.py": "test_compare_with_seeds_writes_per_seed_runs_mean_and_std_and_a_figure below",
    "inference/extents.py": "tests/test_extents.py",
    "inference/diagnose.py": "tests/test_diagnostics.py",
    "inference/shifts.py": "tests/test_shifts.py",
    "benchmarks/bench_step.py": "tests/test_benchmarks.py",
    "benchmarks/bench_api.py": "tests/test_benchmarks.py",
    "benchmarks/bench_ddp.py": "tests/test_benchmarks.py",
}
COMPARE = ["-m", "inference.compare", "--dataset", "rotated-mnist", "--data-dir", "{data}", "--out", "{out}",
           "--configs", "elbo,ml", "--sweep-deg", "5,90", "--seeds", "0,1", "--eval-samples", "2", "--elbo-passes", "1",
           *TINY]


def entry_points() -> set[str]:
    found = set()
    for folder in ("inference", "benchmarks", "models", "guides"):
        for path in (ROOT / folder).glob("*.py"):
            if 'if __name__ == "__main__"' in path.read_text():
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_every_script_is_listed():
    assert entry_points() <= set(SCRIPTS), f"add these scripts to SCRIPTS: {sorted(entry_points() - set(SCRIPTS))}"


def test_compare_with_seeds_writes_per_seed_runs_mean_and_std_and_a_figure(tmp_path, data_dir):
    """End to end with two seeds: one folder per configuration and seed, one summary row per configuration whose
    mean and std are those of its two runs, and the figure."""
    out = tmp_path / "cmp"
    args = [a.format(out=out, data=data_dir) for a in COMPARE]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "comparison.csv") as f:
        summary = list(csv.DictReader(f))
    assert [r["config"] for r in summary] == ["elbo", "ml", "fixed-5", "fixed-90", "learned"]
    for r in summary:
        runs = [json.loads((out / r["config"] / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
        assert [m["config"]["seed"] for m in runs] == [0, 1] and r["seeds"] == "2"
        for key in ("test_accuracy", "test_nll", "elbo_per_example", "test_accuracy_one_draw"):
            values = [m[key] for m in runs]
            assert float(r[f"{key}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(r[f"{key}_std"]) == pytest.approx(statistics.stdev(values))
        eta = [m["eta"]["rotate"] for m in runs]
        assert float(r["eta_rotate_mean"]) == pytest.approx(statistics.fmean(eta))
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    assert (out / "comparison.png").stat().st_size > 10_000
    md = (out / "comparison.md").read_text()
    assert "Fixed-eta sweep, ELBO / example by fixed eta_rotate: 5 deg:" in md and "within noise" in md
    fixed = json.loads((out / "fixed-90" / "seed-1" / "metrics.json").read_text())
    assert fixed["eta"]["rotate"] == pytest.approx(1.5707963, abs=1e-6)  # fixed at 90 degrees, not learned
    assert fixed["config"]["model"]["generators"] == ["rotate"]
    ml = json.loads((out / "ml" / "seed-0" / "metrics.json").read_text())["config"]["model"]
    assert (ml["first_layer_prior"], ml["output_layer_prior"]) == (False, False)  # maximum likelihood: no prior
    again = subprocess.run([sys.executable, *args, "--format", "pdf"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stderr.count("(done, reused)") == 10  # nothing is trained twice
    assert (out / "comparison.pdf").read_bytes().startswith(b"%PDF-")  # --format: the figure in another format


def test_compare_runs_jobs_in_parallel_processes_and_refuses_other_settings(tmp_path, data_dir):
    base = ["--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--out", str(tmp_path / "par"),
            "--configs", "elbo,ml", "--seeds", "0,1", "--eval-samples", "1", "--elbo-passes", "1", *TINY]
    assert compare.cli([*base, "--jobs", "2"]) == 0
    for name in ("elbo", "ml"):
        for seed in (0, 1):
            assert (tmp_path / "par" / name / f"seed-{seed}" / "train.log").stat().st_size > 0  # the worker's output
    serial = tmp_path / "serial"
    threads = str(grid.worker_settings(2, "cpu")[0]["threads"])  # float sums, hence results, depend on the threads
    assert compare.cli([*base[:5], str(serial), *base[6:], "--jobs", "1", "--threads", threads]) == 0
    for name in ("elbo", "ml"):  # a worker trains exactly what this process trains with as many threads
        a = json.loads((tmp_path / "par" / name / "seed-1" / "metrics.json").read_text())
        b = json.loads((serial / name / "seed-1" / "metrics.json").read_text())
        assert a["eta"] == b["eta"] and a["test_accuracy"] == b["test_accuracy"]
    changed = [*base[:5], str(serial), *base[6:], "--lr", "0.01"]
    assert compare.cli(changed) == 2  # a finished run made with other settings is refused, not mixed in


def test_a_grid_goes_on_from_the_files_git_keeps_of_it(tmp_path, data_dir, capsys):
    """Grids under benchmarks/results/ are committed without their checkpoints and models (.gitignore): a clean
    clone has each finished run's config.json, metrics.json and eta_history.csv only, and the same command then
    reuses every run (trains none) and writes the same tables."""
    out = tmp_path / "grid"
    args = ["--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--out", str(out), "--configs", "elbo",
            "--sweep-deg", "90", "--seeds", "0,1", "--eval-samples", "1", "--elbo-passes", "1", *TINY]
    assert compare.cli(args) == 0
    before = (out / "comparison.csv").read_text()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    as_committed = "\n".join(f"benchmarks/results/grid/{f}" for f in files)
    check = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input=as_committed,
                           capture_output=True, text=True)
    ignored = {line.removeprefix("benchmarks/results/grid/") for line in check.stdout.splitlines()}
    assert any(f.endswith(".pt") for f in ignored) and not any(f.endswith("metrics.json") for f in ignored)
    for f in ignored:
        (out / f).unlink()
    capsys.readouterr()
    assert compare.cli(args) == 0
    assert capsys.readouterr().err.count("(done, reused)") == 6  # elbo, fixed-90, learned x 2 seeds
    assert (out / "comparison.csv").read_text() == before


def test_worker_settings_split_the_cores_and_the_gpus():
    from inference.grid import worker_settings

    assert worker_settings(2, "cpu", cores=16) == [{"threads": 8}, {"threads": 8}]
    assert worker_settings(3, "cpu", cores=2) == [{"threads": 1}] * 3
    assert [w["device"] for w in worker_settings(3, "cuda", cores=16, gpus=2)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_settings(2, "cuda", cores=4, gpus=1) == [{"threads": 2}, {"threads": 2}]
    with pytest.raises(ValueError, match="--jobs"):
        worker_settings(0, "cpu")


def test_sweep_summary_picks_the_best_fixed_angle_and_judges_the_gap_by_the_seed_spread():
    def r(name, deg, elbo, std=0.02, seeds=3):
        return {"config": name, "eta_rotate_mean": math.radians(deg), "elbo_per_example_mean": elbo,
                "elbo_per_example_std": std, "elbo_stderr_mean": 0.01, "seeds": seeds, "elbo_loglik_mean": 0.0,
                "elbo_kl_mean": 0.0, "test_accuracy_mean": 0.9}

    rows = [r("elbo", 10, -9.0), r("fixed-90", 90, -1.5), r("fixed-5", 5, -2.0), r("fixed-175", 175, -1.25),
            r("learned", 200, -1.3)]
    summary = report.sweep_summary(rows)
    assert summary["angles_deg"] == pytest.approx([5, 90, 175]) and summary["elbos"] == [-2.0, -1.5, -1.25]
    assert summary["best_deg"] == pytest.approx(175) and summary["best_elbo"] == -1.25
    assert summary["learned_deg"] == pytest.approx(200) and summary["learned_minus_best"] == pytest.approx(-0.05)
    assert summary["noise"] == pytest.approx(math.hypot(0.02, 0.02))
    assert "-0.050 ± 0.028 per example: it falls short of" in report.describe_sweep(summary)
    rows[-1] = r("learned", 200, -1.26)
    assert "it ties with" in report.describe_sweep(report.sweep_summary(rows))
    one_seed = [r("fixed-5", 5, -2.0, seeds=1), r("learned", 20, -1.9, seeds=1)]
    assert report.sweep_summary(one_seed)["noise"] == pytest.approx(math.hypot(0.01, 0.01))  # Monte-Carlo errors
    assert "it beats" in report.describe_sweep(report.sweep_summary(one_seed))
    assert report.sweep_summary(rows[:1]) is None
    assert report.sweep_summary(rows[:4])["learned_elbo"] is None


def test_occam_picture_draws_the_elbo_and_its_terms_against_a_fixed_eta_with_the_learned_eta_marked(tmp_path):
    def r(name, deg, loglik, kl, acc):
        return {"config": name, "eta_rotate_mean": math.radians(deg), "elbo_per_example_mean": loglik - kl,
                "elbo_per_example_std": 0.01, "elbo_stderr_mean": 0.01, "seeds": 1, "elbo_loglik_mean": loglik,
                "elbo_kl_mean": kl, "test_accuracy_mean": acc}

    rows = [r("fixed-5", 5, -0.8, 0.75, 0.6), r("fixed-90", 90, -0.85, 0.5, 0.7), r("fixed-180", 180, -0.9, 0.35, 0.8),
            r("learned", 380, -0.88, 0.36, 0.79)]
    sweep = report.sweep_summary(rows)
    assert (sweep["learned_loglik"], sweep["learned_kl"]) == (-0.88, 0.36)
    fig = report.plot_occam(sweep, tmp_path / "occam.pdf", fmt=plots.FigureFormat("pdf"))
    assert (tmp_path / "occam.pdf").read_bytes().startswith(b"%PDF-")
    ax_elbo, ax_terms, _ = fig.axes
    np.testing.assert_allclose(ax_elbo.lines[0].get_ydata().astype(float), [-1.55, -1.35, -1.25])
    by_label = {line.get_label(): line for line in ax_terms.lines}
    np.testing.assert_allclose(by_label["-KL (the Occam term)"].get_ydata(), [0.0, 0.25, 0.4])  # change from 5 deg
    np.testing.assert_allclose(by_label["expected log-likelihood"].get_ydata(), [0.0, -0.05, -0.1])
    (marker,) = [line for line in ax_terms.lines if line.get_linestyle() == ":"]
    assert marker.get_xdata()[0] == 180 and "380 deg: the full circle" in marker.get_label()  # beyond 180: drawn at 180


def test_presets_set_defaults_and_explicit_flags_win():
    args = compare.parse_args(["--preset", "table1", "--out", "x", "--num-steps", "7"])
    assert (args.first_layer, args.rff_scale, args.rff_blur, args.prior_scale) == ("rff", 8.0, 1.0, 4.0)
    assert args.configs == "" and args.sweep_deg == (5, 45, 90, 135, 175) and args.num_steps == 7
    planned = compare.plan(args)
    assert [(d, c) for d, c, _, _ in planned[:6]] == [("rotated", n) for n in ("fixed-5", "fixed-45", "fixed-90",
                                                                               "fixed-135", "fixed-175", "learned")]
    assert {d for d, *_ in planned} == {"rotated", "partially-rotated", "regular"} and len(planned) == 18
    plain = compare.parse_args(["--out", "x"])
    assert plain.first_layer == "relu" and plain.configs == "elbo,map,ml" and plain.sweep_deg == ()
    assert [(d, c, s) for d, c, s, _ in compare.plan(plain)] == [("", "elbo", 0), ("", "map", 0), ("", "ml", 0)]


def test_table2_plan_is_the_papers_grid_with_the_fixed_augmentation_at_the_true_extent():
    args = compare.parse_args(["--preset", "table2", "--out", "x", "--seeds", "0,1,2"])
    planned = compare.plan(args)
    assert len(planned) == 4 * 6 * 3
    runs = {(d, c): cfg for d, c, s, cfg in planned if s == 2}
    assert all(cfg.train.seed == 2 for cfg in runs.values())
    assert runs["rotated", "inv-affine"].model.generators == ("translate_x", "translate_y", "rotate", "scale",
                                                              "stretch", "shear")  # the recommended (isotropic) basis
    assert runs["scaled", "inv-scale"].model.generators == ("scale",)
    assert runs["scaled", "inv-scale"].data.log_scale == pytest.approx(math.log(2))
    aug = runs["translated", "fixed-aug"].model
    assert aug.generators == ("translate_x", "translate_y") and not aug.learn_eta
    assert runs["translated", "inv-translation"].model.max_shift == 1.0  # the recommended bound on learned shifts
    net = InvariantNet(aug, num_data=10)  # averages over exactly the data's shifts, the bound notwithstanding
    assert net.eta_effective[:2].tolist() == pytest.approx([8 / 13.5] * 2)  # 8 px in normalised units
    assert runs["scaled", "fixed-aug"].model.eta_init == pytest.approx(math.log(2))
    assert runs["rotated", "fixed-aug"].model.eta_init == pytest.approx(math.pi)
    assert runs["regular", "fixed-aug"].model.generators == ()
    for key in (("rotated", "fixed-aug"), ("regular", "inv-none")):  # nothing to learn: the plain ELBO
        cfg = runs[key]
        assert cfg.train.eta_objective == "elbo" and cfg.train.eta_burnin == 0
        assert not cfg.model.first_layer_prior  # the hybrid guide's W1 is then a hyperparameter, as in the paper
    learned = runs["rotated", "inv-rotation"]
    assert learned.train.eta_objective == "evidence" and learned.model.first_layer_prior
    with pytest.raises(ValueError, match="unknown dataset"):
        compare.plan(compare.parse_args(["--out", "x", "--datasets", "cifar"]))
    with pytest.raises(ValueError, match="unknown configuration"):
        compare.plan(compare.parse_args(["--out", "x", "--configs", "inv-colour"]))


def test_table3_plan_is_the_papers_cifar10_grid_on_3_channel_inputs():
    planned = compare.plan(compare.parse_args(["--preset", "table3", "--out", "x"]))
    assert [(d, c) for d, c, _, _ in planned] == [(d, c) for d in ("rotated-cifar10", "translated-cifar10",
                                                                   "scaled-cifar10", "cifar10")
                                                  for c in ("inv-none", "inv-affine")]
    runs = {(d, c): cfg for d, c, _, cfg in planned}
    assert all(cfg.model.image_shape == (3, 32, 32) for cfg in runs.values())
    assert runs["translated-cifar10", "inv-affine"].data.translation_px == 8.0
    assert runs["scaled-cifar10", "inv-affine"].data.log_scale == pytest.approx(math.log(2))
    assert runs["rotated-cifar10", "inv-affine"].data.rotation == pytest.approx(math.pi)
    plain = runs["cifar10", "inv-none"]
    assert plain.model.generators == () and plain.train.eta_objective == "elbo"
    affine = runs["rotated-cifar10", "inv-affine"]
    assert len(affine.model.generators) == 6 and affine.train.eta_objective == "evidence"  # the recommended setting
    aug = compare.plan(compare.parse_args(["--out", "x", "--datasets", "translated-cifar10", "--configs", "fixed-aug"]))
    assert aug[0][3].model.eta_init == pytest.approx(8 / 15.5)  # 8 px on 32-pixel sides


def test_grid_reuses_a_run_another_process_finished_after_the_grid_was_planned(tmp_path, data_dir):
    """Two grids on one folder (split by --datasets, or a printed command run by hand): a run that the other
    finished while this grid trained its earlier runs is reused when its turn comes, not trained again over it."""
    from inference import runner, train

    args = train.build_parser().parse_args(
        ["--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--out", "unused", *TINY, "--eval-samples", "1",
         "--elbo-passes", "1"])
    config = train.config_from_args(args)
    control = runner.RunControl(Path("."), progress=False)
    first, second = grid.Job("first", tmp_path / "first", config), grid.Job("second", tmp_path / "second", config)
    written = {}

    def other_process_finishes_second(job: grid.Job, metrics: dict) -> None:
        if job.label == "first":  # the grid planned both runs, unfinished; now the other process ends "second"
            runner.run(config, dataclasses.replace(control, out=second.run_dir))
            written["metrics"] = (second.run_dir / "metrics.json").read_bytes()

    results = grid.run_jobs([first, second], control, on_result=other_process_finishes_second)
    assert (second.run_dir / "metrics.json").read_bytes() == written["metrics"]  # not trained again
    assert results[1][1]["test_accuracy"] == json.loads(written["metrics"])["test_accuracy"]


@pytest.mark.parametrize("workers", [1, 2])
def test_grid_resumes_a_run_interrupted_part_way_and_trains_a_shared_folder_once(tmp_path, data_dir, workers):
    """A folder with checkpoints but no metrics.json continues from its newest checkpoint (in this process or
    in a worker) and ends where an uninterrupted run ends; two jobs naming one folder train it once."""
    from inference import runner, train

    args = train.build_parser().parse_args(
        ["--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--out", "unused", *TINY, "--num-steps", "6",
         "--eval-samples", "1", "--elbo-passes", "1"])
    config = train.config_from_args(args)
    control = runner.RunControl(Path("."), checkpoint_every=2, keep_checkpoints=5, progress=False)

    def job(folder: Path, label: str = "run") -> grid.Job:
        return grid.Job(label, folder, config)

    whole = grid.run_jobs([job(tmp_path / "a")], control)[0][1]
    cut = tmp_path / "b"
    grid.run_jobs([job(cut)], control)
    (cut / "metrics.json").unlink()  # as if stopped after step 2: only its checkpoint is left
    for step in (4, 6):
        path = cut / "checkpoints" / f"step-{step:08d}.pt"
        path.unlink()
        Path(f"{path}.sha256").unlink()
    calls = []
    results = grid.run_jobs([job(cut, "first"), job(cut, "second"), job(tmp_path / "c", "other")], control,
                            num_workers=workers, on_result=lambda j, m: calls.append(j.label))
    assert sorted(calls) == ["first", "other", "second"] and calls.index("first") < calls.index("second")
    assert [j.label for j, _ in results] == ["first", "second", "other"]
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 2
    assert resumed["eta"] == whole["eta"] and resumed["test_accuracy"] == whole["test_accuracy"]
