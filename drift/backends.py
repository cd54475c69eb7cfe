"""Backend choice for the drifting field, made once per (backend, device type) and cached.

    "reference": plain torch (drift.field.drifting_field_reference), any device, fp64-capable
    "cpp":       fused CPU op from drift._C (torch.ops.drift.*)
    "triton":    fused GPU kernels from kernels/ (CPU under TRITON_INTERPRET=1, for tests)
    "auto":      triton for CUDA tensors, cpp for CPU tensors, the reference where those are missing

Tests force a choice with `_override(name)`; it applies to "auto" only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

_override_impl: Optional[str] = None
_resolved: dict = {}


def _override(name: Optional[str]) -> None:
    """Test hook: make backend="auto" resolve to `name` (None restores the default)."""
    global _override_impl
    _override_impl = name
    _resolved.clear()


def _reference() -> Callable:
    from drift.field import drifting_field_reference
    return drifting_field_reference


def _load(name: str) -> Callable:
    if name == "reference":
        return _reference()
    raise ValueError(f"backend {name!r} is not available in this build")


def resolve(backend: str, device_type: str) -> str:
    """Name of the implementation that `backend` means for tensors on `device_type`."""
    if backend != "auto":
        return backend
    if _override_impl is not None:
        return _override_impl
    return "reference"


def field_impl(backend: str, like: torch.Tensor) -> Callable:
    """The field implementation for `backend` and tensors like `like` (cached)."""
    key = (backend, like.device.type)
    fn = _resolved.get(key)
    if fn is None:
        fn = _load(resolve(backend, like.device.type))
        _resolved[key] = fn
    return fn
