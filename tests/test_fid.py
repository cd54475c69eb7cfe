"""drift.fid: Fréchet distance (self ≈ 0, closed forms), Inception Score on known outputs, ADM's precision/recall,
reference-statistics layouts, the torch-fidelity Inception loading path and its errors.

    pytest -q tests/test_fid.py
"""
import numpy as np
import pytest
import torch

from drift.fid import (InceptionFeatures, extract_features, feature_stats, frechet_distance, frechet_distance_to,
                       inception_score, iter_npz_array, load_ref_stats, manifold_radii, precision_recall)
from tests.eval_fixtures import random_inception_file


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_fd_of_a_set_against_itself_is_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    fd = frechet_distance(*feature_stats(x), *feature_stats(x))
    assert abs(fd) < 1e-9 * float((x ** 2).mean() * 16)


def test_fd_equals_the_closed_form_for_commuting_covariances():
    # S1 = Q D1 Q^T, S2 = Q D2 Q^T: FD = |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2 exactly.
    rng = np.random.default_rng(0)
    d = 12
    q = _rotation(d, 1)
    d1, d2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    s1, s2 = (q * d1) @ q.T, (q * d2) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)


def test_fd_matches_scipy_sqrtm_for_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_fd_of_samples_of_two_gaussians_approaches_the_closed_form():
    g = torch.Generator().manual_seed(3)
    n, d = 20000, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64) + 1.0
    want = d * 1.0 + d * (1 - 2) ** 2  # |mu|^2 + sum (1 - 2)^2
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize("n", [3, 9, 40])  # fewer samples than dimensions (the N x N route), and more
def test_fd_from_features_equals_fd_of_their_statistics(n):
    g = torch.Generator().manual_seed(n)
    d = 16
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2, d)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    mu2, sigma2 = torch.randn(d, generator=g, dtype=torch.float64).numpy(), (a @ a.T / d).numpy()
    want = frechet_distance(*feature_stats(x), mu2, sigma2)
    # rel 1e-7: with n <= d the F x F route takes square roots of the covariance's zero eigenvalues, which
    # come out of eigh as +-1e-16 and contribute ~1e-8 each; the N x N route never forms them.
    assert frechet_distance_to(x, mu2, sigma2) == pytest.approx(want, rel=1e-7 if n <= d else 1e-10)
    assert frechet_distance_to(x, *feature_stats(x)) == pytest.approx(0, abs=1e-9 * float((x ** 2).sum()))


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(torch.zeros(1, 3))


def test_inception_score_on_known_outputs():
    K = 10
    confident = 60.0 * torch.nn.functional.one_hot(torch.arange(1000) % K, K).double()  # one class each, all classes
    assert inception_score(confident) == pytest.approx(K, rel=1e-6)
    assert inception_score(torch.randn(1, K).repeat(200, 1)) == pytest.approx(1.0, abs=1e-12)  # no diversity
    # Two classes: p = (a, 1-a) for half the samples and (1-a, a) for the rest; the marginal is uniform.
    a = 0.8
    logits = torch.log(torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64)).repeat(50, 1)
    want = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
    assert inception_score(logits) == pytest.approx(want, rel=1e-10)
    # Splits: the mean over splits of 5,000, as ADM's evaluator (two splits here, each with IS = K and 1).
    two = torch.cat([confident.repeat(5, 1), torch.zeros(5000, K)])
    assert inception_score(two) == pytest.approx((K + 1) / 2, rel=1e-6)


def test_precision_recall_on_a_hand_worked_case():
    # 1-D, k = 1. Reference {0, 1, 2, 10}: radii 1, 1, 1, 8. Generated {0.5, 5, 30}: 0.5 and 5 (|5 - 10| <= 8)
    # lie in the reference manifold, 30 does not -> precision 2/3. Generated radii 4.5, 4.5, 25: every
    # reference point lies in a generated ball (10 through 30's radius 25) -> recall 1.
    ref = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    gen = torch.tensor([[0.5], [5.0], [30.0]])
    assert manifold_radii(ref, k=1).sqrt().tolist() == pytest.approx([1, 1, 1, 8])
    p, r = precision_recall(ref, gen, k=1)
    assert p == pytest.approx(2 / 3) and r == 1.0
    p2, r2 = precision_recall(ref, torch.tensor([[0.5], [5.0], [14.0]]), k=1)  # radii 4.5, 4.5, 9: 10 is 4 from 14
    assert p2 == 1.0 and r2 == 1.0
    p3, r3 = precision_recall(ref, torch.tensor([[0.5], [3.0], [100.0]]), k=1)  # radii 2.5, 2.5, 97
    assert p3 == pytest.approx(2 / 3) and r3 == 1.0
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(ref[:3], gen, k=3)


def test_precision_recall_matches_a_brute_force_loop_across_batches():
    g = torch.Generator().manual_seed(4)
    ref, gen = torch.randn(70, 5, generator=g), 0.6 * torch.randn(50, 5, generator=g) + 0.8
    k = 3

    def radii(x):
        d = torch.cdist(x.double(), x.double())
        return d.sort(1).values[:, k]

    rr, rg = radii(ref), radii(gen)
    d = torch.cdist(gen.double(), ref.double())  # (gen, ref)
    want_p = (d <= rr[None]).any(1).double().mean().item()
    want_r = (d.T <= rg[None]).any(1).double().mean().item()
    assert 0 < want_p < 1 and 0 < want_r < 1
    assert precision_recall(ref, gen, k=k, batch_size=16) == pytest.approx((want_p, want_r))


@pytest.mark.parametrize("layout", [("mu", "sigma"), ("ref_mu", "ref_sigma")])
def test_ref_stats_both_layouts(tmp_path, layout):
    mu, sigma = np.arange(3.0), np.diag([1.0, 2.0, 3.0])
    path = str(tmp_path / "stats.npz")
    np.savez(path, **{layout[0]: mu.astype(np.float32), layout[1]: sigma})
    got_mu, got_sigma = load_ref_stats(path, dim=3)
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)


def test_ref_stats_errors_name_the_file_and_the_expected_format(tmp_path):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz.*VIRTUAL_imagenet256_labeled"):
        load_ref_stats(missing)
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="bad.npz is not an .npz.*mu"):
        load_ref_stats(str(bad))
    np.savez(tmp_path / "keys.npz", arr_0=np.zeros(3))
    with pytest.raises(ValueError, match=r"keys.npz holds \['arr_0'\], no mu/sigma.*imagenet_256_fid_stats"):
        load_ref_stats(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "dim.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="3-d statistics.*2048-d"):
        load_ref_stats(str(tmp_path / "dim.npz"), dim=2048)
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="not \\[F\\] and \\[F, F\\]"):
        load_ref_stats(str(tmp_path / "shape.npz"))


def test_iter_npz_array_streams_what_np_savez_wrote(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=arr)
    parts = list(iter_npz_array(str(tmp_path / "a.npz"), "arr_0", 3))
    assert [p.shape[0] for p in parts] == [3, 3, 1] and np.array_equal(np.concatenate(parts), arr)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return random_inception_file(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth")


def test_inception_loads_from_a_local_file_and_gives_pool3_and_logits(inception_file):
    net = InceptionFeatures(inception_file)
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 16, 16, 3), generator=g, dtype=torch.uint8)
    out = extract_features(net, rgb, batch_size=2)
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    assert torch.isfinite(out["pool"]).all() and out["pool"].std() > 1e-3
    # The pool3 features are the torch-fidelity extractor's own, on the same weights.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_file)
    assert torch.allclose(out["pool"], ref(rgb.permute(0, 3, 1, 2).contiguous())[0], rtol=1e-5, atol=1e-6)
    # Grayscale is repeated to RGB; float images in [-1, 1] go through the official uint8 rule first.
    gray = rgb[..., :1]
    assert torch.equal(extract_features(net, gray)["pool"], extract_features(net, gray.expand(-1, -1, -1, 3))["pool"])
    as_float = (gray.permute(0, 3, 1, 2).double() + 0.5) / 255 * 2 - 1  # floor(x01 * 255) gives gray back
    assert torch.equal(extract_features(net, as_float)["pool"], extract_features(net, gray)["pool"])


def test_inception_file_errors_name_the_file_and_where_it_comes_from(tmp_path, inception_file):
    with pytest.raises(FileNotFoundError, match="missing.pth.*weights-inception-2015-12-05-6726825d.pth.*v0.2.0"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.pth is not a torch state dict.*torch-fidelity"):
        InceptionFeatures(str(junk))
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(wrong))
    with pytest.raises(ValueError, match="resnet.pth is not an Inception-v3 FID state dict"):
        InceptionFeatures(str(wrong))
    with pytest.raises(ValueError, match="no Inception weights file given"):
        InceptionFeatures("")
