// A register-blocked GEMM micro-kernel with a fixed summation order, and the packing it reads
// (included by csrc/cpu/*.cpp only; used by the TRG contextual and graph kernels).
//
// `gemm_micro` computes a kGemmMR × gemm_nr() block of C = A · B, each element summed over k in
// order 0, 1, …, K − 1 with one fused multiply-add per step. The order depends neither on the
// element's position in C nor on the blocking around the call, so any tiling (and any thread count)
// gives bitwise identical elements; and since a·b = b·a exactly, ⟨x, y⟩ and ⟨y, x⟩ agree bitwise.
// B is read as packed panels [K][nr] (`pack_row_panels` for B = xᵀ, `pack_col_panels` for B = x).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace kdloss {
namespace cpu {

constexpr int64_t kGemmMR = 6;  // rows of the micro-kernel: 6 × 2 vector accumulators

// Columns of the micro-kernel: two vectors of acc_t.
template <typename acc_t>
constexpr int64_t gemm_nr() {
  return 2 * at::vec::Vectorized<acc_t>::size();
}

inline int64_t round_up_to(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

constexpr int64_t kGemmKC = 256;  // K per pass: a panel slice of 256 × nr stays in L1
constexpr int64_t kGemmMC = 96;   // A rows per block (a multiple of kGemmMR): 96 × 256 stays in L2

// c[r·ldc + j] (+)= Σ_k a[r·lda + k] · panel[k·nr + j] for r < kGemmMR, j < nr: overwrites c, or
// continues its sums when `accumulate` (c stored in acc_t between passes: the order is unchanged).
template <typename acc_t>
inline void gemm_micro(const acc_t* a, int64_t lda, const acc_t* panel, int64_t K, acc_t* c, int64_t ldc,
                       bool accumulate) {
  static_assert(kGemmMR == 6, "gemm_micro is unrolled for 6 rows");
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  // Twelve named accumulators, not an array: GCC keeps an array of Vectorized in memory and stores
  // every accumulator back on each k step (half the speed).
  const Vec zero(acc_t(0));
  Vec c0l = zero, c0h = zero, c1l = zero, c1h = zero, c2l = zero, c2h = zero;
  Vec c3l = zero, c3h = zero, c4l = zero, c4h = zero, c5l = zero, c5h = zero;
  if (accumulate) {
    c0l = Vec::loadu(c), c0h = Vec::loadu(c + V);
    c1l = Vec::loadu(c + ldc), c1h = Vec::loadu(c + ldc + V);
    c2l = Vec::loadu(c + 2 * ldc), c2h = Vec::loadu(c + 2 * ldc + V);
    c3l = Vec::loadu(c + 3 * ldc), c3h = Vec::loadu(c + 3 * ldc + V);
    c4l = Vec::loadu(c + 4 * ldc), c4h = Vec::loadu(c + 4 * ldc + V);
    c5l = Vec::loadu(c + 5 * ldc), c5h = Vec::loadu(c + 5 * ldc + V);
  }
  const acc_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(panel + k * 2 * V), b1 = Vec::loadu(panel + k * 2 * V + V);
    Vec ar(a0[k]);
    c0l = at::vec::fmadd(ar, b0, c0l), c0h = at::vec::fmadd(ar, b1, c0h);
    ar = Vec(a1[k]);
    c1l = at::vec::fmadd(ar, b0, c1l), c1h = at::vec::fmadd(ar, b1, c1h);
    ar = Vec(a2[k]);
    c2l = at::vec::fmadd(ar, b0, c2l), c2h = at::vec::fmadd(ar, b1, c2h);
    ar = Vec(a3[k]);
    c3l = at::vec::fmadd(ar, b0, c3l), c3h = at::vec::fmadd(ar, b1, c3h);
    ar = Vec(a4[k]);
    c4l = at::vec::fmadd(ar, b0, c4l), c4h = at::vec::fmadd(ar, b1, c4h);
    ar = Vec(a5[k]);
    c5l = at::vec::fmadd(ar, b0, c5l), c5h = at::vec::fmadd(ar, b1, c5h);
  }
  c0l.store(c), c0h.store(c + V), c1l.store(c + ldc), c1h.store(c + ldc + V);
  c2l.store(c + 2 * ldc), c2h.store(c + 2 * ldc + V), c3l.store(c + 3 * ldc), c3h.store(c + 3 * ldc + V);
  c4l.store(c + 4 * ldc), c4h.store(c + 4 * ldc + V), c5l.store(c + 5 * ldc), c5h.store(c + 5 * ldc + V);
}

// Rows [m_begin, m_end) of c [m_pad, n_pad] (row stride ldc) = a [m_pad, K] (row stride lda) · B, B
// packed as panels [n_pad / nr][K][nr]; m_begin, m_end multiples of kGemmMR, n_pad of nr. With `lower`, only the
// micro-tiles that hold an element on or below the diagonal (j ≤ i) are computed (the others are left as they are). K
// runs in slices of kGemmKC, each element's sum staying in order.
template <typename acc_t>
void gemm_rows(const acc_t* a, int64_t lda, const acc_t* panels, int64_t K, acc_t* c, int64_t ldc, int64_t m_begin,
               int64_t m_end, int64_t n_pad, bool lower) {
  constexpr int64_t nr = gemm_nr<acc_t>();
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
    const int64_t kl = std::min(kGemmKC, K - k0);
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kGemmMC) {  // a block of A rows stays in L2 …
      const int64_t m1 = std::min(m_end, m0 + kGemmMC);
      for (int64_t p0 = 0; p0 < n_pad; p0 += nr) {  // … while each panel slice streams through L1
        if (lower && p0 >= m1) break;
        const acc_t* panel = panels + (p0 / nr) * K * nr + k0 * nr;
        for (int64_t i0 = lower ? std::max(m0, p0 / kGemmMR * kGemmMR) : m0; i0 < m1; i0 += kGemmMR)
          gemm_micro(a + i0 * lda + k0, lda, panel, kl, c + i0 * ldc + p0, ldc, k0 > 0);
      }
    }
  }
}

// All rows: gemm_rows over [0, m_pad).
template <typename acc_t>
void gemm_blocked(const acc_t* a, int64_t lda, const acc_t* panels, int64_t K, acc_t* c, int64_t ldc, int64_t m_pad,
                  int64_t n_pad, bool lower) {
  gemm_rows(a, lda, panels, K, c, ldc, 0, m_pad, n_pad, lower);
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// dst[c·ldd + r] = src[r·ld + c] for r, c < 8: one 8 × 8 block transposed in registers.
inline void transpose_8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
  __m256 r[8], t[8], u[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src + q * ld);
  for (int q = 0; q < 8; q += 2) {  // pairs of rows interleaved: (r0 r1) element by element
    t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int q = 0; q < 8; q += 4) {  // quadruples of rows: columns c and c + 4 of rows q..q+3
    u[q] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(u[c], u[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ldd, _mm256_permute2f128_ps(u[c], u[c + 4], 0x31));
  }
}
#endif

// x: `rows` rows of width D (row stride ld) → out [ceil(rows / nr)][D][nr], out[p][k][j] =
// x[p·nr + j][k] (0 past the last row): the packed B operand of a product with xᵀ.
template <typename acc_t, typename src_t>
void pack_row_panels(const src_t* x, int64_t ld, int64_t rows, int64_t D, acc_t* out) {
  constexpr int64_t nr = gemm_nr<acc_t>();
  for (int64_t p0 = 0; p0 < rows; p0 += nr) {
    acc_t* panel = out + (p0 / nr) * D * nr;
    const int64_t width = std::min(nr, rows - p0);
    int64_t k_done = 0;  // columns already packed by the 8 × 8 transposes
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<src_t, float>) {
      if (width == nr) {
        for (; k_done + 8 <= D; k_done += 8)
          for (int64_t j0 = 0; j0 < nr; j0 += 8)
            transpose_8x8(x + (p0 + j0) * ld + k_done, ld, panel + k_done * nr + j0, nr);
      }
    }
#endif
    for (int64_t j = 0; j < nr; ++j) {
      if (j < width) {
        const src_t* row = x + (p0 + j) * ld;
        for (int64_t k = k_done; k < D; ++k) panel[k * nr + j] = static_cast<acc_t>(row[k]);
      } else {
        for (int64_t k = k_done; k < D; ++k) panel[k * nr + j] = acc_t(0);
      }
    }
  }
}

// x [K, D] (row stride ld) → out [ceil(D / nr)][K][nr], out[q][k][j] = x[k][q·nr + j] (0 past
// column D): the packed B operand of a product W · x.
template <typename acc_t, typename src_t>
void pack_col_panels(const src_t* x, int64_t ld, int64_t K, int64_t D, acc_t* out) {
  constexpr int64_t nr = gemm_nr<acc_t>();
  for (int64_t q0 = 0; q0 < D; q0 += nr) {
    acc_t* panel = out + (q0 / nr) * K * nr;
    const int64_t width = std::min(nr, D - q0);
    for (int64_t k = 0; k < K; ++k) {
      const src_t* row = x + k * ld + q0;
      if (width == nr) {  // a full panel row: a straight (vectorisable) copy
        for (int64_t j = 0; j < nr; ++j) panel[k * nr + j] = static_cast<acc_t>(row[j]);
      } else {
        for (int64_t j = 0; j < nr; ++j) panel[k * nr + j] = j < width ? static_cast<acc_t>(row[j]) : acc_t(0);
      }
    }
  }
}

}  // namespace cpu
}  // namespace kdloss
