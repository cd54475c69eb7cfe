"""Step-numbered, atomic checkpoints with everything needed for an exact resume.

Layout under `<out_dir>/checkpoints/`:

    step_0001000/                   one finished checkpoint (a directory renamed into place atomically)
        meta.json                   config, step, loop state, world size, file list (human readable)
        model.pt                    generator state_dict (the uncompiled module) and every EMA copy
        optim.pt                    AdamW state (identical on every rank under DDP)
        rank00000.pt                per-rank state: queues, loader position, torch RNG states
    latest                          text file naming the newest finished checkpoint (for people and tools)
    crash_step_0001234/             written when the loss turns non-finite; never used by --resume auto

A checkpoint is first written to `step_XXXXXXX.tmp/` and renamed only when every rank has finished its
files, so a kill at any moment leaves either the previous checkpoint or the new one, never a half one.
Everything loads with `torch.load(weights_only=True)`; configs live in JSON, never pickled.

Integrity: `meta.json` lists every other file of the checkpoint with its size and sha256, hashed while the
bytes are written (not re-read), and written last. Loading verifies each file it reads, so a truncated file or
a same-shape `model.pt` copied in from another step is an error naming the file, not a silent divergence.
`--resume auto` walks the finished step directories from the newest (the `latest` pointer does not decide) and
takes the first whose files all verify, printing each one it skips and why. Checkpoints written before hashes
were recorded still load, with a line saying they are unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import torch

from drift.config import SHAPE_KEYS, TrainConfig, config_diff
from drift.schema import write_atomic, write_json_atomic

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or from another configuration."""


def ckpt_root(out_dir: str) -> str:
    return os.path.join(out_dir, CKPT_DIR)


def step_name(step: int, crash: bool = False) -> str:
    return f"{'crash_' if crash else ''}step_{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def list_checkpoints(out_dir: str) -> List[int]:
    """Steps of the finished (renamed) checkpoints, ascending."""
    root = ckpt_root(out_dir)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "meta.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """Path of the newest finished checkpoint directory, or None. Decided by the directories, not by the
    `latest` pointer: a pointer left stale by a kill between the rename and its update never hides a newer one."""
    steps = list_checkpoints(out_dir)
    return os.path.join(ckpt_root(out_dir), step_name(steps[-1])) if steps else None


class _HashingWriter:
    """Write-through file wrapper that counts and hashes the bytes torch.save writes (it writes sequentially)."""

    def __init__(self, f):
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.h.update(b)
        self.size += len(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, path: str) -> Dict[str, Any]:
    """Save `obj` to `path` atomically; returns {"size", "sha256"} of the bytes written."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": w.size, "sha256": w.h.hexdigest()}


def _gather_to_main(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (on every rank); [obj] without a process group."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _staging_dir(path: str) -> None:
    """Create `path` empty (a leftover of a killed save is removed first)."""
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


def _finalize(out_dir: str, step: int, crash: bool, keep: int) -> str:
    """Rename the staging directory into place, update `latest`, prune old checkpoints (rank 0 only)."""
    root = ckpt_root(out_dir)
    tmp = os.path.join(root, step_name(step, crash) + ".tmp")
    final = os.path.join(root, step_name(step, crash))
    if os.path.exists(final):
        # Re-saving the same step (e.g. a resumed run ending where it started): replace it atomically.
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if not crash:
        write_atomic(os.path.join(root, "latest"), step_name(step) + "\n")
        if keep > 0:
            for s in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(os.path.join(root, step_name(s)), ignore_errors=True)
    return final


def save(out_dir: str, step: int, *, rank: int, is_main: bool, model_state: dict, ema_state: dict,
         optim_state: dict, meta: dict, rank_state: dict, crash: bool = False, keep: int = 0) -> str:
    """Write one checkpoint from every rank of a run; every rank calls this with its own `rank_state`.

    The protocol: rank 0 creates `<step>.tmp/` -> barrier -> rank 0 writes model.pt (model + EMA) and
    optim.pt, every rank writes its rank file, each hashing what it writes -> the (name, size, sha256) records
    are gathered -> rank 0 writes meta.json with the file list -> barrier -> rank 0 renames the directory into
    place, updates `latest` and prunes to the newest `keep` (0 = keep all) -> barrier. A kill at any point
    leaves the previous checkpoints intact. The shared states are only read on rank 0 (DDP keeps them
    identical). Crash checkpoints (`crash=True`) never move `latest` and are never pruned.
    Returns the final checkpoint directory.
    """
    from drift.dist import barrier

    root = ckpt_root(out_dir)
    tmp = os.path.join(root, step_name(step, crash) + ".tmp")
    if is_main:
        _staging_dir(tmp)
    barrier()
    files: Dict[str, Dict[str, Any]] = {}
    if is_main:
        files["model.pt"] = _torch_save({"model": model_state, "ema": ema_state}, os.path.join(tmp, "model.pt"))
        files["optim.pt"] = _torch_save(optim_state, os.path.join(tmp, "optim.pt"))
    files[rank_file(rank)] = _torch_save(rank_state, os.path.join(tmp, rank_file(rank)))
    gathered = _gather_to_main(files)  # also the barrier after every rank's files
    if is_main:
        meta = dict(meta, files={k: v for part in gathered for k, v in sorted(part.items())})
        write_json_atomic(os.path.join(tmp, "meta.json"), meta, indent=2)
    barrier()
    if is_main:
        _finalize(out_dir, step, crash, keep)
    barrier()
    return os.path.join(root, step_name(step, crash))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_list(ckpt_dir: str, meta: dict) -> dict:
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint metadata {ckpt_dir}/meta.json: 'files' must map file names to sizes "
                              f"and sha256s")
    return files


def _verify_file(ckpt_dir: str, name: str, meta: dict) -> None:
    """CheckpointError when `name` does not match the size and sha256 that meta.json records for it."""
    path = os.path.join(ckpt_dir, name)
    rec = _file_list(ckpt_dir, meta).get(name)
    if rec is None:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {name} is not in the file list of meta.json")
    if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str)):
        raise CheckpointError(f"checkpoint metadata {ckpt_dir}/meta.json: malformed entry for {name}: {rec!r}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    size = os.path.getsize(path)
    if size != rec["size"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {size} bytes where meta.json "
                              f"records {rec['size']} (truncated or replaced)")
    digest = _sha256_file(path)
    if digest != rec["sha256"]:
        raise CheckpointError(f"checkpoint file {path}: sha256 {digest[:12]}... differs from meta.json's "
                              f"{rec['sha256'][:12]}... (the file was changed or swapped after it was written)")


def verify_checkpoint(ckpt_dir: str) -> dict:
    """Check every file meta.json lists against its recorded size and sha256; return the meta.
    CheckpointError on the first mismatch; a checkpoint without a file list passes as is."""
    meta = read_meta(ckpt_dir)
    if "files" in meta:
        for name in sorted(_file_list(ckpt_dir, meta)):
            _verify_file(ckpt_dir, name, meta)
    return meta


def _note_unverified(ckpt_dir: str, meta: dict) -> None:
    if "files" not in meta:
        from drift.dist import print0
        print0(f"checkpoint {ckpt_dir} has no file hashes (written before drift recorded them); loading it "
               f"unverified")


def _load_pt(path: str, map_location, meta: Optional[dict] = None) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    if meta is not None and "files" in meta:
        _verify_file(os.path.dirname(path), os.path.basename(path), meta)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {e}") from e


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "meta.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint (no meta.json)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata {path} is corrupt: {e}") from e
    for k in ("step", "config", "world_size"):
        if k not in meta:
            raise CheckpointError(f"checkpoint metadata {path} lacks '{k}'")
    return meta


def newest_verified(out_dir: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The newest finished checkpoint whose files all verify (None when there is none at all); each newer one
    that fails is reported through `log` with the reason. CheckpointError when every checkpoint fails."""
    skipped = []
    for step in reversed(list_checkpoints(out_dir)):
        path = os.path.join(ckpt_root(out_dir), step_name(step))
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log(f"--resume auto: skipping {step_name(step)}: {e}")
            skipped.append(f"{step_name(step)}: {e}")
    if skipped:
        raise CheckpointError(f"--resume auto: no checkpoint in {ckpt_root(out_dir)} verifies: " + "; ".join(skipped))
    return None


def resolve_checkpoint(resume: str, out_dir: str) -> Optional[str]:
    """'auto' -> the newest checkpoint in out_dir that verifies (or None when there is none); otherwise the given
    checkpoint directory (must exist; its files are verified when loaded). Under DDP rank 0 decides and every
    rank gets its answer, so all ranks resume from the same step."""
    if resume != "auto":
        if not os.path.isdir(resume):
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        return resume
    import torch.distributed as dist

    from drift.dist import print0
    if not (dist.is_available() and dist.is_initialized()):
        return newest_verified(out_dir, log=print0)
    box: List[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = newest_verified(out_dir, log=print0)
        except CheckpointError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1])
    return box[0]


def check_compatible(meta: dict, cfg: TrainConfig, world_size: int, ckpt_dir: str) -> TrainConfig:
    """The checkpoint's config, after checking its shape-defining keys against `cfg`."""
    try:
        saved = TrainConfig.from_dict(meta["config"], strict=False)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds an invalid config: {e}") from e
    diffs = config_diff(saved, cfg, SHAPE_KEYS)
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt_dir} was written by another configuration "
                              f"(checkpoint vs current): {'; '.join(diffs)}")
    if int(meta["world_size"]) != world_size:
        raise CheckpointError(f"checkpoint {ckpt_dir} was written by {meta['world_size']} ranks, this run has "
                              f"{world_size}; per-rank queue and loader states cannot be remapped")
    return saved


def load_checkpoint(ckpt_dir: str, rank: int, map_location="cpu") -> Dict[str, Any]:
    """{"meta", "model", "ema", "optim", "rank"} of a checkpoint directory, each file verified against meta.json;
    CheckpointError if unusable."""
    meta = read_meta(ckpt_dir)
    _note_unverified(ckpt_dir, meta)
    model = _load_pt(os.path.join(ckpt_dir, "model.pt"), map_location, meta)
    if not isinstance(model, dict) or "model" not in model or "ema" not in model:
        raise CheckpointError(f"{ckpt_dir}/model.pt does not hold 'model' and 'ema' states")
    optim = _load_pt(os.path.join(ckpt_dir, "optim.pt"), map_location, meta)
    per_rank = _load_pt(os.path.join(ckpt_dir, rank_file(rank)), map_location, meta)
    return {"meta": meta, "model": model["model"], "ema": model["ema"], "optim": optim, "rank": per_rank}


def load_for_sampling(ckpt_dir: str, map_location="cpu") -> Dict[str, Any]:
    """{"meta", "config", "model", "ema"} without optimizer or per-rank state (drift-sample); model.pt verified."""
    meta = read_meta(ckpt_dir)
    _note_unverified(ckpt_dir, meta)
    model = _load_pt(os.path.join(ckpt_dir, "model.pt"), map_location, meta)
    if not isinstance(model, dict) or "model" not in model or "ema" not in model:
        raise CheckpointError(f"{ckpt_dir}/model.pt does not hold 'model' and 'ema' states")
    try:
        cfg = TrainConfig.from_dict(meta["config"], strict=False)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds an invalid config: {e}") from e
    return {"meta": meta, "config": cfg, "model": model["model"], "ema": model["ema"]}
