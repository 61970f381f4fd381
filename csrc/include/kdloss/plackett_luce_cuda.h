// Launchers of the PLD CUDA kernels (csrc/cuda/plackett_luce.cu), called by the torch glue in
// csrc/cuda/plackett_luce_ops.cpp. Raw pointers only, so the .cu needs no torch headers.
//
// `student` is of the dtype `dtype` (unit inner stride, row stride `student_stride`); `teacher` is
// contiguous in its accumulation type (fp32, fp64 for fp64); labels and the optional permutation are
// contiguous int64; `order` is [R, C] int32. Workspaces are raw bytes sized by the *_workspace calls.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

struct PlackettLuceProblem {
  DType dtype;                 // element type of the student
  int64_t rows, classes;       // R, C
  const void* student;         // [R, C]
  int64_t student_stride;      // elements between rows
  const void* teacher;         // [R, C]
  const int64_t* labels;       // [R]
  const int64_t* permutation;  // [R, C] cached teacher ranking, or null (the kernel sorts)
  double temperature;
  int64_t ignore_index;
  Reduction reduction;
};

// Bytes of device workspace the forward needs (includes the CUB segmented-sort scratch for large C).
cudaError_t plackett_luce_fwd_workspace(const PlackettLuceProblem& p, size_t* bytes);
// out: [R] (none) or [] (mean/sum) in the accumulation type; order: [R, C] int32 π* (label first).
cudaError_t plackett_luce_fwd_cuda(const PlackettLuceProblem& p, void* out, int32_t* order, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

size_t plackett_luce_bwd_workspace(const PlackettLuceProblem& p);
// grad: [R] (none) or [] in the accumulation type; grad_student: [R, C] contiguous, zero-filled by the caller.
cudaError_t plackett_luce_bwd_cuda(const PlackettLuceProblem& p, const int32_t* order, const void* grad,
                                   void* grad_student, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdloss
