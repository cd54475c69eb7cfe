"""Demo metrics on tiny synthetic data: Fréchet distance, IDX reading, the classifier and the evaluator.

    pytest -q tests/test_demo_metrics.py
"""
import gzip

import pytest
import torch

from drift.demo_metrics import (DemoClassifier, DemoEvaluator, DemoFeatureNet, class_mean_images, classifier_outputs,
                                feature_stats, frechet_distance, load_idx_split, train_classifier)
from tests.data_fixtures import synthetic_fashion, write_fake_idx_dir


def test_demo_metrics_go_through_the_drift_fid_code_path():
    """One implementation: the demo's distance is drift.fid's, its features come from drift.fid.extract_features
    with the classifier as the feature network (drift.fid's own tests cover the math)."""
    import drift.fid as fid
    assert frechet_distance is fid.frechet_distance and feature_stats is fid.feature_stats
    torch.manual_seed(0)
    model = DemoClassifier(num_classes=4).eval()
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats, pred = classifier_outputs(model, x, batch_size=3)
    with torch.no_grad():
        want = model.features(x)
        assert torch.allclose(feats, want.double(), atol=1e-6) and torch.equal(pred, model.head(want).argmax(1))
    net = DemoFeatureNet(model)
    assert not net.input_uint8 and net.class_logits
    # uint8 NHWC input (drift-eval's samples.npz) is read back as x / 127.5 - 1.
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    back = fid.extract_features(net, u8)["pool"]
    assert torch.allclose(back, model.features(u8.permute(0, 3, 1, 2).float() / 127.5 - 1).detach(), atol=1e-6)


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
    full = DemoEvaluator(str(data), str(tmp_path / "cache"), num_eval=None, classifier_epochs=8)  # drift-eval's
    assert full.num_eval == 128 and full.test_feats.shape == (128, 128) and full.test_feats.dtype == torch.float64
