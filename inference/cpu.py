"""CPU runtime settings for training and benchmarks: threads and the allocator.

Two settings decide much of a CPU step's time besides the arithmetic:

* threads: one intra-op thread per core this process may run on (``os.sched_getaffinity``), not
  per logical CPU of the host; more threads than cores only add barrier waits.
* the allocator: a step allocates and frees the same large temporaries (hundreds of MB at
  paper size) every time. glibc serves blocks above its mmap threshold (at most 32 MiB) with
  fresh ``mmap`` pages, so every step page-faults its temporaries in again: 20 % of a plain
  paper-size step and about half of a weight-transform step at B = 128 on 2 cores
  (benchmarks/README.md). :func:`keep_freed_memory` makes glibc take every block from the
  heap and keep freed memory for reuse (the equivalent of ``MALLOC_MMAP_MAX_=0`` and a huge
  ``MALLOC_TRIM_THRESHOLD_``). The price is that the process's resident memory stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@functools.cache  # process-wide and idempotent: finding libc (ldconfig) once is enough
def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and never return freed memory to the OS.

    Returns True when the settings were applied (glibc found), False otherwise (e.g. musl, macOS).
    Idempotent; affects allocations made after the call.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    return ok_trim and ok_mmap


def tune_for_training() -> dict[str, object]:
    """What :func:`inference.svi.fit` applies before it trains on the CPU, so that the Python API and the command
    line run a step equally fast: the allocator keeps freed memory (:func:`keep_freed_memory`), and torch's
    intra-op threads are lowered to the cores this process may run on if torch chose more. Process-wide and
    idempotent; an explicit ``torch.set_num_threads`` within those cores is left alone."""
    if torch.get_num_threads() > available_cores():
        torch.set_num_threads(available_cores())
    return {"threads": torch.get_num_threads(), "keep_freed_memory": keep_freed_memory()}


def configure_cpu(threads: int | None = None, keep_memory: bool = True) -> dict[str, object]:
    """Set torch's intra-op threads (default: one per available core) and, optionally, the allocator.

    Returns the settings in effect, for logs: ``{"threads": int, "keep_freed_memory": bool}``.
    """
    n = available_cores() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(n)
    kept = keep_freed_memory() if keep_memory else False
    return {"threads": torch.get_num_threads(), "keep_freed_memory": kept}
