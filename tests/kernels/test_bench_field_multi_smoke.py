"""Smoke run of benchmarks/bench_field.py --multi-keys --quick on the CPU: the 86 keys of the latent MAE-ResNet,
one call per key against the multi-key call, a table and a JSON file. No timing is asserted.

Run: pytest tests/kernels/test_bench_field_multi_smoke.py
"""
import json
import math
import os
import subprocess
import sys

from benchmarks import _field_multi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ablation_key_list():
    keys = _field_multi.ablation_keys(256)
    assert len(keys) == 86
    by_name = {k: (L, D) for k, L, D in keys}
    assert by_name["global"] == (1, 4096) and by_name["norm_x"] == (1, 4)
    assert by_name["conv1"] == (1024, 256) and by_name["layer4_std_2"] == (4, 2048)
    assert sorted({D for _, _, D in keys}) == [4, 256, 512, 1024, 2048, 4096]


def test_bench_field_multi_keys_quick(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_field.py"), "--multi-keys", "--quick",
           "--device", "cpu", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x per-key" in proc.stdout
    (path,) = list(tmp_path.glob("multikey-*.json"))
    data = json.loads(path.read_text())
    assert data["meta"]["versions"]["torch"] and len(data["keys"]) == 86
    rows = {(r["labels"], r["provider"]): r for r in data["rows"]}
    assert set(rows) == {(1, "per-key"), (1, "multi"), (1, "multi-fused")}
    for r in rows.values():
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["first_call_s"] > 0
