"""Every command-line entry point runs end to end with tiny settings (Pyro's tests/test_examples.py style).

A coverage test fails when a new script (a module with ``if __name__ == "__main__"``) is not listed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference import compare

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-size", "100", "--test-size", "50", "--hidden", "8", "--num-steps", "3", "--num-transforms", "2",
        "--eval-transforms", "2", "--no-progress"]

# script -> the test that runs it end to end in a subprocess with tiny settings
SCRIPTS: dict[str, str] = {
    "inference/train.py": "tests/test_train_cli.py, tests/test_resume_cli.py",
    "inference/compare.py": "test_compare_writes_table_and_figure below",
    "inference/extents.py": "tests/test_extents.py",
    "inference/diagnose.py": "tests/test_diagnostics.py",
    "benchmarks/bench_step.py": "tests/test_benchmarks.py",
}
COMPARE = ["-m", "inference.compare", "--dataset", "rotated-mnist", "--data-dir", "{data}", "--out", "{out}",
           "--configs", "elbo,ml", "--sweep-deg", "5,90", *TINY]


def entry_points() -> set[str]:
    found = set()
    for folder in ("inference", "benchmarks", "models", "guides"):
        for path in (ROOT / folder).glob("*.py"):
            if 'if __name__ == "__main__"' in path.read_text():
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_every_script_is_listed():
    assert entry_points() <= set(SCRIPTS), f"add these scripts to SCRIPTS: {sorted(entry_points() - set(SCRIPTS))}"


def test_compare_writes_table_and_figure(tmp_path, data_dir):
    """The comparison's table has one row per configuration and sweep angle, and the figure exists."""
    out = tmp_path / "cmp"
    args = [a.format(out=out, data=data_dir) for a in COMPARE]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (out / "comparison.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["elbo", "ml", "fixed-5", "fixed-90", "learned"]
    assert (out / "comparison.png").stat().st_size > 10_000
    md = (out / "comparison.md").read_text()
    assert sum(line.startswith("|") for line in md.splitlines()) == len(rows) + 1  # header, separator, runs
    assert "Fixed-eta sweep, ELBO / example by fixed eta_rotate: 5 deg:" in md and "learned - best fixed" in md
    fixed = json.loads((out / "fixed-90" / "metrics.json").read_text())
    assert fixed["eta"]["rotate"] == pytest.approx(1.5707963, abs=1e-6)  # fixed at 90 degrees, not learned
    assert fixed["config"]["model"]["generators"] == ["rotate"]
    ml = json.loads((out / "ml" / "metrics.json").read_text())["config"]["model"]
    assert (ml["first_layer_prior"], ml["output_layer_prior"]) == (False, False)  # maximum likelihood: no prior


def test_sweep_summary_picks_the_best_fixed_angle_and_the_learned_gap():
    def r(name, deg, elbo):
        return {"config": name, "eta_rotate": math.radians(deg), "elbo_per_example": elbo, "elbo_stderr": 0.01}

    rows = [r("elbo", 10, -9.0), r("fixed-90", 90, -1.5), r("fixed-5", 5, -2.0), r("fixed-175", 175, -1.25),
            r("learned", 200, -1.3)]
    summary = compare.sweep_summary(rows)
    assert summary["angles_deg"] == pytest.approx([5, 90, 175]) and summary["elbos"] == [-2.0, -1.5, -1.25]
    assert summary["best_deg"] == pytest.approx(175) and summary["best_elbo"] == -1.25
    assert summary["learned_deg"] == pytest.approx(200) and summary["learned_minus_best"] == pytest.approx(-0.05)
    assert "learned - best fixed = -0.050 per example" in compare.describe_sweep(summary)
    assert compare.sweep_summary(rows[:1]) is None
    assert compare.sweep_summary(rows[:4])["learned_elbo"] is None


def test_preset_sets_defaults_and_explicit_flags_win():
    args = compare.parse_args(["--preset", "table1", "--out", "x", "--num-steps", "7"])
    assert (args.first_layer, args.rff_scale, args.rff_blur, args.prior_scale) == ("rff", 8.0, 1.0, 4.0)
    assert args.configs == "" and args.sweep_deg == "5,45,90,135,175" and args.num_steps == 7
    assert [name for name, _ in compare.plan(args)] == ["fixed-5", "fixed-45", "fixed-90", "fixed-135",
                                                         "fixed-175", "learned"]
    plain = compare.parse_args(["--out", "x"])
    assert plain.first_layer == "relu" and plain.configs == "elbo,map,ml" and plain.sweep_deg == ""
