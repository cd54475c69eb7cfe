"""The one place that imports the C++ extension drift._C (its ops are then reachable as torch.ops.drift.*).

The ops are the three passes of the fused CPU drifting field (csrc/drifting_field.cpp), driven by
drift/field/cpp_driver.py.
"""
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
