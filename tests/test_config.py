"""One run config: JSON round trip, config.json in the run folder, --config re-runs a run exactly, --resume DIR."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from inference.checkpoint import differing_settings, load_checkpoint
from inference.config import CONFIG_FILENAME, EvalConfig, GuideConfig, RunConfig, derive, same_run
from inference.data import DataConfig
from inference.svi import TrainConfig
from inference.train import cli
from models import ModelConfig

SAME = ("eta", "test_accuracy", "test_nll", "test_accuracy_one_draw", "elbo_per_example", "final_train_loss")


def tiny(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "partially-rotated-mnist", "--data-dir", str(data_dir), "--train-size", "40",
            "--test-size", "20", "--hidden", "8", "--num-steps", "6", "--num-transforms", "2", "--eval-transforms",
            "2", "--eval-samples", "2", "--elbo-passes", "1", "--batch-size", "8", "--checkpoint-every", "2",
            "--no-progress", "--out", str(out), *extra]


def test_round_trip_through_json_keeps_every_setting():
    cfg = RunConfig(data=DataConfig(dataset="scaled-mnist", train_size=100, log_scale=0.4),
                    model=ModelConfig(hidden=8, generators=("rotate", "scale"), eta_prior="uniform"),
                    guide=GuideConfig("normal", 0.3, "sample"), train=TrainConfig(num_steps=7, betas=(0.8, 0.99)),
                    eval=EvalConfig(4, 5, 6), device="cuda:1")
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.fingerprint() == cfg.fingerprint()
    other_eval = dataclasses.replace(cfg, eval=EvalConfig(1, 1, 1), device="cuda:0")
    assert other_eval.fingerprint() == cfg.fingerprint()  # evaluation and the GPU index do not train
    assert dataclasses.replace(cfg, train=TrainConfig(num_steps=8)).fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="unknown model setting"):
        RunConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "width": 3}})
    with pytest.raises(ValueError, match="device must be"):
        RunConfig(device="tpu")


def test_the_model_takes_the_images_of_its_dataset():
    """A model for 28 x 28 digits cannot be paired with CIFAR-10; deriving another dataset carries the shape."""
    with pytest.raises(ValueError, match=r"image_shape \(1, 28, 28\) does not fit the images of cifar10"):
        RunConfig(data=DataConfig(dataset="cifar10"))
    cifar = RunConfig(data=DataConfig(dataset="cifar10"), model=ModelConfig(image_shape=(3, 32, 32)))
    back = derive(cifar, data={"dataset": "translated-mnist"})
    assert back.model.image_shape == (1, 28, 28) and back.data.dataset.value == "translated-mnist"
    assert derive(back, data={"dataset": "scaled-cifar10"}, model={"hidden": 8}).model.image_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="does not fit"):  # a shape given with the change is kept, and checked
        derive(back, data={"dataset": "cifar10"}, model={"image_shape": (1, 28, 28)})


def test_a_canvas_sets_the_image_shape_the_model_must_take():
    cfg = derive(RunConfig(), data={"dataset": "translated-mnist", "canvas": 44})
    assert cfg.model.image_shape == (1, 44, 44)
    with pytest.raises(ValueError, match=r"image_shape \(1, 28, 28\) does not fit"):
        RunConfig(data=DataConfig(dataset="translated-mnist", canvas=44))
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_run_made_before_an_option_was_added_is_the_same_run_with_the_option_off():
    """A finished run's saved config lacks settings added since; left at None (off) they change nothing, so grids
    reuse it and its checkpoints resume. Set to something else, they make another run."""
    cfg = RunConfig()
    saved = cfg.to_dict()
    del saved["data"]["canvas"]
    assert same_run(saved, cfg) == []
    assert same_run(saved, derive(cfg, data={"canvas": 32}, model={"image_shape": (1, 32, 32)})) == [
        "data.canvas", "model.image_shape"]
    training = cfg.training_dict()
    del training["data"]["canvas"]
    assert differing_settings(training, cfg.training_dict()) == []


def test_config_json_reruns_a_run_exactly_and_is_the_only_definition(tmp_path, data_dir, capsys):
    first = tmp_path / "first"
    assert cli(tiny(data_dir, first, "--eta-objective", "evidence", "--evidence-schedule", "sequential",
                    "--first-layer-prior", "on")) == 0
    cfg = RunConfig.load(first / CONFIG_FILENAME)
    written = json.loads((first / "metrics.json").read_text())
    assert written["config"] == cfg.to_dict() and cfg.train.eta_objective.value == "evidence"
    again = tmp_path / "again"
    assert cli(["--config", str(first / CONFIG_FILENAME), "--out", str(again), "--no-progress"]) == 0
    rerun = json.loads((again / "metrics.json").read_text())
    for key in SAME:
        assert rerun[key] == written[key], key
    capsys.readouterr()
    assert cli(["--config", str(first), "--out", str(tmp_path / "x"), "--hidden", "16"]) == 2
    assert "--config defines the run: drop --hidden" in capsys.readouterr().err


def test_resume_dir_alone_continues_the_run_its_config_describes(tmp_path, data_dir):
    whole = tmp_path / "whole"
    assert cli(tiny(data_dir, whole)) == 0
    cut = tmp_path / "cut"
    assert cli(tiny(data_dir, cut, "--keep-checkpoints", "5")) == 0
    (cut / "metrics.json").unlink()
    for step in (4, 6):  # as if stopped after step 2
        for suffix in ("", ".sha256"):
            Path(f"{cut / 'checkpoints' / f'step-{step:08d}.pt'}{suffix}").unlink()
    assert cli(["--resume", str(cut), "--no-progress"]) == 0  # no training flags: they come from config.json
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (cut, whole))
    assert got["resumed_from_step"] == 2
    for key in SAME:
        assert got[key] == want[key], key
    ckpt = load_checkpoint(cut / "checkpoints" / "step-00000006.pt")
    assert ckpt.fingerprint == RunConfig.load(cut).fingerprint()  # the resume fingerprint is the config's hash


def test_an_exported_model_predicts_like_the_trained_run_without_its_training_state(tmp_path, data_dir):
    """RUN/model.pt (plain, weights_only) rebuilds the model and guide: the same predictions, under the same
    seed, as the run rebuilt from its newest checkpoint; the caller's random stream is left alone."""
    import pyro
    import torch

    from inference.evaluate import predictive_log_probs
    from inference.run_io import MODEL_FILENAME, load_model, load_run

    run = tmp_path / "run"
    assert cli(tiny(data_dir, run, "--first-layer", "rff")) == 0  # the RFF buffers must travel with the model
    assert set(torch.load(run / MODEL_FILENAME, weights_only=True)) == {"config", "num_data", "model", "guide"}
    pyro.set_rng_seed(5)
    before = torch.rand(3)
    pyro.set_rng_seed(5)
    model, guide, cfg = load_model(run)
    assert torch.equal(torch.rand(3), before) and cfg == RunConfig.load(run)
    reference = load_run(run)
    x = torch.rand(6, 1, 28, 28)
    pyro.set_rng_seed(9)
    got = predictive_log_probs(model, guide, x, num_samples=3)
    pyro.set_rng_seed(9)
    want = predictive_log_probs(reference.model, reference.guide, x, num_samples=3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
