"""Host driver of the "cpp" backend: the C++ pass ops of drift._C (torch.ops.drift.field_*, CPU tensors).

The ops (csrc/drifting_field.cpp) are the three passes of drift/field/three_pass.py with scale and RMS
passed in as tensors:

    field_scale_sums(gen, pos, neg, neg_weight) -> ([2] fp64, gram [B, KN])                       (step 3)
    field_sumsq(..., gram, scale, temperatures, normalization) -> ([nR] fp64 sum of force_R^2 per R (step 7),
                                                                    coef [B, nR, G, M])
    field_force(gen, pos, neg, coef, scale, rms) -> (force [*batch, G, S], loss [*batch])

The state carried between the passes: pass 1's Gram blocks (`gram_floats` per row: X T^T [G, M], the M
target norms, and for wide features the [neg, pos] blocks of T T^T that let pass 2 skip the targets), then
pass 2's coefficients c'_R of every temperature, which leave pass 3 only the force product (the Gram blocks
are dropped once pass 2 is done). On CPU the GEMMs and the exps dominate, and both states save the later
passes theirs. `CppFieldOps` forms scale, scale_inputs and the RMS from the global fp64 sums on the host,
in torch ops that trace. Importing this module registers the ops' fake kernels (when drift._C is built), so
a first call inside torch.compile finds them.
"""
from __future__ import annotations

import math

import torch

from drift import _ext
from drift.field.core import R_LIST_DEFAULT, RMS_EPS, SCALE_EPS, DriftField, compute_dtype
from drift.field.three_pass import FieldOps, three_pass


def _acc_dtype(gen: torch.Tensor) -> torch.dtype:
    return torch.float64 if gen.dtype == torch.float64 else torch.float32


# Pass 1 fixes pass 2's route from the row shape, costed for this many temperatures (the official R_list).
_ROUTE_TEMPS = 3


def gram_floats(G: int, U: int, P: int, S: int) -> int:
    """Floats per row of the state field_scale_sums returns: X T^T [G, M] and the M norms, plus, when pass 2
    takes the Gram route (fewer multiply-adds than forming the forces), N Y^T [U, U+P] and P P^T [P, P].
    The same rule as make_problem in csrc/drifting_field.cpp."""
    M = G + U + P
    blocks = U * (U + P) + P * P
    gram_macs = blocks * S + _ROUTE_TEMPS * G * (G * G + (G + U) * U + M * P)
    return G * M + M + (blocks if gram_macs < _ROUTE_TEMPS * G * M * S else 0)


def _fake_scale_sums(gen, pos, neg, neg_weight):
    G, S = gen.shape[-2:]
    U = neg.shape[-2] if neg is not None else 0
    rows = math.prod(gen.shape[:-2])
    kn = gram_floats(G, U, pos.shape[-2], S)
    return gen.new_empty((2,), dtype=torch.float64), gen.new_empty((rows, kn), dtype=_acc_dtype(gen))


def _fake_sumsq(gen, pos, neg, neg_weight, gram, scale, temperatures, normalization):
    G = gen.shape[-2]
    M = G + pos.shape[-2] + (neg.shape[-2] if neg is not None else 0)
    coef = gen.new_empty((math.prod(gen.shape[:-2]), len(temperatures), G, M), dtype=_acc_dtype(gen))
    return gen.new_empty((len(temperatures),), dtype=torch.float64), coef


def _fake_force(gen, pos, neg, coef, scale, rms):
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
    """The C++ passes. The state is a one-item list: pass 1's Gram blocks [B, gram_floats(G, U, P, S)], which
    pass 2 replaces with its coefficients [B, nR, G, M] (so the blocks are freed before pass 3 allocates the
    force)."""

    name = "cpp"

    def scale_sums(self, gen, pos, neg, neg_weight):
        sums, gram = torch.ops.drift.field_scale_sums(gen, pos, neg, neg_weight)
        return sums, [gram]

    def sumsq(self, gen, pos, neg, neg_weight, state, sums, temperatures, normalization):
        scale = _scale(gen, pos, neg, sums)
        sumsq, state[0] = torch.ops.drift.field_sumsq(gen, pos, neg, neg_weight, state[0], scale, temperatures,
                                                      normalization)
        count = float(math.prod(gen.shape[:-2]) * gen.shape[-2] * gen.shape[-1])
        return torch.cat([sumsq.double(), sumsq.new_full((1,), count, dtype=torch.float64)])

    def force(self, gen, pos, neg, neg_weight, state, sums, stats, temperatures, normalization):
        acc = compute_dtype(gen, pos, neg)
        scale = _scale(gen, pos, neg, sums)
        scale_inputs = torch.clamp(scale / math.sqrt(gen.shape[-1]), min=SCALE_EPS)
        ms = (stats[:-1] / stats[-1]).to(acc)
        rms = torch.sqrt(torch.clamp(ms, min=RMS_EPS))
        force, loss = torch.ops.drift.field_force(gen, pos, neg, state[0], scale, rms)
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
