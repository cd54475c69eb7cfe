"""Triton kernels of drift (imports only torch and triton; reached from drift/backends.py).

HAS_TRITON says whether triton imports here. The kernels run on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 was set before this package was imported (the test tier `pytest -m interp`).
"""
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # a CPU-only install without triton: the backends fall back to cpp / reference
    HAS_TRITON = False
