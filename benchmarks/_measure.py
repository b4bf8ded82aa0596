"""Timing and peak-memory helpers for the benchmarks.

``time_call``: median wall-clock milliseconds of a thunk over ``repeats`` runs after ``warmup`` runs.

Peak memory is measured in a *fresh* subprocess per point (``python -m benchmarks._measure ...``),
so that the allocator's history of one measurement cannot hide another:

    extra_mb = peak RSS during one hypergradient - RSS just before it

On Linux the peak-RSS counter (``VmHWM`` in ``/proc/self/status``, the value that
``getrusage(RUSAGE_SELF).ru_maxrss`` reports) is reset just before the call by writing ``5`` to
``/proc/self/clear_refs``, so the set-up (data generation, the exact inner solution) does not mask the
call. The worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` and calls ``malloc_trim(0)`` before the
call, so that freed memory is returned to the OS and cannot be silently reused by the measured call.
Where the reset is not available the result is ``ru_maxrss`` after minus before, a lower bound
(flagged ``reset=False``). A warm-up hypergradient on a tiny problem runs first (library
initialisation is not charged to the call).
With CUDA, the worker also reports ``torch.cuda.max_memory_allocated`` above the allocation before
the call, for the same problem moved to the GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = ["MemoryPoint", "measure_memory", "time_call"]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], T], repeats: int = 5, warmup: int = 1) -> tuple[float, list[T]]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns:
        (median milliseconds over the timed runs, the timed runs' return values in order).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    times, outs = [], []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        outs.append(fn())
        _sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), outs


# ----------------------------------------------------------------------------------------------
# Peak memory, one fresh process per point


@dataclass
class MemoryPoint:
    """Peak memory of one hypergradient (see the module docstring).

    Attributes:
        solver: registry name; budget: ``iters`` (AID) or ``steps`` (ITD) requested.
        iters_done: iterations actually run (CG may stop at its tolerance).
        rss_extra_mb: peak RSS during the call minus RSS before it (MiB).
        reset: whether the peak counter could be reset before the call (else a lower bound).
        cuda_extra_mb: ``max_memory_allocated`` above the allocation before the call (MiB), None without CUDA.
        error: why the point failed, or None.
    """

    solver: str
    budget: int
    iters_done: int | None = None
    rss_extra_mb: float | None = None
    reset: bool = False
    cuda_extra_mb: float | None = None
    error: str | None = None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> float | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: now, ``VmHWM``: peak), None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb() -> float:
    """Peak RSS in KiB: ``VmHWM`` where readable (same counters as ``VmRSS``), else ``ru_maxrss``
    (the same quantity, read through ``getrusage``; it can lag ``VmRSS`` by a few pages)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform == "darwin" else float(r)  # bytes on macOS, KiB on Linux


def _malloc_trim() -> None:
    """Return glibc's free heap memory to the OS, so that the measured call cannot silently reuse
    memory freed by the set-up (which would hide its allocations from the RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _memory_solver(solver: str, budget: int, lr: float, options: dict[str, Any] | None = None) -> Any:
    """The solver of a memory point; ``options`` are added to (or override) its budget and step size."""
    import bilevel as bl

    opts: dict[str, dict[str, Any]] = {
        "aid-cg": {"iters": budget, "tol": 1e-300, "on_negative_curvature": "ignore"},
        "aid-fp": {"iters": budget, "alpha": lr},
        "stocbio": {"iters": budget, "alpha": lr},
        "itd": {"steps": budget, "lr": lr},
    }
    if solver not in opts:
        raise ValueError(f"no memory configuration for solver {solver!r}; choose one of {sorted(opts)}")
    return bl.get_solver(solver, **(opts[solver] | (options or {})))


def _worker(solver: str, budget: int, n: int, d: int, options: dict[str, Any] | None = None) -> MemoryPoint:
    """Inside the fresh process: one hypergradient on ``ridge_synthetic(d, n)`` at its solution."""
    import gc

    from bilevel.testing import ridge_synthetic

    torch.set_num_threads(1)
    # warm-up on a tiny problem: the first hypergradient of a process initialises torch.func and
    # allocator state (~170 MiB here) that would otherwise be charged to the measured call
    tiny = ridge_synthetic(d=3, n=12)
    tiny_hp = tiny.hparams(-2.0)
    warm = dict(options or {}) | ({"truncate": 1} if "truncate" in (options or {}) else {})  # fits 2 steps
    _memory_solver(solver, 2, 0.1, warm).hypergrad(
        tiny.problem(), tiny.solution(tiny_hp), tiny_hp, tiny.inner_batch, tiny.outer_batch
    )
    ref = ridge_synthetic(d=d, n=n)
    hp = ref.hparams(-2.0)
    params = ref.solution(hp)
    _, L = ref.curvature(hp)
    slv = _memory_solver(solver, budget, 1.0 / L, options)
    prob = ref.problem()
    point = MemoryPoint(solver, budget)
    gc.collect()
    _malloc_trim()
    before = _status_kb("VmRSS")
    point.reset = _reset_peak_rss() and before is not None
    if not point.reset:
        before = _maxrss_kb()
    _, info = slv.hypergrad(prob, params, hp, ref.inner_batch, ref.outer_batch, return_info=True)
    point.rss_extra_mb = (_maxrss_kb() - before) / 1024  # type: ignore[operator]
    point.iters_done = info.iters
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        move = lambda tree: {k: v.to(dev) for k, v in tree.items()}  # noqa: E731
        batch_in = tuple(t.to(dev) for t in ref.inner_batch)
        batch_out = tuple(t.to(dev) for t in ref.outer_batch)
        params_c, hp_c = move(params), move(hp)
        slv.hypergrad(prob, params_c, hp_c, batch_in, batch_out)  # warm-up (CUDA context, kernels)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        slv.hypergrad(prob, params_c, hp_c, batch_in, batch_out)
        torch.cuda.synchronize()
        point.cuda_extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return point


def _worker_env() -> dict[str, str]:
    """The worker's environment: glibc serves every allocation over 64 KiB with its own ``mmap`` (a fixed
    threshold also turns off glibc's adaptive one), so freed tensors leave the RSS at once."""
    return os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_memory(
    solver: str, budget: int, n: int, d: int, timeout: float = 300.0, options: dict[str, Any] | None = None
) -> MemoryPoint:
    """Peak extra memory of one ``solver`` hypergradient with ``budget`` iterations/steps, measured in a
    fresh Python process on ``bilevel.testing.ridge_synthetic(d=d, n=n)`` at ``hparams(-2.0)``, the exact
    inner solution, step ``1/L``; ``options``: more solver options (JSON-serialisable, e.g. ITD's
    ``{"checkpoint": True}``). Failures come back as a point with ``error`` set (never raised)."""
    cmd = [sys.executable, "-m", "benchmarks._measure", solver, str(budget), str(n), str(d)]
    if options:
        cmd += ["--options", json.dumps(options)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=_worker_env())
    except subprocess.TimeoutExpired:
        return MemoryPoint(solver, budget, error=f"timed out after {timeout:.0f} s")
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return MemoryPoint(solver, budget, error=f"worker exit {out.returncode}: {tail}")
    return MemoryPoint(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="memory worker: one hypergradient in this fresh process")
    parser.add_argument("solver")
    parser.add_argument("budget", type=int)
    parser.add_argument("n", type=int)
    parser.add_argument("d", type=int)
    parser.add_argument("--options", type=json.loads, default=None, help="more solver options, a JSON object")
    a = parser.parse_args(argv)
    print(json.dumps(_worker(a.solver, a.budget, a.n, a.d, a.options).__dict__))


if __name__ == "__main__":
    main()
