// drift._C: the extension module and the `drift` op library.
//
// This file owns the TORCH_LIBRARY(drift, ...) block and the pybind11 module init. Other files in csrc/
// add ops with TORCH_LIBRARY_FRAGMENT(drift, ...) so each op keeps its schema next to its code.
//
// Op here: drift::weighted_dist_rowsum(gen[B,G,S], targets[B,M,S], tw[B,M]) -> [B]
//   out[b] = sum_{i,m} sqrt(max(|g_i|^2 + |t_m|^2 - 2 g_i.t_m, 1e-8)) * tw[b,m]
// This is pass 1 of the fused drifting field (the numerator of the global distance scale, SPEC §3.1
// step 3), with the official expanded-form distance and its 1e-8 floor. Accumulates in fp32 for
// fp32/bf16/fp16 inputs (which are upcast on entry) and in fp64 for fp64 inputs. Parallel over rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace drift {
namespace {

template <typename T>
void rowsum_kernel(const T* g, const T* t, const T* w, T* out, int64_t B, int64_t G, int64_t M, int64_t S) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> tn(M);
    for (int64_t b = b0; b < b1; ++b) {
      const T* gb = g + b * G * S;
      const T* tb = t + b * M * S;
      const T* wb = w + b * M;
      for (int64_t m = 0; m < M; ++m) {
        T acc = 0;
        for (int64_t s = 0; s < S; ++s) acc += tb[m * S + s] * tb[m * S + s];
        tn[m] = acc;
      }
      T total = 0;
      for (int64_t i = 0; i < G; ++i) {
        const T* gi = gb + i * S;
        T gn = 0;
        for (int64_t s = 0; s < S; ++s) gn += gi[s] * gi[s];
        for (int64_t m = 0; m < M; ++m) {
          const T* tm = tb + m * S;
          T dot = 0;
          for (int64_t s = 0; s < S; ++s) dot += gi[s] * tm[s];
          T d2 = gn + tn[m] - 2 * dot;
          total += std::sqrt(d2 > T(1e-8) ? d2 : T(1e-8)) * wb[m];
        }
      }
      out[b] = total;
    }
  });
}

at::Tensor weighted_dist_rowsum_cpu(const at::Tensor& gen, const at::Tensor& targets, const at::Tensor& tw) {
  TORCH_CHECK(gen.dim() == 3 && targets.dim() == 3 && tw.dim() == 2,
              "weighted_dist_rowsum: expected gen [B,G,S], targets [B,M,S], tw [B,M]");
  TORCH_CHECK(gen.size(0) == targets.size(0) && tw.size(0) == gen.size(0), "weighted_dist_rowsum: B mismatch");
  TORCH_CHECK(gen.size(2) == targets.size(2), "weighted_dist_rowsum: S mismatch");
  TORCH_CHECK(tw.size(1) == targets.size(1), "weighted_dist_rowsum: M mismatch between targets and tw");
  const auto acc = gen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto g = gen.to(acc).contiguous();
  auto t = targets.to(acc).contiguous();
  auto w = tw.to(acc).contiguous();
  auto out = at::empty({gen.size(0)}, gen.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "weighted_dist_rowsum", [&] {
    rowsum_kernel<scalar_t>(g.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), g.size(0), g.size(1), t.size(1), g.size(2));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(drift, m) {
  m.def("weighted_dist_rowsum(Tensor gen, Tensor targets, Tensor tw) -> Tensor");
}

TORCH_LIBRARY_IMPL(drift, CPU, m) {
  m.impl("weighted_dist_rowsum", &weighted_dist_rowsum_cpu);
}

}  // namespace drift

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "drift C++ ops (registered under torch.ops.drift)";
  m.def("num_threads", []() { return at::get_num_threads(); }, "intra-op threads used by at::parallel_for");
}
