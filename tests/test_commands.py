"""Grids beyond one machine (``inference/commands.py``): ``compare --print-commands`` and ``compare --collect DIR``."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from inference import commands, compare, train
from inference.commands import COMMANDS_FILENAME
from tests.conftest import REPO_ROOT

TINY = ["--train-size", "60", "--test-size", "20", "--hidden", "8", "--num-steps", "2", "--num-transforms", "2",
        "--eval-transforms", "2", "--eval-samples", "2", "--elbo-passes", "1", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("preset", sorted(compare.PRESETS))
def test_every_run_of_the_presets_is_one_train_command_with_its_exact_config(preset, tmp_path, capsys):
    args = compare.parse_args(["--preset", preset, "--out", str(tmp_path), "--seeds", "0,1", "--print-commands"])
    plan = compare.plan(args)
    lines = commands.print_commands(plan, args)  # raises when flags cannot give back a run's config
    assert lines == capsys.readouterr().out.strip().splitlines()
    assert (tmp_path / COMMANDS_FILENAME).read_text().splitlines() == lines
    parser = train.build_parser()
    folders = {commands.run_folder(tmp_path, label, name, seed): cfg for label, name, seed, cfg in plan}
    assert len(lines) == len(folders)
    for line in lines:
        words = shlex.split(line)
        assert words[1:3] == ["-m", "inference.train"] and words[-1] == "--reuse"
        args = parser.parse_args(words[3:])
        assert train.config_from_args(args) == folders[train.output_dir(args)]


def test_generator_names_that_are_also_presets_stay_single_generators():
    parser = train.build_parser()
    cfg = train.config_from_args(parser.parse_args(["--generators", "scale,"]))
    assert cfg.model.generators == ("scale",)
    assert "scale," in commands.train_flags(cfg, parser)


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_printed_commands_then_collect_give_the_table_compare_makes(tmp_path, data_dir):
    out = tmp_path / "grid"
    grid = ["-m", "inference.compare", "--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--out", str(out),
            "--datasets", "rotated,regular", "--configs", "elbo,ml", *TINY]
    run(*grid, "--print-commands")
    lines = (out / COMMANDS_FILENAME).read_text().splitlines()
    assert len(lines) == 4 and not (out / "comparison.csv").exists()  # nothing trained
    for line in reversed(lines):  # any order, as a scheduler may run them
        run(*shlex.split(line)[1:])
    again = run(*shlex.split(lines[0])[1:])  # a job run twice: the finished run is left as it is
    assert "nothing to do" in again.stderr
    run("-m", "inference.compare", "--collect", str(out))
    collected = {name: (out / name).read_text() for name in ("runs.csv", "comparison.csv", "comparison.md")}
    assert (out / "comparison.png").is_file()
    assert [row.split(",")[:3] for row in collected["runs.csv"].splitlines()[1:]] == [
        ["rotated", "elbo", "0"], ["rotated", "ml", "0"], ["regular", "elbo", "0"], ["regular", "ml", "0"]]
    proc = run(*grid)  # compare itself: reuses the four runs (it checks their settings) and writes its tables
    assert proc.stderr.count("(done, reused)") == 4
    assert {name: (out / name).read_text() for name in collected} == collected


def test_collected_runs_come_in_the_order_of_the_numbers_in_their_names(tmp_path):
    """Without commands.txt (a grid still running, or run by ``compare`` itself) --collect orders the runs by their
    folders with numbers read as numbers, so a sweep reads fixed-5, 45, 135, 175 in tables and figures."""
    names = ["learned", "fixed-175", "fixed-45", "fixed-135", "fixed-5"]
    for name in names:
        for seed in (10, 2):
            folder = tmp_path / "rotated" / name / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text("{}")
    order = [(key[1], key[2]) for key, _, _ in commands.finished_runs(tmp_path)]
    assert order == [(name, seed) for name in ("fixed-5", "fixed-45", "fixed-135", "fixed-175", "learned")
                     for seed in (2, 10)]
