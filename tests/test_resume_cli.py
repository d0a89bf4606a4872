"""The CLI's checkpoints: Ctrl-C, --resume, a killed run, corrupt and incompatible checkpoints, determinism."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import inference.runner as runner_module
from inference.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from inference.train import cli

REPO_ROOT = Path(__file__).resolve().parent.parent
SAME = ("eta", "test_accuracy", "test_nll", "elbo_per_example", "final_train_loss")  # must match across runs
TOL = 1e-6


def args_for(data_dir: Path, *extra: str, steps: int = 12) -> list[str]:
    """A tiny run: 40 training images, hidden 8, S = 2, batches of 8 (5 per epoch), eta logged every 10 steps."""
    return [
        "--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--train-size", "40", "--test-size", "20",
        "--hidden", "8", "--num-steps", str(steps), "--num-transforms", "2", "--eval-transforms", "2",
        "--batch-size", "8", "--checkpoint-every", "4", "--no-progress", *extra,
    ]


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_same_metrics(got: dict, want: dict) -> None:
    for key in SAME:
        assert got[key] == pytest.approx(want[key], abs=TOL, rel=0), key


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """One uninterrupted run (12 steps, checkpoints every 4, all kept) that the other runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli(args_for(data_dir, "--out", str(out), "--keep-checkpoints", "10")) == 0
    return out


def test_reference_run_writes_checkpoints(reference):
    assert [s for s, _ in list_checkpoints(reference / "checkpoints")] == [4, 8, 12]
    assert metrics(reference)["resumed_from_step"] is None
    last = load_checkpoint(checkpoint_path(reference / "checkpoints", 12))
    assert last.config["data"]["train_size"] == 40 and last.config["device"] == "cpu"
    assert last.config["guide"]["kind"] == "hybrid"


def test_same_seed_same_metrics_and_history(reference, data_dir, tmp_path):
    """Determinism on the CPU: a second run with the same seed gives the same eta trajectory and metrics."""
    out = tmp_path / "again"
    assert cli(args_for(data_dir, "--out", str(out))) == 0
    assert_same_metrics(metrics(out), metrics(reference))
    assert (out / "eta_history.csv").read_text() == (reference / "eta_history.csv").read_text()


def test_ctrl_c_then_printed_command_resumes_to_the_same_end(reference, data_dir, tmp_path, capsys, monkeypatch,
                                                            sigint_default):
    out = tmp_path / "run"
    argv = args_for(data_dir, "--out", str(out))
    original_fit = runner_module.fit

    def press_ctrl_c_at_step_5(step, loss):
        if step == 5:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "fit's handler is not in place"
            os.kill(os.getpid(), signal.SIGINT)

    def fit_interrupted_at_step_5(*args, **kwargs):
        return original_fit(*args, callback=press_ctrl_c_at_step_5, **kwargs)

    monkeypatch.setattr(runner_module, "fit", fit_interrupted_at_step_5)
    capsys.readouterr()
    assert cli(argv) == 130
    monkeypatch.undo()
    line = stderr_lines(capsys)[-1]
    saved = checkpoint_path(out / "checkpoints", 5)
    assert line.startswith(f"interrupted after step 5 of 12; checkpoint saved to {saved}; continue with: ")
    assert not (out / "metrics.json").exists()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 5]

    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[1:3] == ["-m", "inference.train"] and command[-2:] == ["--resume", str(out)]
    assert cli(command[3:]) == 0
    assert f"resuming from {saved} (step 5)" in capsys.readouterr().err
    assert_same_metrics(metrics(out), metrics(reference))
    assert metrics(out)["resumed_from_step"] == 5
    assert (out / "eta_history.csv").read_text() == (reference / "eta_history.csv").read_text()


def test_killed_run_with_truncated_checkpoint_resumes_from_the_previous_one(reference, data_dir, tmp_path, capsys):
    """Emulate SIGKILL after step 8 was being written: step 12 never happened, step 8 is cut short,
    metrics.json is missing and eta_history.csv holds rows past the checkpoint. Resume must redo them once."""
    out = tmp_path / "killed"
    shutil.copytree(reference, out)
    (out / "metrics.json").unlink()
    checkpoint_path(out / "checkpoints", 12).unlink()
    cut = checkpoint_path(out / "checkpoints", 8)
    cut.write_bytes(cut.read_bytes()[:1000])
    capsys.readouterr()
    assert cli(args_for(data_dir, "--resume", str(out))) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {cut} is truncated or damaged" in err
    assert f"resuming from {checkpoint_path(out / 'checkpoints', 4)} (step 4)" in err
    assert_same_metrics(metrics(out), metrics(reference))
    history = (out / "eta_history.csv").read_text()
    assert history == (reference / "eta_history.csv").read_text()  # rows continue, no duplicates
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 8, 12]
    assert load_checkpoint(cut).step == 8  # rewritten whole


def test_resume_with_the_data_folder_spelled_or_placed_otherwise(reference, data_dir, tmp_path, capsys):
    """Where the data files live is not part of the run: a resume that names the same data by another path (here a
    symlink, spelled with '..') continues the run and ends where the uninterrupted one ends."""
    out = tmp_path / "moved"
    shutil.copytree(reference, out)
    (out / "metrics.json").unlink()
    checkpoint_path(out / "checkpoints", 12).unlink()
    (tmp_path / "elsewhere").symlink_to(data_dir, target_is_directory=True)
    spelled = tmp_path / "elsewhere" / "MNIST" / ".."
    capsys.readouterr()
    assert cli(args_for(spelled, "--resume", str(out))) == 0, capsys.readouterr().err
    assert f"resuming from {checkpoint_path(out / 'checkpoints', 8)} (step 8)" in capsys.readouterr().err
    assert_same_metrics(metrics(out), metrics(reference))
    assert metrics(out)["config"]["data"]["data_dir"] == str(spelled)


def test_resume_of_a_finished_run_only_evaluates_again(reference, data_dir, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(reference, out)
    assert cli(args_for(data_dir, "--resume", str(out), "--out", str(out))) == 0
    assert_same_metrics(metrics(out), metrics(reference))
    assert metrics(out)["resumed_from_step"] == 12


@pytest.mark.parametrize(
    ("extra", "difference"),
    [
        (["--hidden", "12"], "model.hidden: 8 in the checkpoint, 12 now"),
        (["--seed", "1"], "train.seed: 0 in the checkpoint, 1 now"),
        (["--dataset", "mnist"], "data.dataset: 'rotated-mnist' in the checkpoint, 'mnist' now"),
        (["--guide", "paper"], "guide.kind: 'hybrid' in the checkpoint, 'paper' now"),
    ],
)
def test_incompatible_config_is_refused_in_one_line(reference, data_dir, tmp_path, capsys, extra, difference):
    out = tmp_path / "other"
    shutil.copytree(reference, out)
    before = (out / "eta_history.csv").read_text()
    capsys.readouterr()
    assert cli([*args_for(data_dir, "--resume", str(out)), *extra]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint ") and "incompatible config" in lines[0]
    assert difference in lines[0]
    assert (out / "eta_history.csv").read_text() == before  # nothing in the run directory was touched


def test_resume_without_checkpoints_is_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "checkpoints" / "step-00000004.pt").write_bytes(b"\x00" * 10)
    for run, needle in ((tmp_path / "nothing", "no valid checkpoint in"), (tmp_path / "empty", "1 corrupt")):
        assert cli(args_for(data_dir, "--resume", str(run))) == 2
        lines = stderr_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("error: --resume ") and needle in lines[0], lines


def test_out_and_resume_must_agree(data_dir, tmp_path, capsys):
    assert cli(args_for(data_dir, "--out", str(tmp_path / "a"), "--resume", str(tmp_path / "b"))) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and "name different directories" in lines[0]
    with pytest.raises(SystemExit) as info:
        cli(args_for(data_dir))
    assert info.value.code == 2 and "one of --out DIR or --resume DIR is required" in capsys.readouterr().err


def test_a_run_folder_is_refused_unless_resumed_or_overwritten_and_never_mixed(reference, data_dir, tmp_path, capsys):
    out = tmp_path / "reused"
    shutil.copytree(reference, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli(args_for(data_dir, "--out", str(out), steps=3)) == 2  # without --overwrite: nothing touched
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--overwrite" in lines[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").write_text("mine")  # not a run's file: neither counted nor removed
    assert cli(args_for(data_dir, "--out", str(out), "--overwrite", steps=3)) == 0
    assert "note: removed the earlier run's" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["train"]["num_steps"] == 3 and (out / "notes.txt").read_text() == "mine"
    steps = [int(r.split(",")[0]) for r in (out / "eta_history.csv").read_text().splitlines()[1:]]
    assert max(steps) == 3  # the history is the new run's alone


def test_divergence_names_step_and_kept_checkpoint_in_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "diverged"
    argv = args_for(data_dir, "--out", str(out), "--lr", "1e30", "--eta-lr", "1e30", "--checkpoint-every", "1")
    capsys.readouterr()
    assert cli(argv) == 2
    lines = stderr_lines(capsys)
    kept = checkpoint_path(out / "checkpoints", 1)
    assert lines[-1].startswith("error: non-finite ") and " at step 2; " in lines[-1]
    assert f"the last good checkpoint is kept at {kept}" in lines[-1]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1]


def restore_default_sigint() -> None:
    """In the child: undo an inherited 'ignore SIGINT' (background jobs of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_real_ctrl_c_in_a_subprocess(data_dir, tmp_path):
    """SIGINT to a running ``python -m inference.train``: exit 130, one line, a checkpoint of that step."""
    out = tmp_path / "sigint"
    argv = args_for(data_dir, "--out", str(out), "--threads", "1", steps=1_000_000)
    argv[argv.index("--checkpoint-every") + 1] = "1"
    env = {k: v for k, v in os.environ.items() if k != "INVW_DATA_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "inference.train", *argv], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=restore_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted after step ") and f"--resume {out}" in line
    step = int(line.split("interrupted after step ", 1)[1].split(" ", 1)[0])
    assert f"checkpoint saved to {checkpoint_path(out / 'checkpoints', step)}" in line
    assert load_checkpoint(checkpoint_path(out / "checkpoints", step)).state["step"] == step
