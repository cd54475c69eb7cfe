"""What the first training step spends compiling the drifting field's Triton kernels, and what the trainer's
parallel precompile (drift/precompile.py) makes of it: for each paper preset's per-GPU step, on an empty Triton
cache each time,

* serial: every kernel variant the step launches compiled one after the other, in the order the launches meet
  them (what a first step without precompile does, candidates over the GPU's shared memory included);
* parallel: `compile_field` with --jobs worker processes (what `Trainer.precompile_field` does before step 0);
* cached: the step's launches afterwards, each finding its kernel in the cache (on a GPU the first step also
  loads each cubin into the driver, ~ms each, not counted here).

Runs on any machine: the step lives on a fake GPU (drift.precompile.fake_cuda_trainer) and the kernels are
compiled for --arch by Triton and ptxas on this machine's CPU, as the GPU machine's CPU compiles them.

    python benchmarks/bench_precompile.py                      # sm90, the four paper cases, jobs = CPU cores
    python benchmarks/bench_precompile.py --arch sm80 --jobs 16 --cases ablation-B/2:8

Prints a table; writes benchmarks/results/precompile-<cpu>-<utc>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import format_table, write_json  # noqa: E402

# preset:labels[:mae width]: the per-GPU steps of the paper presets on one 8-GPU node (and the plain step at 2)
CASES = ("ablation-B/2:8", "ablation-B/2:2", "B/2:16:640", "B/16:16")
COLUMNS = [("case", "case", 18, ""), ("variants", "variants", 8, "d"), ("over_shared", "over smem", 9, "d"),
           ("serial_s", "serial s", 9, ".1f"), ("parallel_s", "parallel s", 10, ".1f"), ("rounds", "rounds", 6, "d"),
           ("cached_s", "cached s", 8, ".1f"), ("speedup", "x", 5, ".1f")]


def _fresh_cache(tmp: str, name: str) -> None:
    path = os.path.join(tmp, name)
    os.makedirs(path)
    os.environ["TRITON_CACHE_DIR"] = path


def run_case(case: str, arch: str, jobs: int, tmp: str) -> dict:
    from drift.precompile import compile_field, fake_cuda_trainer, field_variants
    preset, labels, *rest = case.split(":")
    opts = {"width": int(rest[0])} if rest else None
    tr = fake_cuda_trainer(preset, int(labels), feature_options=opts)
    key = case.replace("/", "").replace(":", "-")
    _fresh_cache(tmp, key + "-serial")
    t0 = time.perf_counter()
    log = field_variants(tr, arch, compile=True)
    serial = time.perf_counter() - t0
    _fresh_cache(tmp, key + "-parallel")
    out = compile_field(tr, arch, jobs=jobs)
    t0 = time.perf_counter()
    cached = field_variants(tr, arch, compile=True)
    cached_s = time.perf_counter() - t0
    over = sum(1 for v in log if (v.error or "").startswith("out of resource"))
    failing = [f"{v.kernel}: {v.error}" for v in log if v.error and not v.error.startswith("out of resource")]
    return {"case": case, "preset": preset, "labels_per_gpu": int(labels), "mae_width": opts and opts["width"],
            "arch": arch, "variants": len(log), "over_shared": over, "failing": failing,
            "serial_s": serial, "compile_s_sum": sum(v.seconds for v in log), "parallel_s": out["seconds"],
            "rounds": out["rounds"], "jobs": out["jobs"], "cached_s": cached_s, "cached_variants": len(cached),
            "speedup": serial / out["seconds"] if out["seconds"] else None,
            "kernels": [{"kernel": v.kernel, "options": v.options, "shared": v.shared, "regs": v.regs,
                         "spills": v.spills, "seconds": v.seconds, "error": v.error} for v in log]}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm90", help="target GPU: sm90 (H100/H200) or sm80 (A100)")
    p.add_argument("--jobs", type=int, default=0, help="worker processes of the parallel compile (0: CPU cores)")
    p.add_argument("--cases", nargs="+", default=list(CASES), help="preset:labels[:mae width] per case")
    p.add_argument("--out-dir", default=None, help="JSON directory (default benchmarks/results)")
    args = p.parse_args(argv)
    jobs = args.jobs or (os.cpu_count() or 1)
    saved = os.environ.get("TRITON_CACHE_DIR")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for case in args.cases:
                rows.append(run_case(case, args.arch, jobs, tmp))
                r = rows[-1]
                print(f"{case}: {r['variants']} variants, serial {r['serial_s']:.1f} s, parallel "
                      f"{r['parallel_s']:.1f} s ({r['rounds']} rounds, {jobs} jobs)", flush=True)
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    print(format_table(rows, COLUMNS))
    path = write_json("precompile", "cpu", {"rows": rows, "arch": args.arch, "jobs": jobs, "cpus": os.cpu_count()},
                      out_dir=args.out_dir)
    print(f"wrote {path}")
    return 1 if any(r["failing"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
