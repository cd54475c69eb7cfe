// Fused drifting field for CPU tensors: three ops, one per pass (scale sums, sums of squares, force),
// orchestrated from Python (drift/field/three_pass.py, drift/field/cpp_driver.py) so the two global
// reductions can be all-reduced across ranks between passes.
//
//   drift::field_scale_sums(gen, pos, neg?, neg_weight?) -> ([2] fp64, dot [B, G, M])
//       [sum_{b,i,m} dist * tw,  G * sum_{b,m} tw]                       (step 3; scale = ratio)
//   drift::field_sumsq(gen, pos, neg?, neg_weight?, dot, scale, temperatures, normalization) -> [nR] fp64
//       sum_{b,i,s} force_R^2 for every R, in scaled coordinates          (step 7, before the RMS)
// The two global sums stay fp64 until the caller has all-reduced them across ranks, so ranks holding parts
// of the rows get the single-process scale and RMS to the last fp32 bit (bar a rounding tie).
//   drift::field_force(gen, pos, neg?, neg_weight?, dot, scale, rms, temperatures, normalization) -> (force, loss)
//       force = sum_R force_R / rms_R  [*batch, G, S];  loss = mean_{i,s} force^2  [*batch]
//
// Inputs are [*batch, n, S] with any number of batch dims and arbitrary strides (per-location views of
// feature maps are read in place), in fp32/bf16/fp16 (computed in fp32) or fp64 (computed in fp64).
//
// Per row (b) every pass copies the M = G+U+P targets once into a thread-local contiguous buffer, centred
// on their mean. Distances are translation invariant, and the force coefficients c' of a row sum to zero
// (c'_ii absorbs -rowsum(c)), so force_i = sum_m c'_im t_m holds for centred targets too. Centring keeps
// the expanded-form distance and the Gram-matrix norms free of the cancellation a large common offset
// would cause. The row tile is then:
//   Gram block  D = X T^T  [G, M]  (one GEMM, G*M*S MACs) -> dist;
//   pass 2, for wide features (S > M), forms K = T T^T [M, M] (the [U+P]^2 block is one more GEMM) and
//   gets each ||force_R||^2 from sum_i c'_i K c'_i^T, one [nR*G, M] x [M, M] GEMM, never forming a [G, S]
//   force; for narrow features it forms the nR forces [G, S] directly, which is then cheaper;
//   pass 3 forms C = sum_R c'_R / rms_R and the force with one [G, M] x [M, S] GEMM.
// Pass 1 hands its Gram block X T^T ([B, G, M], one tensor for all temperatures, the size of a single
// distance matrix) to passes 2 and 3, which saves them a third of their GEMM work; nothing else of size
// [B, G, M] is allocated, and nothing per temperature.
// The two-axis softmax runs in registers/L1 on the [G, M] tile with a branch-free exp the compiler
// vectorizes; large GEMMs go to the BLAS behind ATen (at::mm_out on the thread's buffers), small ones
// are inline loops (gemm_rm).
// Rows are distributed with at::parallel_for; per-row partial sums are reduced in fp64 in row order, so
// results do not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace drift {
namespace {

// The official constants (see drift/field/core.py).
constexpr double kDistEps = 1e-8;
constexpr double kScaleEps = 1e-3;
constexpr double kSelfMask = 100.0;
constexpr double kAffinityEps = 1e-6;

enum class Norm { XY, Y, None };

Norm parse_norm(const std::string& s) {
  if (s == "xy") return Norm::XY;
  if (s == "y") return Norm::Y;
  if (s == "none") return Norm::None;
  TORCH_CHECK(false, "drift field: normalization must be 'xy', 'y' or 'none', got '", s, "'");
}

// exp(x) for x <= 0 in fp32 without branches, so loops calling it vectorize. Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, and a degree-6 polynomial: ~1 ulp, the same as libm on this range.
// Below -87 the result flushes to 0 (libm returns denormals there; every use here is either floored at
// 1e-3 afterwards or summed with O(1) terms).
inline float exp_nonpos(float x) {
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
inline double exp_nonpos(double x) { return std::exp(x); }

// Row-major C[m, n] = A[m, k] * op(B) with op(B) = B[k, n], or B^T when B is stored [n, k] (trans_b).
// Large products go through at::mm_out on borrowed buffers, i.e. the BLAS ATen was built with (MKL here;
// inside at::parallel_for it runs single-threaded, one row tile per thread). Small ones - the many-row,
// few-feature problems of per-location feature keys (e.g. G = 16, M = 56, S = 4) - are plain loops: there
// the ~10 us of wrapping and dispatching a BLAS call per row costs far more than the arithmetic.
constexpr int64_t kSmallGemmMacs = 1 << 15;

template <typename acc_t>
void gemm_rm(int64_t m, int64_t n, int64_t k, const acc_t* A, const acc_t* B, bool trans_b, acc_t* C) {
  if (m * n * k <= kSmallGemmMacs) {
    if (trans_b) {
      for (int64_t i = 0; i < m; ++i) {
        const acc_t* a = A + i * k;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t* bj = B + j * k;
          acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t l = 0; l < k; ++l) acc += a[l] * bj[l];
          C[i * n + j] = acc;
        }
      }
    } else {
      for (int64_t i = 0; i < m; ++i) {
        acc_t* c = C + i * n;
        std::fill(c, c + n, acc_t(0));
        for (int64_t l = 0; l < k; ++l) {
          const acc_t a = A[i * k + l];
          const acc_t* bl = B + l * n;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) c[j] += a * bl[j];
        }
      }
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto a = at::from_blob(const_cast<acc_t*>(A), {m, k}, {k, 1}, opts);
  auto b = trans_b ? at::from_blob(const_cast<acc_t*>(B), {k, n}, {1, k}, opts)
                   : at::from_blob(const_cast<acc_t*>(B), {k, n}, {n, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {n, 1}, opts);
  at::mm_out(c, a, b);
}

// ------------------------------------------------------------------------------------------------------
// Input views
// ------------------------------------------------------------------------------------------------------

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

View make_view(const at::Tensor& t) {
  View v;
  const int64_t nb = t.dim() - 2;
  v.data = t.data_ptr();
  v.n = t.size(nb);
  v.stride_n = t.stride(nb);
  v.stride_s = t.stride(nb + 1);
  for (int64_t d = 0; d < nb; ++d) {
    v.bsizes.push_back(t.size(d));
    v.bstrides.push_back(t.stride(d));
  }
  return v;
}

struct Problem {
  View gen, pos, neg;
  at::Tensor w;  // [B, U] contiguous, compute dtype (empty when U == 0)
  int64_t B = 0, G = 0, U = 0, P = 0, M = 0, S = 0;
  std::vector<int64_t> batch;
};

Problem make_problem(const at::Tensor& gen, const at::Tensor& pos, const std::optional<at::Tensor>& neg,
                     const std::optional<at::Tensor>& neg_weight, at::ScalarType acc) {
  TORCH_CHECK(gen.dim() >= 3, "drift field: gen must be [*batch, G, S], got ", gen.sizes());
  TORCH_CHECK(pos.dim() == gen.dim(), "drift field: pos must have the batch dims of gen");
  TORCH_CHECK(gen.device().is_cpu() && pos.device().is_cpu(), "drift field (cpp): tensors must be on the CPU");
  const int64_t nb = gen.dim() - 2;
  Problem p;
  p.batch = gen.sizes().slice(0, nb).vec();
  TORCH_CHECK(pos.sizes().slice(0, nb).vec() == p.batch, "drift field: pos batch dims differ from gen");
  TORCH_CHECK(pos.scalar_type() == gen.scalar_type(), "drift field: pos dtype differs from gen dtype");
  p.B = 1;
  for (auto s : p.batch) p.B *= s;
  p.G = gen.size(nb);
  p.S = gen.size(nb + 1);
  p.P = pos.size(nb);
  TORCH_CHECK(pos.size(nb + 1) == p.S, "drift field: pos S differs from gen S");
  TORCH_CHECK(p.G >= 1 && p.P >= 1 && p.S >= 1, "drift field: need G >= 1, P >= 1, S >= 1");
  p.gen = make_view(gen);
  p.pos = make_view(pos);
  if (neg.has_value() && neg->size(nb) > 0) {
    const auto& n = *neg;
    TORCH_CHECK(n.dim() == gen.dim() && n.sizes().slice(0, nb).vec() == p.batch,
                "drift field: neg batch dims differ from gen");
    TORCH_CHECK(n.size(nb + 1) == p.S, "drift field: neg S differs from gen S");
    TORCH_CHECK(n.scalar_type() == gen.scalar_type(), "drift field: neg dtype differs from gen dtype");
    TORCH_CHECK(n.device().is_cpu(), "drift field (cpp): tensors must be on the CPU");
    p.neg = make_view(n);
    p.U = n.size(nb);
    if (neg_weight.has_value()) {
      TORCH_CHECK(neg_weight->numel() == p.B * p.U, "drift field: neg_weight must be [*batch, U]");
      p.w = neg_weight->to(acc).contiguous().reshape({p.B, p.U});
    } else {
      p.w = at::ones({p.B, p.U}, gen.options().dtype(acc));
    }
  }
  p.M = p.G + p.U + p.P;
  return p;
}

// ------------------------------------------------------------------------------------------------------
// Per-row tile
// ------------------------------------------------------------------------------------------------------

template <typename in_t, typename acc_t>
struct RowTile {
  const Problem& p;
  std::vector<acc_t> T;     // [M, S] centred targets [gen, neg, pos]
  std::vector<acc_t> tw;    // [M] target weights
  std::vector<acc_t> nrm;   // [M] squared norms of the centred targets
  std::vector<acc_t> dot;   // [G, M] X T^T
  std::vector<acc_t> dist;  // [G, M]
  std::vector<acc_t> L, E;  // [G, M] softmax scratch
  std::vector<acc_t> cs;    // [G] / [M] reductions
  std::vector<acc_t> rs;

  explicit RowTile(const Problem& prob)
      : p(prob), T(prob.M * prob.S), tw(prob.M), nrm(prob.M), dot(prob.G * prob.M), dist(prob.G * prob.M),
        L(prob.G * prob.M), E(prob.G * prob.M), cs(prob.M), rs(prob.G) {}

  void copy_rows(const View& v, int64_t b, int64_t first) {
    const in_t* base = static_cast<const in_t*>(v.data) + v.row_offset(b);
    for (int64_t j = 0; j < v.n; ++j) {
      const in_t* src = base + j * v.stride_n;
      acc_t* dst = T.data() + (first + j) * p.S;
      if (v.stride_s == 1) {
        for (int64_t s = 0; s < p.S; ++s) dst[s] = static_cast<acc_t>(src[s]);
      } else {
        for (int64_t s = 0; s < p.S; ++s) dst[s] = static_cast<acc_t>(src[s * v.stride_s]);
      }
    }
  }

  // Load row b: targets (centred), weights, norms, and the distance tile. The Gram block X T^T comes from
  // `dot_in` when pass 1 saved it ([G, M] of this row), else from a GEMM; `dot_out` receives it.
  void load(int64_t b, const acc_t* dot_in = nullptr, acc_t* dot_out = nullptr) {
    const int64_t G = p.G, U = p.U, M = p.M, S = p.S;
    copy_rows(p.gen, b, 0);
    if (U > 0) copy_rows(p.neg, b, G);
    copy_rows(p.pos, b, G + U);
    std::vector<acc_t>& mu = cs;  // reuse [M] scratch; M >= 1 but S may exceed M
    if (static_cast<int64_t>(mu.size()) < S) mu.resize(S);
    std::fill(mu.begin(), mu.begin() + S, acc_t(0));
    for (int64_t m = 0; m < M; ++m) {
      const acc_t* t = T.data() + m * S;
      for (int64_t s = 0; s < S; ++s) mu[s] += t[s];
    }
    const acc_t invM = acc_t(1) / static_cast<acc_t>(M);
    for (int64_t s = 0; s < S; ++s) mu[s] *= invM;
    for (int64_t m = 0; m < M; ++m) {
      acc_t* t = T.data() + m * S;
      acc_t acc = 0;
      for (int64_t s = 0; s < S; ++s) {
        t[s] -= mu[s];
        acc += t[s] * t[s];
      }
      nrm[m] = acc;
    }
    for (int64_t m = 0; m < G; ++m) tw[m] = 1;
    if (U > 0) {
      const acc_t* w = p.w.data_ptr<acc_t>() + b * U;
      for (int64_t u = 0; u < U; ++u) tw[G + u] = w[u];
    }
    for (int64_t m = G + U; m < M; ++m) tw[m] = 1;
    if (dot_in != nullptr) {
      std::copy(dot_in, dot_in + G * M, dot.begin());
    } else {
      gemm_rm<acc_t>(G, M, S, T.data(), T.data(), /*trans_b=*/true, dot.data());  // dot = X T^T
    }
    if (dot_out != nullptr) std::copy(dot.begin(), dot.end(), dot_out);
    // Norms of the generated rows from the same GEMM, so each self-distance is exactly 0 before the floor
    // (as in exact arithmetic), not sqrt of the rounding difference between two summation orders.
    for (int64_t i = 0; i < G; ++i) nrm[i] = dot[i * M + i];
    for (int64_t i = 0; i < G; ++i) {
      const acc_t ni = nrm[i];
      const acc_t* di = dot.data() + i * M;
      acc_t* out = dist.data() + i * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        const acc_t d2 = ni + nrm[m] - acc_t(2) * di[m];
        out[m] = std::sqrt(d2 > acc_t(kDistEps) ? d2 : acc_t(kDistEps));
      }
    }
  }

  double weighted_dist_sum() const {
    double total = 0;
    for (int64_t i = 0; i < p.G; ++i) {
      const acc_t* di = dist.data() + i * p.M;
      acc_t acc = 0;
      for (int64_t m = 0; m < p.M; ++m) acc += di[m] * tw[m];
      total += static_cast<double>(acc);
    }
    return total;
  }

  // Coefficients c' [G, M] for temperature R (written to `out`): affinities A (normalization, then the
  // weights), c- = -A- * rowsum(A+), c+ = A+ * rowsum(A-), and c'_ii -= rowsum(c) so force_i = sum_m c'_im t_m.
  // Every buffer is read through a local raw pointer: through std::vector members GCC cannot prove the
  // loops free of aliasing and leaves them scalar.
  void coefficients(acc_t scale, acc_t R, Norm norm, acc_t* out) {
    const int64_t G = p.G, M = p.M, GU = p.G + p.U;
    const acc_t inv = acc_t(1) / (std::max(scale, acc_t(kScaleEps)) * R);
    const acc_t mask = acc_t(kSelfMask) / R;
    const acc_t* __restrict distp = dist.data();
    const acc_t* __restrict twp = tw.data();
    acc_t* __restrict Lp = L.data();
    acc_t* __restrict Ep = E.data();
    acc_t* __restrict rsp = rs.data();
    if (static_cast<int64_t>(nrm_scratch_.size()) < M) nrm_scratch_.resize(M);
    acc_t* __restrict cmax = nrm_scratch_.data();
    acc_t* __restrict csp = cs.data();
    for (int64_t i = 0; i < G; ++i) {
      const acc_t* __restrict di = distp + i * M;
      acc_t* __restrict li = Lp + i * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) li[m] = -di[m] * inv;
      li[i] -= mask;
    }
    // Row softmax (over targets m): E = exp(L - rowmax), rs = 1 / row sums.
    if (norm != Norm::None) {
      for (int64_t i = 0; i < G; ++i) {
        const acc_t* __restrict li = Lp + i * M;
        acc_t* __restrict ei = Ep + i * M;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t m = 0; m < M; ++m) mx = li[m] > mx ? li[m] : mx;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t m = 0; m < M; ++m) {
          const acc_t e = exp_nonpos(li[m] - mx);
          ei[m] = e;
          sum += e;
        }
        rsp[i] = acc_t(1) / sum;
      }
    }
    if (norm == Norm::XY) {
      // Column softmax (over the G generated rows): L <- exp(L - colmax), cs = 1 / column sums.
      for (int64_t m = 0; m < M; ++m) cmax[m] = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < G; ++i) {
        const acc_t* __restrict li = Lp + i * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) cmax[m] = li[m] > cmax[m] ? li[m] : cmax[m];
      }
      for (int64_t m = 0; m < M; ++m) csp[m] = acc_t(0);
      for (int64_t i = 0; i < G; ++i) {
        acc_t* __restrict li = Lp + i * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) {
          const acc_t e = exp_nonpos(li[m] - cmax[m]);
          li[m] = e;
          csp[m] += e;
        }
      }
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) csp[m] = acc_t(1) / csp[m];
      // A = sqrt(max(p_row * p_col, 1e-6)) * tw
      for (int64_t i = 0; i < G; ++i) {
        const acc_t r = rsp[i];
        const acc_t* __restrict li = Lp + i * M;
        acc_t* __restrict ei = Ep + i * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) {
          const acc_t prod = (ei[m] * r) * (li[m] * csp[m]);
          ei[m] = std::sqrt(prod > acc_t(kAffinityEps) ? prod : acc_t(kAffinityEps)) * twp[m];
        }
      }
    } else if (norm == Norm::Y) {
      for (int64_t i = 0; i < G; ++i) {
        const acc_t r = rsp[i];
        acc_t* __restrict ei = Ep + i * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ei[m] = ei[m] * r * twp[m];
      }
    } else {
      for (int64_t i = 0; i < G; ++i) {
        const acc_t* __restrict li = Lp + i * M;
        acc_t* __restrict ei = Ep + i * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ei[m] = exp_nonpos(li[m]) * twp[m];
      }
    }
    for (int64_t i = 0; i < G; ++i) {
      const acc_t* __restrict ai = Ep + i * M;
      acc_t* __restrict ci = out + i * M;
      acc_t sneg = 0, spos = 0, rowsum = 0;
#pragma omp simd reduction(+ : sneg)
      for (int64_t m = 0; m < GU; ++m) sneg += ai[m];
#pragma omp simd reduction(+ : spos)
      for (int64_t m = GU; m < M; ++m) spos += ai[m];
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

  std::vector<acc_t> nrm_scratch_;
};

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::ScalarType acc_type(const at::Tensor& gen) {
  return gen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<double> temps_of(c10::ArrayRef<double> temperatures) {
  TORCH_CHECK(!temperatures.empty(), "drift field: temperatures must be non-empty");
  for (double r : temperatures) TORCH_CHECK(r > 0 && std::isfinite(r), "drift field: temperatures must be > 0");
  return std::vector<double>(temperatures.begin(), temperatures.end());
}

// The [B, G, M] Gram block pass 1 returned, as a contiguous compute-dtype tensor.
at::Tensor checked_dot(const at::Tensor& dot, const Problem& p, at::ScalarType acc) {
  TORCH_CHECK(dot.dim() == 3 && dot.size(0) == p.B && dot.size(1) == p.G && dot.size(2) == p.M,
              "drift field: dot must be the [B, G, M] tensor field_scale_sums returned for these inputs, got ",
              dot.sizes());
  TORCH_CHECK(dot.scalar_type() == acc, "drift field: dot has dtype ", dot.scalar_type(), ", expected ", acc);
  return dot.contiguous();
}

double scale_inputs_of(double scale, int64_t S) {
  return std::max(scale / std::sqrt(static_cast<double>(S)), kScaleEps);
}

// ------------------------------------------------------------------------------------------------------
// Pass bodies (one template per pass; the ops below only dispatch on the input dtype)
// ------------------------------------------------------------------------------------------------------

template <typename in_t, typename acc_t>
void scale_sums_impl(const Problem& p, std::vector<double>& part, acc_t* dot_out) {
  at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
    RowTile<in_t, acc_t> tile(p);
    for (int64_t b = b0; b < b1; ++b) {
      tile.load(b, nullptr, dot_out + b * p.G * p.M);
      part[b] = tile.weighted_dist_sum();
    }
  });
}

// ||force_R||^2 per row takes one of two routes, whichever needs fewer multiply-adds:
//   Gram:   sum_i c'_i K c'_i^T with K = T T^T        (U+P)^2 S + nR G M^2   (wide features, S > M)
//   direct: F_R = C'_R T, then sum F_R^2              nR G M S               (narrow features, S <= M)
template <typename in_t, typename acc_t>
void sumsq_impl(const Problem& p, const acc_t* dot_in, double sc, double si, const std::vector<double>& temps,
                Norm norm, std::vector<double>& part) {
  const int64_t nR = static_cast<int64_t>(temps.size());
  const int64_t G = p.G, M = p.M, S = p.S, UP = p.U + p.P;
  const bool direct = nR * G * M * S <= UP * UP * S + nR * G * M * M;
  at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
    RowTile<in_t, acc_t> tile(p);
    std::vector<acc_t> C(nR * G * M);
    std::vector<acc_t> K(direct ? 0 : M * M), Krr(direct ? 0 : UP * UP), Z(direct ? nR * G * S : nR * G * M);
    for (int64_t b = b0; b < b1; ++b) {
      tile.load(b, dot_in + b * G * M);
      for (int64_t r = 0; r < nR; ++r)
        tile.coefficients(static_cast<acc_t>(sc), static_cast<acc_t>(temps[r]), norm, C.data() + r * G * M);
      if (direct) {
        // F = C T for all temperatures at once ([nR*G, M] x [M, S]), then the sum of squares per R.
        gemm_rm<acc_t>(nR * G, S, M, C.data(), tile.T.data(), /*trans_b=*/false, Z.data());
        for (int64_t r = 0; r < nR; ++r) {
          const acc_t* f = Z.data() + r * G * S;
          acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < G * S; ++k) acc += f[k] * f[k];
          part[b * nR + r] = static_cast<double>(acc) / (si * si);
        }
        continue;
      }
      // K = T T^T from the [G, M] block already in tile.dot and the [U+P]^2 block of the other targets.
      const acc_t* R = tile.T.data() + G * S;
      gemm_rm<acc_t>(UP, UP, S, R, R, /*trans_b=*/true, Krr.data());
      for (int64_t i = 0; i < G; ++i) {
        for (int64_t m = 0; m < M; ++m) {
          K[i * M + m] = tile.dot[i * M + m];
          K[m * M + i] = tile.dot[i * M + m];
        }
      }
      for (int64_t a = 0; a < UP; ++a)
        for (int64_t c = 0; c < UP; ++c) K[(G + a) * M + G + c] = Krr[a * UP + c];
      // Z = C K for all temperatures at once ([nR*G, M] x [M, M]), then sum_i c'_i . z_i.
      gemm_rm<acc_t>(nR * G, M, M, C.data(), K.data(), /*trans_b=*/false, Z.data());
      for (int64_t r = 0; r < nR; ++r) {
        double total = 0;
        for (int64_t i = 0; i < G; ++i) {
          const acc_t* z = Z.data() + (r * G + i) * M;
          const acc_t* c = C.data() + (r * G + i) * M;
          acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t m = 0; m < M; ++m) acc += z[m] * c[m];
          total += static_cast<double>(acc);
        }
        // A quadratic form of a nearly-zero force can round below zero; the true value is >= 0.
        part[b * nR + r] = std::max(total, 0.0) / (si * si);
      }
    }
  });
}

template <typename in_t, typename acc_t>
void force_impl(const Problem& p, const acc_t* dot_in, double sc, double si, const std::vector<double>& temps,
                const std::vector<double>& inv_rms, Norm norm, acc_t* fout, acc_t* lout) {
  const int64_t nR = static_cast<int64_t>(temps.size());
  at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
    RowTile<in_t, acc_t> tile(p);
    const int64_t G = p.G, M = p.M, S = p.S;
    std::vector<acc_t> C(G * M), Ctot(G * M);
    for (int64_t b = b0; b < b1; ++b) {
      tile.load(b, dot_in + b * G * M);
      std::fill(Ctot.begin(), Ctot.end(), acc_t(0));
      for (int64_t r = 0; r < nR; ++r) {
        tile.coefficients(static_cast<acc_t>(sc), static_cast<acc_t>(temps[r]), norm, C.data());
        const acc_t f = static_cast<acc_t>(inv_rms[r] / si);
#pragma omp simd
        for (int64_t k = 0; k < G * M; ++k) Ctot[k] += C[k] * f;
      }
      acc_t* fb = fout + b * G * S;
      gemm_rm<acc_t>(G, S, M, Ctot.data(), tile.T.data(), /*trans_b=*/false, fb);  // force = Ctot T
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < G * S; ++k) ss += fb[k] * fb[k];
      lout[b] = ss / static_cast<acc_t>(G * S);
    }
  });
}

// ------------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> field_scale_sums_cpu(const at::Tensor& gen, const at::Tensor& pos,
                                                        const std::optional<at::Tensor>& neg,
                                                        const std::optional<at::Tensor>& neg_weight) {
  const auto acc = acc_type(gen);
  Problem p = make_problem(gen, pos, neg, neg_weight, acc);
  std::vector<double> part(p.B, 0.0);
  auto dot = at::empty({p.B, p.G, p.M}, gen.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "field_scale_sums", [&] {
    using acc_t = acc_of<scalar_t>;
    scale_sums_impl<scalar_t, acc_t>(p, part, dot.data_ptr<acc_t>());
  });
  double num = 0;
  for (double v : part) num += v;
  double wsum = static_cast<double>(p.B) * static_cast<double>(p.G + p.P);
  if (p.U > 0) wsum += p.w.sum(at::kDouble).item<double>();
  auto out = at::empty({2}, gen.options().dtype(at::kDouble));
  out.data_ptr<double>()[0] = num;
  out.data_ptr<double>()[1] = wsum * static_cast<double>(p.G);
  return {out, dot};
}

at::Tensor field_sumsq_cpu(const at::Tensor& gen, const at::Tensor& pos, const std::optional<at::Tensor>& neg,
                           const std::optional<at::Tensor>& neg_weight, const at::Tensor& dot,
                           const at::Tensor& scale, c10::ArrayRef<double> temperatures,
                           c10::string_view normalization) {
  const auto acc = acc_type(gen);
  Problem p = make_problem(gen, pos, neg, neg_weight, acc);
  const auto temps = temps_of(temperatures);
  const Norm norm = parse_norm(std::string(normalization));
  const int64_t nR = static_cast<int64_t>(temps.size());
  TORCH_CHECK(scale.numel() == 1, "drift field: scale must be a single value");
  const double sc = scale.item<double>();
  const double si = scale_inputs_of(sc, p.S);
  const auto dotc = checked_dot(dot, p, acc);
  std::vector<double> part(p.B * nR, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "field_sumsq", [&] {
    using acc_t = acc_of<scalar_t>;
    sumsq_impl<scalar_t, acc_t>(p, dotc.data_ptr<acc_t>(), sc, si, temps, norm, part);
  });
  auto out = at::zeros({nR}, gen.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t r = 0; r < nR; ++r) o[r] += part[b * nR + r];
  return out;
}

std::tuple<at::Tensor, at::Tensor> field_force_cpu(const at::Tensor& gen, const at::Tensor& pos,
                                                   const std::optional<at::Tensor>& neg,
                                                   const std::optional<at::Tensor>& neg_weight,
                                                   const at::Tensor& dot, const at::Tensor& scale,
                                                   const at::Tensor& rms,
                                                   c10::ArrayRef<double> temperatures,
                                                   c10::string_view normalization) {
  const auto acc = acc_type(gen);
  Problem p = make_problem(gen, pos, neg, neg_weight, acc);
  const auto temps = temps_of(temperatures);
  const Norm norm = parse_norm(std::string(normalization));
  const int64_t nR = static_cast<int64_t>(temps.size());
  TORCH_CHECK(scale.numel() == 1, "drift field: scale must be a single value");
  TORCH_CHECK(rms.numel() == nR, "drift field: rms must hold one value per temperature");
  const double sc = scale.item<double>();
  const double si = scale_inputs_of(sc, p.S);
  const auto dotc = checked_dot(dot, p, acc);
  auto rms64 = rms.to(at::kDouble).contiguous();
  std::vector<double> inv_rms(nR);
  for (int64_t r = 0; r < nR; ++r) inv_rms[r] = 1.0 / rms64.data_ptr<double>()[r];

  std::vector<int64_t> fshape = p.batch;
  fshape.push_back(p.G);
  fshape.push_back(p.S);
  auto force = at::empty(fshape, gen.options().dtype(acc));
  auto loss = at::empty(p.batch, gen.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "field_force", [&] {
    using acc_t = acc_of<scalar_t>;
    force_impl<scalar_t, acc_t>(p, dotc.data_ptr<acc_t>(), sc, si, temps, inv_rms, norm, force.data_ptr<acc_t>(),
                                loss.data_ptr<acc_t>());
  });
  return {force, loss};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(drift, m) {
  m.def("field_scale_sums(Tensor gen, Tensor pos, Tensor? neg, Tensor? neg_weight) -> (Tensor, Tensor)");
  m.def("field_sumsq(Tensor gen, Tensor pos, Tensor? neg, Tensor? neg_weight, Tensor dot, Tensor scale, "
        "float[] temperatures, str normalization) -> Tensor");
  m.def("field_force(Tensor gen, Tensor pos, Tensor? neg, Tensor? neg_weight, Tensor dot, Tensor scale, "
        "Tensor rms, float[] temperatures, str normalization) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(drift, CPU, m) {
  m.impl("field_scale_sums", &field_scale_sums_cpu);
  m.impl("field_sumsq", &field_sumsq_cpu);
  m.impl("field_force", &field_force_cpu);
}

}  // namespace drift
