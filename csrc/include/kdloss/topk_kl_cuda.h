// Launchers of the top-k sparse KL CUDA kernels (csrc/cuda/topk_kl.cu), called by the torch glue
// in csrc/cuda/topk_kl_ops.cpp. Raw pointers only, so the .cu needs no torch headers.
//
// `logits` and `grad_logits` are of the dtype `dtype`; `target_logp`, `tail_logp`, `divisor`,
// `stats`, the loss, its upstream `grad` and `workspace` are of its accumulation type (fp32, fp64 for fp64). See
// kdloss/_ops/topk_kl.py for the op-level contract.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

struct TopKKLProblem {
  DType dtype;             // element type of the logits
  int64_t rows, vocab, k;  // N, V, k
  const void* logits;      // [N, V] or [B, T, V], unit stride along V: row n at (n / seq)·batch_stride
  int64_t row_stride;      // + (n % seq)·row_stride elements
  int64_t seq, batch_stride;
  const int64_t* ids;       // [N, k]; ids outside [0, V) are skipped (Python validates them)
  const void* target_logp;  // [N, k] log p̂; −inf slots are not part of K
  const void* tail_logp;    // [N] log r̂; −inf: no tail term
  const bool* valid;        // [N]
  const void* divisor;      // [] "mean" denominator (≤ 0 gives 0)
  double inv_temperature;   // 1/T
  double scale;             // T² or 1
  bool full_support;        // student log-softmax over V (else over K)
  Reduction reduction;
};

// Accumulation-type elements the forward needs as `workspace` (per-row losses).
int64_t topk_kl_workspace_size(int64_t rows);

// loss: [N] (none) or [] and stats: [N, 2], accumulation type; stats per row (m, l): the largest
// logit and log Σ exp((z − m)/T) (over K for full_support = false).
cudaError_t topk_kl_fwd_cuda(const TopKKLProblem& p, void* loss, void* stats, void* workspace, cudaStream_t stream);

// The forward and grad_logits [N, V] (contiguous, `dtype`): the gradient for an upstream gradient of 1,
// from the same pass over each row.
cudaError_t topk_kl_fwd_grad_cuda(const TopKKLProblem& p, void* loss, void* stats, void* workspace, void* grad_logits,
                                  cudaStream_t stream);

// grad: [N] (none) or [] in the accumulation type; grad_logits: [N, V] contiguous in `dtype`.
cudaError_t topk_kl_bwd_cuda(const TopKKLProblem& p, const void* grad, const void* stats, void* grad_logits,
                             cudaStream_t stream);

// grad_logits [rows, vocab] (contiguous, `dtype`) *= factor (accumulation type; [rows] when per_row,
// else one element) in place, skipping rows whose factor is exactly 1 (decided on the device).
cudaError_t topk_kl_rescale_cuda(DType dtype, void* grad_logits, const void* factor, int64_t rows, int64_t vocab,
                                 bool per_row, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdloss
