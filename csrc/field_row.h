// The per-row work of the fused CPU drifting field (csrc/drifting_field.cpp holds the ops, the design
// notes and the row scheduling): the row tile, its pass bodies, the vectorizable exp and the small-GEMM
// fallback. Everything here is inlined into one row function per pass and instruction set, so the same
// source compiles for baseline x86-64, AVX2+FMA and AVX-512.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemm_avx512.h"

#if defined(__GNUC__)
#define DRIFT_INLINE inline __attribute__((always_inline))
#else
#define DRIFT_INLINE inline
#endif

namespace drift {
namespace cpu_field {

// The official constants (see drift/field/core.py).
constexpr double kDistEps = 1e-8;
constexpr double kScaleEps = 1e-3;
constexpr double kSelfMask = 100.0;
constexpr double kAffinityEps = 1e-6;

enum class Norm { XY, Y, None };

// exp(x) for x <= 0 in fp32 without branches, so loops calling it vectorize. Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, and a degree-6 polynomial: ~1 ulp, the same as libm on this range.
// Below -87 the result flushes to 0 (libm returns denormals there; every use here is either floored at
// 1e-3 afterwards or summed with O(1) terms).
DRIFT_INLINE float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest by the 1.5 * 2^23 trick (|x * log2 e| < 2^22 here): unlike std::nearbyint it needs no
  // SSE4.1 round instruction, so the loop still vectorizes in a baseline x86-64 build.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float out = p * scale;
  return x <= -87.0f ? 0.0f : out;
}
DRIFT_INLINE double exp_nonpos(double x) { return std::exp(x); }

// Row-major C[m, n] (row stride ldc) = A[m, k] (lda) * op(B), op(B) = B[k, n] (ldb), or B^T when B is
// stored [n, k] (trans_b). The AVX-512 variant runs fp32 products with B[k, n] on csrc/gemm_avx512.h.
// Otherwise large products go through at::mm_out on borrowed buffers, i.e. the BLAS ATen was built with
// (MKL here; inside at::parallel_for it runs single-threaded, one row tile per thread), and small ones -
// the many-row, few-feature problems of per-location feature keys (e.g. G = 16, M = 56, S = 4) - are
// plain loops: there the ~10 us of wrapping and dispatching a BLAS call costs far more.
constexpr int64_t kSmallGemmMacs = 1 << 15;
// Row block of the symmetric Gram products in pass 1: smaller blocks skip more of the part below the
// diagonal, but the BLAS runs below its peak on fewer than ~32 rows.
constexpr int64_t kGramRows = 32;

// The instruction set a row code variant is compiled for (csrc/drifting_field.cpp picks one at run time).
enum class Isa { Baseline = 0, Avx2 = 1, Avx512 = 2 };

template <typename acc_t, Isa isa>
DRIFT_INLINE void gemm(int64_t m, int64_t n, int64_t k, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
                       bool trans_b, acc_t* C, int64_t ldc) {
#ifdef DRIFT_X86
  if constexpr (isa == Isa::Avx512 && std::is_same_v<acc_t, float>) {
    if (!trans_b) return sgemm_avx512(m, n, k, A, lda, false, B, ldb, C, ldc);
  }
#endif
  if (m * n * k <= kSmallGemmMacs) {
    for (int64_t i = 0; i < m; ++i) {
      const acc_t* __restrict a = A + i * lda;
      acc_t* __restrict c = C + i * ldc;
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) {
          const acc_t* __restrict bj = B + j * ldb;
          acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t l = 0; l < k; ++l) acc += a[l] * bj[l];
          c[j] = acc;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) c[j] = 0;
        for (int64_t l = 0; l < k; ++l) {
          const acc_t al = a[l];
          const acc_t* __restrict bl = B + l * ldb;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) c[j] += al * bl[j];
        }
      }
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto a = at::from_blob(const_cast<acc_t*>(A), {m, k}, {lda, 1}, opts);
  auto b = trans_b ? at::from_blob(const_cast<acc_t*>(B), {k, n}, {1, ldb}, opts)
                   : at::from_blob(const_cast<acc_t*>(B), {k, n}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  at::mm_out(c, a, b);
}

// One [*batch, n, S] input read in place: the element (b, j, s) is at
// data + row_offset(b) + j * stride_n + s * stride_s, with b the flat (row-major) batch index.
struct View {
  const void* data = nullptr;
  int64_t n = 0;
  int64_t stride_n = 0, stride_s = 0;
  std::vector<int64_t> bsizes, bstrides;

  int64_t row_offset(int64_t b) const {
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(bsizes.size()) - 1; d >= 0; --d) {
      off += (b % bsizes[d]) * bstrides[d];
      b /= bsizes[d];
    }
    return off;
  }
};

struct Problem {
  View gen, pos, neg;
  at::Tensor w;  // [B, U] contiguous, compute dtype (empty when U == 0)
  int64_t B = 0, G = 0, U = 0, P = 0, M = 0, S = 0;
  bool gram = false;  // pass 2 takes the Gram route (else forms the forces)
  int64_t KN = 0;     // floats of `gram` per row
  std::vector<int64_t> batch;
};

// ------------------------------------------------------------------------------------------------------
// Per-row tile (thread-local scratch and the work of one row in each pass)
// ------------------------------------------------------------------------------------------------------

template <typename in_t, typename acc_t_, Isa isa>
struct RowTile {
  using acc_t = acc_t_;
  const Problem& p;
  std::vector<acc_t> T;     // [M, S] centred targets [gen, neg, pos]
  std::vector<acc_t> TT;    // [S, M] their transpose (pass 1 of the AVX-512 variant)
  std::vector<acc_t> mu;    // [S] their mean
  std::vector<acc_t> tw;    // [M] target weights
  std::vector<acc_t> dist;  // [G, M]
  std::vector<acc_t> L, E;  // [G, M] softmax scratch
  std::vector<acc_t> cs, cmax, cmin, rs, rmin;  // [M] x 3, [G] x 2 reductions
  std::vector<acc_t> Z, K;                      // pass 2/3 scratch, sized on first use

  explicit RowTile(const Problem& prob)
      : p(prob), tw(prob.M), dist(prob.G * prob.M), L(prob.G * prob.M), E(prob.G * prob.M), cs(prob.M),
        cmax(prob.M), cmin(prob.M), rs(prob.G), rmin(prob.G) {}

  // Copy the v.n rows of one input into T from row `first` on, adding them to the column sums in mu.
  DRIFT_INLINE void copy_rows(const View& v, int64_t b, int64_t first) {
    const in_t* base = static_cast<const in_t*>(v.data) + v.row_offset(b);
    acc_t* __restrict m_ = mu.data();
    for (int64_t j = 0; j < v.n; ++j) {
      const in_t* __restrict src = base + j * v.stride_n;
      acc_t* __restrict dst = T.data() + (first + j) * p.S;
      if (v.stride_s == 1) {
#pragma omp simd
        for (int64_t s = 0; s < p.S; ++s) {
          dst[s] = static_cast<acc_t>(src[s]);
          m_[s] += dst[s];
        }
      } else {
        for (int64_t s = 0; s < p.S; ++s) {
          dst[s] = static_cast<acc_t>(src[s * v.stride_s]);
          m_[s] += dst[s];
        }
      }
    }
  }

  // The targets of row b, centred, into T; with `nrm`, their squared norms into nrm[G:M] (the norms of
  // the generated rows come from the Gram block: each self-distance is then exactly 0 before the floor).
  DRIFT_INLINE void load_targets(int64_t b, acc_t* nrm) {
    const int64_t G = p.G, M = p.M, S = p.S;
    T.resize(M * S);
    mu.resize(S);
    acc_t* __restrict m_ = mu.data();
    for (int64_t s = 0; s < S; ++s) m_[s] = 0;
    copy_rows(p.gen, b, 0);
    if (p.U > 0) copy_rows(p.neg, b, G);
    copy_rows(p.pos, b, G + p.U);
    const acc_t invM = acc_t(1) / static_cast<acc_t>(M);
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) m_[s] *= invM;
    for (int64_t m = 0; m < M; ++m) {
      acc_t* __restrict t = T.data() + m * S;
      acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t s = 0; s < S; ++s) {
        t[s] -= m_[s];
        acc += t[s] * t[s];
      }
      if (nrm != nullptr && m >= G) nrm[m] = acc;
    }
  }

  DRIFT_INLINE void load_weights(int64_t b) {
    const int64_t G = p.G, U = p.U;
    for (int64_t m = 0; m < p.M; ++m) tw[m] = 1;
    if (U > 0) {
      const acc_t* w = p.w.data_ptr<acc_t>() + b * U;
      for (int64_t u = 0; u < U; ++u) tw[G + u] = w[u];
    }
  }

  // dist [G, M] from the row's Gram block X T^T and norms (the gram layout: csrc/drifting_field.cpp).
  DRIFT_INLINE void distances(const acc_t* gram_row) {
    const int64_t G = p.G, M = p.M;
    const acc_t* __restrict nrm = gram_row + G * M;
    for (int64_t i = 0; i < G; ++i) {
      const acc_t ni = nrm[i];
      const acc_t* __restrict di = gram_row + i * M;
      acc_t* __restrict out = dist.data() + i * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        const acc_t d2 = ni + nrm[m] - acc_t(2) * di[m];
        out[m] = std::sqrt(d2 > acc_t(kDistEps) ? d2 : acc_t(kDistEps));
      }
    }
  }

  // The AVX-512 GEMM reads both factors of T T^T from T^T [S, M] (A entries broadcast along a row of it,
  // B rows loaded as vectors), so its variant of pass 1 transposes the targets once.
#ifdef DRIFT_X86
  static constexpr bool kGramFromTransposed = isa == Isa::Avx512 && std::is_same_v<acc_t, float>;
#else
  static constexpr bool kGramFromTransposed = false;
#endif

  DRIFT_INLINE void transpose_targets() {
    const int64_t M = p.M, S = p.S;
    constexpr int64_t kB = 16;
    TT.resize(M * S);
    const acc_t* __restrict t = T.data();
    acc_t* __restrict tt = TT.data();
    for (int64_t m0 = 0; m0 < M; m0 += kB)
      for (int64_t s0 = 0; s0 < S; s0 += kB)
        for (int64_t s = s0; s < std::min(s0 + kB, S); ++s)
          for (int64_t m = m0; m < std::min(m0 + kB, M); ++m) tt[s * M + m] = t[m * S + s];
  }

  // Rows [r0, r1) of K = T T^T, columns [r0, M), into out (row stride ld; column c at c - r0). The GEMMs
  // run by row blocks from each block's diagonal on, so the symmetric part left of the blocks (up to half of
  // a square region) is copied from above the diagonal instead of multiplied.
  DRIFT_INLINE void gram_rows(int64_t r0, int64_t r1, acc_t* out, int64_t ld) {
    const int64_t M = p.M, S = p.S;
    const int64_t rows = kGramFromTransposed ? kTileRows : kGramRows;
    for (int64_t a = r0; a < r1; a += rows) {
      const int64_t a1 = std::min(a + rows, r1);
      acc_t* c = out + (a - r0) * ld + (a - r0);
      if constexpr (kGramFromTransposed) {
        sgemm_avx512(a1 - a, M - a, S, TT.data() + a, M, /*a_trans=*/true, TT.data() + a, M, c, ld);
      } else {
        gemm<acc_t, isa>(a1 - a, M - a, S, T.data() + a * S, S, T.data() + a * S, S, /*trans_b=*/true, c, ld);
      }
    }
    for (int64_t i = r0 + rows; i < r1; ++i) {
      const int64_t a = r0 + (i - r0) / rows * rows;
      for (int64_t c = r0; c < a; ++c) out[(i - r0) * ld + (c - r0)] = out[(c - r0) * ld + (i - r0)];
    }
  }

  // Pass 1 of row b: fill its gram row; return sum_{i,m} dist * tw.
  DRIFT_INLINE double pass1(int64_t b, acc_t* st) {
    const int64_t G = p.G, U = p.U, P = p.P, M = p.M;
    acc_t* nrm = st + G * M;
    load_targets(b, p.gram ? nullptr : nrm);
    if constexpr (kGramFromTransposed) transpose_targets();
    gram_rows(0, G, st, M);  // X T^T
    if (p.gram) {
      acc_t* kny = nrm + M;
      acc_t* kpp = kny + U * (U + P);
      gram_rows(G, G + U, kny, U + P);  // N Y^T
      gram_rows(G + U, M, kpp, P);      // P P^T
      for (int64_t u = 0; u < U; ++u) nrm[G + u] = kny[u * (U + P) + u];
      for (int64_t q = 0; q < P; ++q) nrm[G + U + q] = kpp[q * P + q];
    }
    for (int64_t i = 0; i < G; ++i) nrm[i] = st[i * M + i];
    distances(st);
    load_weights(b);
    double total = 0;
    for (int64_t i = 0; i < G; ++i) {
      const acc_t* __restrict di = dist.data() + i * M;
      const acc_t* __restrict w = tw.data();
      acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t m = 0; m < M; ++m) acc += di[m] * w[m];
      total += static_cast<double>(acc);
    }
    return total;
  }

  // Passes 2 and 3, once per row before the temperatures: the self-mask added to the gen-gen diagonal in
  // distance units (dn = dist / scale + 100 on it, i.e. dist + 100 * scale), then the row and column minima.
  // Every logit is -dist * inv with inv = 1 / (scale * R) > 0, and rounding is monotone, so the row and
  // column maxima of the logits are exactly -min * inv for every R: no max sweep per temperature.
  DRIFT_INLINE void mask_and_minima(acc_t scale) {
    const int64_t G = p.G, M = p.M;
    const acc_t md = acc_t(kSelfMask) * std::max(scale, acc_t(kScaleEps));
    acc_t* __restrict d = dist.data();
    acc_t* __restrict rmn = rmin.data();
    acc_t* __restrict cmn = cmin.data();
    for (int64_t i = 0; i < G; ++i) d[i * M + i] += md;
    for (int64_t m = 0; m < M; ++m) cmn[m] = std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < G; ++i) {
      const acc_t* __restrict di = d + i * M;
      acc_t mn = std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(min : mn)
      for (int64_t m = 0; m < M; ++m) {
        mn = di[m] < mn ? di[m] : mn;
        cmn[m] = di[m] < cmn[m] ? di[m] : cmn[m];
      }
      rmn[i] = mn;
    }
  }

  // Coefficients c' [G, M] for temperature R (after mask_and_minima): affinities A (normalization, then the
  // weights), c- = -A- * rowsum(A+), c+ = A+ * rowsum(A-), and c'_ii -= rowsum(c) so force_i = sum_m c'_im t_m.
  // Two sweeps over the tile: the exps with the row and column sums, then per row A and c'.
  // Every buffer is read through a local raw pointer: through std::vector members GCC cannot prove the
  // loops free of aliasing and leaves them scalar.
  DRIFT_INLINE void coefficients(acc_t scale, acc_t R, Norm norm, acc_t* out) {
    const int64_t G = p.G, M = p.M, GU = p.G + p.U;
    const acc_t inv = acc_t(1) / (std::max(scale, acc_t(kScaleEps)) * R);
    const acc_t* __restrict distp = dist.data();
    const acc_t* __restrict twp = tw.data();
    const acc_t* __restrict rmn = rmin.data();
    const acc_t* __restrict cmn = cmin.data();
    acc_t* __restrict Lp = L.data();
    acc_t* __restrict Ep = E.data();
    acc_t* __restrict rsp = rs.data();
    acc_t* __restrict csp = cs.data();
    acc_t* __restrict cmx = cmax.data();
    // Sweep 1. Row softmax (over targets m): E = exp(L - rowmax); column softmax (over the G generated rows,
    // "xy" only): L = exp(L - colmax); 1 / their sums in rs, cs. "none": E = exp(L).
    if (norm == Norm::XY) {
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        cmx[m] = -cmn[m] * inv;
        csp[m] = 0;
      }
    }
    for (int64_t i = 0; i < G; ++i) {
      const acc_t* __restrict di = distp + i * M;
      acc_t* __restrict ei = Ep + i * M;
      acc_t* __restrict li = Lp + i * M;
      if (norm == Norm::None) {
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ei[m] = exp_nonpos(-di[m] * inv);
        continue;
      }
      const acc_t rmx = -rmn[i] * inv;
      acc_t sum = 0;
      if (norm == Norm::XY) {
#pragma omp simd reduction(+ : sum)
        for (int64_t m = 0; m < M; ++m) {
          const acc_t l = -di[m] * inv;
          const acc_t er = exp_nonpos(l - rmx);
          const acc_t ec = exp_nonpos(l - cmx[m]);
          ei[m] = er;
          li[m] = ec;
          sum += er;
          csp[m] += ec;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t m = 0; m < M; ++m) {
          const acc_t er = exp_nonpos(-di[m] * inv - rmx);
          ei[m] = er;
          sum += er;
        }
      }
      rsp[i] = acc_t(1) / sum;
    }
    if (norm == Norm::XY) {
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) csp[m] = acc_t(1) / csp[m];
    }
    // Sweep 2, per row: A = sqrt(max(p_row * p_col, 1e-6)) * tw ("xy"), p_row * tw ("y"), exp(L) * tw
    // ("none"), its negative and positive sums, then c'.
    for (int64_t i = 0; i < G; ++i) {
      acc_t* __restrict ai = Ep + i * M;
      const acc_t* __restrict li = Lp + i * M;
      const acc_t r = rsp[i];
      if (norm == Norm::XY) {
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) {
          const acc_t prod = (ai[m] * r) * (li[m] * csp[m]);
          ai[m] = std::sqrt(prod > acc_t(kAffinityEps) ? prod : acc_t(kAffinityEps)) * twp[m];
        }
      } else if (norm == Norm::Y) {
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ai[m] = ai[m] * r * twp[m];
      } else {
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ai[m] = ai[m] * twp[m];
      }
      acc_t sneg = 0, spos = 0, rowsum = 0;
#pragma omp simd reduction(+ : sneg)
      for (int64_t m = 0; m < GU; ++m) sneg += ai[m];
#pragma omp simd reduction(+ : spos)
      for (int64_t m = GU; m < M; ++m) spos += ai[m];
      acc_t* __restrict ci = out + i * M;
#pragma omp simd reduction(+ : rowsum)
      for (int64_t m = 0; m < GU; ++m) {
        ci[m] = -ai[m] * spos;
        rowsum += ci[m];
      }
#pragma omp simd reduction(+ : rowsum)
      for (int64_t m = GU; m < M; ++m) {
        ci[m] = ai[m] * sneg;
        rowsum += ci[m];
      }
      ci[i] -= rowsum;
    }
  }

  // Pass 2 of row b: the coefficients c'_R of every R into C [nR, G, M] (kept for pass 3), and
  // ||force_R||^2 (scaled coordinates) into part[0:nR].
  DRIFT_INLINE void pass2(int64_t b, const acc_t* st, acc_t sc, double si, const std::vector<double>& temps,
                          Norm norm, acc_t* C, double* part) {
    const int64_t nR = static_cast<int64_t>(temps.size());
    const int64_t G = p.G, U = p.U, P = p.P, M = p.M, S = p.S, nG = nR * G;
    distances(st);
    mask_and_minima(sc);
    load_weights(b);
    for (int64_t r = 0; r < nR; ++r) coefficients(sc, static_cast<acc_t>(temps[r]), norm, C + r * G * M);
    if (!p.gram) {
      // F = C T for all temperatures at once ([nR*G, M] x [M, S]), then the sum of squares per R.
      load_targets(b, nullptr);
      Z.resize(nG * S);
      gemm<acc_t, isa>(nG, S, M, C, M, T.data(), S, /*trans_b=*/false, Z.data(), S);
      for (int64_t r = 0; r < nR; ++r) {
        const acc_t* __restrict f = Z.data() + r * G * S;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < G * S; ++k) acc += f[k] * f[k];
        part[r] = static_cast<double>(acc) / (si * si);
      }
      return;
    }
    // The upper block triangle of K = T T^T over the blocks (gen, neg, pos), off-diagonal blocks doubled:
    // sum_i c'_i K c'_i^T = sum_i sum_m (C Kup)_im c'_im. Only the blocks the products below read are set.
    const acc_t* kny = st + G * M + M;
    const acc_t* kpp = kny + U * (U + P);
    K.resize(M * M);
    acc_t* __restrict Kp = K.data();
    for (int64_t i = 0; i < G; ++i) {
      const acc_t* __restrict d = st + i * M;
      acc_t* __restrict k = Kp + i * M;
      for (int64_t m = 0; m < G; ++m) k[m] = d[m];
#pragma omp simd
      for (int64_t m = G; m < M; ++m) k[m] = acc_t(2) * d[m];
    }
    for (int64_t u = 0; u < U; ++u) {
      const acc_t* __restrict d = kny + u * (U + P);
      acc_t* __restrict k = Kp + (G + u) * M + G;
      for (int64_t v = 0; v < U; ++v) k[v] = d[v];
      for (int64_t q = U; q < U + P; ++q) k[q] = acc_t(2) * d[q];
    }
    for (int64_t q = 0; q < P; ++q) std::copy(kpp + q * P, kpp + (q + 1) * P, Kp + (G + U + q) * M + G + U);
    // Z = C Kup, one column block at a time over the rows of Kup that are set in it.
    Z.resize(nG * M);
    gemm<acc_t, isa>(nG, G, G, C, M, Kp, M, false, Z.data(), M);
    if (U > 0) gemm<acc_t, isa>(nG, U, G + U, C, M, Kp + G, M, false, Z.data() + G, M);
    gemm<acc_t, isa>(nG, P, M, C, M, Kp + G + U, M, false, Z.data() + G + U, M);
    for (int64_t r = 0; r < nR; ++r) {
      double total = 0;
      for (int64_t i = 0; i < G; ++i) {
        const acc_t* __restrict z = Z.data() + (r * G + i) * M;
        const acc_t* __restrict c = C + (r * G + i) * M;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t m = 0; m < M; ++m) acc += z[m] * c[m];
        total += static_cast<double>(acc);
      }
      // A quadratic form of a nearly-zero force can round below zero; the true value is >= 0.
      part[r] = std::max(total, 0.0) / (si * si);
    }
  }

  // Pass 3 of row b, from pass 2's coefficients C [nR, G, M] and f_R = 1 / (rms_R * scale_inputs):
  // force [G, S] = (sum_R f_R c'_R) T into fb; returns its mean square (the loss).
  DRIFT_INLINE acc_t pass3(int64_t b, const acc_t* C, const std::vector<acc_t>& f, acc_t* fb) {
    const int64_t G = p.G, M = p.M, S = p.S, GM = G * M;
    Z.resize(GM);
    acc_t* __restrict ctot = Z.data();
    const acc_t* __restrict c0 = C;
#pragma omp simd
    for (int64_t k = 0; k < GM; ++k) ctot[k] = c0[k] * f[0];
    for (size_t r = 1; r < f.size(); ++r) {
      const acc_t* __restrict cr = C + r * GM;
      const acc_t fr = f[r];
#pragma omp simd
      for (int64_t k = 0; k < GM; ++k) ctot[k] += cr[k] * fr;
    }
    load_targets(b, nullptr);
    gemm<acc_t, isa>(G, S, M, ctot, M, T.data(), S, /*trans_b=*/false, fb, S);  // force = Ctot T
    acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t k = 0; k < G * S; ++k) ss += fb[k] * fb[k];
    return ss / static_cast<acc_t>(G * S);
  }
};

}  // namespace cpu_field
}  // namespace drift
