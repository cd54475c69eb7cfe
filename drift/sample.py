"""drift-sample: one-step samples from a checkpoint, as a PNG grid with one labelled row per class.

    drift-sample outputs/demo/checkpoints/step_0001500 --out samples.png
    drift-sample outputs/run --classes 1 7 9 --per-class 16 --alpha 1.5 --no-ema

CKPT is a checkpoint directory or a run directory (its latest checkpoint). The generator's config is read
from the checkpoint; EMA weights are used by default (the first EMA decay unless --ema-decay is given).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

from drift import checkpoint as ckpt


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


@torch.no_grad()
def generate(model, labels: torch.Tensor, *, alpha: float = 1.0, seed: int = 0, batch_size: int = 500,
             device="cpu") -> torch.Tensor:
    """One forward pass per batch: images [N, C, H, W] in [-1, 1] for int64 `labels` [N]."""
    g = torch.Generator(device=device).manual_seed(seed)
    outs = []
    C, S = model.in_channels, model.input_size
    for i in range(0, labels.shape[0], batch_size):
        lab = labels[i:i + batch_size].to(device)
        n = lab.shape[0]
        noise = torch.randn(n, C, S, S, generator=g, device=device)
        style = model.sample_style(n, g, device)
        a = torch.full((n,), float(alpha), device=device)
        outs.append(model(noise, lab, a, style).float().clamp(-1, 1).cpu())
    return torch.cat(outs) if outs else torch.empty(0, C, S, S)


def save_grid(images: torch.Tensor, row_names: Sequence[str], per_row: int, path: str, scale: int = 2) -> None:
    """PNG grid: one row of `per_row` images per name, with the name written in a left margin."""
    from PIL import Image, ImageDraw
    rows = len(row_names)
    if images.shape[0] != rows * per_row:
        raise ValueError(f"need {rows}x{per_row} images, got {images.shape[0]}")
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
    canvas.save(tmp)
    os.replace(tmp, path)


def sample_grid(path: str, out: str, *, classes: Optional[List[int]] = None, max_grid_classes: int = 10,
                per_class: int = 10, alpha: float = 1.0, ema: bool = True, ema_decay: Optional[float] = None,
                seed: int = 0, device="cpu") -> str:
    model, meta = load_generator(path, ema=ema, ema_decay=ema_decay, device=device)
    K = int(meta["num_classes"])
    classes = list(range(min(K, max_grid_classes))) if not classes else list(classes)[:max_grid_classes]
    bad = [c for c in classes if not 0 <= c < K]
    if bad:
        raise ValueError(f"--classes {bad} outside [0, {K})")
    names = meta.get("class_names") or [str(c) for c in range(K)]
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    images = generate(model, labels, alpha=alpha, seed=seed, device=device)
    save_grid(images, [f"{c}: {names[c]}" if names[c] != str(c) else str(c) for c in classes], per_class, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="drift-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint directory, or a run directory (uses its latest checkpoint)")
    p.add_argument("--out", default=None, help="output PNG (default: <ckpt>/samples_alpha<alpha>.png)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class indices, one grid row each")
    p.add_argument("--max-grid-classes", type=int, default=10, help="at most this many rows")
    p.add_argument("--per-class", type=int, default=10, help="samples per row")
    p.add_argument("--alpha", type=float, default=1.0, help="CFG strength (1 = no guidance)")
    p.add_argument("--ema", default=True, action=argparse.BooleanOptionalAction, help="use EMA weights")
    p.add_argument("--ema-decay", type=float, default=None, help="which EMA copy (default: the first)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    a = p.parse_args(argv)
    ckpt_dir = resolve_ckpt_dir(a.ckpt)
    out = a.out or os.path.join(ckpt_dir, f"samples_alpha{a.alpha:g}.png")
    sample_grid(ckpt_dir, out, classes=a.classes, max_grid_classes=a.max_grid_classes, per_class=a.per_class,
                alpha=a.alpha, ema=a.ema, ema_decay=a.ema_decay, seed=a.seed, device=a.device)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
