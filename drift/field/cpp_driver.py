"""Host driver of the "cpp" backend: the C++ pass ops of drift._C (torch.ops.drift.field_*, CPU tensors).

The ops (csrc/drifting_field.cpp) are the three passes of drift/field/three_pass.py with scale and RMS
passed in as tensors:

    field_scale_sums(gen, pos, neg, neg_weight) -> ([2] fp64, dot [B, G, M])                      (step 3)
    field_sumsq(..., dot, scale, temperatures, normalization) -> [nR] fp64   sum of force_R^2 per R (step 7)
    field_force(..., dot, scale, rms, temperatures, normalization) -> (force [*batch, G, S], loss [*batch])

Pass 1's Gram block X T^T is the state carried to passes 2 and 3: on CPU the GEMMs dominate and memory is
plentiful. `CppFieldOps` forms scale, scale_inputs and the RMS from the global fp64 sums on the host, in
torch ops that trace. Importing this module registers the ops' fake kernels (when drift._C is built), so a
first call inside torch.compile finds them.
"""
from __future__ import annotations

import math

import torch

from drift import _ext
from drift.field.core import R_LIST_DEFAULT, RMS_EPS, SCALE_EPS, DriftField, compute_dtype
from drift.field.three_pass import FieldOps, three_pass


def _acc_dtype(gen: torch.Tensor) -> torch.dtype:
    return torch.float64 if gen.dtype == torch.float64 else torch.float32


def _fake_scale_sums(gen, pos, neg, neg_weight):
    G = gen.shape[-2]
    M = G + pos.shape[-2] + (neg.shape[-2] if neg is not None else 0)
    rows = math.prod(gen.shape[:-2])
    return gen.new_empty((2,), dtype=torch.float64), gen.new_empty((rows, G, M), dtype=_acc_dtype(gen))


def _fake_sumsq(gen, pos, neg, neg_weight, dot, scale, temperatures, normalization):
    return gen.new_empty((len(temperatures),), dtype=torch.float64)


def _fake_force(gen, pos, neg, neg_weight, dot, scale, rms, temperatures, normalization):
    dt = _acc_dtype(gen)
    return gen.new_empty(gen.shape, dtype=dt), gen.new_empty(gen.shape[:-2], dtype=dt)


def _register_fakes() -> None:
    torch.library.register_fake("drift::field_scale_sums")(_fake_scale_sums)
    torch.library.register_fake("drift::field_sumsq")(_fake_sumsq)
    torch.library.register_fake("drift::field_force")(_fake_force)


# Registered when this module is imported (as extension-cpp does), never lazily: a first call that
# happens inside torch.compile must not trace register_fake, which dynamo refuses.
if _ext.HAS_C_EXT:
    _register_fakes()


def _scale(gen, pos, neg, sums: torch.Tensor) -> torch.Tensor:
    """The global scale from the all-reduced fp64 sums, rounded once to the compute dtype."""
    return (sums[0] / sums[1]).to(compute_dtype(gen, pos, neg))


class CppFieldOps(FieldOps):
    """The C++ passes; the state carried between them is pass 1's Gram block X T^T [B, G, M]."""

    name = "cpp"

    def scale_sums(self, gen, pos, neg, neg_weight):
        return torch.ops.drift.field_scale_sums(gen, pos, neg, neg_weight)

    def sumsq(self, gen, pos, neg, neg_weight, state, sums, temperatures, normalization):
        scale = _scale(gen, pos, neg, sums)
        sumsq = torch.ops.drift.field_sumsq(gen, pos, neg, neg_weight, state, scale, temperatures, normalization)
        count = float(math.prod(gen.shape[:-2]) * gen.shape[-2] * gen.shape[-1])
        return torch.cat([sumsq.double(), sumsq.new_full((1,), count, dtype=torch.float64)])

    def force(self, gen, pos, neg, neg_weight, state, sums, stats, temperatures, normalization):
        acc = compute_dtype(gen, pos, neg)
        scale = _scale(gen, pos, neg, sums)
        scale_inputs = torch.clamp(scale / math.sqrt(gen.shape[-1]), min=SCALE_EPS)
        ms = (stats[:-1] / stats[-1]).to(acc)
        rms = torch.sqrt(torch.clamp(ms, min=RMS_EPS))
        force, loss = torch.ops.drift.field_force(gen, pos, neg, neg_weight, state, scale, rms, temperatures,
                                                  normalization)
        return DriftField(force=force, scale=scale, scale_inputs=scale_inputs, loss=loss, force_rms=torch.sqrt(ms))


CPP_OPS = CppFieldOps()


def drifting_field_cpp(gen, pos, neg=None, neg_weight=None, temperatures=R_LIST_DEFAULT, normalization="xy",
                       process_group=None) -> DriftField:
    """The "cpp" backend: drifting_field_reference's signature over the C++ ops (CPU tensors only)."""
    _ext.require()
    for name, t in (("gen", gen), ("pos", pos), ("neg", neg), ("neg_weight", neg_weight)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, but {name} is on {t.device}; "
                             "use backend='triton' (CUDA) or 'reference'")
    return three_pass(CPP_OPS, gen, pos, neg, neg_weight, temperatures, normalization, process_group)
