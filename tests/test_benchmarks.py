"""``benchmarks/bench_step.py --quick`` runs every mode end to end and prints the table."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_step.py"


def test_bench_step_quick_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "mode" in text and "steps/s" in text and "examples/s" in text and "peak MiB" in text
    for mode in ("weights", "inputs", "floor"):
        assert f"\n{mode} " in text, mode
    assert "ratio weights/floor" in text and "ratio inputs/floor" in text and "ratio weights/inputs" in text
    assert "epoch estimate [weights]" in text
    results = json.loads(out.read_text())["results"]
    assert {r["mode"] for r in results} == {"weights", "inputs", "floor"}
    assert {r["K"] for r in results} == {1, 2} and {r["B"] for r in results} == {8, 16}
    assert all(r["seconds"] > 0 and r["examples_per_s"] > 0 for r in results)


def test_bench_step_times_cifar10_shaped_inputs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dataset", "cifar10", "--modes", "weights,floor",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images 3x32x32" in proc.stdout and "one 50000-image epoch" in proc.stdout  # CIFAR-10's training set
    assert {tuple(r["image_shape"]) for r in json.loads(out.read_text())["results"]} == {(3, 32, 32)}
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dataset", "svhn"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, check=False)
    assert bad.returncode != 0 and "unknown --dataset 'svhn'" in bad.stderr


def test_bench_step_rejects_unknown_modes():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--modes", "weights,nope"], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60, check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr


def test_bench_api_quick_times_both_paths(data_dir):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_api.py"), "--quick", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in proc.stdout.splitlines()
            if line.startswith("| api") or line.startswith("| cli")}
    assert set(rows) == {"api", "cli"} and all(v > 0 for v in rows.values())
    assert "api / cli = " in proc.stdout


def test_bench_ddp_quick_times_one_and_two_processes(data_dir, tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_ddp.py"), "--quick", "--data-dir",
                           str(data_dir), "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speed-up of 2 processes over 1:" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["1 process", "2 processes"]
    assert all(r["train_seconds"] > 0 for r in results)
