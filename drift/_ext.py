"""The one place that imports the C++ extension drift._C (ops are then reachable as torch.ops.drift.*)."""
from __future__ import annotations

try:
    from drift import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)
    HAS_C_EXT = True
    _IMPORT_ERROR = None
except ImportError as e:  # not built: `make build` or `pip install --no-build-isolation -e .`
    _C = None
    HAS_C_EXT = False
    _IMPORT_ERROR = e


def require() -> None:
    """Raise a clear error when the extension is missing."""
    if not HAS_C_EXT:
        raise RuntimeError(f"drift._C is not built ({_IMPORT_ERROR}); run `make build`")


def weighted_dist_rowsum(gen, targets, tw):
    """Per-row sum of target-weighted expanded-form distances (pass 1 of the fused field), CPU op."""
    require()
    import torch
    return torch.ops.drift.weighted_dist_rowsum(gen, targets, tw)
