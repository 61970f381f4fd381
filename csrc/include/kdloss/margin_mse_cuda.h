// Launchers of the Margin-MSE CUDA kernels (csrc/cuda/margin_mse.cu), called by the torch glue in
// csrc/cuda/margin_mse_ops.cpp. Raw pointers only, so the .cu needs no torch headers.
//
// Element pointers are of the dtype `dtype`; `teacher`, the loss `out` and the upstream `grad` are
// of its accumulation type (fp32, fp64 for fp64), `workspace` of the kernels' wide type (fp64 for
// fp32 and fp64, fp32 for bf16/fp16). Score tensors are contiguous; embedding rows are unit-stride in D.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

struct MarginMSEProblem {
  DType dtype;           // element type
  int64_t batch, n_neg;  // B, n
  const void* teacher;   // [B, n+1] raw scores (teacher_is_scores) or [B, n] margins
  bool teacher_is_scores;
  Reduction reduction;
};

struct MarginMSEScores {
  const void* pos;  // [B]
  const void* neg;  // [B, n]
};

struct MarginMSEEmbeddings {
  const void* query;      // [B, D], row stride query_stride
  const void* positive;   // [B, D], row stride positive_stride
  const void* negatives;  // [B, n, D], strides neg_stride0, neg_stride1
  int64_t dim, query_stride, positive_stride, neg_stride0, neg_stride1;
};

// Number of wide-type elements the forward launchers need as `workspace`.
int64_t margin_mse_workspace_size(int64_t batch);

// out: [B, n] (none) or [] (mean/sum), accumulation type.
cudaError_t margin_mse_fwd_cuda(const MarginMSEProblem& p, const MarginMSEScores& s, void* out, void* workspace,
                                cudaStream_t stream);
// grad: [B, n] (none) or [] (accumulation type); grad_pos [B], grad_neg [B, n].
cudaError_t margin_mse_bwd_cuda(const MarginMSEProblem& p, const MarginMSEScores& s, const void* grad, void* grad_pos,
                                void* grad_neg, cudaStream_t stream);
cudaError_t margin_mse_emb_fwd_cuda(const MarginMSEProblem& p, const MarginMSEEmbeddings& e, void* out, void* workspace,
                                    cudaStream_t stream);
// grad_query, grad_positive [B, D], grad_negatives [B, n, D], contiguous.
cudaError_t margin_mse_emb_bwd_cuda(const MarginMSEProblem& p, const MarginMSEEmbeddings& e, const void* grad,
                                    void* grad_query, void* grad_positive, void* grad_negatives, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdloss
