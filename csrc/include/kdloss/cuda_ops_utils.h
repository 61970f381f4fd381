// Helpers shared by the torch glue of the CUDA kernels (csrc/cuda/*_ops.cpp; host compiler only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace kdloss {
namespace cuda {

// The DType code (kdloss/cuda_utils.cuh) of a floating-point tensor dtype.
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t, " (expected float32/float64/bfloat16/float16)");
  }
  return -1;
}

// The accumulation dtype of `t`: fp64 for fp64, fp32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `t` must be a CUDA tensor on the device of `like`.
inline void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(),
                    ", got ", t.device());
}

inline void check_launch(cudaError_t err, const char* loss) {
  TORCH_CHECK(err == cudaSuccess, "kdloss ", loss, " CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace kdloss
