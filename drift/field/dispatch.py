"""Backend choice for the drifting field, and the public entry point `drifting_field` that validates and dispatches.

    "reference": plain torch (drift/field/reference.py), any device, fp64-capable
    "cpp":       fused CPU ops from drift._C, driven by drift/field/cpp_driver.py
    "triton":    fused GPU kernels from drift.kernels, driven by drift/field/triton_driver.py
                 (CPU tensors under TRITON_INTERPRET=1, for tests)
    "auto":      triton for CUDA tensors, cpp for CPU tensors, the reference where those are missing

The choice is made once per (backend, device type, single or multi-key) and cached; that cache holds at most
2 x len(BACKENDS) x (device types) entries. Tests force a choice with `_override(name)`; it applies to "auto"
only. The fused drivers are imported on first use (the Triton one imports triton). `multi_impl` gives a
backend's multi-key function (drift/field/multi.py): the reference loops over the keys, the fused backends
run drift/field/three_pass.py's `three_pass_multi` (one all-reduce per global sum for all keys).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from drift import _ext
from drift.field.core import R_LIST_DEFAULT, DriftField, validate_inputs
from drift.field.reference import drifting_field_reference, drifting_field_reference_multi

_override_impl: Optional[str] = None
_resolved: dict = {}


def _override(name: Optional[str]) -> None:
    """Test hook: make backend="auto" resolve to `name` (None restores the default)."""
    global _override_impl
    _override_impl = name
    _resolved.clear()


def has_cpp() -> bool:
    """True when the C++ extension drift._C is built and importable."""
    return _ext.HAS_C_EXT


def has_triton() -> bool:
    """True when triton imports (it still needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors)."""
    from drift.field import triton_driver
    return triton_driver.has_triton()


def _load(name: str) -> Callable:
    if name == "reference":
        return drifting_field_reference
    if name == "cpp":
        if not _ext.HAS_C_EXT:
            raise ValueError(f"backend='cpp' is not available: drift._C is not built ({_ext._IMPORT_ERROR}); "
                             "run `make build`")
        from drift.field.cpp_driver import drifting_field_cpp
        return drifting_field_cpp
    if name == "triton":
        from drift.field import triton_driver
        return triton_driver.load()
    raise ValueError(f"backend {name!r} is not available in this build")


def _load_multi(name: str) -> Callable:
    if name == "reference":
        return drifting_field_reference_multi
    if name == "cpp":
        _load("cpp")  # (the error when drift._C is missing)
        return _drifting_field_cpp_multi
    if name == "triton":
        from drift.field import triton_driver
        return triton_driver.load(multi=True)
    raise ValueError(f"backend {name!r} is not available in this build")


def _drifting_field_cpp_multi(items, temperatures=R_LIST_DEFAULT, normalization="xy", process_group=None):
    """The "cpp" backend for many items: its pass ops (drift/field/cpp_driver.py) for every item, with one
    all-reduce per global sum for all of them."""
    from drift.field.cpp_driver import CPP_OPS
    from drift.field.three_pass import three_pass_multi
    for i, it in enumerate(items):
        for name, t in zip(("gen", "pos", "neg", "neg_weight"), it):
            if t is not None and t.device.type != "cpu":
                raise ValueError(f"backend='cpp' runs on CPU tensors only, but items[{i}].{name} is on {t.device}; "
                                 "use backend='triton' (CUDA) or 'reference'")
    return three_pass_multi(CPP_OPS, items, temperatures, normalization, process_group)


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


def multi_impl(backend: str, like: torch.Tensor) -> Callable:
    """The multi-key field implementation for `backend` and tensors like `like` (cached):
    fn(items, temperatures, normalization, process_group) -> [DriftField]."""
    key = (backend, like.device.type, "multi")
    fn = _resolved.get(key)
    if fn is None:
        fn = _load_multi(resolve(backend, like.device.type))
        _resolved[key] = fn
    return fn


def drifting_field(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor] = None,
                   neg_weight: Optional[torch.Tensor] = None, *,
                   temperatures: Sequence[float] = R_LIST_DEFAULT, normalization: str = "xy",
                   backend: str = "auto", process_group=None, check_finite: bool = True) -> DriftField:
    """Compute the drifting field for B independent problems (the steps in drift/field/core.py).

    Args:
      gen: [*batch, G, S] generated samples (these are also negatives for each other, self-masked).
      pos: [*batch, P, S] positives (data of the row's class).
      neg: optional [*batch, U, S] unconditional real negatives (U may be 0).
      neg_weight: optional [*batch, U] non-negative weights of `neg` (default 1); CFG uses
        w = (alpha - 1)(N_neg - 1)/N_unc.
      temperatures: the official R_list.
      normalization: "xy" (official two-axis softmax), "y" (row softmax over targets only) or "none"
        (raw kernel exp(-d/R)); weights are applied after the normalization in all three.
      backend: "auto" | "reference" | "cpp" | "triton" (see the module docstring).
      process_group: if given, the scale sums and per-temperature sums of squares are all-reduced over
        it, so ranks holding parts of the rows get the single-process result.
      check_finite: scan inputs for NaN/Inf and weights for negatives (a host sync; trainers turn it off).

    Inputs may be fp32/bf16/fp16 (computed in fp32) or fp64 (computed in fp64), and non-contiguous: the
    batch may be any number of leading dims, so per-location vectors of an [N_c, G, C, H, W] feature map
    can be passed as the strided view [N_c, H*W, G, C] without a copy. Nothing here is differentiated: use
    drifting_loss (drift/field/loss.py) for the training loss.
    """
    neg, neg_weight, temps = validate_inputs(gen, pos, neg, neg_weight, temperatures=temperatures,
                                             normalization=normalization, backend=backend,
                                             check_finite=check_finite)
    impl = field_impl(backend, gen)
    return impl(gen, pos, neg, neg_weight, temps, normalization, process_group)
