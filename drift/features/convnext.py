"""ConvNeXt-V2 feature keys for pixel generators (paper Table 9; official: `facebook/convnextv2-base-22k-224`).

`ConvNeXtV2` is our own implementation of the architecture (Woo et al. 2023: patchify stem, stages of
depthwise 7x7 conv -> LayerNorm -> 4x MLP with GELU and Global Response Normalization, LN + 2x2 conv
downsampling). Its state_dict names match the `transformers` ConvNextV2 checkpoints, so the weights of
``facebook/convnextv2-base-22k-224`` load from a local file:

* ``model.safetensors`` or ``pytorch_model.bin`` of that repository (or the directory holding them), i.e. a
  state_dict with keys ``convnextv2.embeddings.patch_embeddings.weight``, ``convnextv2.encoder.stages.{i}.
  layers.{j}.dwconv.weight``, ..., ``convnextv2.layernorm.weight``, ``classifier.*`` (the classifier is ignored;
  keys without the ``convnextv2.`` prefix, as saved by ConvNextV2Model, work too);
* or a ``torch.save`` of `ConvNeXtV2.state_dict()`.

Features (`ConvNeXtFeatures`, official `get_activations`): x in [-1, 1] -> [0, 1] -> ImageNet mean/std ->
bilinear resize to 224 (antialiased when shrinking, like jax.image.resize) -> the 4 stage outputs, each
standardized per location over channels as (y - mean) / (std + 1e-3). Keys (13), ours -> official name:

    convnext_stage{1,2,3}          per-location vectors        convenxt_stage_{1,2,3}       (sic)
    convnext_stage{0..3}_mean/_std over locations             convenxt_stage_{0..3}_mean/_std
    convnext_global_mean           final LayerNorm of the      global_mean
                                   pooled raw last stage
    convnext_global_std            std over locations of the   global_std
                                   standardized last stage     (the same values as convenxt_stage_3_std)

Stds over locations are sqrt(var + 1e-6) (official `safe_std`).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from drift.features.base import FeatureExtractor, base_features, imagenet_input, per_location
from drift.features.weights import WeightsError, load_into, read_weights, strip_prefixes

BASE_DEPTHS = (3, 3, 27, 3)
BASE_DIMS = (128, 256, 512, 1024)
STANDARDIZE_EPS = 1e-3  # official: added to the per-location std (not to the variance)
STD_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on channels-last input [N, H, W, C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # per-channel energy over space
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)                    # relative to the channel mean
        return self.weight * (x * nx) + self.bias + x


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.layernorm(h)))))
        return x + h.permute(0, 3, 1, 2)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, downsample: bool):
        super().__init__()
        # ModuleList (not Sequential) so the parameter names are downsampling_layer.{0,1}.* as in transformers
        self.downsampling_layer = nn.ModuleList(
            [LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, cout, 2, 2)] if downsample else [])
        self.layers = nn.ModuleList([Block(cout) for _ in range(depth)])

    def forward(self, x):
        for m in self.downsampling_layer:
            x = m(x)
        for m in self.layers:
            x = m(x)
        return x


class Embeddings(nn.Module):
    def __init__(self, cin: int, dim: int, patch: int):
        super().__init__()
        self.patch_embeddings = nn.Conv2d(cin, dim, patch, patch)
        self.layernorm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x):
        return self.layernorm(self.patch_embeddings(x))


class Encoder(nn.Module):
    def __init__(self, depths, dims):
        super().__init__()
        self.stages = nn.ModuleList(
            [Stage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0) for i in range(len(depths))])


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 trunk; `forward(x)` -> (list of stage outputs [N, C_i, H_i, W_i], pooled + LayerNorm [N, C])."""

    def __init__(self, depths: Sequence[int] = BASE_DEPTHS, dims: Sequence[int] = BASE_DIMS, in_channels: int = 3,
                 patch_size: int = 4, layer_norm_eps: float = 1e-12):
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must be non-empty and of equal length")
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.embeddings = Embeddings(in_channels, dims[0], patch_size)
        self.encoder = Encoder(depths, dims)
        self.layernorm = nn.LayerNorm(dims[-1], eps=layer_norm_eps)  # transformers' config.layer_norm_eps

    def forward(self, x):
        h = self.embeddings(x)
        outs = []
        for st in self.encoder.stages:
            h = st(h)
            outs.append(h)
        return outs, self.layernorm(h.mean(dim=(2, 3)))


def _standardize(f: torch.Tensor) -> torch.Tensor:
    """Per location over channels: (f - mean) / (std + 1e-3), std the biased one (official `normalize`)."""
    f = f.float()
    mu = f.mean(dim=1, keepdim=True)
    std = (f - mu).square().mean(dim=1, keepdim=True).sqrt()
    return (f - mu) / (std + STANDARDIZE_EPS)


def _mean_std_hw(f: torch.Tensor):
    n, c = f.shape[:2]
    mu = f.mean(dim=(2, 3))
    var = (f - mu[:, :, None, None]).square().mean(dim=(2, 3))
    return mu.view(n, 1, c), torch.sqrt(var + STD_EPS).view(n, 1, c)


class ConvNeXtFeatures(FeatureExtractor):
    """The 13 official ConvNeXt-V2 keys (plus ``global``/``norm_x`` when `with_base`)."""

    input_space = "pixels"

    def __init__(self, model: ConvNeXtV2, resolution: int = 224, with_base: bool = False, prefix: str = "convnext"):
        super().__init__()
        self.model = model
        self.resolution = resolution
        self.with_base = with_base
        self.prefix = prefix

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return imagenet_input(x, self.resolution, "ConvNeXt")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = base_features(x) if self.with_base else {}
        stages, pooled = self.model(self.preprocess(x))
        p = self.prefix
        for i, f in enumerate(stages):
            z = _standardize(f)
            if i > 0:
                out[f"{p}_stage{i}"] = per_location(z)
            out[f"{p}_stage{i}_mean"], out[f"{p}_stage{i}_std"] = _mean_std_hw(z)
        out[f"{p}_global_mean"] = pooled.float().unsqueeze(1)
        # official: the std of the *standardized* last stage, i.e. the last stage's _std key once more
        out[f"{p}_global_std"] = out[f"{p}_stage{len(stages) - 1}_std"].clone()
        return out


def convnext_arch(sd: Dict[str, torch.Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(depths, dims) of a ConvNeXt-V2 state_dict in the transformers layout (prefix already stripped)."""
    blocks: Dict[int, set] = {}
    dims: Dict[int, int] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) > 5 and parts[:2] == ["encoder", "stages"] and parts[3] == "layers":
            stage, layer = int(parts[2]), int(parts[4])
            blocks.setdefault(stage, set()).add(layer)
            if parts[5] == "dwconv" and parts[-1] == "weight":
                dims[stage] = int(v.shape[0])
    stages = sorted(blocks)
    if not stages or stages != list(range(len(stages))) or sorted(dims) != stages:
        raise WeightsError("cannot read the ConvNeXt-V2 architecture off the weights: expected keys "
                           "encoder.stages.<i>.layers.<j>.dwconv.weight for consecutive stages")
    return tuple(len(blocks[i]) for i in stages), tuple(dims[i] for i in stages)


def build_convnext(weights=None, *, depths=None, dims=None, device=None) -> ConvNeXtV2:
    """ConvNeXt-V2 with weights from a local file (see module docstring), random if None.

    The architecture is read off the file unless `depths`/`dims` are given (then the file must match);
    without a file it defaults to Base."""
    sd = None
    if weights is not None:
        sd, _ = read_weights(weights)
        sd = strip_prefixes(sd, ("convnextv2.",))
        file_depths, file_dims = convnext_arch(sd)
        depths = file_depths if depths is None else depths
        dims = file_dims if dims is None else dims
    with torch.device(device or "cpu"):
        model = ConvNeXtV2(BASE_DEPTHS if depths is None else depths, BASE_DIMS if dims is None else dims)
    if sd is not None:
        load_into(model, weights, sd, ignore_prefixes=("classifier.",))
    return model


def build_convnext_features(weights=None, *, device=None, with_base=False, resolution=224,
                            depths=None, dims=None) -> ConvNeXtFeatures:
    return ConvNeXtFeatures(build_convnext(weights, depths=depths, dims=dims, device=device),
                            resolution=resolution, with_base=with_base).freeze()
