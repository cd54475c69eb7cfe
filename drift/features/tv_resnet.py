"""torchvision ResNet-18/50 as simpler pixel-space feature encoders (paper Table 3 uses SimCLR / MoCo-v2
ResNet-50 checkpoints the same way).

Weights: a local torchvision-format state_dict (e.g. ``resnet50-0676ba61.pth``; ``module.`` and ``_orig_mod.``
prefixes are stripped, ``fc.*`` is ignored). MoCo / SimCLR checkpoints converted to that naming load as well.
Input: RGB in [-1, 1] -> [0, 1] -> ImageNet mean/std (optionally resized to `resolution`). BatchNorm stays in
eval mode. Keys: ``global``, ``norm_x`` (of the input) and the 7 keys of each stage output
``resnet_layer{1..4}`` (`drift.features.base.map_features`).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from drift.features.base import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, base_features, map_features
from drift.features.weights import load_into


class TVResNetFeatures(FeatureExtractor):
    input_space = "pixels"

    def __init__(self, net, resolution: Optional[int] = None, prefix: str = "resnet"):
        super().__init__()
        self.net = net
        self.resolution = resolution
        self.prefix = prefix
        dev = next(net.parameters()).device
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet features expect RGB x [N, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
        out = base_features(x)
        h = ((x + 1.0) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.resolution is not None and h.shape[-2:] != (self.resolution, self.resolution):
            h = F.interpolate(h, size=(self.resolution,) * 2, mode="bilinear", align_corners=False,
                              antialias=h.shape[-1] > self.resolution)
        n = self.net
        h = h.contiguous()  # channels-last input + 1x1 stride-2 conv backward is broken on CPU (see mae_resnet.py)
        h = n.maxpool(n.relu(n.bn1(n.conv1(h))))
        for i in range(1, 5):
            h = getattr(n, f"layer{i}")(h)
            out.update(map_features(f"{self.prefix}_layer{i}", h))
        return out


def build_tv_resnet(name: str, weights=None, *, device=None):
    import torchvision
    if name not in ("resnet18", "resnet50"):
        raise ValueError(f"unknown torchvision ResNet {name!r}; use resnet18 or resnet50")
    with torch.device(device or "cpu"):
        net = getattr(torchvision.models, name)(weights=None)  # never downloads
    net.fc = torch.nn.Identity()  # the classifier is not a feature; file keys fc.* are ignored
    if weights is not None:
        load_into(net, weights, ignore_prefixes=("fc.",))
    return net


def build_tv_resnet_features(name: str, weights=None, *, device=None, resolution=None) -> TVResNetFeatures:
    return TVResNetFeatures(build_tv_resnet(name, weights, device=device), resolution=resolution).freeze()
