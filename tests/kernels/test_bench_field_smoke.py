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
