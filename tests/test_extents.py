"""The calibration experiment (learned against true extent): read-out, summary, table, figure, restart."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference import calibration
from inference.config import RunConfig
from models.transforms import ISOTROPIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-size", "100", "--test-size", "50", "--hidden", "8", "--num-steps", "3", "--num-transforms", "2",
        "--eval-transforms", "2", "--elbo-passes", "1", "--checkpoint-every", "0", "--no-progress"]


def eta(**values: float) -> dict[str, float]:
    out = dict.fromkeys(("translate_x", "translate_y", "rotate", "scale_x", "scale_y", "shear"), 0.0)
    out.update(values)
    return out


def test_each_family_reads_its_extent_in_its_own_unit():
    rot, trans, scale = (calibration.FAMILIES[n] for n in ("rotation", "translation", "scale"))
    assert rot.learned(eta(rotate=math.pi / 2, shear=0.2)) == pytest.approx(90.0)
    assert rot.learned(eta(rotate=3 * math.pi)) == pytest.approx(180.0)  # beyond a full turn: every angle, 180 deg
    assert rot.others(eta(rotate=3.0, shear=0.2, scale_x=0.1)) == pytest.approx(0.2)
    # 8 px = 8 / 13.5 normalised units (27 pixel steps span [-1, 1]); the mean of x and y
    assert trans.learned(eta(translate_x=8 / 13.5, translate_y=4 / 13.5)) == pytest.approx(6.0)
    assert trans.learned(eta(translate_x=1.0, translate_y=1.0), image_size=32) == pytest.approx(15.5)  # CIFAR sides
    assert scale.learned(eta(scale_x=0.6, scale_y=0.8, rotate=0.5)) == pytest.approx(0.7)
    assert scale.others(eta(scale_x=0.6, scale_y=0.8, rotate=0.5)) == pytest.approx(0.5)
    iso = dict(zip(ISOTROPIC_NAMES, (0.1, 0.1, 0.2, 0.7, 0.3, 0.0), strict=True))  # the isotropic basis
    assert scale.learned(iso) == pytest.approx(0.7) and scale.others(iso) == pytest.approx(0.3)  # stretch is other


def test_translation_shifts_centred_digits_so_its_truth_is_the_shift(tmp_path):
    """The translation family's cells shift MNIST centred on its class templates, and its a = 0 is those centred
    digits; the uncentred family shifts MNIST as it is and shares a = 0 with rotation and scale."""
    base = calibration.recommended(RunConfig())
    fams = calibration.FAMILIES
    for name, zero, shifted, folder in (("translation", "centred-mnist", "translated-centred-mnist", "centred-mnist"),
                                        ("translation-uncentred", "mnist", "translated-mnist", "untransformed")):
        fam = fams[name]
        assert calibration.cell_config(base, fam, 0, 1).data.dataset == zero
        cfg = calibration.cell_config(base, fam, 4.0, 1)
        assert (cfg.data.dataset, cfg.data.translation_px, cfg.train.seed) == (shifted, 4.0, 1)
        assert calibration.cell_dir(tmp_path, fam, 0, 1) == tmp_path / folder / "seed-1"
        assert calibration.cell_dir(tmp_path, fam, 4.0, 1) == tmp_path / f"{name}-4" / "seed-1"
    assert calibration.cell_dir(tmp_path, fams["rotation"], 0, 1) == tmp_path / "untransformed" / "seed-1"
    assert "translation-uncentred" not in calibration.DEFAULT_FAMILIES


def test_summary_gives_mean_and_std_over_seeds_and_no_ratio_at_zero():
    fam = calibration.FAMILIES["rotation"]
    metrics = {"test_accuracy": 0.9, "test_nll": 0.3, "elbo_per_example": -1.0, "train_seconds": 1.0,
               "config": {"model": {"image_shape": [1, 28, 28]}}}
    rows = [calibration.row(fam, 90.0, s, {"eta": eta(rotate=math.radians(d)), **metrics})
            for s, d in enumerate((80, 100))]
    rows.append(calibration.row(fam, 0.0, 0, {"eta": eta(rotate=math.radians(10)), **metrics}))
    (at90, at0) = calibration.summarise(rows)
    assert at90["learned_extent_mean"] == pytest.approx(90.0) and at90["seeds"] == 2
    assert at90["learned_extent_std"] == pytest.approx(math.sqrt(200))  # sample std of 80 and 100
    assert at90["ratio_mean"] == pytest.approx(1.0)
    assert math.isnan(at0["ratio_mean"]) and at0["learned_extent_mean"] == pytest.approx(10.0)


def test_bad_arguments_are_one_line_errors(tmp_path):
    for flags, message in ((["--families", "shear"], "unknown or no families"),
                           (["--rotation-grid", "-5"], "expected distinct finite numbers >= 0")):
        proc = subprocess.run([sys.executable, "-m", "inference.extents", "--out", str(tmp_path), *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "inference.extents", "--seeds", "0,0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "distinct seeds" in proc.stderr


def test_cli_runs_every_cell_writes_table_and_figure_and_reuses_finished_cells(tmp_path, data_dir):
    out = tmp_path / "ext"
    cmd = [sys.executable, "-m", "inference.extents", "--data-dir", str(data_dir), "--out", str(out), "--seeds", "0,1",
           "--rotation-grid", "0,90", "--translation-grid", "0,4", "--scale-grid", "0.4", *TINY]
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a = 0 is each family's untransformed digits: MNIST for rotation (and scale), MNIST centred on its class
    # templates for translation, whose cells shift those centred digits (the truth of the cell is then the shift)
    assert "(done, reused)" not in proc.stderr
    zero = json.loads((out / "untransformed" / "seed-1" / "metrics.json").read_text())
    assert zero["config"]["data"]["dataset"] == "mnist"
    zero = json.loads((out / "centred-mnist" / "seed-1" / "metrics.json").read_text())
    assert zero["config"]["data"]["dataset"] == "centred-mnist"
    with open(out / "extents.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["family"], float(r["true_extent"]), int(r["seed"])) for r in rows] == [
        ("rotation", 0, 0), ("rotation", 0, 1), ("rotation", 90, 0), ("rotation", 90, 1), ("translation", 0, 0),
        ("translation", 0, 1), ("translation", 4, 0), ("translation", 4, 1), ("scale", 0.4, 0), ("scale", 0.4, 1)]
    cell = json.loads((out / "translation-4" / "seed-1" / "metrics.json").read_text())
    assert cell["config"]["data"]["dataset"] == "translated-centred-mnist"
    assert cell["config"]["data"]["translation_px"] == 4
    assert cell["config"]["seed"] == 1 and cell["config"]["train"]["eta_objective"] == "evidence"
    # the recommended basis: isotropic scale and aspect change in place of scale_x, scale_y
    assert tuple(cell["config"]["model"]["generators"]) == ISOTROPIC_NAMES
    scale_row = next(r for r in rows if r["family"] == "scale")
    assert float(scale_row["learned_extent"]) == pytest.approx(float(scale_row["eta_scale"]))
    assert scale_row["eta_scale_x"] == ""  # not in the run's basis
    assert (out / "extents.png").stat().st_size > 10_000
    md = (out / "extents.md").read_text().splitlines()
    assert len(md) == 2 + 5 and md[2].startswith("| rotation | 0 deg |")  # header, separator, one line per cell
    # a second run trains nothing: every cell is reused (the files keep their times)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/metrics.json")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stderr.count("(done, reused)") == 10
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/metrics.json")} == before
    # --collect trains nothing: the cells of a seed never run are skipped, the table holds the finished ones
    proc = subprocess.run([*cmd, "--collect", "--seeds", "1,2", "--format", "svg"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stderr.count("(not run, skipped)") == 5
    assert not (out / "untransformed" / "seed-2").exists() and not (out / "centred-mnist" / "seed-2").exists()
    assert (out / "extents.svg").read_bytes().startswith(b"<?xml")  # --format: the figure in another format
    # a finished cell made with other settings is never mixed in: one-line error, nothing trained or changed
    proc = subprocess.run([*cmd, "--eta-lr", "0.2"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2 and "other settings (train.eta_lr)" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/metrics.json")} == before
    with open(out / "extents.csv") as f:
        assert [int(r["seed"]) for r in csv.DictReader(f)] == [1, 1, 1, 1, 1]
