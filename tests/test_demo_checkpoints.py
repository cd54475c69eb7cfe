"""benchmarks/demo_checkpoints.py: scores each checkpoint and weight set of a run like the demo scores its last one.

Run: pytest tests/test_demo_checkpoints.py. A 4-step tiny run on synthetic 28x28 classes, scored against the
synthetic IDX evaluator of test_metrics; the scores are compared with drift.demo's own evaluation of the same
weights, and the bad-input paths raise.
"""
import math

import pytest

from benchmarks.demo_checkpoints import main as ckpt_main, score_run
from drift.demo_metrics import DemoEvaluator
from drift.sample import generate, load_generator
from drift.trainer import train
from tests.data_fixtures import synthetic_fashion, write_fake_idx_dir
from tests.trainer_utils import loader_factory, tiny


def test_scores_every_checkpoint_and_weight_set(tmp_path):
    x, y = synthetic_fashion(64, 0)
    cfg = tiny(tmp_path, max_steps=4, ckpt_every=2, keep_ckpts=5, ema_decay=(0.9, 0.99))
    train(cfg, loader_factory=loader_factory(x, y))
    ev = DemoEvaluator(str(write_fake_idx_dir(tmp_path / "idx")), str(tmp_path / "cache"), num_eval=128,
                       classifier_epochs=2)
    rows = score_run(cfg.out_dir, ev)
    assert [(r["step"], r["weights"]) for r in rows] == [
        (s, w) for s in (2, 4) for w in ("ema 0.9", "ema 0.99", "raw")]
    fd_cm = ev.references()["fd_class_mean"]
    for r in rows:
        assert 0.0 <= r["class_accuracy"] <= 1.0 and math.isfinite(r["fd"]) and r["fd"] >= 0
        assert r["fd_over_class_mean"] == pytest.approx(r["fd"] / fd_cm)
    # The last row is the raw weights of the latest checkpoint: the same numbers as scoring them directly.
    model, _ = load_generator(cfg.out_dir, ema=False)
    direct = ev.evaluate(generate(model, ev.test_y, alpha=1.0, seed=1), ev.test_y)
    assert rows[-1]["fd"] == pytest.approx(direct["fd"], rel=1e-6)
    assert rows[-1]["class_accuracy"] == direct["class_accuracy"]

    assert len(score_run(cfg.out_dir, ev, [4])) == 3
    with pytest.raises(ValueError, match=r"no checkpoint at step\(s\) \[3\]"):
        score_run(cfg.out_dir, ev, [3])
    with pytest.raises(FileNotFoundError, match="no finished checkpoints"):
        score_run(str(tmp_path / "empty"), ev)
    with pytest.raises(SystemExit):
        ckpt_main([cfg.out_dir, "--steps", "2,x"])
