"""`drift-prep`: pack images into WebDataset shards for the drift loaders, and verify packed shards.

    drift-prep imagefolder SRC OUT [--size 256] [--shard-size 10000] [--workers 8] [--seed 0]
    drift-prep idx SRC OUT [--split train|test] [--class-names a,b,...]   # MNIST-format IDX files, gz or not
    drift-prep verify OUT [--workers 8]

Output: OUT/shard-%06d.tar (uncompressed, pre-shuffled), OUT/shard-%06d.idx (DALI wds index),
OUT/manifest.json. Rerunning the same command after an interruption keeps the finished shards.
Without --size, 8-bit L/RGB JPEGs and PNGs without alpha or EXIF rotation are stored byte-exact; anything else
a decoder might misread (CMYK, 16-bit, palette, alpha, EXIF-rotated, other formats) is re-encoded once and
listed under "normalized" in the manifest; unreadable or broken files are listed under "rejected".
Every file and directory met under SRC is packed or rejected with a reason; symlinks are followed, and a
directory reached twice (a symlink loop) is rejected on its second visit (see data_prep/pack.py).
Exit status: 0 on success, 1 when verify finds problems, 2 on bad arguments or unreadable input (one
`drift-prep: error: ...` line; add `--debug` anywhere for the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from data_prep import pack as packmod
from data_prep.verify import verify
from drift.cli import run_main

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_pack_args(p: argparse.ArgumentParser, shard_size: int) -> None:
    p.add_argument("src", help="source directory")
    p.add_argument("out", help="output directory (created; an earlier partial run there is resumed)")
    p.add_argument("--size", type=_positive, default=None,
                   help="ADM center-crop resize to SIZE x SIZE (default: keep the original bytes where possible)")
    p.add_argument("--shard-size", type=_positive, default=shard_size, help="samples per shard (at most)")
    p.add_argument("--workers", type=_positive, default=max(1, min(8, os.cpu_count() or 1)),
                   help="decode/encode processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle before sharding")
    p.add_argument("--min-side", type=_positive, default=8, help="reject images with a side shorter than this")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when a JPEG has to be re-encoded")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="drift-prep", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("imagefolder", help="pack SRC/<class>/*.(JPEG|png|...) (ImageNet train/ or val/ layout)")
    _add_pack_args(p, 10000)
    p = sub.add_parser("idx", help="pack MNIST-format IDX files (gzip or raw), one PNG per image")
    _add_pack_args(p, 10000)
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="train-* or t10k-* files")
    p.add_argument("--class-names", default=None,
                   help="comma-separated class names, or 'fashion-mnist' (default: '0', '1', ...)")
    sub.add_parser("latents", help="encode a shard set into SD-VAE latent shards (both flips): "
                                   "drift-prep latents SRC OUT --vae DIR (see data_prep/latents.py)")
    p = sub.add_parser("verify", help="check every shard of OUT against its manifest and decode every image")
    p.add_argument("out", help="directory written by drift-prep imagefolder|idx|latents")
    p.add_argument("--workers", type=_positive, default=max(1, min(8, os.cpu_count() or 1)),
                   help="processes checking shards in parallel")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (hashes and structure only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _settings(a) -> packmod.Settings:
    return packmod.Settings(seed=a.seed, size=a.size, shard_size=a.shard_size, workers=a.workers,
                            min_side=a.min_side, quality=a.quality, progress=not a.quiet)


def _summary(m: dict, out: str, t0: float) -> None:
    dirs = sum(1 for r in m["rejected"] if r.get("kind") == "directory")
    print(f"drift-prep: {m['num_samples']} samples in {len(m['shards'])} shard(s), {m['num_classes']} classes, "
          f"{len(m['rejected']) - dirs} rejected of {m['files_seen']} files seen, {dirs} rejected of "
          f"{m.get('dirs_seen', 0)} directories seen -> {out} ({time.time() - t0:.1f} s)")
    for r in m["rejected"][:20]:
        print(f"  rejected {r['path']}: {r['reason']}")
    if len(m["rejected"]) > 20:
        print(f"  ... and {len(m['rejected']) - 20} more (see {os.path.join(out, 'manifest.json')})")


def _main(argv: List[str]) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.time()
    if a.cmd in ("imagefolder", "idx") and os.path.exists(a.out) and not os.path.isdir(a.out):
        raise NotADirectoryError(f"OUT {a.out!r} exists and is not a directory")
    if a.cmd == "imagefolder":
        src_real, out_real = os.path.realpath(a.src), os.path.realpath(a.out)
        if out_real == src_real or out_real.startswith(src_real + os.sep):
            raise ValueError(f"OUT {a.out!r} must not be inside SRC {a.src!r} (it would be scanned as a class)")
        scan = packmod.scan_imagefolder(a.src)
        m = packmod.pack(a.out, scan.classes, scan.candidates, _settings(a), source_kind="imagefolder",
                         source=a.src, scan_rejected=scan.rejected, files_seen=scan.files_seen,
                         dirs_seen=scan.dirs_seen)
        _summary(m, a.out, t0)
    elif a.cmd == "idx":
        names = None
        if a.class_names == "fashion-mnist":
            names = FASHION_MNIST_CLASSES
        elif a.class_names:
            names = [n.strip() for n in a.class_names.split(",")]
        classes, cands, images = packmod.scan_idx(a.src, a.split, names)
        m = packmod.pack(a.out, classes, cands, _settings(a), source_kind=f"idx:{a.split}", source=a.src,
                         idx_images=images)
        _summary(m, a.out, t0)
    else:
        problems = verify(a.out, workers=a.workers, decode=not a.no_decode, progress=not a.quiet)
        if problems:
            for p in problems:
                print(f"verify: {p}", file=sys.stderr)
            print(f"drift-prep verify: {len(problems)} problem(s) in {a.out}", file=sys.stderr)
            return 1
        print(f"drift-prep verify: {a.out} OK ({time.time() - t0:.1f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["latents"]:  # SD-VAE latent caching has its own parser (needs torch + diffusers)
        from data_prep.latents import main as latents_main
        return latents_main(argv[1:])
    # bad arguments, unreadable or unwritable paths: one line, exit code 2 (--debug: the traceback)
    return run_main(_main, argv, "drift-prep", user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
