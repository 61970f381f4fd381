// Shared helpers for kdloss's CPU kernels (included by csrc/cpu/*.cpp only).
//
// * `Acc<scalar_t>`: the accumulation type (fp32 for fp32/bf16/fp16, fp64 for fp64).
// * `VecIO<scalar_t>`: loads/stores `Vectorized<Acc>::size()` elements of scalar_t, converting
//   bf16/fp16 to fp32 in registers.
// * `ordered_sum`: a pairwise sum whose order depends only on the length, never on the thread
//   count, so reductions are bitwise reproducible across `torch.set_num_threads`.
// * `check_cpu_float`: a TORCH_CHECK_VALUE wrapper (ValueError in Python) for the kernels' own
//   preconditions, next to the checks shared with the CUDA glue (kdloss/op_checks.h: reduction
//   codes, accumulation dtype, unit inner stride, upstream gradient); the Python entry points
//   validate user input before reaching them.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "kdloss/op_checks.h"

namespace kdloss {
namespace cpu {

template <typename scalar_t>
using Acc = at::opmath_type<scalar_t>;

template <typename scalar_t>
struct VecIO {
  using acc_t = Acc<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t size() { return Vec::size(); }
  static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static void store(scalar_t* p, const Vec& v) { v.store(p); }
};

template <typename reduced_t>
struct VecIOReduced {
  using acc_t = float;
  using Vec = at::vec::Vectorized<float>;
  static constexpr int64_t size() { return Vec::size(); }
  static Vec load(const reduced_t* p) {
    Vec out;
    at::vec::load_to_float<reduced_t>(p, out);
    return out;
  }
  static void store(reduced_t* p, const Vec& v) {
    // pack (v, v) into one reduced vector (round-to-nearest-even) and store its first half
    at::vec::convert_from_float<reduced_t>(v, v).store(p, Vec::size());
  }
};

template <>
struct VecIO<at::BFloat16> : VecIOReduced<at::BFloat16> {};
template <>
struct VecIO<at::Half> : VecIOReduced<at::Half> {};

// Horizontal sum of the lanes of a vector accumulator.
template <typename acc_t>
acc_t vec_sum(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Pairwise sum of x[0..n) in a fixed order (blocks of 64 summed sequentially, then halves).
template <typename acc_t>
acc_t ordered_sum(const acc_t* x, int64_t n) {
  constexpr int64_t kLeaf = 64;
  if (n <= kLeaf) {
    acc_t s = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i];
    return s;
  }
  const int64_t half = ((n / kLeaf + 1) / 2) * kLeaf;
  return ordered_sum(x, half) + ordered_sum(x + half, n - half);
}

// Grain size for at::parallel_for over rows that each cost about `work_per_row` elements.
inline int64_t row_grain(int64_t work_per_row) {
  constexpr int64_t kMinWorkPerTask = 16384;
  const int64_t w = work_per_row > 0 ? work_per_row : 1;
  return (kMinWorkPerTask + w - 1) / w;
}

// A float option of an op, passed as a one-element float64 CPU tensor (kdloss/_ops: float_arg).
inline double float_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.numel() == 1, name,
                    " must be a one-element float64 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
                    t.device());
  return *t.const_data_ptr<double>();
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
                    t.scalar_type());
}

// The upstream gradient `grad` of an op's loss, a CPU tensor (see kdloss::upstream_grad).
inline at::Tensor checked_grad(const at::Tensor& grad, Reduction reduction, at::IntArrayRef none_shape,
                               at::ScalarType dtype) {
  check_cpu_float(grad, "grad");
  return upstream_grad(grad, reduction, none_shape, dtype);
}

}  // namespace cpu
}  // namespace kdloss
