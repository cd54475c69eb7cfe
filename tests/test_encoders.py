"""Encoders: ConvNeXt-V2 (keys, transformers naming), torchvision ResNets, and weight loading (round trips
of randomly initialized models; missing / truncated / mismatched files name the path and key)."""
import os

import pytest
import torch

from drift.features import MAEConfig, MAEResNet, WeightsError, build_feature_extractor, build_mae_encoder
from drift.features.convnext import ConvNeXtFeatures, ConvNeXtV2, build_convnext
from drift.features.weights import read_weights

TINY_CNX = dict(depths=(1, 1, 2, 1), dims=(8, 16, 16, 32))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_convnext_base_param_count_and_13_keys():
    with torch.device("meta"):
        m = ConvNeXtV2()  # Base: depths [3, 3, 27, 3], dims [128, 256, 512, 1024]
        feats = ConvNeXtFeatures(m)(torch.zeros(2, 3, 256, 256))
    # published ConvNeXt-V2-Base size with its 1000-class head: 88.7M
    n = sum(p.numel() for p in m.parameters()) + 1024 * 1000 + 1000
    assert abs(n - 88.7e6) / 88.7e6 < 1e-3
    expected = {"convnext_stage0_mean": (2, 1, 128), "convnext_stage0_std": (2, 1, 128)}
    for i, (hw, c) in enumerate([(28, 256), (14, 512), (7, 1024)], start=1):
        expected[f"convnext_stage{i}"] = (2, hw * hw, c)
        expected[f"convnext_stage{i}_mean"] = expected[f"convnext_stage{i}_std"] = (2, 1, c)
    expected["convnext_global_mean"] = expected["convnext_global_std"] = (2, 1, 1024)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected


def test_convnext_state_dict_names_follow_transformers():
    keys = set(ConvNeXtV2(**TINY_CNX).state_dict())
    for k in ["embeddings.patch_embeddings.weight", "embeddings.layernorm.bias",
              "encoder.stages.0.layers.0.dwconv.weight", "encoder.stages.0.layers.0.grn.weight",
              "encoder.stages.1.downsampling_layer.0.weight", "encoder.stages.1.downsampling_layer.1.weight",
              "encoder.stages.3.layers.0.pwconv2.bias", "layernorm.weight"]:
        assert k in keys, k
    assert not any(k.startswith("encoder.stages.0.downsampling_layer") for k in keys)
    assert ConvNeXtV2(**TINY_CNX).state_dict()["encoder.stages.0.layers.0.grn.weight"].shape == (1, 1, 1, 32)


def test_convnext_features_values():
    torch.manual_seed(0)
    m = ConvNeXtV2(**TINY_CNX)
    f = ConvNeXtFeatures(m, resolution=32).freeze()
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    feats = f(x)
    # per-location vectors are standardized over channels (eps 1e-3): mean ~ 0, var ~ 1 - small
    z = feats["convnext_stage2"]
    assert z.shape == (2, 4, 16)
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    # global_mean is the classifier's pooled LayerNorm output
    stages, pooled = m(f.preprocess(x))
    torch.testing.assert_close(feats["convnext_global_mean"][:, 0], pooled)
    # preprocessing: [-1, 1] -> [0, 1] -> ImageNet mean/std
    pre = f.preprocess(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(pre[0, :, 0, 0], (0.5 - torch.tensor([0.485, 0.456, 0.406])) /
                               torch.tensor([0.229, 0.224, 0.225]))


def test_convnext_standardization_and_global_std_are_official():
    torch.manual_seed(0)
    m = ConvNeXtV2(**TINY_CNX)
    f = ConvNeXtFeatures(m, resolution=64).freeze()  # the last stage is 2x2: a std over 4 locations
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = f(x)
    stages, _ = m(f.preprocess(x))
    for i, y in enumerate(stages):
        y = y.double()
        mu = y.mean(dim=1, keepdim=True)
        std = y.std(dim=1, keepdim=True, unbiased=False)
        z = (y - mu) / (std + 1e-3)  # official normalize: eps added to the std, not to the variance
        z_loc = z.flatten(2).transpose(1, 2)  # [N, HW, C]
        if i > 0:
            torch.testing.assert_close(feats[f"convnext_stage{i}"].double(), z_loc, rtol=1e-5, atol=1e-5)
        ref_std = torch.sqrt(z_loc.var(dim=1, unbiased=False) + 1e-6)  # official safe_std over locations
        torch.testing.assert_close(feats[f"convnext_stage{i}_std"][:, 0].double(), ref_std, rtol=1e-5, atol=1e-5)
    # global_std: the std over locations of the *standardized* last stage (official), not of the raw one
    torch.testing.assert_close(feats["convnext_global_std"], feats["convnext_stage3_std"])
    raw = stages[-1].double().flatten(2)
    raw_std = torch.sqrt(raw.var(dim=2, unbiased=False) + 1e-6)
    assert not torch.allclose(feats["convnext_global_std"][:, 0].double(), raw_std, rtol=1e-2)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_convnext_loads_transformers_style_file(tmp_path, fmt):
    torch.manual_seed(1)
    src = ConvNeXtV2(**TINY_CNX)
    sd = {f"convnextv2.{k}": v.clone() for k, v in src.state_dict().items()}
    sd["classifier.weight"], sd["classifier.bias"] = torch.randn(5, 32), torch.randn(5)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
        loaded = build_convnext(tmp_path, **TINY_CNX)  # a directory holding model.safetensors works too
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
        loaded = build_convnext(path, **TINY_CNX)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x)[1], src(x)[1])


def test_weight_errors_name_path_and_key(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match="not found: .*nope.pt"):
        build_convnext(missing, **TINY_CNX)
    sd = ConvNeXtV2(**TINY_CNX).state_dict()
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    trunc = tmp_path / "trunc.pt"
    torch.save(sd, trunc)
    _truncate(trunc)
    with pytest.raises(WeightsError, match="cannot read weights file .*trunc.pt"):
        build_convnext(trunc, **TINY_CNX)
    from safetensors.torch import save_file
    st = tmp_path / "trunc.safetensors"
    save_file(sd, str(st))
    _truncate(st)
    with pytest.raises(WeightsError, match="trunc.safetensors"):
        build_convnext(st, **TINY_CNX)
    renamed = dict(sd)
    renamed["encoder.stages.2.layers.1.dwconv.weightX"] = renamed.pop("encoder.stages.2.layers.1.dwconv.weight")
    bad = tmp_path / "renamed.pt"
    torch.save(renamed, bad)
    with pytest.raises(WeightsError, match=r"renamed.pt does not match the model: missing key "
                                           r"'encoder.stages.2.layers.1.dwconv.weight'"):
        build_convnext(bad, **TINY_CNX)
    with pytest.raises(WeightsError, match=r"good.pt does not match the model: .*'embeddings.patch_embeddings.weight' "
                                           r"has shape"):
        build_convnext(good, depths=(1, 1, 2, 1), dims=(16, 16, 16, 32))
    # Without depths/dims the architecture is read off the file; a file without ConvNeXt keys is refused.
    auto = build_convnext(good)
    assert (auto.depths, auto.dims) == (TINY_CNX["depths"], TINY_CNX["dims"])
    for k, v in sd.items():
        assert torch.equal(auto.state_dict()[k], v), k
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="ConvNeXt-V2 architecture"):
        build_convnext(other)
    notsd = tmp_path / "list.pt"
    torch.save([1, 2], notsd)
    with pytest.raises(WeightsError, match="list.pt does not hold a state_dict"):
        read_weights(notsd)


def test_mae_weights_roundtrip_and_config_checks(tmp_path):
    torch.manual_seed(2)
    cfg = MAEConfig(in_channels=1, patch_size=1, width=4, layers=(1, 2, 1, 1), num_classes=3)
    model = MAEResNet(cfg)
    path = tmp_path / "mae.pt"
    torch.save({"ema": model.state_dict(), "config": cfg.to_dict()}, path)  # what drift-mae exports
    ex = build_feature_extractor("mae", weights=str(path))
    x = torch.randn(2, 1, 16, 16)
    ref = model.encoder(x)
    got = ex(x)
    for name, fmap in ref.items():
        torch.testing.assert_close(got[name], fmap.permute(0, 2, 3, 1).reshape(2, -1, fmap.shape[1]))
    with pytest.raises(WeightsError, match=r"mae.pt was trained with width=4, but width=8 was requested"):
        build_feature_extractor("mae", weights=str(path), width=8)
    enc_only = tmp_path / "enc.pt"
    torch.save(model.encoder.state_dict(), enc_only)  # bare encoder state_dict: architecture from the options
    enc = build_mae_encoder(enc_only, in_channels=1, width=4, layers=(1, 2, 1, 1))
    assert torch.equal(enc.stem[0].weight, model.encoder.stem[0].weight)
    with pytest.raises(WeightsError, match="enc.pt does not match the model"):
        build_mae_encoder(enc_only, in_channels=1, width=4)  # default layers [3,4,6,3]: missing block keys


def test_tv_resnet_features_and_weights(tmp_path):
    import torchvision
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # torchvision format, with fc.*
    ex = build_feature_extractor("resnet18", weights=str(path))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    f = ex(x)
    assert f["global"].shape == (2, 1, 3 * 64 * 64) and f["norm_x"].shape == (2, 1, 3)
    assert f["resnet_layer1"].shape == (2, 256, 64) and f["resnet_layer4"].shape == (2, 4, 512)
    assert "resnet_layer4_mean_2" in f and "resnet_layer4_mean_4" not in f
    net.eval()
    h = (((x + 1) / 2) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(h))))))))
    torch.testing.assert_close(f["resnet_layer4_mean"][:, 0], h.mean((2, 3)), rtol=1e-4, atol=1e-5)
    sd = net.state_dict()
    sd.pop("layer3.0.bn1.running_mean")
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(WeightsError, match="bad.pth does not match the model: missing key 'layer3.0.bn1.running_mean'"):
        build_feature_extractor("resnet18", weights=str(bad))


@pytest.mark.parametrize("space", ["latent"])
def test_feature_keys_drive_the_drifting_loss(space):
    """End to end at tiny size: generator output -> frozen extractor -> per-key drifting loss -> gradient."""
    from drift.loss import drifting_loss
    torch.manual_seed(4)
    if space == "latent":
        ex = build_feature_extractor("mae", in_channels=4, patch_size=1, width=4, layers=(1, 2, 1, 1))
        shape = (4, 8, 8)
    else:
        ex = build_feature_extractor("mae", in_channels=3, patch_size=2, width=4, layers=(1, 1, 1, 1))
        shape = (3, 16, 16)
    n_c, g, p = 2, 3, 4
    w = torch.randn(n_c * g, *shape, requires_grad=True)  # stands in for generator output
    pos = torch.randn(n_c * p, *shape)
    gen_f = ex(w)
    with torch.no_grad():
        pos_f = ex(pos)
    total = 0.0
    for k, f in gen_f.items():
        L, D = f.shape[1:]
        gk = f.view(n_c, g, L, D).transpose(1, 2)      # [N_c, L, G, D], a strided view
        pk = pos_f[k].view(n_c, p, L, D).transpose(1, 2)
        loss, _ = drifting_loss(gk, pk, backend="reference")
        assert loss.shape == (n_c, L)
        total = total + loss.mean()
    total.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_mae_plus_pixel_multiscale_is_the_union_of_both_key_sets(tmp_path):
    # The demo's MAE variant: every MAE key unchanged, plus the encoder-free px* keys, and global/norm_x once.
    torch.manual_seed(3)
    cfg = MAEConfig(in_channels=1, patch_size=1, width=4, layers=(1, 1, 1, 1), num_classes=10)
    model = MAEResNet(cfg)
    path = tmp_path / "mae.pt"
    torch.save({"ema": model.state_dict(), "config": cfg.to_dict()}, path)
    x = torch.randn(3, 1, 28, 28)
    combo = build_feature_extractor("mae+pixel-multiscale", weights=str(path))
    mae = build_feature_extractor("mae", weights=str(path))(x)
    px = build_feature_extractor("pixel-multiscale")(x)
    got = combo(x)
    assert set(got) == set(mae) | set(px)
    assert sum(k.startswith("px") for k in got) == sum(k.startswith("px") for k in px) > 0
    for k, v in mae.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    for k, v in px.items():
        if k.startswith("px"):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert all(not p.requires_grad for p in combo.parameters())
    with pytest.raises(WeightsError, match="does not exist|not found|No such"):
        build_feature_extractor("mae+pixel-multiscale", weights=str(tmp_path / "missing.pt"))
