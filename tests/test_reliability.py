"""No lost work under signals, reuse, concurrency and extreme arguments (the second reliability pass).

Each test reproduces one way a careless or hostile user (or a scheduler) could lose or mix work, and checks that it
now ends in a one-line error, or in a run that continues to the same end as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inference import compare
from inference.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from inference.config import RunConfig
from inference.diagnose import cli as diagnose_cli
from inference.limits import check_memory, step_bytes
from inference.run_folder import RunFolderError, claim
from inference.train import cli

REPO_ROOT = Path(__file__).resolve().parent.parent
SAME = ("eta", "test_accuracy", "test_nll", "test_accuracy_one_draw", "elbo_per_example", "final_train_loss")


def tiny(data_dir: Path, out: Path, *extra: str, steps: int = 12) -> list[str]:
    """A run of a few seconds: 40 training images, hidden 8, S = 2, checkpoints every 2 steps."""
    return ["--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--train-size", "40", "--test-size", "20",
            "--hidden", "8", "--num-steps", str(steps), "--num-transforms", "2", "--eval-transforms", "2",
            "--eval-samples", "2", "--elbo-passes", "1", "--batch-size", "8", "--checkpoint-every", "2",
            "--no-progress", "--out", str(out), *extra]


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) >= 1 and all("Traceback" not in line for line in lines)
    return lines[-1]


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_same_run(got: Path, want: Path) -> None:
    a, b = read_metrics(got), read_metrics(want)
    for key in SAME:
        assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), key
    assert (got / "eta_history.csv").read_text() == (want / "eta_history.csv").read_text()


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli(tiny(data_dir, out)) == 0
    return out


def start_training(argv: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "INVW_DATA_DIR"}
    return subprocess.Popen([sys.executable, "-m", "inference.train", *argv], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_stop_signals)


def default_stop_signals() -> None:
    """In the child: default dispositions for the stop signals, which a shell's ``&`` (SIGINT) or ``nohup`` (SIGHUP)
    running the suite would otherwise leave ignored, and the training command rightly keeps ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120.0) -> None:
    """Until a checkpoint of at least ``step`` exists (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
        if steps and steps[-1] >= step:
            return
        time.sleep(0.01)


# ------------------------------------------------------------------------- 2. termination signals


LONG = 200  # steps: a few seconds, so that a signal sent after step 1 lands while training runs


@pytest.fixture(scope="module")
def uninterrupted_long(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted-long") / "run"
    assert cli(tiny(data_dir, out, "--threads", "1", "--checkpoint-every", "0", steps=LONG)) == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_after_the_step_with_a_checkpoint_and_resume_to_the_same_end(
        signum, uninterrupted_long, data_dir, tmp_path):
    """With checkpoints only at the end (--checkpoint-every 0), SIGTERM / SIGHUP still save the running step:
    exit 128 + signal, one line, and --resume ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    argv = tiny(data_dir, out, "--threads", "1", steps=LONG)
    argv[argv.index("--checkpoint-every") + 1] = "0"
    proc = start_training(argv)
    try:
        deadline, history = time.monotonic() + 120, out / "eta_history.csv"
        while proc.poll() is None and time.monotonic() < deadline and not (
                history.exists() and len(history.read_text().splitlines()) > 1):
            time.sleep(0.005)  # the training loop runs once the history holds step 1
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and f"interrupted by {signal.Signals(signum).name} after step " in line
    step = int(line.split(" after step ", 1)[1].split(" ", 1)[0])
    assert 0 < step < LONG and f"checkpoint saved to {checkpoint_path(out / 'checkpoints', step)}" in line
    assert cli(["--resume", str(out), "--no-progress", "--threads", "1"]) == 0
    assert_same_run(out, uninterrupted_long)


# ------------------------------------------------------------------------- fault injection: kill -9


def test_kill_9_at_random_steps_then_resume_gives_the_uninterrupted_run(uninterrupted, data_dir, tmp_path):
    """SIGKILL (no handler can run) at three seeded random steps, each time resumed: the final metrics and eta
    history equal the uninterrupted run's. Work since the last checkpoint is redone, never lost or doubled."""
    out, rng = tmp_path / "run", random.Random(15)
    kills = sorted(rng.sample(range(2, 11), 3))
    argv = tiny(data_dir, out, "--threads", "1")
    for k, step in enumerate(kills):
        proc = start_training(argv if k == 0 else ["--resume", str(out), "--no-progress", "--threads", "1"])
        try:
            wait_for_checkpoint(proc, out, step)
        finally:
            proc.kill()
            proc.communicate()
        assert not (out / "metrics.json").exists() or proc.returncode == 0
    assert cli(["--resume", str(out), "--no-progress"]) == 0
    assert_same_run(out, uninterrupted)


# ------------------------------------------------------------------------- 3, 4, 9. the run folder


def test_a_second_process_cannot_write_a_run_folder_in_use(data_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    with claim(out):  # as a training process holds it
        assert cli(tiny(data_dir, out)) == 2
        assert "in use by another run" in error_line(capsys)
        with pytest.raises(RunFolderError, match="in use"):
            with claim(out, resume=True):
                pass
    assert not out.exists()  # the folder it created, left empty, is removed again


def test_a_killed_process_releases_its_folder(tmp_path):
    """The lock is the kernel's: a process killed while holding it leaves nothing to clean up."""
    out = tmp_path / "held"
    code = f"from inference.run_folder import claim\nwith claim({str(out)!r}):\n    print('held', flush=True)\n" \
           "    import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match="in use"), claim(out):
            pass
    finally:
        proc.kill()
        proc.communicate()
    with claim(out) as held:
        assert held == out


@pytest.mark.parametrize("flag", ["--out", "--resume"])
def test_an_empty_out_is_refused_not_the_current_directory(flag, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = tiny(data_dir, tmp_path / "unused")
    argv[argv.index("--out") :] = [flag, ""]
    assert cli(argv) == 2
    assert "must name a directory" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- 1. size-like arguments


@pytest.mark.parametrize(("extra", "message"), [
    (["--first-layer", "rff", "--rff-blur", "1e9"], "rff_blur must be between 0 and the image's size"),
    (["--threads", "100000"], "--threads 100000 is more than"),
    (["--hidden", "100000000"], "lower --hidden"),
    (["--num-transforms", "10000000"], "lower --hidden, --num-transforms"),
    (["--eval-samples", "1000000000000"], "--eval-samples"),
])
def test_size_like_arguments_are_bounded_before_anything_is_allocated(extra, message, data_dir, tmp_path, capsys):
    out = tmp_path / "huge"
    assert cli(tiny(data_dir, out, *extra)) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_the_memory_estimate_grows_with_every_size_and_passes_the_paper_size():
    base = RunConfig()
    need = step_bytes(base, 4000, 1000)
    assert 0.1 * 2**30 < need < 4 * 2**30  # the paper's network on the subset: a fraction of a laptop's memory
    for section, field in (("model", "hidden"), ("model", "num_transforms"), ("train", "num_particles")):
        bigger = RunConfig(**{**base.__dict__, section: type(getattr(base, section))(
            **{**getattr(base, section).__dict__, field: 2 * getattr(getattr(base, section), field)})})
        assert step_bytes(bigger, 4000, 1000) > need, field
    check_memory(base, 4000, 1000, available=8 * 2**30)
    with pytest.raises(ValueError, match="needs about"):
        check_memory(base, 4000, 1000, available=2**20)


# ------------------------------------------------------------------------- 5. diagnose an unfinished run


def test_diagnose_refuses_an_unfinished_run(uninterrupted, data_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(uninterrupted, run)
    for step in (12, 10):  # as if stopped after step 8 of a rerun with the old metrics.json still there
        path = checkpoint_path(run / "checkpoints", step)
        for file in (path, Path(f"{path}.sha256")):
            file.unlink(missing_ok=True)
    assert diagnose_cli([str(run), "--data-dir", str(data_dir)]) == 2
    line = error_line(capsys)
    assert "is unfinished" in line and "step 8 of 12" in line and f"--resume {run}" in line
    (run / "metrics.json").unlink()
    assert diagnose_cli([str(run), "--data-dir", str(data_dir)]) == 2
    assert "is an unfinished run (newest checkpoint: step 8)" in error_line(capsys)


# ------------------------------------------------------------------------- 8. resume at a lower learning rate


def test_the_divergence_message_offers_a_resume_at_lower_learning_rates_that_is_accepted(data_dir, tmp_path, capsys):
    out = tmp_path / "diverged"
    assert cli(tiny(data_dir, out, "--lr", "1e30", "--eta-lr", "1e30", "--checkpoint-every", "1")) == 2
    line = error_line(capsys)
    assert "non-finite" in line and "e.g.: python" in line
    suggested = line.split("e.g.: ", 1)[1].split()
    assert suggested[1:4] == ["-m", "inference.train", "--resume"] and suggested[suggested.index("--lr") + 1] == "5e+29"
    assert cli(suggested[3:] + ["--no-progress"]) == 2  # accepted: it resumes (and, at 5e29, diverges again)
    line = error_line(capsys)
    assert "non-finite" in line and "incompatible" not in line


def test_resume_may_change_the_learning_rates_and_nothing_else(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny(data_dir, out, steps=6)) == 0
    for step in (6, 4):
        checkpoint_path(out / "checkpoints", step).unlink()
    assert cli(["--resume", str(out), "--hidden", "16", "--no-progress"]) == 2  # not an optimiser setting
    assert "incompatible config" in error_line(capsys)
    assert cli(["--resume", str(out), "--lr", "1e-3", "--eta-lr", "1e-2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: resuming with changed optimiser settings (" in err and "train.lr 0.005 -> 0.001" in err
    saved = RunConfig.load(out)
    assert saved.train.lr == 1e-3 and saved.train.eta_lr == 1e-2  # config.json says what the run now is
    assert read_metrics(out)["config"]["train"]["lr"] == 1e-3 and read_metrics(out)["resumed_from_step"] == 2


def test_a_changed_learning_rate_rescales_the_schedule_from_the_same_step():
    from inference.optim import ParamAdam

    p = torch.zeros(3, requires_grad=True)
    optim = ParamAdam(lambda name: 0.1, num_steps=10)
    for _ in range(4):
        p.grad = torch.ones(3)
        optim.step({"p": p})
        optim.schedule_step()
    before = optim.lr("p")
    half = ParamAdam(lambda name: 0.05, num_steps=10)
    half.load_state_dict(optim.state_dict(), {"p": p})
    assert half.lr("p") == pytest.approx(before / 2)
    for o in (optim, half):
        o.schedule_step()
    assert half.lr("p") == pytest.approx(optim.lr("p") / 2)


# ------------------------------------------------------------------------- 10. the data's content


def test_resume_checks_the_data_content_not_its_path(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny(data_dir, out, steps=6)
    assert cli(argv) == 0
    for step in (6, 4):
        checkpoint_path(out / "checkpoints", step).unlink()
    link = tmp_path / "linked"
    link.symlink_to(data_dir, target_is_directory=True)
    assert cli(tiny(link, out, "--resume", str(out), steps=6)) == 0  # the same data through a link
    changed = tmp_path / "changed" / "MNIST" / "raw"
    changed.mkdir(parents=True)
    for f in (Path(data_dir) / "MNIST" / "raw").iterdir():
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        if f.name.startswith("train-images"):  # the same files, other digits: every pixel inverted
            data = data[:16] + bytes(255 - b for b in data[16:])
        (changed / f.name).write_bytes(gzip.compress(data) if f.suffix == ".gz" else data)
    for step in (6, 4):
        checkpoint_path(out / "checkpoints", step).unlink(missing_ok=True)
    assert cli(tiny(tmp_path / "changed", out, "--resume", str(out), steps=6)) == 2
    assert "trained on other data" in error_line(capsys)


# ------------------------------------------------------------------------- 11. damaged files with valid checksums


def test_a_checkpoint_with_a_valid_checksum_but_missing_keys_is_skipped_in_one_line(uninterrupted, data_dir,
                                                                                     tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "metrics.json").unlink()
    newest = load_checkpoint(checkpoint_path(run / "checkpoints", 12))
    state = {k: v for k, v in newest.state.items() if k != "optimizer"}
    save_checkpoint(run / "checkpoints", 12, state, newest.config, keep=3, data_sha256=newest.data_sha256)
    assert cli(["--resume", str(run), "--no-progress"]) == 2
    line = error_line(capsys)
    assert "lacks ['optimizer']" in line


def test_a_malformed_eta_history_is_a_one_line_error(uninterrupted, data_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "eta_history.csv").write_text("step,rotate\n1,abc\n")
    assert diagnose_cli([str(run), "--data-dir", str(data_dir), "--out", str(tmp_path / "diag")]) == 2
    line = error_line(capsys)
    assert "is not a readable eta history" in line or "lacks the column" in line


# ------------------------------------------------------------------------- 7. metrics.json is written atomically


def test_a_failed_metrics_write_leaves_no_partial_file(data_dir, tmp_path, monkeypatch):
    import inference.checkpoint as checkpoint_module

    out = tmp_path / "full-disk"
    real = os.fsync

    def disk_full_on_metrics(fd):
        if "metrics.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", disk_full_on_metrics)
    assert cli(tiny(data_dir, out, steps=2)) == 2
    assert not (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".metrics.json")]


# ------------------------------------------------------------------------- 12. an unwritable home


def test_diagnostics_import_where_the_home_cache_cannot_be_written(tmp_path):
    home = tmp_path / "not-a-dir"
    home.write_text("a file where the home folder should be")
    env = {**os.environ, "HOME": str(home), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    env.pop("XDG_CACHE_HOME", None)
    done = subprocess.run([sys.executable, "-c", "import inference.diagnostics as d; print(d.az.__name__)"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "arviz", done.stderr


# ------------------------------------------------------------------------- 6. compare


@pytest.mark.parametrize(("extra", "message"), [
    (["--configs", "elbo,elbo"], "more than once"),
    (["--sweep-deg", "5,abc"], None),
    (["--resume", "somewhere"], "a grid resumes by itself"),
])
def test_compare_refuses_bad_plans_before_training(extra, message, data_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [*tiny(data_dir, out, steps=2)[:-2], "--out", str(out), *extra]
    if message is None:
        with pytest.raises(SystemExit) as exit_:
            compare.cli(argv)
        assert exit_.value.code == 2 and "expected a comma list of numbers" in capsys.readouterr().err
        return
    assert compare.cli(argv) == 2
    assert message in error_line(capsys)
    assert not list(out.rglob("metrics.json"))


def test_compare_finishes_the_other_runs_when_one_diverges(data_dir, tmp_path, capsys):
    """Two configurations, one of which diverges: the other finishes and is tabled, the failure is one line."""
    out = tmp_path / "grid"
    argv = [*tiny(data_dir, out, "--lr", "1e30", "--eta-lr", "1e30", steps=3)[:-2], "--out", str(out),
            "--configs", "elbo,ml"]
    assert compare.cli(argv) == 2
    line = error_line(capsys)
    assert "runs failed" in line and "non-finite" in line


def test_a_run_that_diverges_in_a_grid_worker_is_reported_and_the_other_runs_finish(data_dir, tmp_path, capsys):
    """With ``--jobs 2``: a divergence crosses from the worker process to the grid (pickled), which lists it as a
    failed run and goes on with the others, instead of losing its process pool."""
    out = tmp_path / "grid"
    argv = [*tiny(data_dir, out, "--lr", "1e30", "--eta-lr", "1e30", steps=3)[:-2], "--out", str(out),
            "--configs", "elbo,ml", "--seeds", "0,1", "--jobs", "2"]
    assert compare.cli(argv) == 2
    line = error_line(capsys)
    assert "4 runs failed" in line and "non-finite" in line, line


def test_ctrl_c_in_compare_is_one_line_and_the_same_command_continues(data_dir, tmp_path, capsys, monkeypatch):
    import inference.runner as runner_module

    out = tmp_path / "grid"
    argv = [*tiny(data_dir, out, steps=4)[:-2], "--out", str(out), "--configs", "elbo,map"]
    real = runner_module.run
    calls = []

    def interrupted_second(cfg, control):
        calls.append(control.out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, control)

    monkeypatch.setattr(runner_module, "run", interrupted_second)
    assert compare.cli(argv) == 130
    assert "run the same command again to continue" in error_line(capsys)
    monkeypatch.setattr(runner_module, "run", real)
    assert compare.cli(argv) == 0
    assert "(done, reused)" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_grid_workers_stop_with_a_stopped_grid_and_keep_a_checkpoint(signum, data_dir, tmp_path):
    """``kill -9`` or SIGTERM to a ``compare --jobs 2`` process: its two workers stop (after their step, with a
    checkpoint) instead of training on, orphaned; SIGTERM is passed on and the grid exits 143 once they are done."""
    out = tmp_path / "grid"
    argv = [*tiny(data_dir, out, "--checkpoint-every", "1", steps=100_000)[:-2], "--out", str(out),
            "--configs", "elbo,map", "--jobs", "2"]
    env = {k: v for k, v in os.environ.items() if k != "INVW_DATA_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "inference.compare", *argv], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = [out / name / "seed-0" for name in ("elbo", "map")]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(list_checkpoints(r / "checkpoints") for r in runs):
            time.sleep(0.05)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"],
                                                  capture_output=True, text=True).stdout.split()]
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(workers) == 2 and code == (-9 if signum == signal.SIGKILL else 128 + signum)

    def running(pid: int) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(running(pid) for pid in workers):
        time.sleep(0.05)
    assert not any(running(pid) for pid in workers)
    assert all(list_checkpoints(r / "checkpoints") for r in runs)
