// Integer codes that cross kdloss's layers: the `int reduction` argument of every op (schemas in
// kdloss/_ops) and the dtype of the raw pointers handed from the torch glue (csrc/cuda/*_ops.cpp) to
// the CUDA launchers (csrc/cuda/*.cu). No torch headers, so the plain-CUDA files can include it;
// kdloss/op_checks.h asserts that the reduction codes equal ATen's at::Reduction values.
#pragma once

namespace kdloss {

// The reduction of an op's loss (kdloss._ops.REDUCTION_CODES; ATen's at::Reduction values).
enum class Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

// Element type of a raw pointer passed to a CUDA launcher (cuda::dtype_code maps at::ScalarType).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace kdloss
