"""Packing driver: sources (ImageFolder, IDX) → shuffled, resumable, byte-reproducible tar shards + index + manifest.

Shard k holds the accepted samples among positions [k*shard_size, (k+1)*shard_size) of the seeded global
permutation of all candidate files. Defining shards over candidates (not over accepted samples) makes every
shard's content a function of its own slice only, so a rerun can keep any finished shard and redo the rest in
any order; the price is that shards with rejected files hold slightly fewer than `shard_size` samples.

Progress lives in `OUT/.drift-prep-progress.json`: a fingerprint of the inputs and settings, plus one record per
finished shard (sha256 of the tar and the index, counts, rejects). A shard is trusted on rerun only if the
fingerprint matches and the file on disk still hashes to the recorded value.

Nothing met is skipped silently: every file under an ImageFolder SRC is packed or listed under `rejected` with a
reason, and every directory is walked or listed there with `"kind": "directory"` (one that cannot be listed,
say). Symlinks are followed, to files and to directories alike; a directory reached a second time (a symlink
loop, or two links to one directory) is rejected on that visit with the path it was first scanned as, so the
walk ends and no image is packed twice. The manifest counts `files_seen` and `dirs_seen`, and
`num_samples + rejected files == files_seen` is checked before a shard is written and again for the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_prep.images import Packed, Rejected, encode_png, find_idx_pair, pack_image, read_idx
from drift import schema

PROGRESS_NAME = ".drift-prep-progress.json"
_SHARD_FILE = re.compile(r"shard-\d{6}\.(tar|idx)")
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z, pinned so that tar headers (and so shard bytes) are reproducible
FAIL_ENV = "DRIFT_PREP_FAIL_AFTER_SHARDS"  # test hook: raise after this many shards were written by this run


@dataclass
class Candidate:
    """One input file (or IDX record): `source` is what the manifest reports, `stem` seeds the key hint."""
    source: str
    label: int
    stem: str
    ref: object            # absolute path (imagefolder) or record index (idx)


@dataclass
class Settings:
    seed: int = 0
    size: Optional[int] = None
    shard_size: int = 10000
    workers: int = 1
    min_side: int = 8
    quality: int = 95
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------------
# Sources


def _printable(path: str) -> str:
    """File names that are not valid UTF-8 (undecodable bytes arrive as surrogates) → a JSON-safe name."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass
class Scan:
    """What `scan_imagefolder` met: every file is a candidate or in `rejected`, every directory is walked or in
    `rejected` (with "kind": "directory"), so `files_seen == len(candidates) + rejected files`."""
    classes: List[str]
    candidates: List[Candidate]
    rejected: List[dict]
    files_seen: int
    dirs_seen: int


def _dir_id(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def scan_imagefolder(src: str) -> Scan:
    """ImageNet layout SRC/<class>/**/<file> → `Scan` (classes, candidates, rejects with reasons, counts).

    Classes are the sorted names of the non-hidden sub-directories of SRC (symlinks to directories included),
    empty ones included, so that the class map of train/ and val/ agree. Every entry met below SRC is counted
    and either becomes a candidate or is rejected with a reason: files outside a class folder, hidden files,
    hidden directories at the top level, non-regular files (FIFOs, sockets, devices: opening one could block
    forever), entries whose type cannot be read (a symlink loop, a permission error), and directories that
    cannot be listed (their content is unknown, so the directory itself is the rejected entry). Symlinked
    directories are followed; a directory already walked (a symlink loop, or two links to one directory) is
    rejected on its second visit, so nothing is packed twice and the walk ends.
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"SRC {src!r} is not a directory")
    classes, rejected, seen, dirs = [], [], 0, 0

    def reject(rel, reason, directory=False):
        rejected.append({"path": _printable(rel), "reason": reason, **({"kind": "directory"} if directory else {})})

    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError as e:
            seen += 1
            reject(entry.name, f"unreadable: {type(e).__name__}: {e.strerror or e}")
            continue
        if is_dir and entry.name.startswith("."):
            dirs += 1
            reject(entry.name, "hidden directory (not a class)", directory=True)
        elif is_dir:
            classes.append(entry.name)
        else:
            seen += 1
            reject(entry.name, "not inside a class folder")
    if not classes:
        raise ValueError(f"SRC {src!r} has no class sub-directories (expected SRC/<class>/<image files>)")
    visited: Dict[Tuple[int, int], str] = {_dir_id(src): "."}  # (device, inode) of every directory walked
    cands: List[Candidate] = []
    for label, cname in enumerate(classes):
        files: List[str] = []
        stack = [os.path.join(src, cname)]  # exact directory names; the manifest gets printable ones
        while stack:
            d = stack.pop()
            rel_d = os.path.relpath(d, src)
            dirs += 1
            try:
                key = _dir_id(d)
                if key in visited:
                    reject(rel_d, f"directory already scanned as {_printable(visited[key])!r} (symlink loop or "
                                  f"second link to one directory)", directory=True)
                    continue
                visited[key] = rel_d
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                reject(rel_d, f"unreadable directory: {type(e).__name__}: {e.strerror or e}", directory=True)
                continue
            subdirs = []
            for e in entries:
                rel = os.path.join(rel_d, e.name)
                try:
                    st = os.stat(e.path)  # follows symlinks: a link is judged by what it points to
                except OSError as err:
                    seen += 1
                    reject(rel, f"unreadable: {type(err).__name__}: {err.strerror or err}")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(e.path)
                    continue
                seen += 1
                if not stat.S_ISREG(st.st_mode):
                    reject(rel, "not a regular file (FIFO, socket or device)")
                elif e.name.startswith("."):
                    reject(rel, "hidden file")
                else:
                    files.append(e.path)
            stack.extend(reversed(subdirs))  # depth-first in name order: the first visit of a directory is stable
        for path in sorted(files):
            stem = os.path.splitext(os.path.basename(path))[0]
            cands.append(Candidate(_printable(os.path.relpath(path, src)), label, stem, path))
    return Scan([_printable(c) for c in classes], cands, rejected, seen, dirs)


def scan_idx(src: str, split: str, class_names: Optional[Sequence[str]] = None):
    """IDX image + label files of `split` → (classes, candidates, images array, labels array)."""
    img_path, lab_path = find_idx_pair(src, split)
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim not in (3, 4) or images.dtype != np.uint8 or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"{img_path}: expected uint8 images [N, H, W] or [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{lab_path}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"{lab_path}: negative labels")
    num_classes = int(labels.max()) + 1
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    elif len(class_names) < num_classes:
        raise ValueError(f"--class-names gives {len(class_names)} names but labels go up to {num_classes - 1}")
    base = os.path.basename(img_path)
    cands = [Candidate(f"{base}[{i}]", int(labels[i]), f"{split}{i:06d}", i) for i in range(len(images))]
    return list(class_names), cands, images


# ---------------------------------------------------------------------------------------------------------------
# Workers (fork start method: the IDX array and settings are inherited, not pickled per task)

_WORKER: Dict[str, object] = {}


def _work(task: Tuple[int, Candidate]):
    pos, cand = task
    s: Settings = _WORKER["settings"]
    try:
        if isinstance(cand.ref, str):
            try:
                with open(cand.ref, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise Rejected(f"unreadable: {type(e).__name__}: {e.strerror or e}") from None
            if not data:
                raise Rejected("empty file")
            packed = pack_image(data, size=s.size, min_side=s.min_side, quality=s.quality)
        else:
            arr = _WORKER["images"][cand.ref]
            if s.size is not None and s.size != arr.shape[0]:
                from PIL import Image
                from data_prep.images import center_crop_adm
                img = center_crop_adm(Image.fromarray(arr), s.size)
                arr = np.asarray(img)
            packed = Packed(encode_png(np.ascontiguousarray(arr)), "png", "L" if arr.ndim == 2 else "RGB",
                            arr.shape[1], arr.shape[0], "encoded from IDX")
        return pos, packed, None
    except Rejected as e:
        return pos, None, str(e)
    except Exception as e:  # never let one odd file kill a multi-hour packing run; it is reported instead
        return pos, None, f"unexpected error: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------------------
# Shard writing


class _HashingFile:
    """Write-through wrapper that hashes and counts bytes (tarfile needs write() and tell())."""

    def __init__(self, f):
        self.f, self.h, self.pos = f, hashlib.sha256(), 0

    def write(self, b):
        self.f.write(b)
        self.h.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self):
        return self.pos


def _add_member(tf: tarfile.TarFile, out: _HashingFile, name: str, data: bytes) -> int:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = TAR_MTIME
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    tf.addfile(ti, io.BytesIO(data))
    return out.pos - ((len(data) + 511) // 512) * 512  # data offset = end of the padded data minus its length


def write_shard(out_dir: str, name: str, samples: List[Tuple[str, Packed, int]], width: int) -> Tuple[str, str]:
    """Write `samples` [(key, packed, label)] as `name` (+ its index) via temporary names; return the sha256s."""
    path = os.path.join(out_dir, name)
    idx_path = os.path.join(out_dir, schema.index_name(name))
    tmp = path + ".partial"
    entries = []
    with open(tmp, "wb") as f:
        hf = _HashingFile(f)
        # GNU format: older DALI releases read only GNU tars (PAX headers broke them); keys are short ASCII anyway
        with tarfile.open(fileobj=hf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for key, packed, label in samples:
                comps = []
                for ext, data in sorted([(schema.LABEL_EXT, schema.encode_cls(label, width)),
                                         (packed.ext, packed.data)]):
                    member = f"{key}.{ext}"
                    off = _add_member(tf, hf, member, data)
                    comps.append((ext, off, len(data), member))
                entries.append(comps)
        f.flush()
        os.fsync(f.fileno())
    idx_text = schema.format_index(entries).encode("ascii")
    with open(idx_path + ".partial", "wb") as f:
        f.write(idx_text)
    os.replace(idx_path + ".partial", idx_path)
    os.replace(tmp, path)  # the tar appears under its final name only when complete
    return hf.h.hexdigest(), hashlib.sha256(idx_text).hexdigest()


def sha256_file(path: str, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _shard_done(out_dir: str, rec: dict) -> bool:
    if rec["num_samples"] == 0:
        return True
    tar = os.path.join(out_dir, rec["name"])
    idx = os.path.join(out_dir, schema.index_name(rec["name"]))
    return (os.path.isfile(tar) and os.path.isfile(idx) and sha256_file(tar) == rec["sha256"]
            and sha256_file(idx) == rec["index_sha256"])


# ---------------------------------------------------------------------------------------------------------------
# Driver


def resume_records(out_dir: str, fingerprint: str, log, who: str) -> Dict[str, dict]:
    """Progress records of finished shards that can be kept by a rerun; removes half-written `.partial` files.

    Records are dropped when the inputs or settings changed (another fingerprint) or the shard on disk no longer
    matches its record. Shared by every resumable drift-prep command.
    """
    progress_path = os.path.join(out_dir, PROGRESS_NAME)
    records: Dict[str, dict] = {}
    if os.path.isfile(progress_path):
        try:
            with open(progress_path, encoding="utf-8") as f:
                prev = json.load(f)
            if prev.get("fingerprint") == fingerprint:
                records = prev.get("shards", {})
            else:
                log(f"{who}: inputs or settings changed since the previous run in this directory; redoing every shard")
        except (OSError, json.JSONDecodeError):
            log(f"{who}: ignoring unreadable progress record {progress_path}")
    kept = {}
    for name, rec in records.items():
        if _shard_done(out_dir, rec):
            kept[name] = rec
        else:
            log(f"{who}: {name} is missing or differs from its progress record; redoing it")
    for fn in os.listdir(out_dir):  # leftovers of an interrupted run
        if fn.endswith(".partial"):
            os.remove(os.path.join(out_dir, fn))
    return kept


def pack(out_dir: str, classes: List[str], cands: List[Candidate], settings: Settings, *,
         source_kind: str, source: str, scan_rejected: Sequence[dict] = (), files_seen: Optional[int] = None,
         dirs_seen: int = 0, idx_images: Optional[np.ndarray] = None, log: Callable[[str], None] = print) -> dict:
    """Shuffle `cands` with the seed, write shards (keeping finished ones from an earlier run), write the manifest.

    The scan's counts are checked before any shard is written; the manifest's own count check runs after the
    shards exist, so when it fails the manifest is still written (with `consistency_error` set) before the error
    is raised: what was packed is always on record.
    """
    from tqdm import tqdm

    if settings.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {settings.shard_size}")
    if settings.size is not None and settings.size < 1:
        raise ValueError(f"--size must be >= 1, got {settings.size}")
    scan_files_rejected = sum(1 for r in scan_rejected if r.get("kind") != "directory")
    if files_seen is None:
        files_seen = len(cands) + scan_files_rejected
    if len(cands) + scan_files_rejected != files_seen:  # a scan bug: refuse before writing anything
        raise RuntimeError(f"internal: {len(cands)} candidates + {scan_files_rejected} rejected by the scan != "
                           f"{files_seen} files seen; nothing written to {out_dir!r}")
    os.makedirs(out_dir, exist_ok=True)
    width = schema.cls_width(len(classes))
    fingerprint = hashlib.sha256(json.dumps({
        "kind": source_kind, "classes": classes, "seed": settings.seed, "size": settings.size,
        "shard_size": settings.shard_size, "min_side": settings.min_side, "quality": settings.quality,
        "items": [(c.source, c.label) for c in cands],
        "stats": [_stat(c.ref) for c in cands] if source_kind == "imagefolder" else None,
        "idx": hashlib.sha256(idx_images.tobytes()).hexdigest() if idx_images is not None else None,
    }, sort_keys=True).encode()).hexdigest()

    order = list(range(len(cands)))
    random.Random(settings.seed).shuffle(order)
    n_shards = (len(order) + settings.shard_size - 1) // settings.shard_size

    progress_path = os.path.join(out_dir, PROGRESS_NAME)
    records = resume_records(out_dir, fingerprint, log, "drift-prep")

    def save_progress():
        schema.write_json_atomic(progress_path, {"fingerprint": fingerprint, "shards": records})

    pending = [k for k in range(n_shards) if schema.shard_name(k) not in records]
    done_items = sum(min(settings.shard_size, len(order) - k * settings.shard_size)
                     for k in range(n_shards) if schema.shard_name(k) in records)
    if records:
        log(f"drift-prep: keeping {len(records)} finished shard(s), writing {len(pending)}")
    fail_after = int(os.environ.get(FAIL_ENV, "-1"))
    written = 0

    tasks = ((pos, cands[order[pos]]) for k in pending
             for pos in range(k * settings.shard_size, min((k + 1) * settings.shard_size, len(order))))
    _WORKER["settings"] = settings
    _WORKER["images"] = idx_images
    pool = None
    if settings.workers > 1:
        pool = mp.get_context("fork").Pool(settings.workers)
        results = pool.imap(_work, tasks, chunksize=32)
    else:
        results = map(_work, tasks)
    bar = tqdm(total=len(order), initial=done_items, unit="img", desc="drift-prep", dynamic_ncols=True,
               disable=not settings.progress, smoothing=0.05)
    try:
        for k in pending:
            lo, hi = k * settings.shard_size, min((k + 1) * settings.shard_size, len(order))
            samples, rejected, normalized = [], [], []
            class_counts = [0] * len(classes)
            modes, exts, actions = Counter(), Counter(), Counter()
            sizes = Counter()
            for _ in range(lo, hi):
                pos, packed, reason = next(results)
                cand = cands[order[pos]]
                if packed is None:
                    rejected.append({"path": cand.source, "reason": reason})
                else:
                    samples.append((schema.make_key(pos, cand.stem), packed, cand.label))
                    class_counts[cand.label] += 1
                    modes[packed.mode] += 1
                    exts[packed.ext] += 1
                    actions[packed.action] += 1
                    # with --size every file is re-encoded; then the counts in `actions` say enough
                    if packed.action != "kept" and settings.size is None:
                        normalized.append({"path": cand.source, "action": packed.action})
                    sizes[f"{packed.width}x{packed.height}"] += 1
                bar.update(1)
            name = schema.shard_name(k)
            rec = {"name": name, "num_samples": len(samples), "rejected": rejected,
                   "normalized": normalized if source_kind == "imagefolder" else [],
                   "class_counts": class_counts, "modes": dict(modes), "exts": dict(exts),
                   "actions": dict(actions), "sizes": dict(sizes)}
            if samples:
                rec["sha256"], rec["index_sha256"] = write_shard(out_dir, name, samples, width)
            else:  # nothing accepted in this slice: no file (DALI refuses empty tars); the gap is in the manifest
                for stale in (name, schema.index_name(name)):
                    if os.path.exists(os.path.join(out_dir, stale)):
                        os.remove(os.path.join(out_dir, stale))
            records[name] = rec
            save_progress()
            written += 1
            if written == fail_after:
                raise RuntimeError(f"{FAIL_ENV}={fail_after}: injected failure after writing {name}")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _WORKER.clear()

    manifest = _manifest(classes, records, n_shards, settings, source_kind, source, scan_rejected, files_seen,
                         dirs_seen, width)
    manifest_path = os.path.join(out_dir, schema.MANIFEST_NAME)
    schema.write_json_atomic(manifest_path, manifest)
    if "consistency_error" in manifest:
        raise RuntimeError(f"{manifest_path}: {manifest['consistency_error']} (the manifest lists what was packed)")
    # shards of an earlier layout in this directory (other --shard-size, fewer files) would confuse readers
    # that glob; only names in our own shard pattern are touched
    keep = {n for s in manifest["shards"] for n in (s["name"], s["index"])}
    for fn in os.listdir(out_dir):
        if _SHARD_FILE.fullmatch(fn) and fn not in keep:
            os.remove(os.path.join(out_dir, fn))
    return manifest


def _stat(path) -> Tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _manifest(classes, records, n_shards, settings, source_kind, source, scan_rejected, files_seen, dirs_seen,
              width):
    shards, rejected, normalized = [], list(scan_rejected), []
    class_counts = [0] * len(classes)
    modes, exts, actions, sizes = Counter(), Counter(), Counter(), Counter()
    for k in range(n_shards):
        rec = records[schema.shard_name(k)]
        rejected.extend(rec["rejected"])
        normalized.extend(rec["normalized"])
        for i, c in enumerate(rec["class_counts"]):
            class_counts[i] += c
        for agg, key in ((modes, "modes"), (exts, "exts"), (actions, "actions"), (sizes, "sizes")):
            agg.update(rec[key])
        if rec["num_samples"]:
            shards.append({"name": rec["name"], "num_samples": rec["num_samples"], "sha256": rec["sha256"],
                           "index": schema.index_name(rec["name"]), "index_sha256": rec["index_sha256"]})
    num_samples = sum(s["num_samples"] for s in shards)
    files_rejected = sum(1 for r in rejected if r.get("kind") != "directory")
    only_size = next(iter(sizes)) if len(sizes) == 1 else None
    m = {
        "format_version": schema.FORMAT_VERSION,
        "source_kind": source_kind,
        "source": os.path.abspath(source),
        "num_samples": num_samples,
        "num_classes": len(classes),
        "classes": classes,
        "class_counts": class_counts,
        "empty_classes": [c for c, n in zip(classes, class_counts) if n == 0],
        "files_seen": files_seen,
        "dirs_seen": dirs_seen,
        "shards": shards,
        "rejected": rejected,
        "normalized": normalized,  # files whose bytes were re-encoded (all others are stored byte-exact)
        "channels": 1 if set(modes) <= {"L"} and modes else 3,
        "image_modes": dict(modes),
        "image_exts": dict(exts),
        "image_size": [int(v) for v in only_size.split("x")][::-1] if only_size else None,  # [H, W] if uniform
        "actions": dict(actions),
        "cls_width": width,
        "seed": settings.seed,
        "size": settings.size,
        "shard_size": settings.shard_size,
        "min_side": settings.min_side,
        "quality": settings.quality,
        "created_by": "drift-prep",
    }
    if num_samples + files_rejected != files_seen:  # every file seen is packed or rejected; a bug if it breaks
        m["consistency_error"] = (f"internal: {num_samples} samples + {files_rejected} rejected files != "
                                  f"{files_seen} files seen")
    return m
