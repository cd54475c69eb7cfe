"""Experiment tracking: wandb (online | offline | disabled, lazily imported), a no-op stand-in, and log.jsonl
upkeep across resumes.

Credentials are never read or written here: wandb itself finds them in the environment (WANDB_API_KEY)
or ~/.netrc when mode is "online". Ranks other than 0 always get `DummyWandb`.

A run keeps one wandb run id for its whole life: the trainer draws it once (`new_run_id`), stores it in every
checkpoint's loop state, and a resumed run passes it back with `resume="allow"`, so wandb continues the same run
instead of starting a new one. (wandb keeps its own history: values the interrupted run logged after its last
checkpoint stay there, and wandb ignores re-logged steps it has already seen.)

`cut_log` makes log.jsonl hold each logged step once: on resume it cuts the file back to what it held when the
checkpoint was written, atomically (the kept part goes to a temporary file that is renamed over the log).
"""
from __future__ import annotations

import json
import os
import secrets
import string
from typing import Any, Dict, Optional

from drift.schema import write_atomic


class DummyWandb:
    """Same call surface as a wandb run; does nothing (disabled mode, non-zero ranks)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def new_run_id() -> str:
    """A fresh 8-character wandb run id, drawn from the OS (so no seeded random stream of the run moves)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def init_tracking(mode: str, *, project: str, name: Optional[str], config: Dict[str, Any], dir: str,
                  is_main: bool = True, run_id: Optional[str] = None):
    """A wandb run for rank 0 with mode "online"/"offline", else DummyWandb. With `run_id`, that run is
    continued when it exists (a resumed training run) and created under that id otherwise."""
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"wandb mode must be 'online', 'offline' or 'disabled', got {mode!r}")
    if mode == "disabled" or not is_main:
        return DummyWandb()
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"wandb={mode!r} needs the wandb package (pip install wandb)") from e
    extra = {"id": run_id, "resume": "allow"} if run_id else {}
    return wandb.init(project=project, name=name, config=config, dir=dir, mode=mode, **extra)


def log_size(path: str) -> int:
    """Bytes in the log at `path` (0 when there is none yet)."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _step_of(line: bytes) -> Optional[int]:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) else None


def _complete_before(line: bytes, step: int) -> bool:
    """A whole line (a kill mid-write leaves a partial last one) holding a record of a step before `step`."""
    s = _step_of(line)
    return line.endswith(b"\n") and s is not None and s < step


def cut_log(path: str, step: int, keep_bytes: Optional[int] = None) -> int:
    """Cut the JSON-lines log at `path` back to the state of the checkpoint of `step`; returns the lines dropped.

    `keep_bytes` is the log's size recorded in that checkpoint: the log is cut to exactly that prefix when it
    still ends a line there. Without it (checkpoints that did not record it, or a log edited since) the lines
    kept are the complete records of steps before `step`. The rewrite is atomic: a kill leaves the old log or
    the cut one.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    if keep_bytes is not None and 0 <= keep_bytes <= len(data) and (keep_bytes == 0 or
                                                                     data[keep_bytes - 1:keep_bytes] == b"\n"):
        kept = data[:keep_bytes]
    else:
        kept = b"".join(line for line in data.splitlines(keepends=True) if _complete_before(line, step))
    if kept == data:
        return 0
    write_atomic(path, kept)
    return len(data.splitlines()) - len(kept.splitlines())
