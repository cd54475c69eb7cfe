"""Multi-key launches of the fused drifting field: the passes for all feature keys of a training step, one launch
per pass and group of keys (what drift/field/triton_driver.py calls for `drifting_field_multi`). Design note:
../docs/field_kernels.md, "Multi-key calls" (relative to this folder).

A step computes the field for ~86-99 feature keys, each [*batch, n, S] with its own row count and S. Keys that
agree on everything a compiled kernel specializes on (G, U, P, S, dtypes, which optional inputs exist, the
feature-axis strides, the device) form a group, and each pass runs once per group: one grid over the rows of
all its keys, where a program finds its key, its key's base pointers and strides in a per-call key table
(field_device._key_bases) and its key's global sums by the key's index. Per group and pass that is one kernel
plus one launch of the per-key row sums (field_device._segment_sum_kernel); the outputs of a group are one
flat buffer, of which each key's force, loss and scalars are views. A key alone in its group runs the
single-key passes of field_launch.py (which can split a row's columns over several programs).

    state, sums = scale_sums(items)                       sums: a list of fp64 tensors, all-reduced by the caller
    stats = sumsq(state, sums, temperatures, normalization)          likewise
    out = force(state, sums, stats, temperatures, normalization)     [(force, loss, scalars)] in item order

Host work per call: one signature of all items (the grouping and the group plans are cached per signature),
the key tables (element offsets of each key's tensors from its group's first key: they change every step) in
one int64 tensor, copied to the device once, from pinned memory without a host sync.

Caches: the call plans (grouping, group plans) are an LRU of CALL_CACHE_SIZE entries keyed by the items'
shapes, strides, dtypes and device (a training run has one or two).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton.language as tl

from .field_launch import (DOT_PRECISION, PLAN_CACHES, _LRU, _Plan, _check_device, _segments, _signature,
                           _two_batch_dims, field_force, field_scale_sums, field_sumsq, run_pass1, run_pass2,
                           run_pass3)
from .field_tuning import block_sizes, num_sms, rows_bucket, stored_fits

KEY_FIELDS = 17  # int64 entries per key in the key table (field_device.KEY_FIELDS, laid out there)
CALL_CACHE_SIZE = 16
_CALLS = _LRU(CALL_CACHE_SIZE)  # signature of all items -> [_Unit]
PLAN_CACHES.append(_CALLS)  # (their group plans hold tuned configurations: field_launch.reset_tuning clears them)


class _GroupPlan(_Plan):
    """A _Plan over the rows of several keys (multi=True), plus what the per-call key table needs: per key its
    first row, B2, batch shape, whether its batch dims must be merged, and its strides (sg_b1 .. sw_b2)."""

    __slots__ = ("starts", "B2s", "batches", "merges", "key_strides", "strides_aligned")


class _Unit:
    """One launch unit of a call: a group of keys (plan is a _GroupPlan) or a single key (plan None)."""

    __slots__ = ("items", "plan")

    def __init__(self, items: List[int], plan: Optional[_GroupPlan]):
        self.items = items
        self.plan = plan


class MultiState:
    """What passes 2 and 3 of a call need from pass 1: the items, their launch units, the units' kernel
    arguments and output buffers, and the items' two-batch-dim views (copies where a merge needed one: they
    must live until pass 3 has read them)."""

    __slots__ = ("items", "units", "args", "bufs", "views")


def _bucket(gen, pos, neg, w) -> tuple:
    """What keys of one launch must share (everything the kernels are compiled for, and the device)."""
    return (gen.shape[-2], 0 if neg is None else neg.shape[-2], pos.shape[-2], gen.shape[-1], gen.dtype, pos.dtype,
            None if neg is None else neg.dtype, None if w is None else w.dtype, gen.stride(-1), pos.stride(-1),
            None if neg is None else neg.stride(-1), None if w is None else w.stride(-1), gen.device)


def _views(gen, pos, neg, w) -> tuple:
    """The key's tensors with exactly two batch dims, as the kernels index them (a view where strides allow)."""
    return (_two_batch_dims(gen, 2), _two_batch_dims(pos, 2), None if neg is None else _two_batch_dims(neg, 2),
            None if w is None else _two_batch_dims(w, 1))


def _make_group_plan(items: Sequence[tuple]) -> _GroupPlan:
    gen, pos, neg, w = items[0]
    _check_device(gen, pos, neg, w)
    p = _GroupPlan()
    p.multi, p.nk, p.tab, p.al = True, len(items), None, 1
    p.G, p.S = gen.shape[-2], gen.shape[-1]
    p.P = pos.shape[-2]
    p.has_neg = neg is not None and neg.shape[-2] > 0
    p.has_w = p.has_neg and w is not None
    p.U = neg.shape[-2] if p.has_neg else 0
    p.merge = False
    p.starts, p.B2s, p.batches, p.merges, p.key_strides = [], [], [], [], []
    rows = 0
    for g, q, n, ww in items:
        g4, q4, n4, w3 = _views(g, q, n, ww)
        p.starts.append(rows)
        p.B2s.append(g4.shape[1])
        p.batches.append(tuple(g.shape[:-2]))
        p.merges.append(g.dim() > 4)
        rows += g4.shape[0] * g4.shape[1]
        sn = n4.stride()[:3] if p.has_neg else (0, 0, 0)
        sw = w3.stride()[:2] if p.has_w else (0, 0)
        p.key_strides.append(tuple(g4.stride()[:3]) + tuple(sn) + tuple(q4.stride()[:3]) + tuple(sw))
    p.B, p.B2, p.batch = rows, 1, (rows,)
    # The feature-axis strides, common to the group, are kernel arguments (Triton specializes a stride of 1);
    # the kernels take every other stride from the key table.
    p.strides = (0, 0, 0, gen.stride(-1), 0, 0, 0, neg.stride(-1) if p.has_neg else 0, 0, 0, 0, pos.stride(-1),
                 0, 0, w.stride(-1) if p.has_w else 0)
    if gen.dtype == torch.float64:
        p.acc, p.acc_dt, p.prec = tl.float64, torch.float64, "ieee"
    else:
        p.acc, p.acc_dt, p.prec = tl.float32, torch.float32, DOT_PRECISION
    p.BG, p.BU, p.BP = block_sizes(p.G, p.U, p.P)
    p.device = gen.device
    unit = all(t is None or t.stride(-1) == 1 for t in (gen, pos, neg if p.has_neg else None))
    # The single-key tuning key plus "multi": a group's kernels are other compiled variants (MULTI=True).
    p.key = (p.G, p.U, p.P, p.S, str(gen.dtype), p.has_neg, p.has_w, unit, rows_bucket(p.B, gen.device),
             str(gen.device), "multi")
    p.stored_ok = stored_fits(p.G, p.U, p.P, p.S)
    p.split = (1, p.S)  # the split route needs few rows; a group has many, and its kernels do not split
    p.route = None
    p.cfg = {}
    p.seg = _segments(tuple(p.starts) + (rows,), gen.device)
    al = 16 // gen.element_size()
    p.strides_aligned = al if all(s % al == 0 for ks in p.key_strides for s in ks[:9]) else 1
    num_sms(gen.device)  # (cached; resolved here, not between the passes)
    return p


def _call_plan(items: Sequence[tuple]) -> List[_Unit]:
    sig = tuple(_signature(*it) for it in items)
    units = _CALLS.get(sig)
    if units is None:
        buckets = {}
        for i, it in enumerate(items):
            buckets.setdefault(_bucket(*it), []).append(i)
        units = [_Unit(idx, _make_group_plan([items[i] for i in idx]) if len(idx) > 1 else None)
                 for idx in buckets.values()]
        _CALLS.put(sig, units)
    return units


def _offset(t: Optional[torch.Tensor], base: Optional[torch.Tensor]) -> int:
    """Element offset of t's data from base's (0 where the input is absent)."""
    if t is None:
        return 0
    d = t.data_ptr() - base.data_ptr()
    size = t.element_size()
    if d % size:
        raise ValueError(f"a feature key's data is not aligned to its element size ({size} bytes)")
    return d // size


def _tables(units: List[_Unit], views: List[tuple], device) -> None:
    """Fill every group plan's per-call key table (p.tab, p.al) from the items' current data pointers: one
    int64 tensor for all groups, copied to the device once (from pinned memory, no host sync)."""
    values, spans = [], []
    for u in units:
        p = u.plan
        if p is None:
            continue
        g0, q0, n0, w0 = views[u.items[0]]
        al = p.strides_aligned
        start = len(values)
        for k, i in enumerate(u.items):
            g, q, n, w = views[i]
            offs = (_offset(g, g0), _offset(n, n0), _offset(q, q0), _offset(w, w0))
            if al > 1 and any(o % al for o in offs[:3]):
                al = 1  # (a different compiled variant; feature maps are normally 16-byte aligned)
            ks = p.key_strides[k]
            values += [p.starts[k], p.B2s[k], *offs, *ks]
        spans.append((p, start, len(values), al))
    if not spans:
        return
    tab = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        tab = tab.pin_memory().to(device, non_blocking=True)
    for p, a, b, al in spans:
        p.tab, p.al = tab[a:b], al


def scale_sums(items: Sequence[tuple]) -> Tuple[MultiState, List[torch.Tensor]]:
    """Pass 1 for every item (gen, pos, neg, neg_weight) (validated, detached, gen/pos/neg in one dtype, all
    on one device): (state for passes 2 and 3, [fp64 scale sums per unit]: [nk, 2] per group, [2] per single
    key), to be all-reduced element-wise by the caller."""
    units = _call_plan(items)
    st = MultiState()
    st.units, st.items = units, items
    views = [None] * len(items)
    for u in units:
        if u.plan is not None:
            for i, m in zip(u.items, u.plan.merges):
                views[i] = _views(*items[i]) if m else items[i]
    st.args, st.bufs, sums = [], [], []
    _tables(units, views, items[0][0].device)
    for u in units:
        if u.plan is None:
            s, buf = field_scale_sums(*items[u.items[0]])
            args = None
        else:
            g, q, n, w = views[u.items[0]]
            args = (g, n if n is not None else g, q, w if w is not None else g)
            s, buf = run_pass1(u.plan, args)
        st.args.append(args)
        st.bufs.append(buf)
        sums.append(s)
    st.views = views
    return st, sums


def sumsq(st: MultiState, sums: List[torch.Tensor], temperatures, normalization) -> List[torch.Tensor]:
    """Pass 2 for every unit, given the global scale sums: [fp64 stats per unit] ([nk, nR + 1] or [nR + 1])."""
    out = []
    for u, args, buf, s in zip(st.units, st.args, st.bufs, sums):
        if u.plan is None:
            out.append(field_sumsq(*st.items[u.items[0]], buf, s, temperatures, normalization))
        else:
            out.append(run_pass2(u.plan, args, buf, s, temperatures, normalization))
    return out


def force(st: MultiState, sums: List[torch.Tensor], stats: List[torch.Tensor], temperatures,
          normalization) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Pass 3 for every unit, given the global sums: per item, in item order, (force [*batch, G, S], loss
    [*batch], scalars [2 + nR] = [scale, scale_inputs, force_rms...]), views of each group's flat outputs."""
    out: List[Optional[tuple]] = [None] * len(st.items)
    for u, args, buf, s, t in zip(st.units, st.args, st.bufs, sums, stats):
        if u.plan is None:
            i = u.items[0]
            loss, scalars = field_force(*st.items[i], buf, s, t, temperatures, normalization)
            out[i] = (buf, loss, scalars)
            continue
        p = u.plan
        loss, scalars = run_pass3(p, args, buf, s, t, temperatures, normalization)
        for k, i in enumerate(u.items):
            a, b = p.starts[k], p.starts[k + 1] if k + 1 < p.nk else p.B
            out[i] = (buf[a:b].view(p.batches[k] + (p.G, p.S)), loss[a:b].view(p.batches[k]), scalars[k])
    return out


def group_sizes(items: Sequence[tuple]) -> List[int]:
    """How many keys each launch unit of a call with these items holds (benchmarks and tests)."""
    return [len(u.items) for u in _call_plan(items)]


def reset() -> None:
    """Forget the call plans (field_launch.reset_tuning does too, with the tuned configurations)."""
    _CALLS.clear()

