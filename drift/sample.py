"""drift-sample: one-step samples from a checkpoint: a PNG grid with one labelled row per class, and N samples
as an ADM-format `.npz` or a folder of PNGs.

    drift-sample outputs/demo/checkpoints/step_0001500 --out samples.png
    drift-sample outputs/run --classes 1 7 9 --per-class 16 --alpha 1.5 --no-ema
    drift-sample runs/b2 --vae sd-vae-ft-mse --out-npz samples.npz --num-samples 50000 --device cuda

CKPT is a checkpoint directory or a run directory (its latest checkpoint). The generator's config is read
from the checkpoint; EMA weights are used by default (the first EMA decay unless --ema-decay is given).
Latent models are decoded with the SD-VAE named by --vae (default: the run's `vae`, else its `feature_vae`).
`--out-npz` / `--png-dir` write --num-samples samples (default 50 per class) with the validation-label rule
(sample i has class i mod K) and per-sample noise from (--seed, i): the images `drift-eval` makes.
The library behind this CLI is `drift.sampler`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

from drift.cli import run_main
from drift.sampler import (generate, load_decoder, load_generator, resolve_ckpt_dir, sample_grid, sample_shape,
                           save_grid, to_uint8, validation_labels, write_adm_npz, write_pngs)

__all__ = ["generate", "load_generator", "resolve_ckpt_dir", "sample_grid", "save_grid", "to_uint8", "main"]


def _check_file_arg(flag: str, path: Optional[str], suffix: str) -> None:
    if path is None:
        return
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"{flag} must name a {suffix} file, got the directory {path}")
    if not path.lower().endswith(suffix):
        raise ValueError(f"{flag} must end in {suffix}, got {path}")


def write_samples(ckpt_dir: str, *, num_samples: Optional[int], out_npz: Optional[str], png_dir: Optional[str],
                  alpha: float, ema: bool, ema_decay: Optional[float], seed: int, batch_size: int, device,
                  vae: Optional[str]) -> int:
    """Generate N samples (validation-label rule, per-index noise) into an ADM npz and/or a PNG folder."""
    model, meta = load_generator(ckpt_dir, ema=ema, ema_decay=ema_decay, device=device)
    decode = load_decoder(meta, vae, device=device)
    K = int(meta["num_classes"])
    n = 50 * K if num_samples is None else num_samples
    labels = validation_labels(torch.arange(n), K)
    C, H, W = sample_shape(model, decode)

    def chunks():
        from tqdm import tqdm
        with tqdm(total=n, unit="img", desc="drift-sample", dynamic_ncols=True) as bar:
            for s in range(0, n, batch_size):
                idx = torch.arange(s, min(s + batch_size, n))
                x = generate(model, labels[idx], alpha=alpha, seed=seed, batch_size=batch_size, device=device,
                             indices=idx, decode=decode, as_uint8=True)
                if png_dir:
                    write_pngs(png_dir, x, idx.tolist())
                bar.update(len(idx))
                yield x.numpy()

    if out_npz:
        os.makedirs(os.path.dirname(os.path.abspath(out_npz)), exist_ok=True)
        write_adm_npz(out_npz, chunks(), (n, H, W, C), labels.numpy())
    else:
        for _ in chunks():
            pass
    if png_dir:
        np.savetxt(os.path.join(png_dir, "labels.txt"), labels.numpy(), fmt="%d")
    return n


def _main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="drift-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint directory, or a run directory (uses its latest checkpoint)")
    p.add_argument("--out", default=None,
                   help="output grid PNG (default: <ckpt>/samples_alpha<alpha>.png unless --out-npz/--png-dir)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class indices, one grid row each")
    p.add_argument("--max-grid-classes", type=int, default=10, help="at most this many rows")
    p.add_argument("--per-class", type=int, default=10, help="samples per row")
    p.add_argument("--alpha", type=float, default=1.0, help="CFG strength (1 = no guidance)")
    p.add_argument("--ema", default=True, action=argparse.BooleanOptionalAction, help="use EMA weights")
    p.add_argument("--ema-decay", type=float, default=None, help="which EMA copy (default: the first)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--vae", default=None,
                   help="SD-VAE directory (diffusers AutoencoderKL) that decodes a latent model's samples "
                        "(default: the run's config)")
    p.add_argument("--out-npz", default=None, help="write --num-samples samples as an ADM-format .npz here")
    p.add_argument("--png-dir", default=None, help="write --num-samples samples as <index>.png files here")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples for --out-npz/--png-dir (default: 50 per class)")
    p.add_argument("--batch-size", type=int, default=250, help="samples per forward pass")
    a = p.parse_args(argv)
    for flag, v in (("--per-class", a.per_class), ("--max-grid-classes", a.max_grid_classes),
                    ("--batch-size", a.batch_size), ("--num-samples", a.num_samples)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    _check_file_arg("--out", a.out, ".png")
    _check_file_arg("--out-npz", a.out_npz, ".npz")
    if a.png_dir is not None and os.path.isfile(a.png_dir):
        raise ValueError(f"--png-dir must be a directory, got the file {a.png_dir}")
    ckpt_dir = resolve_ckpt_dir(a.ckpt)
    if a.out_npz or a.png_dir:
        n = write_samples(ckpt_dir, num_samples=a.num_samples, out_npz=a.out_npz, png_dir=a.png_dir,
                          alpha=a.alpha, ema=a.ema, ema_decay=a.ema_decay, seed=a.seed, batch_size=a.batch_size,
                          device=a.device, vae=a.vae)
        for path in (a.out_npz, a.png_dir):
            if path:
                print(f"{path} ({n} samples)")
    if a.out or not (a.out_npz or a.png_dir):
        out = a.out or os.path.join(ckpt_dir, f"samples_alpha{a.alpha:g}.png")
        sample_grid(ckpt_dir, out, classes=a.classes, max_grid_classes=a.max_grid_classes, per_class=a.per_class,
                    alpha=a.alpha, ema=a.ema, ema_decay=a.ema_decay, seed=a.seed, device=a.device, vae=a.vae)
        print(out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, prog="drift-sample")


if __name__ == "__main__":
    sys.exit(main())
