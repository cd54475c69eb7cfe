"""Encoder-free extractors: ``pixels`` (base keys only), ``pixel-multiscale`` (patch-vector maps of the image
itself, for small demo data) and `CombinedFeatures`, the union of several extractors' keys."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from drift.features.base import PATCH_SIZES, FeatureExtractor, base_features, map_features, patchify

MULTISCALE_PATCH_SIZES = (2, 4, 7, 14)  # for 28x28 images: grids of 14, 7, 4 and 2 patches per side


class PixelFeatures(FeatureExtractor):
    """No encoder: only ``global`` and ``norm_x`` of the sample itself (the toy / no-encoder setting)."""

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return base_features(x)


class PixelMultiscaleFeatures(FeatureExtractor):
    """Encoder-free multi-scale keys for small images (demo data): ``global``, ``norm_x`` and, for every size p
    in `patch_sizes` that divides H and W, the image patchified p x p into a map [N, C*p*p, H/p, W/p] whose
    `map_features` (prefix ``px{p}``) give per-patch vectors, their mean/std, and 2x2 / 4x4 pooled means/stds
    over the patch grid. A stand-in for an encoder's multi-scale maps when no pretrained encoder exists."""

    def __init__(self, patch_sizes: Sequence[int] = MULTISCALE_PATCH_SIZES, pool_sizes: Sequence[int] = PATCH_SIZES,
                 with_base: bool = True):
        super().__init__()
        if not patch_sizes or any(int(p) < 1 for p in patch_sizes):
            raise ValueError(f"patch_sizes must be positive integers, got {patch_sizes}")
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.pool_sizes = tuple(int(p) for p in pool_sizes)
        self.with_base = bool(with_base)  # False: only the px* keys (beside an encoder that gives global/norm_x)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = base_features(x) if self.with_base else {}
        h, w = x.shape[-2:]
        for p in self.patch_sizes:
            if h % p or w % p:
                continue
            out.update(map_features(f"px{p}", patchify(x, p), patch_sizes=self.pool_sizes))
        return out


class CombinedFeatures(FeatureExtractor):
    """Union of several extractors' keys; later extractors must not reuse an earlier key name."""

    def __init__(self, parts: Sequence[FeatureExtractor]):
        super().__init__()
        if not parts:
            raise ValueError("CombinedFeatures needs at least one extractor")
        self.parts = nn.ModuleList(parts)
        self.input_space = parts[0].input_space

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for part in self.parts:
            for k, v in part(x).items():
                if k in out:
                    raise ValueError(f"feature key {k!r} produced twice by {type(part).__name__}")
                out[k] = v
        return out
