// Wide accumulation for CPU kernels whose sums cancel (included by csrc/cpu/*.cpp only).
//
// * `Wide<scalar_t>`: fp64 for fp32 and fp64 data, fp32 for bf16/fp16 (whose eps is 2^16 times
//   larger, so fp32 is already exact enough). Use it where a result is a small difference of large
//   terms and the kernel is bound by memory traffic, not arithmetic.
// * `WideIO<stored_t, wide_t>`: loads/stores `Vectorized<wide_t>::size()` elements stored as
//   stored_t, converting in registers (fp32 ↔ fp64 with one AVX instruction on AVX2 builds).
#pragma once

#include <type_traits>

#include "kdloss/cpu_utils.h"

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
#include <immintrin.h>
#endif

namespace kdloss {
namespace cpu {

template <typename scalar_t>
using Wide = std::conditional_t<std::is_same_v<scalar_t, float>, double, Acc<scalar_t>>;

template <typename stored_t, typename wide_t>
struct WideIO : VecIO<stored_t> {
  static_assert(std::is_same_v<Acc<stored_t>, wide_t>, "no conversion from this stored type to this wide type");
};

template <>
struct WideIO<float, double> {
  using Vec = at::vec::Vectorized<double>;
  static constexpr int64_t size() { return Vec::size(); }
  static Vec load(const float* p) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    static_assert(Vec::size() == 4, "AVX2 Vectorized<double> holds 4 lanes");
    return Vec(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#else
    __at_align__ double buf[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) buf[i] = static_cast<double>(p[i]);
    return Vec::loadu(buf);
#endif
  }
  static void store(float* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    _mm_storeu_ps(p, _mm256_cvtpd_ps(v));
#else
    __at_align__ double buf[Vec::size()];
    v.store(buf);
    for (int64_t i = 0; i < Vec::size(); ++i) p[i] = static_cast<float>(buf[i]);
#endif
  }
};

// Horizontal sum of the lanes, in lane order (at::vec's generic reduction for double goes through
// a load per lane; this is the same order with one store).
template <typename acc_t>
acc_t wide_sum(const at::vec::Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, double>) {
    __at_align__ double lanes[at::vec::Vectorized<double>::size()];
    v.store(lanes);
    double total = lanes[0];
    for (int64_t i = 1; i < at::vec::Vectorized<double>::size(); ++i) total += lanes[i];
    return total;
  } else {
    return vec_sum(v);
  }
}

}  // namespace cpu
}  // namespace kdloss
