"""Feature keys: what the drifting field is computed on (paper §3.4 Eq. 13-14, App. A.5), and the extractor
base class. A leaf: it imports torch only, so every other module of `drift.features` may build on it.

A feature extractor maps a batch of samples x [N, C, H, W] to a dict of feature keys, each a tensor
[N, L, D]: L "locations" (independent drifting problems that share one feature scale and one drift scale)
of D-dim vectors. The official key set for an encoder is

* ``global``  the sample itself, flattened (the vanilla term)              [N, 1, C*H*W]
* ``norm_x``  per-channel RMS of the encoder input, sqrt(mean_hw x^2 + 1e-6) [N, 1, C0]
* for every encoder feature map ``name`` [N, C, H, W], 7 keys (`map_features`):
  ``name`` (per-location vectors [N, H*W, C]), ``name_mean``/``name_std`` [N, 1, C], and the means/stds
  over non-overlapping 2x2 and 4x4 patches ``name_mean_2``, ``name_std_2``, ``name_mean_4``, ``name_std_4``
  [N, (H/p)(W/p), C]; a patch size is used only where it divides H (and W).

The trainer groups rows per class with ``feat.view(N_c, G, L, D).transpose(1, 2)`` -> [N_c, L, G, D].
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORM_X_EPS = 1e-6  # official: sqrt(mean(x^2) + 1e-6)
STD_EPS = 1e-6     # official: sqrt(var + 1e-6), in fp32
PATCH_SIZES = (2, 4)
# ImageNet normalization of the pixel encoders pretrained on it (ConvNeXt-V2, torchvision ResNets)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_map(arg: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{arg} must have shape [N, C, H, W], got {tuple(x.shape)}")


def base_features(x: torch.Tensor, *, global_input: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
    """The encoder-independent keys: ``global`` [N, 1, C*H*W] and ``norm_x`` [N, 1, C] (fp32).

    ``norm_x`` is taken on `x` (the encoder input after any patchify, official); ``global`` flattens
    `global_input` when given (e.g. the raw generator output when x is its patchified or decoded form),
    otherwise x itself.
    """
    _check_map("x", x)
    g = x if global_input is None else global_input
    n = x.shape[0]
    if g.shape[0] != n:
        raise ValueError(f"global_input has batch {g.shape[0]}, x has {n}")
    xf = x.float()
    norm_x = torch.sqrt(xf.square().mean(dim=(2, 3)) + NORM_X_EPS)
    return {"global": g.reshape(n, 1, -1), "norm_x": norm_x.unsqueeze(1)}


def per_location(fmap: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C] as a strided view of `fmap` (no copy for NCHW or channels_last maps)."""
    n, c, h, w = fmap.shape
    # permute is always a view; H and W are adjacent after it, so merging them is a view whenever
    # stride(H) == W * stride(W), which holds for both contiguous and channels_last layouts.
    return fmap.permute(0, 2, 3, 1).flatten(1, 2)


def _mean_std(t: torch.Tensor, dims, eps: float):
    # var_mean: one fused pass with a stable (Welford-style) variance in fp32; biased, as jnp.var.
    var, mean = torch.var_mean(t, dim=dims, keepdim=True, correction=0)
    return mean, torch.sqrt(var + eps)


def map_features(name: str, fmap: torch.Tensor, patch_sizes: Sequence[int] = PATCH_SIZES,
                 eps: float = STD_EPS) -> Dict[str, torch.Tensor]:
    """The 7 keys of one feature map (fewer where a patch size does not divide the map); see module doc.

    Per-location vectors keep fmap's dtype and share its storage; means and stds are fp32 (biased
    variance, as jnp.var).
    """
    _check_map(f"feature map {name!r}", fmap)
    n, c, h, w = fmap.shape
    out = {name: per_location(fmap)}
    f = fmap.float()
    mean, std = _mean_std(f, (2, 3), eps)
    out[f"{name}_mean"] = mean.view(n, 1, c)
    out[f"{name}_std"] = std.view(n, 1, c)
    for p in patch_sizes:
        p = int(p)
        if p < 1:
            raise ValueError(f"patch_sizes must be positive, got {p}")
        if h % p or w % p:
            continue
        # Pooling kernels, centered second moment: ~2x faster on CPU than a var_mean over the strided
        # patch dims, and as stable (no E[x^2] - E[x]^2 cancellation).
        pm = F.avg_pool2d(f, p)
        centered = f - pm.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        ps = torch.sqrt(F.avg_pool2d(centered.square(), p) + eps)
        out[f"{name}_mean_{p}"] = pm.reshape(n, c, (h // p) * (w // p)).transpose(1, 2)
        out[f"{name}_std_{p}"] = ps.reshape(n, c, (h // p) * (w // p)).transpose(1, 2)
    return out


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C*p*p, H/p, W/p]; channel order (c, i, j) within a patch."""
    if p == 1:
        return x
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"input spatial size {h}x{w} is not divisible by patch_size={p}")
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: [N, C*p*p, H/p, W/p] -> [N, C, H, W]."""
    if p == 1:
        return x
    n, cpp, hp, wp = x.shape
    c = cpp // (p * p)
    x = x.reshape(n, c, p, p, hp, wp).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c, hp * p, wp * p)


class FeatureExtractor(nn.Module):
    """Protocol of every extractor: ``forward(x [N, C, H, W]) -> dict[str, Tensor [N, L, D]]``.

    Extractors are frozen (eval mode, no parameter gradients) but differentiable w.r.t. x, so the loss
    gradient reaches the generator through them. `input_space` says what x is ("pixels" in [-1, 1] or
    "latent"); the key names are fixed for a given input shape.
    """

    input_space: str = "any"

    def freeze(self) -> "FeatureExtractor":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        # Feature encoders never switch to train mode inside the generator's trainer (GroupNorm has no
        # running stats, but dropout / drop-path would otherwise turn on).
        return super().train(False)

    @torch.no_grad()
    def describe(self, input_shape: Sequence[int]) -> Dict[str, tuple]:
        """Key -> (L, D) for inputs of shape [N, *input_shape]: one zero sample through the extractor on its
        own device (instant for an extractor built on the meta device)."""
        tensors = list(self.parameters()) + list(self.buffers())
        dev = tensors[0].device if tensors else torch.device("cpu")
        x = torch.zeros((1, *input_shape), device=dev)
        return {k: tuple(v.shape[1:]) for k, v in self(x).items()}


def imagenet_input(x: torch.Tensor, resolution, encoder: str, keep_dtype: bool = False) -> torch.Tensor:
    """Samples x [N, 3, H, W] in [-1, 1] -> the input of an ImageNet-trained encoder: [0, 1], then the ImageNet
    mean/std, bilinearly resized to `resolution` x `resolution` (antialiased when shrinking; None keeps the size),
    contiguous NCHW. fp32 unless `keep_dtype`. `encoder` names the caller in the error for a non-RGB input."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{encoder} features expect RGB x [N, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
    h = x if keep_dtype else x.float()
    mean = torch.tensor(IMAGENET_MEAN, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    h = ((h + 1.0) * 0.5 - mean) / std
    if resolution is not None and h.shape[-2:] != (resolution, resolution):
        shrink = h.shape[-1] > resolution or h.shape[-2] > resolution
        h = F.interpolate(h, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)
    # contiguous NCHW whatever the caller's layout: channels-last input + a 1x1 stride-2 conv backward is broken
    # on CPU (see mae_resnet.py)
    return h.contiguous()
