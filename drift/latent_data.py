"""Reader of latent shards written by `drift-prep latents` (paper §12 "Data": cached SD-VAE latents of ADM
center-cropped images, with a 50% chance of the pre-encoded horizontally flipped latent).

Each sample of a latent shard is ``<key>.npy`` (array [2, C, h, w]: plain, flipped) plus ``<key>.cls``; the
DALI index file beside each shard gives the byte offsets, so samples are read by seeking, without scanning tars.

`LatentLoader` follows the loader contract of `drift.data.build_loader`: an endless iterator whose
``next()`` returns ``(latents [B, C, h, w] float32, labels [B] int64)`` on `device`, with ``state_dict()`` /
``load_state_dict()`` for exact resume. Each epoch is a seeded permutation of all samples, split across ranks
(rank r takes positions r, r + world, ...); the flip of every sample is a seeded coin per (epoch, position),
so a resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import io
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

from drift import schema

LATENT_EXT = "npy"


class LatentShards:
    """Random access to the samples of a latent shard directory."""

    def __init__(self, root: str):
        self.root = root
        m = schema.read_manifest(root)
        if m.get("kind") != "latents":
            raise ValueError(f"{root} is not a latent shard directory (manifest kind is {m.get('kind')!r}); "
                             f"create one with `drift-prep latents`")
        self.manifest = m
        self.num_classes = m["num_classes"]
        self.latent_shape = tuple(m["latent_shape"][1:]) if m.get("latent_shape") else None
        self.paths: List[str] = []
        entries: List[Tuple[int, int, int, int, int]] = []  # (shard, lat offset, lat size, cls offset, cls size)
        for si, s in enumerate(m["shards"]):
            tar = os.path.join(root, s["name"])
            idx = os.path.join(root, schema.index_name(s["name"]))
            if not os.path.isfile(tar):
                raise FileNotFoundError(f"latent shard {tar} listed in the manifest is missing")
            if not os.path.isfile(idx):
                raise FileNotFoundError(f"index file {idx} of latent shard {tar} is missing")
            with open(idx, encoding="ascii") as f:
                rows = schema.parse_index(f.read(), idx)
            if len(rows) != s["num_samples"]:
                raise ValueError(f"{idx}: {len(rows)} samples, the manifest says {s['num_samples']}")
            size = os.path.getsize(tar)
            for r in rows:
                if LATENT_EXT not in r or schema.LABEL_EXT not in r:
                    raise ValueError(f"{idx}: a sample lacks the {LATENT_EXT!r} or {schema.LABEL_EXT!r} component")
                lo, ls, _ = r[LATENT_EXT]
                co, cs, _ = r[schema.LABEL_EXT]
                if lo + ls > size or co + cs > size:
                    raise ValueError(f"latent shard {tar} is truncated ({size} bytes; index points past the end)")
                entries.append((si, lo, ls, co, cs))
            self.paths.append(tar)
        self.entries = np.asarray(entries, dtype=np.int64).reshape(-1, 5)
        self._files: Dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: int, off: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.paths[shard], "rb")
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"latent shard {self.paths[shard]} is truncated at offset {off}")
        return data

    def get(self, i: int, flip: int) -> Tuple[np.ndarray, int]:
        si, lo, ls, co, cs = (int(v) for v in self.entries[i])
        try:
            arr = np.load(io.BytesIO(self._read(si, lo, ls)), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"latent shard {self.paths[si]}: sample {i} is corrupt ({e})") from None
        if arr.ndim != 4 or arr.shape[0] != 2:
            raise ValueError(f"latent shard {self.paths[si]}: sample {i} has shape {arr.shape}, expected [2, C, h, w]")
        return arr[flip], schema.decode_cls(self._read(si, co, cs))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class LatentLoader:
    """Endless, resumable batches of (latents, labels) with one random flip per sample."""

    kind = "latents"

    def __init__(self, root: str, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu", shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.data = LatentShards(root)
        if len(self.data) < world_size * batch_size:
            raise ValueError(f"{root} holds {len(self.data)} samples, fewer than one batch of {batch_size} "
                             f"per rank for {world_size} rank(s)")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.device = seed, shuffle, torch.device(device)
        self.num_classes = self.data.num_classes
        self.classes = self.data.manifest.get("classes")
        self.vae_scale = self.data.manifest.get("vae_scale")
        self.num_samples = len(self.data)
        shape = self.data.latent_shape or self.data.get(0, 0)[0].shape
        self.channels, self.image_size = int(shape[0]), int(shape[1])  # what the trainer reads off any loader
        self.epoch, self.pos = 0, 0  # pos: batches already taken in this epoch (per rank)
        self._plan = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.world_size // self.batch_size

    def _epoch_plan(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.data)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        flips = torch.randint(0, 2, (n,), generator=g)
        mine = torch.arange(self.rank, n, self.world_size)  # positions this rank owns
        return order[mine].numpy(), flips[mine].numpy()

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos, self._plan = self.epoch + 1, 0, None
        if self._plan is None:
            self._plan = self._epoch_plan()
        order, flips = self._plan
        lo = self.pos * self.batch_size
        lat, lab = [], []
        for j in range(lo, lo + self.batch_size):
            a, y = self.data.get(int(order[j]), int(flips[j]))
            lat.append(a)
            lab.append(y)
        self.pos += 1
        x = torch.from_numpy(np.stack(lat).astype(np.float32, copy=False))
        y = torch.tensor(lab, dtype=torch.int64)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_samples": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "world_size": self.world_size, "num_samples": len(self.data)}
        for k, v in mine.items():
            if state.get(k) != v:
                raise ValueError(f"loader state has {k}={state.get(k)!r}, this loader has {k}={v!r}")
        self.epoch, self.pos, self._plan = int(state["epoch"]), int(state["pos"]), None

    def close(self) -> None:
        self.data.close()


def build_latent_loader(root: str, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                        device="cpu", shuffle: bool = True, mode: str = "center", image_size=None,
                        channels=None, output: str = "float", backend: str = "auto",
                        num_threads: int = 2) -> LatentLoader:
    """Same call surface as `drift.data.build_loader`, so a trainer can pick either by `is_latent_dir(path)`.

    Latents are cached at one crop, so `mode` ("center" or "train") changes nothing but the flip is always
    random; `image_size`/`channels`, when given, must match the cached latent; `backend`/`num_threads` are
    accepted for compatibility (reads are plain seeks)."""
    if mode not in ("center", "train"):
        raise ValueError(f"mode must be 'center' or 'train', got {mode!r}")
    if output != "float":
        raise ValueError(f"latent shards only give float output, got output={output!r}")
    ld = LatentLoader(root, batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                      shuffle=shuffle)
    if image_size not in (None, 0, ld.image_size):
        raise ValueError(f"{root} holds {ld.image_size}x{ld.image_size} latents, image_size={image_size} requested")
    if channels not in (None, ld.channels):
        raise ValueError(f"{root} holds {ld.channels}-channel latents, channels={channels} requested")
    return ld


def is_latent_dir(root: str) -> bool:
    """True when `root` holds `drift-prep latents` output (lets the trainer pick the right loader)."""
    try:
        return schema.read_manifest(root).get("kind") == "latents"
    except (FileNotFoundError, ValueError):
        return False


__all__ = ["LatentShards", "LatentLoader", "build_latent_loader", "is_latent_dir", "LATENT_EXT"]
