"""The three-pass driver shared by the fused backends, and the `FieldOps` protocol they implement.

A fused backend ("cpp": drift/field/cpp_driver.py, "triton": drift/field/triton_driver.py) computes the
field in three passes over the B rows, each reading the inputs in place. Two global reductions separate
them (step 3's scale and step 7's per-temperature RMS, see drift/field/core.py), so `three_pass` runs
the passes one by one and all-reduces the two fp64 sums over `process_group` in between, exactly where
the reference backend all-reduces them:

    sums, state = ops.scale_sums(gen, pos, neg, neg_weight)       [2] fp64: [sum dist*tw, G * sum tw]
    all-reduce sums
    stats = ops.sumsq(..., state, sums, temperatures, normalization)
                                                                  [nR + 1] fp64: sum of force_R^2 per R, B*G*S
    all-reduce stats
    field = ops.force(..., state, sums, stats, temperatures, normalization)       -> DriftField

`state` is whatever the backend carries from pass 1 to passes 2 and 3 (the C++ ops: the Gram block
X T^T; the Triton kernels: the output buffer, which becomes the force). Every pass derives scale,
scale_inputs and the RMS from the global fp64 sums itself, rounding the fp64 quotients once to the compute
dtype: W ranks holding parts of the rows then get the single process's values bit for bit (up to a
last-bit tie), however the rows are split. Nothing here syncs with the host, so under torch.compile the
three passes trace into one graph (the ops have fake kernels).

`three_pass_multi` runs the same passes for many independent inputs (the feature keys of a training step)
with one all-reduce of all their scale sums and one of all their sums of squares: 2 collectives per step
instead of 2 per key. The backend's *_multi methods run a pass for all items; by default they loop over the
single-item passes (the C++ backend), the Triton backend runs one launch per group of similar keys.
"""
from __future__ import annotations

import abc
from typing import Any, List, Optional, Sequence, Tuple

import torch

from drift.field.core import DriftField, all_reduce_sum, compute_dtype


class FieldOps(abc.ABC):
    """The three passes of one fused backend; inputs are validated, detached and in one dtype.

    gen [*batch, G, S], pos [*batch, P, S], neg [*batch, U, S] or None, neg_weight [*batch, U] or None;
    temperatures a list of floats, normalization "xy" | "y" | "none".
    """

    name: str

    @abc.abstractmethod
    def scale_sums(self, gen, pos, neg, neg_weight) -> Tuple[torch.Tensor, Any]:
        """Pass 1: ([sum_{b,i,m} dist * tw, G * sum_{b,m} tw] in fp64 over this process's rows, state)."""

    @abc.abstractmethod
    def sumsq(self, gen, pos, neg, neg_weight, state, sums: torch.Tensor, temperatures,
              normalization: str) -> torch.Tensor:
        """Pass 2, given the global sums of pass 1: [sum over rows of ||force_R||^2 for each R (scaled
        coordinates, before the RMS normalization), B * G * S] in fp64 over this process's rows."""

    @abc.abstractmethod
    def force(self, gen, pos, neg, neg_weight, state, sums: torch.Tensor, stats: torch.Tensor, temperatures,
              normalization: str) -> DriftField:
        """Pass 3, given the global sums of passes 1 and 2: the field of this process's rows."""

    # Many items (gen, pos, neg, neg_weight) at once. The sums travel as a list of fp64 tensors that the driver
    # all-reduces element-wise in one collective; its layout is the backend's (here: one per item).

    def scale_sums_multi(self, items: Sequence[tuple]) -> Tuple[Any, List[torch.Tensor]]:
        """Pass 1 for every item: (state, list of fp64 scale sums)."""
        out = [self.scale_sums(*it) for it in items]
        return [st for _, st in out], [s for s, _ in out]

    def sumsq_multi(self, items: Sequence[tuple], state, sums: List[torch.Tensor], temperatures,
                    normalization: str) -> List[torch.Tensor]:
        """Pass 2 for every item, given the global scale sums: list of fp64 sums of squares."""
        return [self.sumsq(*it, st, s, temperatures, normalization) for it, st, s in zip(items, state, sums)]

    def force_multi(self, items: Sequence[tuple], state, sums: List[torch.Tensor], stats: List[torch.Tensor],
                    temperatures, normalization: str) -> List[DriftField]:
        """Pass 3 for every item, given the global sums: the fields, in item order."""
        return [self.force(*it, st, s, t, temperatures, normalization)
                for it, st, s, t in zip(items, state, sums, stats)]


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
    sums, state = ops.scale_sums(gen, pos, neg, neg_weight)
    sums = all_reduce_sum(sums, process_group)
    stats = ops.sumsq(gen, pos, neg, neg_weight, state, sums, temps, normalization)
    stats = all_reduce_sum(stats, process_group)
    return ops.force(gen, pos, neg, neg_weight, state, sums, stats, temps, normalization)


def _prepared(gen, pos, neg, neg_weight) -> tuple:
    gen, pos, neg, neg_weight = (_detached(t) for t in (gen, pos, neg, neg_weight))
    return (*_same_dtype(gen, pos, neg), neg_weight)


def all_reduce_list(ts: List[torch.Tensor], process_group) -> List[torch.Tensor]:
    """Sum every tensor of `ts` (fp64) over `process_group` in one collective: concatenated, all-reduced, and
    returned as views of the result in the shapes of `ts` (no-op without a group)."""
    if process_group is None or not ts:
        return ts
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in ts]), process_group)
    out, a = [], 0
    for t in ts:
        out.append(flat[a:a + t.numel()].view(t.shape))
        a += t.numel()
    return out


def three_pass_multi(ops: FieldOps, items: Sequence[tuple], temperatures: Sequence[float], normalization: str,
                     process_group=None) -> List[DriftField]:
    """The drifting field of every item (gen, pos, neg, neg_weight), already validated, through a fused
    backend: each item with its own scale and per-temperature RMS (as `three_pass` per item), with one
    all-reduce of all items' scale sums and one of all their sums of squares."""
    items = [_prepared(*it) for it in items]
    temps = [float(r) for r in temperatures]
    state, sums = ops.scale_sums_multi(items)
    sums = all_reduce_list(sums, process_group)
    stats = ops.sumsq_multi(items, state, sums, temps, normalization)
    stats = all_reduce_list(stats, process_group)
    return ops.force_multi(items, state, sums, stats, temps, normalization)
