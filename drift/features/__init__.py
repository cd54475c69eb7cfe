"""Feature extractors: what the drifting field is computed on (paper §3.4, §4; App. A.3, A.5).

An extractor maps samples x [N, C, H, W] to a dict of feature keys, each [N, L, D]; `build_feature_extractor`
builds one by name (`feature_extractor_names()` lists them). Modules, each importing only those above it:

* `base`        the key functions (`base_features`, `map_features`, `per_location`), `patchify`, constants and
                the `FeatureExtractor` base class; imports nothing else from drift
* `weights`     loading pretrained weights from local files (`read_weights`, `load_into`, `WeightsError`)
* `pixels`      encoder-free extractors: ``pixels``, ``pixel-multiscale``, and `CombinedFeatures`
* `mae_resnet`  the paper's MAE-ResNet (model, MAE loss, `MAEFeatures`, `build_mae_encoder`)
* `convnext`    ConvNeXt-V2 and its 13 keys;  `tv_resnet`: torchvision ResNet-18/50
* `vae`         the SD-VAE and `DecodeFirst` (latent in, decoded image to a pixel extractor)
* `registry`    the one table of extractor names and builders

The names below are loaded on first use, so ``import drift.features.base`` does not import the encoders.
"""
from __future__ import annotations

import importlib

# submodule -> the public names this package re-exports from it
_EXPORTS = {
    "base": ("FeatureExtractor", "base_features", "map_features", "per_location", "patchify", "unpatchify",
             "NORM_X_EPS", "STD_EPS", "PATCH_SIZES"),
    "weights": ("WeightsError", "read_weights", "load_into"),
    "pixels": ("PixelFeatures", "PixelMultiscaleFeatures", "CombinedFeatures"),
    "mae_resnet": ("MAEConfig", "MAE_PRESETS", "MAEResNet", "MAEResNetEncoder", "MAEFeatures", "build_mae_encoder",
                   "build_mae_model"),
    "convnext": ("ConvNeXtV2", "ConvNeXtFeatures", "build_convnext"),
    "tv_resnet": ("TVResNetFeatures", "build_tv_resnet"),
    "vae": ("SDVAE", "DecodeFirst", "load_vae", "VAE_SCALE"),
    "registry": ("EXTRACTORS", "build_feature_extractor", "feature_extractor_names"),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_SOURCE)


def __getattr__(name: str):
    module = _SOURCE.get(name)
    if module is None:
        # AttributeError (not KeyError): `from drift.features import <submodule>` relies on it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOURCE))
