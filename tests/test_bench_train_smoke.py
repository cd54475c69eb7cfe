"""Smoke run of benchmarks/bench_train.py on the CPU at tiny widths: it runs the real trainer step (plain and
label-chunked), prints its table and writes a JSON row with every field (no timing is checked).

    pytest -q tests/test_bench_train_smoke.py
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("preset", "labels_per_gpu", "compile", "label_chunk", "bf16_keys", "step_ms", "step_ms_p20", "step_ms_p80",
          "img_per_s", "peak_gib", "first_step_s", "compile_warmup_s", "phases_ms", "flops_model",
          "flops_generator_fwd_bwd_per_sample", "flops_encoder_fwd_per_sample", "flops_field", "model_tflops",
          "matmul_tflops", "matmul_dtype", "mfu", "error")
PHASES = ("data", "generator", "encoder", "field", "backward", "optimizer")


@pytest.mark.slow
def test_bench_train_cpu_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--device", "cpu", "--threads", "1",
           "--preset", "ablation-B/2", "--labels-per-gpu", "1", "2", "--label-chunk", "1", "--hidden-size", "32",
           "--depth", "1", "--num-heads", "2", "--mae-width", "8", "--mae-layers", "1,1,1,1", "--image-size", "8",
           "--num-classes", "10", "--gen-per-label", "4", "--pos-per-sample", "4", "--neg-per-sample", "2",
           "--steps", "2", "--warmup-steps", "0", "--phase-steps", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step ms" in proc.stdout and "MFU" in proc.stdout
    (out,) = list(tmp_path.glob("train-*.json"))
    data = json.loads(out.read_text())
    assert {"device", "device_name", "versions", "git_sha", "argv"} <= set(data["meta"])
    rows = data["rows"]
    assert [r["labels_per_gpu"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in FIELDS if k not in r]
        assert not missing, missing
        assert r["error"] is None and r["compile_warmup_s"] is None  # eager: no compile warm-up
        assert r["step_ms"] > 0 and r["img_per_s"] > 0 and r["peak_gib"] > 0 and 0 < r["mfu"] < 1
        assert set(r["phases_ms"]) == set(PHASES) and r["phases_ms"]["generator"] > 0
        assert r["flops_model"] > r["flops_field"] > 0
    # 2 labels run the label-chunked step (1 label per chunk); 1 label is the plain step. Same counted work per label.
    assert rows[1]["flops_model"] == pytest.approx(2 * rows[0]["flops_model"], rel=1e-6)
