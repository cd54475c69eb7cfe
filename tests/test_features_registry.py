"""The extractor registry: every registered name builds at a tiny size and gives differentiable [N, L, D] keys,
the unknown-name error lists every name, options are checked, and the combined names wire their files."""
import pytest
import torch

from drift.features import (EXTRACTORS, FeatureExtractor, MAEConfig, MAEResNet, PixelFeatures, build_feature_extractor,
                            feature_extractor_names)
from drift.features.convnext import ConvNeXtV2

TINY_CNX = dict(depths=(1, 1, 2, 1), dims=(8, 16, 16, 32))
TINY_MAE = dict(width=4, layers=(1, 1, 1, 1))

# name -> (options for a random-init build at a tiny size, one input sample's shape, input_space)
TINY_BUILDS = {
    "pixels": ({}, (3, 8, 8), "any"),
    "pixel-multiscale": ({}, (1, 28, 28), "any"),
    "mae-latent": (TINY_MAE, (4, 8, 8), "latent"),
    "mae-pixel": (dict(TINY_MAE, patch_size=2), (3, 16, 16), "pixels"),
    "mae": (dict(TINY_MAE, in_channels=1), (1, 16, 16), "pixels"),
    "convnext": (dict(TINY_CNX, resolution=32), (3, 16, 16), "pixels"),
    "mae-pixel+convnext": (dict(TINY_MAE, patch_size=2, convnext_depths=TINY_CNX["depths"],
                                convnext_dims=TINY_CNX["dims"]), (3, 16, 16), "pixels"),
    "mae+pixel-multiscale": (dict(TINY_MAE, in_channels=1), (1, 28, 28), "pixels"),
    "resnet18": ({}, (3, 32, 32), "pixels"),
    "resnet50": (dict(resolution=32), (3, 24, 24), "pixels"),
}


def test_one_list_of_names():
    names = feature_extractor_names()
    assert names == tuple(EXTRACTORS) and len(set(names)) == len(names)
    assert {"pixels", "pixel-multiscale", "mae-latent", "mae-pixel+convnext", "resnet50"} <= set(names)
    assert set(TINY_BUILDS) == set(names), "every registered name needs a tiny build case here"


@pytest.mark.parametrize("name", sorted(TINY_BUILDS))
def test_every_registered_name_builds_tiny(name):
    options, shape, space = TINY_BUILDS[name]
    torch.manual_seed(0)
    ex = build_feature_extractor(name, **options)
    assert isinstance(ex, FeatureExtractor) and ex.input_space == space
    assert not ex.training and not any(p.requires_grad for p in ex.parameters())  # frozen
    x = torch.randn(2, *shape, requires_grad=True)
    feats = ex(x)
    assert {"global", "norm_x"} <= set(feats)
    assert feats["global"].shape == (2, 1, x[0].numel())
    for k, v in feats.items():
        assert v.dim() == 3 and v.shape[0] == 2 and torch.isfinite(v).all(), k
    assert ex.describe(shape) == {k: tuple(v.shape[1:]) for k, v in feats.items()}
    # squared: the plain sum of a normalized map's means is identically 0 and would give no gradient
    sum(v.float().square().mean() for v in feats.values()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_name_error_lists_every_name():
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'") as err:
        build_feature_extractor("nope")
    msg = str(err.value)
    for name in feature_extractor_names():
        assert repr(name) in msg, name
    assert "'pixel-multiscale'" in msg  # the name the error used to leave out


def test_options_are_checked():
    ex = build_feature_extractor("pixels")
    assert isinstance(ex, PixelFeatures) and ex.describe((1, 28, 28)) == {"global": (1, 784), "norm_x": (1, 1)}
    with pytest.raises(TypeError, match="no options"):
        build_feature_extractor("pixels", width=3)
    # an option the name does not take is an error naming it, not silently dropped
    with pytest.raises(TypeError, match="convnext_weights"):
        build_feature_extractor("mae", convnext_weights="cnx.pt", **TINY_MAE)
    with pytest.raises(TypeError, match="width"):
        build_feature_extractor("resnet18", width=4)


def test_registry_names_and_pixel_combo_on_meta():
    ex = build_feature_extractor("mae-pixel+convnext", width=640, device="meta")
    feats = ex(torch.zeros(2, 3, 256, 256, device="meta"))
    assert len(feats) == 86 + 13
    assert feats["global"].shape == (2, 1, 196608) and feats["norm_x"].shape == (2, 1, 192)
    assert feats["layer4"].shape == (2, 16, 5120) and feats["convnext_stage3"].shape == (2, 49, 1024)
    lat = build_feature_extractor("mae-latent", width=256, device="meta")
    assert lat.input_space == "latent" and len(lat.describe((4, 32, 32))) == 86


def test_builder_accepts_generic_trainer_options(tmp_path):
    # the trainer passes weights/vae generically; encoder-free names accept them empty and refuse real files
    assert set(build_feature_extractor("pixel-multiscale", weights=None).describe((1, 8, 8))) >= {"global", "px2"}
    build_feature_extractor("pixels", weights=None, vae="")
    with pytest.raises(ValueError, match="has no encoder, but weights="):
        build_feature_extractor("pixels", weights="some.pt")
    with pytest.raises(ValueError, match="'pixel-multiscale' has no encoder, but vae="):
        build_feature_extractor("pixel-multiscale", vae="vae_dir")
    # mae-pixel+convnext: one option naming both files
    torch.manual_seed(5)
    mcfg = MAEConfig(in_channels=3, patch_size=8, width=4, layers=(1, 1, 1, 1), num_classes=0)
    mae = MAEResNet(mcfg)
    torch.save({"config": mcfg.to_dict(), "ema": mae.state_dict()}, tmp_path / "mae.pt")
    cnx = ConvNeXtV2(**TINY_CNX)
    torch.save(cnx.state_dict(), tmp_path / "cnx.pt")
    ex = build_feature_extractor("mae-pixel+convnext", weights=f"{tmp_path / 'mae.pt'}+{tmp_path / 'cnx.pt'}",
                                 convnext_depths=TINY_CNX["depths"], convnext_dims=TINY_CNX["dims"])
    assert torch.equal(ex.parts[1].model.embeddings.patch_embeddings.weight, cnx.embeddings.patch_embeddings.weight)
    assert torch.equal(ex.parts[0].encoder.stem[0].weight, mae.encoder.stem[0].weight)
