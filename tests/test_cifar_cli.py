"""End to end on made data: ``inference.train`` and ``inference.diagnose`` on a tiny CIFAR-10 (3 x 32 x 32) and a
tiny Fashion-MNIST written in torchvision's formats.

The CIFAR-10 runs call the CLI's entry point in this process, because torchvision's md5 checklist has to carry the
made files' sums (:func:`tests.made_data.vouch_for_cifar10`); Fashion-MNIST has no checksums at load time and
runs as ``python -m inference.train`` in a subprocess.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from inference import diagnose, train
from inference.data import DataConfig, true_extent
from models.transforms import GENERATOR_NAMES
from tests.conftest import REPO_ROOT
from tests.made_data import CIFAR_FOLDER, vouch_for_cifar10, write_cifar10, write_fashion_mnist

TINY = ["--hidden", "8", "--num-steps", "3", "--num-transforms", "2", "--eval-transforms", "2", "--eval-samples",
        "2", "--elbo-passes", "1", "--batch-size", "10", "--no-progress", "--threads", "1"]


@pytest.fixture
def one_thread():
    """``--threads 1`` sets torch's threads in this process: give them back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cifar_run(tmp_path, monkeypatch, one_thread):
    """A finished 3-step run on made rotated CIFAR-10 (50 training, 20 test images)."""
    write_cifar10(tmp_path / "data")
    vouch_for_cifar10(monkeypatch, tmp_path / "data")
    out = tmp_path / "run"
    rc = train.cli(["--dataset", "rotated-cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(out), *TINY])
    assert rc == 0
    return out


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_train_on_rotated_cifar10_writes_metrics_and_eta_history(cifar_run):
    metrics = json.loads((cifar_run / "metrics.json").read_text())
    assert metrics["config"]["model"]["image_shape"] == [3, 32, 32]
    assert metrics["config"]["data"]["dataset"] == "rotated-cifar10"
    assert metrics["data"]["source"] == "CIFAR-10" and metrics["data"]["train_size"] == 50
    assert list(metrics["eta"]) == list(GENERATOR_NAMES) and all(v > 0 for v in metrics["eta"].values())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["elbo_per_example"] < 0
    with open(cifar_run / "eta_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert {k: float(v) for k, v in rows[-1].items() if k != "step"} == pytest.approx(metrics["eta"])
    assert (cifar_run / "model.pt").is_file()


def test_diagnose_a_cifar10_run_with_colour_figures(cifar_run, one_thread):
    rc = diagnose.cli([str(cifar_run), "--draws", "4", "--khat-draws", "4", "--num-filters", "8", "--threads", "1"])
    assert rc == 0
    summary = json.loads((cifar_run / "diagnostics" / "summary.json").read_text())
    assert summary["dataset"] == "rotated-cifar10" and summary["num_test"] == 20
    assert summary["eta_true"] == pytest.approx(true_extent(DataConfig(dataset="rotated-cifar10")))
    for name in ("filters", "invariant_filters", "transformed_digits", "eta_trajectories", "reliability"):
        assert (cifar_run / "diagnostics" / "figures" / f"{name}.png").is_file(), name
    assert (cifar_run / "diagnostics" / "inference_data.nc").is_file()


def test_cli_corrupt_cifar10_batch_is_a_one_line_error(tmp_path, monkeypatch, capsys, one_thread):
    write_cifar10(tmp_path)
    vouch_for_cifar10(monkeypatch, tmp_path)
    batch = tmp_path / CIFAR_FOLDER / "data_batch_4"
    batch.write_bytes(batch.read_bytes()[:100])
    assert train.cli(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), *TINY]) == 2
    line = one_line_error(capsys)
    assert str(batch) in line and "md5" in line
    assert not (tmp_path / "out").exists()


def test_cli_missing_cifar10_is_a_one_line_error(tmp_path, capsys, one_thread):
    root = tmp_path / "nowhere"
    assert train.cli(["--dataset", "scaled-cifar10", "--data-dir", str(root), "--out", str(tmp_path / "out"),
                      *TINY]) == 2
    line = one_line_error(capsys)
    assert f"CIFAR-10 not found under {root / CIFAR_FOLDER}" in line and "--download" in line


def test_train_on_rotated_fashion_mnist_in_a_subprocess(tmp_path):
    write_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "inference.train", "--dataset", "rotated-fashion-mnist", "--data-dir",
                           str(tmp_path / "data"), "--out", str(out), "--train-size", "30", *TINY],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"]["image_shape"] == [1, 28, 28]
    assert metrics["data"]["source"] == "Fashion-MNIST" and metrics["data"]["train_size"] == 30
    assert "(a part, not the full Fashion-MNIST)" in proc.stderr
