"""One-step sampling from checkpoints: the one code path behind `drift-sample`, `drift-eval`, the
trainer's FID and the demo's metrics.

    model, meta = load_generator("outputs/run")                 # EMA weights by default
    decode = load_decoder(meta, vae="sd-vae-ft-mse")            # None for pixel models
    idx = torch.arange(1000)
    x = generate(model, validation_labels(idx, 1000), alpha=1.5, seed=0, indices=idx, decode=decode)

Noise comes from one of two sources, picked by `indices`:

* stream (`indices=None`): one generator seeded with `seed` draws the noise, then the style indices, batch
  after batch. The grid and the demo's metrics use it (their recorded numbers were made this way).
* per index: the noise and style of sample i come from a generator seeded by (seed, i) alone, so any batch
  size, chunking or number of ranks gives the same image for sample i (`drift-eval`, FID during training).

Latent models (`meta["data_kind"] == "latents"`, or 4-channel items in checkpoints that predate that key)
output scaled latents z = 0.18215 x (SD-VAE latent); `load_decoder` returns the SD-VAE decode of z / scale,
which every path applies before clamping to [-1, 1]. Images leave as float [N, C, H, W] in [-1, 1] or, for
the evaluation files, as uint8 NHWC by the official rule floor(clip(x01 * 255, 0, 255)).
"""
from __future__ import annotations

import os
import zipfile
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from drift import checkpoint as ckpt

VAE_SCALE = 0.18215  # SD-VAE latent scale; a checkpoint's meta["vae_scale"] overrides it
_SEED_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads run seeds over the 32-bit seed space

Decoder = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Checkpoints and decoders
# ---------------------------------------------------------------------------------------------------

def resolve_ckpt_dir(path: str) -> str:
    """A checkpoint directory, or a run directory's latest checkpoint."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise ckpt.CheckpointError(f"{path} is neither a checkpoint directory nor a run directory with checkpoints")
    return latest


def load_generator(path: str, *, ema: bool = True, ema_decay: Optional[float] = None, device="cpu"):
    """(model in eval mode, meta) from a checkpoint; EMA weights unless ema=False."""
    from drift.model import build_generator_model
    state = ckpt.load_for_sampling(resolve_ckpt_dir(path), map_location="cpu")
    cfg, meta = state["config"], state["meta"]
    c, h, _ = meta["item_shape"]
    model = build_generator_model(cfg, int(meta["num_classes"]), int(h), int(c))
    if ema:
        keys = list(state["ema"])
        key = keys[0] if ema_decay is None else f"{ema_decay:g}"
        if key not in state["ema"]:
            raise ValueError(f"--ema-decay {ema_decay} not in the checkpoint (has {keys})")
        sd = state["ema"][key]
    else:
        sd = state["model"]
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), meta


def is_latent(meta: dict) -> bool:
    """Whether the checkpoint's generator outputs SD-VAE latents (which need decoding to be images)."""
    kind = meta.get("data_kind")
    if kind is not None:
        return kind == "latents"
    return int(meta["item_shape"][0]) == 4  # checkpoints from before `data_kind`: 4 channels = SD-VAE latents


def vae_path_for(meta: dict, vae: Optional[str] = None) -> Optional[str]:
    """The SD-VAE directory that decodes this checkpoint's samples: `vae`, else the run's `vae`, else its
    `feature_vae`; None for pixel models. A latent model with none of them is a ValueError naming the flag."""
    if not is_latent(meta):
        return None
    cfg = meta.get("config") or {}
    path = vae or cfg.get("vae") or cfg.get("feature_vae")
    if not path:
        raise ValueError("this checkpoint is a latent model (its samples are SD-VAE latents, item shape "
                         f"{tuple(meta['item_shape'])}) and neither --vae nor the run's config names the VAE "
                         "that decodes them: pass --vae DIR (a diffusers AutoencoderKL directory, e.g. "
                         "stabilityai/sd-vae-ft-mse saved locally)")
    return path


def load_decoder(meta: dict, vae: Optional[str] = None, device="cpu") -> Optional[Decoder]:
    """None for pixel models; for latent models the SD-VAE decode z -> image ([N, 4, h, w] -> [N, 3, 8h, 8w])."""
    path = vae_path_for(meta, vae)
    if path is None:
        return None
    from drift.features.vae import SDVAE, load_autoencoder_kl
    sdvae = SDVAE(load_autoencoder_kl(path, device=device), scale=float(meta.get("vae_scale") or VAE_SCALE))
    return sdvae.decode


def sample_shape(model, decode: Optional[Decoder]) -> Tuple[int, int, int]:
    """(C, H, W) of the images `generate` returns: the generator's items, or what the decoder makes of them."""
    C, S = model.in_channels, model.input_size
    if decode is None:
        return C, S, S
    dev = next(model.parameters()).device
    with torch.no_grad():
        return tuple(decode(torch.zeros(1, C, S, S, device=dev)).shape[1:])


# ---------------------------------------------------------------------------------------------------
# Labels, indices, noise
# ---------------------------------------------------------------------------------------------------

def validation_labels(indices, num_classes: int) -> torch.Tensor:
    """The validation-label rule: sample i gets class i mod K (int64, same shape as `indices`).

    At N = 50 K (50,000 for ImageNet) every class appears 50 times, as in the ImageNet validation set the
    official evaluation takes its labels from; interleaving the classes keeps any prefix balanced too."""
    return torch.as_tensor(indices, dtype=torch.long) % int(num_classes)


def rank_chunks(num_samples: int, chunk_size: int, rank: int = 0, world_size: int = 1) -> List[Tuple[int, int]]:
    """This rank's share of the sample indices: chunks [start, end) of `chunk_size`, chunk c on rank c mod W.

    Chunks never depend on the world size, so the ranks' shares are disjoint, their union is 0..N-1, and a
    run resumed on another number of ranks finds the chunks already written."""
    if num_samples < 0 or chunk_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad split: num_samples={num_samples}, chunk_size={chunk_size}, rank {rank} of {world_size}")
    starts = range(rank * chunk_size, num_samples, world_size * chunk_size)
    return [(s, min(s + chunk_size, num_samples)) for s in starts]


def index_seed(seed: int, index: int) -> int:
    """The 32-bit generator seed of sample `index` (CPU generators keep 32 bits of a seed).

    A run seed is hashed to a start point and the index added, so the samples of one seed never share a seed."""
    start = ((int(seed) * _SEED_MIX) & ((1 << 64) - 1)) >> 32
    return (start + int(index)) & 0xFFFFFFFF


def _index_noise(model, indices: torch.Tensor, seed: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise [n, C, S, S] and style [n, T] where row j depends only on (seed, indices[j])."""
    C, S = model.in_channels, model.input_size
    g = torch.Generator(device=device)
    noise, style = [], []
    for i in indices.tolist():
        g.manual_seed(index_seed(seed, i))
        noise.append(torch.randn(1, C, S, S, generator=g, device=device))
        style.append(model.sample_style(1, g, device))
    return torch.cat(noise), torch.cat(style)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] by floor(clip(x01 * 255, 0, 255)) (the official rule:
    truncation, not rounding)."""
    x01 = (images.float() + 1) / 2
    return torch.floor((x01 * 255).clamp(0, 255)).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def generate(model, labels: torch.Tensor, *, alpha: float = 1.0, seed: int = 0, batch_size: int = 500,
             device="cpu", indices: Optional[torch.Tensor] = None, decode: Optional[Decoder] = None,
             as_uint8: bool = False, progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """One forward pass per sample for int64 `labels` [N]: images [N, C, H, W] in [-1, 1] on the CPU, or
    uint8 [N, H, W, C] with `as_uint8`.

    `indices` [N] (sample numbers) selects per-index noise (see the module docstring); without it the noise
    is one stream from `seed`. `decode` maps generator outputs to images (the SD-VAE of a latent model);
    outputs are clamped to [-1, 1] after decoding, never before (latents are not bounded by 1).
    `progress(n)` is called after each batch of n samples."""
    if indices is not None and indices.shape != labels.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and labels {tuple(labels.shape)} differ in shape")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator(device=device).manual_seed(seed) if indices is None else None
    outs = []
    C, S = model.in_channels, model.input_size
    for i in range(0, labels.shape[0], batch_size):
        lab = labels[i:i + batch_size].to(device)
        n = lab.shape[0]
        if g is not None:
            noise = torch.randn(n, C, S, S, generator=g, device=device)
            style = model.sample_style(n, g, device)
        else:
            noise, style = _index_noise(model, indices[i:i + batch_size], seed, device)
        a = torch.full((n,), float(alpha), device=device)
        x = model(noise, lab, a, style).float()
        if decode is not None:
            x = decode(x).float()
        x = x.clamp(-1, 1)
        outs.append((to_uint8(x) if as_uint8 else x).cpu())
        if progress is not None:
            progress(n)
    if outs:
        return torch.cat(outs)
    return torch.empty((0, S, S, C), dtype=torch.uint8) if as_uint8 else torch.empty(0, C, S, S)


# ---------------------------------------------------------------------------------------------------
# Files: ADM-format npz, PNG folders, the labelled grid
# ---------------------------------------------------------------------------------------------------

def write_adm_npz(path: str, chunks: Iterable[np.ndarray], shape: Sequence[int], labels: np.ndarray) -> str:
    """Write `samples.npz` as ADM's evaluator reads it: `arr_0` uint8 [N, H, W, C], `arr_1` int64 labels [N].

    The images are streamed chunk by chunk into an uncompressed (ZIP_STORED, zip64) member, so 50,000
    256x256 samples (9.8 GB) never sit in memory at once; `np.load(path)["arr_0"]` reads the same array
    `np.savez` would have written. Atomic: a temp file renamed at the end."""
    shape = tuple(int(s) for s in shape)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if len(shape) != 4 or labels.shape != (shape[0],):
        raise ValueError(f"samples must be [N, H, W, C] with N labels, got shape {shape} and {labels.shape} labels")
    tmp = path + ".tmp"
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": shape})
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != shape[1:]:
                        raise ValueError(f"chunk of shape {chunk.shape} does not fit samples of shape {shape}")
                    f.write(chunk.tobytes())
                    written += chunk.shape[0]
            if written != shape[0]:
                raise ValueError(f"{path}: {written} samples written, expected {shape[0]}")
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_pngs(out_dir: str, images: torch.Tensor, indices: Sequence[int]) -> None:
    """uint8 [n, H, W, C] images as `out_dir/<index:06d>.png` (grayscale when C == 1)."""
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    for img, i in zip(images.numpy(), indices):
        name = os.path.join(out_dir, f"{int(i):06d}.png")
        tmp = name + ".tmp"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
        os.replace(tmp, name)


def save_grid(images: torch.Tensor, row_names: Sequence[str], per_row: int, path: str, scale: int = 2) -> None:
    """PNG grid: one row of `per_row` images [N, C, H, W] in [-1, 1] (C = 1 or 3) per name, with the name
    written in a left margin."""
    from PIL import Image, ImageDraw
    rows = len(row_names)
    if images.shape[0] != rows * per_row:
        raise ValueError(f"need {rows}x{per_row} images, got {images.shape[0]}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"the grid takes [N, C, H, W] images with 1 or 3 channels, got {tuple(images.shape)} "
                         f"(a latent model's samples are decoded first: pass --vae)")
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    pad = 2
    grid = x.view(rows, per_row, c, h, w).permute(0, 3, 1, 4, 2)  # (rows, h, per_row, w, c)
    cells = torch.full((rows, h + pad, per_row, w + pad, 3), 255, dtype=torch.uint8)
    cells[:, :h, :, :w] = grid
    body = cells.reshape(rows * (h + pad), per_row * (w + pad), 3).numpy()
    img = Image.fromarray(body).resize((body.shape[1] * scale, body.shape[0] * scale), Image.NEAREST)
    margin = 8 + 7 * max(len(s) for s in row_names)
    canvas = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
    canvas.paste(img, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (h + pad) * scale
    for r, name in enumerate(row_names):
        draw.text((4, r * row_h + row_h // 2 - 5), name, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sample_grid(path: str, out: str, *, classes: Optional[List[int]] = None, max_grid_classes: int = 10,
                per_class: int = 10, alpha: float = 1.0, ema: bool = True, ema_decay: Optional[float] = None,
                seed: int = 0, device="cpu", vae: Optional[str] = None) -> str:
    """Write the labelled grid of a checkpoint (one row per class, stream noise from `seed`) to `out`."""
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    if max_grid_classes < 1:
        raise ValueError(f"--max-grid-classes must be >= 1, got {max_grid_classes}")
    model, meta = load_generator(path, ema=ema, ema_decay=ema_decay, device=device)
    decode = load_decoder(meta, vae, device=device)
    K = int(meta["num_classes"])
    classes = list(range(min(K, max_grid_classes))) if not classes else list(classes)[:max_grid_classes]
    bad = [c for c in classes if not 0 <= c < K]
    if bad:
        raise ValueError(f"--classes {bad} outside [0, {K})")
    names = meta.get("class_names") or [str(c) for c in range(K)]
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    images = generate(model, labels, alpha=alpha, seed=seed, device=device, decode=decode)
    save_grid(images, [f"{c}: {names[c]}" if names[c] != str(c) else str(c) for c in classes], per_class, out)
    return out
