"""Shared helpers for the benchmarks: timing quantiles, peak extra memory, a fixed-width table, JSON results.

Timing. CUDA: triton.testing.do_bench (L2 flushed between runs, CUDA events) returning the median and
the p20/p80 quantiles. CPU: `time_interleaved` times several providers in one process, alternating one call
of each per repetition (order rotated every repetition), after a warm-up of a few calls and a minimum
warm-up time; quantiles over the individual calls (each is milliseconds long, so timer resolution does not
matter). CPU timings run under the allocator and runtime settings a user has: a benchmark runs its timed
phase in fresh processes started with `timing_env` (`run_worker`), which drops the malloc settings below.

Peak extra memory: the largest amount of memory held during one call beyond what was held before it,
output included. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (no effect on timing).
CPU: resident set size sampled from /proc/self/statm by a thread while the call runs, minus the RSS before
it. That counts every allocation (tensors and the plain mallocs of C++ ops alike); for it to see frees,
glibc must hand large blocks back to the OS, which needs MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
from the start of the process (`memory_env`). Those settings make every large allocation a fresh mmap and
slow allocation-heavy code down 2x or more, so CPU memory is measured in a separate process started with
`memory_env`, never in a timed one (`peak_extra_bytes` refuses to measure CPU memory without them). The
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


def quantiles(times: Sequence[float]) -> List[float]:
    """[median, p20, p80] of a list of times."""
    t = torch.tensor(list(times), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in QUANTILES]


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 20) -> List[float]:
    """[median, p20, p80] seconds of one call of fn."""
    if device == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=max(warmup, 25), rep=max(reps, 100), quantiles=list(QUANTILES))
        return [m / 1e3 for m in ms]
    return quantiles(time_interleaved({"fn": fn}, warmup=warmup, reps=reps)["fn"])


def time_interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 3, reps: int = 20, warmup_s: float = 0.0,
                     faults: Optional[Dict[str, List[int]]] = None) -> Dict[str, List[float]]:
    """Seconds of each of `reps` calls per CPU callable, the callables alternating in one process.

    Every repetition calls each callable once, in an order rotated by one per repetition, so slow drifts
    (other load on the machine, clock changes) and what one call leaves behind for the next (caches,
    allocator state) fall on every callable alike. Warm-up first: rounds of one call each until every
    callable had `warmup` calls and `warmup_s` seconds have passed. Python's garbage collector runs once
    before the timed calls, so that a full collection is less likely to land inside one of them. With
    `faults`, the minor page faults of each timed call are appended to faults[name] (first touches of
    fresh memory: where the allocator handed memory back to the OS, every call pays them again)."""
    import gc
    import resource

    names = list(fns)
    t0 = time.perf_counter()
    rounds = 0
    while rounds < warmup or time.perf_counter() - t0 < warmup_s:
        for name in names:
            fns[name]()
        rounds += 1
    gc.collect()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if faults is not None else 0
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
            if faults is not None:
                faults.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return times


# glibc's default top pad (128 KiB) is set explicitly, so that a pad the user chose cannot hide frees either.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "131072"}


def memory_env() -> Dict[str, str]:
    """Environment of a process that measures CPU memory: glibc returns every block >= 64 KiB to the OS."""
    return {**os.environ, **MALLOC_ENV}


def timing_env() -> Dict[str, str]:
    """Environment of a timed process: this one's, less any of the memory-measuring malloc settings (a malloc
    setting of the user's own, with another value, stays: it is part of the settings they time under)."""
    return {k: v for k, v in os.environ.items() if MALLOC_ENV.get(k) != v}


def malloc_env_active() -> bool:
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def run_worker(script: str, argv: Sequence[str], env: Dict[str, str], out_path: str) -> Dict:
    """Run `python script *argv` in a fresh process with `env` (its output passes through) and return the
    JSON object it wrote to `out_path`; RuntimeError when it fails."""
    proc = subprocess.run([sys.executable, script, *argv], env=env)
    if proc.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(argv)} failed (exit code {proc.returncode})")
    with open(out_path) as f:
        return json.load(f)


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
    if not malloc_env_active():
        raise RuntimeError(f"CPU peak memory needs a process started with {MALLOC_ENV} (memory_env()); "
                           "never measure it in a timed process")
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
    # The allocator settings of the run (none for a default run), so a run under other settings says so.
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    meta = {"device": device, "device_name": device_name(device), "versions": versions(), "git_sha": git_sha(),
            "argv": sys.argv, "utc": utc_stamp(), "threads": torch.get_num_threads(), "malloc_env": malloc}
    with open(path, "w") as f:
        json.dump({"meta": meta, **payload}, f, indent=1)
    return path
