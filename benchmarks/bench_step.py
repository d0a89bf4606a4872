"""Time full SVI steps of the invariant network: weight transforms vs input transforms vs the no-warp floor.

One run prints, for every configuration, the median time of a full ``pyro.infer.SVI`` step (the
project's ``make_elbo`` / ``make_optimizer``, the ``hybrid`` guide, ``first_layer_prior=False``,
MNIST-shaped inputs, or those of ``--dataset`` / ``--image-shape``) in each mode, steps and examples per
second, peak memory, the ratio to the floor, and an epoch estimate (ceil(N / B) steps at the base point, N
the training set of ``--dataset``: 469 steps of batch 128 for MNIST's 60,000 images, 391 for CIFAR-10's 50,000).

Modes (``--modes``)
-------------------
weights
    ``TransformMode.WEIGHTS`` with the default ``WarpImpl.GATHER`` (the fast path).
weights-grid
    ``TransformMode.WEIGHTS`` with ``WarpImpl.GRID_SAMPLE``: ``warp_filters`` (the reference).
inputs
    ``TransformMode.INPUTS``: grid_sample of the S x B input images.
floor
    ``TransformMode.IDENTITY``: the same model, the same P * S forward passes, no warp at all.

Sweeps vary one axis at a time around the base point (``--base-*``; the paper's B = 128,
D = 1024, S = 32, K = 1): batch sizes, hidden units, transforms S and particles K.

Every configuration runs in a fresh subprocess (``--in-process`` to switch that off), so that its
peak resident memory (``ru_maxrss``) can be attributed to it; on CUDA the peak is
``torch.cuda.max_memory_allocated``. Examples::

    python benchmarks/bench_step.py                      # the full CPU table (a few minutes on 2 cores)
    python benchmarks/bench_step.py --quick              # CI smoke test, seconds
    python benchmarks/bench_step.py --device cuda --batch-sizes 32,128,512,1024,4096
    python benchmarks/bench_step.py --dataset cifar10 --batch-sizes 128 --particles 1   # 3 x 32 x 32 inputs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

MODES: dict[str, dict[str, str]] = {
    "weights": {"transform_mode": "weights", "warp_impl": "gather"},
    "weights-grid": {"transform_mode": "weights", "warp_impl": "grid_sample"},
    "inputs": {"transform_mode": "inputs"},
    "floor": {"transform_mode": "identity"},
}
EPOCH_EXAMPLES = 60_000  # one MNIST epoch (the default shapes): ceil(60000 / 128) = 469 steps


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _image_shape(text: str) -> tuple[int, int, int]:
    values = _ints(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W, got {text!r}")
    return (values[0], values[1], values[2])


def _modes(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(MODES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    return names


def default_threads() -> int:
    """One thread per CPU this process may run on (2 on the CI machines)."""
    from inference.cpu import available_cores

    return available_cores()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dataset", default=None, help="time steps on this dataset's image shape (e.g. cifar10: "
                   "3 x 32 x 32) and estimate its epoch (default: MNIST's 1 x 28 x 28 and 60,000 images)")
    p.add_argument("--image-shape", type=_image_shape, default=None, metavar="C,H,W",
                   help="input shape (overrides --dataset's; default 1,28,28)")
    p.add_argument("--quick", action="store_true", help="CI smoke setting: tiny sizes, in-process, seconds")
    p.add_argument("--modes", type=_modes, default=["weights", "inputs", "floor"], help=f"any of {list(MODES)}")
    p.add_argument("--batch-sizes", type=_ints, default=[32, 64, 128, 256, 512, 1024], help="batch-size sweep")
    p.add_argument("--hidden", type=_ints, default=[1024], help="hidden-unit sweep (D)")
    p.add_argument("--transforms", type=_ints, default=[32], help="transformation-sample sweep (S)")
    p.add_argument("--particles", type=_ints, default=[1, 4], help="particle sweep (K)")
    p.add_argument("--base-batch", type=int, default=128, help="B of the hidden / S / K sweeps")
    p.add_argument("--base-hidden", type=int, default=1024, help="D of the batch / S / K sweeps")
    p.add_argument("--base-transforms", type=int, default=32, help="S of the batch / hidden / K sweeps")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (guide initialisation, caches)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: one per available core; 1 with --quick)")
    p.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's allocator as it is (default: inference.cpu.keep_freed_memory)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration as JSON
    return p


def configurations(args: argparse.Namespace) -> list[dict]:
    """(mode, B, D, S, K) points: every sweep around the base point, without duplicates, in order."""
    B0, D0, S0 = args.base_batch, args.base_hidden, args.base_transforms
    points: list[tuple[int, int, int, int]] = [(b, D0, S0, 1) for b in args.batch_sizes]
    points += [(B0, d, S0, 1) for d in args.hidden]
    points += [(B0, D0, s, 1) for s in args.transforms]
    points += [(B0, D0, S0, k) for k in args.particles]
    seen: list[tuple[int, int, int, int]] = []
    for pt in points:
        if pt not in seen:
            seen.append(pt)
    return [
        {"mode": m, "B": b, "D": d, "S": s, "K": k, "image_shape": list(args.image_shape), "device": args.device,
         "threads": args.threads,
         "repeats": args.repeats, "warmup": args.warmup, "keep_memory": not args.glibc_default}
        for (b, d, s, k) in seen
        for m in args.modes
    ]


# --------------------------------------------------------------------------- one configuration
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_config(cfg: dict) -> dict:
    """Build model + guide + SVI for ``cfg`` and time ``repeats`` steps after ``warmup`` steps."""
    import pyro
    import torch

    from guides import make_guide
    from inference.cpu import configure_cpu
    from inference.optim import SVI
    from inference.svi import TrainConfig, make_elbo, make_optimizer
    from models import InvariantNet, ModelConfig

    runtime = configure_cpu(int(cfg["threads"]), keep_memory=bool(cfg.get("keep_memory", True)))
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    pyro.set_rng_seed(0)
    B, D, S, K = cfg["B"], cfg["D"], cfg["S"], cfg["K"]
    model = InvariantNet(ModelConfig(image_shape=tuple(cfg.get("image_shape", (1, 28, 28))), hidden=D,
                                     num_transforms=S, first_layer_prior=False, **MODES[cfg["mode"]]),
                         num_data=EPOCH_EXAMPLES).to(device)
    guide = make_guide(model, "hybrid")
    train = TrainConfig(num_steps=10_000, batch_size=B, num_particles=K)
    svi = SVI(model, guide, make_optimizer(train), loss=make_elbo(train))
    x = torch.rand(B, *model.config.image_shape, device=device)
    y = torch.randint(0, model.config.num_classes, (B,), device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    rss_before = _maxrss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(cfg["warmup"]):
        svi.step(x, y)
    times, cpu_times = [], []
    for _ in range(cfg["repeats"]):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = svi.step(x, y)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"non-finite loss {loss} in {cfg}")
    seconds = statistics.median(times)
    result = dict(cfg, seconds=seconds, times=times, cpu_seconds=statistics.median(cpu_times),
                  steps_per_s=1.0 / seconds, examples_per_s=B / seconds, torch=torch.__version__,
                  threads_used=runtime["threads"], keep_freed_memory=runtime["keep_freed_memory"])
    if cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_kind"] = "cuda max_memory_allocated"
        result["device_name"] = torch.cuda.get_device_name(device)
    else:
        rss_after = _maxrss_mib()
        result["peak_mib"] = rss_after - rss_before  # growth of the process's peak RSS during the steps
        result["peak_rss_mib"] = rss_after
        result["peak_kind"] = "ru_maxrss growth (fresh process)"
    return result


def run_in_subprocess(cfg: dict) -> dict:
    """``run_config`` in a fresh interpreter, so that ru_maxrss belongs to this configuration alone."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(cfg["threads"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {cfg}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def _key(r: dict) -> tuple[int, int, int, int]:
    return (r["B"], r["D"], r["S"], r["K"])


def format_report(results: list[dict], args: argparse.Namespace) -> str:
    floor = {_key(r): r["seconds"] for r in results if r["mode"] == "floor"}
    inputs = {_key(r): r["seconds"] for r in results if r["mode"] == "inputs"}
    header = (f"{'mode':<13}{'B':>6}{'D':>6}{'S':>5}{'K':>3}{'ms/step':>10}{'cpu ms':>8}{'steps/s':>9}"
              f"{'examples/s':>12}{'peak MiB':>10}{'x floor':>9}{'x inputs':>9}")
    lines = [header, "-" * len(header)]
    for r in results:
        k = _key(r)
        vs_floor = f"{r['seconds'] / floor[k]:.2f}" if k in floor else "-"
        vs_inputs = f"{r['seconds'] / inputs[k]:.2f}" if k in inputs else "-"
        lines.append(f"{r['mode']:<13}{r['B']:>6}{r['D']:>6}{r['S']:>5}{r['K']:>3}{r['seconds'] * 1e3:>10.1f}"
                     f"{r['cpu_seconds'] * 1e3:>8.0f}"
                     f"{r['steps_per_s']:>9.2f}{r['examples_per_s']:>12.0f}{r['peak_mib']:>10.0f}"
                     f"{vs_floor:>9}{vs_inputs:>9}")
    lines.append("")
    # ratios at every batch size of the sweep (the acceptance criterion reads weights/floor at B = 512)
    D0, S0 = args.base_hidden, args.base_transforms
    sweep = {(r["mode"], r["B"]): r["seconds"] for r in results if (r["D"], r["S"], r["K"]) == (D0, S0, 1)}
    sizes = sorted({b for (_, b) in sweep})
    pairs = [(m, "floor") for m in args.modes if m != "floor"] + [("weights", "inputs"), ("weights-grid", "weights")]
    for num, den in pairs:
        both = [b for b in sizes if (num, b) in sweep and (den, b) in sweep]
        cells = [f"B={b}: {sweep[num, b] / sweep[den, b]:.2f}" for b in both]
        if cells:
            lines.append(f"ratio {num}/{den}  " + "  ".join(cells))
    # epoch estimate: one pass over the training set at the base point (the paper's: B = 128, S = 32, K = 1, D = 1024)
    base, steps = (args.base_batch, D0, S0, 1), math.ceil(args.epoch_examples / args.base_batch)
    for mode in args.modes:
        sec = {_key(r): r["seconds"] for r in results if r["mode"] == mode}
        if base in sec:
            lines.append(f"epoch estimate [{mode}]: {steps} steps x {sec[base] * 1e3:.0f} ms = "
                         f"{steps * sec[base]:.0f} s for one {args.epoch_examples}-image epoch "
                         f"(B={base[0]}, D={D0}, S={S0}, K=1)")
    return "\n".join(lines)


def set_shapes(args: argparse.Namespace) -> None:
    """``args.image_shape`` and ``args.epoch_examples`` from ``--image-shape`` / ``--dataset`` (default: MNIST's)."""
    from inference.data import DatasetName
    from inference.sources import SOURCES

    try:
        dataset = DatasetName(args.dataset) if args.dataset is not None else None
    except ValueError:
        raise SystemExit(f"unknown --dataset {args.dataset!r}; choose from {[d.value for d in DatasetName]}") from None
    if args.image_shape is None:
        args.image_shape = dataset.image_shape if dataset is not None else (1, 28, 28)
    args.epoch_examples = SOURCES[dataset.source].full_sizes[0] if dataset is not None else EPOCH_EXAMPLES


def machine_line(args: argparse.Namespace) -> str:
    import platform

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()}"
    return (f"device={args.device} ({where}), threads={args.threads}, cpus={default_threads()}, "
            f"torch {torch.__version__}, load average at start {load:.2f}, "
            f"images {'x'.join(map(str, args.image_shape))}, "
            f"repeats={args.repeats} (median), warmup={args.warmup}, "
            f"allocator={'glibc default' if args.glibc_default else 'keep freed memory'}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_config(json.loads(args.worker))))
        return []
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.quick:  # tiny sizes, in this process: a smoke test of every code path in seconds
        args.batch_sizes, args.hidden, args.transforms, args.particles = [8, 16], [32], [2, 4], [1, 2]
        args.base_batch, args.base_hidden, args.base_transforms = 16, 32, 4
        args.repeats, args.warmup, args.in_process = 2, 1, True
        args.threads = 1 if args.threads is None else args.threads
    if args.threads is None:
        args.threads = default_threads()
    if args.threads < 1:
        raise SystemExit(f"--threads must be a positive integer, got {args.threads}")
    set_shapes(args)
    print(machine_line(args), flush=True)
    if args.device == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f} > 0.5: other processes share the CPU, "
              "timings are inflated and noisy", flush=True)
    results = []
    for cfg in configurations(args):
        r = run_config(cfg) if args.in_process else run_in_subprocess(cfg)
        results.append(r)
        print(f"  {r['mode']:<13} B={r['B']:<5} D={r['D']:<5} S={r['S']:<3} K={r['K']}: "
              f"{r['seconds'] * 1e3:8.1f} ms/step", flush=True)
    print()
    print(format_report(results, args))
    if hasattr(os, "getloadavg"):
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine_line(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
