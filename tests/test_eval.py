"""drift-eval: ranks write disjoint seed-determined chunks (two gloo processes give the same samples.npz as
one), resume after a kill, the metrics table and eval.json with a random Inception file and synthetic
reference stats or with the demo classifier, one-line errors for missing or wrong files, the console script,
and the FID the trainer logs at checkpoints.

    pytest -q tests/test_eval.py
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import drift.evaluate as ev
from drift.fid import InceptionFeatures, extract_features, feature_stats, frechet_distance_to
from drift.sampler import generate, load_generator, validation_labels
from tests.data_fixtures import synthetic_fashion, write_fake_idx_dir
from tests.eval_fixtures import random_inception_file
from tests.trainer_utils import toy_images, train_tiny

BIN = os.path.dirname(sys.executable)
GENERATE = ev.generate  # the real one, for the spies below


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    x, y = toy_images(n=64, size=8)
    return train_tiny(tmp_path_factory.mktemp("eval") / "run", x, y)


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """A demo-like run (28x28 grayscale, 4 classes) and the IDX directory its classifier comes from."""
    root = tmp_path_factory.mktemp("demo")
    x, y = synthetic_fashion(64, 0)
    return train_tiny(root / "run", x, y), str(write_fake_idx_dir(root / "idx", n_train=256, n_test=64))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """A random Inception file and reference files: `stats.npz` (mu, sigma and arr_0 images, ADM's layout)
    and `stats_official.npz` (ref_mu, ref_sigma only)."""
    d = tmp_path_factory.mktemp("inception")
    weights = random_inception_file(d / "weights.pth")
    ref = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    pool = extract_features(InceptionFeatures(weights), torch.from_numpy(ref))["pool"]
    mu, sigma = feature_stats(pool)
    np.savez(d / "stats.npz", arr_0=ref, mu=mu, sigma=sigma)
    np.savez(d / "stats_official.npz", ref_mu=mu, ref_sigma=sigma)
    return weights, str(d / "stats.npz"), str(d / "stats_official.npz")


def _spy(monkeypatch, seen, fail_at=None):
    """Record the indices each generate() call makes; raise KeyboardInterrupt on call number `fail_at`."""

    def spy(model, labels, **kw):
        if fail_at is not None and len(seen) == fail_at:
            raise KeyboardInterrupt("killed")
        seen.append(kw["indices"].tolist())
        return GENERATE(model, labels, **kw)

    monkeypatch.setattr(ev, "generate", spy)


def _samples(path):
    with np.load(os.path.join(path, "samples.npz")) as z:
        return z["arr_0"], z["arr_1"]


# ---------------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------------

def _rank_worker(rank, world, port, argv, record_dir, fid_files):
    from drift.config import TrainConfig
    from drift.dist import init_distributed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("cpu")
    # The trainer's FID: each rank generates and featurizes its share, the features are gathered.
    weights, stats = fid_files
    cfg = TrainConfig.from_preset("tiny", eval_every=1, eval_samples=5, eval_alpha=(1.5,),
                                  eval_inception_weights=weights, eval_ref_stats=stats)
    model, meta = load_generator(argv[0])
    fid = ev.TrainingFID(cfg, torch.device("cpu"), num_classes=4, item_shape=meta["item_shape"])(model, rank, world)
    rows = ev._gather_rows(torch.arange(rank, 7, world, dtype=torch.float64)[:, None], 7, world)
    # drift-eval itself, recording the indices this rank generates.
    seen = []

    def spy(model, labels, **kw):
        seen.extend(kw["indices"].tolist())
        return GENERATE(model, labels, **kw)

    ev.generate = spy
    rc = ev.main(argv)
    np.save(os.path.join(record_dir, f"rank{rank}.npy"), np.array(seen, dtype=np.int64))
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"fid": fid, "rows": rows.flatten().tolist()}, f)
    if rc != 0:
        raise RuntimeError(f"rank {rank}: drift-eval exited with {rc}")


def test_two_gloo_ranks_write_disjoint_chunks_and_the_same_samples(run, inception, tmp_path):
    import torch.multiprocessing as mp
    weights, _, official = inception
    common = ["--features", "none", "--num-samples", "14", "--chunk-size", "3", "--batch-size", "2",
              "--alpha", "1", "1.5", "--device", "cpu", "--no-progress"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, [run, "--out", str(tmp_path / "two"), *common], str(tmp_path),
                                 (weights, official)), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npy").tolist() for r in (0, 1))
    # Per alpha, rank 0 makes chunks 0, 2, 4 and rank 1 chunks 1, 3; the union is 0..13, once each.
    assert r0 == 2 * [0, 1, 2, 6, 7, 8, 12, 13] and r1 == 2 * [3, 4, 5, 9, 10, 11]
    assert ev.main([run, "--out", str(tmp_path / "one"), *common]) == 0
    for a in ("alpha_1", "alpha_1.5"):
        x2, l2 = _samples(tmp_path / "two" / a)
        x1, l1 = _samples(tmp_path / "one" / a)
        assert x1.shape == (14, 8, 8, 1) and np.array_equal(x1, x2) and np.array_equal(l1, l2)
        assert os.listdir(tmp_path / "two" / a / "chunks") == []  # image chunks folded into samples.npz
    # The images are the library's, sample i from (seed, i).
    model, meta = load_generator(run)
    idx = torch.arange(14)
    want = generate(model, validation_labels(idx, 4), alpha=1.5, indices=idx, as_uint8=True)
    assert np.array_equal(_samples(tmp_path / "one" / "alpha_1.5")[0], want.numpy())
    # The trainer's FID on two ranks equals one rank's; the gather returns rank 0's rows, then rank 1's.
    from drift.config import TrainConfig
    cfg = TrainConfig.from_preset("tiny", eval_every=1, eval_samples=5, eval_alpha=(1.5,),
                                  eval_inception_weights=weights, eval_ref_stats=official)
    one = ev.TrainingFID(cfg, torch.device("cpu"), num_classes=4, item_shape=meta["item_shape"])(model)
    for r in (0, 1):
        rec = json.load(open(tmp_path / f"rank{r}.json"))
        assert rec["fid"]["fid/alpha=1.5"] == pytest.approx(one["fid/alpha=1.5"], rel=1e-9)
        assert rec["rows"] == [0, 2, 4, 6, 1, 3, 5]


# ---------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------

def test_a_killed_evaluation_resumes_from_the_chunks_written(run, tmp_path, monkeypatch, capsys):
    args = [run, "--features", "none", "--num-samples", "10", "--chunk-size", "3", "--batch-size", "3",
            "--no-progress", "--device", "cpu"]
    assert ev.main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = str(tmp_path / "killed")
    seen = []
    _spy(monkeypatch, seen, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        ev.main([*args, "--out", out])
    chunks = sorted(os.listdir(os.path.join(out, "alpha_1", "chunks")))
    assert chunks == ["0000000-0000003.images.npz", "0000003-0000006.images.npz"]
    open(os.path.join(out, "alpha_1", "chunks", "0000006-0000009.images.npz.tmp"), "w").close()  # half-written
    seen.clear()
    _spy(monkeypatch, seen)
    assert ev.main([*args, "--out", out]) == 0
    assert seen == [[6, 7, 8], [9]]  # only the chunks that were missing
    assert all(np.array_equal(a, b) for a, b in zip(_samples(os.path.join(out, "alpha_1")),
                                                    _samples(tmp_path / "straight" / "alpha_1")))
    assert os.listdir(os.path.join(out, "alpha_1", "chunks")) == []  # the temp file is gone too
    seen.clear()
    assert ev.main([*args, "--out", out]) == 0 and seen == []  # a finished evaluation generates nothing
    # Another evaluation in the same directory is refused, naming what differs.
    capsys.readouterr()
    assert ev.main([*args, "--out", out, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another evaluation (differs in seed)" in err


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

def test_inception_metrics_table_for_several_alphas(run, inception, tmp_path, capsys):
    weights, stats, _ = inception
    out = str(tmp_path / "ev")
    capsys.readouterr()
    assert ev.main([run, "--out", out, "--inception-weights", weights, "--ref-stats", stats, "--alpha", "1", "2",
                    "--num-samples", "5", "--chunk-size", "3", "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "FID" in text and "IS" in text and "precision" in text and "recall" in text and "best FID" in text
    rep = json.load(open(os.path.join(out, "eval.json")))
    assert [r["alpha"] for r in rep["results"]] == [1.0, 2.0] and rep["k"] == 3 and rep["num_samples"] == 5
    assert rep["features"] == "inception-v3-compat" and rep["precision_recall_reference"] == stats
    net = InceptionFeatures(weights)
    mu_ref, sigma_ref = np.load(stats)["mu"], np.load(stats)["sigma"]
    for r in rep["results"]:
        for k in ("fid", "is", "precision", "recall"):
            assert np.isfinite(r[k]), (k, r)
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["is"] >= 1
        # FID is the Fréchet distance of the saved samples' pool3 features to the reference stats.
        arr, _ = _samples(os.path.join(out, f"alpha_{r['alpha']:g}"))
        fid = frechet_distance_to(extract_features(net, torch.from_numpy(arr))["pool"], mu_ref, sigma_ref)
        assert r["fid"] == pytest.approx(fid, rel=1e-6)
        assert f"{r['alpha']:>6g}  {r['fid']:>10.4f}" in text
    assert rep["best"]["fid"] == min(r["fid"] for r in rep["results"])


def test_official_stats_layout_without_images_skips_precision_recall(run, inception, tmp_path, capsys):
    weights, stats, official = inception
    args = [run, "--inception-weights", weights, "--num-samples", "4", "--device", "cpu", "--no-progress"]
    assert ev.main([*args, "--out", str(tmp_path / "a"), "--ref-stats", official]) == 0
    rep = json.load(open(tmp_path / "a" / "eval.json"))
    assert "precision" not in rep["results"][0] and "no reference images" in capsys.readouterr().out
    # --ref-images brings them back; the same FID as with ADM's layout.
    assert ev.main([*args, "--out", str(tmp_path / "b"), "--ref-stats", official, "--ref-images", stats]) == 0
    assert ev.main([*args, "--out", str(tmp_path / "c"), "--ref-stats", stats]) == 0
    b, c = (json.load(open(tmp_path / d / "eval.json"))["results"][0] for d in ("b", "c"))
    assert b["fid"] == rep["results"][0]["fid"] == c["fid"] and b["precision"] == c["precision"]


@pytest.mark.parametrize("extra,message", [
    (["--inception-weights", "nope.pth", "--ref-stats", "{stats}"],
     "Inception weights file not found: nope.pth (expected torch-fidelity's"),
    (["--inception-weights", "{weights}"], "--features inception needs --ref-stats FILE"),
    (["--inception-weights", "{weights}", "--ref-stats", "missing.npz"], "file not found: missing.npz"),
    (["--inception-weights", "{weights}", "--ref-stats", "{weights}"], "is not an .npz file"),
    (["--inception-weights", "{weights}", "--ref-stats", "{stats}", "--ref-images", "{official}"],
     "has no `arr_0`"),
    (["--features", "demo"], "--features demo needs --demo-data DIR"),
    (["--features", "none", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["--features", "none", "--alpha", "1", "1"], "--alpha lists a value twice"),
])
def test_missing_or_wrong_files_are_one_line_errors(run, inception, tmp_path, capsys, monkeypatch, extra, message):
    weights, stats, official = inception
    monkeypatch.chdir(tmp_path)
    extra = [e.format(weights=weights, stats=stats, official=official) for e in extra]
    capsys.readouterr()
    assert ev.main([run, "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("drift-eval: error:") and message in err, err


def test_demo_classifier_features_and_the_console_script(demo_like, tmp_path):
    ckpt, idx = demo_like
    out = str(tmp_path / "ev")
    r = subprocess.run([os.path.join(BIN, "drift-eval"), ckpt, "--features", "demo", "--demo-data", idx,
                        "--alpha", "1", "1.5", "3", "--num-samples", "20", "--out", out, "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().split(" ")[0] in ("1", "1.5", "3")]
    header = next(line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["alpha"])
    assert header == ["alpha", "FID", "IS", "precision", "recall", "class_acc"] and len(rows) == 3
    rep = json.load(open(os.path.join(out, "eval.json")))
    assert rep["features"] == "demo-classifier" and [r["alpha"] for r in rep["results"]] == [1.0, 1.5, 3.0]
    for row in rep["results"]:
        assert 0 <= row["class_accuracy"] <= 1 and np.isfinite(row["fid"]) and row["fid"] > 0
    with np.load(os.path.join(out, "alpha_1", "samples.npz")) as z:
        assert z["arr_0"].shape == (20, 28, 28, 1) and np.bincount(z["arr_1"]).tolist() == [5] * 4
    bad = subprocess.run([os.path.join(BIN, "drift-eval"), ckpt, "--inception-weights", "w.pth", "--ref-stats",
                          "s.npz", "--out", out], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "w.pth" in bad.stderr


# ---------------------------------------------------------------------------------------------------
# FID during training
# ---------------------------------------------------------------------------------------------------

def test_training_fid_is_logged_and_equals_drift_eval(inception, tmp_path):
    weights, _, official = inception
    x, y = toy_images(n=64, size=8)
    out = train_tiny(tmp_path / "run", x, y, eval_every=4, eval_samples=4, eval_alpha=(1.0, 2.0),
                     eval_inception_weights=weights, eval_ref_stats=official)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    fid = [r for r in log if "fid/alpha=1" in r]
    assert [r["step"] for r in fid] == [4, 6] and all(np.isfinite(r["fid/alpha=2"]) for r in fid)  # every 4, last
    assert ev.main([out, "--out", str(tmp_path / "ev"), "--inception-weights", weights, "--ref-stats", official,
                    "--alpha", "1", "2", "--num-samples", "4", "--device", "cpu", "--no-progress"]) == 0
    rep = json.load(open(tmp_path / "ev" / "eval.json"))
    for r in rep["results"]:  # the same images (seed, index) and features: the same FID
        assert fid[-1][f"fid/alpha={r['alpha']:g}"] == pytest.approx(r["fid"], rel=1e-5)


def test_training_fid_needs_its_files(tmp_path):
    x, y = toy_images(n=64, size=8)
    with pytest.raises(ValueError, match="eval_every > 0 needs --eval-inception-weights"):
        train_tiny(tmp_path / "run", x, y, eval_every=4)
