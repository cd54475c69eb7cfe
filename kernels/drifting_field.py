"""Fused drifting field in Triton: three per-row passes, no [B, G, M] tensor in global memory.

The math is SPEC §3.1 (oracle: drift.field.drifting_field_reference; this package may not import it).
One program handles one row b (one class x location problem) and keeps its G x M tile on chip:

  pass 1  _field_scale_kernel:  D = X T^T over S chunks -> dist -> sum_{i,m} dist * tw      -> [B]
  pass 2  _field_sumsq_kernel:  dist tile once; for each R: affinities (two-axis softmax), coefficients
          c' = [-A- * sum A+, A+ * sum A-] with c'_ii -= rowsum; ||c' T||^2 over S chunks    -> [B, nR]
  pass 3  _field_force_kernel:  dist tile; C = sum_R c'_R / (rms_R * scale_inputs);
          force = C T (one GEMM over S chunks), stored once; loss = mean force^2           -> [B,G,S], [B]

Between passes the host side (drift._field_ops.three_pass) reduces the per-row partials and, when
distributed, all-reduces them, so every rank uses the global scale and the global per-R RMS.

Memory traffic per row: pass 1 reads the M x S targets once, pass 2 reads them 1 + nR times (the
force norms stream T again for every R instead of holding nR coefficient tiles in registers),
pass 3 reads them twice and writes G x S. Extra global memory: B + B*nR + B floats plus the output.

Accuracy. Each S chunk of the targets is centred on its mean over the M targets before use: distances
are translation invariant and the coefficients of a row sum to zero, so this changes nothing in exact
arithmetic but removes the cancellation of |x|^2 + |t|^2 - 2 x.t for features with a large common
offset. GEMMs run with input_precision="ieee" under the interpreter and "tf32x3" on GPU (3xTF32: about
fp32 accuracy, error ~2^-21 relative per product); tests bound the distance error against fp64.

Inputs: [*batch, n, S] in fp32/bf16/fp16 (computed in fp32) or fp64 (computed in fp64), any strides;
one or two batch dims are read in place (more are merged, a view where strides allow).

Registration: torch.library.custom_op ops `drift::triton_field_scale_sums|sumsq|force` with fake
kernels, so torch.compile(fullgraph=True) traces a function calling them (also under the interpreter,
where triton_op cannot be traced).
"""
from __future__ import annotations

import math
import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tf32x3 (3 TF32 products per fp32 product) keeps fp32-level accuracy on tensor cores; the interpreter
# multiplies in numpy and takes only "ieee".
DOT_PRECISION = "ieee" if INTERPRETED else "tf32x3"

NORM_CODES = {"xy": 0, "y": 1, "none": 2}

# Official constants (drift/field.py holds the same numbers; kernels/ may not import drift/).
DIST_EPS = 1e-8
SCALE_EPS = 1e-3
SELF_MASK = 100.0
AFFINITY_EPS = 1e-6
_NEG_BIG = -1.0e30  # finite "minus infinity" for padded lanes, so max/exp never produce NaN


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _targets_chunk(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                   offs_m, offs_s, G, U, M, S, HAS_NEG: tl.constexpr, ACC: tl.constexpr):
    """[BM, BS] tile of targets = [gen, neg, pos] at rows offs_m, columns offs_s (0 outside)."""
    m = offs_m[:, None]
    s = offs_s[None, :]
    in_s = s < S
    t = tl.load(gen_row + m * sg_n + s * sg_s, mask=(m < G) & in_s, other=0.0).to(ACC)
    if HAS_NEG:
        t += tl.load(neg_row + (m - G) * sn_n + s * sn_s, mask=(m >= G) & (m < G + U) & in_s, other=0.0).to(ACC)
    t += tl.load(pos_row + (m - G - U) * sp_n + s * sp_s, mask=(m >= G + U) & (m < M) & in_s, other=0.0).to(ACC)
    return t


@triton.jit
def _centred_chunks(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                    offs_g, offs_m, offs_s, G, U, M, S, HAS_NEG: tl.constexpr, ACC: tl.constexpr):
    """(x [BG, BS], t [BM, BS]) for one S chunk, both centred on the chunk's mean over the M targets."""
    t = _targets_chunk(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                       offs_m, offs_s, G, U, M, S, HAS_NEG, ACC)
    mu = tl.sum(t, axis=0) / M  # padded rows are 0, so this is the mean over the M real targets
    t = tl.where(offs_m[:, None] < M, t - mu[None, :], 0.0)
    x = tl.load(gen_row + offs_g[:, None] * sg_n + offs_s[None, :] * sg_s,
                mask=(offs_g[:, None] < G) & (offs_s[None, :] < S), other=0.0).to(ACC)
    x = tl.where(offs_g[:, None] < G, x - mu[None, :], 0.0)
    return x, t


@triton.jit
def _dist_tile(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s, G, U, M, S,
               HAS_NEG: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr, BM: tl.constexpr,
               BS: tl.constexpr, PREC: tl.constexpr):
    """dist [BG, BM] = sqrt(max(|x_i|^2 + |t_m|^2 - 2 x_i.t_m, 1e-8)) on centred coordinates."""
    offs_g = tl.arange(0, BG)
    offs_m = tl.arange(0, BM)
    dot = tl.zeros((BG, BM), dtype=ACC)
    nx = tl.zeros((BG,), dtype=ACC)
    nt = tl.zeros((BM,), dtype=ACC)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        x, t = _centred_chunks(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                               offs_g, offs_m, offs_s, G, U, M, S, HAS_NEG, ACC)
        dot += tl.dot(x, tl.trans(t), input_precision=PREC, out_dtype=ACC)
        nx += tl.sum(x * x, axis=1)
        nt += tl.sum(t * t, axis=1)
    # Norms of the generated rows from the GEMM's diagonal, so self-distances are exactly 0 before the
    # floor instead of sqrt of the rounding difference between tl.sum and tl.dot.
    diag = offs_g[:, None] == offs_m[None, :]
    dd = tl.where(diag, dot, 0.0)
    nx = tl.where(offs_g < G, tl.sum(dd, axis=1), nx)
    nt = tl.where(offs_m < G, tl.sum(dd, axis=0), nt)
    d2 = nx[:, None] + nt[None, :] - 2.0 * dot
    return tl.sqrt(tl.maximum(d2, 1e-8))


@triton.jit
def _target_weights(w_row, sw_u, G, U, M, HAS_NEG: tl.constexpr, ACC: tl.constexpr, HAS_W: tl.constexpr,
                    BM: tl.constexpr):
    """tw [BM]: 1 for gen and pos, neg_weight for neg, 0 for padding."""
    offs_m = tl.arange(0, BM)
    tw = tl.where(offs_m < M, 1.0, 0.0).to(ACC)
    if HAS_NEG:
        if HAS_W:
            is_n = (offs_m >= G) & (offs_m < G + U)
            w = tl.load(w_row + (offs_m - G) * sw_u, mask=is_n, other=0.0).to(ACC)
            tw = tl.where(is_n, w, tw)
    return tw


@triton.jit
def _coefficients(dist, tw, inv_sr, mask_r, G, U, M, NORM: tl.constexpr, BG: tl.constexpr, BM: tl.constexpr):
    """c' [BG, BM] for one temperature: logits -dist/(scale R) with the self-mask, the normalization,
    weights after it, cross-weighting, and c'_ii -= rowsum(c) (so force_i = sum_m c'_im t_m)."""
    offs_g = tl.arange(0, BG)
    offs_m = tl.arange(0, BM)
    valid = (offs_g[:, None] < G) & (offs_m[None, :] < M)
    diag = offs_g[:, None] == offs_m[None, :]
    logits = -dist * inv_sr
    logits = tl.where(diag, logits - mask_r, logits)
    logits = tl.where(valid, logits, -1.0e30)
    if NORM == 2:
        a = tl.exp(logits)
    else:
        rmax = tl.max(logits, axis=1)
        er = tl.where(valid, tl.exp(logits - rmax[:, None]), 0.0)
        rsum = tl.sum(er, axis=1)
        rsum = tl.where(rsum > 0, rsum, 1.0)
        a = er / rsum[:, None]
        if NORM == 0:
            cmax = tl.max(logits, axis=0)
            ec = tl.where(valid, tl.exp(logits - cmax[None, :]), 0.0)
            csum = tl.sum(ec, axis=0)
            csum = tl.where(csum > 0, csum, 1.0)
            a = tl.sqrt(tl.maximum(a * (ec / csum[None, :]), 1e-6))
    a = tl.where(valid, a * tw[None, :], 0.0)
    is_neg = offs_m[None, :] < G + U
    sneg = tl.sum(tl.where(is_neg, a, 0.0), axis=1)
    spos = tl.sum(tl.where(is_neg, 0.0, a), axis=1)
    c = tl.where(is_neg, -a * spos[:, None], a * sneg[:, None])
    rowsum = tl.sum(c, axis=1)
    return tl.where(diag, c - rowsum[:, None], c)


@triton.jit
def _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2, sn_b1, sn_b2, sp_b1, sp_b2,
               sw_b1, sw_b2):
    b1 = pid // B2
    b2 = pid % B2
    b1 = b1.to(tl.int64)
    b2 = b2.to(tl.int64)
    return (gen_ptr + b1 * sg_b1 + b2 * sg_b2, neg_ptr + b1 * sn_b1 + b2 * sn_b2,
            pos_ptr + b1 * sp_b1 + b2 * sp_b2, w_ptr + b1 * sw_b1 + b2 * sw_b2)


# ---------------------------------------------------------------------------------------------------
# Kernels (one program per row)
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _field_scale_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, out_ptr, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BG: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    M = G + U + P
    gen_row, neg_row, pos_row, w_row = _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                  sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    dist = _dist_tile(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s, G, U, M, S,
                      HAS_NEG, ACC, BG, BM, BS, PREC)
    tw = _target_weights(w_row, sw_u, G, U, M, HAS_NEG, ACC, HAS_W, BM)
    offs_g = tl.arange(0, BG)
    wd = tl.where(offs_g[:, None] < G, dist * tw[None, :], 0.0)
    tl.store(out_ptr + pid, tl.sum(tl.sum(wd, axis=1), axis=0))


@triton.jit
def _field_sumsq_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, scale_ptr, rinv_ptr, out_ptr, inv_sqrt_s,
                        NR, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        NORM: tl.constexpr, HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BG: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    M = G + U + P
    gen_row, neg_row, pos_row, w_row = _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                  sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    dist = _dist_tile(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s, G, U, M, S,
                      HAS_NEG, ACC, BG, BM, BS, PREC)
    tw = _target_weights(w_row, sw_u, G, U, M, HAS_NEG, ACC, HAS_W, BM)
    scale = tl.load(scale_ptr).to(ACC)
    sc = tl.maximum(scale, 1e-3)
    si = tl.maximum(scale * inv_sqrt_s, 1e-3)
    offs_g = tl.arange(0, BG)
    offs_m = tl.arange(0, BM)
    for r in range(NR):
        rinv = tl.load(rinv_ptr + r).to(ACC)
        c = _coefficients(dist, tw, rinv / sc, 100.0 * rinv, G, U, M, NORM, BG, BM)
        ss = tl.zeros((BG,), dtype=ACC)
        for s0 in range(0, S, BS):
            offs_s = s0 + tl.arange(0, BS)
            x, t = _centred_chunks(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                                   offs_g, offs_m, offs_s, G, U, M, S, HAS_NEG, ACC)
            f = tl.dot(c, t, input_precision=PREC, out_dtype=ACC)
            ss += tl.sum(f * f, axis=1)
        tl.store(out_ptr + pid * NR + r, tl.sum(ss, axis=0) / (si * si))


@triton.jit
def _field_force_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, scale_ptr, rinv_ptr, rms_ptr, force_ptr, loss_ptr,
                        inv_sqrt_s, NR, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        NORM: tl.constexpr, HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BG: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    M = G + U + P
    gen_row, neg_row, pos_row, w_row = _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                  sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    dist = _dist_tile(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s, G, U, M, S,
                      HAS_NEG, ACC, BG, BM, BS, PREC)
    tw = _target_weights(w_row, sw_u, G, U, M, HAS_NEG, ACC, HAS_W, BM)
    scale = tl.load(scale_ptr).to(ACC)
    sc = tl.maximum(scale, 1e-3)
    si = tl.maximum(scale * inv_sqrt_s, 1e-3)
    ctot = tl.zeros((BG, BM), dtype=ACC)
    for r in range(NR):
        rinv = tl.load(rinv_ptr + r).to(ACC)
        rms = tl.load(rms_ptr + r).to(ACC)
        c = _coefficients(dist, tw, rinv / sc, 100.0 * rinv, G, U, M, NORM, BG, BM)
        ctot += c / (rms * si)
    offs_g = tl.arange(0, BG)
    offs_m = tl.arange(0, BM)
    out_row = force_ptr + pid.to(tl.int64) * G * S
    ss = tl.zeros((BG,), dtype=ACC)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        x, t = _centred_chunks(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                               offs_g, offs_m, offs_s, G, U, M, S, HAS_NEG, ACC)
        f = tl.dot(ctot, t, input_precision=PREC, out_dtype=ACC)
        ss += tl.sum(f * f, axis=1)
        tl.store(out_row + offs_g[:, None] * S + offs_s[None, :], f,
                 mask=(offs_g[:, None] < G) & (offs_s[None, :] < S))
    tl.store(loss_ptr + pid, tl.sum(ss, axis=0) / (G * S))


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

class _Rows(NamedTuple):
    """The inputs viewed with exactly two batch dims, plus the launch geometry."""

    gen: torch.Tensor
    pos: torch.Tensor
    neg: Optional[torch.Tensor]
    w: Optional[torch.Tensor]
    batch: Tuple[int, ...]
    B: int
    B2: int
    G: int
    U: int
    P: int
    S: int


def _two_batch_dims(t: torch.Tensor, tail: int) -> torch.Tensor:
    """[*batch, *tail] -> [B1, B2, *tail]: free for one or two batch dims, a view when strides allow."""
    nb = t.dim() - tail
    if nb == 1:
        return t.unsqueeze(0)
    if nb == 2:
        return t
    return t.reshape(-1, *t.shape[nb - 1:])


def _rows(gen, pos, neg, neg_weight) -> _Rows:
    batch = tuple(gen.shape[:-2])
    G, S = gen.shape[-2], gen.shape[-1]
    g4 = _two_batch_dims(gen, 2)
    p4 = _two_batch_dims(pos, 2)
    n4 = _two_batch_dims(neg, 2) if neg is not None and neg.shape[-2] > 0 else None
    w3 = _two_batch_dims(neg_weight, 1) if (n4 is not None and neg_weight is not None) else None
    U = n4.shape[-2] if n4 is not None else 0
    B = g4.shape[0] * g4.shape[1]
    return _Rows(g4, p4, n4, w3, batch, B, g4.shape[1], G, U, pos.shape[-2], S)


def _acc(gen: torch.Tensor):
    """(triton compute dtype, torch compute dtype, GEMM input precision) for these inputs."""
    if gen.dtype == torch.float64:
        return tl.float64, torch.float64, "ieee"  # fp64 tiles have no tensor-core split
    return tl.float32, torch.float32, DOT_PRECISION


# Software pipelining multiplies the on-chip buffers of the S loops; with [BG, BM] tiles resident the default
# (3 stages) needs ~288 KiB of shared memory at G=64, M=144, over an H100/H200's 227 KiB. One stage fits.
NUM_STAGES = 1


def _launch_config(G: int, M: int, S: int):
    BG = max(16, triton.next_power_of_2(G))
    BM = max(16, triton.next_power_of_2(M))
    # Keep the [BM, BS] target chunk and the [BG, BS] force chunk near 8K elements each.
    BS = max(16, min(64, triton.next_power_of_2(S), 8192 // BM))
    num_warps = 8 if BG * BM >= 8192 else 4
    return BG, BM, BS, num_warps


def _common_args(r: _Rows):
    g, p = r.gen, r.pos
    n = r.neg if r.neg is not None else g
    w = r.w if r.w is not None else g
    sn = n.stride() if r.neg is not None else (0, 0, 0, 0)
    sw = w.stride() if r.w is not None else (0, 0, 0)
    strides = (g.stride(0), g.stride(1), g.stride(2), g.stride(3),
               sn[0], sn[1], sn[2], sn[3],
               p.stride(0), p.stride(1), p.stride(2), p.stride(3),
               sw[0], sw[1], sw[2])
    return (g, n, p, w), strides


def _check_device(*ts):
    for t in ts:
        if t is not None and t.device.type != "cuda" and not INTERPRETED:
            raise ValueError(f"the Triton drifting-field kernels need CUDA tensors (got {t.device}); "
                             "set TRITON_INTERPRET=1 before importing triton to run them on CPU")


def field_scale_sums(gen, pos, neg=None, neg_weight=None) -> torch.Tensor:
    """Pass 1: [sum_{b,i,m} dist*tw, G * sum_{b,m} tw] in fp64 (rounded after the cross-rank reduction)."""
    _check_device(gen, pos, neg, neg_weight)
    r = _rows(gen, pos, neg, neg_weight)
    ACC, acc_dt, prec = _acc(gen)
    BG, BM, BS, nw = _launch_config(r.G, r.G + r.U + r.P, r.S)
    part = torch.empty(r.B, dtype=acc_dt, device=gen.device)
    ptrs, strides = _common_args(r)
    _field_scale_kernel[(r.B,)](*ptrs, part, r.B2, r.G, r.U, r.P, r.S, *strides,
                                HAS_NEG=r.neg is not None, HAS_W=r.w is not None, ACC=ACC,
                                BG=BG, BM=BM, BS=BS, PREC=prec, num_warps=nw, num_stages=NUM_STAGES)
    wsum = torch.full((), float(r.B * (r.G + r.P)), dtype=torch.float64, device=gen.device)
    if r.neg is not None:
        wsum = wsum + (r.w.sum(dtype=torch.float64) if r.w is not None else float(r.B * r.U))
    return torch.stack([part.sum(dtype=torch.float64), wsum * r.G])


_RINV_CACHE: dict = {}


def _rinv(temperatures, device, dt):
    """1/R on the device, cached: building it per call would be a blocking host-to-device copy."""
    key = (tuple(float(t) for t in temperatures), str(device), dt)
    out = _RINV_CACHE.get(key)
    if out is None:
        out = torch.tensor([1.0 / t for t in key[0]], dtype=dt, device=device)
        _RINV_CACHE[key] = out
    return out


def field_sumsq(gen, pos, neg, neg_weight, scale, temperatures, normalization) -> torch.Tensor:
    """Pass 2: sum over rows of ||force_R||^2 (scaled coordinates), one fp64 value per temperature."""
    _check_device(gen, pos, neg, neg_weight)
    r = _rows(gen, pos, neg, neg_weight)
    ACC, acc_dt, prec = _acc(gen)
    BG, BM, BS, nw = _launch_config(r.G, r.G + r.U + r.P, r.S)
    nR = len(temperatures)
    part = torch.empty(r.B, nR, dtype=acc_dt, device=gen.device)
    ptrs, strides = _common_args(r)
    _field_sumsq_kernel[(r.B,)](*ptrs, scale.to(acc_dt).reshape(1), _rinv(temperatures, gen.device, acc_dt), part,
                                1.0 / math.sqrt(r.S), nR, r.B2, r.G, r.U, r.P, r.S, *strides,
                                NORM=NORM_CODES[normalization], HAS_NEG=r.neg is not None, HAS_W=r.w is not None,
                                ACC=ACC, BG=BG, BM=BM, BS=BS, PREC=prec, num_warps=nw, num_stages=NUM_STAGES)
    return part.sum(0, dtype=torch.float64)


def field_force(gen, pos, neg, neg_weight, scale, rms, temperatures, normalization):
    """Pass 3: (force [*batch, G, S], loss [*batch]) given the global scale and per-R RMS."""
    _check_device(gen, pos, neg, neg_weight)
    r = _rows(gen, pos, neg, neg_weight)
    ACC, acc_dt, prec = _acc(gen)
    BG, BM, BS, nw = _launch_config(r.G, r.G + r.U + r.P, r.S)
    nR = len(temperatures)
    force = torch.empty(r.B, r.G, r.S, dtype=acc_dt, device=gen.device)
    loss = torch.empty(r.B, dtype=acc_dt, device=gen.device)
    ptrs, strides = _common_args(r)
    _field_force_kernel[(r.B,)](*ptrs, scale.to(acc_dt).reshape(1), _rinv(temperatures, gen.device, acc_dt),
                                rms.to(acc_dt).contiguous(), force, loss, 1.0 / math.sqrt(r.S),
                                nR, r.B2, r.G, r.U, r.P, r.S, *strides,
                                NORM=NORM_CODES[normalization], HAS_NEG=r.neg is not None, HAS_W=r.w is not None,
                                ACC=ACC, BG=BG, BM=BM, BS=BS, PREC=prec, num_warps=nw, num_stages=NUM_STAGES)
    return force.reshape(*r.batch, r.G, r.S), loss.reshape(r.batch)


# ---------------------------------------------------------------------------------------------------
# Custom-op registration (torch.compile traces these through their fake kernels)
# ---------------------------------------------------------------------------------------------------

def _acc_dtype(gen: torch.Tensor) -> torch.dtype:
    return torch.float64 if gen.dtype == torch.float64 else torch.float32


@torch.library.custom_op("drift::triton_field_scale_sums", mutates_args=())
def triton_field_scale_sums(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                            neg_weight: Optional[torch.Tensor]) -> torch.Tensor:
    return field_scale_sums(gen, pos, neg, neg_weight)


@triton_field_scale_sums.register_fake
def _(gen, pos, neg, neg_weight):
    return gen.new_empty((2,), dtype=torch.float64)


@torch.library.custom_op("drift::triton_field_sumsq", mutates_args=())
def triton_field_sumsq(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                       neg_weight: Optional[torch.Tensor], scale: torch.Tensor, temperatures: List[float],
                       normalization: str) -> torch.Tensor:
    return field_sumsq(gen, pos, neg, neg_weight, scale, temperatures, normalization)


@triton_field_sumsq.register_fake
def _(gen, pos, neg, neg_weight, scale, temperatures, normalization):
    return gen.new_empty((len(temperatures),), dtype=torch.float64)


@torch.library.custom_op("drift::triton_field_force", mutates_args=())
def triton_field_force(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                       neg_weight: Optional[torch.Tensor], scale: torch.Tensor, rms: torch.Tensor,
                       temperatures: List[float], normalization: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return field_force(gen, pos, neg, neg_weight, scale, rms, temperatures, normalization)


@triton_field_force.register_fake
def _(gen, pos, neg, neg_weight, scale, rms, temperatures, normalization):
    dt = _acc_dtype(gen)
    return gen.new_empty(gen.shape, dtype=dt), gen.new_empty(gen.shape[:-2], dtype=dt)


class FieldOps(NamedTuple):
    name: str
    scale_sums: object
    sumsq: object
    force: object
    carries_dot: bool = False  # the Gram block is recomputed on chip in every pass, never stored


def field_ops() -> FieldOps:
    """The three pass ops, in the order and signatures drift._field_ops.three_pass expects."""
    return FieldOps("triton", torch.ops.drift.triton_field_scale_sums, torch.ops.drift.triton_field_sumsq,
                    torch.ops.drift.triton_field_force)
