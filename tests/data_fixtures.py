"""Synthetic inputs for the data-path tests: small ImageFolders (good and bad files), IDX files, and a
Fashion-MNIST-like IDX directory for the demo metrics."""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import struct
import threading
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image


def noise_image(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> Image.Image:
    """Smooth random image (a blurred gradient + noise): JPEG-friendly, and distinct per call."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = 1 if mode == "L" else 3
    planes = []
    for _ in range(chans):
        a, b, c = rng.uniform(-3, 3, size=3)
        planes.append(127 + 60 * np.sin(a * xx / w + b * yy / h + c) + rng.normal(0, 12, size=(h, w)))
    arr = np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_imagefolder(root: str, classes=("cat", "dog", "fish"), per_class: int = 4, size=(24, 20),
                     seed: int = 0, fmt: str = "JPEG") -> Dict[str, int]:
    """Clean ImageFolder: `per_class` distinct images per class. Returns {relative path: label}."""
    rng = np.random.default_rng(seed)
    ext = ".JPEG" if fmt == "JPEG" else ".png"
    out = {}
    for label, c in enumerate(classes):
        for i in range(per_class):
            w = size[0] + int(rng.integers(0, 5))
            h = size[1] + int(rng.integers(0, 5))
            rel = os.path.join(c, f"{c}_{i:04d}{ext}")
            kw = {"quality": 90} if fmt == "JPEG" else {}
            write(os.path.join(root, rel), encode(noise_image(rng, w, h), fmt, **kw))
            out[rel] = label
    return out


def exif_rotated_jpeg(rng, w: int, h: int, orientation: int = 6) -> bytes:
    img = noise_image(rng, w, h)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=92, exif=exif.tobytes())


def make_bad_imagefolder(root: str, seed: int = 0) -> Dict[str, Optional[str]]:
    """ImageFolder with every bad-input case drift-prep promises to handle (README). Returns {relative path: expected outcome}, where the
    outcome is None for "packed byte-exact", "normalized:<mode>" for re-encoded files, and "rejected:<reason
    substring>" for rejects."""
    rng = np.random.default_rng(seed)
    good = encode(noise_image(rng, 32, 24), "JPEG", quality=90)
    cases: Dict[str, Optional[str]] = {}

    def add(rel, data, outcome):
        write(os.path.join(root, rel), data)
        cases[rel] = outcome

    add("alpha/plain.JPEG", good, None)
    add("alpha/gray.JPEG", encode(noise_image(rng, 30, 26, "L"), "JPEG", quality=90), None)
    add("alpha/cmyk.jpg", encode(noise_image(rng, 30, 26).convert("CMYK"), "JPEG", quality=90), "normalized:RGB")
    add("alpha/truncated.JPEG", good[: len(good) // 2], "rejected:corrupt or truncated")
    add("alpha/garbage.JPEG", b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 600, dtype=np.uint8)),
        "rejected:corrupt or truncated")
    add("alpha/notes.txt", b"this is not an image\n", "rejected:not an image")
    add("alpha/empty.JPEG", b"", "rejected:empty file")
    add("alpha/tiny.png", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "rejected:too small")
    add("alpha/rotated.JPEG", exif_rotated_jpeg(rng, 32, 20, 6), "normalized:RGB")
    gray16 = Image.fromarray((rng.integers(0, 65535, (20, 22))).astype(np.uint16))
    add("beta/deep16.png", encode(gray16, "PNG"), "normalized:L")
    add("beta/palette.png", encode(noise_image(rng, 24, 24).convert("P"), "PNG"), "normalized:RGB")
    pal_t = noise_image(rng, 24, 24).convert("P")
    pal_t.info["transparency"] = 0
    add("beta/palette_alpha.png", encode(pal_t, "PNG", transparency=0), "normalized:RGB")
    rgba = noise_image(rng, 24, 24).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (24, 24)).astype(np.uint8)))
    add("beta/rgba.png", encode(rgba, "PNG"), "normalized:RGB")
    add("beta/la.png", encode(noise_image(rng, 24, 24, "L").convert("LA"), "PNG"), "normalized:L")
    add("beta/plain.png", encode(noise_image(rng, 24, 24), "PNG"), None)
    add("beta/png named.JPEG", encode(noise_image(rng, 24, 24), "PNG"), None)  # wrong extension, space
    add("beta/pic.v2.final.JPEG", encode(noise_image(rng, 26, 24), "JPEG", quality=90), None)
    add("beta/café ünïcode.JPEG", encode(noise_image(rng, 26, 24), "JPEG", quality=90), None)
    add("beta/sub dir/nested.bmp", encode(noise_image(rng, 20, 20), "BMP"), "normalized:RGB")
    add("beta/.hidden.JPEG", good, "rejected:hidden")
    add("stray_at_root.JPEG", good, "rejected:not inside a class folder")
    os.makedirs(os.path.join(root, "gamma_empty"), exist_ok=True)
    # unreadable: a dangling link fails to open even for root (chmod 000 does not stop root)
    os.symlink(os.path.join(root, "does-not-exist.JPEG"), os.path.join(root, "alpha", "dangling.JPEG"))
    cases["alpha/dangling.JPEG"] = "rejected:unreadable"
    return cases


@contextlib.contextmanager
def unreadable_dir(path: str):
    """Make directory `path` unlistable while the block runs: chmod 000, or, where that does not stop this
    process (root ignores permission bits), make `os.scandir`/`os.listdir` of it raise PermissionError the way
    the kernel would. The directory is restored afterwards so that tmp_path clean-up works."""
    target = os.path.realpath(path)
    mode = os.stat(path).st_mode
    os.chmod(path, 0)
    try:
        os.listdir(path)
        blocked = False
    except PermissionError:
        blocked = True
    real_scandir, real_listdir = os.scandir, os.listdir

    def guard(real):
        def call(p=".", *args):
            if isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)) == target:
                raise PermissionError(13, "Permission denied", os.fsdecode(p))
            return real(p, *args)
        return call

    if not blocked:
        os.scandir, os.listdir = guard(real_scandir), guard(real_listdir)
    try:
        yield
    finally:
        os.scandir, os.listdir = real_scandir, real_listdir
        os.chmod(path, mode)


@contextlib.contextmanager
def fifo_with_eof_writer(path: str):
    """A FIFO at `path`. A thread keeps offering a writer that closes at once, so a reader that opens it gets EOF
    instead of blocking forever (code that wrongly opens a FIFO as an image fails a test rather than hanging)."""
    os.mkfifo(path)
    stop = threading.Event()

    def offer():
        while not stop.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
            except OSError:
                pass
            stop.wait(0.02)

    t = threading.Thread(target=offer, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        t.join()


def write_idx(path: str, arr: np.ndarray, gz: bool) -> str:
    """numpy uint8 array → IDX file (magic 0x08 = ubyte)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def make_idx(root: str, n_train: int = 60, n_test: int = 20, num_classes: int = 5, hw=(12, 12),
             gz: bool = True, seed: int = 0):
    """Random (hence pairwise distinct) uint8 images + labels in MNIST file names. Returns the arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        rng.shuffle(labels)
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{stem}-images-idx3-ubyte{suffix}"), images, gz)
        write_idx(os.path.join(root, f"{stem}-labels-idx1-ubyte{suffix}"), labels, gz)
        out[split] = (images, labels)
    return out


def synthetic_fashion(n, seed):
    """28x28 'classes': a bright bar whose position encodes the class, plus noise (images in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = -torch.ones(n, 1, 28, 28)
    for c in range(4):
        x[labels == c, :, 2 + 6 * c:8 + 6 * c, 4:24] = 0.9
    x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, labels


def write_fake_idx_dir(root, n_train=256, n_test=128):
    """A Fashion-MNIST-like IDX directory (gzip files) of `synthetic_fashion` images; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed, (img, lbl) in (("train", n_train, 0, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                       ("test", n_test, 1, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        x, y = synthetic_fashion(n, seed)
        u8 = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        write_idx(str(root / (img + ".gz")), u8, gz=True)
        write_idx(str(root / (lbl + ".gz")), y.numpy().astype(np.uint8), gz=True)
    return root


def save_tiny_vae(path, sample_size: int) -> str:
    """A tiny randomly initialised SD-VAE (diffusers AutoencoderKL: 8x downsampling, 4 latent channels, seed 0)
    saved in diffusers' directory format at `path`, the layout `--vae DIR` reads. Returns str(path)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=sample_size)
    vae.save_pretrained(str(path))
    return str(path)
