"""Demo metrics on tiny synthetic data: Fréchet distance, IDX reading, the classifier and the evaluator.

    pytest -q tests/test_demo_metrics.py
"""
import gzip

import numpy as np
import pytest
import torch

from drift.demo_metrics import (DemoEvaluator, class_mean_images, feature_stats, frechet_distance, load_idx_split,
                                train_classifier)
from tests.data_fixtures import synthetic_fashion, write_fake_idx_dir


def _sqrtm_fd(mu1, s1, mu2, s2):
    # Independent oracle: scipy's general matrix square root.
    from scipy import linalg
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_identical_sets_is_zero_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    mu, s = feature_stats(a)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    prev = 0.0
    for shift in (0.1, 0.5, 1.0, 2.0):
        fd = frechet_distance(*feature_stats(a + shift), mu, s)
        assert fd == pytest.approx(8 * shift ** 2, rel=1e-6)  # a pure shift moves only the mean term
        assert fd > prev
        prev = fd


def test_fd_matches_closed_form_and_scipy():
    # 1-D Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])) == \
        pytest.approx(1.0 + 1.0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
        s1, s2 = A @ A.T + 0.1 * np.eye(6), B @ B.T + 0.1 * np.eye(6)
        mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_sqrtm_fd(mu1, s1, mu2, s2), rel=1e-6)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_load_idx_split_reads_plain_and_gz_and_names_bad_files(tmp_path):
    # The demo reads IDX files with drift-prep's reader (data_prep.images.read_idx), located by find_idx_pair.
    data = write_fake_idx_dir(tmp_path / "idx", n_train=16, n_test=8)
    x, y = load_idx_split(str(data), "train")
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    sx, sy = synthetic_fashion(16, 0)
    assert torch.allclose(x, ((sx + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1.0) and torch.equal(y, sy)
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # uncompressed copies
        (raw / name).write_bytes(gzip.decompress((data / (name + ".gz")).read_bytes()))
    x2, y2 = load_idx_split(str(raw), "train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_idx_split(str(raw), "train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_idx_split(str(raw), "test")
    with pytest.raises(ValueError, match="split"):
        load_idx_split(str(raw), "val")


def test_classifier_and_evaluator_on_synthetic_classes(tmp_path):
    x, y = synthetic_fashion(256, 0)
    model = train_classifier(x, y, epochs=2, batch_size=32, lr=3e-3, seed=0)
    acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.95
    data = write_fake_idx_dir(tmp_path / "idx")
    ev = DemoEvaluator(str(data), str(tmp_path / "cache"), num_eval=128, classifier_epochs=8)
    assert (tmp_path / "cache").exists()
    again = DemoEvaluator(str(data), str(tmp_path / "cache"), num_eval=128, classifier_epochs=8)  # cached
    for p, q in zip(ev.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)
    ref = ev.references()
    real = ev.evaluate(ev.train_x[:128], ev.train_y[:128])
    assert real["class_accuracy"] > 0.9 and real["fd"] < ref["fd_class_mean"]
    # Wrong labels: accuracy collapses; class means: accurate but far in feature space.
    wrong = ev.evaluate(ev.train_x[:128], (ev.train_y[:128] + 1) % 4)
    assert wrong["class_accuracy"] < 0.1
    cm = class_mean_images(ev.train_x, ev.train_y, ev.test_y)
    assert cm.shape == ev.test_x.shape
    assert ref["fd_real_floor"] >= 0 and ref["fd_class_mean"] > 0 and ref["class_accuracy_class_mean"] > 0.9
    with pytest.raises(ValueError, match="num_eval"):
        DemoEvaluator(str(data), str(tmp_path / "cache"), num_eval=1000, classifier_epochs=8)
