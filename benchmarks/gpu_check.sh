#!/usr/bin/env bash
# Every GPU tier in one command, sized for a ~7-minute slot: the trainer at paper shapes first (bench_train.py),
# then compile the Triton launch candidates in parallel, the `gpu` tests, the field benchmark (fp32 full grid,
# bf16 subset), every other benchmark, then a summary.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, with the project's python
#   PYTHON=python3 bash benchmarks/gpu_check.sh  # another interpreter (e.g. a GPU image with torch 2.11)
#   GPU_CHECK_BUDGET_S=600 bash benchmarks/gpu_check.sh   # more time (default 400 s for the steps)
#   GPU_CHECK_ONLY=train GPU_CHECK_BUDGET_S=540 bash benchmarks/gpu_check.sh   # only the trainer runs (~9 min)
#   GPU_CHECK_ONLY=rest bash benchmarks/gpu_check.sh     # everything but the trainer runs
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

# The trainer at the paper presets' per-GPU shapes (benchmarks/bench_train.py: synthetic latents, random encoders,
# one child process per labels-per-GPU value, so an out-of-memory run is a row of its own), most important first:
# ablation-B/2 at 8 labels per GPU with the preset's levers (target <= 60 GiB, <= 0.55 s/step on an H100), B/2 with
# the MAE-640 at 16 labels (<= 75 GiB), the compiled step at 8 labels (warm-up <= 120 s), then the preset at 1, 2
# and 4 labels and the plain step with the unfused loss (--label-chunk 0 --no-fused-loss: the step of the issue's
# table, with today's multi-key field and fp32 attention) at 1, 2 and 4 labels. Each run
# stops starting children before its step's timeout (--time-budget-s), so it always writes its JSON.
train_budget() { local t=$(left); [ "$t" -gt "$1" ] && t=$1; echo $((t > 25 ? t - 15 : 10)); }
TRAIN=("$PY" benchmarks/bench_train.py --out-dir "$OUT" --steps 5 --warmup-steps 1 --phase-steps 2)
if [ "${GPU_CHECK_ONLY:-}" != rest ]; then
step train-ablation-8 100 "${TRAIN[@]}" --preset ablation-B/2 --labels-per-gpu 8 --time-budget-s "$(train_budget 100)"
step train-b2-mae640-16 110 "${TRAIN[@]}" --preset B/2 --mae-width 640 --labels-per-gpu 16 \
  --time-budget-s "$(train_budget 110)"
step train-ablation-8-compile 200 "${TRAIN[@]}" --preset ablation-B/2 --labels-per-gpu 8 --compile \
  --time-budget-s "$(train_budget 200)"
step train-ablation-1-2-4 120 "${TRAIN[@]}" --preset ablation-B/2 --labels-per-gpu 1 2 4 \
  --time-budget-s "$(train_budget 120)"
step train-ablation-plain 120 "${TRAIN[@]}" --preset ablation-B/2 --label-chunk 0 --no-fused-loss --labels-per-gpu 1 2 4 \
  --time-budget-s "$(train_budget 120)"
fi
if [ "${GPU_CHECK_ONLY:-}" = train ]; then DEADLINE=$SECONDS; fi  # the remaining steps report "skipped (budget)"

# Triton compiles one kernel per core; doing all launch candidates (fp32 and bf16) in parallel processes first
# fills Triton's on-disk cache, so the tests and the tuner below load them instead of compiling one by one.
JOBS=$("$PY" -c "import os; print(max(1, min(16, (os.cpu_count() or 2) - 2)))")
step precompile 90 "$PY" benchmarks/bench_field.py --precompile fp32,bf16 --jobs "$JOBS"
step pytest-gpu 150 "$PY" -m pytest -q -m gpu tests -rs
# The field benchmark stops starting shapes 40 s before its timeout (one shape, the largest included, takes
# well under that), so it always prints its table and writes its JSON.
bench_budget() { local t=$(left); [ "$t" -gt "$1" ] && t=$1; echo $((t > 50 ? t - 40 : 10)); }
# The field benchmarks time the tuned launch configurations (DRIFT_TRITON_AUTOTUNE=1; training runs the
# calibrated first candidates without timing them, drift/field/tune_cache.py), as RESULTS.md's field tables did.
# fp32, the benchmark's default grid. torch.compile of the reference is a fresh compile per shape (~10 s each), so it runs on
# the shapes of the previous measurement and one wide one; the other cells say "not in --compile-grid".
step bench-field 180 env DRIFT_TRITON_AUTOTUNE=1 "$PY" benchmarks/bench_field.py --device cuda --out-dir "$OUT" \
  --compile-grid 512x256,2048x640,8192x64,2048x4096 --time-budget-s "$(bench_budget 180)"
step bench-field-bf16 75 env DRIFT_TRITON_AUTOTUNE=1 "$PY" benchmarks/bench_field.py --device cuda --dtype bf16 --out-dir "$OUT" \
  --grid 512x256,2048x640,8192x64,8192x4096 --providers reference triton --time-budget-s "$(bench_budget 75)"
step bench-field-multi 120 "$PY" benchmarks/bench_field.py --multi-keys --device cuda --dtype bf16 --out-dir "$OUT"
# The first step's field compiles, serial against the trainer's parallel precompile, on this machine's CPU cores.
step bench-precompile 90 "$PY" benchmarks/bench_precompile.py --cases ablation-B/2:8 --out-dir "$OUT"
for b in benchmarks/bench_*.py; do
  case "$b" in benchmarks/bench_field.py|benchmarks/bench_train.py|benchmarks/bench_precompile.py) continue ;; esac
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
    elif name.startswith("train-"):
        print(f"{name}  (targets: ablation-B/2 8 labels <= 60 GiB and <= 550 ms on an H100; B/2 MAE-640 16 labels "
              f"<= 75 GiB; field <= 5% of the step; first step <= 20 s; compile warm-up <= 120 s)")
        print(f"{'preset':>13} {'labels':>6} {'chunk':>5} {'compile':>7} {'step ms':>8} {'img/s':>7} {'peak GiB':>8} "
              f"{'rsv GiB':>7} {'pre s':>6} {'1st s':>6} {'compile s':>9} {'field %':>7} {'MFU':>6}  note")
        for r in rows:
            ph = r.get("phases_ms") or {}
            share = 100 * ph.get("field", 0) / sum(ph.values()) if ph and sum(ph.values()) else None
            print(f"{r.get('preset', '?'):>13} {r.get('labels_per_gpu', 0):>6} {f(r.get('label_chunk'), 'd'):>5} "
                  f"{'yes' if r.get('compile') else 'no':>7} {f(r.get('step_ms'), '.1f'):>8} "
                  f"{f(r.get('img_per_s'), '.0f'):>7} {f(r.get('peak_gib'), '.2f'):>8} "
                  f"{f(r.get('reserved_gib'), '.2f'):>7} {f(r.get('precompile_s'), '.1f'):>6} "
                  f"{f(r.get('first_step_s'), '.2f'):>6} "
                  f"{f(r.get('compile_warmup_s'), '.1f'):>9} {f(share, '.1f'):>7} "
                  f"{f(r.get('mfu'), '.3f'):>6}  {r.get('error') or ''}")
    else:
        print(f"{name}: {len(rows)} rows")
PYEOF
rm -f "$STAMP"
echo "steps: ${status[*]}"
echo "total ${SECONDS}s"
exit $fail
