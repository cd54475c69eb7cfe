"""Smoke run of benchmarks/bench_field.py --quick (eager providers only): the table and JSON path work.

Run: pytest tests/kernels/test_bench_field_smoke.py. No timing is asserted, only that every provider
produced a row with finite positive numbers and the JSON carries the run's metadata.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from drift import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not _ext.HAS_C_EXT, reason="drift._C is not built (make build)")
def test_bench_field_quick_writes_table_and_json(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_field.py"), "--quick", "--device", "cpu",
           "--providers", "reference", "cpp", "--out-dir", str(tmp_path)]
    # The benchmark re-executes itself once to fix glibc's malloc settings; give it them up front instead.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "median ms" in proc.stdout and "cpp" in proc.stdout
    (path,) = list(tmp_path.glob("field-*.json"))
    data = json.loads(path.read_text())
    assert data["meta"]["git_sha"] and data["meta"]["versions"]["torch"]
    rows = {r["provider"]: r for r in data["rows"]}
    assert set(rows) == {"reference", "cpp"}
    for r in rows.values():
        for k in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mib"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["provider"], k, r[k])
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]


@pytest.mark.skipif(not _ext.HAS_C_EXT, reason="drift._C is not built (make build)")
def test_bench_field_gup_sets_row_shape_and_rejects_bad_values(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    base = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_field.py"), "--device", "cpu", "--reps", "1",
            "--providers", "cpp", "--out-dir", str(tmp_path)]
    proc = subprocess.run(base + ["--gup", "5,0,3", "--grid", "3x7"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = list(tmp_path.glob("field-*.json"))
    data = json.loads(path.read_text())
    assert (data["G"], data["U"], data["P"]) == (5, 0, 3)
    assert [(r["B"], r["S"]) for r in data["rows"]] == [(3, 7)]
    for bad in ("5,3", "0,1,1", "4,-1,2", "a,b,c"):
        proc = subprocess.run(base + ["--gup", bad, "--grid", "2x3"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and "--gup must be G,U,P" in proc.stderr, (bad, proc.stderr[-500:])
