"""Drifting-field benchmark: reference (eager), reference + torch.compile, cpp (CPU), triton (CUDA).

    python benchmarks/bench_field.py                   # CUDA if present, else CPU (2 threads)
    python benchmarks/bench_field.py --device cpu --threads 2
    python benchmarks/bench_field.py --device cpu --grid 64x256 --providers reference cpp --processes 5
    python benchmarks/bench_field.py --quick           # one small shape, few repetitions (CI smoke run)
    python benchmarks/bench_field.py --device cpu --gup 16,8,32 --grid 1960x4,490x16   # demo-size rows
    python benchmarks/bench_field.py --precompile fp32,bf16 --jobs 12   # compile the Triton launch candidates
                                                                        # in parallel processes, then exit
    python benchmarks/bench_field.py --multi-keys      # all 86 keys of an ablation step: per-key calls vs one
                                                       # multi-key call (benchmarks/_field_multi.py)

Shapes (the performance targets' per-GPU shapes of the ablation config): B = 8 classes x L locations, G=64,
U=16, P=64; GPU grid L in {1, 64, 256, 1024} x S in {64, 256, 640, 4096}; CPU grid is reduced but includes the
CPU target B=64, S=256.
Per provider: median and p20/p80 time, TFLOP/s and GB/s from the counted model below, peak extra memory,
speedup vs the eager reference, and the wall time of the first call (torch.compile's compile time; the
Triton kernels' compile + autotuning). Each shape prints a progress line as it finishes; the table at the
end and benchmarks/results/field-<device>-<utc>.json hold everything, including the route (recompute, stored
or split: docs/field_kernels.md) and launch configuration the Triton autotuner picked per kernel and shape,
with every candidate's time ("autotune" in the JSON; each Triton row has "route" and "tuned").

CPU: the timed phase runs in --processes fresh processes under the default allocator settings (the run's
environment without the RSS-sampling malloc settings). In each, per shape, the providers alternate call by
call after a warm-up (benchmarks/_harness.py, time_interleaved), so their ratio is measured under the same
conditions. The table pools the calls of all processes for the times (median, p20/p80); "x ref" is the
median and "x ref per process" the range of the per-process speed-ups (ratio of the two medians within a
process); "faults/call" counts the minor page faults per call (fresh memory touched, see RESULTS.md). The
JSON also has each process's median and faults. Peak memory comes from one more process started with the
RSS-sampling malloc settings, which are never on in a timed process.
CUDA: everything in this process (do_bench per provider, then its peak memory).

Cells are skipped, with the reason in the "note" column, rather than failing the run: the eager
reference where its estimated peak memory exceeds the free device memory, torch.compile outside
--compile-grid (each shape is a fresh compile), and every cell once --time-budget-s is spent.

Counted model (the work any implementation must do, the same for every provider):
  FLOPs = B * 2*G*M*S * (1 + nR)   (distances, then one coefficient-times-targets product per temperature)
  bytes = B * (G+U+P) * S * in_bytes + B * G * S * 4   (read the inputs once, write the fp32 force)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _harness as H  # noqa: E402
from drift.field import R_LIST_DEFAULT, dispatch, drifting_field, drifting_field_reference  # noqa: E402

G, U, P = 64, 16, 64
TEMPS = R_LIST_DEFAULT
GPU_GRID = [(8 * L, S) for L in (1, 64, 256, 1024) for S in (64, 256, 640, 4096)]
# Shapes measured before (benchmarks/RESULTS.md) run first, so a run cut short still compares with them (two of
# the few-row ones too, where host overhead and the split route matter); then the largest, so that a time
# budget drops the small, launch-bound ones.
GPU_FIRST = [(512, 256), (2048, 640), (8192, 64), (8, 640), (8, 4096)]
CPU_GRID = [(8, 64), (8, 256), (64, 64), (64, 256), (64, 640)]
QUICK_GRID = [(8, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# H100 SXM: HBM3 3.35 TB/s; dense TF32 tensor cores ~495 TFLOP/s, so 3xTF32 (3 products) ~165 TFLOP/s.
H100_BW = 3.35e12
H100_TF32X3 = 495e12 / 3
PROVIDER_ORDER = ("reference", "reference+compile", "cpp", "triton")


def model(B: int, S: int, in_bytes: int, gup=(G, U, P)):
    G, U, P = gup
    M = G + U + P
    nR = len(TEMPS)
    flops = B * 2 * G * M * S * (1 + nR)
    byts = B * M * S * in_bytes + B * G * S * 4
    return flops, byts


def triton_design_floor(B: int, S: int, in_bytes: int, gup=(G, U, P)) -> float:
    """Predicted H100 time floor of the Triton kernels as designed (seconds), the better of two routes, each
    streamed chunk costing 3xTF32 GEMMs. Recompute: the targets are streamed once in pass 1, once (Gram) or
    1 + nR times (streaming, S below ~M) in pass 2 and twice in pass 3. Stored (where a row's Gram matrix K,
    KN = G*M + U^2 + U*P + P^2 floats, fits in its G*S outputs): pass 1 streams them once and writes K, pass 2
    reads K and does ~nR*G*KN multiply-adds, pass 3 reads K and streams them once (the split variant for few
    rows does the same work in more programs). A floor at full occupancy: few rows cannot reach it."""
    G, U, P = gup
    M = G + U + P
    nR = len(TEMPS)
    kn = G * M + U * U + U * P + P * P
    stream2 = (1 + nR) * G * M * S
    gram2 = kn * S + nR * G * M * M
    macs = B * (G * M * S * 3 + min(stream2, gram2))  # pass 1 + pass 3 (two sweeps) + pass 2
    reads = 3 + (1 if gram2 < stream2 else 1 + nR)
    byts = B * M * S * in_bytes * reads + B * G * S * 4
    floor = max(byts / H100_BW, 2 * macs / H100_TF32X3)
    if kn <= G * S:
        macs = B * (kn * S + nR * G * kn + G * M * S)
        byts = B * (M * S * in_bytes * 2 + kn * 4 * 3 + G * S * 4)
        floor = min(floor, max(byts / H100_BW, 2 * macs / H100_TF32X3))
    return floor


def reference_peak_estimate(B: int, S: int, in_bytes: int, gup=(G, U, P)) -> int:
    """Rough peak extra memory of the eager reference in bytes: per row it holds ~2 [M, S] fp32 copies of the
    targets (concatenated, scaled), ~8 [G, S] fp32 tensors (scaled gen, three per-R forces and their temporaries)
    and ~6 [G, M] ones (fitted to the CPU measurements in RESULTS.md), plus an fp32 copy of bf16 inputs."""
    G, U, P = gup
    M = G + U + P
    floats = (2 * M + 8 * G) * S + 6 * G * M + (M * S if in_bytes < 4 else 0)
    return 4 * B * floats


def make_inputs(B: int, S: int, device: str, dtype: torch.dtype, seed: int = 0, gup=(G, U, P)):
    """Random inputs drawn on `device` (drawing 10^10 numbers on the CPU would take minutes)."""
    G, U, P = gup
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    gen = randn(B, G, S).to(dtype)
    pos = (randn(B, P, S) + 0.5).to(dtype)
    neg = (randn(B, U, S) * 1.5).to(dtype)
    w = (torch.rand(B, U, generator=g, device=device) * 3).to(dtype)
    return gen, pos, neg, w


def _reference(g, p, n, w):
    return drifting_field_reference(g, p, n, w, TEMPS).force


def provider_factories(device: str, wanted):
    """name -> factory() returning the callable for one shape. torch.compile gets a fresh compile per shape
    (after torch._dynamo.reset()), so dynamo's recompile limit never turns later shapes back into eager."""
    out = {"reference": lambda: _reference}
    if wanted is None or "reference+compile" in wanted:
        def compiled():
            torch._dynamo.reset()
            return torch.compile(_reference, dynamic=False)
        out["reference+compile"] = compiled
    if device == "cpu" and dispatch.has_cpp():
        out["cpp"] = lambda: (lambda g, p, n, w: drifting_field(g, p, n, w, temperatures=TEMPS, backend="cpp",
                                                                check_finite=False).force)
    if device == "cuda" and dispatch.has_triton():
        out["triton"] = lambda: (lambda g, p, n, w: drifting_field(g, p, n, w, temperatures=TEMPS, backend="triton",
                                                                   check_finite=False).force)
    return {k: v for k, v in out.items() if wanted is None or k in wanted}


def _parse_grid(text: str):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def _tuning_log():
    if not dispatch.has_triton():
        return []
    from drift.kernels import field_tuning
    return field_tuning.tuning_log()


def _route(inputs):
    """The route the Triton backend runs for these inputs (after a first call), or None."""
    from drift.kernels import field_launch
    return field_launch.route_of(*inputs)


def tuned_summary(new_entries):
    """{"route": ..., "scale": label, "sumsq": label, "force": label (, "reduce": label)} from the tuning-log
    entries of one cell: the route decision when there was one, and the kernels of the winning route (every
    offered route's kernels are tuned when the route is decided)."""
    route = next((e["best"] for e in new_entries if e["kernel"] == "route"), None)
    out = {"route": route} if route else {}
    for e in new_entries:
        if e["kernel"] != "route" and (route is None or e.get("route") == route):
            out[e["kernel"]] = e["best"]
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def precompile(dtype_names, jobs: int, gup=(G, U, P), device: str = "cuda") -> int:
    """Compile every Triton launch candidate of the GPU grid's shapes in `jobs` processes (Triton compiles
    on one core per kernel); later runs load them from Triton's on-disk cache. Prints one line per kernel."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from benchmarks import _field_warm
    from drift.kernels.field_tuning import Config

    S_values = sorted({S for _, S in GPU_GRID})
    tasks = [(name, k, tuple(c)) for name in dtype_names
             for k, c in _field_warm.compile_tasks(*gup, S_values=S_values)]
    t0 = time.perf_counter()
    print(f"precompiling {len(tasks)} kernels ({', '.join(dtype_names)}) in {jobs} processes", flush=True)
    failed = 0
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_precompile_one, t, gup, device): t for t in tasks}
        for fut in cf.as_completed(futures):
            name, kernel, cfg = futures[fut]
            try:
                status, secs = fut.result()
            except Exception as e:  # noqa: BLE001  (a crashed worker: report it, the tuner compiles later)
                status, secs = f"{type(e).__name__}: {e}", 0.0
            failed += status != "ok"
            print(f"  {name} {kernel:5s} {Config(*cfg).label():18s} {secs:5.1f} s  {status}", flush=True)
    print(f"precompile done in {time.perf_counter() - t0:.1f} s ({failed} did not compile or fit)", flush=True)
    return 0


def _precompile_one(task, gup, device):
    name, kernel, cfg = task
    from benchmarks import _field_warm
    from drift.kernels.field_tuning import Config
    t0 = time.perf_counter()
    status = _field_warm.warm_compile(kernel, Config(*cfg), DTYPES[name], *gup, device=device)
    return status, time.perf_counter() - t0


def _cell_row(B, S, name, med, p20, p80, flops, byts):
    return {"B": B, "S": S, "provider": name, "median_ms": med * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
            "tflops": flops / med / 1e12, "gbps": byts / med / 1e9}


def run_cuda(args, grid, gup, dtype, factories, t_start):
    """Every cell in this process: each provider timed by do_bench, then its peak memory (CUDA's allocator
    statistics do not change the timing)."""
    device = "cuda"
    in_bytes = torch.finfo(dtype).bits // 8
    compile_grid = set(_parse_grid(args.compile_grid)) if args.compile_grid else None
    reps = args.reps or (3 if args.quick else 20)
    rows, autotune = [], []
    for i, (B, S) in enumerate(grid):
        if args.time_budget_s is not None and time.perf_counter() - t_start > args.time_budget_s:
            note = f"skipped (time budget {args.time_budget_s:g} s)"
            rows.extend({"B": B, "S": S, "provider": name, "note": note} for name in factories)
            print(f"[{i + 1}/{len(grid)}] B={B} S={S}: skipped (time budget)", flush=True)
            continue
        inputs = make_inputs(B, S, device, dtype, gup=gup)
        flops, byts = model(B, S, in_bytes, gup)
        ref_time = ref_mem = None
        done = []
        for name, factory in factories.items():
            row = {"B": B, "S": S, "provider": name}
            skip = None
            if name == "reference+compile" and compile_grid is not None and (B, S) not in compile_grid:
                skip = "skipped (not in --compile-grid)"
            if name.startswith("reference"):
                need, free = reference_peak_estimate(B, S, in_bytes, gup), torch.cuda.mem_get_info()[0]
                if need > free:
                    skip = f"skipped (needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free)"
            if skip:
                rows.append({**row, "note": skip})
                done.append(f"{name} {skip}")
                continue
            n_log = len(_tuning_log())
            try:
                fn = factory()
                call = lambda: fn(*inputs)  # noqa: E731
                t0 = time.perf_counter()
                call()  # compile / autotune / warm up outside the timed runs
                _sync(device)
                first_s = time.perf_counter() - t0
                med, p20, p80 = H.time_fn(call, device, warmup=1 if args.quick else 3, reps=reps)
                mem = H.peak_extra_bytes(call, device)
            except torch.OutOfMemoryError:
                rows.append({**row, "error": "OOM", "note": "OOM"})
                done.append(f"{name} OOM")
                torch.cuda.empty_cache()
                continue
            if name == "reference":
                ref_time, ref_mem = med, mem
            row = _cell_row(B, S, name, med, p20, p80, flops, byts)
            row.update({"peak_mib": mem / 2**20, "speedup": (ref_time / med) if ref_time else None,
                        "mem_frac": (mem / ref_mem) if ref_mem else None, "first_call_s": first_s,
                        "h100_floor_ms": triton_design_floor(B, S, in_bytes, gup) * 1e3})
            new = _tuning_log()[n_log:]
            if name == "triton":
                row["route"] = _route(inputs)
                if new:
                    row["tuned"] = tuned_summary(new)
                    autotune.extend({"B": B, "S": S, "dtype": args.dtype, **e} for e in new)
            rows.append(row)
            x = f" x{row['speedup']:.2f}" if row["speedup"] else ""
            done.append(f"{name} {med * 1e3:.3f} ms{x} (first call {first_s:.1f} s)")
            if name == "triton":
                tuned = {k: v for k, v in (row.get("tuned") or {}).items() if k != "route"}
                done.append(f"route={row['route']}" + "".join(f" {k}={v}" for k, v in tuned.items()))
        print(f"[{i + 1}/{len(grid)}] B={B} S={S}: " + " | ".join(done), flush=True)
        del inputs
        torch.cuda.empty_cache()
    return rows, autotune


def cpu_worker(args, grid, gup, dtype, factories, t_start):
    """One phase of the CPU benchmark in this (fresh) process; returns its rows.

    "time": per shape, every provider's first call (compile), then all providers timed interleaved
    (H.time_interleaved), raw times kept for the parent to pool. "memory": per shape, every provider's peak
    extra memory; only in a process started with H.memory_env(), whose malloc settings distort timings."""
    compile_grid = set(_parse_grid(args.compile_grid)) if args.compile_grid else None
    reps = args.reps or (3 if args.quick else 20)
    warmup_s = args.warmup_s if args.warmup_s is not None else (0.0 if args.quick else 1.0)
    rows = []
    for i, (B, S) in enumerate(grid):
        head = f"[{i + 1}/{len(grid)}] B={B} S={S} {args.worker} {args.worker_label}:"
        if args.time_budget_s is not None and time.perf_counter() - t_start > args.time_budget_s:
            print(f"{head} skipped (time budget)", flush=True)
            continue
        inputs = make_inputs(B, S, "cpu", dtype, gup=gup)
        calls, first, done = {}, {}, []
        for name, factory in factories.items():
            if name == "reference+compile" and compile_grid is not None and (B, S) not in compile_grid:
                continue
            fn = factory()
            calls[name] = (lambda f: lambda: f(*inputs))(fn)
            t0 = time.perf_counter()
            calls[name]()  # compile / warm up outside the measured calls
            first[name] = time.perf_counter() - t0
        if args.worker == "memory":
            for name, call in calls.items():
                mem = H.peak_extra_bytes(call, "cpu")
                rows.append({"B": B, "S": S, "provider": name, "peak_bytes": mem})
                done.append(f"{name} {mem / 2**20:.2f} MiB")
        else:
            faults = {}
            times = H.time_interleaved(calls, warmup=1 if args.quick else 3, reps=reps, warmup_s=warmup_s,
                                       faults=faults)
            ref = H.quantiles(times["reference"])[0] if "reference" in times else None
            for name, ts in times.items():
                med = H.quantiles(ts)[0]
                rows.append({"B": B, "S": S, "provider": name, "times_s": ts, "faults": faults[name],
                             "first_call_s": first[name]})
                done.append(f"{name} {med * 1e3:.2f} ms" + (f" x{ref / med:.2f}" if ref else ""))
        print(f"{head} " + " | ".join(done), flush=True)
        del inputs
    return rows


def merge_cpu(grid, gup, dtype, factories, timed, memory):
    """Table rows from the timing processes' raw times and the memory process's peaks: median and p20/p80
    over every call of every process, each process's median and page faults per call, and the speed-up
    over the reference as the median and range of the per-process ratios of medians (each measured
    interleaved in one process; a ratio of pooled medians could fall outside that range)."""
    in_bytes = torch.finfo(dtype).bits // 8
    peaks = {(r["B"], r["S"], r["provider"]): r["peak_bytes"] for r in memory}
    # Per process: {(B, S, provider): its record}.
    procs = [{(r["B"], r["S"], r["provider"]): r for r in proc} for proc in timed]
    rows = []
    for B, S in grid:
        flops, byts = model(B, S, in_bytes, gup)
        ref_key = (B, S, "reference")
        ref_mem = peaks.get(ref_key)
        for name in factories:
            key = (B, S, name)
            recs = [p[key] for p in procs if key in p]
            if not recs:
                rows.append({"B": B, "S": S, "provider": name, "note": "skipped (time budget or --compile-grid)"})
                continue
            med, p20, p80 = H.quantiles([t for r in recs for t in r["times_s"]])
            row = _cell_row(B, S, name, med, p20, p80, flops, byts)
            row["process_median_ms"] = [H.quantiles(r["times_s"])[0] * 1e3 for r in recs]
            row["process_faults_per_call"] = [H.quantiles(r["faults"])[0] for r in recs]
            row["faults_per_call"] = H.quantiles([f for r in recs for f in r["faults"]])[0]
            row["first_call_s"] = recs[0]["first_call_s"]
            ratios = [H.quantiles(p[ref_key]["times_s"])[0] / H.quantiles(p[key]["times_s"])[0]
                      for p in procs if key in p and ref_key in p]
            if ratios:
                row["speedup"] = H.quantiles(ratios)[0]
                row["speedup_range"] = [min(ratios), max(ratios)]
            if key in peaks:
                row["peak_mib"] = peaks[key] / 2**20
                row["mem_frac"] = peaks[key] / ref_mem if ref_mem else None
            rows.append(row)
    return rows


def run_cpu(args, argv, grid, gup, dtype, factories, t_start):
    """The timed phase in --processes fresh processes under the user's allocator settings, then the memory
    phase in one more process under the RSS-sampling ones (see benchmarks/_harness.py)."""
    import tempfile

    script = os.path.abspath(__file__)
    n = args.processes or (1 if args.quick else 3)
    timed, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(n + 1):
            mode = "time" if k < n else "memory"
            out = os.path.join(tmp, f"{mode}-{k}.json")
            extra = ["--worker", mode, "--worker-out", out,
                     "--worker-label", f"process {k + 1}/{n}" if k < n else "(RSS sampling)"]
            if args.time_budget_s is not None:
                left = max(1.0, args.time_budget_s - (time.perf_counter() - t_start))
                extra += ["--time-budget-s", f"{left:.1f}"]
            env = H.timing_env() if mode == "time" else H.memory_env()
            data = H.run_worker(script, list(argv) + extra, env, out)
            loads.append(data["load_avg_1m"])
            if mode == "time":
                timed.append(data["rows"])
            else:
                memory = data["rows"]
    return merge_cpu(grid, gup, dtype, factories, timed, memory), {"processes": n, "load_avg_1m": loads}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads, the same for every provider")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="input dtype (the field computes in fp32 either way)")
    ap.add_argument("--providers", nargs="*", default=None, help="subset of providers to run")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per provider (CPU: per process, all providers alternating; default 20)")
    ap.add_argument("--processes", type=int, default=None,
                    help="CPU: fresh processes that each time every provider (default 3, 1 with --quick); the "
                         "table pools their calls and gives the range of the per-process speed-ups")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="CPU: minimum warm-up time per shape, all providers alternating (default 1 s)")
    ap.add_argument("--quick", action="store_true", help="one small shape and few repetitions (smoke run)")
    ap.add_argument("--grid", default=None, help="shapes to run instead of the default grid, e.g. 64x256,8x64 (BxS)")
    ap.add_argument("--compile-grid", default=None,
                    help="shapes (BxS) on which reference+compile runs (default: all; each is a fresh compile)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="skip the remaining cells once this much wall time is spent (they get a note)")
    ap.add_argument("--gup", default=f"{G},{U},{P}",
                    help="G,U,P: generated, unconditional-negative and positive samples per row (default: the "
                         "ablation config's 64,16,64)")
    ap.add_argument("--out-dir", default=None, help="directory of the JSON result (default benchmarks/results)")
    ap.add_argument("--precompile", default=None, metavar="DTYPES",
                    help="compile the Triton launch candidates for these dtypes (e.g. fp32,bf16) and exit")
    ap.add_argument("--jobs", type=int, default=8, help="processes for --precompile")
    ap.add_argument("--multi-keys", action="store_true",
                    help="time the field for all feature keys of an ablation step at 1 and 8 labels per GPU, one "
                         "call per key vs drifting_loss_multi (with --quick: a tiny CPU smoke run), then exit")
    ap.add_argument("--worker", choices=["time", "memory"], default=None,
                    help="internal (CPU): run one phase in this process and write its rows to --worker-out; "
                         "the benchmark starts these processes itself")
    ap.add_argument("--worker-out", default=None, help="internal: JSON path of a --worker process")
    ap.add_argument("--worker-label", default="", help="internal: the worker's name in progress lines")
    args = ap.parse_args(argv)

    try:
        gup = tuple(int(v) for v in args.gup.split(","))
    except ValueError:
        gup = ()
    if len(gup) != 3 or gup[0] < 1 or gup[1] < 0 or gup[2] < 1:
        ap.error(f"--gup must be G,U,P with G >= 1, U >= 0, P >= 1, got {args.gup!r}")
    if args.processes is not None and args.processes < 1:
        ap.error(f"--processes must be >= 1, got {args.processes}")
    if args.precompile:
        names = [n for n in args.precompile.split(",") if n]
        if not names or any(n not in DTYPES for n in names):
            ap.error(f"--precompile takes dtypes from {sorted(DTYPES)}, got {args.precompile!r}")
        if not dispatch.has_triton():
            ap.error("--precompile needs triton")
        # Without CUDA only the Triton interpreter can run the kernels (a smoke test of this path).
        pre_device = "cuda" if torch.cuda.is_available() else "cpu"
        if pre_device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--precompile needs CUDA (or TRITON_INTERPRET=1 for a dry run on CPU)")
        return precompile(names, max(1, args.jobs), gup, pre_device)
    if args.multi_keys:
        if args.device == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda needs a CUDA device")
        from benchmarks import _field_multi
        torch.set_num_threads(args.threads)
        return _field_multi.run(args.device, DTYPES[args.dtype], gup, quick=args.quick, reps=args.reps,
                                out_dir=args.out_dir)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device")
    if args.worker and (device != "cpu" or not args.worker_out):
        ap.error("--worker runs on --device cpu and needs --worker-out")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    grid = QUICK_GRID if args.quick else (GPU_GRID if device == "cuda" else CPU_GRID)
    if args.grid:
        grid = _parse_grid(args.grid)
    elif device == "cuda" and not args.quick:
        rest = sorted((s for s in grid if s not in GPU_FIRST), key=lambda s: -s[0] * s[1])
        grid = [s for s in GPU_FIRST if s in grid] + rest
    factories = provider_factories(device, args.providers)
    t_start = time.perf_counter()
    if args.worker:
        load = os.getloadavg()[0]
        rows = cpu_worker(args, grid, gup, dtype, factories, t_start)
        with open(args.worker_out, "w") as f:
            json.dump({"rows": rows, "load_avg_1m": [load, os.getloadavg()[0]]}, f)
        return 0

    print(f"drifting field  device={H.device_name(device)}  threads={torch.get_num_threads()}  dtype={args.dtype}  "
          f"G={gup[0]} U={gup[1]} P={gup[2]} R={TEMPS}  shapes={len(grid)}", flush=True)
    cpu_meta, autotune = {}, []
    if device == "cpu":
        rows, cpu_meta = run_cpu(args, argv, grid, gup, dtype, factories, t_start)
    else:
        rows, autotune = run_cuda(args, grid, gup, dtype, factories, t_start)

    order = {name: k for k, name in enumerate(PROVIDER_ORDER)}
    rows.sort(key=lambda r: (r["B"], r["S"], order.get(r["provider"], 99)))
    cols = [("B", "B", 6, "d"), ("S", "S", 5, "d"), ("provider", "provider", 18, "s"),
            ("median_ms", "median ms", 10, ".3f"), ("p20_ms", "p20 ms", 9, ".3f"), ("p80_ms", "p80 ms", 9, ".3f"),
            ("tflops", "TFLOP/s", 8, ".3f"), ("gbps", "GB/s", 8, ".2f"), ("peak_mib", "peak MiB", 9, ".2f"),
            ("speedup", "x ref", 7, ".2f")]
    if device == "cpu":
        cols += [("x_range", "x ref per process", 18, "s"), ("faults_per_call", "faults/call", 11, ".0f")]
    cols += [("mem_frac", "mem/ref", 8, ".3f"), ("first_call_s", "1st s", 6, ".1f"), ("route", "route", 9, "s"),
             ("note", "note", 5, "s")]
    print(f"drifting field  device={H.device_name(device)}  threads={torch.get_num_threads()}  dtype={args.dtype}  "
          f"G={gup[0]} U={gup[1]} P={gup[2]} R={TEMPS}" +
          (f"  timed in {cpu_meta['processes']} fresh processes, memory in another" if cpu_meta else ""))
    shown = [{**r, "x_range": "{:.2f}-{:.2f}".format(*r["speedup_range"])} if "speedup_range" in r else r
             for r in rows]
    print(H.format_table(shown, cols))
    if autotune:
        print("Triton autotuning (winner; best / slowest candidate ms; failed candidates; a route entry sums "
              "each route's best kernel times):")
        for e in autotune:
            times = [t for t in e["times_ms"].values() if t == t] or [float("nan")]
            print(f"  B={e['B']:<5d} S={e['S']:<5d} {e['kernel']:5s} {e['best']:25s} {min(times):8.3f} / "
                  f"{max(times):8.3f}  ({len(times)} timed, {len(e['errors'])} failed)")
    path = H.write_json("field", device, {"dtype": args.dtype, "G": gup[0], "U": gup[1], "P": gup[2],
                                          "temperatures": TEMPS, "quantiles": H.QUANTILES, "rows": rows,
                                          "autotune": autotune, **cpu_meta,
                                          "wall_s": time.perf_counter() - t_start}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
