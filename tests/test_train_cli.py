"""End-to-end: ``python -m inference.train`` with tiny settings, its outputs and its error handling."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.evaluate import predictive_log_probs
from inference.run_io import load_model
from inference.train import cli
from models import GENERATOR_NAMES

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INVW_DATA_DIR"}  # only --data-dir decides
    return subprocess.run(
        [sys.executable, "-m", "inference.train", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def tiny_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--train-size", "200", "--test-size", "100",
        "--hidden", "16", "--num-steps", "3", "--num-transforms", "2", "--eval-transforms", "4",
        "--out", str(out), "--no-progress", *extra,
    ]


def read_history(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One tiny training run in a subprocess (3 steps), shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    proc = run_train(*tiny_args(data_dir, out, "--threads", "1"))  # one core: the machine is shared
    return proc, out


def test_tiny_training_run_writes_metrics(tiny_run, data_dir):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eta", "test_accuracy", "test_nll", "elbo_per_example", "train_seconds", "config", "data"):
        assert key in metrics, key
    assert list(metrics["eta"]) == list(GENERATOR_NAMES)
    assert all(v > 0 for v in metrics["eta"].values())  # all six generators active by default
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert math.isfinite(metrics["test_nll"]) and metrics["test_nll"] > 0
    assert math.isfinite(metrics["elbo_per_example"]) and metrics["elbo_per_example"] < 0
    assert metrics["train_seconds"] > 0

    cfg = metrics["config"]
    assert cfg["data"]["dataset"] == "rotated-mnist" and cfg["data"]["train_size"] == 200
    assert cfg["model"]["hidden"] == 16 and cfg["model"]["num_transforms"] == 2
    assert cfg["model"]["generators"] == list(GENERATOR_NAMES)
    assert cfg["model"]["eta_init"] == pytest.approx(math.radians(5.0))
    assert cfg["train"]["num_steps"] == 3
    assert cfg["eval"] == {"num_transforms": 4, "num_samples": 32, "elbo_passes": 4}  # M = 32 draws by default
    assert 0.0 <= metrics["test_accuracy_one_draw"] <= 1.0 and metrics["test_nll_one_draw"] > 0
    assert metrics["elbo_stderr"] >= 0
    terms = metrics["elbo_terms"]
    assert terms["expected_loglik"] < 0 and terms["kl"] > 0  # hybrid guide: KL(q(W2, b2) || prior) > 0
    # the bound that set eta against the prediction that ignores the images (-log 10: 20 examples of each class)
    check = metrics["evidence_check"]
    assert check["expected_loglik"] == terms["expected_loglik"]
    assert check["constant_loglik"] == pytest.approx(-math.log(10), abs=1e-12)
    assert check["fits_labels"] is (check["expected_loglik"] > check["constant_loglik"])
    assert ("warning: the bound that set eta fits the training labels no better" in proc.stderr) \
        is (not check["fits_labels"])
    assert cfg["guide"]["kind"] == "hybrid" and cfg["device"] == "cpu"
    data = metrics["data"]
    assert data["train_size"] == 200 and data["test_size"] == 100
    assert data["full_set"] is False and data["source"] == "MNIST"
    assert Path(data["root"]) == data_dir.resolve()

    # the summary printed on stdout is valid JSON with the headline numbers
    summary = json.loads(proc.stdout)
    assert summary["test_accuracy"] == metrics["test_accuracy"]


def test_tiny_training_run_writes_eta_history(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr
    columns, rows = read_history(out / "eta_history.csv")
    assert columns == ["step", *GENERATOR_NAMES]
    assert rows and int(rows[0]["step"]) == 1
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] <= 3
    assert all(float(v) > 0 for r in rows for k, v in r.items() if k != "step")


def test_eta_history_ends_with_the_final_eta(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    _, rows = read_history(out / "eta_history.csv")
    assert [int(r["step"]) for r in rows] == [1, 3]  # step 1, every log_every (10) steps, and the last
    last = {k: float(v) for k, v in rows[-1].items() if k != "step"}
    assert last == pytest.approx(metrics["eta"])


def test_elbo_history_has_the_terms_at_the_logged_steps(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr
    columns, rows = read_history(out / "elbo_history.csv")
    assert columns == ["step", "elbo", "expected_loglik", "kl"]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for r in rows:
        assert float(r["elbo"]) == pytest.approx(float(r["expected_loglik"]) - float(r["kl"]), abs=1e-9)


def test_in_process_run_with_other_options(data_dir, tmp_path):
    """cli() in-process (warnings are errors here): meanfield guide, RFF, inputs mode, logits, fixed rotation eta.

    No ``--threads`` here: it would call torch.set_num_threads in the test process.
    """
    out = tmp_path / "run2"
    rc = cli(tiny_args(
        data_dir, out, "--dataset", "partially-rotated-mnist", "--guide", "meanfield", "--first-layer-prior", "on",
        "--first-layer", "rff",
        "--transform-mode", "inputs", "--averaging", "logits", "--generators", "rotation", "--fixed-eta",
        "--eta-init-deg", "30", "--no-vectorize", "--num-particles", "2", "--no-cosine", "--batch-size", "50",
    ))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    eta = metrics["eta"]
    assert eta["rotate"] == pytest.approx(math.radians(30.0), rel=1e-6)  # fixed: not learned
    assert metrics["evidence_check"] is None  # no bound chose eta, so there is nothing to check
    assert all(eta[n] == 0.0 for n in GENERATOR_NAMES if n != "rotate")  # inactive generators
    assert metrics["config"]["model"]["first_layer"] == "rff"
    assert metrics["config"]["train"]["vectorize_particles"] is False
    _, rows = read_history(out / "eta_history.csv")
    assert rows and all(float(r["rotate"]) == pytest.approx(math.radians(30.0), rel=1e-6) for r in rows)


def test_a_run_on_a_canvas_trains_and_loads_on_images_of_that_size(data_dir, tmp_path):
    out = tmp_path / "canvas"
    assert cli(tiny_args(data_dir, out, "--dataset", "translated-mnist", "--canvas", "36")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["data"]["canvas"] == 36 and metrics["config"]["model"]["image_shape"] == [1, 36, 36]
    model, guide, config = load_model(out)
    assert config.data.image_shape == (1, 36, 36)
    probs = predictive_log_probs(model, guide, torch.zeros(3, 1, 36, 36), num_samples=2).exp()
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(-1), torch.ones(3))


def test_missing_data_dir_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_train("--data-dir", str(missing), "--out", str(tmp_path / "out"), "--no-progress")
    assert_one_line_error(proc, str(missing), "--data-dir")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is visible")
def test_cuda_without_gpu_is_a_one_line_error(tmp_path):
    proc = run_train("--device", "cuda", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress")
    assert_one_line_error(proc, "cuda")


@pytest.mark.cuda
def test_tiny_training_run_on_cuda(data_dir, tmp_path):
    out = tmp_path / "cuda-run"
    proc = run_train(*tiny_args(data_dir, out, "--device", "cuda"))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["device"] == "cuda"
    assert math.isfinite(metrics["test_nll"])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--eval-transforms", "0"], "--eval-transforms"),
        (["--init-scale", "0"], "--init-scale"),
        (["--hidden", "0"], "hidden must be a positive integer"),
        (["--num-steps", "0"], "num_steps must be a positive integer"),
        (["--train-size", "0"], "train_size must be a positive integer"),
        (["--canvas", "20"], "canvas must be at least the images' size, 28 px"),
    ],
)
def test_invalid_values_are_one_line_errors_in_process(tmp_path, capsys, extra, needle):
    rc = cli(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress", *extra])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_unknown_generator_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["--out", str(tmp_path), "--generators", "rotate,zoom"])
    assert info.value.code == 2
    assert "unknown generator(s) ['zoom']" in capsys.readouterr().err


def test_max_shift_is_unbounded_by_default_bounded_by_the_recommended_setting_and_none_turns_it_off(capsys):
    from inference import extents, train

    assert train.build_parser().parse_args([]).max_shift is None  # the paper's model
    assert extents.build_parser().parse_args([]).max_shift == 1.0  # the recommended setting for relaxed invariance
    assert extents.build_parser().parse_args(["--max-shift", "none"]).max_shift is None
    assert train.build_parser().parse_args(["--max-shift", "0.5"]).max_shift == 0.5
    for bad in ("0", "-1", "inf", "wide"):
        with pytest.raises(SystemExit):
            train.build_parser().parse_args(["--max-shift", bad])
        assert "expected a positive number or 'none'" in capsys.readouterr().err
