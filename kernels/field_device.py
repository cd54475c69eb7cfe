"""Device code of the fused drifting field: the @triton.jit helpers and the five kernels (one program per row,
or per (row, column block) on the split route). Host code launches them from field_launch.py.

Design note (math, routes, memory traffic, accuracy): ../docs/field_kernels.md (relative to this folder).
The targets are never concatenated: they stay three blocks, gen X [G, S], neg N [U, S] and pos Y [P, S],
each padded on its own to a power of two (>= 16 for tl.dot). GEMMs are 3xTF32 on GPU (_mma).

Imports only triton (this package may not import drift/).
"""
import triton
import triton.language as tl

# Official constants (drift/field/core.py holds the same numbers; tests/kernels/test_field_tuning.py compares
# them). They appear as literals inside the kernels (DIST_EPS 1e-8, SCALE_EPS 1e-3, SELF_MASK 100,
# AFFINITY_EPS 1e-6, and NEG_BIG for padded logits); these names document them. RMS_EPS reaches the kernels
# in the constants tensor (field_launch._consts), so that fp64 calls floor at the fp64 value, as torch.clamp
# does on the host.
DIST_EPS = 1e-8
SCALE_EPS = 1e-3
SELF_MASK = 100.0
AFFINITY_EPS = 1e-6
RMS_EPS = 1e-8
NEG_BIG = -1.0e30  # finite "minus infinity" for padded lanes, so max/exp never produce NaN


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


# A multi-key launch (field_multi.py) runs the rows of several feature keys of one row shape and S as one grid:
# key k owns the rows [start_k, start_k + B_k), and a table row of KEY_FIELDS int64 per key gives
#   start_k, B2_k, element offsets of gen/neg/pos/w from the launch's base tensors, then the strides
#   sg_b1 sg_b2 sg_n, sn_b1 sn_b2 sn_n, sp_b1 sp_b2 sp_n, sw_b1 sw_b2
# (the feature-axis strides sg_s, sn_s, sp_s and sw_u are the same for every key: kernel arguments).
KEY_FIELDS = tl.constexpr(17)


@triton.jit
def _aligned(x, AL: tl.constexpr):
    """x, known to the compiler as a multiple of AL (the host checked it is one): a loaded offset or stride
    carries no divisibility information, which the vectorized chunk loads need."""
    return (x // AL) * AL


@triton.jit
def _key_bases(pid, tab_ptr, NK, gen_ptr, neg_ptr, pos_ptr, w_ptr, AL: tl.constexpr):
    """(key, row within the key, base pointers of the row, sg_n, sn_n, sp_n) of global row pid in a
    multi-key launch. The key is found by a scan of the keys' first rows (NK is a few tens)."""
    key = pid * 0
    for j in range(1, NK):
        key += (tl.load(tab_ptr + j * KEY_FIELDS) <= pid).to(tl.int32)
    t = tab_ptr + key.to(tl.int64) * KEY_FIELDS
    row = pid - tl.load(t)
    B2 = tl.load(t + 1)
    b1 = row // B2
    b2 = row % B2
    gen_row = gen_ptr + _aligned(tl.load(t + 2), AL) + b1 * _aligned(tl.load(t + 6), AL) \
        + b2 * _aligned(tl.load(t + 7), AL)
    neg_row = neg_ptr + _aligned(tl.load(t + 3), AL) + b1 * _aligned(tl.load(t + 9), AL) \
        + b2 * _aligned(tl.load(t + 10), AL)
    pos_row = pos_ptr + _aligned(tl.load(t + 4), AL) + b1 * _aligned(tl.load(t + 12), AL) \
        + b2 * _aligned(tl.load(t + 13), AL)
    w_row = w_ptr + tl.load(t + 5) + b1 * tl.load(t + 15) + b2 * tl.load(t + 16)
    sg_n = _aligned(tl.load(t + 8), AL)
    sn_n = _aligned(tl.load(t + 11), AL)
    sp_n = _aligned(tl.load(t + 14), AL)
    return key, row, gen_row, neg_row, pos_row, w_row, sg_n, sn_n, sp_n


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
    Gram estimate sum_i c_i K c_i^T (see field_launch.GRAM_RTOL)."""
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
@triton.jit(do_not_specialize=["B2", "NK"])
def _field_scale_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, buf_ptr, out_ptr, tab_ptr, NK, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr, BG: tl.constexpr,
                        BU: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr,
                        STORED: tl.constexpr, MULTI: tl.constexpr, AL: tl.constexpr):
    """Pass 1: out[b] = (sum_{i,m} dist[i, m] * tw[m], G * sum_m tw[m]) in fp64. STORED: the sweep forms the
    whole target Gram matrix K and stores it in the row's output buffer for passes 2 and 3. MULTI: the rows of
    NK keys (tab_ptr, see _key_bases); b indexes them all, as do buf and out."""
    pid = tl.program_id(0)
    if MULTI:
        _, _, gen_row, neg_row, pos_row, w_row, sg_n, sn_n, sp_n = _key_bases(pid, tab_ptr, NK, gen_ptr, neg_ptr,
                                                                          pos_ptr, w_ptr, AL)
    else:
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


@triton.jit(do_not_specialize=["B2", "NK"])
def _field_sumsq_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, buf_ptr, sums_ptr, consts_ptr, out_ptr, spread_tol,
                        kw, NR, tab_ptr, NK, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        NORM: tl.constexpr, HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BG: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
                        PREC: tl.constexpr, ROUTE: tl.constexpr, MULTI: tl.constexpr, AL: tl.constexpr):
    """Pass 2: out[b, r] = ||force_r||^2 of row b in scaled coordinates (before the RMS normalization), fp64,
    and out[b, NR] = G * S (the count of the mean). ROUTE 0: stream T once per R; 1: form K in one sweep,
    then ||c T||^2 = sum c K c^T; 2 (stored): read K from pass 1's buffer, no S sweep, except for an R whose
    Gram estimate is ill-conditioned (spread * spread_tol > estimate), which is streamed instead. kw: the
    width of the buffer's first column block, which holds K (S, or W on the split stored route). MULTI: as in
    pass 1, each row reading its key's sums (sums_ptr + 2 * key)."""
    pid = tl.program_id(0)
    if MULTI:
        key, _, gen_row, neg_row, pos_row, w_row, sg_n, sn_n, sp_n = _key_bases(pid, tab_ptr, NK, gen_ptr,
                                                                            neg_ptr, pos_ptr, w_ptr, AL)
    else:
        key = 0
        gen_row, neg_row, pos_row, w_row = _row_bases(pid, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                      sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    scale, sc, si = _scales(sums_ptr + 2 * key, consts_ptr, ACC)
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


@triton.jit(do_not_specialize=["B2", "J", "NK"])
def _field_force_kernel(gen_ptr, neg_ptr, pos_ptr, w_ptr, buf_ptr, sums_ptr, stats_ptr, consts_ptr, loss_ptr,
                        scalars_ptr, J, W, NR, tab_ptr, NK, B2, G, U, P, S,
                        sg_b1, sg_b2, sg_n, sg_s, sn_b1, sn_b2, sn_n, sn_s, sp_b1, sp_b2, sp_n, sp_s,
                        sw_b1, sw_b2, sw_u,
                        NORM: tl.constexpr, HAS_NEG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BG: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
                        PREC: tl.constexpr, STORED: tl.constexpr, MULTI: tl.constexpr, AL: tl.constexpr):
    """Pass 3: buf[b] = force = sum_R c_R T / (rms_R * scale_inputs) [G, S], loss[b] = mean(force[b]^2), with
    rms_R = sqrt(max(stats[R] / stats[NR], 1e-8)) from the global fp64 sums; program 0 also writes
    scalars = [scale, scale_inputs, sqrt(stats[R] / stats[NR]) for each R]. STORED: the distances come from
    the K that pass 1 left in buf[b], which this program then overwrites with the force. J > 1 (split stored
    route): program (b, j) does the columns of block j (the first J-1 W wide, the last to S) with the copy
    of K in that block, and loss_ptr[b * J + j] gets that block's part of the row's loss. MULTI (J = 1): as
    in pass 1; each row reads its key's sums and stats, and each key's first row writes its key's scalars
    (scalars_ptr + key * (2 + NR))."""
    pid = tl.program_id(0)
    row = pid // J
    j = pid % J
    if MULTI:
        key, key_row, gen_row, neg_row, pos_row, w_row, sg_n, sn_n, sp_n = _key_bases(row, tab_ptr, NK, gen_ptr,
                                                                                  neg_ptr, pos_ptr, w_ptr, AL)
    else:
        key = 0
        key_row = row
        gen_row, neg_row, pos_row, w_row = _row_bases(row, B2, gen_ptr, neg_ptr, pos_ptr, w_ptr, sg_b1, sg_b2,
                                                      sn_b1, sn_b2, sp_b1, sp_b2, sw_b1, sw_b2)
    sums_ptr += 2 * key
    stats_ptr += (NR + 1) * key
    scalars_ptr += (NR + 2) * key
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
    if (key_row == 0) & (j == 0):
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


@triton.jit(do_not_specialize=["C"])
def _segment_sum_kernel(part_ptr, seg_ptr, out_ptr, C, BR: tl.constexpr, BC: tl.constexpr):
    """out[k, :] = sum of the fp64 rows part[seg[k]:seg[k + 1], :C] (program k), in a fixed order: the rows go
    to BR lanes by their position from seg[k], so a key's sums come out bit for bit the same whether its rows
    are reduced alone or as one segment of a multi-key launch (and do not depend on scheduling)."""
    k = tl.program_id(0)
    r0 = tl.load(seg_ptr + k)
    r1 = tl.load(seg_ptr + k + 1)
    offs_r = tl.arange(0, BR)
    offs_c = tl.arange(0, BC)
    acc = tl.zeros((BR, BC), dtype=tl.float64)
    for r in range(r0, r1, BR):
        rows = r + offs_r
        ok = (rows[:, None] < r1) & (offs_c[None, :] < C)
        acc += tl.load(part_ptr + rows[:, None] * C + offs_c[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + k * C + offs_c, tl.sum(acc, axis=0), mask=offs_c < C)
