// fp32 GEMM with AVX-512 for the row tiles of the CPU drifting field (csrc/field_row.h), used by the row
// code's AVX-512 variant only.
//
// Why not the BLAS: the row tiles' products are small (m, n <= a few hundred, k <= S), and the MKL that
// PyTorch ships runs its AVX2 kernels on AMD CPUs, half the fp32 FMA rate of a core with 512-bit units
// (Zen 5, recent Intel server parts). This kernel is the plain register-tiled loop: a 12 x 32 tile of C in
// 24 zmm accumulators, one row of B loaded as two 16-lane vectors per k step and each A entry broadcast,
// no packing (B's 32-column panel stays in L1 while the row blocks of A pass over it). Partial tiles use
// masked loads and stores (which never touch memory outside the mask) and fewer rows.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define DRIFT_X86 1
#define DRIFT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))

namespace drift {
namespace cpu_field {

// C[MR, 16 * NV] (row stride ldc, columns masked by m0, m1) = A[MR, k] * B[k, 16 * NV] (row stride ldb);
// A[r, l] is A[r * lda + l], or A[l * lda + r] with AT (A stored transposed).
template <int MR, int NV, bool AT>
DRIFT_TARGET_AVX512 inline void sgemm_tile(int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                                           float* C, int64_t ldc, __mmask16 m0, __mmask16 m1) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  for (int64_t l = 0; l < k; ++l) {
    const float* b = B + l * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
    const __m512 b1 = NV == 2 ? _mm512_maskz_loadu_ps(m1, b + 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(AT ? A[l * lda + r] : A[r * lda + l]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      if (NV == 2) c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, c0[r]);
    if (NV == 2) _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c1[r]);
  }
}

constexpr int kTileRows = 12;

// The last rows (fewer than kTileRows) of a column panel.
template <int MR, int NV, bool AT>
DRIFT_TARGET_AVX512 inline void sgemm_rest(int64_t rows, int64_t k, const float* A, int64_t lda, const float* B,
                                           int64_t ldb, float* C, int64_t ldc, __mmask16 m0, __mmask16 m1) {
  if (rows == MR) {
    sgemm_tile<MR, NV, AT>(k, A, lda, B, ldb, C, ldc, m0, m1);
  } else if constexpr (MR > 1) {
    sgemm_rest<MR - 1, NV, AT>(rows, k, A, lda, B, ldb, C, ldc, m0, m1);
  }
}

template <int NV, bool AT>
DRIFT_TARGET_AVX512 inline void sgemm_panel(int64_t m, int64_t k, const float* A, int64_t lda, const float* B,
                                            int64_t ldb, float* C, int64_t ldc, __mmask16 m0, __mmask16 m1) {
  auto a_rows = [&](int64_t i) { return AT ? A + i : A + i * lda; };
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows)
    sgemm_tile<kTileRows, NV, AT>(k, a_rows(i), lda, B, ldb, C + i * ldc, ldc, m0, m1);
  if (i < m) sgemm_rest<kTileRows - 1, NV, AT>(m - i, k, a_rows(i), lda, B, ldb, C + i * ldc, ldc, m0, m1);
}

// Row-major C[m, n] (ldc) = A[m, k] * B[k, n] (ldb); A[i, l] at A[i * lda + l], or at A[l * lda + i] with
// a_trans. Column panels of 32 (the last one masked), each swept by row blocks of kTileRows.
DRIFT_TARGET_AVX512 inline void sgemm_avx512(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                                             bool a_trans, const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t w = std::min<int64_t>(32, n - j);
    const __mmask16 m0 = w >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << w) - 1);
    const __mmask16 m1 = w >= 32 ? 0xFFFF : w > 16 ? static_cast<__mmask16>((1u << (w - 16)) - 1) : 0;
    if (w > 16) {
      a_trans ? sgemm_panel<2, true>(m, k, A, lda, B + j, ldb, C + j, ldc, m0, m1)
              : sgemm_panel<2, false>(m, k, A, lda, B + j, ldb, C + j, ldc, m0, m1);
    } else {
      a_trans ? sgemm_panel<1, true>(m, k, A, lda, B + j, ldb, C + j, ldc, m0, m1)
              : sgemm_panel<1, false>(m, k, A, lda, B + j, ldb, C + j, ldc, m0, m1);
    }
  }
}

}  // namespace cpu_field
}  // namespace drift

#else
#define DRIFT_TARGET_AVX512
#endif
