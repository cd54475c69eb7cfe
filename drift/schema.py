"""Shard schema shared by `data_prep` (the writer) and `drift.data` (the readers); stdlib only.

A prepared dataset is a directory holding

    shard-000000.tar, shard-000000.idx, shard-000001.tar, ...   uncompressed tar shards + DALI wds index files
    manifest.json                                                 counts, class map, per-shard sha256, rejects

Each sample is two tar members with the same dot-free key: `<key>.jpg` or `<key>.png` (the image) and
`<key>.cls` (the label as ASCII decimal, zero-padded to `cls_width` digits so that every label of a dataset
has the same byte length; `int()` still parses it, and the DALI reader can hand a fixed-size byte array to
torch). Keys contain only `[A-Za-z0-9_-]`: webdataset and DALI split a member name at its FIRST dot.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
INDEX_SUFFIX = ".idx"
IMAGE_EXTS = ("jpg", "png")
LABEL_EXT = "cls"
# DALI's webdataset index format (what its `wds2idx` tool writes): a header line "v1.2 <num_samples>", then
# one line per sample listing "<ext> <data offset> <size> <member name>" for every component.
INDEX_VERSION = "v1.2"

_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_LEN = 80  # keeps every member name inside a plain 100-byte ustar name field (no GNU long-name blocks)


def shard_name(index: int) -> str:
    return SHARD_PATTERN % index


def index_name(shard: str) -> str:
    """`shard-000003.tar` -> `shard-000003.idx`."""
    if not shard.endswith(".tar"):
        raise ValueError(f"shard name must end with .tar: {shard!r}")
    return shard[: -len(".tar")] + INDEX_SUFFIX


def make_key(serial: int, stem: str) -> str:
    """Dot-free, unique sample key: a serial number (unique within the dataset) plus a readable hint of the
    source name with every run of characters outside [A-Za-z0-9_-] (dots, spaces, unicode) replaced by "_"."""
    hint = _KEY_BAD_CHARS.sub("_", stem).strip("_")
    key = f"{serial:09d}" + (f"_{hint}" if hint else "")
    return key[:MAX_KEY_LEN]


def is_valid_key(key: str) -> bool:
    return bool(_KEY_OK.match(key)) and len(key) <= MAX_KEY_LEN


def split_member(name: str):
    """Tar member name -> (key, ext), splitting at the first dot exactly like webdataset and DALI do."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot <= 0:
        return None, None
    return name[: len(name) - len(base) + dot], base[dot + 1:]


def cls_width(num_classes: int) -> int:
    return max(1, len(str(max(num_classes - 1, 0))))


def encode_cls(label: int, width: int) -> bytes:
    return f"{label:0{width}d}".encode("ascii")


def decode_cls(data: bytes) -> int:
    text = data.decode("ascii").strip()
    if not text.isdigit():
        raise ValueError(f"label component is not an ASCII integer: {data[:16]!r}")
    return int(text)


def format_index(entries: List[List[tuple]]) -> str:
    """entries: one list per sample of (ext, data_offset, size, member_name) -> index file text."""
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    for comps in entries:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in comps))
    return "\n".join(lines) + "\n"


def parse_index(text: str, path: str = "<index>") -> List[Dict[str, tuple]]:
    """Index file text -> per sample {ext: (data_offset, size, member_name)}. Raises ValueError naming `path`."""
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"{path}: bad index header {lines[0]!r} (expected '{INDEX_VERSION} <count>')")
    n = int(head[1])
    if len(lines) - 1 != n:
        raise ValueError(f"{path}: header says {n} samples but {len(lines) - 1} lines follow")
    out = []
    for i, line in enumerate(lines[1:], start=1):
        parts = line.split(" ")
        if len(parts) % 4 != 0 or not parts:
            raise ValueError(f"{path}: line {i + 1} is malformed")
        comps = {}
        for j in range(0, len(parts), 4):
            ext, off, size, name = parts[j: j + 4]
            comps[ext] = (int(off), int(size), name)
        out.append(comps)
    return out


_REQUIRED = {
    "num_samples": int,
    "num_classes": int,
    "classes": list,
    "shards": list,
    "rejected": list,
}


def validate_manifest(m: Any, path: str = MANIFEST_NAME) -> Dict[str, Any]:
    """Check the fields readers rely on; raise ValueError naming `path` and the field."""
    if not isinstance(m, dict):
        raise ValueError(f"{path}: manifest must be a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in m:
            raise ValueError(f"{path}: missing field {key!r}")
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise ValueError(f"{path}: field {key!r} must be {typ.__name__}")
    if m.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {m.get('format_version')} is not {FORMAT_VERSION}")
    if len(m["classes"]) != m["num_classes"]:
        raise ValueError(f"{path}: len(classes)={len(m['classes'])} != num_classes={m['num_classes']}")
    total = 0
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not {"name", "num_samples", "sha256"} <= set(s):
            raise ValueError(f"{path}: shards[{i}] needs name, num_samples, sha256")
        if os.path.basename(s["name"]) != s["name"] or not s["name"].endswith(".tar"):
            raise ValueError(f"{path}: shards[{i}].name {s['name']!r} must be a plain *.tar file name")
        total += s["num_samples"]
    if total != m["num_samples"]:
        raise ValueError(f"{path}: shard sample counts sum to {total}, num_samples is {m['num_samples']}")
    for i, r in enumerate(m["rejected"]):
        if not isinstance(r, dict) or not {"path", "reason"} <= set(r):
            raise ValueError(f"{path}: rejected[{i}] needs path and reason")
    if m.get("channels", 3) not in (1, 3):
        raise ValueError(f"{path}: channels must be 1 or 3, got {m.get('channels')!r}")
    return m


def read_manifest(root: str) -> Dict[str, Any]:
    """Load and validate `<root>/manifest.json`; a clear error when it is missing or malformed."""
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root!r} (run `drift-prep imagefolder|idx ... {root}` first)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate_manifest(m, path)


def write_atomic(path: str, data) -> None:
    """Write `data` (str as UTF-8, or bytes) to a temporary name beside `path`, flush it to disk, then rename:
    a reader, or the next run after a kill, sees the old file or the new one, never half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> None:
    """`obj` as sorted JSON (non-ASCII kept) with a final newline, written by `write_atomic`."""
    write_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=True) + "\n")
