"""Host driver of the "triton" backend: the Triton pass ops of drift.kernels (CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1 for tests). The only module of drift/ that imports drift.kernels.

The kernels form scale, scale_inputs and the RMS from the global fp64 sums on the device (the same fp64
quotients the host would form, rounded once), so a small call is not bound by host-side tensor ops. The
state carried between passes is pass 1's output buffer [*batch, G, S]: on the stored routes it holds the
rows' Gram matrices until pass 3 overwrites it with the force (docs/field_kernels.md).
"""
from __future__ import annotations

from drift import kernels
from drift.field.core import R_LIST_DEFAULT, DriftField
from drift.field.three_pass import FieldOps, three_pass

if kernels.HAS_TRITON:
    # Imported (and the drift::triton_field_* custom ops registered) with this module, never lazily: a first
    # call inside torch.compile must not trace the registration.
    from drift.kernels import field_ops as _kops


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


TRITON_OPS = TritonFieldOps()


def load():
    """The "triton" backend function; raises ValueError when triton is missing."""
    if not has_triton():
        raise ValueError("backend='triton' needs the triton package, which is not importable here")
    return drifting_field_triton


def drifting_field_triton(gen, pos, neg=None, neg_weight=None, temperatures=R_LIST_DEFAULT, normalization="xy",
                          process_group=None) -> DriftField:
    """The "triton" backend: drifting_field_reference's signature over the Triton pass ops."""
    if gen.device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError(f"backend='triton' needs CUDA tensors (gen is on {gen.device}); on CPU use "
                         "backend='cpp' or 'reference', or set TRITON_INTERPRET=1 before importing triton")
    for name, t in (("pos", pos), ("neg", neg), ("neg_weight", neg_weight)):
        if t is not None and t.device != gen.device:
            raise ValueError(f"{name} is on {t.device} but gen is on {gen.device}")
    return three_pass(TRITON_OPS, gen, pos, neg, neg_weight, temperatures, normalization, process_group)
