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

from drift.features.base import FeatureExtractor, base_features, imagenet_input, map_features
from drift.features.weights import load_into


class TVResNetFeatures(FeatureExtractor):
    input_space = "pixels"

    def __init__(self, net, resolution: Optional[int] = None, prefix: str = "resnet"):
        super().__init__()
        self.net = net
        self.resolution = resolution
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = base_features(x)
        h = imagenet_input(x, self.resolution, "ResNet", keep_dtype=True)
        n = self.net
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
