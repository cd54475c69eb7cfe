"""Shared helpers for the benchmarks: timing quantiles, peak extra memory, a fixed-width table, JSON results.

Timing. CUDA: triton.testing.do_bench (L2 flushed between runs, CUDA events) returning the median and
the p20/p80 quantiles. CPU: a plain perf_counter loop after warm-up, quantiles over the individual runs
(each run is milliseconds long, so timer resolution does not matter and every sample is kept).

Peak extra memory: the largest amount of memory held during one call beyond what was held before it,
output included. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: resident set
size sampled from /proc/self/statm by a thread while the call runs, minus the RSS before it. That counts
every allocation (tensors and the plain mallocs of C++ ops alike); for it to see frees, glibc must hand
large blocks back to the OS, so CPU runs set MALLOC_MMAP_THRESHOLD_ (see `fixed_malloc_env`). The
profiler's per-op memory events were not usable for a timeline on this torch (allocations inside ops are
folded into op totals), hence the sampler.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": None}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 20) -> List[float]:
    """[median, p20, p80] seconds of one call of fn."""
    if device == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=max(warmup, 25), rep=max(reps, 100), quantiles=list(QUANTILES))
        return [m / 1e3 for m in ms]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in QUANTILES]


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def fixed_malloc_env() -> None:
    """Re-exec this process once with glibc returning blocks >= 64 KiB to the OS (for RSS sampling)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.environ.update(MALLOC_ENV)
    os.execv(sys.executable, [sys.executable] + sys.argv)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(fn: Callable[[], object], device: str, repeats: int = 3) -> int:
    """Peak memory held during one call of fn beyond what was held before it (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return int(peak)
    import gc
    import threading

    best = 0
    for _ in range(repeats):  # the sampler can miss a short-lived peak; keep the largest of a few calls
        gc.collect()
        base = _rss()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        out = fn()
        peak[0] = max(peak[0], _rss())
        stop.set()
        th.join()
        del out
        best = max(best, peak[0] - base)
    return int(best)


def format_table(rows: Sequence[Dict], columns: Sequence[tuple]) -> str:
    """Fixed-width table: columns = [(key, header, width, format)]."""
    head = " ".join(f"{h:>{w}}" for _, h, w, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for key, _, w, fmt in columns:
            v = r.get(key)
            cells.append(f"{'-' if v is None else format(v, fmt):>{w}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def write_json(name: str, device: str, payload: Dict, out_dir: Optional[str] = None) -> str:
    """Write benchmarks/results/<name>-<device>-<utc>.json with the run's metadata; return the path."""
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    dev = device_name(device).replace(" ", "_").replace("/", "_")
    path = os.path.join(out_dir, f"{name}-{dev}-{utc_stamp()}.json")
    meta = {"device": device, "device_name": device_name(device), "versions": versions(), "git_sha": git_sha(),
            "argv": sys.argv, "utc": utc_stamp(), "threads": torch.get_num_threads()}
    with open(path, "w") as f:
        json.dump({"meta": meta, **payload}, f, indent=1)
    return path
