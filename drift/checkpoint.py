"""Step-numbered, atomic checkpoints with everything needed for an exact resume.

Layout under `<out_dir>/checkpoints/`:

    step_0001000/                   one finished checkpoint (a directory renamed into place atomically)
        meta.json                   config, step, loop state, world size, file list (human readable)
        model.pt                    generator state_dict (the uncompiled module) and every EMA copy
        optim.pt                    AdamW state (identical on every rank under DDP)
        rank00000.pt                per-rank state: queues, loader position, torch RNG states
    latest                          text file naming the newest finished checkpoint (written by os.replace)
    crash_step_0001234/             written when the loss turns non-finite; never used by --resume auto

A checkpoint is first written to `step_XXXXXXX.tmp/` and renamed only when every rank has finished its
files, so a kill at any moment leaves either the previous checkpoint or the new one, never a half one.
Everything loads with `torch.load(weights_only=True)`; configs live in JSON, never pickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

import torch

from drift.config import SHAPE_KEYS, TrainConfig, config_diff

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
    """Path of the newest finished checkpoint, or None."""
    root = ckpt_root(out_dir)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "meta.json")):
            return path
    steps = list_checkpoints(out_dir)
    return os.path.join(root, step_name(steps[-1])) if steps else None


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        _atomic_write_text(os.path.join(root, "latest"), step_name(step) + "\n")
        if keep > 0:
            for s in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(os.path.join(root, step_name(s)), ignore_errors=True)
    return final


def save(out_dir: str, step: int, *, rank: int, is_main: bool, model_state: dict, ema_state: dict,
         optim_state: dict, meta: dict, rank_state: dict, crash: bool = False, keep: int = 0) -> str:
    """Write one checkpoint from every rank of a run; every rank calls this with its own `rank_state`.

    The protocol: rank 0 creates `<step>.tmp/` -> barrier -> rank 0 writes model.pt (model + EMA),
    optim.pt and meta.json, every rank writes its rank file -> barrier -> rank 0 renames the directory into
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
    if is_main:
        _torch_save({"model": model_state, "ema": ema_state}, os.path.join(tmp, "model.pt"))
        _torch_save(optim_state, os.path.join(tmp, "optim.pt"))
        _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _torch_save(rank_state, os.path.join(tmp, rank_file(rank)))
    barrier()
    if is_main:
        _finalize(out_dir, step, crash, keep)
    barrier()
    return os.path.join(root, step_name(step, crash))


def _load_pt(path: str, map_location) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
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


def resolve_checkpoint(resume: str, out_dir: str) -> Optional[str]:
    """'auto' -> latest in out_dir (or None); otherwise the given checkpoint directory (must exist)."""
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = resume
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    return path


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
    """{"meta", "model", "ema", "optim", "rank"} of a checkpoint directory; CheckpointError if unusable."""
    meta = read_meta(ckpt_dir)
    model = _load_pt(os.path.join(ckpt_dir, "model.pt"), map_location)
    if not isinstance(model, dict) or "model" not in model or "ema" not in model:
        raise CheckpointError(f"{ckpt_dir}/model.pt does not hold 'model' and 'ema' states")
    optim = _load_pt(os.path.join(ckpt_dir, "optim.pt"), map_location)
    per_rank = _load_pt(os.path.join(ckpt_dir, rank_file(rank)), map_location)
    return {"meta": meta, "model": model["model"], "ema": model["ema"], "optim": optim, "rank": per_rank}


def load_for_sampling(ckpt_dir: str, map_location="cpu") -> Dict[str, Any]:
    """{"meta", "config", "model", "ema"} without optimizer or per-rank state (drift-sample)."""
    meta = read_meta(ckpt_dir)
    model = _load_pt(os.path.join(ckpt_dir, "model.pt"), map_location)
    if not isinstance(model, dict) or "model" not in model or "ema" not in model:
        raise CheckpointError(f"{ckpt_dir}/model.pt does not hold 'model' and 'ema' states")
    try:
        cfg = TrainConfig.from_dict(meta["config"], strict=False)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds an invalid config: {e}") from e
    return {"meta": meta, "config": cfg, "model": model["model"], "ema": model["ema"]}
