"""inference/history.py: the files a run streams while it trains, and the optional TensorBoard log."""

from __future__ import annotations

import csv
import importlib.util
import math

import pytest

from inference import history
from inference.runner import RunControl
from inference.svi import FitResult
from inference.train import cli as train_cli


class FakeWriter:
    """Stands in for ``torch.utils.tensorboard.SummaryWriter``: records what would be logged."""

    instances: list = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def rows(step: int) -> tuple[dict, dict]:
    return ({"step": step, "rotate": 0.5 * step, "shear": 0.01},
            {"step": step, "elbo": -2.0 + step, "expected_loglik": -1.0, "kl": 1.0 - step})


def test_training_record_streams_both_histories_and_resumes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "require_tensorboard", lambda: FakeWriter)
    FakeWriter.instances.clear()
    before = FitResult(eta_history=[rows(1)[0]], elbo_history=[rows(1)[1]])  # a resumed run's rows
    record = history.TrainingRecord(tmp_path / "eta.csv", tmp_path / "elbo.csv", ["rotate", "shear"],
                                    tmp_path / "tb")
    record.open(before)
    record(*rows(10))
    record.close()
    with open(tmp_path / "elbo.csv", newline="") as f:
        elbo = list(csv.DictReader(f))
    assert [int(r["step"]) for r in elbo] == [1, 10] and float(elbo[1]["kl"]) == -9.0
    with open(tmp_path / "eta.csv", newline="") as f:
        assert [float(r["rotate"]) for r in csv.DictReader(f)] == [0.5, 5.0]
    (writer,) = FakeWriter.instances
    assert writer.purge_step == 2 and writer.closed  # events past the checkpoint's step are purged
    logged = {tag: (value, step) for tag, value, step in writer.scalars}
    assert logged["elbo/elbo"] == (8.0, 10) and logged["elbo/kl"] == (-9.0, 10)
    assert logged["eta/rotate"] == (5.0, 10) and logged["eta/rotate_deg"][0] == pytest.approx(math.degrees(5.0))
    assert set(logged) == {"elbo/elbo", "elbo/expected_loglik", "elbo/kl", "eta/rotate", "eta/shear",
                           "eta/rotate_deg"}


def test_no_tensorboard_files_unless_asked(tmp_path):
    record = history.TrainingRecord(tmp_path / "eta.csv", tmp_path / "elbo.csv", ["rotate", "shear"])
    record.open(FitResult())
    record(*rows(1))
    record.close()
    assert record.tensorboard is None and not (tmp_path / "tb").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_one_line_error_before_training(tmp_path, capsys):
    with pytest.raises(ValueError, match="pip install tensorboard"):
        RunControl(tmp_path, tensorboard=True)
    assert train_cli(["--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nowhere"), "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
