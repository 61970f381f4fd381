// Checks shared by the CPU kernels (csrc/cpu/*.cpp, through kdloss/cpu_utils.h) and the CUDA glue
// (csrc/cuda/*_ops.cpp, through kdloss/cuda_ops_utils.h); host code only. They guard the kernels'
// own preconditions with TORCH_CHECK_VALUE (ValueError in Python): the public Python functions
// validate user input before an op is reached. Device checks stay with each backend's header.
#pragma once

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {

static_assert(static_cast<int>(Reduction::kNone) == at::Reduction::None &&
                  static_cast<int>(Reduction::kMean) == at::Reduction::Mean &&
                  static_cast<int>(Reduction::kSum) == at::Reduction::Sum,
              "kdloss::Reduction must use ATen's at::Reduction values");

// The reduction named by an op's `int reduction` argument.
inline Reduction check_reduction(int64_t code) {
  TORCH_CHECK_VALUE(code == at::Reduction::None || code == at::Reduction::Mean || code == at::Reduction::Sum,
                    "reduction code must be 0 (none), 1 (mean) or 2 (sum), got ", code);
  return static_cast<Reduction>(code);
}

// The accumulation dtype of a tensor of dtype `t`: fp64 for fp64, fp32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `t` with a unit-stride last dimension: `t` itself when it has one, else a contiguous copy.
inline at::Tensor unit_inner_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// The upstream gradient of an op's loss — of shape `none_shape` for Reduction::kNone, one element
// otherwise — contiguous in `dtype`. The caller checks its device.
inline at::Tensor upstream_grad(const at::Tensor& grad, Reduction reduction, at::IntArrayRef none_shape,
                                at::ScalarType dtype) {
  if (reduction == Reduction::kNone) {
    TORCH_CHECK_VALUE(grad.sizes() == none_shape, "grad must have shape ", none_shape, " for reduction none, got ",
                      grad.sizes());
  } else {
    TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one element for reduction mean or sum, got shape ",
                      grad.sizes());
  }
  return grad.to(dtype).contiguous();
}

}  // namespace kdloss
