"""Checkpoints: atomic files, integrity, keep-N, fingerprints; fit's resume, determinism and NaN detection."""

from __future__ import annotations

import hashlib
import math
import os
import signal
from pathlib import Path

import pyro
import pytest
import torch

from guides import make_guide
from inference.checkpoint import (
    Checkpoint,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    check_compatible,
    checkpoint_path,
    config_fingerprint,
    digest_path,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from inference.data import Split
from inference.optim import named_params
from inference.state import CheckpointPolicy, get_rng_state, set_rng_state
from inference.stopping import NonFiniteError, TrainingInterrupted
from inference.svi import FitResult, TrainConfig, fit, minibatches
from models import InvariantNet, ModelConfig

IMAGE = (1, 5, 5)
N = 12
TOL = 1e-6  # the acceptance tolerance; on the CPU resumption is in fact bit-exact


# --------------------------------------------------------------------------- helpers
def build(kind: str = "hybrid", seed: int = 0, **model_overrides) -> tuple[InvariantNet, object, Split]:
    """A fresh tiny model, guide and data set, built the way a fresh run builds them."""
    pyro.set_rng_seed(seed)
    kwargs = dict(image_shape=IMAGE, hidden=8, num_transforms=2)
    kwargs.update(model_overrides)
    model = InvariantNet(ModelConfig(**kwargs), num_data=N)
    guide = make_guide(model, kind)
    gen = torch.Generator().manual_seed(1)
    data = Split(torch.rand(N, *IMAGE, generator=gen), torch.arange(N) % 10)
    return model, guide, data


def params_now(*modules) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in named_params(*modules).items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_run(result: FitResult, reference: FitResult) -> None:
    assert len(result.losses) == len(reference.losses)
    assert result.losses == pytest.approx(reference.losses, abs=TOL, rel=0)
    assert [r["step"] for r in result.eta_history] == [r["step"] for r in reference.eta_history]
    for got, want in zip(result.eta_history, reference.eta_history, strict=True):
        assert got == pytest.approx(want, abs=TOL, rel=0)
    assert [r["step"] for r in result.elbo_history] == [r["step"] for r in reference.eta_history]
    for got, want in zip(result.elbo_history, reference.elbo_history, strict=True):
        assert got == pytest.approx(want, abs=TOL, rel=0)


CFG = TrainConfig(num_steps=10, batch_size=5, num_particles=2, log_every=2)


def interrupt_at(step_to_stop: int):
    """A callback that presses Ctrl-C (a real SIGINT) at the end of ``step_to_stop``."""

    def callback(step: int, loss: float) -> None:
        if step == step_to_stop:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "fit's handler is not in place"
            os.kill(os.getpid(), signal.SIGINT)

    return callback


class HardKill(Exception):
    """Stands for SIGKILL / a crash: fit gets no chance to save."""


def crash_at(step_to_stop: int):
    def callback(step: int, loss: float) -> None:
        if step == step_to_stop:
            raise HardKill

    return callback


# --------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    state = {"step": 3, "w": torch.arange(6.0).reshape(2, 3), "nested": {"t": (1, 2.5, "x", None)}}
    path = save_checkpoint(tmp_path, 3, state, {"model": {"hidden": 8}})
    assert path == checkpoint_path(tmp_path, 3) == tmp_path / "step-00000003.pt"
    plain = torch.load(path, weights_only=True)  # a plain dict, no custom format
    assert plain["step"] == 3 and torch.equal(plain["state"]["w"], state["w"])
    assert digest_path(path).read_text() == hashlib.sha256(path.read_bytes()).hexdigest()
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.path == path
    assert ckpt.config == {"model": {"hidden": 8}}
    assert ckpt.fingerprint == config_fingerprint({"model": {"hidden": 8}})
    assert torch.equal(ckpt.state["w"], state["w"]) and ckpt.state["nested"] == state["nested"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003.pt", "step-00000003.pt.sha256"]  # no temp


def test_keep_last_n_and_stale_later_steps_removed(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, {"step": step}, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    save_checkpoint(tmp_path, 3, {"step": 3}, {}, keep=2)  # a resumed run is back at step 3
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        save_checkpoint(tmp_path, 4, {}, {}, keep=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign", "renamed", "no-checksum"])
def test_damaged_checkpoint_is_detected_and_the_previous_one_is_used(tmp_path, damage):
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.randn(50)}, {})
    newest = checkpoint_path(tmp_path, 4)
    raw = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        newest.write_bytes(raw[:-40] + bytes([raw[-40] ^ 0xFF]) + raw[-39:])
    elif damage == "empty":
        newest.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"step": 4}, newest)  # a plain torch file, not ours (its checksum no longer matches)
    elif damage == "renamed":  # a valid file (and its checksum) under the wrong name
        newest.write_bytes(checkpoint_path(tmp_path, 2).read_bytes())
        digest_path(newest).write_bytes(digest_path(checkpoint_path(tmp_path, 2)).read_bytes())
    else:  # killed between writing the checkpoint and its checksum
        digest_path(newest).unlink()
    with pytest.raises(CorruptCheckpointError, match=str(newest)):
        load_checkpoint(newest)
    ckpt, skipped = find_latest_valid(tmp_path)
    assert ckpt is not None and ckpt.step == 2
    assert len(skipped) == 1 and str(newest) in str(skipped[0])


def test_no_checkpoint_at_all(tmp_path):
    assert find_latest_valid(tmp_path / "missing") == (None, [])
    (tmp_path / "step-00000001.pt").write_bytes(b"junk")
    ckpt, skipped = find_latest_valid(tmp_path)
    assert ckpt is None and len(skipped) == 1


def test_interrupted_write_leaves_old_file_and_temp_is_cleaned(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"v": 1}, {})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"v": 2}, {})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt", "step-00000001.pt.sha256"]
    (tmp_path / ".step-00000002.pt.abc.tmp").write_bytes(b"half")  # left by a SIGKILL mid-write
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    save_checkpoint(tmp_path, 2, {"v": 2}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt", "step-00000001.pt.sha256",
                                                          "step-00000002.pt", "step-00000002.pt.sha256"]


def test_fingerprint_and_incompatible_config_message(tmp_path):
    config = {"model": {"hidden": 8, "generators": ("rotate",)}, "train": {"lr": 1e-3}}
    assert config_fingerprint(config) == config_fingerprint({"train": {"lr": 1e-3}, "model": dict(config["model"])})
    ckpt = load_checkpoint(save_checkpoint(tmp_path, 1, {}, config))
    check_compatible(ckpt, config)  # same config: fine
    other = {"model": {"hidden": 16, "generators": ["rotate"]}, "train": {"lr": 1e-3}, "device": "cpu"}
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_compatible(ckpt, other)
    message = str(info.value)
    assert "\n" not in message and "incompatible config" in message and str(ckpt.path) in message
    assert "model.hidden: 8 in the checkpoint, 16 now" in message
    assert "device: '<absent>' in the checkpoint, 'cpu' now" in message
    assert "generators" not in message  # tuples and lists are the same JSON


def test_a_setting_written_as_int_or_float_is_the_same_setting(tmp_path):
    """A grid's extent 8 and the same flag typed as 8.0 hash differently but are one run: its checkpoint resumes."""
    ckpt = load_checkpoint(save_checkpoint(tmp_path, 1, {}, {"data": {"translation_px": 8}, "train": {"lr": 1e-3}}))
    same = {"data": {"translation_px": 8.0}, "train": {"lr": 1e-3}}
    assert ckpt.fingerprint != config_fingerprint(same)
    check_compatible(ckpt, same)
    with pytest.raises(IncompatibleCheckpointError, match="data.translation_px: 8 in the checkpoint, 8.5 now"):
        check_compatible(ckpt, {"data": {"translation_px": 8.5}, "train": {"lr": 1e-3}})


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    pyro.set_rng_seed(3)
    state = get_rng_state()
    path = save_checkpoint(tmp_path, 1, {"rng": state}, {})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    set_rng_state(load_checkpoint(path).state["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# --------------------------------------------------------------------------- batch stream
@pytest.mark.parametrize("skip", [0, 1, 2, 3, 7, 11])
def test_minibatch_stream_continues_after_skip(skip):
    whole = minibatches(10, 3, torch.Generator().manual_seed(5))  # 3 batches per epoch
    expected = [next(whole) for _ in range(skip + 6)][skip:]
    resumed = minibatches(10, 3, torch.Generator().manual_seed(5), skip=skip)
    assert all(torch.equal(a, next(resumed)) for a in expected)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("kind", ["hybrid", "normal", "meanfield"])
def test_same_seed_same_trajectory(kind):
    model, guide, data = build(kind)
    first = fit(model, guide, data, CFG, progress=False)
    first_params = params_now(model, guide)
    model, guide, data = build(kind)
    second = fit(model, guide, data, CFG, progress=False)
    assert first.losses == second.losses  # bit-identical on the CPU
    assert first.eta_history == second.eta_history and first.elbo_history == second.elbo_history
    assert max_abs_diff(first_params, params_now(model, guide)) == 0.0
    model, guide, data = build(kind, seed=1)
    assert fit(model, guide, data, CFG, progress=False).losses != first.losses


# --------------------------------------------------------------------------- kill and resume
@pytest.mark.parametrize("kind", ["hybrid", "normal", "meanfield"])
def test_ctrl_c_and_resume_equals_uninterrupted_run(tmp_path, kind, sigint_default):
    model, guide, data = build(kind)
    reference = fit(model, guide, data, CFG, progress=False)
    reference_params, reference_eta = params_now(model, guide), model.eta_effective.detach().clone()

    model, guide, data = build(kind)
    policy = CheckpointPolicy(tmp_path, every=4, keep=2)
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, guide, data, CFG, callback=interrupt_at(6), progress=False, checkpoints=policy)
    assert info.value.step == 6 and info.value.saved
    assert info.value.checkpoint == checkpoint_path(tmp_path, 6)
    assert "interrupted after step 6 of 10; checkpoint saved to" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]

    model, guide, data = build(kind)  # a new process: fresh model, guide (no params yet) and seed
    start, _ = find_latest_valid(tmp_path)
    result = fit(model, guide, data, CFG, progress=False, checkpoints=policy, start=start)
    assert_same_run(result, reference)
    assert max_abs_diff(params_now(model, guide), reference_params) <= TOL
    torch.testing.assert_close(model.eta_effective.detach(), reference_eta, atol=TOL, rtol=0)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 10]  # keep=2, last step always saved


def test_hard_kill_resumes_from_last_interval_checkpoint(tmp_path):
    model, guide, data = build()
    reference = fit(model, guide, data, CFG, progress=False)
    reference_params = params_now(model, guide)

    model, guide, data = build()
    policy = CheckpointPolicy(tmp_path, every=3, keep=5)
    with pytest.raises(HardKill):
        fit(model, guide, data, CFG, callback=crash_at(8), progress=False, checkpoints=policy)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6]  # nothing saved at the crash

    model, guide, data = build()
    start, _ = find_latest_valid(tmp_path)
    assert start.step == 6
    result = fit(model, guide, data, CFG, progress=False, checkpoints=policy, start=start)
    assert_same_run(result, reference)
    assert max_abs_diff(params_now(model, guide), reference_params) <= TOL


def test_truncated_newest_checkpoint_falls_back_and_still_matches(tmp_path):
    model, guide, data = build()
    reference = fit(model, guide, data, CFG, progress=False)
    model, guide, data = build()
    policy = CheckpointPolicy(tmp_path, every=2, keep=3)
    with pytest.raises(HardKill):
        fit(model, guide, data, CFG, callback=crash_at(7), progress=False, checkpoints=policy)
    newest = checkpoint_path(tmp_path, 6)
    newest.write_bytes(newest.read_bytes()[:-100])  # killed while the disk was writing it
    start, skipped = find_latest_valid(tmp_path)
    assert start.step == 4 and len(skipped) == 1
    model, guide, data = build()
    assert_same_run(fit(model, guide, data, CFG, progress=False, checkpoints=policy, start=start), reference)


def test_cosine_learning_rate_continues_after_resume(tmp_path):
    """The scheduler state comes back: the rates after resuming follow the uninterrupted schedule."""
    model, guide, data = build()
    policy = CheckpointPolicy(tmp_path, every=3)
    with pytest.raises(HardKill):
        fit(model, guide, data, CFG, callback=crash_at(4), progress=False, checkpoints=policy)
    start, _ = find_latest_valid(tmp_path)
    scheduler = start.state["optimizer"]["eta"]["scheduler"]
    assert scheduler["last_epoch"] == 3
    expected = 0.5 * CFG.eta_lr * (1 + math.cos(math.pi * 3 / CFG.num_steps))
    assert start.state["optimizer"]["eta"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)
    model, guide, data = build()
    fit(model, guide, data, CFG, progress=False, checkpoints=policy, start=start)
    final, _ = find_latest_valid(tmp_path)
    for state in final.state["optimizer"].values():
        assert state["scheduler"]["last_epoch"] == CFG.num_steps
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_resume_uses_loaded_values_in_lazily_built_guide(tmp_path):
    """Autoguide params do not exist before the first call; resuming must load into them, not re-init."""
    model, guide, data = build("normal")
    policy = CheckpointPolicy(tmp_path, every=5)
    cfg = TrainConfig(num_steps=5, batch_size=5, log_every=1)
    fit(model, guide, data, cfg, progress=False, checkpoints=policy)
    trained = params_now(model, guide)
    model, guide, data = build("normal")
    assert set(named_params(model, guide)) <= {"eta"}  # no guide parameter exists yet
    start, _ = find_latest_valid(tmp_path)
    result = fit(model, guide, data, cfg, progress=False, checkpoints=policy, start=start)  # 0 steps left
    assert len(result.losses) == 5
    assert max_abs_diff(params_now(model, guide), trained) == 0.0
    assert result.eta_history[-1]["rotate"] == pytest.approx(model.eta_effective[2].item(), abs=0)


def test_resume_refuses_another_config(tmp_path):
    model, guide, data = build()
    fit(model, guide, data, TrainConfig(num_steps=2, batch_size=5), progress=False,
        checkpoints=CheckpointPolicy(tmp_path))
    start, _ = find_latest_valid(tmp_path)
    model, guide, data = build()
    with pytest.raises(IncompatibleCheckpointError, match=r"train.batch_size: 5 in the checkpoint, 4 now"):
        fit(model, guide, data, TrainConfig(num_steps=2, batch_size=4), progress=False,
            checkpoints=CheckpointPolicy(tmp_path), start=start)
    # same fingerprint, different guide family: the parameters themselves disagree
    forged = Checkpoint(start.path, start.step, start.fingerprint, start.config, start.state)
    model, guide, data = build("meanfield")
    with pytest.raises(IncompatibleCheckpointError, match="checkpoint parameters do not match"):
        fit(model, guide, data, TrainConfig(num_steps=2, batch_size=5), progress=False,
            checkpoints=CheckpointPolicy(tmp_path), start=forged)


def test_the_callers_config_is_stamped_checked_once_and_on_start_follows(tmp_path):
    """A caller's config (a runner stamps RunConfig.training_dict) is what a checkpoint carries and what a resume
    must match; ``on_start`` runs only once the checkpoint is accepted, with the history so far."""
    cfg, run_a = TrainConfig(num_steps=2, batch_size=5, log_every=1), {"run": {"tag": "a"}}
    model, guide, data = build()
    fit(model, guide, data, cfg, progress=False, checkpoints=CheckpointPolicy(tmp_path, config=run_a))
    start, _ = find_latest_valid(tmp_path)
    assert start.config == run_a and start.fingerprint == config_fingerprint(run_a)
    starts: list[FitResult] = []
    model, guide, data = build()
    with pytest.raises(IncompatibleCheckpointError, match=r"run.tag: 'a' in the checkpoint, 'b' now"):
        fit(model, guide, data, cfg, progress=False, start=start, on_start=starts.append,
            checkpoints=CheckpointPolicy(tmp_path, config={"run": {"tag": "b"}}))
    assert starts == []
    model, guide, data = build()
    fit(model, guide, data, cfg, progress=False, checkpoints=CheckpointPolicy(tmp_path, config=run_a), start=start,
        on_start=starts.append)
    assert len(starts) == 1 and [r["step"] for r in starts[0].eta_history] == [1, 2]


def test_interrupt_without_checkpointing_still_stops_cleanly(sigint_default):
    model, guide, data = build()
    with pytest.raises(TrainingInterrupted, match="no checkpoint was saved") as info:
        fit(model, guide, data, CFG, callback=interrupt_at(2), progress=False)
    assert info.value.step == 2 and info.value.checkpoint is None
    model, guide, data = build()
    with pytest.raises(KeyboardInterrupt):  # still a KeyboardInterrupt for callers that expect one
        fit(model, guide, data, CFG, callback=interrupt_at(1), progress=False)


def test_checkpoint_policy_validation(tmp_path):
    with pytest.raises(ValueError, match="checkpoint every must be an integer >= 0"):
        CheckpointPolicy(tmp_path, every=-1)
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        CheckpointPolicy(tmp_path, keep=0)


# --------------------------------------------------------------------------- NaN / inf
def corrupt_eta_at(model: InvariantNet, step_to_break: int):
    def callback(step: int, loss: float) -> None:
        if step == step_to_break:
            with torch.no_grad():
                named_params(model)["eta"].fill_(float("nan"))

    return callback


@pytest.mark.parametrize("validation", [True, False], ids=["validation-on", "validation-off"])
def test_nan_loss_names_step_and_last_good_checkpoint(tmp_path, validation):
    """With validation on, torch rejects the NaN parameters; with it off the loss is NaN: one clear error."""
    model, guide, data = build()
    policy = CheckpointPolicy(tmp_path, every=2)
    with pyro.validation_enabled(validation), pytest.raises(NonFiniteError) as info:
        if validation:
            fit(model, guide, data, CFG, callback=corrupt_eta_at(model, 3), progress=False, checkpoints=policy)
        else:
            with pytest.warns(UserWarning, match="Encountered NaN"):  # pyro's own warning, then our error
                fit(model, guide, data, CFG, callback=corrupt_eta_at(model, 3), progress=False, checkpoints=policy)
    message = str(info.value)
    kept = checkpoint_path(tmp_path, 2)
    assert info.value.step == 4 and info.value.last_checkpoint == kept
    assert "at step 4" in message and f"the last good checkpoint is kept at {kept}" in message
    assert ("non-finite parameter(s) ['eta']" if validation else "non-finite loss nan") in message
    assert "\n" not in message
    assert isinstance(info.value, FloatingPointError)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    ckpt = load_checkpoint(kept)
    assert all(bool(torch.isfinite(p).all()) for p in ckpt.state["model"].values())


def test_nan_parameters_are_never_checkpointed(tmp_path):
    model, guide, data = build()
    policy = CheckpointPolicy(tmp_path, every=2)
    with pytest.raises(NonFiniteError, match=r"non-finite parameter\(s\) \['eta'\] at step 4") as info:
        fit(model, guide, data, CFG, callback=corrupt_eta_at(model, 4), progress=False, checkpoints=policy)
    assert info.value.last_checkpoint == checkpoint_path(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]


def test_nan_without_checkpoints_says_so():
    model, guide, data = build()
    with pytest.raises(NonFiniteError, match="at step 2; no checkpoint was written before it"):
        fit(model, guide, data, CFG, callback=corrupt_eta_at(model, 1), progress=False)


def test_checkpoint_files_are_plain_state_dicts_loaded_with_weights_only(tmp_path):
    """A checkpoint is a plain dict read by torch.load(weights_only=True): the model's and the guide's
    state_dicts (loadable into fresh modules), the optimiser and schedules, RNGs, history, config."""
    model, guide, data = build(first_layer="rff")
    fit(model, guide, data, TrainConfig(num_steps=2, batch_size=5), progress=False,
        checkpoints=CheckpointPolicy(tmp_path))
    plain = torch.load(checkpoint_path(tmp_path, 2), weights_only=True)
    assert set(plain) == {"step", "fingerprint", "config", "data_sha256", "state"} and plain["step"] == 2
    state = plain["state"]
    assert set(state) == {"step", "num_data", "model", "guides", "optimizer", "rng", "losses", "eta_history",
                          "seconds", "elbo_history"}
    assert set(state["model"]) == set(model.state_dict()) and "W1" in state["model"]  # the RFF buffers are saved
    assert torch.equal(state["model"]["W1"], model.W1)
    (saved_guide,) = state["guides"]
    assert set(saved_guide) == set(guide.state_dict())
    assert set(state["optimizer"]) == set(named_params(model, guide)) and "eta" in state["optimizer"]
    assert plain["config"]["num_data"] == N and plain["config"]["model"]["hidden"] == 8
    fresh = InvariantNet(model.config, num_data=N)  # another seed: other random features until loaded
    assert not torch.equal(fresh.W1, model.W1)
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.W1, model.W1) and torch.equal(fresh.eta_effective, model.eta_effective)
    assert isinstance(load_checkpoint(checkpoint_path(tmp_path, 2)).path, Path)
