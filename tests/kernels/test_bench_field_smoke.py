"""Smoke run of benchmarks/bench_field.py --quick (eager providers only): the table and JSON path work, the CPU
timing runs in fresh processes without the memory-measuring malloc settings; the harness's interleaved timing;
and the Triton precompile helper (benchmarks/_field_warm.py) under the interpreter.

Run: pytest tests/kernels/test_bench_field_smoke.py; TRITON_INTERPRET=1 pytest -m interp on the same file.
No timing is asserted, only that every provider produced a row with finite positive numbers and the JSON
carries the run's metadata.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from drift import _ext
from drift.field import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not _ext.HAS_C_EXT, reason="drift._C is not built (make build)")
def test_bench_field_quick_writes_table_and_json(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_field.py"), "--quick", "--device", "cpu",
           "--providers", "reference", "cpp", "--processes", "2", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env_without_malloc(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "median ms" in proc.stdout and "cpp" in proc.stdout
    # Two timed processes, then the memory process (the only one with the RSS-sampling malloc settings).
    assert "process 2/2" in proc.stdout and "(RSS sampling)" in proc.stdout
    (path,) = list(tmp_path.glob("field-*.json"))
    data = json.loads(path.read_text())
    assert data["meta"]["git_sha"] and data["meta"]["versions"]["torch"]
    assert data["processes"] == 2 and len(data["load_avg_1m"]) == 3
    rows = {r["provider"]: r for r in data["rows"]}
    assert set(rows) == {"reference", "cpp"}
    for r in rows.values():
        for k in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mib"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["provider"], k, r[k])
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert len(r["process_median_ms"]) == 2
        lo, hi = r["speedup_range"]
        assert 0 < lo <= hi
    assert rows["reference"]["speedup_range"] == [1.0, 1.0] and rows["reference"]["mem_frac"] == 1.0


def _env_without_malloc():
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def test_harness_times_interleaved_and_keeps_memory_out_of_timed_processes(monkeypatch):
    from benchmarks import _harness as H

    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = H.time_interleaved(fns, warmup=2, reps=4)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    # Two warm-up rounds in order, then one call of each per repetition, the order rotated every repetition.
    assert calls == list("abcabc") + list("abc") + list("bca") + list("cab") + list("abc")
    for k in H.MALLOC_ENV:
        monkeypatch.setenv(k, H.MALLOC_ENV[k])
    assert not any(k in H.timing_env() for k in H.MALLOC_ENV)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")  # the user's own setting is timed with
    assert H.timing_env()["MALLOC_TRIM_THRESHOLD_"] == "4294967296"
    for k in H.MALLOC_ENV:
        monkeypatch.delenv(k)
    assert all(H.memory_env()[k] == v for k, v in H.MALLOC_ENV.items())
    with pytest.raises(RuntimeError, match="MALLOC_MMAP_THRESHOLD_"):
        H.peak_extra_bytes(lambda: None, "cpu")


@pytest.mark.skipif(not _ext.HAS_C_EXT, reason="drift._C is not built (make build)")
def test_bench_field_gup_sets_row_shape_and_rejects_bad_values(tmp_path):
    env = _env_without_malloc()
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


@pytest.mark.interp
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="set TRITON_INTERPRET=1 before pytest")
def test_bench_field_warm_compile_under_interpreter():
    # The benchmark's parallel precompile path: every (kernel, candidate) of compile_tasks launches on one row.
    if not dispatch.has_triton():
        pytest.skip("triton is not installed")
    from benchmarks import _field_warm
    from drift.kernels import field_tuning

    tasks = _field_warm.compile_tasks(5, 3, 4, S_values=(20, 4096))
    assert {k for k, _ in tasks} == {"scale", "sumsq", "force", "reduce"} and any(c.GRAM for _, c in tasks)
    stored = [t for t in tasks if t[1].STORED and not t[1].SPLIT]
    split = [t for t in tasks if t[1].SPLIT]
    assert {k for k, _ in stored} == {"scale", "sumsq", "force"}  # S = 4096 (and 20) fit K at (5, 3, 4)
    # S = 4096 splits; its pass 2 and 3 are the stored route's compiled kernels (J, W are run-time arguments).
    assert {k for k, _ in split} == {"scale", "reduce"}
    picks = tasks[:3] + [t for t in tasks if t[1].GRAM][:1] + stored[:1] + stored[-1:]
    picks += [next(t for t in split if t[0] == k) for k in ("scale", "reduce")]
    picks += [("force", field_tuning.candidates("force", 5, 3, 4, 4096, stored=True, split=True)[0])]
    for kernel, cfg in picks:
        assert _field_warm.warm_compile(kernel, cfg, torch.float32, 5, 3, 4, S=20, device="cpu") == "ok", (kernel, cfg)
