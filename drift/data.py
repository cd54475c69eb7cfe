"""Image loaders over `drift-prep` shards: a DALI pipeline (GPU "mixed" or CPU decode) and a PIL fallback.

    from drift.data import build_loader
    loader = build_loader("data/fmnist", 256, mode="center", device="cpu")
    images, labels = next(loader)      # [B, C, H, W] float32 in [-1, 1] (or uint8), int64 [B], on `device`

Processing (the same in both backends):
  * "center": ADM-style center crop — resize the short side to `image_size` (bicubic, antialiased), crop the
    central square. Images already stored at `image_size` (drift-prep --size, or IDX data) are not resampled.
  * "train":  RandomResizedCrop(scale 0.2–1, ratio 3/4–4/3) to `image_size`, then a horizontal flip with p=0.5.

Order and sharding. Shards are globally shuffled when packed. Rank r of W reads the r-th contiguous 1/W of the
samples in an epoch (DALI `shard_id` = GLOBAL rank; the assignment rotates every epoch), so ranks are disjoint
and their union is the epoch. The DALI reader reshuffles within a buffer every epoch (seeded); the PIL fallback
draws a full permutation from (seed, epoch). Both yield every sample of an epoch once, so both give the same
label multiset per epoch; their orders differ.

The PIL fallback reads the same shards by offset through the index files rather than streaming them with
webdataset: random access is what makes exact per-epoch permutations and mid-epoch resume possible
(webdataset's streaming readers cannot resume mid-epoch).

Exact resume. `state_dict()` counts the batches the caller actually received (prefetched batches are not
counted). DALI: the state holds DALI's own pipeline checkpoint (reader position and every random op's RNG
state) taken after the last delivered batch, so a resumed loader yields exactly the same batches, random crops
included. PIL: order and crops are pure functions of (seed, rank, epoch, position), so the same holds.
A state can only be loaded into a loader built with the same path, batch size, mode, size, ranks and backend.
"""
from __future__ import annotations

import base64
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from drift import schema

MODES = ("center", "train")
OUTPUTS = ("float", "uint8")
BACKENDS = ("auto", "dali", "pil")
RRC_SCALE = (0.2, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Dataset description shared by both backends


class ShardSet:
    """Manifest + per-shard index of a prepared dataset, checked cheaply (no hashing) when opened."""

    def __init__(self, path: str, check_headers: bool = True):
        self.root = path
        self.manifest = schema.read_manifest(path)
        if self.manifest.get("kind") == "latents":
            raise ValueError(f"{path} holds drift-prep latents, not images: read it with drift.data.open_loader "
                             "(drift-train and drift-mae do)")
        self.shards: List[str] = []
        self.indexes: List[str] = []
        # one entry per sample: (shard, img_off, img_size, img_ext, cls_off, cls_size)
        self.samples: List[Tuple[int, int, int, str, int, int]] = []
        for entry in self.manifest["shards"]:
            tar = os.path.join(path, entry["name"])
            idx = os.path.join(path, schema.index_name(entry["name"]))
            if not os.path.isfile(tar):
                raise FileNotFoundError(f"shard {tar} listed in the manifest is missing")
            if not os.path.isfile(idx):
                raise FileNotFoundError(f"index file {idx} of shard {entry['name']} is missing")
            with open(idx, "r", encoding="ascii", errors="replace") as f:
                text = f.read()
            rows = self._parse_index(text, idx)
            if len(rows) != entry["num_samples"]:
                raise ValueError(f"shard {tar}: index lists {len(rows)} samples, manifest says {entry['num_samples']}")
            size = os.path.getsize(tar)
            end = max((max(off + n, coff + cn) for off, n, _, coff, cn in rows), default=0)
            if end > size:
                raise ValueError(f"shard {tar} is truncated ({size} bytes, its index reaches byte {end}): "
                                 "repack it or run `drift-prep verify`")
            k = len(self.shards)
            self.samples.extend((k, off, n, ext, coff, cn) for off, n, ext, coff, cn in rows)
            self.shards.append(tar)
            self.indexes.append(idx)
        if not self.samples:
            raise ValueError(f"dataset {path} has no samples")
        if check_headers:
            # DALI's CPU decoder can crash the process (SIGSEGV, no message) on a batch holding garbage bytes
            # instead of raising; 8 bytes per sample is a cheap way to fail first, with the shard named
            bad = self.find_undecodable(limit=5)
            if bad:
                raise ValueError(f"corrupt dataset {path}: " + "; ".join(bad) + " (run `drift-prep verify`)")

    @staticmethod
    def _parse_index(text: str, path: str) -> List[Tuple[int, int, str, int, int]]:
        """Index text → [(img_off, img_size, img_ext, cls_off, cls_size)]. drift-prep writes every line as
        "cls <off> <size> <name> <ext> <off> <size> <name>"; that layout is read directly (ImageNet has 1.28M
        lines), anything else goes through the general parser."""
        lines = text.splitlines()
        rows = []
        for line in lines[1:]:
            p = line.split(" ")
            if len(p) != 8 or p[0] != schema.LABEL_EXT or p[4] not in schema.IMAGE_EXTS:
                break
            rows.append((int(p[5]), int(p[6]), p[4], int(p[1]), int(p[2])))
        else:
            head = lines[0].split() if lines else []
            if len(head) == 2 and head[0] == schema.INDEX_VERSION and head[1] == str(len(rows)):
                return rows
        rows = []
        for j, c in enumerate(schema.parse_index(text, path)):
            img_ext = next((e for e in schema.IMAGE_EXTS if e in c), None)
            if img_ext is None or schema.LABEL_EXT not in c:
                raise ValueError(f"{path}: sample {j} lacks an image or a cls component")
            rows.append((c[img_ext][0], c[img_ext][1], img_ext, c[schema.LABEL_EXT][0], c[schema.LABEL_EXT][1]))
        return rows

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def find_undecodable(self, limit: int = 5) -> List[str]:
        """Samples whose bytes do not start like a JPEG/PNG (cheap: 8 bytes each). Used to name the bad shard
        and sample after a decoder failure, since DALI's message does not say which sample failed."""
        bad = []
        fds = {}
        try:
            for shard, off, n, ext, _, _ in self.samples:
                if shard not in fds:
                    fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
                head = os.pread(fds[shard], 8, off)
                ok = head.startswith(b"\xff\xd8\xff") if ext == "jpg" else head == b"\x89PNG\r\n\x1a\n"
                if not ok:
                    bad.append(f"shard {self.shards[shard]}: the {ext} image at byte {off} is not a valid {ext}")
                    if len(bad) >= limit:
                        break
        finally:
            for fd in fds.values():
                os.close(fd)
        return bad


def _resolve_size(manifest: dict, image_size: Optional[int], path: str) -> int:
    if image_size is not None:
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        return int(image_size)
    stored = manifest.get("image_size")
    if not stored or stored[0] != stored[1]:
        raise ValueError(f"image_size=None needs square images of one size, but {path} stores "
                         f"{'mixed sizes' if not stored else stored}: pass image_size")
    return int(stored[0])


def _cls_to_labels(cls: torch.Tensor, path: str) -> torch.Tensor:
    """ASCII zero-padded decimal labels uint8 [B, W] → int64 [B]."""
    cls = cls.reshape(cls.shape[0], -1).to(torch.int64)
    digits = cls - 48
    if bool(((digits < 0) | (digits > 9)).any()):
        raise ValueError(f"{path}: a cls component is not an ASCII decimal label")
    powers = 10 ** torch.arange(cls.shape[1] - 1, -1, -1, dtype=torch.int64)
    return (digits * powers).sum(1)


# ---------------------------------------------------------------------------------------------------------------
# DALI backend: processing function separate from the @pipeline_def reader (the DALI EfficientNet example split)


def dali_processing(images, *, mode: str, image_size: int, stored_size: Optional[List[int]], channels: int,
                    output: str, decode_device: str):
    """Decode + crop + layout/normalize DataNodes: encoded images → [C, H, W] uint8 or float in [-1, 1]."""
    from nvidia.dali import fn, types

    images = fn.decoders.image(images, device=decode_device, output_type=types.GRAY if channels == 1 else types.RGB)
    mirror = 0
    if mode == "train":
        images = fn.random_resized_crop(images, size=(image_size, image_size), random_area=list(RRC_SCALE),
                                        random_aspect_ratio=list(RRC_RATIO), antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
    elif stored_size != [image_size, image_size]:  # stored at the target size already: no resampling at all
        images = fn.resize(images, resize_shorter=image_size, interp_type=types.INTERP_CUBIC, antialias=True)
    kw = dict(dtype=types.FLOAT, mean=[127.5] * channels, std=[127.5] * channels) if output == "float" else \
        dict(dtype=types.UINT8)
    return fn.crop_mirror_normalize(images, crop=(image_size, image_size), mirror=mirror, output_layout="CHW", **kw)


def _dali_pipe(shards, indexes, *, rank, world_size, initial_fill, **processing):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_checkpointing=True)
    def webdataset_pipe():
        images, cls = fn.readers.webdataset(
            paths=shards, index_paths=indexes, ext=["jpg;png", schema.LABEL_EXT], name="Reader",
            shard_id=rank, num_shards=world_size,  # GLOBAL rank: local rank would repeat data across nodes
            random_shuffle=True, initial_fill=initial_fill, missing_component_behavior="error")
        return dali_processing(images, **processing), cls

    return webdataset_pipe


class _Base:
    """Iterator protocol + bookkeeping shared by the backends."""

    backend = ""
    kind = "images"

    def __init__(self, ds: ShardSet, batch_size: int, *, mode, image_size, channels, output, device, rank,
                 world_size, seed, num_threads):
        self.ds = ds
        self.path = ds.root
        self.batch_size = batch_size
        self.mode, self.output, self.device = mode, output, torch.device(device)
        self.rank, self.world_size, self.seed, self.num_threads = rank, world_size, seed, num_threads
        m = ds.manifest
        self.num_classes = m["num_classes"]
        self.num_samples = m["num_samples"]
        self.classes = m["classes"]
        self.channels = int(channels if channels is not None else m.get("channels", 3))
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.image_size = _resolve_size(m, image_size, ds.root)
        self.stored_size = m.get("image_size")
        self.batches_consumed = 0

    def __iter__(self):
        return self

    def _identity(self) -> dict:
        return {"backend": self.backend, "batch_size": self.batch_size, "mode": self.mode,
                "image_size": self.image_size, "channels": self.channels, "output": self.output,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "num_samples": self.num_samples}

    def _check_state(self, sd: dict) -> None:
        mine = self._identity()
        for k, v in mine.items():
            if sd.get(k) != v:
                raise ValueError(f"loader state has {k}={sd.get(k)!r} but this loader has {k}={v!r}; "
                                 "build the loader with the settings of the run being resumed")

    @property
    def samples_consumed(self) -> int:
        return self.batches_consumed * self.batch_size

    @property
    def local_epoch_size(self) -> int:
        n, w, r = self.num_samples, self.world_size, self.rank
        return (n * (r + 1)) // w - (n * r) // w

    @property
    def epoch(self) -> int:
        return self.samples_consumed // max(1, self.local_epoch_size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DaliLoader(_Base):
    """DALI `readers.webdataset` pipeline; CPU decode (device_id=None) or GPU "mixed" decode."""

    backend = "dali"

    def __init__(self, ds: ShardSet, batch_size: int, **kw):
        super().__init__(ds, batch_size, **kw)
        self._pipe = self._it = None
        self._build(None)

    def _build(self, checkpoint: Optional[bytes]) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if gpu else None
        local = max(1, self.local_epoch_size)
        factory = _dali_pipe(
            self.ds.shards, self.ds.indexes, rank=self.rank, world_size=self.world_size,
            initial_fill=min(1024, local), mode=self.mode, image_size=self.image_size,
            stored_size=self.stored_size, channels=self.channels, output=self.output,
            decode_device="mixed" if gpu else "cpu")
        # one seed per rank: random crops must differ across ranks; 2**31 keeps it in DALI's accepted range
        seed = (self.seed * 1_000_003 + self.rank) % (2 ** 31)
        self._pipe = factory(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                             seed=seed, prefetch_queue_depth=2, checkpoint=checkpoint)
        # DALI errors are turned into messages OUTSIDE the except block: a live traceback would keep the failed
        # pipeline's frames (and its worker threads) alive past this call
        err = None
        try:
            self._pipe.build()
            # no reader_name: the iterator is infinite and the reader rolls into the next epoch inside DALI;
            # the constructor already runs the first batches (prefetch), so decode errors can surface here
            self._it = DALIGenericIterator([self._pipe], ["images", "cls"], size=-1, auto_reset=False)
        except RuntimeError as e:
            err = str(e)
        if err is not None:
            self.close()
            raise RuntimeError(self._failure_message(err))

    def _failure_message(self, err: str) -> str:
        bad = self.ds.find_undecodable(limit=5)
        where = "; ".join(bad) if bad else f"no bad image header found; run `drift-prep verify {self.path}`"
        return f"DALI failed while reading the shards of {self.path} ({where}): {err.strip()[:2000]}"

    def __next__(self):
        if self._it is None:
            raise RuntimeError(f"the loader over {self.path} is closed")
        err = None
        try:
            out = next(self._it)[0]
        except RuntimeError as e:
            err = str(e)
        if err is not None:
            self.close()
            raise RuntimeError(self._failure_message(err))
        images = out["images"]
        labels = _cls_to_labels(out["cls"], self.path)
        self.batches_consumed += 1
        # contiguous NCHW: torch 2.14's CPU backward of strided 1x1 convs corrupts the heap on channels-last input
        return images.contiguous().to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        sd = self._identity()
        ckpts = self._it.checkpoints()  # DALI: the state after the last batch this iterator returned
        sd.update(batches_consumed=self.batches_consumed, samples_consumed=self.samples_consumed,
                  epoch=self.epoch, dali_checkpoint=base64.b64encode(ckpts[0]).decode("ascii"))
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self._check_state(sd)
        self._build(base64.b64decode(sd["dali_checkpoint"]))
        self.batches_consumed = int(sd["batches_consumed"])

    def close(self) -> None:
        self._it = None
        self._pipe = None  # DALI releases its threads and buffers when the pipeline is garbage-collected


# ---------------------------------------------------------------------------------------------------------------
# PIL fallback: the same processing on PIL images, order and crops from per-epoch / per-sample seeds


def pil_center(img, image_size: int):
    """Resize the short side to image_size (bicubic, PIL's resize is antialiased) and crop the central square."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (image_size, image_size):
        s = image_size / min(w, h)
        img = img.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        # round-half-up offsets: what DALI's crop_pos 0.5 does, so both backends crop the same window
        left, top = (w - image_size + 1) // 2, (h - image_size + 1) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return img


def rrc_params(rng: np.random.Generator, width: int, height: int) -> Tuple[int, int, int, int]:
    """RandomResizedCrop box (left, top, w, h) with scale RRC_SCALE and ratio RRC_RATIO (10 tries, then the
    largest central crop with the ratio clamped: torchvision's rule)."""
    area = width * height
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        ratio = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        w, h = int(round(height * RRC_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def pil_process(data: bytes, *, mode: str, image_size: int, channels: int, rng: Optional[np.random.Generator]):
    """Encoded image → uint8 numpy [C, H, W] with the loader's processing."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
    if mode == "train":
        left, top, w, h = rrc_params(rng, *img.size)
        img = img.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        img = pil_center(img, image_size)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class PilLoader(_Base):
    """webdataset shards read by offset through the DALI index files, decoded by PIL in a thread pool."""

    backend = "pil"

    def __init__(self, ds: ShardSet, batch_size: int, **kw):
        super().__init__(ds, batch_size, **kw)
        self._fds: Dict[int, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.num_threads))
        self._closed = False
        self._perm_epoch, self._perm = -1, None

    def _local_order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            # same contiguous split as DALI, rotated by the epoch as DALI rotates shard ids
            part = (self.rank + epoch) % self.world_size
            n, w = self.num_samples, self.world_size
            self._perm = perm[(n * part) // w:(n * (part + 1)) // w]
            self._perm_epoch = epoch
        return self._perm

    def _read(self, i: int) -> Tuple[bytes, int]:
        shard, off, n, _ext, coff, cn = self.ds.samples[i]
        fd = self._fds[shard]  # opened by __next__ on the calling thread
        data = os.pread(fd, n, off)
        cls = os.pread(fd, cn, coff)
        if len(data) != n or len(cls) != cn:
            raise ValueError(f"shard {self.ds.shards[shard]} is truncated (sample at offset {off})")
        return data, schema.decode_cls(cls)

    def _load(self, job):
        i, epoch, pos = job
        data, label = self._read(i)
        rng = np.random.default_rng([self.seed, self.rank, epoch, pos]) if self.mode == "train" else None
        try:
            arr = pil_process(data, mode=self.mode, image_size=self.image_size, channels=self.channels, rng=rng)
        except Exception as e:  # name the shard and the offset so the bad sample can be found
            raise ValueError(f"cannot decode the image at offset {self.ds.samples[i][1]} of shard "
                             f"{self.ds.shards[self.ds.samples[i][0]]}: {type(e).__name__}: {e}") from None
        return arr, label

    def __next__(self):
        if self._closed:
            raise RuntimeError(f"the loader over {self.path} is closed")
        local = self.local_epoch_size
        if local < 1:
            raise ValueError(f"rank {self.rank} of {self.world_size} gets no samples of {self.path}")
        jobs = []
        start = self.samples_consumed
        for k in range(start, start + self.batch_size):
            epoch, pos = divmod(k, local)
            jobs.append((int(self._local_order(epoch)[pos]), epoch, pos))
            shard = self.ds.samples[jobs[-1][0]][0]
            if shard not in self._fds:
                self._fds[shard] = os.open(self.ds.shards[shard], os.O_RDONLY)
        results = list(self._pool.map(self._load, jobs))
        images = torch.from_numpy(np.stack([r[0] for r in results]))
        labels = torch.tensor([r[1] for r in results], dtype=torch.int64)
        if self.output == "float":
            images = (images.to(torch.float32) - 127.5) / 127.5
        self.batches_consumed += 1
        return images.contiguous().to(self.device), labels.to(self.device)  # contiguous NCHW, as the DALI path

    def state_dict(self) -> dict:
        sd = self._identity()
        sd.update(batches_consumed=self.batches_consumed, samples_consumed=self.samples_consumed, epoch=self.epoch)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self._check_state(sd)
        self.batches_consumed = int(sd["batches_consumed"])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pool.shutdown(wait=True)
        self._closed = True


def build_loader(path: str, batch_size: int, *, mode: str = "center", image_size: Optional[int] = None,
                 channels: Optional[int] = None, output: str = "float", device="cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, backend: str = "auto", num_threads: int = 2):
    """Infinite iterator of (images [B, C, H, W], labels int64 [B]) on `device` over the shards at `path`.

    mode "center" | "train"; image_size None → the stored size; channels None → the manifest's (1 or 3);
    output "float" (float32 in [-1, 1]) | "uint8"; backend "auto" (DALI if importable) | "dali" | "pil".
    rank / world_size are GLOBAL (torchrun's RANK / WORLD_SIZE).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if backend == "dali" and not dali_available():
        raise ImportError("backend='dali' but nvidia.dali is not importable (install nvidia-dali-cuda130)")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    use_dali = backend == "dali" or (backend == "auto" and dali_available())
    ds = ShardSet(path)
    if ds.num_samples < world_size:
        raise ValueError(f"{path} has {ds.num_samples} samples, fewer than world_size={world_size}")
    cls = DaliLoader if use_dali else PilLoader
    return cls(ds, int(batch_size), mode=mode, image_size=image_size, channels=channels, output=output,
               device=device, rank=rank, world_size=world_size, seed=seed, num_threads=num_threads)


def open_loader(path: str, batch_size: int, *, mode: str = "center", image_size: Optional[int] = None,
                device="cpu", rank: int = 0, world_size: int = 1, seed: int = 0, backend: str = "auto",
                num_threads: int = 2):
    """The training loader for any drift-prep directory, chosen from the directory itself.

    `drift-prep latents` output (manifest kind "latents") gives a `drift.latent_data.LatentLoader` (cached
    SD-VAE latents, already x0.18215, one random flip of the two stored); image shards give `build_loader`
    with float output in [-1, 1]. Both follow one contract: an endless iterator of (x [B, C, H, W] float32,
    labels int64 [B]) on `device`, `num_classes` / `channels` / `image_size` / `classes` / `num_samples`
    from the manifest, `state_dict()` / `load_state_dict()` for exact resume, and sharding by the GLOBAL
    rank. `kind` tells which one it is ("latents" or "images").
    """
    from drift.latent_data import build_latent_loader, is_latent_dir
    if is_latent_dir(path):
        return build_latent_loader(path, batch_size, mode=mode, image_size=image_size, device=device, rank=rank,
                                   world_size=world_size, seed=seed)
    return build_loader(path, batch_size, mode=mode, image_size=image_size, output="float", device=device,
                        rank=rank, world_size=world_size, seed=seed, backend=backend, num_threads=num_threads)
