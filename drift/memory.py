"""A coarse analytical estimate of a training run's memory, and the check that refuses a run that cannot fit.

    est = estimate_train_memory(cfg, num_classes=1000, item_shape=(4, 32, 32))
    print(est.describe())                 # total and its terms
    check_fits(est, device)               # UserError naming the estimate when it exceeds the free memory

What is counted, per rank (bytes):
* generator state: parameters + gradients + AdamW's two moments (fp32: 16 B per parameter) + one fp32 copy per
  EMA decay; the parameter count is exact (the generator is built on the meta device, no memory used);
* generator activations kept for backward, per generated sample: 34 B per token per hidden unit per block in
  16-bit autocast (the usual transformer-block count with fused attention, 2x that in fp32); with activation
  checkpointing only each block's input is kept, plus one block being recomputed;
* feature-encoder activations kept for backward (the loss backpropagates through the frozen encoder into the
  generated samples), per generated sample, from the encoder's stage widths and resolutions (MAE-ResNet,
  ConvNeXt-V2 Base, torchvision ResNets; a few copies of the sample for the encoder-free pixel features);
  the encoder's own weights; the feature maps of the real positives and negatives (kept for the field);
* the device-resident queues (per-class and global ring buffers of fp32 items, or uint8 images).
Peaks of the allocator, fragmentation, workspace of fused kernels and torch.compile buffers are not modelled:
the number is meant to catch a configuration that is off by a large factor (the ImageNet defaults on a laptop),
not to predict a GPU's peak. The free memory is `torch.cuda.mem_get_info` on CUDA and MemAvailable of
/proc/meminfo on CPU (summed over the ranks of this host, which share it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from drift.cli import UserError

GIB = float(1 << 30)
BLOCK_BYTES_16BIT = 34  # activations per token per hidden unit per transformer block, 16-bit, fused attention
# (family, stage depths, stage widths, input downsampling of stage 1, bytes per element-of-output per block)
_CONVNEXT_BASE = ((3, 3, 27, 3), (128, 256, 512, 1024), 4, 18)
_RESNET18 = ((2, 2, 2, 2), (64, 128, 256, 512), 4, 8)
_RESNET50 = ((3, 4, 6, 3), (256, 512, 1024, 2048), 4, 5)
_MAE_LAYERS = (3, 4, 6, 3)
MAE_WIDTH = 256  # the paper's smaller MAE; the 640-wide one is 2.5x this per element


@dataclass
class MemoryEstimate:
    """Bytes per rank, term by term (`terms`), and what they were computed for."""
    terms: Dict[str, float] = field(default_factory=dict)
    params: int = 0
    gen_samples: int = 0
    ranks_per_host: int = 1

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.terms.items())
        per_host = f" x {self.ranks_per_host} ranks on this host" if self.ranks_per_host > 1 else ""
        return (f"{self.total / GIB:.1f} GiB per rank{per_host} ({parts} GiB; {self.params / 1e6:.1f}M generator "
                f"parameters, {self.gen_samples} generated samples per step per rank)")


def meta_generator(cfg, num_classes: int, item_shape: Sequence[int]):
    """The generator `cfg` names, built on the meta device (shapes and parameter count, no memory)."""
    from drift.model import build_generator_model
    with torch.device("meta"):
        return build_generator_model(cfg, num_classes, int(item_shape[1]), int(item_shape[0]))


def _conv_stages(spec, size: int) -> Tuple[float, float]:
    """(activation elements kept for backward, output-map elements) of a 4-stage CNN on a size x size input."""
    depths, widths, down, per_el = spec
    act = out = 0.0
    r = max(size // down, 1)
    for i, (n, c) in enumerate(zip(depths, widths)):
        if i:
            r = max(r // 2, 1)
        act += n * per_el * c * r * r
        out += c * r * r
    return act, out


def _mae_stages(grid: int, width: int) -> Tuple[float, float]:
    spec = (_MAE_LAYERS, tuple(width * 2 ** i for i in range(4)), 1, 8)
    act, out = _conv_stages(spec, grid)
    return act + 3 * width * grid * grid, out + width * grid * grid  # + the stride-1 stem


def encoder_elements(features: str, item_shape: Sequence[int]) -> Tuple[float, float, float]:
    """(activation elements per generated sample, feature-map elements per real sample, encoder parameters)
    of the feature extractor `features` on items of `item_shape` (C, H, W)."""
    c, h, w = (int(v) for v in item_shape)
    numel = c * h * w
    act, maps, params = 0.0, float(numel), 0.0
    if "mae" in features:
        grid = h if h <= 64 else h // 8  # latents and small images: stride-1 stem; 256 px: 8x8 patchify
        a, m = _mae_stages(grid, MAE_WIDTH)
        act, maps = act + a, maps + m
        params += 11e6 * (MAE_WIDTH / 256) ** 2 * 2  # ResNet-34-like trunk at 2x the width of a ResNet-34
    if "convnext" in features:
        a, m = _conv_stages(_CONVNEXT_BASE, 224)
        act, maps, params = act + a, maps + m, params + 88e6
    for name, spec, p in (("resnet18", _RESNET18, 11.7e6), ("resnet50", _RESNET50, 25.6e6)):
        if name in features:
            a, m = _conv_stages(spec, max(h, 32))
            act, maps, params = act + a, maps + m, params + p
    if "pixel" in features:  # pooled / patch views of the sample itself
        act += (12 if "multiscale" in features else 4) * numel
    return act, maps, params


def estimate_train_memory(cfg, num_classes: int, item_shape: Sequence[int], world_size: int = 1,
                          device_type: Optional[str] = None, ranks_per_host: int = 1) -> MemoryEstimate:
    """Coarse per-rank memory of training `cfg` on items of `item_shape` (C, H, W) with `num_classes` classes."""
    if device_type is None:
        device_type = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) \
            else "cpu"
    half = device_type == "cuda" and cfg.bf16
    scale = 1.0 if half else 2.0  # 16-bit autocast keeps most saved activations in 2 bytes, fp32 in 4
    labels = max(cfg.train_batch_size // max(world_size, 1), 1)
    gen = labels * cfg.gen_per_label
    reals = labels * (cfg.pos_per_sample + cfg.neg_per_sample)
    model = meta_generator(cfg, num_classes, item_shape)
    P = sum(p.numel() for p in model.parameters())
    c, h, w = (int(v) for v in item_shape)
    tokens, hidden, depth = model.num_patches + model.num_prefix_tokens, model.hidden_size, model.depth
    block = BLOCK_BYTES_16BIT * scale * tokens * hidden
    act_gen = (depth * tokens * hidden * 2 * scale + block) if cfg.grad_checkpointing else depth * block
    enc_act, enc_maps, enc_params = encoder_elements(cfg.features, item_shape)
    bytes_el = 2 * scale
    numel = c * h * w
    est = MemoryEstimate(params=P, gen_samples=gen, ranks_per_host=ranks_per_host)
    est.terms["generator+optimizer+EMA"] = float(P * (16 + 4 * len(cfg.ema_decay)))
    est.terms["generator activations"] = float(gen * act_gen)
    est.terms["encoder activations"] = float(gen * enc_act * bytes_el)
    est.terms["encoder weights"] = float(enc_params * 4)
    est.terms["real features"] = float(reals * enc_maps * 4)
    est.terms["queues"] = float((num_classes * cfg.positive_bank_size + cfg.negative_bank_size) * numel
                                * (1 if cfg.queue_dtype == "uint8" else 4))
    if device_type == "cuda":
        est.terms["CUDA context"] = 0.5 * GIB
    return est


def available_memory(device: torch.device) -> Tuple[Optional[float], str]:
    """(free bytes, what was measured) for `device`; (None, reason) when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown (no /proc/meminfo)"


def check_fits(est: MemoryEstimate, device: torch.device, available: Optional[float] = None) -> str:
    """Raise UserError when `est` (times the ranks sharing this host's RAM, on CPU) exceeds the free memory;
    otherwise return a one-line summary. `available` overrides the measured free bytes (tests)."""
    what = "given"
    if available is None:
        available, what = available_memory(device)
    if available is None:
        return f"estimated memory {est.describe()}; free memory {what}: not checked"
    need = est.total * (est.ranks_per_host if device.type == "cpu" else 1)
    if need > available:
        raise UserError(f"estimated memory {est.describe()} exceeds the {what} ({available / GIB:.1f} GiB); "
                        f"choose a --preset (e.g. demo) or lower train_batch_size / gen_per_label / the model size")
    return f"estimated memory {est.describe()}; {what} {available / GIB:.1f} GiB"
