"""Data-parallel SVI on the CPU: the same training run in 1 process against ``--devices N`` gloo processes.

Both train the same work (the same flags: global batch, steps, model) with ``python -m inference.train`` on the
machine's cores (1 process: one thread per core; N processes: the cores split between them), and the table reports
``train_seconds`` of ``metrics.json`` (the training loop only, not data loading, start-up or evaluation), ms per
step, examples per second and the speed-up of N processes over 1. Each repeat is a fresh pair of runs.

Usage::

    python benchmarks/bench_ddp.py --data-dir ../shared/data                      # paper-size model, 2 processes
    python benchmarks/bench_ddp.py --data-dir ../shared/data --hidden 256 --batch-size 512 --repeats 3
    python benchmarks/bench_ddp.py --data-dir ../shared/data --quick             # CI smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.cpu import available_cores  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None, help="data root holding MNIST/raw (default: $INVW_DATA_DIR)")
    p.add_argument("--devices", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--num-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128, help="the global batch of both runs")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--num-transforms", type=int, default=32)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs; the table shows the median")
    p.add_argument("--quick", action="store_true", help="tiny settings (CI smoke test)")
    p.add_argument("--out", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.num_steps, args.batch_size, args.hidden, args.num_transforms, args.train_size = 4, 16, 8, 2, 64
    if args.batch_size % args.devices:
        p.error("--batch-size must be a multiple of --devices")
    return args


def train_seconds(args: argparse.Namespace, out: Path, extra: list[str]) -> float:
    """One training run; its ``train_seconds``."""
    cmd = [sys.executable, "-m", "inference.train", "--dataset", "rotated-mnist", "--train-size", str(args.train_size),
           "--test-size", "20", "--hidden", str(args.hidden), "--num-transforms", str(args.num_transforms),
           "--eval-transforms", "2", "--eval-samples", "1", "--elbo-passes", "1", "--num-steps", str(args.num_steps),
           "--batch-size", str(args.batch_size), "--checkpoint-every", "0", "--no-progress", "--out", str(out), *extra]
    if args.data_dir is not None:
        cmd += ["--data-dir", str(args.data_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads((out / "metrics.json").read_text())["train_seconds"])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cores = available_cores()
    modes = {"1 process": ["--threads", str(cores)],
             f"{args.devices} processes": ["--strategy", "ddp", "--devices", str(args.devices)]}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (mode, extra) in enumerate(modes.items()):
                times[mode].append(train_seconds(args, Path(tmp) / f"{r}-{i}", extra))
    load = os.getloadavg()[0]
    print(f"cores {cores}, load average {load:.2f} at the end; {args.num_steps} steps, global batch {args.batch_size}, "
          f"D = {args.hidden}, S = {args.num_transforms}, median of {args.repeats}")
    print(f"{'mode':<14} {'threads':>8} {'train s':>8} {'ms/step':>8} {'examples/s':>11}")
    rows = []
    for mode in modes:
        seconds = statistics.median(times[mode])
        threads = cores if mode == "1 process" else max(1, cores // args.devices)
        rows.append({"mode": mode, "threads_per_process": threads, "train_seconds": seconds,
                     "ms_per_step": 1000 * seconds / args.num_steps,
                     "examples_per_s": args.num_steps * args.batch_size / seconds, "all_seconds": times[mode]})
        print(f"{mode:<14} {threads:>8} {seconds:>8.2f} {rows[-1]['ms_per_step']:>8.1f} "
              f"{rows[-1]['examples_per_s']:>11.0f}")
    print(f"speed-up of {args.devices} processes over 1: {rows[0]['train_seconds'] / rows[1]['train_seconds']:.2f}x")
    if args.out is not None:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "load_average": load, "results": rows},
                                             indent=2))
    return rows


if __name__ == "__main__":
    main()
