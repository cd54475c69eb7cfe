"""Demo metrics on tiny synthetic data: Fréchet distance, IDX reading, the classifier and the evaluator.

    pytest -q tests/test_metrics.py
"""
import gzip
import struct

import numpy as np
import pytest
import torch

from drift.metrics import (DemoEvaluator, class_mean_images, feature_stats, frechet_distance, read_idx,
                           train_classifier)


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


def write_idx(path, arr, gz=True):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / "a"), arr, gz=True)
    write_idx(str(tmp_path / "b"), arr, gz=False)
    assert np.array_equal(read_idx(str(tmp_path / "a")), arr)  # finds a.gz
    assert np.array_equal(read_idx(str(tmp_path / "b")), arr)
    (tmp_path / "c").write_bytes(open(tmp_path / "b", "rb").read()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "c"))
    (tmp_path / "d").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(str(tmp_path / "nope"))


def synthetic_fashion(n, seed):
    """28x28 'classes': a bright bar whose position encodes the class, plus noise (images in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = -torch.ones(n, 1, 28, 28)
    for c in range(4):
        x[labels == c, :, 2 + 6 * c:8 + 6 * c, 4:24] = 0.9
    x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, labels


def write_fake_idx_dir(root, n_train=256, n_test=128):
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed, (img, lbl) in (("train", n_train, 0, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                       ("test", n_test, 1, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        x, y = synthetic_fashion(n, seed)
        u8 = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        write_idx(str(root / img), u8)
        write_idx(str(root / lbl), y.numpy().astype(np.uint8))
    return root


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
