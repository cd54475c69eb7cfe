"""Device code of the split stored route of the fused drifting field (field_device.py has the other kernels and
every helper): pass 1 per (row, column block) and the per-row reduction of the blocks' Gram matrices. Host code
launches them from field_launch.py; design note: ../docs/field_kernels.md (relative to this folder).

Imports only triton (this package may not import drift/).
"""
import triton
import triton.language as tl

from .field_device import _diag, _distances, _gram, _load_k_gen, _load_k_rest, _neg_weights, _row_bases, \
    _scale_sums_out, _store_k

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
