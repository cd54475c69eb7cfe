"""Host driver of the "triton" backend: the Triton pass ops of drift.kernels (CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1 for tests). The only module of drift/ that imports drift.kernels.

The kernels form scale, scale_inputs and the RMS from the global fp64 sums on the device (the same fp64
quotients the host would form, rounded once), so a small call is not bound by host-side tensor ops. The
state carried between passes is pass 1's output buffer [*batch, G, S]: on the stored routes it holds the
rows' Gram matrices until pass 3 overwrites it with the force (docs/field_kernels.md).

Multi-key calls (`drifting_field_triton_multi`) run each pass for groups of keys in one launch
(drift.kernels.field_multi). Importing this module also gives the kernels' tuner its on-disk store of tuning
results (drift/field/tune_cache.py).
"""
from __future__ import annotations

import torch

from drift import kernels
from drift.field import tune_cache
from drift.field.core import R_LIST_DEFAULT, DriftField
from drift.field.three_pass import FieldOps, three_pass, three_pass_multi

if kernels.HAS_TRITON:
    # Imported (and the drift::triton_field_* custom ops registered) with this module, never lazily: a first
    # call inside torch.compile must not trace the registration.
    from drift.kernels import aot as _kaot
    from drift.kernels import field_multi as _kmulti
    from drift.kernels import field_ops as _kops
    from drift.kernels import field_tuning as _ktuning

    _ktuning.set_store(tune_cache.default_store(kernels.TRITON_VERSION, tune_cache.code_version(kernels)))
    aot = _kaot  # ahead-of-launch compiles (drift/precompile.py; drift.kernels is imported here only)
else:
    aot = None


def has_triton() -> bool:
    """True when triton imports (it still needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors)."""
    return kernels.HAS_TRITON


class TritonFieldOps(FieldOps):
    """The Triton passes (drift.kernels.field_ops: the registered custom ops while torch.compile traces, the
    plain launchers otherwise); the state carried between them is pass 1's output buffer."""

    name = "triton"

    def scale_sums(self, gen, pos, neg, neg_weight):
        return _kops.scale_sums(gen, pos, neg, neg_weight)

    def sumsq(self, gen, pos, neg, neg_weight, state, sums, temperatures, normalization):
        return _kops.sumsq(gen, pos, neg, neg_weight, state, sums, temperatures, normalization)

    def force(self, gen, pos, neg, neg_weight, state, sums, stats, temperatures, normalization):
        loss, scalars = _kops.force(gen, pos, neg, neg_weight, state, sums, stats, temperatures, normalization)
        return DriftField(force=state, scale=scalars[0], scale_inputs=scalars[1], loss=loss, force_rms=scalars[2:])

    # Grouped launches (drift.kernels.field_multi) in eager mode; under torch.compile the per-key custom ops
    # (the base class's loops), which trace.

    def scale_sums_multi(self, items):
        if torch.compiler.is_compiling():
            return super().scale_sums_multi(items)
        return _kmulti.scale_sums(items)

    def sumsq_multi(self, items, state, sums, temperatures, normalization):
        if isinstance(state, list):
            return super().sumsq_multi(items, state, sums, temperatures, normalization)
        return _kmulti.sumsq(state, sums, temperatures, normalization)

    def force_multi(self, items, state, sums, stats, temperatures, normalization):
        if isinstance(state, list):
            return super().force_multi(items, state, sums, stats, temperatures, normalization)
        return [DriftField(force=f, scale=sc[0], scale_inputs=sc[1], loss=loss, force_rms=sc[2:])
                for f, loss, sc in _kmulti.force(state, sums, stats, temperatures, normalization)]


TRITON_OPS = TritonFieldOps()


def load(multi: bool = False):
    """The "triton" backend function (multi: its multi-key form); raises ValueError when triton is missing."""
    if not has_triton():
        raise ValueError("backend='triton' needs the triton package, which is not importable here")
    return drifting_field_triton_multi if multi else drifting_field_triton


def _check_devices(gen, pos, neg, neg_weight, where: str = "") -> None:
    if gen.device.type != "cuda" and not kernels.INTERPRETED and _kaot.active() is None:
        raise ValueError(f"backend='triton' needs CUDA tensors ({where}gen is on {gen.device}); on CPU use "
                         "backend='cpp' or 'reference', or set TRITON_INTERPRET=1 before importing triton")
    for name, t in (("pos", pos), ("neg", neg), ("neg_weight", neg_weight)):
        if t is not None and t.device != gen.device:
            raise ValueError(f"{where}{name} is on {t.device} but {where}gen is on {gen.device}")


def drifting_field_triton(gen, pos, neg=None, neg_weight=None, temperatures=R_LIST_DEFAULT, normalization="xy",
                          process_group=None) -> DriftField:
    """The "triton" backend: drifting_field_reference's signature over the Triton pass ops."""
    _check_devices(gen, pos, neg, neg_weight)
    return three_pass(TRITON_OPS, gen, pos, neg, neg_weight, temperatures, normalization, process_group)


def drifting_field_triton_multi(items, temperatures=R_LIST_DEFAULT, normalization="xy", process_group=None):
    """The "triton" backend for many items (gen, pos, neg, neg_weight), validated, all on one device: the
    fields in item order, with one all-reduce per global sum for all of them."""
    for i, it in enumerate(items):
        _check_devices(*it, where=f"items[{i}].")
        if it[0].device != items[0][0].device:
            raise ValueError(f"items[{i}].gen is on {it[0].device} but items[0].gen is on {items[0][0].device}")
    return three_pass_multi(TRITON_OPS, items, temperatures, normalization, process_group)
