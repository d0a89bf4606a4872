"""Data-parallel SVI (``inference/distributed.py``) with 2 gloo processes on tiny settings.

* with the same noise on both ranks and the same global batch, 2-process steps equal single-process steps on the
  concatenated batch (float64, to float tolerance);
* with each rank's own noise, ``fit`` leaves eta and the guide's parameters identical on both ranks;
* ``python -m inference.train --strategy ddp --devices 2``: rank 0 writes the run, and a resumed run ends where the
  uninterrupted one ends.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time

import pyro
import pytest
import torch
import torch.distributed as dist

from guides import make_evidence_guide, make_guide
from inference import launch as launching
from inference.checkpoint import CHECKPOINT_DIRNAME, latest_checkpoint
from inference.data import Split
from inference.distributed import GradientSync, Launch, create_parameters, noise_seed
from inference.optim import named_params, svi_step
from inference.svi import TrainConfig, fit, make_elbo, make_optimizer
from inference.train import cli
from models import InvariantNet, ModelConfig
from tests.conftest import REPO_ROOT

N, B, STEPS, SEED = 32, 8, 3, 3
CFG = TrainConfig(num_steps=STEPS, batch_size=B, seed=SEED, log_every=1)


def tiny_problem(dtype: torch.dtype = torch.float64, first_layer_prior: bool = False
                 ) -> tuple[InvariantNet, object, torch.Tensor, torch.Tensor]:
    """A model (8 units, S = 2, 8 x 8 images), its hybrid guide and N labelled images, all from seed 0."""
    pyro.set_rng_seed(0)
    model = InvariantNet(ModelConfig(image_shape=(1, 8, 8), hidden=8, num_transforms=2,
                                     first_layer_prior=first_layer_prior), num_data=N).to(dtype)
    guide = make_guide(model, "hybrid")
    x = torch.rand(N, 1, 8, 8, dtype=dtype)
    return model, guide, x, torch.arange(N) % 10


def _worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank: STEPS steps with rank 0's noise on its shard of the first global batch, then ``fit`` with its own
    noise; saves its parameters and losses."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model, guide, x, y = tiny_problem()
        sync = GradientSync(rank, world, SEED, same_noise=True)
        optim = sync.optimizer(make_optimizer(CFG))
        sync.start(model, [guide], optim, 0)
        idx = next(sync.shard(iter([torch.arange(B)])))
        losses = []
        for step in range(1, STEPS + 1):
            sync.begin_step(step)
            loss = svi_step(make_elbo(CFG), model, guide, optim, x[idx], y[idx]) / N
            losses.append(sync.after_step(loss, None)[0])
        # a stop signal that reached rank 1 only: both ranks agree to stop on it after the same step
        agreed = [sync.after_step(0.0, None)[1], sync.after_step(0.0, 15 if rank == 1 else None)[1]]
        same = {k: v.detach().clone() for k, v in named_params(model, guide).items()}
        model, guide, x, y = tiny_problem(torch.float32)
        result = fit(model, guide, Split(x, y), CFG, progress=False, sync=GradientSync(rank, world, SEED))
        own = {k: v.detach().clone() for k, v in named_params(model, guide).items()}
        # the sequential evidence schedule: the predicting guide first takes part half-way through
        model, guide, x, y = tiny_problem(torch.float32, first_layer_prior=True)
        evidence = make_evidence_guide(model, "hybrid", predicting_guide=guide)
        create_parameters(model, [guide])
        before = {k: v.detach().clone() for k, v in named_params(guide).items()}
        cfg = dataclasses.replace(CFG, num_steps=2, eta_objective="evidence", evidence_schedule="sequential")
        fit(model, guide, Split(x, y), cfg, progress=False, evidence_guide=evidence, sync=GradientSync(rank, world, 0))
        sequential = {k: v.detach().clone() for k, v in named_params(model, guide, evidence).items()}
        torch.save({"same": same, "losses": losses, "agreed": agreed,
                    "own": own, "fit_losses": result.losses, "sequential": sequential,
                    "predicting_before": before}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What the two gloo ranks of :func:`_worker` saved."""
    out = tmp_path_factory.mktemp("ranks")
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(r, 2, str(out / "init"), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_process_steps_equal_single_process_steps_on_the_concatenated_batch(two_ranks):
    # the gradient averaged over the ranks, each of its shard's loss with the plate's N / (B / 2) scaling and the
    # KL once per rank, is that of N / B sum_(global batch) E log p - KL: the single-process step's
    model, guide, x, y = tiny_problem()
    create_parameters(model, [guide])  # as GradientSync.start does
    optim = make_optimizer(CFG)
    losses = []
    for step in range(1, STEPS + 1):
        pyro.set_rng_seed(noise_seed(SEED, step, 0))  # the noise both ranks drew
        losses.append(svi_step(make_elbo(CFG), model, guide, optim, x[:B], y[:B]) / N)
    single = {k: v.detach() for k, v in named_params(model, guide).items()}
    for rank in two_ranks:
        assert set(rank["same"]) == set(single) and "eta" in single
        for name, value in single.items():
            torch.testing.assert_close(rank["same"][name], value, rtol=1e-9, atol=1e-12, msg=name)
        assert rank["losses"] == pytest.approx(losses, rel=1e-12)


def test_ranks_agree_on_a_stop_signal_that_reached_one_of_them(two_ranks):
    assert [rank["agreed"] for rank in two_ranks] == [[None, 15], [None, 15]]


def test_fit_keeps_parameters_identical_across_ranks(two_ranks):
    first, second = two_ranks
    assert set(first["own"]) == set(second["own"])
    for name, value in first["own"].items():
        assert torch.equal(value, second["own"][name]), name
    assert first["fit_losses"] == second["fit_losses"] and len(first["fit_losses"]) == STEPS
    # each rank drew its own noise: the run differs from the same-noise one
    assert not torch.equal(first["own"]["eta"], first["same"]["eta"].float())
    # the sequential schedule: identical too, the predicting guide trained in its phase only
    assert set(first["sequential"]) == set(second["sequential"])
    for name, value in first["sequential"].items():
        assert torch.equal(value, second["sequential"][name]), name
    moved = [k for k, v in first["predicting_before"].items() if not torch.equal(v, first["sequential"][k])]
    assert moved and first["sequential"].keys() >= first["predicting_before"].keys()


def test_noise_seeds_differ_by_rank_and_step():
    seeds = {noise_seed(0, step, rank) for step in range(1, 50) for rank in range(4)}
    assert len(seeds) == 49 * 4 and all(0 <= s < 2**32 for s in seeds)
    assert noise_seed(1, 1, 0) != noise_seed(0, 1, 0)


def test_shards_split_the_global_batch_in_rank_order():
    batches = [torch.arange(8) * 3]
    parts = [next(GradientSync(r, 4, 0).shard(iter(batches))) for r in range(4)]
    assert torch.equal(torch.cat(parts), batches[0])
    with pytest.raises(ValueError, match="does not split into 3 equal parts"):
        next(GradientSync(0, 3, 0).shard(iter(batches)))


def test_launch_settings_are_checked(capsys, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="need --strategy ddp"):
        Launch(devices=2)
    with pytest.raises(ValueError, match="--devices must be a positive integer"):
        Launch("ddp", devices=0)
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    base = ["--out", str(tmp_path / "run"), "--hidden", "8"]
    assert cli([*base, "--devices", "2"]) == 2
    assert "need --strategy ddp" in capsys.readouterr().err
    assert cli([*base, "--strategy", "ddp", "--devices", "2", "--num-nodes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "MASTER_ADDR, MASTER_PORT, NODE_RANK" in err
    envs = launching.rank_environments(Launch("ddp", 2, 2), {"MASTER_ADDR": "node0", "MASTER_PORT": "29500",
                                                               "NODE_RANK": "1"})
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("2", "0", "4"), ("3", "1", "4")]
    assert not (tmp_path / "run").exists()


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inference.train", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ddp_cli_writes_the_run_from_rank_0_and_resumes_exactly(tmp_path, data_dir):
    tiny = ["--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--train-size", "64", "--test-size", "20",
            "--hidden", "8", "--num-transforms", "2", "--eval-transforms", "2", "--eval-samples", "2",
            "--elbo-passes", "1", "--num-steps", "6", "--batch-size", "16", "--checkpoint-every", "3", "--no-progress",
            "--strategy", "ddp", "--devices", "2"]
    whole = tmp_path / "whole"
    proc = run_train(*tiny, "--out", str(whole))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"test_accuracy"') == 1  # one summary: rank 0's
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["distributed"] == {"strategy": "ddp", "world_size": 2, "backend": "gloo"}
    # a run stopped after step 3: its folder as the checkpoint at step 3 left it
    part = tmp_path / "part"
    (part / CHECKPOINT_DIRNAME).mkdir(parents=True)
    shutil.copy(whole / "config.json", part / "config.json")
    for f in (whole / CHECKPOINT_DIRNAME).glob("step-*3.pt*"):
        shutil.copy(f, part / CHECKPOINT_DIRNAME / f.name)
    proc = run_train("--resume", str(part), "--strategy", "ddp", "--devices", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "(step 3)" in proc.stderr
    ends = [latest_checkpoint(run / CHECKPOINT_DIRNAME)[0] for run in (whole, part)]
    assert [c.step for c in ends] == [6, 6]
    assert ends[0].state["losses"] == ends[1].state["losses"]
    for a, b in zip(ends[0].state["guides"] + [ends[0].state["model"]],
                    ends[1].state["guides"] + [ends[1].state["model"]], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "metrics.json").read_text())["eta"] == metrics["eta"]


def test_sigterm_to_the_launcher_stops_every_rank_after_one_step_with_rank_0s_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "inference.train", "--dataset", "rotated-mnist", "--data-dir", str(data_dir),
           "--train-size", "64", "--test-size", "20", "--hidden", "8", "--num-transforms", "2", "--num-steps", "5000",
           "--batch-size", "16", "--checkpoint-every", "0", "--no-progress", "--threads", "1", "--out", str(out),
           "--strategy", "ddp", "--devices", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = out / "eta_history.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) > 2:  # training is under way
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.count("interrupted by SIGTERM after step") == 1, stderr  # rank 0 alone reports it
    step = int(stderr.split("interrupted by SIGTERM after step ")[1].split()[0])
    checkpoint, _ = latest_checkpoint(out / CHECKPOINT_DIRNAME)
    assert 0 < checkpoint.step == step < 5000 and len(checkpoint.state["losses"]) == step
    assert f"--resume {out} --strategy ddp --devices 2" in stderr and not (out / "metrics.json").exists()


@pytest.mark.cuda
def test_ddp_on_cuda_runs_one_nccl_process_per_gpu(tmp_path, data_dir):
    gpus = min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    proc = run_train("--dataset", "rotated-mnist", "--data-dir", str(data_dir), "--train-size", "64", "--test-size",
                     "20", "--hidden", "8", "--num-transforms", "2", "--eval-transforms", "2", "--num-steps", "4",
                     "--batch-size", "16", "--no-progress", "--device", "cuda", "--out", str(out), "--strategy", "ddp",
                     "--devices", str(gpus))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"] == {"strategy": "ddp", "world_size": gpus, "backend": "nccl"}
    assert metrics["config"]["device"] == "cuda:0" and all(math.isfinite(v) for v in metrics["eta"].values())
