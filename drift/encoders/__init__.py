"""Feature encoders (paper §4, §8; SPEC §4) and the registry behind `drift.features.build_feature_extractor`.

Extractor names (`EXTRACTOR_NAMES`) and their options:

* ``"mae-latent"``   MAE-ResNet on 32x32x4 SD-VAE latents (stride-1 stem). 86 keys at the official layout.
* ``"mae-pixel"``    MAE-ResNet on pixels, patchified ``patch_size`` x ``patch_size`` (8 for 256x256x3).
* ``"mae"``          MAE-ResNet with the architecture taken from the weights file (or from the options).
* ``"convnext"``     ConvNeXt-V2 keys only (pixel inputs in [-1, 1]).
* ``"mae-pixel+convnext"``  both encoders' keys (the paper's final pixel models); the ConvNeXt file is
  ``convnext_weights=PATH``, or both files in one option: ``weights="MAE_PATH+CONVNEXT_PATH"``.
* ``"mae+pixel-multiscale"``  MAE-ResNet keys (architecture from the file) plus the encoder-free ``px*`` keys
  of ``pixel-multiscale`` (small images: the demo's MAE variant).
* ``"resnet18"``, ``"resnet50"``  torchvision ResNets (``global``, ``norm_x`` and the 4 stage maps).

Common options: ``weights=PATH`` (a local file; None = random init, for tests and demos only),
``vae=PATH`` (decode latent inputs with the SD-VAE before a pixel encoder; ``global`` stays the latent),
``device``. MAE options: ``width`` (256 / 640), ``in_channels``, ``patch_size``, ``layers``. ConvNeXt options
(default Base): ``depths``/``dims`` for "convnext", ``convnext_depths``/``convnext_dims`` for the combination.
Every extractor is returned frozen (eval mode, parameters without gradients).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from drift.encoders.mae_resnet import MAE_PRESETS, MAEConfig, MAEFeatures, MAEResNet, MAEResNetEncoder
from drift.encoders.weights import WeightsError, load_into, read_weights

EXTRACTOR_NAMES = ("mae-latent", "mae-pixel", "mae", "convnext", "mae-pixel+convnext", "mae+pixel-multiscale",
                   "resnet18", "resnet50")


def _mae_config(preset: Optional[str], file_cfg: Optional[dict], path, **kw) -> MAEConfig:
    given = {k: v for k, v in kw.items() if v is not None}
    if "layers" in given:
        given["layers"] = tuple(int(n) for n in given["layers"])
    if file_cfg is not None:
        cfg = MAEConfig.from_dict(file_cfg)
        for k, v in given.items():  # user options must agree with what the file was trained with
            if getattr(cfg, k) != v:
                raise WeightsError(f"weights file {path} was trained with {k}={getattr(cfg, k)!r}, "
                                   f"but {k}={v!r} was requested")
        return cfg
    base = dict(MAE_PRESETS.get(preset, {}))
    base.update(given)
    return MAEConfig(**base)


def build_mae_encoder(weights=None, *, preset: Optional[str] = None, width=None, in_channels=None,
                      patch_size=None, layers=None, num_classes=None, device=None) -> MAEResNetEncoder:
    """An MAE-ResNet encoder, loaded from `weights` (a `drift-mae` checkpoint/export or a bare encoder
    state_dict) when given. Options not stored in the file default to the preset ("latent" / "pixel")."""
    sd, file_cfg = (None, None) if weights is None else read_weights(weights)
    cfg = _mae_config(preset, file_cfg, weights, width=width, in_channels=in_channels, patch_size=patch_size,
                      layers=layers, num_classes=num_classes)
    with torch.device(device or "cpu"):
        enc = MAEResNetEncoder(cfg)
    if sd is not None:
        has_full = any(k.startswith(("encoder.", "_orig_mod.encoder.", "module.encoder.")) for k in sd)
        load_into(enc, weights, sd, select="encoder." if has_full else None)
    return enc


def build_mae_model(cfg: MAEConfig, device=None) -> MAEResNet:
    with torch.device(device or "cpu"):
        return MAEResNet(cfg)


def _maybe_vae(extractor, vae, device):
    if vae is None:
        return extractor
    from drift.encoders.vae import DecodeFirst, load_vae
    return DecodeFirst(load_vae(vae, device=device), extractor)


def _split_pair(weights, convnext_weights):
    """The combined extractor takes its two files as weights=MAE, convnext_weights=CONVNEXT, or as one
    ``"MAE+CONVNEXT"`` string / (MAE, CONVNEXT) pair, so a single config field can name both."""
    if convnext_weights is None:
        if isinstance(weights, (tuple, list)):
            if len(weights) != 2:
                raise ValueError(f"mae-pixel+convnext weights must be (MAE, CONVNEXT), got {weights!r}")
            return weights[0] or None, weights[1] or None
        if isinstance(weights, str) and "+" in weights and not os.path.exists(weights):
            mae, cnx = weights.split("+", 1)
            return mae or None, cnx or None
    return weights, convnext_weights


def build_extractor(name: str, *, weights=None, vae=None, device=None, convnext_weights=None,
                    convnext_depths=None, convnext_dims=None, **kw):
    """Build a frozen extractor by registry name; see the module docstring."""
    if name in ("mae-latent", "mae-pixel", "mae"):
        preset = {"mae-latent": "latent", "mae-pixel": "pixel", "mae": None}[name]
        enc = build_mae_encoder(weights, preset=preset, device=device, **kw)
        ex = MAEFeatures(enc, input_space="latent" if name == "mae-latent" else None)
        return _maybe_vae(ex, vae, device).freeze()
    if name == "mae+pixel-multiscale":
        from drift.features import CombinedFeatures, PixelMultiscaleFeatures
        enc = build_mae_encoder(weights, preset=None, device=device, **kw)
        ex = CombinedFeatures([MAEFeatures(enc), PixelMultiscaleFeatures(with_base=False)])
        return _maybe_vae(ex, vae, device).freeze()
    if name == "convnext":
        from drift.encoders.convnext import build_convnext_features
        return _maybe_vae(build_convnext_features(weights, device=device, with_base=True, **kw), vae,
                          device).freeze()
    if name == "mae-pixel+convnext":
        from drift.encoders.convnext import build_convnext_features
        from drift.features import CombinedFeatures
        weights, convnext_weights = _split_pair(weights, convnext_weights)
        cnx_arch = {k: v for k, v in (("depths", convnext_depths), ("dims", convnext_dims)) if v is not None}
        enc = build_mae_encoder(weights, preset="pixel", device=device, **kw)
        parts = [MAEFeatures(enc, input_space="pixels"),
                 build_convnext_features(convnext_weights, device=device, with_base=False, **cnx_arch)]
        return _maybe_vae(CombinedFeatures(parts), vae, device).freeze()
    if name in ("resnet18", "resnet50"):
        from drift.encoders.tv_resnet import build_tv_resnet_features
        return _maybe_vae(build_tv_resnet_features(name, weights, device=device, **kw), vae, device).freeze()
    raise ValueError(f"unknown feature extractor {name!r}; known: {('pixels',) + EXTRACTOR_NAMES}")


__all__ = ["EXTRACTOR_NAMES", "build_extractor", "build_mae_encoder", "build_mae_model", "MAEConfig",
           "MAEResNet", "MAEResNetEncoder", "MAEFeatures", "WeightsError", "read_weights", "load_into"]
