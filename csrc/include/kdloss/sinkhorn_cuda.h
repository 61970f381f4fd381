// Launchers of the SinKD CUDA kernels (csrc/cuda/sinkhorn.cu), called by the torch glue in
// csrc/cuda/sinkhorn_ops.cpp. Raw pointers only, so the .cu needs no torch headers.
//
// Student logits are of the dtype `dtype` (rows of stride `student_stride`, unit column stride);
// everything else except the student gradient (the loss and its upstream gradient included) is of
// the accumulation type (fp32, or fp64 for fp64) and contiguous. Small problems (sinkhorn_one_block: B·B' and
// B·B'·C small) run as one thread block per direction; larger ones as one persistent cooperative kernel
// per direction (grid-wide barriers between passes), or as a sequence of multi-block launches where a
// cooperative launch is not available.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

struct SinkhornProblem {
  DType dtype;             // element type of the student logits (and of their gradient)
  int64_t batch, batch_t;  // B (student rows), B' (teacher rows); both >= 1
  int64_t classes;         // C >= 1
  int64_t n_iters;         // >= 1
  double temperature, epsilon, scale;
};

// Largest B·B' handled by the single-block fused kernels.
int64_t sinkhorn_fused_max_elems();

// Whether `p` runs on the single-block path (B·B' <= sinkhorn_fused_max_elems() and B·B'·C <= 2^21).
bool sinkhorn_one_block(const SinkhornProblem& p);

// Accumulation-type elements the launchers need as workspace.
int64_t sinkhorn_fwd_workspace_size(const SinkhornProblem& p);
int64_t sinkhorn_bwd_workspace_size(const SinkhornProblem& p);

// student [B, C] (row stride student_stride), teacher [B', C] (acc, contiguous) →
// loss [] (acc), probs_s [B, C], probs_t [B', C], cost [B, B'], and the increments subtracted by
// each half-step, a [n, B] (rows) and b [n, B'] (columns) (acc).
cudaError_t sinkhorn_fwd_cuda(const SinkhornProblem& p, const void* student, int64_t student_stride,
                              const void* teacher, void* loss, void* probs_s, void* probs_t, void* cost, void* a,
                              void* b, void* workspace, cudaStream_t stream);

// grad [] (acc) and the forward's saved outputs → grad_student [B, C] (dtype, contiguous).
cudaError_t sinkhorn_bwd_cuda(const SinkhornProblem& p, const void* grad, const void* probs_s, const void* probs_t,
                              const void* cost, const void* a, const void* b, void* grad_student, void* workspace,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace kdloss
