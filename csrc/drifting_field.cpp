// Fused drifting field for CPU tensors: three ops, one per pass (scale sums, sums of squares, force),
// orchestrated from Python (drift/field/three_pass.py, drift/field/cpp_driver.py) so the two global
// reductions can be all-reduced across ranks between passes.
//
//   drift::field_scale_sums(gen, pos, neg?, neg_weight?) -> ([2] fp64, gram [B, KN])
//       [sum_{b,i,m} dist * tw,  G * sum_{b,m} tw]                       (step 3; scale = ratio)
//   drift::field_sumsq(gen, pos, neg?, neg_weight?, gram, scale, temperatures, normalization)
//       -> ([nR] fp64, coef [B, nR, G, M])
//       sum_{b,i,s} force_R^2 for every R, in scaled coordinates          (step 7, before the RMS)
//   drift::field_force(gen, pos, neg?, coef, scale, rms) -> (force, loss)
//       force = sum_R force_R / rms_R  [*batch, G, S];  loss = mean_{i,s} force^2  [*batch]
//   drift::field_cpu_isa() -> str: the instruction set the row code runs with ("avx512", "avx2", "baseline")
// The two global sums stay fp64 until the caller has all-reduced them across ranks, so ranks holding parts
// of the rows get the single-process scale and RMS to the last fp32 bit (bar a rounding tie).
//
// Inputs are [*batch, n, S] with any number of batch dims and arbitrary strides (per-location views of
// feature maps are read in place), in fp32/bf16/fp16 (computed in fp32) or fp64 (computed in fp64).
//
// Per row (b) a pass that needs the targets copies the M = G+U+P of them [gen, neg, pos] once into a
// thread-local contiguous tile, centred on their mean. Distances are translation invariant, and the force
// coefficients c' of a row sum to zero (c'_ii absorbs -rowsum(c)), so force_i = sum_m c'_im t_m holds for
// centred targets too; centring keeps the expanded-form distance and the Gram blocks free of the
// cancellation a large common offset would cause. The work per row (csrc/field_row.h):
//   Pass 1 copies the targets and forms the blocks of K = T T^T the later passes need, kept in `gram`:
//   X T^T [G, M] (X = gen, T = all targets; gives the distances), the M squared norms, and, on the Gram
//   route, N Y^T [U, U+P] and P P^T [P, P] (N = neg, P = pos, Y = [neg, pos]). The symmetric parts are
//   multiplied once, by row blocks from the diagonal on.
//   Pass 2 forms the coefficients c'_R of every temperature (kept in `coef` for pass 3) and needs no targets
//   on the Gram route: ||force_R||^2 = sum_i c'_i K c'_i^T, with the [nR*G, M] x [M, M] product run on the
//   upper block triangle of K only (off-diagonal blocks doubled), 2/3 of the full product here. For narrow
//   features the forces C'_R T are formed directly instead (cheaper there); the route is fixed by the row
//   shape in pass 1.
//   Pass 3 copies the targets again and forms the force with one [G, M] x [M, S] product of
//   sum_R c'_R / rms_R: no exp is evaluated twice.
// The two-axis softmax runs on the [G, M] tile in L1/L2 with a branch-free exp the compiler vectorizes.
// The row code is compiled three times, for baseline x86-64, AVX2+FMA and AVX-512 (F, VL, BW, DQ), and the
// best one the CPU has runs (DRIFT_FIELD_ISA=baseline|avx2 caps it). Large GEMMs go to the BLAS behind
// ATen (at::mm_out on the thread's buffers), small ones are inline loops. Rows are handed to the threads
// one at a time from a shared counter (a thread slowed by other load does fewer rows); per-row partial sums
// are reduced in fp64 in row order, so results do not depend on the thread count.
#include "field_row.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DRIFT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DRIFT_TARGET_AVX2
#endif

namespace drift {
namespace {

using namespace cpu_field;

// Pass 1 fixes the route of pass 2 from the row shape alone, costing it for this many temperatures (the
// official R_list); the result does not depend on the route, only the work does.
constexpr int64_t kRouteTemps = 3;

Norm parse_norm(const std::string& s) {
  if (s == "xy") return Norm::XY;
  if (s == "y") return Norm::Y;
  if (s == "none") return Norm::None;
  TORCH_CHECK(false, "drift field: normalization must be 'xy', 'y' or 'none', got '", s, "'");
}

// The instruction sets the row code is compiled for; the best one the CPU has runs, or a lower one when
// DRIFT_FIELD_ISA names it (to test every variant on one machine).
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

Isa cpu_isa() {
  const char* env = std::getenv("DRIFT_FIELD_ISA");
  const std::string want = env ? env : "auto";
  int cap = -1;
  for (int k = 0; k < 3; ++k)
    if (want == kIsaNames[k]) cap = k;
  TORCH_CHECK(cap >= 0 || want == "auto" || want.empty(),
              "drift field: DRIFT_FIELD_ISA must be 'auto', 'baseline', 'avx2' or 'avx512', got '", want, "'");
  int have = 0;
#ifdef DRIFT_X86
  static const int best = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                              ? 2
                              : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
  have = best;
#endif
  return static_cast<Isa>(cap >= 0 ? std::min(cap, have) : have);
}

// ------------------------------------------------------------------------------------------------------
// Inputs
// ------------------------------------------------------------------------------------------------------

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
  // Multiply-adds of pass 2 per row (with pass 1's extra blocks): Gram route vs forming the forces.
  const int64_t G = p.G, U = p.U, P = p.P, M = p.M;
  const int64_t blocks = U * (U + P) + P * P;
  const int64_t gram_macs = blocks * p.S + kRouteTemps * G * (G * G + (G + U) * U + M * P);
  p.gram = gram_macs < kRouteTemps * G * M * p.S;
  p.KN = G * M + M + (p.gram ? blocks : 0);
  return p;
}

// ------------------------------------------------------------------------------------------------------
// Row scheduling
// ------------------------------------------------------------------------------------------------------

// What the row functions of passes 2 and 3 need beyond the row.
template <typename acc_t>
struct PassArgs {
  double sc = 0, si = 0;
  const std::vector<double>* temps = nullptr;
  Norm norm = Norm::XY;
  std::vector<acc_t> f;  // pass 3: 1 / (rms_R * scale_inputs)
};

// Each pass's row function once per instruction set, the same source inlined into each.
template <Isa isa>
struct Rows;
#define DRIFT_ROW_FNS(ISA, TARGET)                                                                            \
  template <>                                                                                                 \
  struct Rows<ISA> {                                                                                          \
    template <typename Tile, typename acc_t = typename Tile::acc_t>                                           \
    TARGET static double pass1(Tile& t, int64_t b, acc_t* st) {                                               \
      return t.pass1(b, st);                                                                                  \
    }                                                                                                         \
    template <typename Tile, typename acc_t = typename Tile::acc_t>                                           \
    TARGET static void pass2(Tile& t, int64_t b, const acc_t* st, const PassArgs<acc_t>& a, acc_t* C,       \
                             double* part) {                                                                  \
      t.pass2(b, st, static_cast<acc_t>(a.sc), a.si, *a.temps, a.norm, C, part);                             \
    }                                                                                                         \
    template <typename Tile, typename acc_t = typename Tile::acc_t>                                           \
    TARGET static acc_t pass3(Tile& t, int64_t b, const acc_t* C, const PassArgs<acc_t>& a, acc_t* fb) {      \
      return t.pass3(b, C, a.f, fb);                                                                          \
    }                                                                                                         \
  };
DRIFT_ROW_FNS(Isa::Baseline, )
DRIFT_ROW_FNS(Isa::Avx2, DRIFT_TARGET_AVX2)
DRIFT_ROW_FNS(Isa::Avx512, DRIFT_TARGET_AVX512)
#undef DRIFT_ROW_FNS

// f(std::integral_constant<Isa, isa>) for the run-time isa, so each variant instantiates its own tile type.
template <typename F>
void with_isa(Isa isa, F&& f) {
  switch (isa) {
    case Isa::Avx512: return f(std::integral_constant<Isa, Isa::Avx512>{});
    case Isa::Avx2: return f(std::integral_constant<Isa, Isa::Avx2>{});
    default: return f(std::integral_constant<Isa, Isa::Baseline>{});
  }
}

// fn(tile, b) for every row b, each thread with its own tile, rows taken one at a time from a shared counter.
template <typename Tile, typename Fn>
void for_rows(const Problem& p, Fn&& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.B));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Tile tile(p);
    for (int64_t b = next++; b < p.B; b = next++) fn(tile, b);
  });
}

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

// The [B, KN] Gram blocks pass 1 returned, as a contiguous compute-dtype tensor.
at::Tensor checked_gram(const at::Tensor& gram, const Problem& p, at::ScalarType acc) {
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == p.B && gram.size(1) == p.KN,
              "drift field: gram must be the [B, ", p.KN, "] tensor field_scale_sums returned for these inputs, got ",
              gram.sizes());
  TORCH_CHECK(gram.scalar_type() == acc, "drift field: gram has dtype ", gram.scalar_type(), ", expected ", acc);
  return gram.contiguous();
}

double scale_inputs_of(double scale, int64_t S) {
  return std::max(scale / std::sqrt(static_cast<double>(S)), kScaleEps);
}

// ------------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> field_scale_sums_cpu(const at::Tensor& gen, const at::Tensor& pos,
                                                        const std::optional<at::Tensor>& neg,
                                                        const std::optional<at::Tensor>& neg_weight) {
  const auto acc = acc_type(gen);
  Problem p = make_problem(gen, pos, neg, neg_weight, acc);
  const Isa isa = cpu_isa();
  std::vector<double> part(p.B, 0.0);
  auto gram = at::empty({p.B, p.KN}, gen.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "field_scale_sums", [&] {
    using acc_t = acc_of<scalar_t>;
    acc_t* st = gram.data_ptr<acc_t>();
    with_isa(isa, [&](auto I) {
      using Tile = RowTile<scalar_t, acc_t, I.value>;
      for_rows<Tile>(p, [&](Tile& t, int64_t b) { part[b] = Rows<I.value>::pass1(t, b, st + b * p.KN); });
    });
  });
  double num = 0;
  for (double v : part) num += v;
  double wsum = static_cast<double>(p.B) * static_cast<double>(p.G + p.P);
  if (p.U > 0) wsum += p.w.sum(at::kDouble).item<double>();
  auto out = at::empty({2}, gen.options().dtype(at::kDouble));
  out.data_ptr<double>()[0] = num;
  out.data_ptr<double>()[1] = wsum * static_cast<double>(p.G);
  return {out, gram};
}

std::tuple<at::Tensor, at::Tensor> field_sumsq_cpu(const at::Tensor& gen, const at::Tensor& pos,
                                                   const std::optional<at::Tensor>& neg,
                                                   const std::optional<at::Tensor>& neg_weight,
                                                   const at::Tensor& gram, const at::Tensor& scale,
                                                   c10::ArrayRef<double> temperatures,
                                                   c10::string_view normalization) {
  const auto acc = acc_type(gen);
  Problem p = make_problem(gen, pos, neg, neg_weight, acc);
  const auto temps = temps_of(temperatures);
  const Norm norm = parse_norm(std::string(normalization));
  const int64_t nR = static_cast<int64_t>(temps.size());
  TORCH_CHECK(scale.numel() == 1, "drift field: scale must be a single value");
  const double sc = scale.item<double>();
  const auto gc = checked_gram(gram, p, acc);
  const Isa isa = cpu_isa();
  std::vector<double> part(p.B * nR, 0.0);
  auto coef = at::empty({p.B, nR, p.G, p.M}, gen.options().dtype(acc));
  const int64_t CN = nR * p.G * p.M;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "field_sumsq", [&] {
    using acc_t = acc_of<scalar_t>;
    PassArgs<acc_t> args;
    args.sc = sc;
    args.si = scale_inputs_of(sc, p.S);
    args.temps = &temps;
    args.norm = norm;
    const acc_t* st = gc.data_ptr<acc_t>();
    acc_t* co = coef.data_ptr<acc_t>();
    with_isa(isa, [&](auto I) {
      using Tile = RowTile<scalar_t, acc_t, I.value>;
      for_rows<Tile>(p, [&](Tile& t, int64_t b) {
        Rows<I.value>::pass2(t, b, st + b * p.KN, args, co + b * CN, part.data() + b * nR);
      });
    });
  });
  auto out = at::zeros({nR}, gen.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t r = 0; r < nR; ++r) o[r] += part[b * nR + r];
  return {out, coef};
}

std::tuple<at::Tensor, at::Tensor> field_force_cpu(const at::Tensor& gen, const at::Tensor& pos,
                                                   const std::optional<at::Tensor>& neg, const at::Tensor& coef,
                                                   const at::Tensor& scale, const at::Tensor& rms) {
  const auto acc = acc_type(gen);
  Problem p = make_problem(gen, pos, neg, std::nullopt, acc);
  TORCH_CHECK(scale.numel() == 1, "drift field: scale must be a single value");
  const int64_t nR = rms.numel();
  TORCH_CHECK(nR >= 1 && coef.dim() == 4 && coef.size(0) == p.B && coef.size(1) == nR && coef.size(2) == p.G &&
                  coef.size(3) == p.M,
              "drift field: coef must be the [B, nR, G, M] tensor field_sumsq returned for these inputs with one "
              "rms per temperature, got coef ", coef.sizes(), " and ", nR, " rms values");
  TORCH_CHECK(coef.scalar_type() == acc, "drift field: coef has dtype ", coef.scalar_type(), ", expected ", acc);
  const auto cc = coef.contiguous();
  const double si = scale_inputs_of(scale.item<double>(), p.S);
  auto rms64 = rms.to(at::kDouble).contiguous();
  const Isa isa = cpu_isa();

  std::vector<int64_t> fshape = p.batch;
  fshape.push_back(p.G);
  fshape.push_back(p.S);
  auto force = at::empty(fshape, gen.options().dtype(acc));
  auto loss = at::empty(p.batch, gen.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "field_force", [&] {
    using acc_t = acc_of<scalar_t>;
    PassArgs<acc_t> args;
    for (int64_t r = 0; r < nR; ++r) args.f.push_back(static_cast<acc_t>(1.0 / (rms64.data_ptr<double>()[r] * si)));
    const acc_t* co = cc.data_ptr<acc_t>();
    acc_t* fo = force.data_ptr<acc_t>();
    acc_t* lo = loss.data_ptr<acc_t>();
    const int64_t CN = nR * p.G * p.M;
    with_isa(isa, [&](auto I) {
      using Tile = RowTile<scalar_t, acc_t, I.value>;
      for_rows<Tile>(p, [&](Tile& t, int64_t b) {
        lo[b] = Rows<I.value>::pass3(t, b, co + b * CN, args, fo + b * p.G * p.S);
      });
    });
  });
  return {force, loss};
}

std::string field_cpu_isa() { return kIsaNames[static_cast<int>(cpu_isa())]; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(drift, m) {
  m.def("field_scale_sums(Tensor gen, Tensor pos, Tensor? neg, Tensor? neg_weight) -> (Tensor, Tensor)");
  m.def("field_sumsq(Tensor gen, Tensor pos, Tensor? neg, Tensor? neg_weight, Tensor gram, Tensor scale, "
        "float[] temperatures, str normalization) -> (Tensor, Tensor)");
  m.def("field_force(Tensor gen, Tensor pos, Tensor? neg, Tensor coef, Tensor scale, Tensor rms) -> (Tensor, Tensor)");
  m.def("field_cpu_isa() -> str", &field_cpu_isa);
}

TORCH_LIBRARY_IMPL(drift, CPU, m) {
  m.impl("field_scale_sums", &field_scale_sums_cpu);
  m.impl("field_sumsq", &field_sumsq_cpu);
  m.impl("field_force", &field_force_cpu);
}

}  // namespace drift
