"""The one registry of feature extractors: every name `build_feature_extractor` accepts, with its builder.

Names (`EXTRACTORS`, in this order) and their options:

* ``"pixels"``       no encoder: ``global`` and ``norm_x`` of the sample only. No options.
* ``"pixel-multiscale"``  no encoder: the base keys plus patch-vector maps of the image at several patch sizes
  (small demo data; options ``patch_sizes``, ``pool_sizes``).
* ``"mae-latent"``   MAE-ResNet on 32x32x4 SD-VAE latents (stride-1 stem). 86 keys at the official layout.
* ``"mae-pixel"``    MAE-ResNet on pixels, patchified ``patch_size`` x ``patch_size`` (8 for 256x256x3).
* ``"mae"``          MAE-ResNet with the architecture taken from the weights file (or from the options).
* ``"convnext"``     ConvNeXt-V2 keys plus ``global``/``norm_x`` (pixel inputs in [-1, 1]).
* ``"mae-pixel+convnext"``  both encoders' keys (the paper's final pixel models); the ConvNeXt file is
  ``convnext_weights=PATH``, or both files in one option: ``weights="MAE_PATH+CONVNEXT_PATH"``.
* ``"mae+pixel-multiscale"``  MAE-ResNet keys (architecture from the file) plus the encoder-free ``px*`` keys
  of ``pixel-multiscale`` (small images: the demo's MAE variant).
* ``"resnet18"``, ``"resnet50"``  torchvision ResNets (``global``, ``norm_x`` and the 4 stage maps).

Options of the encoder names: ``weights=PATH`` (a local file; None = random init, for tests and demos only),
``vae=PATH`` (decode latent inputs with the SD-VAE before a pixel encoder; ``global`` stays the latent),
``device``. MAE options: ``width`` (256 / 640), ``in_channels``, ``patch_size``, ``layers``, ``num_classes``.
ConvNeXt options (default Base): ``depths``/``dims``/``resolution`` for "convnext", ``convnext_depths``/
``convnext_dims`` for the combination. ResNet option: ``resolution``. The encoder-free names accept the
``weights``/``vae``/``device`` options a caller passes generically, as long as no file is named.
Every extractor is returned frozen (eval mode, parameters without gradients).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

from drift.features.base import PATCH_SIZES, FeatureExtractor
from drift.features.convnext import build_convnext_features
from drift.features.mae_resnet import MAEFeatures, build_mae_encoder
from drift.features.pixels import MULTISCALE_PATCH_SIZES, CombinedFeatures, PixelFeatures, PixelMultiscaleFeatures
from drift.features.tv_resnet import build_tv_resnet_features
from drift.features.vae import DecodeFirst, load_vae


def _no_encoder(name: str, weights, vae) -> None:
    # The trainer passes weights / vae generically: empty values are fine, a named file would be ignored.
    for k, v in (("weights", weights), ("vae", vae)):
        if v not in (None, ""):
            raise ValueError(f"feature extractor {name!r} has no encoder, but {k}={v!r} was given")


def _maybe_vae(extractor: FeatureExtractor, vae, device) -> FeatureExtractor:
    return extractor if vae is None else DecodeFirst(load_vae(vae, device=device), extractor)


def _pixels(*, weights=None, vae=None, device=None, **kw) -> FeatureExtractor:
    _no_encoder("pixels", weights, vae)
    if kw:
        raise TypeError(f"build_feature_extractor('pixels') takes no options, got {sorted(kw)}")
    return PixelFeatures().freeze()  # no parameters: `device` needs no action


def _pixel_multiscale(*, weights=None, vae=None, device=None, patch_sizes=MULTISCALE_PATCH_SIZES,
                      pool_sizes=PATCH_SIZES) -> FeatureExtractor:
    _no_encoder("pixel-multiscale", weights, vae)
    return PixelMultiscaleFeatures(patch_sizes, pool_sizes).freeze()


def _mae(preset: Optional[str], input_space: Optional[str]) -> Callable[..., FeatureExtractor]:
    """Builder of an MAE-ResNet name; `preset` fills the options the weights file does not fix."""
    def build(*, weights=None, vae=None, device=None, **mae_options) -> FeatureExtractor:
        enc = build_mae_encoder(weights, preset=preset, device=device, **mae_options)
        return _maybe_vae(MAEFeatures(enc, input_space=input_space), vae, device).freeze()
    return build


def _mae_pixel_multiscale(*, weights=None, vae=None, device=None, **mae_options) -> FeatureExtractor:
    enc = build_mae_encoder(weights, preset=None, device=device, **mae_options)
    ex = CombinedFeatures([MAEFeatures(enc), PixelMultiscaleFeatures(with_base=False)])
    return _maybe_vae(ex, vae, device).freeze()


def _convnext(*, weights=None, vae=None, device=None, **convnext_options) -> FeatureExtractor:
    ex = build_convnext_features(weights, device=device, with_base=True, **convnext_options)
    return _maybe_vae(ex, vae, device).freeze()


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


def _mae_pixel_convnext(*, weights=None, vae=None, device=None, convnext_weights=None, convnext_depths=None,
                        convnext_dims=None, **mae_options) -> FeatureExtractor:
    weights, convnext_weights = _split_pair(weights, convnext_weights)
    cnx_arch = {k: v for k, v in (("depths", convnext_depths), ("dims", convnext_dims)) if v is not None}
    enc = build_mae_encoder(weights, preset="pixel", device=device, **mae_options)
    parts = [MAEFeatures(enc, input_space="pixels"),
             build_convnext_features(convnext_weights, device=device, with_base=False, **cnx_arch)]
    return _maybe_vae(CombinedFeatures(parts), vae, device).freeze()


def _tv_resnet(name: str) -> Callable[..., FeatureExtractor]:
    def build(*, weights=None, vae=None, device=None, resolution=None) -> FeatureExtractor:
        ex = build_tv_resnet_features(name, weights, device=device, resolution=resolution)
        return _maybe_vae(ex, vae, device).freeze()
    return build


EXTRACTORS: Dict[str, Callable[..., FeatureExtractor]] = {
    "pixels": _pixels,
    "pixel-multiscale": _pixel_multiscale,
    "mae-latent": _mae("latent", "latent"),
    "mae-pixel": _mae("pixel", None),  # None: the input space follows the architecture (pixels unless 4-ch p=1)
    "mae": _mae(None, None),
    "convnext": _convnext,
    "mae-pixel+convnext": _mae_pixel_convnext,
    "mae+pixel-multiscale": _mae_pixel_multiscale,
    "resnet18": _tv_resnet("resnet18"),
    "resnet50": _tv_resnet("resnet50"),
}


def feature_extractor_names() -> tuple:
    """All names accepted by `build_feature_extractor`, in registry order."""
    return tuple(EXTRACTORS)


def build_feature_extractor(name: str = "pixels", **kw) -> FeatureExtractor:
    """Build a frozen feature extractor by name (see the module docstring for names and options).

    Keyword arguments go to the name's builder (e.g. ``weights=PATH``, ``width=640``, ``vae=PATH``); an
    option the name does not take is a TypeError naming it.
    """
    builder = EXTRACTORS.get(name)
    if builder is None:
        raise ValueError(f"unknown feature extractor {name!r}; known: {', '.join(map(repr, EXTRACTORS))}")
    return builder(**kw)
