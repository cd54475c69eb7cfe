"""SD-VAE (diffusers `AutoencoderKL`, e.g. `stabilityai/sd-vae-ft-mse`) from local files, scale 0.18215.

Latent generators produce z = 0.18215 * (VAE latent) [N, 4, 32, 32]; pixel-space feature encoders need the
decoded image, so `SDVAE.decode(z)` is differentiable and `DecodeFirst` puts it in front of a pixel extractor
(paper §7: gradients flow through the encoder and the decoder into the generator).

Weights: a diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``),
i.e. what ``AutoencoderKL.save_pretrained(DIR)`` writes; loaded with ``local_files_only=True`` (never downloads).
"""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch import nn

from drift.features.base import FeatureExtractor
from drift.features.weights import WeightsError

VAE_SCALE = 0.18215  # SD-VAE latent scale (official: sd-vae-ft-mse, scale 0.18215)


def load_autoencoder_kl(path, device=None, dtype=None):
    """diffusers AutoencoderKL from a local directory; a clear error naming `path` otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise WeightsError(f"VAE directory not found: {path} (expected a diffusers AutoencoderKL directory with "
                           f"config.json and diffusion_pytorch_model.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise WeightsError(f"VAE directory {path} has no config.json")
    from diffusers import AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:
        raise WeightsError(f"cannot load the VAE from {path}: {type(e).__name__}: {e}") from e
    if device is not None or dtype is not None:
        vae = vae.to(device=device, dtype=dtype)
    return vae


class SDVAE(nn.Module):
    """Frozen AutoencoderKL with the latent scale applied: encode(x in [-1, 1]) -> z, decode(z) -> x."""

    def __init__(self, vae, scale: float = VAE_SCALE):
        super().__init__()
        self.vae = vae
        self.scale = float(scale)
        self.vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None):
        """x [N, 3, H, W] in [-1, 1] -> z [N, 4, H/8, W/8]: a posterior sample (official) or its mean, x scale."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VAE encode expects x [N, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        if sample:
            eps = torch.randn(dist.mean.shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype)
            z = dist.mean + dist.std * eps
        else:
            z = dist.mean
        return z * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, 4, h, w] (scaled latent) -> x [N, 3, 8h, 8w], differentiable w.r.t. z."""
        if z.dim() != 4:
            raise ValueError(f"VAE decode expects z [N, C, h, w], got {tuple(z.shape)}")
        return self.vae.decode(z.to(self.vae.dtype) / self.scale).sample


def load_vae(path, device=None, dtype=None) -> SDVAE:
    return SDVAE(load_autoencoder_kl(path, device=device, dtype=dtype))


class DecodeFirst(FeatureExtractor):
    """Latent input -> VAE decode -> a pixel-space extractor. ``global`` is the latent itself (the vanilla
    term is on the generator output); every other key comes from the decoded image."""

    input_space = "latent"

    def __init__(self, vae: SDVAE, inner: FeatureExtractor):
        super().__init__()
        self.vae = vae
        self.inner = inner

    def forward(self, z: torch.Tensor) -> Dict[str, torch.Tensor]:
        # No clamp to [-1, 1]: it would zero the gradient of every saturated pixel.
        x = self.vae.decode(z)
        out = self.inner(x)
        if "global" in out:
            out["global"] = z.reshape(z.shape[0], 1, -1)
        return out
