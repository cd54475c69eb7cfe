"""Feature keys: shapes, values against a direct fp64 computation, strided views, the pixel-multiscale keys."""
import pytest
import torch

from drift.features import base_features, build_feature_extractor, map_features, per_location


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_base_features_shapes_and_values():
    x = torch.randn(3, 4, 8, 8, generator=_gen())
    f = base_features(x)
    assert set(f) == {"global", "norm_x"}
    assert f["global"].shape == (3, 1, 256)
    assert f["norm_x"].shape == (3, 1, 4) and f["norm_x"].dtype == torch.float32
    x64 = x.double()
    ref = torch.sqrt((x64 ** 2).mean(dim=(2, 3)) + 1e-6)
    torch.testing.assert_close(f["norm_x"][:, 0].double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(f["global"][:, 0], x.reshape(3, -1))


def test_base_features_global_input_and_grad():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    raw = torch.randn(2, 1, 8, 8)
    f = base_features(x, global_input=raw)
    assert f["global"].shape == (2, 1, 64)
    f["norm_x"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="global_input"):
        base_features(x, global_input=torch.randn(3, 4))


@pytest.mark.parametrize("hw", [(8, 8), (6, 6), (4, 4), (2, 2), (1, 1)])
def test_map_features_keys_shapes(hw):
    h, w = hw
    fmap = torch.randn(2, 5, h, w, generator=_gen(1))
    f = map_features("m", fmap)
    expected = {"m": (2, h * w, 5), "m_mean": (2, 1, 5), "m_std": (2, 1, 5)}
    for p in (2, 4):
        if h % p == 0:
            n = (h // p) * (w // p)
            expected[f"m_mean_{p}"] = (2, n, 5)
            expected[f"m_std_{p}"] = (2, n, 5)
    assert {k: tuple(v.shape) for k, v in f.items()} == expected


def test_map_features_values_match_fp64():
    fmap = torch.randn(2, 3, 8, 8, generator=_gen(2)) * 3 + 5
    f = map_features("a", fmap)
    r = fmap.double()
    loc = r.permute(0, 2, 3, 1).reshape(2, 64, 3)
    torch.testing.assert_close(f["a"].double(), loc)
    torch.testing.assert_close(f["a_mean"].double()[:, 0], r.mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f["a_std"].double()[:, 0], torch.sqrt(r.var((2, 3), unbiased=False) + 1e-6),
                               rtol=1e-5, atol=1e-5)
    for p in (2, 4):
        patches = r.unfold(2, p, p).unfold(3, p, p)  # [N, C, H/p, W/p, p, p]
        pm = patches.mean((-1, -2)).flatten(2).transpose(1, 2)
        ps = torch.sqrt(patches.var((-1, -2), unbiased=False) + 1e-6).flatten(2).transpose(1, 2)
        torch.testing.assert_close(f[f"a_mean_{p}"].double(), pm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f[f"a_std_{p}"].double(), ps, rtol=1e-5, atol=1e-5)
    # row order: location index = h * W + w
    assert torch.equal(f["a"][1, 3 * 8 + 5], fmap[1, :, 3, 5])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_location_is_a_view(layout):
    fmap = torch.randn(2, 6, 4, 4)
    if layout == "channels_last":
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    v = per_location(fmap)
    assert v.untyped_storage().data_ptr() == fmap.untyped_storage().data_ptr()
    fmap[0, 2, 1, 3] = 123.0  # writes through: same memory
    assert v[0, 1 * 4 + 3, 2] == 123.0
    # trainer grouping works on the view
    g = map_features("m", fmap)["m"].reshape(1, 2, 16, 6).transpose(1, 2)
    assert g.shape == (1, 16, 2, 6)


def test_map_features_errors():
    with pytest.raises(ValueError, match="feature map 'bad'"):
        map_features("bad", torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        base_features(torch.randn(2, 3))


def test_pixel_multiscale_keys_for_28px():
    ex = build_feature_extractor("pixel-multiscale")
    x = torch.randn(3, 1, 28, 28, generator=_gen(5))
    f = ex(x)
    assert f["px2"].shape == (3, 196, 4) and f["px4"].shape == (3, 49, 16)
    assert f["px7"].shape == (3, 16, 49) and f["px14"].shape == (3, 4, 196)
    assert "px2_mean_2" in f and "px4_mean_2" not in f  # the 7x7 grid has no 2x2 pooling
    assert "px2_mean_4" not in f and "px14_mean_2" in f  # 14x14 grid: 2 divides, 4 does not; 2x2 grid: 2 only
    # patch vectors are the pixels of each patch: location (1, 2) of the 4x4 grid
    torch.testing.assert_close(f["px4"][2, 1 * 7 + 2], x[2, 0, 4:8, 8:12].reshape(-1))
    assert set(ex.describe((1, 28, 28))) == set(f)
    with pytest.raises(ValueError, match="patch_sizes"):
        build_feature_extractor("pixel-multiscale", patch_sizes=(0,))
