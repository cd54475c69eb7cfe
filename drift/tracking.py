"""Experiment tracking: wandb (online | offline | disabled, lazily imported) and a no-op stand-in.

Credentials are never read or written here: wandb itself finds them in the environment (WANDB_API_KEY)
or ~/.netrc when mode is "online". Ranks other than 0 always get `DummyWandb`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional


class DummyWandb:
    """Same call surface as a wandb run; does nothing (disabled mode, non-zero ranks)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def init_tracking(mode: str, *, project: str, name: Optional[str], config: Dict[str, Any], dir: str,
                  is_main: bool = True):
    """A wandb run for rank 0 with mode "online"/"offline", else DummyWandb."""
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"wandb mode must be 'online', 'offline' or 'disabled', got {mode!r}")
    if mode == "disabled" or not is_main:
        return DummyWandb()
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"wandb={mode!r} needs the wandb package (pip install wandb)") from e
    return wandb.init(project=project, name=name, config=config, dir=dir, mode=mode)
