"""The Python API against the command line: seconds per SVI step of the same training run.

A notebook trains through the library (``InvariantNet``, ``make_guide``, ``inference.svi.fit``); the command
line through ``python -m inference.train``. Both must run a step equally fast without the notebook calling
anything extra (CPU threads, allocator). Each side runs in a fresh interpreter, as a user would start it:

api
    a subprocess that builds the model and guide the way notebook 01 does and calls ``fit`` (nothing else);
cli
    ``python -m inference.train`` with the same settings (``--checkpoint-every 0``, one evaluation draw).

Both sides report the training seconds of ``fit`` (``FitResult.seconds``; ``train_seconds`` in the CLI's
``metrics.json``) over the same steps on the same data; the table prints seconds per step, the ratio api / cli
and the spread over ``--repeats`` alternating repeats. Examples::

    python benchmarks/bench_api.py --data-dir ../shared/data            # the paper size, ~2 minutes on 2 cores
    python benchmarks/bench_api.py --data-dir ../shared/data --quick    # CI smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

API_SCRIPT = """
import json, sys
import pyro
from guides import make_guide
from inference.data import DataConfig, load_datasets
from inference.svi import TrainConfig, fit
from models import InvariantNet, ModelConfig

s = json.loads(sys.argv[1])
pyro.set_rng_seed(0)
data = load_datasets(DataConfig(dataset="rotated-mnist", data_dir=s["data_dir"], train_size=s["train_size"],
                                test_size=s["test_size"]))
model = InvariantNet(ModelConfig(hidden=s["hidden"], num_transforms=s["num_transforms"], first_layer_prior=False),
                     num_data=len(data.train))
guide = make_guide(model, "hybrid")
result = fit(model, guide, data.train, TrainConfig(num_steps=s["steps"], batch_size=s["batch_size"]), progress=False)
print(json.dumps({"seconds": result.seconds}))
"""


def _api(settings: dict) -> float:
    out = subprocess.run([sys.executable, "-c", API_SCRIPT, json.dumps(settings)], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def _cli(settings: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "inference.train", "--dataset", "rotated-mnist", "--data-dir",
               settings["data_dir"], "--hidden", str(settings["hidden"]), "--num-transforms",
               str(settings["num_transforms"]), "--num-steps", str(settings["steps"]), "--batch-size",
               str(settings["batch_size"]), "--guide", "hybrid", "--checkpoint-every", "0", "--eval-samples", "1",
               "--eval-transforms", "1", "--no-progress", "--out", tmp]
        for flag in ("train_size", "test_size"):
            if settings[flag] is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(settings[flag])]
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, text=True)
        return float(json.loads((Path(tmp) / "metrics.json").read_text())["train_seconds"])


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="data root holding MNIST/raw")
    p.add_argument("--steps", type=int, default=100, help="SVI steps per run (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="alternating api / cli runs of each (default 3)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--num-transforms", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="tiny settings for CI: checks the script, not the speed")
    args = p.parse_args(argv)
    settings = {"data_dir": str(Path(args.data_dir).resolve()), "hidden": args.hidden,
                "num_transforms": args.num_transforms, "steps": args.steps, "batch_size": args.batch_size,
                "train_size": None, "test_size": None}
    repeats = args.repeats
    if args.quick:
        settings.update(hidden=16, num_transforms=2, steps=3, batch_size=16, train_size=64, test_size=32)
        repeats = 1
    times: dict[str, list[float]] = {"api": [], "cli": []}
    for r in range(repeats):
        for name, runner in (("api", _api), ("cli", _cli)):
            seconds = runner(settings) / settings["steps"]
            times[name].append(seconds)
            print(f"repeat {r + 1}/{repeats} {name}: {1000 * seconds:.1f} ms/step", file=sys.stderr)
    api, cli = statistics.median(times["api"]), statistics.median(times["cli"])
    print(f"D = {settings['hidden']}, S = {settings['num_transforms']}, B = {settings['batch_size']}, "
          f"{settings['steps']} steps, {repeats} repeat(s), median")
    print("| path | ms / step (median) | min | max |\n| --- | --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} | {1000 * min(values):.1f} | "
              f"{1000 * max(values):.1f} |")
    print(f"api / cli = {api / cli:.3f}")
    return times


if __name__ == "__main__":
    main()
