"""The paper's feature encoder: a ResNet-style masked autoencoder (paper §4, App. A.3; official `mae_model`).

Encoder (`MAEResNetEncoder`):
  patchify p x p (p=1 for 32x32x4 SD-VAE latents, p=8 for 256x256x3 pixels -> 32x32x192)
  -> stem: 3x3 conv (stride 1) + GroupNorm + ReLU                                   -> map ``conv1``
  -> 4 stages of basic blocks [3, 4, 6, 3], channels C, 2C, 4C, 8C, stride 2 at the first block of
     stages 2-4; GroupNorm everywhere (official: min(32, C) groups, fewer where that does not divide C;
     eps 1e-6); 1x1 conv + GN shortcut where the shape changes;
     the output of every 2nd block is a map ``layer{s}_blk{k}``; each stage output also goes through an
     extra GroupNorm -> map ``layer{s}`` (the next stage consumes the normalized output).
Decoder (`MAEResNet.decoder`, pretraining only): U-Net: a 3x3 conv block on layer4, then 4 up-blocks
  (bilinear resize to the skip's resolution -> concat skip -> GN -> 2x (3x3 conv + GN + ReLU)), with
  skips layer3, layer2, layer1 and the stem output; a final 1x1 conv back to the patchified input
  channels; unpatchified for pixel inputs.
MAE objective (`MAEResNet.mae_loss`): zero each 2x2 patch of the 32x32 grid with probability 0.5 and
  regress the input with an l2 loss on the masked region only (official: per sample, the squared error summed
  over masked positions and channels / the number of masked positions; mean over the batch).
Classification fine-tune: a linear head on the globally pooled (normalized) layer4.
Initialization (official Flax defaults): every conv and the head lecun_normal (a normal truncated at 2 std,
  variance 1 / fan_in), zero biases, GroupNorm scale 1 and bias 0.

`MAEFeatures` turns the encoder into a feature extractor: ``global`` (the raw input), ``norm_x`` (RMS of
the patchified input) and the 7 keys of each of the 12 maps: 86 keys for the official layout.
`build_mae_encoder` builds the encoder from a weights file (architecture from the file) or from options.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from drift.features.base import FeatureExtractor, base_features, map_features, patchify, unpatchify
from drift.features.weights import WeightsError, load_into, read_weights

MASK_RATIO = 0.5   # official: fixed
MASK_PATCH = 2     # 2x2 patches of the 32x32 grid


GN_EPS = 1e-6  # Flax GroupNorm's default epsilon (the official model keeps it)
TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2] (jax's lecun_normal divides by it)


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The official group count: min(max_groups, channels), lowered until it divides `channels`.

    32 for the paper's widths; below 32 channels every channel is its own group, so a stage output's
    ``*_mean`` / ``*_std`` keys (taken right after a GroupNorm) equal its bias / scale for every input, as in
    the official model at such widths."""
    g = min(max_groups, channels)
    while g > 1 and channels % g:
        g -= 1
    return max(g, 1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that also accepts groups of one value (one channel per group on a 1x1 map of one sample),
    which torch refuses and Flax computes: the normalized value is 0, so the output is the bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        if n * (c // self.num_groups) * x[0, 0].numel() == 1:
            return x * 0.0 + self.bias.view(1, c, *([1] * (x.dim() - 2)))  # x * 0 keeps NaN/Inf inputs visible
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(num_groups(channels), channels, eps=GN_EPS)


@torch.no_grad()
def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's default kernel init in torch's layout ([out, in, ...]): N(0, 1/fan_in) truncated at 2 std."""
    std = (1.0 / weight[0].numel()) ** 0.5 / TRUNC_STD
    return nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


def official_init_(module: nn.Module) -> None:
    """lecun_normal weights and zero biases for every conv and linear layer of `module` (GroupNorms keep 1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            lecun_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv + GN, identity (or 1x1 conv + GN) shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = group_norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), group_norm(cout))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(h + s)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)])
        self.norm = group_norm(cout)  # the official extra GroupNorm on each stage output


@dataclass(frozen=True)
class MAEConfig:
    """Architecture of an MAE-ResNet; saved beside its weights so a checkpoint rebuilds itself."""
    in_channels: int = 4          # channels of the raw input (4 latent, 3 RGB, 1 gray)
    patch_size: int = 1           # 1 for latents, 8 for 256x256 pixels
    width: int = 256              # C; stages have C, 2C, 4C, 8C channels (paper: 256 or 640)
    layers: Tuple[int, ...] = (3, 4, 6, 3)
    every_k_block: int = 2
    num_classes: int = 1000       # classification fine-tune head (0: none)

    @property
    def patch_channels(self) -> int:
        return self.in_channels * self.patch_size ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MAEConfig":
        known = {f for f in cls.__dataclass_fields__}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown MAE config fields {bad}")
        d = dict(d)
        if "layers" in d:
            d["layers"] = tuple(int(v) for v in d["layers"])
        return cls(**d)


# Official presets (paper §8.1, Table 8): latent 32x32x4 with stride-1 stem; pixel 256x256x3 patchified 8x8.
MAE_PRESETS = {
    "latent": dict(in_channels=4, patch_size=1),
    "pixel": dict(in_channels=3, patch_size=8),
}


class MAEResNetEncoder(nn.Module):
    """The ResNet encoder; `forward` returns the ordered dict of named feature maps."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        if cfg.width < 1 or cfg.patch_size < 1 or cfg.in_channels < 1 or not cfg.layers or min(cfg.layers) < 1:
            raise ValueError(f"invalid MAE config {cfg}")
        self.cfg = cfg
        c0, w = cfg.patch_channels, cfg.width
        self.stem = nn.Sequential(nn.Conv2d(c0, w, 3, 1, 1, bias=False), group_norm(w), nn.ReLU())
        stages, cin = [], w
        for i, n in enumerate(cfg.layers):
            cout = w * 2 ** i
            stages.append(Stage(cin, cout, n, 1 if i == 0 else 2))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = cin
        official_init_(self)

    def map_names(self) -> List[str]:
        names = ["conv1"]
        for s, n in enumerate(self.cfg.layers, start=1):
            names += [f"layer{s}_blk{k}" for k in range(1, n + 1) if k % self.cfg.every_k_block == 0]
            names.append(f"layer{s}")
        return names

    def forward(self, xp: torch.Tensor) -> Dict[str, torch.Tensor]:
        """xp: the patchified input [N, C0, H, W]. Returns {map name: [N, C, H, W]} in `map_names()` order."""
        out = {}
        # Channels-last inputs (the loaders' HWC-strided batches) make the convs run channels-last, and the CPU
        # backward of a 1x1 stride-2 conv in that layout corrupts the heap in torch 2.14 (the shortcut
        # projections here). One copy to NCHW keeps every layer in the contiguous format.
        h = self.stem(xp.contiguous())
        out["conv1"] = h
        for s, stage in enumerate(self.stages, start=1):
            for k, blk in enumerate(stage.blocks, start=1):
                h = blk(h)
                if k % self.cfg.every_k_block == 0:
                    out[f"layer{s}_blk{k}"] = h
            h = stage.norm(h)
            out[f"layer{s}"] = h
        return out


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), group_norm(cout), nn.ReLU())


class UpBlock(nn.Module):
    """Resize to the skip's resolution -> concat -> GN -> two 3x3 conv + GN + ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.norm = group_norm(cin + cskip)
        self.convs = nn.Sequential(_conv_block(cin + cskip, cout), _conv_block(cout, cout))

    def forward(self, x, skip):
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(self.norm(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        w, n = cfg.width, len(cfg.layers)
        chans = [w * 2 ** i for i in range(n)]  # stage widths
        self.center = _conv_block(chans[-1], chans[-1])
        ups, cin = [], chans[-1]
        # skips: stages n-1 .. 1, then the stem output (same resolution as stage 1)
        skips = chans[-2::-1] + [w]
        for cs in skips:
            ups.append(UpBlock(cin, cs, cs))
            cin = cs
        self.ups = nn.ModuleList(ups)
        self.out = nn.Conv2d(cin, cfg.patch_channels, 1)
        official_init_(self)

    def forward(self, maps: Dict[str, torch.Tensor], n_stages: int) -> torch.Tensor:
        h = self.center(maps[f"layer{n_stages}"])
        skips = [maps[f"layer{s}"] for s in range(n_stages - 1, 0, -1)] + [maps["conv1"]]
        for up, skip in zip(self.ups, skips):
            h = up(h, skip)
        return self.out(h)


def random_patch_mask(n: int, h: int, w: int, *, ratio: float = MASK_RATIO, patch: int = MASK_PATCH,
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """[N, 1, H, W] float mask, 1 = masked; each patch x patch block masked independently with prob `ratio`."""
    if h % patch or w % patch:
        raise ValueError(f"mask grid {h}x{w} is not divisible by the mask patch {patch}")
    u = torch.rand(n, 1, h // patch, w // patch, generator=generator, device=device)
    m = (u < ratio).float()
    return m.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def masked_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official reconstruction loss of pred/target [N, C, H, W] under mask [N, 1, H, W] (1 = masked): per
    sample, the squared error summed over masked positions and all C channels, divided by the number of
    masked positions (+1e-8, so a sample without masked positions counts 0); the mean over the N samples.

    Dividing by positions, not elements, makes it C times the per-element mean: that sets the balance with the
    cross-entropy in the fine-tune phase's (1 - lambda) * recon + lambda * CE."""
    m = mask.to(pred.dtype)
    per_sample = ((pred - target).square() * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) + 1e-8)
    return per_sample.mean()


class MAEResNet(nn.Module):
    """Encoder + U-Net decoder + classification head (the `drift-mae` training module)."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = MAEResNetEncoder(cfg)
        self.decoder = UNetDecoder(cfg)
        self.head = nn.Linear(self.encoder.out_channels, cfg.num_classes) if cfg.num_classes > 0 else None
        if self.head is not None:
            official_init_(self.head)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor):
        """x [N, C, H, W] raw input; mask [N, 1, H/p, W/p] on the patchified grid.
        Returns (prediction in patchified space, the encoder maps)."""
        xp = patchify(x, self.cfg.patch_size)
        maps = self.encoder(xp * (1.0 - mask.to(xp.dtype)))
        pred = self.decoder(maps, len(self.cfg.layers))
        return pred, maps

    def mae_loss(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, cls_weight: float | torch.Tensor = 0.0,
                 generator: torch.Generator | None = None, mask: torch.Tensor | None = None):
        """Loss = (1 - cls_weight) * masked l2 + cls_weight * CE(head(pool(layer4)), labels).

        Returns (loss, info) with info = {"recon", "ce", "acc", "mask_frac"} (detached scalars; ce/acc only
        when labels are given and there is a head; without labels the loss is the reconstruction term alone).
        """
        p = self.cfg.patch_size
        n, _, h, w = x.shape
        if mask is None:
            mask = random_patch_mask(n, h // p, w // p, generator=generator, device=x.device)
        pred, maps = self.reconstruct(x, mask)
        target = patchify(x, p)
        recon = masked_l2(pred.float(), target.float(), mask)
        info = {"recon": recon.detach(), "mask_frac": mask.mean().detach()}
        loss = recon
        # The head runs whenever labels are given, even at cls_weight 0, so the autograd graph is the same at
        # every step (DDP without find_unused_parameters; one compiled graph for both phases).
        if labels is not None and self.head is not None:
            logits = self.head(maps[f"layer{len(self.cfg.layers)}"].float().mean(dim=(2, 3)))
            ce = F.cross_entropy(logits, labels)
            loss = cls_weight * ce + (1.0 - cls_weight) * recon
            info["ce"] = ce.detach()
            info["acc"] = (logits.argmax(-1) == labels).float().mean().detach()
        return loss, info

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, cls_weight=0.0, mask=None,
                generator: torch.Generator | None = None):
        """The training loss (`mae_loss`); forward so that DDP and torch.compile wrap it."""
        return self.mae_loss(x, labels, cls_weight=cls_weight, generator=generator, mask=mask)

    def get_activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The feature keys of raw input x (official name): same as ``MAEFeatures(self.encoder)(x)``."""
        return MAEFeatures(self.encoder)(x)

    def predict_image(self, pred: torch.Tensor) -> torch.Tensor:
        """Decoder output (patchified) -> input space (unpatchified for pixel inputs)."""
        return unpatchify(pred, self.cfg.patch_size)


class MAEFeatures(FeatureExtractor):
    """Frozen MAE-ResNet encoder as a feature extractor (official `get_activations` key set)."""

    def __init__(self, encoder: MAEResNetEncoder, input_space: str | None = None):
        super().__init__()
        self.encoder = encoder
        cfg = encoder.cfg
        self.input_space = input_space or ("latent" if cfg.patch_size == 1 and cfg.in_channels == 4 else "pixels")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg = self.encoder.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"MAE encoder expects x [N, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        xp = patchify(x, cfg.patch_size)
        out = base_features(xp, global_input=x)
        for name, fmap in self.encoder(xp).items():
            out.update(map_features(name, fmap))
        return out


def _mae_config(preset: Optional[str], file_cfg: Optional[dict], path, **kw) -> MAEConfig:
    """The architecture: the weights file's own config when it has one (options must then agree with it),
    otherwise the preset ("latent" / "pixel" / None) updated by the options that are not None."""
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
    if sd is None:
        with torch.device(device or "cpu"):
            return MAEResNetEncoder(cfg)
    with torch.device("meta"):  # every tensor comes from the file: skip the (slow, truncated-normal) init
        enc = MAEResNetEncoder(cfg)
    enc.to_empty(device=device or "cpu")
    has_full = any(k.startswith(("encoder.", "_orig_mod.encoder.", "module.encoder.")) for k in sd)
    load_into(enc, weights, sd, select="encoder." if has_full else None)
    return enc


def build_mae_model(cfg: MAEConfig, device=None) -> MAEResNet:
    """A randomly initialized `MAEResNet` (encoder, decoder, head) built directly on `device`."""
    with torch.device(device or "cpu"):
        return MAEResNet(cfg)
