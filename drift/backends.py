"""Backend choice for the drifting field, made once per (backend, device type) and cached.

    "reference": plain torch (drift.field.drifting_field_reference), any device, fp64-capable
    "cpp":       fused CPU ops from drift._C (torch.ops.drift.field_*), driven by drift._field_ops
    "triton":    fused GPU kernels from kernels/ (CPU under TRITON_INTERPRET=1, for tests)
    "auto":      triton for CUDA tensors, cpp for CPU tensors, the reference where those are missing

Tests force a choice with `_override(name)`; it applies to "auto" only. This is the only module of
drift/ that imports kernels/.
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


def has_cpp() -> bool:
    """True when the C++ extension drift._C is built and importable."""
    from drift import _ext
    return _ext.HAS_C_EXT


def has_triton() -> bool:
    """True when triton imports (it still needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors)."""
    from kernels import HAS_TRITON
    return HAS_TRITON


def _drifting_field_triton(gen, pos, neg=None, neg_weight=None, temperatures=(0.02, 0.05, 0.2),
                           normalization="xy", process_group=None):
    """The "triton" backend: drifting_field_reference's signature over the Triton pass ops."""
    from drift._field_ops import three_pass
    from kernels import drifting_field as kdf

    if gen.device.type != "cuda" and not kdf.INTERPRETED:
        raise ValueError(f"backend='triton' needs CUDA tensors (gen is on {gen.device}); on CPU use "
                         "backend='cpp' or 'reference', or set TRITON_INTERPRET=1 before importing triton")
    for name, t in (("pos", pos), ("neg", neg), ("neg_weight", neg_weight)):
        if t is not None and t.device != gen.device:
            raise ValueError(f"{name} is on {t.device} but gen is on {gen.device}")
    return three_pass(kdf.field_ops(), gen, pos, neg, neg_weight, temperatures, normalization, process_group)


def _triton() -> Callable:
    if not has_triton():
        raise ValueError("backend='triton' needs the triton package, which is not importable here")
    from kernels import drifting_field  # noqa: F401  (registers the drift::triton_field_* ops)
    return _drifting_field_triton


def _load(name: str) -> Callable:
    if name == "reference":
        return _reference()
    if name == "cpp":
        from drift import _ext
        if not _ext.HAS_C_EXT:
            raise ValueError(f"backend='cpp' is not available: drift._C is not built ({_ext._IMPORT_ERROR}); "
                             "run `make build`")
        from drift._field_ops import drifting_field_cpp
        return drifting_field_cpp
    if name == "triton":
        return _triton()
    raise ValueError(f"backend {name!r} is not available in this build")


def resolve(backend: str, device_type: str) -> str:
    """Name of the implementation that `backend` means for tensors on `device_type`."""
    if backend != "auto":
        return backend
    if _override_impl is not None:
        return _override_impl
    if device_type == "cuda":
        return "triton" if has_triton() else "reference"
    if device_type == "cpu":
        return "cpp" if has_cpp() else "reference"
    return "reference"


def field_impl(backend: str, like: torch.Tensor) -> Callable:
    """The field implementation for `backend` and tensors like `like` (cached)."""
    key = (backend, like.device.type)
    fn = _resolved.get(key)
    if fn is None:
        fn = _load(resolve(backend, like.device.type))
        _resolved[key] = fn
    return fn
