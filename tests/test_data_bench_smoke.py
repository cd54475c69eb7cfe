"""Smoke run of benchmarks/bench_loader.py --quick: the table and the JSON file are produced (no timings checked)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_loader_quick(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_loader.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "img/s" in proc.stdout
    (out,) = list(tmp_path.glob("loader-*.json"))
    meta = json.loads(out.read_text())
    providers = {(r["provider"], r["mode"]) for r in meta["results"]}
    assert ("pil", "train") in providers and ("pil", "center") in providers
    assert all(r["img_per_s"] > 0 for r in meta["results"])
