// Helpers shared by the torch glue of the CUDA kernels (csrc/cuda/*_ops.cpp; host compiler only),
// next to the checks shared with the CPU kernels (kdloss/op_checks.h: reduction codes, accumulation
// dtype, unit inner stride, upstream gradient).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "kdloss/codes.h"
#include "kdloss/op_checks.h"

namespace kdloss {
namespace cuda {

// The DType code (kdloss/codes.h) of a floating-point tensor dtype.
inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t, " (expected float32/float64/bfloat16/float16)");
  }
  return DType::kFloat32;  // not reached
}

// `t` must be a CUDA tensor on the device of `like`.
inline void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ",
                    t.device());
}

// The upstream gradient `grad` of an op's loss, on the device of `like` (see kdloss::upstream_grad).
inline at::Tensor checked_grad(const at::Tensor& grad, const at::Tensor& like, Reduction reduction,
                               at::IntArrayRef none_shape, at::ScalarType dtype) {
  check_cuda(grad, like, "grad");
  return upstream_grad(grad, reduction, none_shape, dtype);
}

// A float option of an op, passed as a one-element float64 CPU tensor (kdloss/_ops: float_arg);
// read on the host, so no device synchronisation.
inline double float_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.numel() == 1, name,
                    " must be a one-element float64 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
                    t.device());
  return *t.const_data_ptr<double>();
}

inline void check_launch(cudaError_t err, const char* loss) {
  TORCH_CHECK(err == cudaSuccess, "kdloss ", loss, " CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace kdloss
