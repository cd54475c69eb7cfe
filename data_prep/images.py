"""Image checks and normalization at packing time, plus the IDX (MNIST-format) reader.

Policy (what reaches a shard):
  * The original bytes are kept byte-exact when no `--size` is asked for and the file is a baseline-decodable
    8-bit JPEG in L/RGB mode or an 8-bit PNG in L/RGB mode without transparency, with no EXIF rotation.
    Those are exactly the files both DALI's decoder and PIL read identically (up to JPEG IDCT rounding).
  * Everything else that PIL can decode is re-encoded once: EXIF rotation applied; CMYK/YCCK/LAB → RGB;
    palette and alpha → composited over white (RGB, or L when the source is grayscale); 16-bit and 32-bit
    grayscale → 8-bit L; 1-bit → L. JPEG sources are re-encoded as JPEG (quality `quality`, 4:4:4), all other
    formats (PNG, BMP, GIF, TIFF, WebP, ...) as PNG, so no re-encode adds a second lossy step to a lossless source.
  * With `size`, every image is ADM center-cropped (box-downsample by 2 while the short side is >= 2*size, bicubic
    to short side = size, center crop) and re-encoded the same way.
  * Rejected with a reason: unreadable, not an image, corrupt or truncated, smaller than `min_side` on a side,
    decompression bombs.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps


@dataclass
class Packed:
    """One accepted image: encoded bytes ready for the shard, and what was done to it."""
    data: bytes
    ext: str                 # "jpg" | "png"
    mode: str                # "L" | "RGB" (what the stored bytes decode to)
    width: int
    height: int
    action: str              # "kept" or a short description of the normalization


class Rejected(Exception):
    """Raised by `pack_image` with the human-readable reason the file was not packed."""


def center_crop_adm(img: Image.Image, size: int) -> Image.Image:
    """ADM (guided-diffusion) center crop: halve with BOX while the short side is >= 2*size, BICUBIC to short
    side = size, then crop the central size x size square."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left = (img.size[0] - size) // 2
    top = (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_l_or_rgb(img: Image.Image) -> Tuple[Image.Image, str]:
    """Convert any PIL mode to 8-bit L or RGB; returns (image, description of what changed)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img, ""
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max() <= 1.0 else np.clip(arr, 0, 255)
        elif arr.max() > 255:  # 16-bit samples: keep the top 8 bits, as every 16→8-bit viewer does
            arr = arr.astype(np.uint32) >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L"), f"{mode}->L"
    if mode == "1":
        return img.convert("L"), "1->L"
    if mode == "P":
        if "transparency" not in img.info:
            return img.convert("RGB"), "P->RGB"
        img = img.convert("RGBA")  # then composited over white below
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        base = "L" if mode in ("LA", "La") else "RGB"
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert(base), f"{img.mode}->{base} over white"
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: PIL's converter handles the colour transform
    return img.convert("RGB"), f"{mode}->RGB"


def pack_image(data: bytes, *, size: Optional[int] = None, min_side: int = 8, quality: int = 95) -> Packed:
    """Check one encoded image and return what goes into the shard; raise Rejected(reason) otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            img.load()  # full decode: catches truncated and corrupt data (PIL's LOAD_TRUNCATED_IMAGES is False)
    except Image.DecompressionBombError as e:
        raise Rejected(f"too large: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise Rejected(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not an image (PIL cannot identify the format)") from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError) as e:
        raise Rejected(f"corrupt or truncated image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise Rejected(f"too small: {w}x{h} (a side < min_side={min_side})")

    orientation = img.getexif().get(0x0112, 1)
    plain_jpeg = fmt == "JPEG" and img.mode in ("L", "RGB")
    plain_png = fmt == "PNG" and img.mode in ("L", "RGB") and "transparency" not in img.info
    if size is None and orientation in (None, 1) and (plain_jpeg or plain_png):
        return Packed(data, "jpg" if fmt == "JPEG" else "png", img.mode, w, h, "kept")

    actions = []
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        actions.append(f"exif-rotated({orientation})")
    img, conv = _to_l_or_rgb(img)
    if conv:
        actions.append(conv)
    if size is not None:
        img = center_crop_adm(img, size)
        actions.append(f"center-crop {size}")
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
        ext = "jpg"
    else:
        img.save(buf, format="PNG", compress_level=6, optimize=False)
        ext = "png"
    return Packed(buf.getvalue(), ext, img.mode, img.size[0], img.size[1],
                  "re-encoded: " + (", ".join(actions) if actions else f"{fmt}->{ext}"))


# ---------------------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST format): big-endian header, magic = 0x0000 <dtype> <ndim>, then ndim uint32 dims.

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, detected from the content) into a numpy array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count * dtype.itemsize} data bytes for shape {dims}, "
                         f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_pair(src: str, split: str) -> Tuple[str, str]:
    """Locate the image and label IDX files of `split` in `src` (plain or .gz)."""
    if split not in IDX_SPLITS:
        raise ValueError(f"--split must be one of {sorted(IDX_SPLITS)}, got {split!r}")
    found = []
    for stem in IDX_SPLITS[split]:
        for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            p = os.path.join(src, cand)
            if os.path.isfile(p):
                found.append(p)
                break
        else:
            raise FileNotFoundError(f"{src}: no {stem}[.gz] for --split {split}")
    return found[0], found[1]


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] → PNG bytes (deterministic: fixed zlib level)."""
    img = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()
