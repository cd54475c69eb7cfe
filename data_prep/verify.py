"""`drift-prep verify OUT`: re-read every shard, check it against manifest.json, decode every image.

Checks per shard: the file exists, its sha256 and sample count match the manifest, the tar parses, every sample
has exactly one image (`jpg|png`) and one `cls` member under a valid dot-free key, the label is in range, the
image decodes completely, and the index file equals the one rebuilt from the tar. Problems are collected (not
raised one at a time) so that one run names every bad shard and sample. The manifest itself must add up: samples
plus rejected files equal `files_seen`, and no `consistency_error` was recorded by drift-prep.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import tarfile
from collections import Counter
from typing import List, Tuple

from PIL import Image

from data_prep.pack import sha256_file
from drift import schema


def verify_shard(root: str, entry: dict, num_classes: int, decode: bool = True) -> Tuple[List[str], List[int]]:
    """Return (problems, class_counts) for one manifest shard entry."""
    name = entry["name"]
    path = os.path.join(root, name)
    problems: List[str] = []
    counts = [0] * num_classes
    if not os.path.isfile(path):
        return [f"{name}: missing"], counts
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:16]}... does not match the manifest ({entry['sha256'][:16]}...)")
    samples: List[Tuple[str, dict]] = []
    index_entries = []
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    problems.append(f"{name}: unexpected non-file member {m.name!r}")
                    continue
                key, ext = schema.split_member(m.name)
                if key is None:
                    problems.append(f"{name}: member {m.name!r} has no extension")
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                    index_entries.append([])
                comps = samples[-1][1]
                if ext in comps:
                    problems.append(f"{name}: sample {key}: duplicate component {ext!r}")
                comps[ext] = tf.extractfile(m).read()
                index_entries[-1].append((ext, m.offset_data, m.size, m.name))
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e})")
        return problems, counts
    keys = Counter(k for k, _ in samples)
    for key, n in keys.items():
        if n > 1:
            problems.append(f"{name}: key {key} appears in {n} separate groups")
    for key, comps in samples:
        where = f"{name}: sample {key}"
        if not schema.is_valid_key(key):
            problems.append(f"{where}: invalid key (must match [A-Za-z0-9_-]+, <= {schema.MAX_KEY_LEN} chars)")
        images = [e for e in comps if e in schema.IMAGE_EXTS]
        extra = set(comps) - set(schema.IMAGE_EXTS) - {schema.LABEL_EXT}
        if len(images) != 1 or schema.LABEL_EXT not in comps or extra:
            problems.append(f"{where}: components {sorted(comps)} (need one of {list(schema.IMAGE_EXTS)} + cls)")
            continue
        try:
            label = schema.decode_cls(comps[schema.LABEL_EXT])
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{where}: bad label ({e})")
            continue
        if not 0 <= label < num_classes:
            problems.append(f"{where}: label {label} outside [0, {num_classes})")
            continue
        counts[label] += 1
        if decode:
            try:
                with Image.open(io.BytesIO(comps[images[0]])) as img:
                    img.load()
                    fmt = img.format
                if (fmt == "JPEG") != (images[0] == "jpg"):
                    problems.append(f"{where}: .{images[0]} component holds a {fmt} image")
            except Exception as e:  # any decoder failure is a finding to report, not a crash
                problems.append(f"{where}: image does not decode ({type(e).__name__}: {e})")
    if len(samples) != entry["num_samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['num_samples']}")
    idx_path = os.path.join(root, schema.index_name(name))
    if not os.path.isfile(idx_path):
        problems.append(f"{schema.index_name(name)}: missing index file")
    else:
        with open(idx_path, "r", encoding="ascii", errors="replace") as f:
            if f.read() != schema.format_index(index_entries):
                problems.append(f"{schema.index_name(name)}: does not match the offsets in {name}")
    return problems, counts


def _verify_task(args):
    return verify_shard(*args)


def verify(root: str, workers: int = 1, decode: bool = True, progress: bool = True) -> List[str]:
    """All problems found in the dataset at `root` (empty list: the dataset is sound)."""
    from tqdm import tqdm

    try:
        manifest = schema.read_manifest(root)
    except (OSError, ValueError) as e:
        return [str(e)]
    nc = manifest["num_classes"]
    tasks = [(root, s, nc, decode) for s in manifest["shards"]]
    problems: List[str] = []
    totals = [0] * nc
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        it = pool.imap(_verify_task, tasks) if pool else map(_verify_task, tasks)
        for p, counts in tqdm(it, total=len(tasks), unit="shard", desc="verify", disable=not progress):
            problems.extend(p)
            totals = [a + b for a, b in zip(totals, counts)]
    finally:
        if pool:
            pool.terminate()
            pool.join()
    if "class_counts" in manifest and not problems and totals != manifest["class_counts"]:
        problems.append(f"{schema.MANIFEST_NAME}: class_counts {manifest['class_counts']} != counted {totals}")
    if "consistency_error" in manifest:  # drift-prep recorded that its own bookkeeping failed
        problems.append(f"{schema.MANIFEST_NAME}: {manifest['consistency_error']}")
    elif isinstance(manifest.get("files_seen"), int):
        files_rejected = sum(1 for r in manifest["rejected"] if r.get("kind") != "directory")
        if manifest["num_samples"] + files_rejected != manifest["files_seen"]:
            problems.append(f"{schema.MANIFEST_NAME}: {manifest['num_samples']} samples + {files_rejected} "
                            f"rejected files != files_seen {manifest['files_seen']}")
    return problems
