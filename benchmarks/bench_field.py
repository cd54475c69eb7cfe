"""Drifting-field benchmark: reference (eager), reference + torch.compile, cpp (CPU), triton (CUDA).

    python benchmarks/bench_field.py                   # CUDA if present, else CPU (2 threads)
    python benchmarks/bench_field.py --device cpu --threads 2
    python benchmarks/bench_field.py --quick           # one small shape, few repetitions (CI smoke run)
    python benchmarks/bench_field.py --device cpu --gup 16,8,32 --grid 1960x4,490x16   # demo-size rows

Shapes (SPEC §9): B = 8 classes x L locations, G=64, U=16, P=64; GPU grid L in {1, 64, 256, 1024} x
S in {64, 256, 640, 4096}; CPU grid is reduced but includes the CPU target B=64, S=256.
Per provider: median and p20/p80 time, TFLOP/s and GB/s from the counted model below, peak extra memory,
speedup vs the eager reference. Prints a fixed-width table and writes
benchmarks/results/field-<device>-<utc>.json.

Counted model (the work any implementation must do, the same for every provider):
  FLOPs = B * 2*G*M*S * (1 + nR)   (distances, then one coefficient-times-targets product per temperature)
  bytes = B * (G+U+P) * S * in_bytes + B * G * S * 4   (read the inputs once, write the fp32 force)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _harness as H  # noqa: E402
from drift import backends  # noqa: E402
from drift.field import drifting_field, drifting_field_reference  # noqa: E402

G, U, P = 64, 16, 64
TEMPS = (0.02, 0.05, 0.2)
GPU_GRID = [(8 * L, S) for L in (1, 64, 256, 1024) for S in (64, 256, 640, 4096)]
CPU_GRID = [(8, 64), (8, 256), (64, 64), (64, 256), (64, 640)]
QUICK_GRID = [(8, 64)]
# H100 SXM: HBM3 3.35 TB/s; dense TF32 tensor cores ~495 TFLOP/s, so tf32x3 (3 products) ~165 TFLOP/s.
H100_BW = 3.35e12
H100_TF32X3 = 495e12 / 3


def model(B: int, S: int, in_bytes: int, gup=(G, U, P)):
    G, U, P = gup
    M = G + U + P
    nR = len(TEMPS)
    flops = B * 2 * G * M * S * (1 + nR)
    byts = B * M * S * in_bytes + B * G * S * 4
    return flops, byts


def triton_design_floor(B: int, S: int, in_bytes: int, gup=(G, U, P)) -> float:
    """Predicted H100 time floor of the Triton kernels as designed (seconds): the targets are streamed
    1 (pass 1) + 1 + nR (pass 2) + 2 (pass 3) times, and each streamed chunk costs a tf32x3 GEMM."""
    G, U, P = gup
    M = G + U + P
    nR = len(TEMPS)
    passes = 1 + (1 + nR) + 2
    byts = B * M * S * in_bytes * passes + B * G * S * 4
    flops = B * 2 * G * M * S * passes  # padded tiles ignored: a floor, not an estimate
    return max(byts / H100_BW, flops / H100_TF32X3)


def make_inputs(B: int, S: int, device: str, dtype: torch.dtype, seed: int = 0, gup=(G, U, P)):
    G, U, P = gup
    g = torch.Generator(device="cpu").manual_seed(seed)
    gen = torch.randn(B, G, S, generator=g).to(device=device, dtype=dtype)
    pos = (torch.randn(B, P, S, generator=g) + 0.5).to(device=device, dtype=dtype)
    neg = (torch.randn(B, U, S, generator=g) * 1.5).to(device=device, dtype=dtype)
    w = (torch.rand(B, U, generator=g) * 3).to(device=device, dtype=dtype)
    return gen, pos, neg, w


def providers_for(device: str, wanted):
    out = {}
    ref = lambda g, p, n, w: drifting_field_reference(g, p, n, w, TEMPS).force  # noqa: E731
    out["reference"] = ref
    if wanted is None or "reference+compile" in wanted:  # building it imports dynamo: skip when unused
        out["reference+compile"] = torch.compile(ref, dynamic=False)
    if device == "cpu" and backends.has_cpp():
        out["cpp"] = lambda g, p, n, w: drifting_field(g, p, n, w, temperatures=TEMPS, backend="cpp",  # noqa: E731
                                                       check_finite=False).force
    if device == "cuda" and backends.has_triton():
        out["triton"] = lambda g, p, n, w: drifting_field(g, p, n, w, temperatures=TEMPS,  # noqa: E731
                                                          backend="triton", check_finite=False).force
    return {k: v for k, v in out.items() if wanted is None or k in wanted}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads, the same for every provider")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--providers", nargs="*", default=None, help="subset of providers to run")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per provider (CPU)")
    ap.add_argument("--quick", action="store_true", help="one small shape and few repetitions (smoke run)")
    ap.add_argument("--grid", default=None, help="shapes to run instead of the default grid, e.g. 64x256,8x64 (BxS)")
    ap.add_argument("--gup", default=f"{G},{U},{P}",
                    help="G,U,P: generated, unconditional-negative and positive samples per row (default SPEC §9)")
    ap.add_argument("--out-dir", default=None, help="directory of the JSON result (default benchmarks/results)")
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device")
    if device == "cpu":
        H.fixed_malloc_env()  # RSS-based memory measurement (see benchmarks/_harness.py)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    in_bytes = torch.finfo(dtype).bits // 8
    grid = QUICK_GRID if args.quick else (GPU_GRID if device == "cuda" else CPU_GRID)
    if args.grid:
        grid = [tuple(int(v) for v in item.split("x")) for item in args.grid.split(",")]
    try:
        gup = tuple(int(v) for v in args.gup.split(","))
    except ValueError:
        gup = ()
    if len(gup) != 3 or gup[0] < 1 or gup[1] < 0 or gup[2] < 1:
        ap.error(f"--gup must be G,U,P with G >= 1, U >= 0, P >= 1, got {args.gup!r}")
    reps = args.reps or (3 if args.quick else (20 if device == "cuda" else 10))
    provs = providers_for(device, args.providers)

    rows = []
    for B, S in grid:
        inputs = make_inputs(B, S, device, dtype, gup=gup)
        flops, byts = model(B, S, in_bytes, gup)
        ref_time = ref_mem = None
        for name, fn in provs.items():
            call = lambda: fn(*inputs)  # noqa: E731
            try:
                med, p20, p80 = H.time_fn(call, device, warmup=1 if args.quick else 3, reps=reps)
                mem = H.peak_extra_bytes(call, device)
            except torch.OutOfMemoryError:
                rows.append({"B": B, "S": S, "provider": name, "error": "OOM"})
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if name == "reference":
                ref_time, ref_mem = med, mem
            row = {"B": B, "S": S, "provider": name, "median_ms": med * 1e3, "p20_ms": p20 * 1e3,
                   "p80_ms": p80 * 1e3, "tflops": flops / med / 1e12, "gbps": byts / med / 1e9,
                   "peak_mib": mem / 2**20,
                   "speedup": (ref_time / med) if ref_time else None,
                   "mem_frac": (mem / ref_mem) if ref_mem else None}
            if device == "cuda":
                row["h100_floor_ms"] = triton_design_floor(B, S, in_bytes, gup) * 1e3
            rows.append(row)
        del inputs

    cols = [("B", "B", 6, "d"), ("S", "S", 5, "d"), ("provider", "provider", 18, "s"),
            ("median_ms", "median ms", 10, ".3f"), ("p20_ms", "p20 ms", 9, ".3f"), ("p80_ms", "p80 ms", 9, ".3f"),
            ("tflops", "TFLOP/s", 8, ".3f"), ("gbps", "GB/s", 8, ".2f"), ("peak_mib", "peak MiB", 9, ".2f"),
            ("speedup", "x ref", 7, ".2f"), ("mem_frac", "mem/ref", 8, ".3f"), ("error", "note", 5, "s")]
    print(f"drifting field  device={H.device_name(device)}  threads={torch.get_num_threads()}  dtype={args.dtype}  "
          f"G={gup[0]} U={gup[1]} P={gup[2]} R={TEMPS}")
    print(H.format_table(rows, cols))
    path = H.write_json("field", device, {"dtype": args.dtype, "G": gup[0], "U": gup[1], "P": gup[2], "temperatures": TEMPS,
                                          "quantiles": H.QUANTILES, "rows": rows}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
