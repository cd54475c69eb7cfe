"""`drift-prep latents SRC OUT --vae DIR`: cache SD-VAE latents of a packed image shard set (paper §12 "Data").

    drift-prep latents SRC OUT --vae VAE_DIR [--size 256] [--batch-size 64] [--device cuda] [--dtype float32]
                               [--posterior sample|mean] [--seed 0] [--quiet]

Every image of SRC (a `drift-prep imagefolder|idx` output) is ADM center-cropped to SIZE x SIZE, scaled to
[-1, 1], and encoded together with its horizontal mirror by the diffusers AutoencoderKL in VAE_DIR (a local
`save_pretrained` directory; nothing is downloaded). The latent is a posterior sample (official) or the posterior
mean, times 0.18215.

Output: OUT/shard-%06d.tar, one per source shard and with the same sample keys, each sample holding
``<key>.npy`` (a .npy array [2, 4, SIZE/8, SIZE/8] in --dtype: index 0 = plain, 1 = flipped) and ``<key>.cls``
(copied), plus the DALI index files and OUT/manifest.json (the source's counts and class map, plus
``kind: "latents"``, ``latent_shape``, ``latent_dtype``, ``latent_ext``, ``vae_scale``). Rerunning after an
interruption keeps finished shards (same progress-record rules as the image packer); posterior noise is seeded
per shard, so a resumed run writes the same bytes as an uninterrupted one on the same device.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from PIL import Image

from data_prep import pack as packmod
from data_prep.images import center_crop_adm
import drift.schema as schema
from drift.cli import run_main

LATENT_EXT = "npy"      # drift.latent_data reads this component
VAE_SCALE = 0.18215     # SD-VAE latent scale (same constant as drift.features.vae.VAE_SCALE)
KIND = "latents"


@dataclass
class _Blob:
    """What data_prep.pack.write_shard expects of a packed sample."""
    ext: str
    data: bytes


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="drift-prep latents", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="a drift-prep image shard directory (with manifest.json)")
    ap.add_argument("out", help="output directory (an earlier partial run there is resumed)")
    ap.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory (config.json + weights)")
    ap.add_argument("--size", type=_positive, default=256, help="ADM center-crop size before encoding")
    ap.add_argument("--batch-size", type=_positive, default=64, help="images per VAE call (x2 with the flips)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored latent dtype")
    ap.add_argument("--posterior", choices=["sample", "mean"], default="sample",
                    help="store a posterior sample (official) or the posterior mean")
    ap.add_argument("--seed", type=int, default=0, help="seed of the posterior noise (per shard: seed + index)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _read_source_shard(root: str, name: str):
    """Yield (key, image bytes, cls bytes) from one source shard; an error naming the shard if unreadable."""
    path = os.path.join(root, name)

    def finish(key, comps):
        img = next((comps[e] for e in schema.IMAGE_EXTS if e in comps), None)
        if img is None or schema.LABEL_EXT not in comps:
            raise ValueError(f"source shard {path}: sample {key} lacks an image or a label")
        return key, img, comps[schema.LABEL_EXT]

    # Streamed: a sample's members are adjacent in drift-prep shards, so one sample is held at a time.
    key, comps = None, {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = schema.split_member(m.name)
                if k is None:
                    continue
                if k != key:
                    if key is not None:
                        yield finish(key, comps)
                    key, comps = k, {}
                comps[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"source shard {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") \
            from None
    if key is not None:
        yield finish(key, comps)


def _to_array(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = center_crop_adm(im, size)
        return np.asarray(im, dtype=np.uint8)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_shard(vae, items, *, size: int, batch_size: int, device, out_dtype, posterior: str, seed: int):
    """items: iterable of (key, image bytes, cls bytes) -> [(key, latent array [2, C, h, w], label)].

    Consumed `batch_size` at a time, so a shard's encoded images never sit in memory all at once."""
    import itertools

    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            break
        imgs = np.stack([_to_array(d, size) for _, d, _ in chunk])
        x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = torch.cat([x, x.flip(-1)])  # plain then mirrored: one VAE call for both
        with torch.no_grad():
            dist = vae.encode(x.to(vae.dtype)).latent_dist
            z = dist.mean
            if posterior == "sample":
                z = z + dist.std * torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
            z = (z.float() * VAE_SCALE).cpu().numpy().astype(out_dtype)
        n = len(chunk)
        for i, (key, _, cls) in enumerate(chunk):
            out.append((key, np.ascontiguousarray(np.stack([z[i], z[n + i]])), schema.decode_cls(cls)))
    return out


def run(src: str, out: str, vae_dir: str, *, size: int = 256, batch_size: int = 64, device=None,
        dtype: str = "float32", posterior: str = "sample", seed: int = 0, progress: bool = True,
        log=print) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    if size % 8:
        raise ValueError(f"--size must be a multiple of 8 (the VAE downsamples by 8), got {size}")
    m = schema.read_manifest(src)
    if m.get("kind") == KIND:
        raise ValueError(f"{src} already holds latents; give an image shard directory")
    if not os.path.isdir(vae_dir) or not os.path.isfile(os.path.join(vae_dir, "config.json")):
        raise FileNotFoundError(f"VAE directory {vae_dir} not found or without config.json "
                                f"(expected a diffusers AutoencoderKL save_pretrained directory)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).to(device).eval()
    except Exception as e:
        raise ValueError(f"cannot load the VAE from {vae_dir}: {type(e).__name__}: {e}") from None
    with open(os.path.join(vae_dir, "config.json"), "rb") as f:
        vae_cfg_hash = hashlib.sha256(f.read()).hexdigest()
    os.makedirs(out, exist_ok=True)
    width = schema.cls_width(m["num_classes"])
    fingerprint = hashlib.sha256(json.dumps({
        "kind": KIND, "src_shards": [(s["name"], s["sha256"]) for s in m["shards"]], "vae": vae_cfg_hash,
        "size": size, "dtype": dtype, "posterior": posterior, "seed": seed,
    }, sort_keys=True).encode()).hexdigest()

    progress_path = os.path.join(out, packmod.PROGRESS_NAME)
    records = packmod.resume_records(out, fingerprint, log, "drift-prep latents")

    def save_progress():
        schema.write_json_atomic(progress_path, {"fingerprint": fingerprint, "shards": records})

    out_dtype = np.dtype(dtype)
    fail_after = int(os.environ.get(packmod.FAIL_ENV, "-1"))
    written = 0
    done = sum(s["num_samples"] for s in m["shards"] if s["name"] in records)
    shape = None
    bar = tqdm(total=m["num_samples"], initial=done, unit="img", desc="drift-prep latents", dynamic_ncols=True,
               disable=not progress)
    try:
        for k, s in enumerate(m["shards"]):
            name = s["name"]
            if name in records:
                shape = shape or records[name]["latent_shape"]
                continue
            encoded = encode_shard(vae, _read_source_shard(src, name), size=size, batch_size=batch_size,
                                   device=device, out_dtype=out_dtype, posterior=posterior, seed=seed + k)
            if len(encoded) != s["num_samples"]:
                raise ValueError(f"source shard {os.path.join(src, name)} holds {len(encoded)} samples, "
                                 f"its manifest says {s['num_samples']}")
            shape = list(encoded[0][1].shape)
            samples = [(key, _Blob(LATENT_EXT, _npy_bytes(z)), label) for key, z, label in encoded]
            sha, idx_sha = packmod.write_shard(out, name, samples, width)
            records[name] = {"name": name, "num_samples": len(samples), "sha256": sha, "index_sha256": idx_sha,
                             "latent_shape": shape}
            save_progress()
            bar.update(len(samples))
            written += 1
            if written == fail_after:
                raise RuntimeError(f"{packmod.FAIL_ENV}={fail_after}: injected failure after writing {name}")
    finally:
        bar.close()

    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "kind": KIND,
        "source_kind": m.get("source_kind", "shards"),
        "source": os.path.abspath(src),
        "num_samples": m["num_samples"],
        "num_classes": m["num_classes"],
        "classes": m["classes"],
        "class_counts": m.get("class_counts"),
        "shards": [{"name": s["name"], "num_samples": records[s["name"]]["num_samples"],
                    "sha256": records[s["name"]]["sha256"], "index": schema.index_name(s["name"]),
                    "index_sha256": records[s["name"]]["index_sha256"]} for s in m["shards"]],
        "rejected": list(m["rejected"]),
        "files_seen": m.get("files_seen"),
        "cls_width": width,
        "latent_ext": LATENT_EXT,
        "latent_shape": shape,
        "latent_dtype": dtype,
        "vae_scale": VAE_SCALE,
        "vae_config_sha256": vae_cfg_hash,
        "posterior": posterior,
        "size": size,
        "seed": seed,
        "created_by": "drift-prep latents",
    }
    schema.write_json_atomic(os.path.join(out, schema.MANIFEST_NAME), manifest)
    return manifest


def _main(argv: List[str]) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.time()
    m = run(a.src, a.out, a.vae, size=a.size, batch_size=a.batch_size, device=a.device, dtype=a.dtype,
            posterior=a.posterior, seed=a.seed, progress=not a.quiet)
    print(f"drift-prep latents: {m['num_samples']} samples x 2 flips, latent {m['latent_shape'][1:]} "
          f"({m['latent_dtype']}) in {len(m['shards'])} shard(s) -> {a.out} ({time.time() - t0:.1f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_main(_main, argv, "drift-prep latents", user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
