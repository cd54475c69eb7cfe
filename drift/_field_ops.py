"""Python side of the fused drifting-field backends: the three-pass driver and the C++ ops' registration.

Both fused backends ("cpp" from drift._C, "triton" from kernels/) expose three ops (SPEC §3.3), each a
pass over the B rows that reads the inputs in place. The C++ ops:

    scale_sums(gen, pos, neg, neg_weight) -> ([2] fp64 [sum dist*tw, G*sum tw], dot)            (step 3)
    sumsq(..., dot, scale, temperatures, normalization) -> [nR] fp64  sum of force_R^2 per R    (step 7)
    force(..., dot, scale, rms, temperatures, normalization) -> (force [*batch, G, S], loss [*batch])

hand pass 1's Gram block X T^T ([B, G, M]) on to passes 2 and 3 (`carries_dot`): on CPU the GEMMs dominate
and memory is plentiful. The Triton ops (`fused_stats`) keep the scalar work on the device instead, so a
small call is not bound by host-side tensor ops:

    scale_sums(gen, pos, neg, neg_weight) -> ([2] fp64, buf [*batch, G, S])
    sumsq(..., buf, sums, temperatures, normalization) -> [nR + 1] fp64 (per-R sums of squares, count B*G*S)
    force(..., buf, sums, stats, temperatures, normalization) -> (loss, [scale, scale_inputs, force_rms...])

where the kernels form scale, scale_inputs and the RMS from the global fp64 sums themselves (the same fp64
quotients, rounded once) and pass 3 writes the force into buf (which may carry pass 1's state until then).

Importing this module registers the C++ ops' fake kernels (when drift._C is built), so a first call
inside torch.compile finds them. `three_pass` strings the passes together and all-reduces the two global
sums over `process_group` between passes, exactly where the reference does, so every rank uses the global
scale and RMS. Nothing in it syncs with the host, so it traces into one graph under torch.compile (the ops
have fake kernels).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from drift import _ext
from drift.field import RMS_EPS, SCALE_EPS, DriftField, _all_reduce_sum, compute_dtype


class FieldOps(NamedTuple):
    """The three pass ops of one fused backend (same signatures for cpp and triton)."""

    name: str
    scale_sums: Callable
    sumsq: Callable
    force: Callable
    carries_dot: bool = False  # scale_sums returns (sums, dot) and the other two take dot after neg_weight


def _detached(t):
    return t.detach() if t is not None and t.requires_grad else t


def _same_dtype(gen, pos, neg):
    """Inputs in one dtype for the kernels: kept as they are when they agree, else the compute dtype."""
    dts = {t.dtype for t in (gen, pos, neg) if t is not None}
    if len(dts) == 1:
        return gen, pos, neg
    dt = compute_dtype(gen, pos, neg)
    return gen.to(dt), pos.to(dt), (neg.to(dt) if neg is not None else None)


def three_pass(ops: FieldOps, gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
               neg_weight: Optional[torch.Tensor], temperatures: Sequence[float], normalization: str,
               process_group=None) -> DriftField:
    """The drifting field through a fused backend's three passes (inputs already validated)."""
    gen, pos, neg, neg_weight = (_detached(t) for t in (gen, pos, neg, neg_weight))
    gen, pos, neg = _same_dtype(gen, pos, neg)
    temps = [float(r) for r in temperatures]
    if getattr(ops, "fused_stats", False):
        # The global sums are all-reduced in fp64 before the kernels divide and round them, as below.
        sums, buf = ops.scale_sums(gen, pos, neg, neg_weight)
        sums = _all_reduce_sum(sums, process_group)
        stats = ops.sumsq(gen, pos, neg, neg_weight, buf, sums, temps, normalization)
        stats = _all_reduce_sum(stats, process_group)
        loss, scalars = ops.force(gen, pos, neg, neg_weight, buf, sums, stats, temps, normalization)
        return DriftField(force=buf, scale=scalars[0], scale_inputs=scalars[1], loss=loss, force_rms=scalars[2:])
    G, S = gen.shape[-2], gen.shape[-1]
    rows = math.prod(gen.shape[:-2])

    if getattr(ops, "carries_dot", False):
        sums, dot = ops.scale_sums(gen, pos, neg, neg_weight)
        carried = (dot,)
    else:
        sums, carried = ops.scale_sums(gen, pos, neg, neg_weight), ()
    # The global sums come back in fp64 and are all-reduced and divided in fp64 before rounding to the compute
    # dtype: W ranks holding parts of the rows then get the single process's scale and RMS bit for bit (both
    # round the same fp64 value, up to a last-bit tie), however the rows are split.
    acc = compute_dtype(gen, pos, neg)
    sums = _all_reduce_sum(sums.double(), process_group)
    scale = (sums[0] / sums[1]).to(acc)
    scale_inputs = torch.clamp(scale / math.sqrt(S), min=SCALE_EPS)

    sumsq = ops.sumsq(gen, pos, neg, neg_weight, *carried, scale, temps, normalization)
    stats = torch.cat([sumsq.double(), sumsq.new_full((1,), float(rows * G * S), dtype=torch.float64)])
    stats = _all_reduce_sum(stats, process_group)
    ms = (stats[:-1] / stats[-1]).to(acc)
    rms = torch.sqrt(torch.clamp(ms, min=RMS_EPS))

    force, loss = ops.force(gen, pos, neg, neg_weight, *carried, scale, rms, temps, normalization)
    return DriftField(force=force, scale=scale, scale_inputs=scale_inputs, loss=loss, force_rms=torch.sqrt(ms))


# ---------------------------------------------------------------------------------------------------
# C++ backend (torch.ops.drift.field_*, CPU)
# ---------------------------------------------------------------------------------------------------

def _acc_dtype(gen: torch.Tensor) -> torch.dtype:
    return torch.float64 if gen.dtype == torch.float64 else torch.float32


def _fake_scale_sums(gen, pos, neg, neg_weight):
    G = gen.shape[-2]
    M = G + pos.shape[-2] + (neg.shape[-2] if neg is not None else 0)
    rows = math.prod(gen.shape[:-2])
    dt = _acc_dtype(gen)
    return gen.new_empty((2,), dtype=torch.float64), gen.new_empty((rows, G, M), dtype=dt)


def _fake_sumsq(gen, pos, neg, neg_weight, dot, scale, temperatures, normalization):
    return gen.new_empty((len(temperatures),), dtype=torch.float64)


def _fake_force(gen, pos, neg, neg_weight, dot, scale, rms, temperatures, normalization):
    dt = _acc_dtype(gen)
    return gen.new_empty(gen.shape, dtype=dt), gen.new_empty(gen.shape[:-2], dtype=dt)


def _register_cpp_fakes() -> None:
    torch.library.register_fake("drift::field_scale_sums")(_fake_scale_sums)
    torch.library.register_fake("drift::field_sumsq")(_fake_sumsq)
    torch.library.register_fake("drift::field_force")(_fake_force)


# Registered when this module is imported (as extension-cpp does), never lazily: a first call that
# happens inside torch.compile must not trace register_fake, which dynamo refuses.
if _ext.HAS_C_EXT:
    _register_cpp_fakes()
    CPP_OPS: Optional[FieldOps] = FieldOps("cpp", torch.ops.drift.field_scale_sums, torch.ops.drift.field_sumsq,
                                           torch.ops.drift.field_force, carries_dot=True)
else:
    CPP_OPS = None


def drifting_field_cpp(gen, pos, neg=None, neg_weight=None, temperatures=(0.02, 0.05, 0.2), normalization="xy",
                       process_group=None) -> DriftField:
    """The "cpp" backend: drifting_field_reference's signature over the C++ ops (CPU tensors only)."""
    _ext.require()
    for name, t in (("gen", gen), ("pos", pos), ("neg", neg), ("neg_weight", neg_weight)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, but {name} is on {t.device}; "
                             "use backend='triton' (CUDA) or 'reference'")
    return three_pass(CPP_OPS, gen, pos, neg, neg_weight, temperatures, normalization, process_group)
