"""Host side of the fused drifting field: launch plans (per input signature), the launchers of the five kernels
(field_device.py), the route of each call, and the three passes as plain functions (field_ops.py registers
them as custom ops). Design note: ../docs/field_kernels.md (relative to this folder).

A call's shape work (views, strides, block sizes, tuning key, chosen configs) is done once per input
signature (_Plan) and reused, so a repeated call does no shape work on the host. Inputs: [*batch, n, S] in
fp32/bf16/fp16 (computed in fp32) or fp64 (computed in fp64), any strides; one or two batch dims are read in
place (more are merged, a view where strides allow).

Caches: the launch plans and the per-(temperatures, S, device, dtype) constants tensors are LRU caches of
PLAN_CACHE_SIZE and CONSTS_CACHE_SIZE entries: unlike a tuning key (field_tuning.py), a new signature costs
no compile (a batch size or a stride that changes from call to call makes one), so they are bounded; an
evicted plan is rebuilt from the tuned configurations, which stay.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch
import triton.language as tl

from . import INTERPRETED, aot
from .field_device import RMS_EPS, _field_force_kernel, _field_scale_kernel, _field_sumsq_kernel, _segment_sum_kernel
from .field_device_split import _field_gram_part_kernel, _field_gram_reduce_kernel
from .field_tuning import (BEST_MS, FORCED, PROXY_NORM, R_LIST_DEFAULT, ROUTE_NAMES, ROUTE_RECOMPUTE, ROUTE_SPLIT,
                           ROUTE_STORED, ROUTES, SPLIT_ALIGN, Config, _next_pow2, block_sizes, candidates, choose_route,
                           gram_floats, num_sms, reset, routes_offered, rows_bucket, split_blocks, stored_fits,
                           tuned_launch)

# 3xTF32 (three TF32 products per fp32 product, see field_device._mma) keeps fp32-level accuracy on tensor
# cores; the interpreter multiplies in numpy and takes only "ieee" dots, so it runs the same split on exact dots.
DOT_PRECISION = "split-ieee" if INTERPRETED else "split"
NORM_CODES = {"xy": 0, "y": 1, "none": 2}

# Accuracy guard of the stored route's pass 2. Its ||c T||^2 = sum_i c_i K c_i^T carries rounding errors of
# about eps_K * spread, spread = sum_{i,m} c_im^2 K_mm (the size of c T before the cancellation in the sum;
# eps_K ~ 2^-20 for 3xTF32 products with fp32 accumulation, 2^-50 in fp64), while the streaming route's error
# grows only like sqrt(spread * ||c T||^2). A temperature whose estimate has eps_K * spread > GRAM_RTOL * ||cT||^2
# is streamed instead (per row, on the device). 2^-14 (6e-5 on the sum of squares, 3e-5 on the RMS) keeps the
# estimate within ~250 fp32 ulps of the RMS, 30x below any semantic error (1e-3); random inputs, and
# generated samples drawn from the data distribution itself, have spread / ||c T||^2 of 0.2-5 (G=64, U=16,
# P=64, S=16-640), i.e. ~2^-18 estimated error, so the guard only fires on degenerate rows.
GRAM_RTOL = float(os.environ.get("DRIFT_TRITON_GRAM_RTOL", 2.0 ** -14))
_GRAM_EPS = {torch.float32: 2.0 ** -20, torch.float64: 2.0 ** -50}


def _two_batch_dims(t: torch.Tensor, tail: int) -> torch.Tensor:
    """[*batch, *tail] -> [B1, B2, *tail]: free for one or two batch dims, a view when strides allow."""
    nb = t.dim() - tail
    if nb == 1:
        return t.unsqueeze(0)
    if nb == 2:
        return t
    return t.reshape(-1, *t.shape[nb - 1:])


def _strides4(t: torch.Tensor, tail: int) -> Tuple[int, ...]:
    """Strides of t viewed as [B1, B2, *tail] (B1 = 1 for one batch dim: its stride is never used)."""
    s = t.stride()
    return (0,) + tuple(s) if t.dim() - tail == 1 else tuple(s)


class _Plan:
    """Everything about a call that depends only on the inputs' shapes, strides, dtypes and device: the
    launch geometry, the kernels' stride arguments, the tuning key, the routes offered and the configurations
    chosen. Built once per signature, so a repeated call does no shape work on the host.

    A multi-key launch (field_multi.py) uses the same plan for the rows of all its keys (multi=True): nk keys,
    whose first rows `seg` (a device tensor [nk + 1], the last entry B) holds; per call, `tab` is the key table
    (field_device._key_bases) and `al` the alignment the kernels may assume of its offsets and strides. A
    single-key plan has nk = 1, no table and seg = [0, B]."""

    __slots__ = ("batch", "B", "B2", "G", "U", "P", "S", "has_neg", "has_w", "merge", "strides", "key", "acc",
                 "acc_dt", "prec", "BG", "BU", "BP", "device", "stored_ok", "split", "route", "cfg", "multi", "nk",
                 "seg", "tab", "al")

    def args(self, gen, pos, neg, w):
        """(gen, neg, pos, w) as the kernels take them (neg and w replaced by gen where absent)."""
        if self.merge:
            gen, pos = _two_batch_dims(gen, 2), _two_batch_dims(pos, 2)
            neg = _two_batch_dims(neg, 2) if self.has_neg else None
            w = _two_batch_dims(w, 1) if self.has_w else None
        return gen, (neg if self.has_neg else gen), pos, (w if self.has_w else gen)


class _LRU(OrderedDict):
    """A dict that keeps only its `cap` most recently used entries (lookup and store through get/put)."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.cap:
            self.popitem(last=False)


PLAN_CACHE_SIZE = 256
CONSTS_CACHE_SIZE = 64
_PLANS = _LRU(PLAN_CACHE_SIZE)  # input signature -> _Plan


def _signature(gen, pos, neg, w) -> tuple:
    return (gen.shape, gen.stride(), gen.dtype, gen.device, pos.shape, pos.stride(), pos.dtype,
            None if neg is None else (neg.shape, neg.stride(), neg.dtype),
            None if w is None else (w.shape, w.stride(), w.dtype))


def _check_device(*ts):
    for t in ts:
        if t is not None and t.device.type != "cuda" and not INTERPRETED and aot.active() is None:
            raise ValueError(f"the Triton drifting-field kernels need CUDA tensors (got {t.device}); "
                             "set TRITON_INTERPRET=1 before importing triton to run them on CPU")


def _make_plan(gen, pos, neg, w) -> _Plan:
    _check_device(gen, pos, neg, w)
    p = _Plan()
    p.batch = tuple(gen.shape[:-2])
    p.G, p.S = gen.shape[-2], gen.shape[-1]
    p.P = pos.shape[-2]
    p.has_neg = neg is not None and neg.shape[-2] > 0
    p.has_w = p.has_neg and w is not None
    p.U = neg.shape[-2] if p.has_neg else 0
    p.merge = gen.dim() > 4
    g4, p4 = _two_batch_dims(gen, 2), _two_batch_dims(pos, 2)
    n4 = _two_batch_dims(neg, 2) if p.has_neg else None
    w3 = _two_batch_dims(w, 1) if p.has_w else None
    p.B = g4.shape[0] * g4.shape[1]
    p.B2 = g4.shape[1]
    sg = g4.stride() if p.merge else _strides4(gen, 2)
    sp = p4.stride() if p.merge else _strides4(pos, 2)
    sn = (n4.stride() if p.merge else _strides4(neg, 2)) if p.has_neg else (0, 0, 0, 0)
    sw = (w3.stride() if p.merge else _strides4(w, 1)) if p.has_w else (0, 0, 0)
    p.strides = tuple(sg) + tuple(sn) + tuple(sp) + tuple(sw)
    if gen.dtype == torch.float64:
        p.acc, p.acc_dt, p.prec = tl.float64, torch.float64, "ieee"  # fp64 tiles have no tensor-core split
    else:
        p.acc, p.acc_dt, p.prec = tl.float32, torch.float32, DOT_PRECISION
    p.BG, p.BU, p.BP = block_sizes(p.G, p.U, p.P)
    p.device = gen.device
    unit = all(t is None or t.stride(-1) == 1 for t in (gen, pos, neg if p.has_neg else None))
    # Tuning key: row shape, dtype, which optional inputs exist, feature contiguity, occupancy regime.
    p.key = (p.G, p.U, p.P, p.S, str(gen.dtype), p.has_neg, p.has_w, unit, rows_bucket(p.B, gen.device),
             str(gen.device))
    p.stored_ok = stored_fits(p.G, p.U, p.P, p.S)
    p.split = split_blocks(p.G, p.U, p.P, p.S, p.B, num_sms(gen.device))
    p.route = None  # (route, J, W) of the latest pass 1 with this plan (passes 2 and 3 follow it)
    p.cfg = {}
    p.multi, p.nk, p.tab, p.al = False, 1, None, 1
    p.seg = _segments((0, p.B), p.device)
    return p


def _plan(gen, pos, neg, w) -> _Plan:
    sig = _signature(gen, pos, neg, w)
    p = _PLANS.get(sig)
    if p is None:
        p = _make_plan(gen, pos, neg, w)
        _PLANS.put(sig, p)
    return p


_CONSTS = _LRU(CONSTS_CACHE_SIZE)  # (temperatures, S, device, dtype) -> constants tensor on the device
_SEGMENTS = _LRU(CONSTS_CACHE_SIZE)  # (row boundaries, device) -> int64 tensor on the device
SEGMENT_ROWS = 128  # rows per iteration of the per-key row sums (fp64 [128, <= 8] tiles)


def _segments(bounds: tuple, device) -> torch.Tensor:
    """The row boundaries of a launch's keys as an int64 device tensor, cached (a plan is built once per
    signature, but several signatures share their boundaries, and each copy to the device blocks)."""
    key = (bounds, device)
    out = _SEGMENTS.get(key)
    if out is None:
        out = torch.tensor(bounds, dtype=torch.int64, device=device)
        _SEGMENTS.put(key, out)
    return out


def _row_sums(p: _Plan, part: torch.Tensor) -> torch.Tensor:
    """Per-key sums of the per-row fp64 partials part [B, C]: [nk, C] for a multi-key plan, [C] otherwise. One
    program per key, rows in a fixed order (field_device._segment_sum_kernel), so a key's sums are the same
    bits whether it ran alone or in a multi-key launch."""
    C = part.shape[1]
    out = torch.empty((p.nk, C), dtype=torch.float64, device=part.device)
    _segment_sum_kernel[(p.nk,)](part, p.seg, out, C, BR=SEGMENT_ROWS, BC=_next_pow2(C))
    return out if p.multi else out.view(C)


def _consts(temperatures, S: int, device, dt) -> torch.Tensor:
    """[1/sqrt(S), RMS_EPS, 1/R...] in the compute dtype on the device, cached (building it per call would be
    a blocking host-to-device copy). 1/sqrt(S) is rounded as torch does for `scale / sqrt(S)` on CUDA (the
    reciprocal of the fp32 divisor, in fp32), so the kernels' scale_inputs is the one the host would compute."""
    key = (tuple(temperatures), S, device, dt)
    out = _CONSTS.get(key)
    if out is None:
        if dt == torch.float64:
            inv = 1.0 / math.sqrt(S)
        else:
            inv = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(math.sqrt(S), dtype=torch.float32))
        out = torch.tensor([inv, RMS_EPS] + [1.0 / float(t) for t in key[0]], dtype=dt, device=device)
        _CONSTS.put(key, out)
    return out


def _spread_tol(p: _Plan) -> float:
    """eps_K / GRAM_RTOL for the stored route's accuracy guard (GRAM_RTOL <= 0: always stream)."""
    return _GRAM_EPS[p.acc_dt] / GRAM_RTOL if GRAM_RTOL > 0 else 1e30


def _launch_scale(p: _Plan, args, buf, part, c: Config) -> None:
    g, n, q, w = args
    _field_scale_kernel[(p.B,)](g, n, q, w, buf, part, _table(p, g), p.nk, p.B2, p.G, p.U, p.P, p.S, *p.strides,
                                HAS_NEG=p.has_neg, HAS_W=p.has_w, ACC=p.acc, BG=p.BG, BU=p.BU, BP=p.BP, BS=c.BS,
                                PREC=p.prec, STORED=c.STORED, MULTI=p.multi, AL=p.al, num_warps=c.num_warps,
                                num_stages=c.num_stages)


def _table(p: _Plan, like: torch.Tensor) -> torch.Tensor:
    """The key table argument: the call's table for a multi-key plan, any tensor otherwise (never read)."""
    return p.tab if p.multi else like


def _check_blocks(W: int, c: Config) -> None:
    # A chunk must not cross a block boundary: it would add columns of the next block to this block's K, or
    # overwrite the next block's copy of K while its program may still read it.
    if W % c.BS:
        raise ValueError(f"split route: block width {W} is not a multiple of BS {c.BS} ({c.label()})")


def _launch_part(p: _Plan, args, buf, J: int, W: int, c: Config) -> None:
    _check_blocks(W, c)
    g, n, q, _ = args
    _field_gram_part_kernel[(p.B * J,)](g, n, q, buf, J, W, p.B2, p.G, p.U, p.P, p.S, *p.strides[:12],
                                        HAS_NEG=p.has_neg, ACC=p.acc, BG=p.BG, BU=p.BU, BP=p.BP, BS=c.BS,
                                        PREC=p.prec, num_warps=c.num_warps, num_stages=c.num_stages)


def _launch_reduce(p: _Plan, args, buf, part, J: int, W: int, c: Config) -> None:
    _field_gram_reduce_kernel[(p.B,)](args[3], buf, part, J, W, p.B2, p.G, p.U, p.P, p.S, *p.strides[12:],
                                      HAS_NEG=p.has_neg, HAS_W=p.has_w, ACC=p.acc, BG=p.BG, BU=p.BU, BP=p.BP,
                                      num_warps=c.num_warps, num_stages=c.num_stages)


def _launch_sumsq(p: _Plan, args, buf, sums, consts, part, nR: int, norm: int, kw: int, c: Config) -> None:
    g, n, q, w = args
    route = 2 if c.STORED else (1 if c.GRAM else 0)
    _field_sumsq_kernel[(p.B,)](g, n, q, w, buf, sums, consts, part, _spread_tol(p), kw, nR, _table(p, g), p.nk,
                                p.B2, p.G, p.U, p.P, p.S, *p.strides, NORM=norm, HAS_NEG=p.has_neg, HAS_W=p.has_w,
                                ACC=p.acc, BG=p.BG, BU=p.BU, BP=p.BP, BS=c.BS, PREC=p.prec, ROUTE=route,
                                MULTI=p.multi, AL=p.al, num_warps=c.num_warps, num_stages=c.num_stages)


def _launch_force(p: _Plan, args, buf, sums, stats, consts, loss, scalars, nR: int, norm: int, J: int, W: int,
                  c: Config) -> None:
    g, n, q, w = args
    if not c.STORED:
        J, W = 1, p.S  # (the recompute kernel writes every column from the inputs)
    elif J > 1:
        _check_blocks(W, c)
    _field_force_kernel[(p.B * J,)](g, n, q, w, buf, sums, stats, consts, loss, scalars, J, W, nR, _table(p, g),
                                    p.nk, p.B2, p.G, p.U, p.P, p.S, *p.strides, NORM=norm, HAS_NEG=p.has_neg,
                                    HAS_W=p.has_w, ACC=p.acc, BG=p.BG, BU=p.BU, BP=p.BP, BS=c.BS, PREC=p.prec,
                                    STORED=c.STORED, MULTI=p.multi, AL=p.al, num_warps=c.num_warps,
                                    num_stages=c.num_stages)


def _on_copy(launch_into: Callable[[torch.Tensor, Config], None], buf: torch.Tensor) -> Callable[[Config], None]:
    """A trial launch for a kernel that overwrites what it reads in buf: it runs on one copy of buf."""
    copy = []

    def trial(c: Config) -> None:
        if not copy:
            copy.append(buf.clone())
        launch_into(copy[0], c)

    return trial


def _run_pass1(p: _Plan, args, buf, part, route: int) -> tuple:
    """Tune (first time) and launch pass 1 of `route` (split: in the plan's blocks); returns its configs."""
    if route != ROUTE_SPLIT:
        return (tuned_launch("scale", p.key + (route,),
                             candidates("scale", p.G, p.U, p.P, p.S, stored=route == ROUTE_STORED),
                             lambda c: _launch_scale(p, args, buf, part, c), route=route, device=p.device),)
    J, W = p.split
    c1 = tuned_launch("scale", p.key + (route, J), candidates("scale", p.G, p.U, p.P, p.S, stored=True, split=True),
                      lambda c: _launch_part(p, args, buf, J, W, c), route=route, device=p.device)
    into = lambda b, c: _launch_reduce(p, args, b, part, J, W, c)  # noqa: E731
    c2 = tuned_launch("reduce", p.key + (J,), candidates("reduce", p.G, p.U, p.P, p.S), lambda c: into(buf, c),
                      _on_copy(into, buf), route=route, device=p.device)
    return c1, c2


def _launch_pass1(p: _Plan, args, buf, part, route: int, cfgs: tuple, J: int, W: int) -> None:
    if route != ROUTE_SPLIT:
        _launch_scale(p, args, buf, part, cfgs[0])
    else:
        _launch_part(p, args, buf, J, W, cfgs[0])
        _launch_reduce(p, args, buf, part, J, W, cfgs[1])


def _run_sumsq(p: _Plan, args, buf, sums, consts, part, nR: int, norm: int, route: int, kw: int) -> Config:
    return tuned_launch("sumsq", p.key + (norm, nR, route),
                        candidates("sumsq", p.G, p.U, p.P, p.S, nR, stored=route != ROUTE_RECOMPUTE),
                        lambda c: _launch_sumsq(p, args, buf, sums, consts, part, nR, norm, kw, c), route=route,
                        device=p.device)


def _run_force(p: _Plan, args, buf, sums, stats, consts, loss, scalars, nR: int, norm: int, route: int,
               J: int, W: int, scratch: bool = False) -> Config:
    if route != ROUTE_SPLIT:
        J, W = 1, p.S
    into = lambda b, c: _launch_force(p, args, b, sums, stats, consts, loss, scalars, nR, norm, J, W, c)  # noqa
    trial = _on_copy(into, buf) if route != ROUTE_RECOMPUTE and not scratch else None
    return tuned_launch("force", p.key + (norm, nR, route, J),
                        candidates("force", p.G, p.U, p.P, p.S, nR, stored=route != ROUTE_RECOMPUTE,
                                   split=route == ROUTE_SPLIT),
                        lambda c: into(buf, c), trial, route=route, device=p.device)


def _measure_route(p: _Plan, args, buf, part, route: int) -> float:
    """Tune one route's passes at the proxy options (pass 1 leaves its outputs in buf and part) and return
    the sum of their best times in ms."""
    nR = len(R_LIST_DEFAULT)
    consts = _consts(R_LIST_DEFAULT, p.S, p.device, p.acc_dt)
    _run_pass1(p, args, buf, part, route)
    sums = _row_sums(p, part)
    part2 = torch.empty((p.B, nR + 1), dtype=torch.float64, device=p.device)
    J, W = p.split if route == ROUTE_SPLIT else (1, p.S)
    _run_sumsq(p, args, buf, sums, consts, part2, nR, PROXY_NORM, route, W)
    stats = _row_sums(p, part2)
    loss = torch.empty(p.B * J, dtype=p.acc_dt, device=p.device)
    scalars = torch.empty(p.nk * (2 + nR), dtype=p.acc_dt, device=p.device)
    out = buf if route == ROUTE_RECOMPUTE else buf.clone()  # a stored pass 3 overwrites the K pass 2 reads later
    _run_force(p, args, out, sums, stats, consts, loss, scalars, nR, PROXY_NORM, route, J, W, scratch=True)
    keys = [("scale",) + p.key + ((route, J) if route == ROUTE_SPLIT else (route,)),
            ("sumsq",) + p.key + (PROXY_NORM, nR, route), ("force",) + p.key + (PROXY_NORM, nR, route, J)]
    if route == ROUTE_SPLIT:
        keys.append(("reduce",) + p.key + (J,))
    return sum(BEST_MS[k] for k in keys)


def _pass1(p: _Plan, args, buf, part) -> tuple:
    """Launch pass 1 on the route of this call; returns (route, J, W) for passes 2 and 3."""
    forced = FORCED.get("scale")
    if forced is not None:
        route = ROUTE_SPLIT if forced.SPLIT else (ROUTE_STORED if forced.STORED else ROUTE_RECOMPUTE)
        if route != ROUTE_RECOMPUTE and not p.stored_ok:
            raise ValueError(f"forced stored route, but K ({gram_floats(p.G, p.U, p.P)} floats) does not fit in a "
                             f"row's output ({p.G}x{p.S}), or DRIFT_TRITON_STORED=0")
        J, W = 1, p.S
        if route == ROUTE_SPLIT and p.multi:
            raise ValueError("forced split route, but a multi-key launch runs the recompute or stored route")
        if route == ROUTE_SPLIT:
            J, W = (split_blocks(p.G, p.U, p.P, p.S, p.B, 0, J=int(FORCED["split"])) if "split" in FORCED
                    else p.split)
            if J < 2:
                raise ValueError(f"forced split route, but {p.G}x{p.S} rows do not split into >= 2 blocks that "
                                 f"hold K (blocks are multiples of {SPLIT_ALIGN} columns)")
        reduce_cfg = FORCED.get("reduce") or candidates("reduce", p.G, p.U, p.P, p.S)[0]
        _launch_pass1(p, args, buf, part, route, (forced, reduce_cfg), J, W)
        return route, J, W
    cached = p.cfg.get("pass1")
    if cached is not None:
        route, cfgs = cached
        J, W = p.split if route == ROUTE_SPLIT else (1, p.S)
        _launch_pass1(p, args, buf, part, route, cfgs, J, W)
        return route, J, W
    if p.key not in ROUTES:
        choose_route(p, lambda route: _measure_route(p, args, buf, part, route))
    route = ROUTES[p.key]
    offered = routes_offered(p)
    if route not in offered:  # decided for other rows of the same key (split where these rows do not split)
        route = offered[-1] if route > offered[-1] else ROUTE_RECOMPUTE
    try:
        cfgs = _run_pass1(p, args, buf, part, route)
    except RuntimeError:
        if route == ROUTE_RECOMPUTE:
            raise
        route = ROUTES[p.key] = ROUTE_RECOMPUTE  # no configuration of the stored pass 1 compiles: recompute
        cfgs = _run_pass1(p, args, buf, part, route)
    p.cfg["pass1"] = (route, cfgs)
    J, W = p.split if route == ROUTE_SPLIT else (1, p.S)
    return route, J, W


def _pass23(p: _Plan, kernel: str, extra: tuple, run: Callable[[int], Config], launch: Callable[[Config], None],
            route: int) -> Config:
    """Launch pass 2 or 3 on the route of the latest pass 1 with this plan; returns the config that ran. A
    stored pass without a config that compiles falls back to the recompute kernel, which does not read the
    buffer (always correct)."""
    forced = FORCED.get(kernel)
    if forced is not None:
        if forced.STORED and route == ROUTE_RECOMPUTE:
            raise ValueError(f"forced stored {kernel} config, but pass 1 did not run the stored route")
        launch(forced)
        return forced
    ck = (kernel,) + extra + (route,)
    cfg = p.cfg.get(ck)
    if cfg is not None:
        launch(cfg)
        return cfg
    try:
        cfg = run(route)
    except RuntimeError:
        if route == ROUTE_RECOMPUTE:
            raise
        cfg = run(ROUTE_RECOMPUTE)
    p.cfg[ck] = cfg
    return cfg


# ---------------------------------------------------------------------------------------------------
# The three passes (drift/field/three_pass.py strings them together)
# ---------------------------------------------------------------------------------------------------

def run_pass1(p: _Plan, args) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 with plan p on the kernel arguments args: (per-key fp64 scale sums, buf [B, G, S] flat)."""
    buf = torch.empty((p.B, p.G, p.S), dtype=p.acc_dt, device=p.device)
    part = torch.empty((p.B, 2), dtype=torch.float64, device=p.device)
    p.route = _pass1(p, args, buf, part)
    return _row_sums(p, part), buf


def run_pass2(p: _Plan, args, buf, sums, temperatures, normalization) -> torch.Tensor:
    """Pass 2 with plan p: per-key fp64 [sum of ||force_R||^2 for each R, rows * G * S]."""
    route, _, W = p.route or (ROUTE_RECOMPUTE, 1, p.S)
    nR = len(temperatures)
    norm = NORM_CODES[normalization]
    consts = _consts(temperatures, p.S, p.device, p.acc_dt)
    part = torch.empty((p.B, nR + 1), dtype=torch.float64, device=p.device)
    _pass23(p, "sumsq", (norm, nR),
            lambda rt: _run_sumsq(p, args, buf, sums, consts, part, nR, norm, rt, W),
            lambda c: _launch_sumsq(p, args, buf, sums, consts, part, nR, norm, W, c), route)
    return _row_sums(p, part)


def run_pass3(p: _Plan, args, buf, sums, stats, temperatures, normalization) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pass 3 with plan p: writes the force into buf and returns (loss [B] flat, scalars [nk, 2 + nR])."""
    route, J, W = p.route or (ROUTE_RECOMPUTE, 1, p.S)
    nR = len(temperatures)
    norm = NORM_CODES[normalization]
    consts = _consts(temperatures, p.S, p.device, p.acc_dt)
    loss = torch.empty(p.B * J, dtype=p.acc_dt, device=p.device)
    scalars = torch.empty((p.nk, 2 + nR), dtype=p.acc_dt, device=p.device)
    cfg = _pass23(p, "force", (norm, nR, J),
                  lambda rt: _run_force(p, args, buf, sums, stats, consts, loss, scalars, nR, norm, rt, J, W),
                  lambda c: _launch_force(p, args, buf, sums, stats, consts, loss, scalars, nR, norm, J, W, c), route)
    if J > 1:  # one partial per (row, block) on the split route, unless pass 3 fell back to recompute
        loss = loss.view(p.B, J).sum(1) if cfg.STORED else loss[:p.B]
    return loss, scalars


def field_scale_sums(gen, pos, neg=None, neg_weight=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: ([sum_{b,i,m} dist*tw, G * sum_{b,m} tw] in fp64, buf [*batch, G, S] in the compute dtype).

    buf becomes the force in pass 3; on the stored routes it carries the rows' Gram matrices until then."""
    p = _plan(gen, pos, neg, neg_weight)
    sums, buf = run_pass1(p, p.args(gen, pos, neg, neg_weight))
    return sums, buf.view(p.batch + (p.G, p.S))


def field_sumsq(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization) -> torch.Tensor:
    """Pass 2: [sum over rows of ||force_R||^2 (scaled coordinates) for each R, B * G * S] in fp64, given the
    global fp64 scale sums of pass 1."""
    p = _plan(gen, pos, neg, neg_weight)
    return run_pass2(p, p.args(gen, pos, neg, neg_weight), buf, sums, temperatures, normalization)


def field_force(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization):
    """Pass 3: writes the force into buf (in place) and returns (loss [*batch], scalars [2 + nR]) with
    scalars = [scale, scale_inputs, force_rms...], from the global fp64 sums of passes 1 and 2."""
    p = _plan(gen, pos, neg, neg_weight)
    loss, scalars = run_pass3(p, p.args(gen, pos, neg, neg_weight), buf, sums, stats, temperatures, normalization)
    return loss.view(p.batch), scalars.view(-1)


def route_of(gen, pos, neg=None, neg_weight=None) -> Optional[str]:
    """"recompute", "stored" or "split": the route that calls with inputs like these take, once one ran."""
    p = _plan(gen, pos, neg, neg_weight)
    cached = p.cfg.get("pass1")
    if cached is not None:
        return ROUTE_NAMES[cached[0]]
    route = ROUTES.get(p.key)
    return None if route is None else ROUTE_NAMES[route]


PLAN_CACHES = [_PLANS]  # every cache of plans (field_multi.py adds its call plans), cleared by reset_tuning


def reset_tuning() -> None:
    """Forget tuned configurations, routes and launch plans (tests; a later call tunes again)."""
    reset()
    for cache in PLAN_CACHES:
        cache.clear()
