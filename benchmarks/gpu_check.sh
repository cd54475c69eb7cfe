#!/usr/bin/env bash
# Every GPU tier in one command, sized for a ~7-minute slot: compile the Triton launch candidates in parallel,
# the `gpu` tests, the field benchmark (fp32 full grid, bf16 subset), every other benchmark, then a summary.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, with the project's python
#   PYTHON=python3 bash benchmarks/gpu_check.sh  # another interpreter (e.g. a GPU image with torch 2.11)
#   GPU_CHECK_BUDGET_S=600 bash benchmarks/gpu_check.sh   # more time (default 400 s for the steps)
#
# Results land in benchmarks/results/*.json (or $RESULTS_DIR); the summary reads the JSON written by this run,
# including the launch configuration the Triton autotuner chose per kernel and shape. Every step runs under a
# timeout taken from what is left of the budget, and the field benchmark stops starting new shapes before its
# timeout (skipped cells say so), so the script ends in about the budget plus the summary. Keeps going when a
# step fails and exits non-zero at the end if any step failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${RESULTS_DIR:-benchmarks/results}
BUDGET=${GPU_CHECK_BUDGET_S:-400}
DEADLINE=$((SECONDS + BUDGET))
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
STAMP=$(mktemp)
status=()
fail=0

left() { echo $((DEADLINE - SECONDS)); }

step() {  # step NAME MAX_SECONDS CMD...   (runs for at most min(MAX_SECONDS, time left))
  local name=$1 cap=$2; shift 2
  local t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 10 ]; then status+=("$name:SKIPPED(budget)"); echo "=== $name: skipped (budget spent)"; return; fi
  echo "=== $name (timeout ${t}s, $(left)s left): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$t" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then status+=("$name:ok($((SECONDS - t0))s)")
  else status+=("$name:FAILED(rc=$rc,$((SECONDS - t0))s)"); fail=1; fi
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: no CUDA device visible to $PY"; exit 2; }
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name())"

# The C++ extension is CPU-only and no GPU step needs it (its tests skip without it); building it takes minutes
# of the slot, so only on request.
if ! "$PY" -c "import torch; import drift._C" 2>/dev/null; then
  if [ "${GPU_CHECK_BUILD:-0}" = 1 ]; then step build 180 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  else echo "=== build: drift._C not importable, not built (GPU_CHECK_BUILD=1 builds it; the cpp tests skip)"; fi
fi

# Triton compiles one kernel per core; doing all launch candidates (fp32 and bf16) in parallel processes first
# fills Triton's on-disk cache, so the tests and the tuner below load them instead of compiling one by one.
JOBS=$("$PY" -c "import os; print(max(1, min(16, (os.cpu_count() or 2) - 2)))")
step precompile 90 "$PY" benchmarks/bench_field.py --precompile fp32,bf16 --jobs "$JOBS"
step pytest-gpu 150 "$PY" -m pytest -q -m gpu tests -rs
# The field benchmark stops starting shapes 40 s before its timeout (one shape, the largest included, takes
# well under that), so it always prints its table and writes its JSON.
bench_budget() { local t=$(left); [ "$t" -gt "$1" ] && t=$1; echo $((t > 50 ? t - 40 : 10)); }
# fp32, the SPEC grid. torch.compile of the reference is a fresh compile per shape (~10 s each), so it runs on
# the shapes of the previous measurement and one wide one; the other cells say "not in --compile-grid".
step bench-field 180 "$PY" benchmarks/bench_field.py --device cuda --out-dir "$OUT" \
  --compile-grid 512x256,2048x640,8192x64,2048x4096 --time-budget-s "$(bench_budget 180)"
step bench-field-bf16 75 "$PY" benchmarks/bench_field.py --device cuda --dtype bf16 --out-dir "$OUT" \
  --grid 512x256,2048x640,8192x64,8192x4096 --providers reference triton --time-budget-s "$(bench_budget 75)"
for b in benchmarks/bench_*.py; do
  case "$b" in benchmarks/bench_field.py) continue ;; esac
  step "$(basename "$b" .py)" 75 "$PY" "$b"  # each benchmark's own defaults (they write benchmarks/results/)
done

echo
echo "=== summary"
"$PY" - "$STAMP" "$OUT" benchmarks/results <<'PYEOF'
import glob, json, os, sys
stamp, dirs = sys.argv[1], sorted(set(sys.argv[2:]))
since = os.path.getmtime(stamp)
f = lambda v, fmt: "-" if v is None else format(v, fmt)
for path in sorted(p for d in dirs for p in glob.glob(os.path.join(d, "*.json"))):
    if os.path.getmtime(path) < since:
        continue
    data = json.load(open(path))
    rows = data.get("rows", [])
    name = os.path.basename(path)
    if name.startswith("field-"):
        by = {}
        for r in rows:
            by.setdefault((r["B"], r["S"]), {})[r["provider"]] = r
        print(f"{name}  dtype={data.get('dtype')}  (targets: triton >= 5x eager, >= 2x compile, mem <= 0.1x eager)")
        print(f"{'B':>6} {'S':>5} {'triton ms':>10} {'x eager':>8} {'x compile':>9} {'mem/eager':>9} {'floor ms':>9}"
              f"  triton configs (scale / sumsq / force) or notes")
        for (B, S), p in sorted(by.items()):
            t, e, c = p.get("triton", {}), p.get("reference", {}), p.get("reference+compile", {})
            tm, em, cm = t.get("median_ms"), e.get("median_ms"), c.get("median_ms")
            tuned = t.get("tuned") or {}
            cfgs = " / ".join(tuned.get(k, "?") for k in ("scale", "sumsq", "force")) if tuned else ""
            notes = "; ".join(f"{k}: {r['note']}" for k, r in p.items() if r.get("note"))
            print(f"{B:>6} {S:>5} {f(tm, '.3f'):>10} {f(em / tm if tm and em else None, '.2f'):>8} "
                  f"{f(cm / tm if tm and cm else None, '.2f'):>9} {f(t.get('mem_frac'), '.3f'):>9} "
                  f"{f(t.get('h100_floor_ms'), '.3f'):>9}  {cfgs}{'  ' if cfgs and notes else ''}{notes}")
    else:
        print(f"{name}: {len(rows)} rows")
PYEOF
rm -f "$STAMP"
echo "steps: ${status[*]}"
echo "total ${SECONDS}s"
exit $fail
