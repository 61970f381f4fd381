// Vectorised exp for kdloss's CPU kernels.
//
// `vexp(Vectorized<float>)` is a Cody-Waite range reduction plus a degree-7 Taylor polynomial on
// |r| ≤ ln2/2 (truncation error < 5e-9 relative), ≈2 ulp overall and about 3× the throughput of
// Sleef's u10 exp that `Vectorized<float>::exp()` calls: exp is what bounds a streaming softmax on
// AVX2 hosts (docs/building.md: ~1.5 Gelem/s per core with Sleef). Results below FLT_MIN flush to 0
// (exp(-inf) = 0), above exp(88.376) give +inf, NaN propagates. fp64 (and builds without AVX2)
// use ATen's `exp()`.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace kdloss {
namespace cpu {

inline at::vec::Vectorized<double> vexp(const at::vec::Vectorized<double>& x) { return x.exp(); }

inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  const __m256 v = x;
  const __m256 lo = _mm256_set1_ps(-87.336544f);  // ln(FLT_MIN)
  const __m256 hi = _mm256_set1_ps(88.376262f);   // 127.5·ln 2: 2^n stays a normal float
  const __m256 underflow = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
  const __m256 overflow = _mm256_cmp_ps(v, hi, _CMP_GT_OQ);
  // max/min return their second operand when either is NaN, so NaN passes through the clamps
  const __m256 c = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = c − n·ln2 with ln2 split in two so that n·ln2_hi is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), c);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  out = _mm256_blendv_ps(out, _mm256_setzero_ps(), underflow);
  out = _mm256_blendv_ps(out, _mm256_set1_ps(INFINITY), overflow);
  return out;
#else
  return x.exp();
#endif
}

// exp(x) for x ≤ 0 (−inf included; no NaN): vexp without the overflow branch, n = round(x·log2 e) taken
// from the bits of x·log2 e + 1.5·2^23. kCoarse: a degree-5 polynomial, ≈2.5e-6 relative — for
// bf16/fp16 inputs, whose own rounding (≥ 4.9e-4) dwarfs it — instead of degree 7 (≈2 ulp).
template <bool kCoarse = false>
inline at::vec::Vectorized<double> vexp_nonpositive(const at::vec::Vectorized<double>& x) {
  return x.exp();
}

template <bool kCoarse = false>
inline at::vec::Vectorized<float> vexp_nonpositive(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  const __m256 v = x;
  const __m256 lo = _mm256_set1_ps(-87.336544f);       // ln(FLT_MIN)
  const __m256 shifter = _mm256_set1_ps(12582912.0f);  // 1.5·2^23: its ulp is 1
  const __m256 underflow = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
  const __m256 c = _mm256_max_ps(v, lo);
  // t = shifter + n exactly, n = round(c·log2 e) ∈ [−126, 0]
  const __m256 t = _mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(t, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), c);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p;
  if constexpr (kCoarse) {
    p = _mm256_set1_ps(1.0f / 120.0f);
  } else {
    p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  }
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n: the biased exponent n + 127 from t's low bits (t's bit pattern is 0x4B400000 + n)
  const __m256i bits = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 127));
  const __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23)));
  return _mm256_andnot_ps(underflow, out);
#else
  return x.exp();
#endif
}

}  // namespace cpu
}  // namespace kdloss
