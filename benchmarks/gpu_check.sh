#!/usr/bin/env bash
# Every GPU tier in one command: the `gpu` tests, then every benchmark, then a short summary table.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, with the project's python
#   PYTHON=python3 bash benchmarks/gpu_check.sh  # another interpreter (e.g. a GPU image with torch 2.11)
#
# Results land in benchmarks/results/*.json (or $RESULTS_DIR); the summary reads the JSON written by this run.
# Keeps going when a step fails and exits non-zero at the end if any step failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$OUT"
STAMP=$(mktemp)
status=()
fail=0

step() {  # step NAME CMD...
  local name=$1; shift
  echo "=== $name: $*"
  if "$@"; then status+=("$name:ok"); else status+=("$name:FAILED($?)"); fail=1; fi
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: no CUDA device visible to $PY"; exit 2; }

# The C++ extension is CPU-only; build it if it is missing so the CPU providers and tests can import it.
"$PY" -c "import torch; import drift._C" 2>/dev/null \
  || step build "$PY" -m pip install -q --no-build-isolation --no-deps -e .

step pytest-gpu "$PY" -m pytest -q -m gpu tests
step bench-field "$PY" benchmarks/bench_field.py --device cuda --out-dir "$OUT"
step bench-field-bf16 "$PY" benchmarks/bench_field.py --device cuda --dtype bf16 --out-dir "$OUT"
for b in benchmarks/bench_*.py; do
  case "$b" in benchmarks/bench_field.py) continue ;; esac
  step "$(basename "$b" .py)" "$PY" "$b"  # each benchmark's own defaults (they write benchmarks/results/)
done

echo
echo "=== summary"
"$PY" - "$STAMP" "$OUT" benchmarks/results <<'PYEOF'
import glob, json, os, sys
stamp, dirs = sys.argv[1], sorted(set(sys.argv[2:]))
since = os.path.getmtime(stamp)
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
        print(f"{name}  (targets: triton >= 5x eager, >= 2x compile, mem <= 0.1x eager)")
        print(f"{'B':>6} {'S':>5} {'triton ms':>10} {'x eager':>8} {'x compile':>9} {'mem/eager':>9} {'floor ms':>9}")
        for (B, S), p in sorted(by.items()):
            t, e, c = p.get("triton", {}), p.get("reference", {}), p.get("reference+compile", {})
            tm, em, cm = t.get("median_ms"), e.get("median_ms"), c.get("median_ms")
            f = lambda v, fmt: "-" if v is None else format(v, fmt)
            print(f"{B:>6} {S:>5} {f(tm, '.3f'):>10} {f(em / tm if tm and em else None, '.2f'):>8} "
                  f"{f(cm / tm if tm and cm else None, '.2f'):>9} {f(t.get('mem_frac'), '.3f'):>9} "
                  f"{f(t.get('h100_floor_ms'), '.3f'):>9}")
    else:
        print(f"{name}: {len(rows)} rows")
PYEOF
rm -f "$STAMP"
echo "steps: ${status[*]}"
exit $fail
