"""Fused drifting field in Triton: three per-row passes, no [B, G, M] tensor in global memory.

The math is SPEC §3.1 (oracle: drift.field.drifting_field_reference; this package may not import it).
One program handles one row b (one class x location problem) and keeps its G x M tiles on chip. The
targets are never concatenated: they stay three blocks, gen X [G, S], neg N [U, S] and pos Y [P, S],
each padded on its own to a power of two (>= 16 for tl.dot). At the SPEC shape (G, U, P) = (64, 16, 64)
that is M = 144 columns with no padding, where one [G, next_pow2(M)] = [64, 256] tile wasted 44%.

Three routes through the three passes; the tuner picks one per shape (see "Launch configuration"):

recompute route (every S, the only one where K does not fit, see stored route):
  pass 1  _field_scale_kernel:  dots X X^T, X N^T, X Y^T over S chunks -> dist -> sum dist * tw   -> [B, 2]
  pass 2  _field_sumsq_kernel:  per-R coefficient blocks c = [c_g, c_n, c_p] from one dist tile, and
          ||c T||^2 for every R, one of two ways (constexpr ROUTE, picked by the autotuner):
            0 stream: for each R, stream T over S again: f = c_g X + c_n N + c_p Y, sum f^2      (1+nR reads)
            1 Gram:   one S sweep builds the target Gram blocks K = T T^T (six [<=64, <=64] blocks),
                      then ||c T||^2 = sum_i c_i K c_i^T, with no S in the per-R work              (1 read)
  pass 3  _field_force_kernel:  dist tile; C = sum_R c_R / (rms_R * scale_inputs); force = C T over S
          chunks, stored once; loss = mean force^2                                            -> [B,G,S], [B]

stored route (STORED, wherever a row's K fits in its [G, S] force output: KN = G*M + U^2 + U*P + P^2 <= G*S,
i.e. S >= 228 at the SPEC row shape):
  pass 1  one S sweep forms all of K = T T^T (T = [X; N; Y], centred as below) and writes its six blocks on
          and above the diagonal into the row's force output buffer; the distances come from K itself
          (d[g, m] = sqrt(max(K_gg + K_mm - 2 K_gm, 1e-8)), gen being part of T) -> scale sums      (1 read)
  pass 2  (ROUTE 2) reads K back: distances, then for each R the coefficients and ||c T||^2 = sum c K c^T;
          no S work (except the accuracy guard below)                                          (0 reads)
  pass 3  reads the distances' blocks of K, then force = C T over S, written over K            (1 read)
The buffer is the output that the recompute route allocates anyway, so the route costs no memory; pass 3
reads the whole of a row's K into registers before a barrier and only then overwrites it, and each row is
one program, so no program reads what another writes. Accuracy guard: the Gram estimate's rounding error
grows with spread = sum c_im^2 K_mm while ||c T||^2 may be much smaller (a force small next to the targets'
spread); a row and temperature whose estimate fails eps_K * spread <= GRAM_RTOL * ||c T||^2 is streamed
over S instead, inside the same program (random and data-like inputs never get near it; see GRAM_RTOL).

split stored route (SPLIT, offered where the rows are fewer than the SMs, e.g. B = 8, and a row's columns
hold >= 2 copies of K): one program per row leaves most SMs idle, so passes 1 and 3 run per (row, column
block), J blocks of W columns (multiples of 128, the last one up to 2W wide, split_blocks):
  pass 1a _field_gram_part_kernel: program (b, j) forms K over its block's columns and stores it in its block
  pass 1b _field_gram_reduce_kernel: program b adds the J partial K (in block order: deterministic), writes the
          total into every block, and stores the scale sums from it
  pass 2  as on the stored route (reads block 0)
  pass 3  program (b, j) reads the copy of K in its block, and overwrites only that block with the force;
          the loss comes back as J partials per row, summed on the host
Again no program reads what another one writes, and no memory is needed beyond the output.

Between passes the host side (drift._field_ops.three_pass) reduces the per-row fp64 partials ([B, 2] and
[B, nR + 1], the last column the count G*S) with one sum each and, when distributed, all-reduces them; the
kernels of passes 2 and 3 read these global fp64 sums and form scale, scale_inputs and the per-R RMS
themselves (rounding the fp64 quotients once, as the host did), and pass 3 writes [scale, scale_inputs,
force_rms...] for the result. So a call is 3 kernels (4 split), 2 small reductions (3 split) and 5
allocations on the host.

Coefficients. A row's coefficients sum to zero exactly: sum_m c = -sum(A-) sum(A+) + sum(A+) sum(A-).
So force_R = c T - (sum_m c) x = c T, and the `- rowsum * gen` term of the reference is left out (it is
rounding noise there). Softmaxes use the per-row / per-column maxima; padded rows and columns hold a
finite -1e30 logit, so they add exact zeros to every real row's and column's sums and are zeroed at the end.

Work and traffic per row (M = G+U+P, KN as above, nR temperatures; every GEMM is 3 TF32 tensor-core products):
  recompute: pass 1 G*M*S MACs, reads T once; pass 2 stream (1+nR)*G*M*S MACs, reads T 1+nR times, or
  Gram KN*S + nR*G*M^2 MACs, reads T once; pass 3 2*G*M*S MACs, reads T twice, writes G*S.
  stored: pass 1 KN*S MACs, reads T once, writes KN; pass 2 ~nR*G*KN MACs, reads KN; pass 3 G*M*S MACs,
  reads KN and T once, writes G*S. At the SPEC shape (KN = 1.58 G*M), in units of G*M*S (route_macs):
  recompute 6.3 / 5.3 / 4.7 against stored 3.8 / 3.1 / 2.7 at S = 256 / 640 / 4096. Extra global memory:
  2B + (nR+1)B fp64 partials plus the output, on either route.
Registers and shared memory (ptxas, sm_90, 8 warps): ~220-255 registers per thread and no spills in the
streaming kernels at BS 16-32; the Gram kernels (pass 2, ROUTE 1 and 2) keep the six blocks in shared
memory (~190 KB); the stored route's passes 1 and 3 spill 0-150 B at their default configurations (see
_STORED_CANDIDATES).

Accuracy. Every S chunk is translated by the row's first generated sample x_0 before use: distances are
translation invariant and the coefficients sum to zero, so this changes nothing in exact arithmetic but
removes the cancellation of |x|^2 + |t|^2 - 2 x.t for features with a large common offset (on the stored
route K is the Gram matrix of the translated targets, so its distances are the recompute route's). GEMMs are
3xTF32 on GPU (_mma: split each fp32 operand into a TF32 head and tail, keep three of the four products:
~2^-20 relative error per product, near fp32's 2^-24; plain TF32's 2^-11 would miss the fp64 tests' bound
by orders of magnitude) and exact fp32 dots on the same split under the interpreter.

Launch configuration. The route, and per kernel the S chunk BS, num_warps, num_stages and (pass 2) GRAM,
are tuned on the GPU the first time a shape key is seen. The route first (_choose_route, where more than one
is offered): each route's kernels are tuned and timed at the default options (xy, three temperatures;
passes 2 and 3 of other options are tuned on their first call, within the chosen route), and the route with
the smallest sum of best times wins. Per kernel (_tuned_launch): every candidate is compiled, timed with CUDA
events, and the fastest kept; candidates that fail to compile or run out of shared memory are dropped, a
route whose pass has no candidate left loses, and a stored pass 2 or 3 with no candidate left falls back to
its recompute kernel (which does not read the buffer). Kernels only store (never accumulate), so re-running
them while tuning is harmless, except the stored pass 3 and the split route's reduction, which are timed on
a copy of the buffer. `tuning_log()` returns what was measured. DRIFT_TRITON_AUTOTUNE=0 turns tuning off
(split, else stored route where offered; first candidate), and the interpreter never tunes (nor splits, not
knowing an SM count, unless forced). DRIFT_TRITON_STORED=0 turns the stored routes off, DRIFT_TRITON_GRAM=0
pass 2's ROUTE 1.

Host side. A call's shape work (views, strides, block sizes, tuning key, chosen configs) is done once per
input signature (_Plan) and reused; the ops are called as plain functions in eager mode and as the
registered custom ops under torch.compile (field_ops).

Inputs: [*batch, n, S] in fp32/bf16/fp16 (computed in fp32) or fp64 (computed in fp64), any strides;
one or two batch dims are read in place (more are merged, a view where strides allow).

Registration: torch.library.custom_op ops `drift::triton_field_scale_sums|sumsq|force` with fake
kernels (force mutates pass 1's buffer), so torch.compile(fullgraph=True) traces a function calling them
(also under the interpreter, where triton_op cannot be traced).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# 3xTF32 (three TF32 products per fp32 product, see _mma) keeps fp32-level accuracy on tensor cores; the
# interpreter multiplies in numpy and takes only "ieee" dots, so it runs the same split on exact dots.
DOT_PRECISION = "split-ieee" if INTERPRETED else "split"
# Tuning needs CUDA events; the interpreter runs one fixed configuration.
AUTOTUNE = os.environ.get("DRIFT_TRITON_AUTOTUNE", "1") != "0" and not INTERPRETED
# DRIFT_TRITON_GRAM=0 keeps pass 2 of the recompute route on streaming. The Gram route's ||c T||^2 = sum c K c^T
# cancels where the force is small next to the targets' spread (gen close to the data): its rounding error
# grows with that ratio, while the streaming route forms the force itself, like the reference (the stored
# route guards against it per row, GRAM_RTOL).
GRAM_ROUTE = os.environ.get("DRIFT_TRITON_GRAM", "1") != "0"

NORM_CODES = {"xy": 0, "y": 1, "none": 2}

# Official constants (drift/field.py holds the same numbers; kernels/ may not import drift/). They appear
# as literals inside the kernels (DIST_EPS 1e-8, SCALE_EPS 1e-3, SELF_MASK 100, AFFINITY_EPS 1e-6, and
# _NEG_BIG for padded logits); these names document them. RMS_EPS reaches the kernels in the constants
# tensor (_consts), so that fp64 calls floor at the fp64 value, as torch.clamp did on the host.
DIST_EPS = 1e-8
SCALE_EPS = 1e-3
SELF_MASK = 100.0
AFFINITY_EPS = 1e-6
RMS_EPS = 1e-8
_NEG_BIG = -1.0e30  # finite "minus infinity" for padded lanes, so max/exp never produce NaN


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _split_tf32(x):
    """(hi, lo): hi = x rounded to TF32 (10 mantissa bits, ties away from zero), lo = x - hi (exact)."""
    bits = x.to(tl.uint32, bitcast=True)
    hi = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _mma(a, b, zero, PREC: tl.constexpr):
    """a @ b, with `zero` a zero tensor of the result's shape that is not a compile-time constant (`t * 0.0`).

    PREC "split": a_lo b_hi + a_hi b_lo + a_hi b_hi, three TF32 tensor-core products (the 3xTF32 scheme,
    ~2^-20 relative per product instead of TF32's 2^-11). "split-ieee": the same split on exact dots
    (interpreter coverage of the split). "ieee" / "tf32": one dot of that precision.

    Why not input_precision="tf32x3", and why `zero`: on Hopper, Triton gives a dot whose result flows into
    another dot (e.g. as its accumulator) a [num_warps, 1] warp layout and other dots [4, 2] (8 warps). The
    built-in tf32x3 chains its three products on one accumulator, so every call converted a [64, 64]
    accumulator through shared memory twice, i.e. per S chunk. Here the three products start from `zero`,
    which the compiler cannot fold (a constant zero would let it chain them again), and are added in
    registers, and callers add results instead of passing them on as accumulators: one layout, no conversion.
    """
    if PREC == "split":
        out = _split_dot(a, b, zero, "tf32")
    elif PREC == "split-ieee":
        out = _split_dot(a, b, zero, "ieee")
    else:  # a single dot: "ieee" (fp64 inputs), or "tf32" (tests compare against it)
        out = tl.dot(a, b, zero, input_precision=PREC, out_dtype=zero.dtype)
    return out


@triton.jit
def _split_dot(a, b, zero, INNER: tl.constexpr):
    """a_hi b_hi + (a_lo b_hi + a_hi b_lo), each product one dot with input_precision INNER (see _mma)."""
    a_hi, a_lo = _split_tf32(a)
    b_hi, b_lo = _split_tf32(b)
    d_lh = tl.dot(a_lo, b_hi, zero, input_precision=INNER, out_dtype=tl.float32)
    d_hl = tl.dot(a_hi, b_lo, zero, input_precision=INNER, out_dtype=tl.float32)
    d_hh = tl.dot(a_hi, b_hi, zero, input_precision=INNER, out_dtype=tl.float32)
    return d_hh + (d_lh + d_hl)


@triton.jit
def _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2, sn_b1, sn_b2, sp_b1, sp_b2,
               sw_b1, sw_b2):
    """Base pointers of row pid = b1 * B2 + b2 (64-bit offsets: B * n * S may exceed 2^31)."""
    b1 = (pid // B2).to(tl.int64)
    b2 = (pid % B2).to(tl.int64)
    return (gen_ptr + b1 * sg_b1 + b2 * sg_b2, neg_ptr + b1 * sn_b1 + b2 * sn_b2,
            pos_ptr + b1 * sp_b1 + b2 * sp_b2, w_ptr + b1 * sw_b1 + b2 * sw_b2)


@triton.jit
def _origin(gen_row, sg_s, offs_s, S, ACC: tl.constexpr):
    """x_0 [BS]: the row's first generated sample on this chunk, the translation applied to all targets."""
    return tl.load(gen_row + offs_s * sg_s, mask=offs_s < S, other=0.0).to(ACC)


@triton.jit
def _block(row_ptr, s_n, s_s, n, offs_r, offs_s, S, x0, ACC: tl.constexpr):
    """[BR, BS] chunk of one sample block minus x_0; rows >= n and columns >= S are exactly 0."""
    ok = (offs_r[:, None] < n) & (offs_s[None, :] < S)
    t = tl.load(row_ptr + offs_r[:, None] * s_n + offs_s[None, :] * s_s, mask=ok, other=0.0).to(ACC)
    return tl.where(ok, t - x0[None, :], 0.0)


@triton.jit
def _cross_dots(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s, G, U, P, S,
                HAS_NEG: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr, BU: tl.constexpr,
                BP: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """One S sweep: X X^T [BG, BG], X N^T [BG, BU], X Y^T [BG, BP] and the squared norms of N and Y."""
    offs_g = tl.arange(0, BG)
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    k_gg = tl.zeros((BG, BG), dtype=ACC)
    k_gn = tl.zeros((BG, BU), dtype=ACC)
    k_gp = tl.zeros((BG, BP), dtype=ACC)
    q_n = tl.zeros((BU,), dtype=ACC)
    q_p = tl.zeros((BP,), dtype=ACC)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        x0 = _origin(gen_row, sg_s, offs_s, S, ACC)
        x = _block(gen_row, sg_n, sg_s, G, offs_g, offs_s, S, x0, ACC)
        y = _block(pos_row, sp_n, sp_s, P, offs_p, offs_s, S, x0, ACC)
        k_gg += _mma(x, tl.trans(x), k_gg * 0.0, PREC)
        k_gp += _mma(x, tl.trans(y), k_gp * 0.0, PREC)
        q_p += tl.sum(y * y, axis=1)
        if HAS_NEG:
            n = _block(neg_row, sn_n, sn_s, U, offs_u, offs_s, S, x0, ACC)
            k_gn += _mma(x, tl.trans(n), k_gn * 0.0, PREC)
            q_n += tl.sum(n * n, axis=1)
    return k_gg, k_gn, k_gp, q_n, q_p


@triton.jit
def _gram(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s, G, U, P, c0, c1, S,
          HAS_NEG: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr, BU: tl.constexpr,
          BP: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, NORMS: tl.constexpr):
    """One sweep over the columns [c0, c1) (all of S: 0, S; c1 - c0 a multiple of BS unless c1 = S): the six
    blocks of the targets' Gram matrix T T^T (gg, gn, gp, nn, np, pp) over those columns, and (NORMS) the
    squared norms of N and Y (elementwise, as in _cross_dots, so both sweeps give the same distances; zeros
    without NORMS, where the caller takes the diagonals of K_nn and K_pp instead)."""
    offs_g = tl.arange(0, BG)
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    k_gg = tl.zeros((BG, BG), dtype=ACC)
    k_gn = tl.zeros((BG, BU), dtype=ACC)
    k_gp = tl.zeros((BG, BP), dtype=ACC)
    k_nn = tl.zeros((BU, BU), dtype=ACC)
    k_np = tl.zeros((BU, BP), dtype=ACC)
    k_pp = tl.zeros((BP, BP), dtype=ACC)
    q_n = tl.zeros((BU,), dtype=ACC)
    q_p = tl.zeros((BP,), dtype=ACC)
    for s0 in range(c0, c1, BS):
        offs_s = s0 + tl.arange(0, BS)
        x0 = _origin(gen_row, sg_s, offs_s, S, ACC)
        x = _block(gen_row, sg_n, sg_s, G, offs_g, offs_s, S, x0, ACC)
        y = _block(pos_row, sp_n, sp_s, P, offs_p, offs_s, S, x0, ACC)
        k_gg += _mma(x, tl.trans(x), k_gg * 0.0, PREC)
        k_gp += _mma(x, tl.trans(y), k_gp * 0.0, PREC)
        k_pp += _mma(y, tl.trans(y), k_pp * 0.0, PREC)
        if NORMS:
            q_p += tl.sum(y * y, axis=1)
        if HAS_NEG:
            n = _block(neg_row, sn_n, sn_s, U, offs_u, offs_s, S, x0, ACC)
            k_gn += _mma(x, tl.trans(n), k_gn * 0.0, PREC)
            k_nn += _mma(n, tl.trans(n), k_nn * 0.0, PREC)
            k_np += _mma(n, tl.trans(y), k_np * 0.0, PREC)
            if NORMS:
                q_n += tl.sum(n * n, axis=1)
    return k_gg, k_gn, k_gp, k_nn, k_np, k_pp, q_n, q_p


@triton.jit
def _distances(k_gg, k_gn, k_gp, q_n, q_p, BG: tl.constexpr):
    """dist blocks sqrt(max(|x_i|^2 + |t_m|^2 - 2 x_i.t_m, 1e-8)) for m in gen, neg, pos.

    The generated rows' norms come from the GEMM's own diagonal, so self-distances are exactly 0 before
    the floor instead of sqrt of the rounding difference between an elementwise sum and tl.dot."""
    offs_g = tl.arange(0, BG)
    diag = tl.where(offs_g[:, None] == offs_g[None, :], k_gg, 0.0)
    q_row = tl.sum(diag, axis=1)
    q_col = tl.sum(diag, axis=0)
    d_gg = tl.sqrt(tl.maximum(q_row[:, None] + q_col[None, :] - 2.0 * k_gg, 1e-8))
    d_gn = tl.sqrt(tl.maximum(q_row[:, None] + q_n[None, :] - 2.0 * k_gn, 1e-8))
    d_gp = tl.sqrt(tl.maximum(q_row[:, None] + q_p[None, :] - 2.0 * k_gp, 1e-8))
    return d_gg, d_gn, d_gp


@triton.jit
def _neg_weights(w_row, sw_u, U, HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                 BU: tl.constexpr):
    """w [BU]: neg_weight (1 when not given) for the U negatives, 0 for padding."""
    offs_u = tl.arange(0, BU)
    w = tl.where(offs_u < U, 1.0, 0.0).to(ACC)
    if HAS_NEG:
        if HAS_W:
            w = tl.load(w_row + offs_u * sw_u, mask=offs_u < U, other=0.0).to(ACC)
    return w


@triton.jit
def _softmax_block(l, rmax, rinv, NORM: tl.constexpr):
    """Affinities of one block from its logits l [BG, BC] and the row max/1-over-sum over all blocks:
    "y": row softmax; "xy": sqrt(max(row softmax * column softmax over the generated rows, 1e-6))."""
    a = tl.exp(l - rmax[:, None]) * rinv[:, None]
    if NORM == 0:
        cmax = tl.max(l, axis=0)
        ec = tl.exp(l - cmax[None, :])
        cinv = 1.0 / tl.sum(ec, axis=0)  # >= 1 term equal to exp(0): never 0
        a = tl.sqrt(tl.maximum(a * (ec * cinv[None, :]), 1e-6))
    return a


@triton.jit
def _coefficients(d_gg, d_gn, d_gp, w, inv_sr, mask_r, G, U, P, NORM: tl.constexpr, HAS_NEG: tl.constexpr,
                  BG: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr):
    """Coefficient blocks (c_g [BG, BG], c_n [BG, BU], c_p [BG, BP]) of one temperature, so that
    force_R = c_g X + c_n N + c_p Y: logits -dist/(scale R) with the self-mask on the gen-gen diagonal,
    the normalization, weights after it, c- = -A- * sum A+, c+ = A+ * sum A-. Padding is exactly 0."""
    offs_g = tl.arange(0, BG)
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    ok_i = offs_g[:, None] < G
    ok_gg = ok_i & (offs_g[None, :] < G)
    ok_gn = ok_i & (offs_u[None, :] < U)
    ok_gp = ok_i & (offs_p[None, :] < P)
    # Padded lanes get a finite -1e30: exp(-1e30 - max) = 0 in every real row's and column's sums.
    l_gg = -d_gg * inv_sr
    l_gg = tl.where(offs_g[:, None] == offs_g[None, :], l_gg - mask_r, l_gg)
    l_gg = tl.where(ok_gg, l_gg, -1.0e30)
    l_gp = tl.where(ok_gp, -d_gp * inv_sr, -1.0e30)
    l_gn = tl.where(ok_gn, -d_gn * inv_sr, -1.0e30)  # unused (and dropped) without negatives
    if NORM == 2:  # "none": the raw kernel exp(-dn/R)
        a_gg = tl.exp(l_gg)
        a_gp = tl.exp(l_gp)
        a_gn = tl.exp(l_gn)
    else:
        rmax = tl.maximum(tl.max(l_gg, axis=1), tl.max(l_gp, axis=1))
        if HAS_NEG:
            rmax = tl.maximum(rmax, tl.max(l_gn, axis=1))
        rsum = tl.sum(tl.exp(l_gg - rmax[:, None]), axis=1) + tl.sum(tl.exp(l_gp - rmax[:, None]), axis=1)
        if HAS_NEG:
            rsum += tl.sum(tl.exp(l_gn - rmax[:, None]), axis=1)
        rinv = 1.0 / rsum  # the row's max term is exp(0) = 1, so rsum >= 1
        a_gg = _softmax_block(l_gg, rmax, rinv, NORM)
        a_gp = _softmax_block(l_gp, rmax, rinv, NORM)
        a_gn = _softmax_block(l_gn, rmax, rinv, NORM)  # unused (and dropped) without negatives
    a_gg = tl.where(ok_gg, a_gg, 0.0)
    a_gp = tl.where(ok_gp, a_gp, 0.0)
    s_neg = tl.sum(a_gg, axis=1)
    if HAS_NEG:
        a_gn = tl.where(ok_gn, a_gn * w[None, :], 0.0)  # CFG weights after the normalization
        s_neg += tl.sum(a_gn, axis=1)
    else:
        a_gn = tl.zeros_like(d_gn)
    s_pos = tl.sum(a_gp, axis=1)
    return -a_gg * s_pos[:, None], -a_gn * s_pos[:, None], a_gp * s_neg[:, None]


@triton.jit
def _diag(k, BN: tl.constexpr):
    """The diagonal of a square [BN, BN] register tile, as a [BN] vector."""
    offs = tl.arange(0, BN)
    return tl.sum(tl.where(offs[:, None] == offs[None, :], k, 0.0), axis=1)


@triton.jit
def _scales(sums_ptr, consts_ptr, ACC: tl.constexpr):
    """(scale, max(scale, 1e-3), max(scale * inv_sqrt_s, 1e-3)) from the global fp64 sums [sum dist*tw,
    G*sum tw]: their quotient is formed in fp64 and rounded once to the compute dtype, as the host did."""
    scale = (tl.load(sums_ptr) / tl.load(sums_ptr + 1)).to(ACC)
    inv_sqrt_s = tl.load(consts_ptr).to(ACC)
    return scale, tl.maximum(scale, 1e-3), tl.maximum(scale * inv_sqrt_s, 1e-3)


@triton.jit
def _sqrt_rn(x, ACC: tl.constexpr):
    """IEEE square root (torch.sqrt's rounding); tl.sqrt is an approximation for fp32."""
    if ACC == tl.float64:
        out = tl.sqrt(x)
    else:
        out = tl.sqrt_rn(x)
    return out


# The stored route keeps a row's target Gram matrix K in the row's [G, S] force output until pass 3
# overwrites it. Layout: the six blocks unpadded and row-major, one after the other, KN floats in all:
#   gg [G, G] at 0 | gn [G, U] at G*G | gp [G, P] at G*G + G*U | nn [U, U] at G*M | np [U, P] | pp [P, P]
# (M = G + U + P; KN = G*M + U*U + U*P + P*P; the blocks below the diagonal, ng, pg and pn, are not stored),
# laid out in a column block of the buffer: flat element k of K at (k // kw) * S + k % kw from the block's
# first column, kw the block's width (kw = S: the plain flat layout; the split route has one block per program).

@triton.jit
def _kaddr(k, kw, S):
    return (k // kw) * S + k % kw


@triton.jit
def _store_block(k_row, o, blk, n_r, n_c, offs_r, offs_c, kw, S):
    ok = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.store(k_row + _kaddr(o + offs_r[:, None] * n_c + offs_c[None, :], kw, S), blk, mask=ok)


@triton.jit
def _load_block(k_row, o, n_r, n_c, offs_r, offs_c, kw, S):
    ok = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(k_row + _kaddr(o + offs_r[:, None] * n_c + offs_c[None, :], kw, S), mask=ok, other=0.0)


@triton.jit
def _load_diag(k_row, o, n, offs, kw, S):
    return tl.load(k_row + _kaddr(o + offs * (n + 1), kw, S), mask=offs < n, other=0.0)


@triton.jit
def _store_k(k_row, kw, S, k_gg, k_gn, k_gp, k_nn, k_np, k_pp, G, U, P, HAS_NEG: tl.constexpr,
             BG: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr):
    """Write the six Gram blocks to a column block of the row's buffer (layout above); padding is not written."""
    offs_g = tl.arange(0, BG)
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    o_nn = G * (G + U + P)
    _store_block(k_row, 0, k_gg, G, G, offs_g, offs_g, kw, S)
    _store_block(k_row, G * G + G * U, k_gp, G, P, offs_g, offs_p, kw, S)
    _store_block(k_row, o_nn + U * U + U * P, k_pp, P, P, offs_p, offs_p, kw, S)
    if HAS_NEG:
        _store_block(k_row, G * G, k_gn, G, U, offs_g, offs_u, kw, S)
        _store_block(k_row, o_nn, k_nn, U, U, offs_u, offs_u, kw, S)
        _store_block(k_row, o_nn + U * U, k_np, U, P, offs_u, offs_p, kw, S)


@triton.jit
def _load_k_gen(k_row, kw, S, G, U, P, HAS_NEG: tl.constexpr, BG: tl.constexpr, BU: tl.constexpr,
                BP: tl.constexpr):
    """What the distances need from a stored K: the blocks gg, gn, gp and the diagonals of nn and pp
    (zeros for the neg parts without negatives), i.e. _cross_dots' results, read instead of computed."""
    offs_g = tl.arange(0, BG)
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    o_nn = G * (G + U + P)
    k_gg = _load_block(k_row, 0, G, G, offs_g, offs_g, kw, S)
    k_gp = _load_block(k_row, G * G + G * U, G, P, offs_g, offs_p, kw, S)
    q_p = _load_diag(k_row, o_nn + U * U + U * P, P, offs_p, kw, S)
    if HAS_NEG:
        k_gn = _load_block(k_row, G * G, G, U, offs_g, offs_u, kw, S)
        q_n = _load_diag(k_row, o_nn, U, offs_u, kw, S)
    else:
        k_gn = tl.zeros((BG, BU), dtype=k_gg.dtype)
        q_n = tl.zeros((BU,), dtype=k_gg.dtype)
    return k_gg, k_gn, k_gp, q_n, q_p


@triton.jit
def _load_k_rest(k_row, kw, S, G, U, P, HAS_NEG: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr,
                 ACC: tl.constexpr):
    """The target-target blocks nn, np, pp of a stored K (zeros for the neg parts without negatives)."""
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    o_nn = G * (G + U + P)
    k_pp = _load_block(k_row, o_nn + U * U + U * P, P, P, offs_p, offs_p, kw, S)
    if HAS_NEG:
        k_nn = _load_block(k_row, o_nn, U, U, offs_u, offs_u, kw, S)
        k_np = _load_block(k_row, o_nn + U * U, U, P, offs_u, offs_p, kw, S)
    else:
        k_nn = tl.zeros((BU, BU), dtype=ACC)
        k_np = tl.zeros((BU, BP), dtype=ACC)
    return k_nn, k_np, k_pp


@triton.jit
def _scale_sums_out(out_ptr, row, d_gg, d_gn, d_gp, w, G, P, HAS_NEG: tl.constexpr, BG: tl.constexpr,
                    BP: tl.constexpr):
    """out[row] = (sum_{i,m} dist * tw, G * sum_m tw) in fp64 (pass 1's per-row partials)."""
    offs_g = tl.arange(0, BG)
    offs_p = tl.arange(0, BP)
    ok_i = offs_g[:, None] < G
    total = tl.sum(tl.where(ok_i & (offs_g[None, :] < G), d_gg, 0.0), axis=1)
    total += tl.sum(tl.where(ok_i & (offs_p[None, :] < P), d_gp, 0.0), axis=1)
    if HAS_NEG:
        total += tl.sum(tl.where(ok_i, d_gn * w[None, :], 0.0), axis=1)  # w = 0 on padded negatives
    tl.store(out_ptr + 2 * row, tl.sum(total, axis=0).to(tl.float64))
    # sum_m tw = G + P + sum_u w_u, summed in fp64 (exact for the fp32/bf16 weights).
    tw = tl.sum(w.to(tl.float64), axis=0) + (G + P)
    tl.store(out_ptr + 2 * row + 1, tw * G)


@triton.jit
def _gram_sumsq(c_g, c_n, c_p, k_gg, k_gn, k_gp, k_nn, k_np, k_pp, HAS_NEG: tl.constexpr, PREC: tl.constexpr):
    """||c T||^2 = sum_i c_i K c_i^T for c = [c_g, c_n, c_p], from the Gram blocks (no S in it).

    K = T T^T is symmetric, so every off-diagonal block pair counts twice and each stored block is used
    once, untransposed: 6 small GEMMs."""
    z_g = c_g * 0.0  # zeros for _mma
    z_n = c_n * 0.0
    z_p = c_p * 0.0
    h = _mma(c_g, k_gp, z_p, PREC)
    if HAS_NEG:
        h += _mma(c_n, k_np, z_p, PREC)
    f_p = _mma(c_p, k_pp, z_p, PREC) + 2.0 * h
    f_g = _mma(c_g, k_gg, z_g, PREC)
    ss = tl.sum(f_g * c_g, axis=1) + tl.sum(f_p * c_p, axis=1)
    if HAS_NEG:
        f_n = _mma(c_n, k_nn, z_n, PREC) + 2.0 * _mma(c_g, k_gn, z_n, PREC)
        ss += tl.sum(f_n * c_n, axis=1)
    return tl.sum(ss, axis=0)


@triton.jit
def _gram_spread(c_g, c_n, c_p, k_gg, q_n, q_p, BG: tl.constexpr):
    """sum_{i,m} c_im^2 K_mm: the size of c T before cancellation, which scales the rounding error of the
    Gram estimate sum_i c_i K c_i^T (see GRAM_RTOL)."""
    offs_g = tl.arange(0, BG)
    q_g = tl.sum(tl.where(offs_g[:, None] == offs_g[None, :], k_gg, 0.0), axis=0)
    sp = tl.sum(c_g * c_g * q_g[None, :], axis=1) + tl.sum(c_p * c_p * q_p[None, :], axis=1)
    sp += tl.sum(c_n * c_n * q_n[None, :], axis=1)
    return tl.sum(sp, axis=0)


@triton.jit
def _force_chunk(c_g, c_n, c_p, f_zero, gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                 offs_g, offs_u, offs_p, offs_s, G, U, P, S, HAS_NEG: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr):
    """[BG, BS] chunk of c T = c_g X + c_n N + c_p Y at columns offs_s, the blocks shifted like every chunk."""
    x0 = _origin(gen_row, sg_s, offs_s, S, ACC)
    x = _block(gen_row, sg_n, sg_s, G, offs_g, offs_s, S, x0, ACC)
    y = _block(pos_row, sp_n, sp_s, P, offs_p, offs_s, S, x0, ACC)
    f = _mma(c_g, x, f_zero, PREC) + _mma(c_p, y, f_zero, PREC)
    if HAS_NEG:
        n = _block(neg_row, sn_n, sn_s, U, offs_u, offs_s, S, x0, ACC)
        f += _mma(c_n, n, f_zero, PREC)
    return f


@triton.jit
def _stream_sumsq(c_g, c_n, c_p, f_zero, gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                  G, U, P, S, HAS_NEG: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr, BU: tl.constexpr,
                  BP: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """||c T||^2 by streaming T over S: f = c_g X + c_n N + c_p Y per chunk, sum f^2 (like the reference)."""
    offs_g = tl.arange(0, BG)
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    ss = tl.zeros((BG,), dtype=ACC)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        f = _force_chunk(c_g, c_n, c_p, f_zero, gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                         offs_g, offs_u, offs_p, offs_s, G, U, P, S, HAS_NEG, ACC, PREC)
        ss += tl.sum(f * f, axis=1)
    return tl.sum(ss, axis=0)


# ---------------------------------------------------------------------------------------------------
# Kernels (one program per row)
# ---------------------------------------------------------------------------------------------------

# B2 takes any value at run time without a recompile (it only splits the program id); S stays specialized,
# since its divisibility by 16 lets the masked chunk loads vectorize.
@triton.jit(do_not_specialize=["B2"])
def _field_scale_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, buf_ptr, out_ptr, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr,
                        BU: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr,
                        STORED: tl.constexpr):
    """Pass 1: out[b] = (sum_{i,m} dist[i, m] * tw[m], G * sum_m tw[m]) in fp64. STORED: the sweep forms the
    whole target Gram matrix K and stores it in the row's output buffer for passes 2 and 3."""
    pid = tl.program_id(0)
    gen_row, neg_row, pos_row, w_row = _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                  sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    if STORED:
        k_gg, k_gn, k_gp, k_nn, k_np, k_pp, q_n, q_p = _gram(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s,
                                                             sp_n, sp_s, G, U, P, 0, S, S, HAS_NEG, ACC, BG, BU,
                                                             BP, BS, PREC, False)
        # The norms of N and Y from K's own diagonal, as passes 2 and 3 read them back: one set of distances.
        q_n = _diag(k_nn, BU)
        q_p = _diag(k_pp, BP)
        _store_k(buf_ptr + pid.to(tl.int64) * G * S, S, S, k_gg, k_gn, k_gp, k_nn, k_np, k_pp, G, U, P, HAS_NEG,
                 BG, BU, BP)
    else:
        k_gg, k_gn, k_gp, q_n, q_p = _cross_dots(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                                                 G, U, P, S, HAS_NEG, ACC, BG, BU, BP, BS, PREC)
    d_gg, d_gn, d_gp = _distances(k_gg, k_gn, k_gp, q_n, q_p, BG)
    w = _neg_weights(w_row, sw_u, U, HAS_NEG, HAS_W, ACC, BU)
    _scale_sums_out(out_ptr, pid, d_gg, d_gn, d_gp, w, G, P, HAS_NEG, BG, BP)


# The split stored route (few rows: B below the SM count) cuts each row's columns into J blocks, the first J-1
# of width W (a multiple of 128, so of every BS) and the last of width S - (J-1) W in [W, 2W), each wide enough
# to hold K: pass 1 runs B*J programs (_field_gram_part_kernel) and a per-row reduction
# (_field_gram_reduce_kernel), and pass 3 B*J programs, each reading K from its own block and overwriting only
# that block with the force (so again no program reads what another one writes).

@triton.jit(do_not_specialize=["B2", "J"])
def _field_gram_part_kernel(gen_ptr, neg_ptr, pos_ptr, buf_ptr, J, W, B2, G, U, P, S,
                            sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                            HAS_NEG: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr, BU: tl.constexpr,
                            BP: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """Pass 1a of the split stored route: program (row, j) forms the Gram blocks of the targets' columns in
    block j and writes them into that block of the row's buffer."""
    pid = tl.program_id(0)
    row = pid // J
    j = pid % J
    gen_row, neg_row, pos_row, _ = _row_bases(row, B2, gen_ptr, neg_ptr, pos_ptr, gen_ptr, sg_b1, sg_b2,
                                              sn_b1, sn_b2, sp_b1, sp_b2, 0, 0)
    c0 = tl.multiple_of(j * W, 128)
    c1 = tl.where(j == J - 1, S, c0 + W)
    k_gg, k_gn, k_gp, k_nn, k_np, k_pp, q_n, q_p = _gram(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s,
                                                         sp_n, sp_s, G, U, P, c0, c1, S, HAS_NEG, ACC, BG, BU,
                                                         BP, BS, PREC, False)
    _store_k(buf_ptr + row.to(tl.int64) * G * S + c0, c1 - c0, S, k_gg, k_gn, k_gp, k_nn, k_np, k_pp, G, U, P,
             HAS_NEG, BG, BU, BP)


@triton.jit(do_not_specialize=["B2", "J"])
def _field_gram_reduce_kernel(w_ptr, buf_ptr, out_ptr, J, W, B2, G, U, P, S, sw_b1, sw_b2, sw_u,
                              HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr,
                              BU: tl.constexpr, BP: tl.constexpr):
    """Pass 1b of the split stored route: program b sums its row's J partial Gram matrices (in block order,
    so the result does not depend on scheduling), writes the total into every block (pass 3's programs each
    read their own copy; pass 2 reads block 0) and stores the row's scale partials as pass 1 does."""
    row = tl.program_id(0)
    base = buf_ptr + row.to(tl.int64) * G * S
    k_gg = tl.zeros((BG, BG), dtype=ACC)
    k_gn = tl.zeros((BG, BU), dtype=ACC)
    k_gp = tl.zeros((BG, BP), dtype=ACC)
    k_nn = tl.zeros((BU, BU), dtype=ACC)
    k_np = tl.zeros((BU, BP), dtype=ACC)
    k_pp = tl.zeros((BP, BP), dtype=ACC)
    for j in range(J):
        c0 = j * W
        kw = tl.where(j == J - 1, S - c0, W)
        a_gg, a_gn, a_gp, _, _ = _load_k_gen(base + c0, kw, S, G, U, P, HAS_NEG, BG, BU, BP)
        a_nn, a_np, a_pp = _load_k_rest(base + c0, kw, S, G, U, P, HAS_NEG, BU, BP, ACC)
        k_gg += a_gg
        k_gn += a_gn
        k_gp += a_gp
        k_nn += a_nn
        k_np += a_np
        k_pp += a_pp
    tl.debug_barrier()  # every thread has read every partial before any block is overwritten
    for j in range(J):
        c0 = j * W
        kw = tl.where(j == J - 1, S - c0, W)
        _store_k(base + c0, kw, S, k_gg, k_gn, k_gp, k_nn, k_np, k_pp, G, U, P, HAS_NEG, BG, BU, BP)
    d_gg, d_gn, d_gp = _distances(k_gg, k_gn, k_gp, _diag(k_nn, BU), _diag(k_pp, BP), BG)
    b1 = (row // B2).to(tl.int64)
    b2 = (row % B2).to(tl.int64)
    w = _neg_weights(w_ptr + b1 * sw_b1 + b2 * sw_b2, sw_u, U, HAS_NEG, HAS_W, ACC, BU)
    _scale_sums_out(out_ptr, row, d_gg, d_gn, d_gp, w, G, P, HAS_NEG, BG, BP)


@triton.jit(do_not_specialize=["B2"])
def _field_sumsq_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, buf_ptr, sums_ptr, consts_ptr, out_ptr, spread_tol,
                        kw, NR, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        NORM: tl.constexpr, HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BG: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
                        PREC: tl.constexpr, ROUTE: tl.constexpr):
    """Pass 2: out[b, r] = ||force_r||^2 of row b in scaled coordinates (before the RMS normalization), fp64,
    and out[b, NR] = G * S (the count of the mean). ROUTE 0: stream T once per R; 1: form K in one sweep,
    then ||c T||^2 = sum c K c^T; 2 (stored): read K from pass 1's buffer, no S sweep, except for an R whose
    Gram estimate is ill-conditioned (spread * spread_tol > estimate), which is streamed instead. kw: the
    width of the buffer's first column block, which holds K (S, or W on the split stored route)."""
    pid = tl.program_id(0)
    gen_row, neg_row, pos_row, w_row = _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                  sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    scale, sc, si = _scales(sums_ptr, consts_ptr, ACC)
    w = _neg_weights(w_row, sw_u, U, HAS_NEG, HAS_W, ACC, BU)
    f_zero = tl.zeros((BG, BS), dtype=ACC) * sc  # zeros for _mma
    if ROUTE == 2:
        k_row = buf_ptr + pid.to(tl.int64) * G * S
        k_gg, k_gn, k_gp, q_n, q_p = _load_k_gen(k_row, kw, S, G, U, P, HAS_NEG, BG, BU, BP)
        k_nn, k_np, k_pp = _load_k_rest(k_row, kw, S, G, U, P, HAS_NEG, BU, BP, ACC)
    elif ROUTE == 1:
        k_gg, k_gn, k_gp, k_nn, k_np, k_pp, q_n, q_p = _gram(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s,
                                                             sp_n, sp_s, G, U, P, 0, S, S, HAS_NEG, ACC, BG, BU,
                                                             BP, BS, PREC, True)
    else:
        k_gg, k_gn, k_gp, q_n, q_p = _cross_dots(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                                                 G, U, P, S, HAS_NEG, ACC, BG, BU, BP, BS, PREC)
    d_gg, d_gn, d_gp = _distances(k_gg, k_gn, k_gp, q_n, q_p, BG)
    out_row = out_ptr + pid * (NR + 1)
    redo = pid * 0  # ROUTE 2: bit r set where temperature r failed the accuracy guard
    for r in range(NR):
        rinv = tl.load(consts_ptr + 2 + r).to(ACC)
        c_g, c_n, c_p = _coefficients(d_gg, d_gn, d_gp, w, rinv / sc, 100.0 * rinv, G, U, P, NORM, HAS_NEG,
                                      BG, BU, BP)
        if ROUTE == 0:
            ss = _stream_sumsq(c_g, c_n, c_p, f_zero, gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n,
                               sp_s, G, U, P, S, HAS_NEG, ACC, BG, BU, BP, BS, PREC)
        else:
            ss = _gram_sumsq(c_g, c_n, c_p, k_gg, k_gn, k_gp, k_nn, k_np, k_pp, HAS_NEG, PREC)
            if ROUTE == 2:
                bad = _gram_spread(c_g, c_n, c_p, k_gg, q_n, q_p, BG) * spread_tol > ss
                redo = redo | (bad.to(tl.int32) << r)
        tl.store(out_row + r, (ss / (si * si)).to(tl.float64))
    if ROUTE == 2:
        # The guard's streaming, after the Gram loop: K is dead here, so the common path keeps its registers.
        if redo != 0:
            for r in range(NR):
                if ((redo >> r) & 1) != 0:
                    rinv = tl.load(consts_ptr + 2 + r).to(ACC)
                    c_g, c_n, c_p = _coefficients(d_gg, d_gn, d_gp, w, rinv / sc, 100.0 * rinv, G, U, P, NORM,
                                                  HAS_NEG, BG, BU, BP)
                    ss = _stream_sumsq(c_g, c_n, c_p, f_zero, gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s,
                                       sp_n, sp_s, G, U, P, S, HAS_NEG, ACC, BG, BU, BP, BS, PREC)
                    tl.store(out_row + r, (ss / (si * si)).to(tl.float64))
    tl.store(out_row + NR, pid.to(tl.float64) * 0.0 + G * S)  # (G, S may be constexpr 1: no .to on them)


@triton.jit(do_not_specialize=["B2", "J"])
def _field_force_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, buf_ptr, sums_ptr, stats_ptr, consts_ptr, loss_ptr,
                        scalars_ptr, J, W, NR, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        NORM: tl.constexpr, HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BG: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
                        PREC: tl.constexpr, STORED: tl.constexpr):
    """Pass 3: buf[b] = force = sum_R c_R T / (rms_R * scale_inputs) [G, S], loss[b] = mean(force[b]^2), with
    rms_R = sqrt(max(stats[R] / stats[NR], 1e-8)) from the global fp64 sums; program 0 also writes
    scalars = [scale, scale_inputs, sqrt(stats[R] / stats[NR]) for each R]. STORED: the distances come from
    the K that pass 1 left in buf[b], which this program then overwrites with the force. J > 1 (split stored
    route): program (b, j) does the columns of block j (the first J-1 W wide, the last to S) with the copy
    of K in that block, and loss_ptr[b * J + j] gets that block's part of the row's loss."""
    pid = tl.program_id(0)
    row = pid // J
    j = pid % J
    gen_row, neg_row, pos_row, w_row = _row_bases(row, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                  sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    scale, sc, si = _scales(sums_ptr, consts_ptr, ACC)
    w = _neg_weights(w_row, sw_u, U, HAS_NEG, HAS_W, ACC, BU)
    out_row = buf_ptr + row.to(tl.int64) * G * S
    c0 = tl.multiple_of(j * W, 16)  # (j = 0 unless split, where W is a multiple of 128)
    c1 = tl.where(j == J - 1, S, c0 + W)
    if STORED:
        k_gg, k_gn, k_gp, q_n, q_p = _load_k_gen(out_row + c0, c1 - c0, S, G, U, P, HAS_NEG, BG, BU, BP)
    else:
        k_gg, k_gn, k_gp, q_n, q_p = _cross_dots(gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                                                 G, U, P, S, HAS_NEG, ACC, BG, BU, BP, BS, PREC)
    d_gg, d_gn, d_gp = _distances(k_gg, k_gn, k_gp, q_n, q_p, BG)
    count = tl.load(stats_ptr + NR)
    rms_eps = tl.load(consts_ptr + 1).to(ACC)  # RMS_EPS in the compute dtype (a bare literal would be fp32)
    t_g = tl.zeros((BG, BG), dtype=ACC)
    t_n = tl.zeros((BG, BU), dtype=ACC)
    t_p = tl.zeros((BG, BP), dtype=ACC)
    for r in range(NR):
        rinv = tl.load(consts_ptr + 2 + r).to(ACC)
        ms = (tl.load(stats_ptr + r) / count).to(ACC)
        k = 1.0 / (_sqrt_rn(tl.maximum(ms, rms_eps), ACC) * si)
        c_g, c_n, c_p = _coefficients(d_gg, d_gn, d_gp, w, rinv / sc, 100.0 * rinv, G, U, P, NORM, HAS_NEG,
                                      BG, BU, BP)
        t_g += c_g * k
        t_n += c_n * k
        t_p += c_p * k
    if pid == 0:
        tl.store(scalars_ptr, scale)
        tl.store(scalars_ptr + 1, si)
        for r in range(NR):
            tl.store(scalars_ptr + 2 + r, _sqrt_rn((tl.load(stats_ptr + r) / count).to(ACC), ACC))
    if STORED:
        # Every thread of the program has read its part of K (the coefficients above consume all of it);
        # only then may any thread overwrite the buffer with the force.
        tl.debug_barrier()
    offs_g = tl.arange(0, BG)
    offs_u = tl.arange(0, BU)
    offs_p = tl.arange(0, BP)
    f_zero = tl.zeros((BG, BS), dtype=ACC) * sc  # zeros for _mma
    ss = tl.zeros((BG,), dtype=ACC)
    for s0 in range(c0, c1, BS):
        offs_s = s0 + tl.arange(0, BS)
        f = _force_chunk(t_g, t_n, t_p, f_zero, gen_row, neg_row, pos_row, sg_n, sg_s, sn_n, sn_s, sp_n, sp_s,
                         offs_g, offs_u, offs_p, offs_s, G, U, P, S, HAS_NEG, ACC, PREC)
        ss += tl.sum(f * f, axis=1)
        tl.store(out_row + offs_g[:, None] * S + offs_s[None, :], f,
                 mask=(offs_g[:, None] < G) & (offs_s[None, :] < S))
    tl.store(loss_ptr + pid, tl.sum(ss, axis=0) / (G * S))


# ---------------------------------------------------------------------------------------------------
# Launch configurations, routes and the autotuner
# ---------------------------------------------------------------------------------------------------

class Config(NamedTuple):
    """One launch configuration: S chunk, warps, software-pipelining stages, pass 2's in-kernel Gram route
    (GRAM), the stored route (STORED) and its split variant (SPLIT: pass 1's per-block kernel, the reduction
    and pass 3 over column blocks). The route is the same for all passes of a call (see _pass1)."""

    BS: int
    num_warps: int
    num_stages: int
    GRAM: bool = False
    STORED: bool = False
    SPLIT: bool = False

    def label(self) -> str:
        return (f"BS{self.BS}/w{self.num_warps}/s{self.num_stages}" + ("/gram" if self.GRAM else "")
                + ("/stored" if self.STORED else "") + ("/split" if self.SPLIT else ""))


# (BS, num_warps, num_stages) tried by the tuner, first = the untuned default. Chosen from ptxas reports of
# these kernels for sm_90 at (G, U, P) = (64, 16, 64), fp32 (triton 3.8; the GPU's 3.6 may differ, which is
# what the tuner is for): with 8 warps the streaming kernels use ~220-255 registers and spill nothing at
# BS 16/32 (a little with 3 stages), BS 64 spills 0.2-2 KB, 4 warps spill 1-3 KB (dropped), 16 warps cap at
# 128 registers and spill 0.1-0.4 KB. Shared memory: 16-33 KB (pass 1) and ~90 KB (passes 2-3) at one
# stage, +9/+18 KB per extra stage at BS 16/32. The Gram kernel holds the six Gram blocks in shared memory
# (~190 KB at any BS: one program per SM) and spills ~0.25 KB at BS 16, more at larger BS.
# Every candidate is one compile (~2-5 s): the lists are kept short.
_CANDIDATES = ((32, 8, 1), (16, 8, 2), (32, 8, 2), (16, 8, 3), (32, 8, 3), (64, 8, 2), (32, 16, 2))
_GRAM_CANDIDATES = ((16, 8, 1), (16, 8, 3), (32, 8, 2))
# The stored route's kernels, from the same ptxas reports (8 warps, 1 stage unless noted): pass 1 forms six
# Gram blocks per chunk and spills 16-48 B at BS 16 (1-3 stages), ~150 B at BS 32 and ~0.5 KB at BS 64 (4
# warps: ~1 KB, dropped); shared memory 33-84 KB, 168 KB at BS 64. Pass 2 keeps K's blocks (split into TF32
# heads and tails) in shared memory across the temperatures, ~190 KB at any BS (one program per SM, like the
# in-kernel Gram route), and spills ~0.35 KB (16 warps: 128 registers, ~0.6 KB; 4 warps ~1.8 KB, dropped);
# BS only sizes its rarely taken streaming guard. Pass 3 streams once: no spills at BS 32 (221 registers),
# 70-180 B at BS 64, 0.9 KB at BS 128 (dropped). The split route's per-block pass 1 and pass 3 are the same
# code over a column range; its reduction only adds up K (BS unused).
_STORED_CANDIDATES = {
    "scale": ((16, 8, 2), (16, 8, 1), (16, 8, 3), (32, 8, 1), (32, 8, 2), (64, 8, 2)),
    "sumsq": ((32, 8, 1), (16, 8, 1), (32, 16, 1)),
    "force": ((64, 8, 2), (32, 8, 3), (32, 8, 2), (64, 8, 3), (64, 8, 1)),
    "reduce": ((16, 8, 1), (16, 16, 1)),
}
# The split route's pass 1 per block (its programs each sweep W >= 256 columns of a row).
_SPLIT_PART_CANDIDATES = ((16, 8, 2), (16, 8, 1), (32, 8, 1), (32, 8, 2))

# DRIFT_TRITON_STORED=0 turns the stored route (and its split variant) off: the passes then recompute the
# distances from the inputs.
STORED_ROUTE = os.environ.get("DRIFT_TRITON_STORED", "1") != "0"
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

# The route decision is measured with these options standing in for passes 2 and 3 (the defaults of
# drift.field: normalization "xy", R = (0.02, 0.05, 0.2)); calls with these options reuse those tunings.
_PROXY_NORM = 0
_PROXY_TEMPS = (0.02, 0.05, 0.2)

# Routes: recompute (every shape), stored (K fits in a row's output), split (stored, with passes 1 and 3 over
# J column blocks per row: offered where the rows are fewer than the SMs and J >= 2 blocks hold K).
_RECOMPUTE, _STORED, _SPLIT = 0, 1, 2
ROUTE_NAMES = ("recompute", "stored", "split")
_SPLIT_ALIGN = 128  # block widths are multiples of this (of every BS, and aligned loads at the block starts)


def _next_pow2(n: int) -> int:
    # Host-side; triton.next_power_of_2 is a jit-aware wrapper that costs microseconds per call.
    return 1 << max(0, int(n) - 1).bit_length()


def _block_sizes(G: int, U: int, P: int) -> Tuple[int, int, int]:
    """Per-block padded sizes (powers of two, >= 16 for tl.dot)."""
    return tuple(max(16, _next_pow2(max(n, 1))) for n in (G, U, P))


def _cap_bs(bs: int, S: int) -> int:
    return max(16, min(bs, _next_pow2(S)))


def _dedupe(cfgs: List[Config]) -> List[Config]:
    out: List[Config] = []
    for c in cfgs:
        if c not in out:
            out.append(c)
    return out


def gram_ratio(G: int, U: int, P: int, S: int, nR: int) -> float:
    """MACs of pass 2 by the Gram route over the streaming route (both including the distance sweep)."""
    M = G + U + P
    stream = (1 + nR) * G * M * S
    gram = (G * M + U * U + U * P + P * P) * S + nR * G * M * M
    return gram / stream


def gram_floats(G: int, U: int, P: int) -> int:
    """Elements of a row's stored Gram matrix (the six blocks on and above the diagonal, unpadded)."""
    return G * (G + U + P) + U * U + U * P + P * P


def stored_fits(G: int, U: int, P: int, S: int) -> bool:
    """Whether a row's K fits in its [G, S] force output, where the stored route keeps it: the route then
    needs no memory beyond the output. Where it does not fit (S < gram_floats / G, ~228 at the SPEC row
    shape), a separate [B, gram_floats] scratch would exceed the memory target (<= 0.1x the reference's peak:
    at S = 64 it alone is ~0.14x), so the route is not offered there."""
    return STORED_ROUTE and gram_floats(G, U, P) <= G * S


def split_blocks(G: int, U: int, P: int, S: int, B: int, n_sm: int, J: Optional[int] = None) -> Tuple[int, int]:
    """(J, W) of the split stored route: J column blocks per row, the first J - 1 of width W (a multiple of
    _SPLIT_ALIGN, at least K's floats / G) and the last of width S - (J-1) W (between W and 2W), so that every
    block holds a copy of K. J aims at one program per SM for B rows (B < n_sm), or is the requested J; (1, S)
    where no split into >= 2 blocks exists (or the stored route does not fit)."""
    if not stored_fits(G, U, P, S):
        return 1, S
    if J is None:
        if n_sm <= 0 or B >= n_sm:
            return 1, S
        J = -(-n_sm // max(B, 1))
    a = _SPLIT_ALIGN
    w_min = -(-(-(-gram_floats(G, U, P) // G)) // a) * a
    W = max(w_min, (S // max(J, 1)) // a * a)
    J = S // W
    return (J, W) if J >= 2 else (1, S)


def route_macs(G: int, U: int, P: int, S: int, nR: int = 3) -> Dict[str, float]:
    """Multiply-adds per row of the two routes (each is 3 TF32 products on tensor cores):
    recompute: pass 1 G*M*S, pass 2 min(streaming, in-kernel Gram), pass 3 2*G*M*S (distances, then force);
    stored: pass 1 (G*M + U^2 + U*P + P^2)*S (all of K), pass 2 ~nR*G*(that without S), pass 3 G*M*S (the split
    variant does the same work in more programs)."""
    M = G + U + P
    kn = gram_floats(G, U, P)
    p2 = min((1 + nR) * G * M * S, kn * S + nR * G * M * M) if GRAM_ROUTE else (1 + nR) * G * M * S
    return {"recompute": G * M * S + p2 + 2 * G * M * S, "stored": kn * S + nR * G * kn + G * M * S}


def candidates(kernel: str, G: int, U: int, P: int, S: int, nR: int = 3, stored: bool = False,
               split: bool = False) -> List[Config]:
    """Configurations the tuner tries for one kernel ("scale", "sumsq", "force"; "reduce" of the split route)
    at this row shape, on the recompute route (default), the stored route or its split variant (pass 2 of
    the split route is the stored one)."""
    if stored or kernel == "reduce":
        sp = (split and kernel != "sumsq") or kernel == "reduce"
        table = _SPLIT_PART_CANDIDATES if (sp and kernel == "scale") else _STORED_CANDIDATES[kernel]
        return _dedupe([Config(_cap_bs(bs, S), nw, ns, False, True, sp) for bs, nw, ns in table])
    stream = [Config(_cap_bs(bs, S), nw, ns) for bs, nw, ns in _CANDIDATES]
    if kernel != "sumsq" or not GRAM_ROUTE:
        return _dedupe(stream)
    gram = [Config(_cap_bs(bs, S), nw, ns, True) for bs, nw, ns in _GRAM_CANDIDATES]
    ratio = gram_ratio(G, U, P, S, nR)
    if ratio < 0.5:  # Gram clearly cheaper: its configurations, plus the streaming default as a fallback
        return _dedupe(gram + stream[:1])  # (the Gram kernel's ~190 KB of shared memory is near the limit)
    if ratio > 2.0:
        return _dedupe(stream)
    return _dedupe(gram + stream) if ratio < 1.0 else _dedupe(stream + gram)


_BEST: Dict[tuple, Config] = {}
_BEST_MS: Dict[tuple, float] = {}
_ROUTES: Dict[tuple, int] = {}
_FORCED: Dict[str, object] = {}
_TUNING_LOG: List[dict] = []
_NUM_SMS: Dict[int, int] = {}


@contextlib.contextmanager
def forced_configs(**per_kernel):
    """Run the given kernels ("scale", "sumsq", "force", "reduce") with fixed configurations inside the block
    (tests use it to cover every candidate, e.g. the Gram route of pass 2 at shapes where it would not be
    picked). A forced "scale" config fixes the route (recompute; STORED: stored; STORED and SPLIT: split, with
    `split=J` column blocks, default: as for the rows at hand); forced sumsq/force configs must agree with it."""
    unknown = set(per_kernel) - {"scale", "sumsq", "force", "reduce", "split"}
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}")
    saved = dict(_FORCED)
    _FORCED.update(per_kernel)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def tuning_log() -> List[dict]:
    """One entry per tuned (kernel, key): the key, the route, the winner and every candidate's time or error;
    and one per route decision (kernel "route": each route's summed best times)."""
    return [dict(e) for e in _TUNING_LOG]


def reset_tuning() -> None:
    """Forget tuned configurations and routes (tests; a later call tunes again)."""
    _BEST.clear()
    _BEST_MS.clear()
    _ROUTES.clear()
    _TUNING_LOG.clear()
    _PLANS.clear()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _rows_bucket(B: int, device: torch.device) -> int:
    """0: fewer rows than SMs; 1: up to 8 waves; 2: more. The best config depends on the occupancy regime."""
    if device.type != "cuda":
        return 0
    n = _num_sms(device)
    return 0 if B < n else (1 if B < 8 * n else 2)


def _time_ms(launch: Callable[[], None], best_ms: float) -> float:
    """Mean time of `launch` in ms over ~2 ms of runs (one run when it is already 3x slower than the best)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch()
    end.record()
    end.synchronize()
    t1 = start.elapsed_time(end)
    if t1 > 3.0 * best_ms:
        return t1
    reps = max(2, min(20, int(2.0 / max(t1, 1e-3))))
    start.record()
    for _ in range(reps):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _error_text(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _route_name(c: Config) -> str:
    return ROUTE_NAMES[_SPLIT if c.SPLIT else (_STORED if c.STORED else _RECOMPUTE)]


def _tuned_launch(kernel: str, key: tuple, cands: List[Config], launch: Callable[[Config], None],
                  trial: Optional[Callable[[Config], None]] = None, route: Optional[int] = None) -> Config:
    """Launch with the best known config for (kernel, key), choosing it the first time the key is seen.

    Tuning on: every candidate is launched (compiling it), timed, and the fastest kept. Tuning off: the first
    candidate that launches. Either way a candidate that raises (out of shared memory or registers, a compile
    failure) is dropped and its error logged, except under the interpreter, which has no resource limits.
    The kernels only store, so the timing runs leave the same outputs as the final launch; a kernel that
    overwrites its own input (the stored route's pass 3, the split route's reduction) is compiled and timed
    through `trial` (on a copy), and only the winner runs through `launch`. The winner's time is kept in
    _BEST_MS (for the route decision); `route` names the route in the log (default: the config's)."""
    if kernel in _FORCED:
        launch(_FORCED[kernel])
        return _FORCED[kernel]
    cache_key = (kernel,) + key
    cfg = _BEST.get(cache_key)
    if cfg is not None:
        launch(cfg)
        return cfg
    times: Dict[Config, float] = {}
    errors: Dict[str, str] = {}
    best = math.inf
    tune = AUTOTUNE  # (also a single candidate: the route decision sums the kernels' times)
    run = trial if (tune and trial is not None) else launch
    for c in cands:
        try:
            run(c)  # compiles on first use; resource checks happen here, before the kernel runs
            if tune:
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (OutOfResources, PTXASError, CompilationError differ by version)
            if INTERPRETED:
                raise
            errors[c.label()] = _error_text(e)
            continue
        if not tune:
            times[c] = math.nan
            break
        times[c] = _time_ms(lambda: run(c), best)
        best = min(best, times[c])
    if not times:
        raise RuntimeError(f"no launch configuration of {kernel} ran for key {key}: {errors}")
    cfg = min(times, key=times.get) if tune else next(iter(times))
    _BEST[cache_key] = cfg
    _BEST_MS[cache_key] = times[cfg]
    if tune or errors:
        name = _route_name(cfg) if route is None else ROUTE_NAMES[route]
        _TUNING_LOG.append({"kernel": kernel, "key": list(key), "route": name, "best": cfg.label(),
                            "best_ms": times[cfg], "times_ms": {c.label(): t for c, t in times.items()},
                            "errors": errors})
    if tune:
        launch(cfg)  # the outputs come from the chosen configuration
    return cfg


# ---------------------------------------------------------------------------------------------------
# Launch plans (per input signature) and launchers
# ---------------------------------------------------------------------------------------------------

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
    chosen. Built once per signature, so a repeated call does no shape work on the host."""

    __slots__ = ("batch", "B", "B2", "G", "U", "P", "S", "has_neg", "has_w", "merge", "strides", "key", "acc",
                 "acc_dt", "prec", "BG", "BU", "BP", "device", "stored_ok", "split", "route", "cfg")

    def args(self, gen, pos, neg, w):
        """(gen, neg, pos, w) as the kernels take them (neg and w replaced by gen where absent)."""
        if self.merge:
            gen, pos = _two_batch_dims(gen, 2), _two_batch_dims(pos, 2)
            neg = _two_batch_dims(neg, 2) if self.has_neg else None
            w = _two_batch_dims(w, 1) if self.has_w else None
        return gen, (neg if self.has_neg else gen), pos, (w if self.has_w else gen)


_PLANS: Dict[tuple, _Plan] = {}


def _signature(gen, pos, neg, w) -> tuple:
    return (gen.shape, gen.stride(), gen.dtype, gen.device, pos.shape, pos.stride(), pos.dtype,
            None if neg is None else (neg.shape, neg.stride(), neg.dtype),
            None if w is None else (w.shape, w.stride(), w.dtype))


def _check_device(*ts):
    for t in ts:
        if t is not None and t.device.type != "cuda" and not INTERPRETED:
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
    p.BG, p.BU, p.BP = _block_sizes(p.G, p.U, p.P)
    p.device = gen.device
    unit = all(t is None or t.stride(-1) == 1 for t in (gen, pos, neg if p.has_neg else None))
    # Tuning key: row shape, dtype, which optional inputs exist, feature contiguity, occupancy regime.
    p.key = (p.G, p.U, p.P, p.S, str(gen.dtype), p.has_neg, p.has_w, unit, _rows_bucket(p.B, gen.device),
             str(gen.device))
    p.stored_ok = stored_fits(p.G, p.U, p.P, p.S)
    p.split = split_blocks(p.G, p.U, p.P, p.S, p.B, _num_sms(gen.device))
    p.route = None  # (route, J, W) of the latest pass 1 with this plan (passes 2 and 3 follow it)
    p.cfg = {}
    return p


def _plan(gen, pos, neg, w) -> _Plan:
    sig = _signature(gen, pos, neg, w)
    p = _PLANS.get(sig)
    if p is None:
        p = _PLANS[sig] = _make_plan(gen, pos, neg, w)
    return p


def _routes_offered(p: _Plan) -> List[int]:
    out = [_RECOMPUTE]
    if p.stored_ok:
        out.append(_STORED)
        if p.split[0] >= 2:
            out.append(_SPLIT)
    return out


_CONSTS: dict = {}


def _consts(temperatures, S: int, device, dt) -> torch.Tensor:
    """[1/sqrt(S), RMS_EPS, 1/R...] in the compute dtype on the device, cached (building it per call would be
    a blocking host-to-device copy). 1/sqrt(S) is rounded as torch does for `scale / sqrt(S)` on CUDA (the
    reciprocal of the fp32 divisor, in fp32), so the kernels' scale_inputs is the one drift._field_ops computed
    on the host before."""
    key = (tuple(temperatures), S, device, dt)
    out = _CONSTS.get(key)
    if out is None:
        if dt == torch.float64:
            inv = 1.0 / math.sqrt(S)
        else:
            inv = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(math.sqrt(S), dtype=torch.float32))
        out = torch.tensor([inv, RMS_EPS] + [1.0 / float(t) for t in key[0]], dtype=dt, device=device)
        _CONSTS[key] = out
    return out


def _spread_tol(p: _Plan) -> float:
    """eps_K / GRAM_RTOL for the stored route's accuracy guard (GRAM_RTOL <= 0: always stream)."""
    return _GRAM_EPS[p.acc_dt] / GRAM_RTOL if GRAM_RTOL > 0 else 1e30


def _launch_scale(p: _Plan, args, buf, part, c: Config) -> None:
    g, n, q, w = args
    _field_scale_kernel[(p.B,)](g, n, q, w, buf, part, p.B2, p.G, p.U, p.P, p.S, *p.strides,
                                HAS_NEG=p.has_neg, HAS_W=p.has_w, ACC=p.acc, BG=p.BG, BU=p.BU, BP=p.BP, BS=c.BS,
                                PREC=p.prec, STORED=c.STORED, num_warps=c.num_warps, num_stages=c.num_stages)


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
    _field_sumsq_kernel[(p.B,)](g, n, q, w, buf, sums, consts, part, _spread_tol(p), kw, nR, p.B2, p.G, p.U,
                                p.P, p.S, *p.strides, NORM=norm, HAS_NEG=p.has_neg, HAS_W=p.has_w, ACC=p.acc,
                                BG=p.BG, BU=p.BU, BP=p.BP, BS=c.BS, PREC=p.prec, ROUTE=route,
                                num_warps=c.num_warps, num_stages=c.num_stages)


def _launch_force(p: _Plan, args, buf, sums, stats, consts, loss, scalars, nR: int, norm: int, J: int, W: int,
                  c: Config) -> None:
    g, n, q, w = args
    if not c.STORED:
        J, W = 1, p.S  # (the recompute kernel writes every column from the inputs)
    elif J > 1:
        _check_blocks(W, c)
    _field_force_kernel[(p.B * J,)](g, n, q, w, buf, sums, stats, consts, loss, scalars, J, W, nR, p.B2, p.G,
                                    p.U, p.P, p.S, *p.strides, NORM=norm, HAS_NEG=p.has_neg, HAS_W=p.has_w,
                                    ACC=p.acc, BG=p.BG, BU=p.BU, BP=p.BP, BS=c.BS, PREC=p.prec, STORED=c.STORED,
                                    num_warps=c.num_warps, num_stages=c.num_stages)


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
    if route != _SPLIT:
        return (_tuned_launch("scale", p.key + (route,),
                              candidates("scale", p.G, p.U, p.P, p.S, stored=route == _STORED),
                              lambda c: _launch_scale(p, args, buf, part, c), route=route),)
    J, W = p.split
    c1 = _tuned_launch("scale", p.key + (route, J), candidates("scale", p.G, p.U, p.P, p.S, stored=True, split=True),
                       lambda c: _launch_part(p, args, buf, J, W, c), route=route)
    into = lambda b, c: _launch_reduce(p, args, b, part, J, W, c)  # noqa: E731
    c2 = _tuned_launch("reduce", p.key + (J,), candidates("reduce", p.G, p.U, p.P, p.S), lambda c: into(buf, c),
                       _on_copy(into, buf), route=route)
    return c1, c2


def _launch_pass1(p: _Plan, args, buf, part, route: int, cfgs: tuple, J: int, W: int) -> None:
    if route != _SPLIT:
        _launch_scale(p, args, buf, part, cfgs[0])
    else:
        _launch_part(p, args, buf, J, W, cfgs[0])
        _launch_reduce(p, args, buf, part, J, W, cfgs[1])


def _run_sumsq(p: _Plan, args, buf, sums, consts, part, nR: int, norm: int, route: int, kw: int) -> Config:
    return _tuned_launch("sumsq", p.key + (norm, nR, route),
                         candidates("sumsq", p.G, p.U, p.P, p.S, nR, stored=route != _RECOMPUTE),
                         lambda c: _launch_sumsq(p, args, buf, sums, consts, part, nR, norm, kw, c), route=route)


def _run_force(p: _Plan, args, buf, sums, stats, consts, loss, scalars, nR: int, norm: int, route: int,
               J: int, W: int, scratch: bool = False) -> Config:
    if route != _SPLIT:
        J, W = 1, p.S
    into = lambda b, c: _launch_force(p, args, b, sums, stats, consts, loss, scalars, nR, norm, J, W, c)  # noqa
    return _tuned_launch("force", p.key + (norm, nR, route, J),
                         candidates("force", p.G, p.U, p.P, p.S, nR, stored=route != _RECOMPUTE,
                                    split=route == _SPLIT),
                         lambda c: into(buf, c), _on_copy(into, buf) if route != _RECOMPUTE and not scratch else None,
                         route=route)


def _measure_route(p: _Plan, args, buf, part, route: int) -> float:
    """Tune one route's passes at the proxy options (pass 1 leaves its outputs in buf and part) and return
    the sum of their best times in ms."""
    nR = len(_PROXY_TEMPS)
    consts = _consts(_PROXY_TEMPS, p.S, p.device, p.acc_dt)
    _run_pass1(p, args, buf, part, route)
    sums = part.sum(0)
    part2 = torch.empty((p.B, nR + 1), dtype=torch.float64, device=p.device)
    J, W = p.split if route == _SPLIT else (1, p.S)
    _run_sumsq(p, args, buf, sums, consts, part2, nR, _PROXY_NORM, route, W)
    stats = part2.sum(0)
    loss = torch.empty(p.B * J, dtype=p.acc_dt, device=p.device)
    scalars = torch.empty(2 + nR, dtype=p.acc_dt, device=p.device)
    out = buf if route == _RECOMPUTE else buf.clone()  # a stored pass 3 overwrites the K that pass 2 reads later
    _run_force(p, args, out, sums, stats, consts, loss, scalars, nR, _PROXY_NORM, route, J, W, scratch=True)
    keys = [("scale",) + p.key + ((route, J) if route == _SPLIT else (route,)),
            ("sumsq",) + p.key + (_PROXY_NORM, nR, route), ("force",) + p.key + (_PROXY_NORM, nR, route, J)]
    if route == _SPLIT:
        keys.append(("reduce",) + p.key + (J,))
    return sum(_BEST_MS[k] for k in keys)


def _choose_route(p: _Plan, args, buf, part) -> None:
    """Decide the route of this tuning key. Tuning on (and more than one route offered): every offered route is
    tuned and timed whole, passes 2 and 3 at the proxy options, and the fastest kept; a route with a pass that
    has no configuration that compiles and fits loses. Tuning off: the stored route wherever it is offered (it
    needs fewer multiply-adds wherever it fits in the output, route_macs), split where that is offered."""
    offered = _routes_offered(p)
    if not AUTOTUNE or len(offered) == 1 or _FORCED:  # (a forced sumsq/force config would not be timed)
        _ROUTES[p.key] = offered[-1]
        return
    times: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    for route in offered:  # the stored routes last: their pass 1 leaves K in buf
        try:
            times[ROUTE_NAMES[route]] = _measure_route(p, args, buf, part, route)
        except RuntimeError as e:  # no configuration of one of its passes ran (or out of memory for a copy)
            errors[ROUTE_NAMES[route]] = _error_text(e)
    if not times:
        raise RuntimeError(f"no route of the drifting field ran for key {p.key}: {errors}")
    best = min(times, key=times.get)
    _ROUTES[p.key] = ROUTE_NAMES.index(best)
    _TUNING_LOG.append({"kernel": "route", "key": list(p.key), "route": best, "best": best, "best_ms": times[best],
                        "times_ms": times, "errors": errors})


def _pass1(p: _Plan, args, buf, part) -> tuple:
    """Launch pass 1 on the route of this call; returns (route, J, W) for passes 2 and 3."""
    forced = _FORCED.get("scale")
    if forced is not None:
        route = _SPLIT if forced.SPLIT else (_STORED if forced.STORED else _RECOMPUTE)
        if route != _RECOMPUTE and not p.stored_ok:
            raise ValueError(f"forced stored route, but K ({gram_floats(p.G, p.U, p.P)} floats) does not fit in a "
                             f"row's output ({p.G}x{p.S}), or DRIFT_TRITON_STORED=0")
        J, W = 1, p.S
        if route == _SPLIT:
            J, W = (split_blocks(p.G, p.U, p.P, p.S, p.B, 0, J=int(_FORCED["split"])) if "split" in _FORCED
                    else p.split)
            if J < 2:
                raise ValueError(f"forced split route, but {p.G}x{p.S} rows do not split into >= 2 blocks that "
                                 f"hold K (blocks are multiples of {_SPLIT_ALIGN} columns)")
        reduce_cfg = _FORCED.get("reduce") or candidates("reduce", p.G, p.U, p.P, p.S)[0]
        _launch_pass1(p, args, buf, part, route, (forced, reduce_cfg), J, W)
        return route, J, W
    cached = p.cfg.get("pass1")
    if cached is not None:
        route, cfgs = cached
        J, W = p.split if route == _SPLIT else (1, p.S)
        _launch_pass1(p, args, buf, part, route, cfgs, J, W)
        return route, J, W
    if p.key not in _ROUTES:
        _choose_route(p, args, buf, part)
    route = _ROUTES[p.key]
    offered = _routes_offered(p)
    if route not in offered:  # decided for other rows of the same key (split where these rows do not split)
        route = offered[-1] if route > offered[-1] else _RECOMPUTE
    try:
        cfgs = _run_pass1(p, args, buf, part, route)
    except RuntimeError:
        if route == _RECOMPUTE:
            raise
        route = _ROUTES[p.key] = _RECOMPUTE  # no configuration of the stored pass 1 compiles: recompute
        cfgs = _run_pass1(p, args, buf, part, route)
    p.cfg["pass1"] = (route, cfgs)
    J, W = p.split if route == _SPLIT else (1, p.S)
    return route, J, W


def _pass23(p: _Plan, kernel: str, extra: tuple, run: Callable[[int], Config], launch: Callable[[Config], None],
            route: int) -> Config:
    """Launch pass 2 or 3 on the route of the latest pass 1 with this plan; returns the config that ran. A
    stored pass without a config that compiles falls back to the recompute kernel, which does not read the
    buffer (always correct)."""
    forced = _FORCED.get(kernel)
    if forced is not None:
        if forced.STORED and route == _RECOMPUTE:
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
        if route == _RECOMPUTE:
            raise
        cfg = run(_RECOMPUTE)
    p.cfg[ck] = cfg
    return cfg


# ---------------------------------------------------------------------------------------------------
# The three passes (drift._field_ops.three_pass strings them together)
# ---------------------------------------------------------------------------------------------------

def field_scale_sums(gen, pos, neg=None, neg_weight=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: ([sum_{b,i,m} dist*tw, G * sum_{b,m} tw] in fp64, buf [*batch, G, S] in the compute dtype).

    buf becomes the force in pass 3; on the stored routes it carries the rows' Gram matrices until then."""
    p = _plan(gen, pos, neg, neg_weight)
    args = p.args(gen, pos, neg, neg_weight)
    buf = torch.empty(p.batch + (p.G, p.S), dtype=p.acc_dt, device=p.device)
    part = torch.empty((p.B, 2), dtype=torch.float64, device=p.device)
    p.route = _pass1(p, args, buf, part)
    return part.sum(0), buf


def field_sumsq(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization) -> torch.Tensor:
    """Pass 2: [sum over rows of ||force_R||^2 (scaled coordinates) for each R, B * G * S] in fp64, given the
    global fp64 scale sums of pass 1."""
    p = _plan(gen, pos, neg, neg_weight)
    args = p.args(gen, pos, neg, neg_weight)
    route, _, W = p.route or (_RECOMPUTE, 1, p.S)
    nR = len(temperatures)
    norm = NORM_CODES[normalization]
    consts = _consts(temperatures, p.S, p.device, p.acc_dt)
    part = torch.empty((p.B, nR + 1), dtype=torch.float64, device=p.device)
    _pass23(p, "sumsq", (norm, nR),
            lambda rt: _run_sumsq(p, args, buf, sums, consts, part, nR, norm, rt, W),
            lambda c: _launch_sumsq(p, args, buf, sums, consts, part, nR, norm, W, c), route)
    return part.sum(0)


def field_force(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization):
    """Pass 3: writes the force into buf (in place) and returns (loss [*batch], scalars [2 + nR]) with
    scalars = [scale, scale_inputs, force_rms...], from the global fp64 sums of passes 1 and 2."""
    p = _plan(gen, pos, neg, neg_weight)
    args = p.args(gen, pos, neg, neg_weight)
    route, J, W = p.route or (_RECOMPUTE, 1, p.S)
    nR = len(temperatures)
    norm = NORM_CODES[normalization]
    consts = _consts(temperatures, p.S, p.device, p.acc_dt)
    loss = torch.empty(p.batch if J == 1 else (p.B * J,), dtype=p.acc_dt, device=p.device)  # (written flat)
    scalars = torch.empty(2 + nR, dtype=p.acc_dt, device=p.device)
    cfg = _pass23(p, "force", (norm, nR, J),
                  lambda rt: _run_force(p, args, buf, sums, stats, consts, loss, scalars, nR, norm, rt, J, W),
                  lambda c: _launch_force(p, args, buf, sums, stats, consts, loss, scalars, nR, norm, J, W, c), route)
    if J > 1:  # one partial per (row, block) on the split route, unless pass 3 fell back to recompute
        loss = (loss.view(p.B, J).sum(1) if cfg.STORED else loss[:p.B]).view(p.batch)
    return loss, scalars


def route_of(gen, pos, neg=None, neg_weight=None) -> Optional[str]:
    """"recompute", "stored" or "split": the route that calls with inputs like these take, once one ran."""
    p = _plan(gen, pos, neg, neg_weight)
    cached = p.cfg.get("pass1")
    if cached is not None:
        return ROUTE_NAMES[cached[0]]
    route = _ROUTES.get(p.key)
    return None if route is None else ROUTE_NAMES[route]


def compile_tasks(G: int = 64, U: int = 16, P: int = 64, S_values=(64, 256, 640, 4096),
                  nR: int = 3) -> List[Tuple[str, Config]]:
    """(kernel, config) for every candidate the tuner may try at these row shapes (each one compile; the split
    route's pass 1 and reduction compile once for every S, see warm_compile, and its pass 3 is the stored
    route's compiled kernel: J and the block width are run-time arguments)."""
    tasks: List[Tuple[str, Config]] = []
    for kernel in ("scale", "sumsq", "force", "reduce"):
        for S in S_values:
            cands = candidates(kernel, G, U, P, S, nR) if kernel != "reduce" else []
            if stored_fits(G, U, P, S) and kernel != "reduce":
                cands = cands + candidates(kernel, G, U, P, S, nR, stored=True)
            if split_blocks(G, U, P, S, 1, 2 ** 30)[0] >= 2 and kernel in ("scale", "reduce"):
                cands = cands + candidates(kernel, G, U, P, S, nR, stored=True, split=True)
            for c in cands:
                if (kernel, c) not in tasks:
                    tasks.append((kernel, c))
    return tasks


def warm_compile(kernel: str, config: Config, dtype: torch.dtype, G: int = 64, U: int = 16, P: int = 64,
                 S: int = 64, device: str = "cuda") -> str:
    """Compile one (kernel, config) by launching it on one contiguous row with weighted negatives, so that a
    later launch with the same specialization (dtype, strides divisible by 16, G, U, P) loads it from
    Triton's on-disk cache instead of compiling. Stored-route configs run at the smallest S (a multiple of 16)
    where K fits, split ones at two blocks, on a buffer of random numbers (only the compile matters). Returns
    "ok" or the error (e.g. out of shared memory). Benchmarks call it from several processes at once (compiles
    are single-threaded). Under the interpreter (device="cpu") it only runs the kernel."""
    if config.SPLIT:
        w_min = split_blocks(G, U, P, 1 << 30, 1, 0, J=1 << 30)[1]  # the narrowest block that holds K
        S = max(S, 2 * w_min)
    elif config.STORED:
        S = max(S, -(-gram_floats(G, U, P) // (16 * G)) * 16)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    gen, pos, neg, w = rand(1, G, S), rand(1, P, S), rand(1, U, S), rand(1, U).abs()
    temps = (0.02, 0.05, 0.2)
    try:
        p = _make_plan(gen, pos, neg, w)
        J, W = split_blocks(G, U, P, S, 1, 0, J=2) if config.SPLIT else (1, S)
        args = p.args(gen, pos, neg, w)
        buf = torch.randn(1, G, S, generator=g, device=device).to(p.acc_dt).abs()
        part = torch.empty((1, 4), dtype=torch.float64, device=device)
        sums = torch.ones(2, dtype=torch.float64, device=device)
        stats = torch.ones(len(temps) + 1, dtype=torch.float64, device=device)
        consts = _consts(temps, S, gen.device, p.acc_dt)
        if kernel == "scale":
            if config.SPLIT:
                _launch_part(p, args, buf, J, W, config)
            else:
                _launch_scale(p, args, buf, part, config)
        elif kernel == "reduce":
            _launch_reduce(p, args, buf, part, J, W, config)
        elif kernel == "sumsq":
            _launch_sumsq(p, args, buf, sums, consts, part, len(temps), 0, S, config)
        else:
            loss = torch.empty(J, dtype=p.acc_dt, device=device)
            scalars = torch.empty(5, dtype=p.acc_dt, device=device)
            _launch_force(p, args, buf, sums, stats, consts, loss, scalars, len(temps), 0, J, W, config)
        if gen.is_cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (a config that does not fit is an expected outcome here)
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"
    return "ok"


# ---------------------------------------------------------------------------------------------------
# Custom-op registration (torch.compile traces these through their fake kernels)
# ---------------------------------------------------------------------------------------------------

def _acc_dtype(gen: torch.Tensor) -> torch.dtype:
    return torch.float64 if gen.dtype == torch.float64 else torch.float32


@torch.library.custom_op("drift::triton_field_scale_sums", mutates_args=())
def triton_field_scale_sums(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                            neg_weight: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return field_scale_sums(gen, pos, neg, neg_weight)


@triton_field_scale_sums.register_fake
def _(gen, pos, neg, neg_weight):
    return gen.new_empty((2,), dtype=torch.float64), gen.new_empty(gen.shape, dtype=_acc_dtype(gen))


@torch.library.custom_op("drift::triton_field_sumsq", mutates_args=())
def triton_field_sumsq(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                       neg_weight: Optional[torch.Tensor], buf: torch.Tensor, sums: torch.Tensor,
                       temperatures: List[float], normalization: str) -> torch.Tensor:
    return field_sumsq(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization)


@triton_field_sumsq.register_fake
def _(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization):
    return gen.new_empty((len(temperatures) + 1,), dtype=torch.float64)


@torch.library.custom_op("drift::triton_field_force", mutates_args=("buf",))
def triton_field_force(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                       neg_weight: Optional[torch.Tensor], buf: torch.Tensor, sums: torch.Tensor,
                       stats: torch.Tensor, temperatures: List[float],
                       normalization: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return field_force(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization)


@triton_field_force.register_fake
def _(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization):
    dt = _acc_dtype(gen)
    return gen.new_empty(gen.shape[:-2], dtype=dt), gen.new_empty((2 + len(temperatures),), dtype=dt)


class FieldOps(NamedTuple):
    name: str
    scale_sums: object
    sumsq: object
    force: object
    carries_dot: bool = False
    # drift._field_ops.three_pass protocol of these ops: pass 1 returns (sums, buf); passes 2 and 3 take buf and
    # the global fp64 sums and derive scale and RMS on the device; pass 3 writes the force into buf and returns
    # (loss, [scale, scale_inputs, force_rms...]).
    fused_stats: bool = True


_EAGER_OPS = FieldOps("triton", field_scale_sums, field_sumsq, field_force)


def field_ops() -> FieldOps:
    """The three pass ops, in the order and signatures drift._field_ops.three_pass expects: the registered
    custom ops while torch.compile traces (they have fake kernels), the plain functions otherwise (the same
    code without the dispatcher's ~20 us per op)."""
    if torch.compiler.is_compiling():
        return FieldOps("triton", torch.ops.drift.triton_field_scale_sums, torch.ops.drift.triton_field_sumsq,
                        torch.ops.drift.triton_field_force)
    return _EAGER_OPS
