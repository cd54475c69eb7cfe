"""Loader throughput (images/s): DALI CPU decode, DALI GPU "mixed" decode (when CUDA exists) and the PIL fallback.

    python benchmarks/bench_loader.py                 # 1024 ImageNet-sized JPEGs, 256 px, both modes
    python benchmarks/bench_loader.py --quick         # CI smoke run: tiny set, proves the table + JSON path
    python benchmarks/bench_loader.py --threads 8 --batch-size 128 --images 4096

The dataset is synthetic but made of real photographs: the photos bundled with scikit-learn
(`load_sample_images`) and scikit-image (`skimage.data`), randomly cropped, scaled and flipped to ImageNet-like
sizes (~500x375, landscape and portrait) and saved as JPEG quality 90 (4:2:0), so that every file differs.
It is packed with `drift-prep imagefolder` (original bytes kept) and read back with `drift.data.build_loader`
at 256 px in "train" (RandomResizedCrop + flip) and "center" modes. Prints a table and writes
benchmarks/results/loader-<host>-<utc>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from data_prep.cli import main as drift_prep  # noqa: E402
from drift.data import build_loader, dali_available  # noqa: E402


def bundled_photos():
    """The real photographs that ship inside pip packages (no download)."""
    from sklearn.datasets import load_sample_images
    import skimage.data as skd

    photos = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina"):
        arr = getattr(skd, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        photos.append(arr[..., :3])
    return [Image.fromarray(np.ascontiguousarray(p)) for p in photos]


def make_folder(root: str, n: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    for i in range(n):
        src = photos[i % len(photos)]
        W, H = src.size
        s = rng.uniform(0.5, 1.0)  # random crop of 50–100% of each side, then scaled to an ImageNet-like size
        cw, ch = int(W * s), int(H * s)
        x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
        landscape = rng.random() < 0.75
        tw, th = (int(rng.integers(450, 520)), int(rng.integers(333, 390)))
        if not landscape:
            tw, th = th, tw
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((tw, th), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = os.path.join(root, f"c{i % classes:03d}")
        os.makedirs(d, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        with open(os.path.join(d, f"img_{i:06d}.JPEG"), "wb") as f:
            f.write(buf.getvalue())


def measure(path, backend, device, mode, size, batch, threads, batches, warmup):
    loader = build_loader(path, batch, mode=mode, image_size=size, backend=backend, device=device,
                          num_threads=threads, output="float")
    try:
        for _ in range(warmup):
            x, _ = next(loader)
        if x.is_cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(batches):
            t = time.perf_counter()
            x, y = next(loader)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    finally:
        loader.close()
    times = np.array(times)
    return {"img_per_s": batch * batches / times.sum(), "batch_ms_p20": 1e3 * np.quantile(times, 0.2),
            "batch_ms_p50": 1e3 * np.median(times), "batch_ms_p80": 1e3 * np.quantile(times, 0.8)}


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description="drift loader throughput")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="DALI num_threads = PIL decode threads")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="train,center")
    ap.add_argument("--data", default=None, help="existing drift-prep output to use instead of the synthetic set")
    ap.add_argument("--quick", action="store_true", help="smoke run: 48 images, 2 batches of 16 at 64 px")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.size, a.batch_size, a.batches, a.warmup = 48, 64, 16, 2, 1

    tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
    path = a.data
    if path is None:
        t = time.perf_counter()
        make_folder(os.path.join(tmp.name, "src"), a.images, a.classes, seed=0)
        path = os.path.join(tmp.name, "shards")
        drift_prep(["imagefolder", os.path.join(tmp.name, "src"), path, "--shard-size", "256",
                    "--workers", str(max(1, min(4, os.cpu_count() or 1))), "--quiet"])
        print(f"synthetic set: {a.images} JPEGs packed in {time.perf_counter() - t:.1f} s")

    providers = [("pil", "pil", "cpu")]
    if dali_available():
        providers.insert(0, ("dali-cpu", "dali", "cpu"))
        if torch.cuda.is_available():
            providers.insert(1, ("dali-gpu", "dali", "cuda"))
    rows = []
    for mode in a.modes.split(","):
        for name, backend, device in providers:
            r = measure(path, backend, device, mode, a.size, a.batch_size, a.threads, a.batches, a.warmup)
            rows.append({"provider": name, "mode": mode, **r})

    print(f"\nloader throughput, {a.size} px, batch {a.batch_size}, {a.threads} threads, "
          f"{os.cpu_count()} CPUs{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
    print(f"{'provider':<10} {'mode':<7} {'img/s':>9} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8}")
    for r in rows:
        print(f"{r['provider']:<10} {r['mode']:<7} {r['img_per_s']:>9.1f} {r['batch_ms_p20']:>8.1f} "
              f"{r['batch_ms_p50']:>8.1f} {r['batch_ms_p80']:>8.1f}")

    os.makedirs(a.out, exist_ok=True)
    utc = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host = socket.gethostname().split(".")[0] or "host"
    meta = {"host": host, "utc": utc, "argv": sys.argv[1:] if argv is None else argv, "git_sha": git_sha(),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "load_avg_1m": os.getloadavg()[0],  # other work on the machine depresses these figures
            "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "pillow": Image.__version__,
            "dali": __import__("nvidia.dali", fromlist=["__version__"]).__version__ if dali_available() else None,
            "images": a.images, "size": a.size, "batch_size": a.batch_size, "threads": a.threads,
            "batches": a.batches, "quick": a.quick, "results": rows}
    out = os.path.join(a.out, f"loader-{host}-{utc}.json")
    with open(out, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out}")
    tmp.cleanup()
    return meta


if __name__ == "__main__":
    main()
