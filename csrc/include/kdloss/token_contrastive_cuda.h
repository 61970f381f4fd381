// Launchers of the TRG contrastive-loss CUDA kernels (csrc/cuda/token_contrastive.cu), called by the
// torch glue in csrc/cuda/token_contrastive_ops.cpp, which runs the similarity and gradient GEMMs
// (cuBLAS through ATen) one column strip at a time. Raw pointers only, so the .cu needs no torch
// headers. Every buffer is contiguous, in the accumulation type `acc` (fp32, or fp64 for fp64).
//
// A strip is columns [j0, j0 + width) of the logits L = u vᵀ / τ: the glue fills `strip`
// [M, width] with the raw dot products ⟨u_i, v_j⟩ (no 1/τ). Per-node state: `running` [2, M]
// (running max, then the running Σ exp(· − max) of each row's scaled logits), `lse` [2, M] (row
// log-sum-exps, then column log-sum-exps when symmetric).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

struct ContrastiveProblem {
  DType acc;         // kFloat32 or kFloat64
  int64_t nodes, E;  // M >= 1, E >= 0
  double inv_tau;    // 1 / τ
  bool symmetric;
  Reduction reduction;
};

// Forward, one strip: folds each row of the strip into `running` (initialised by the strip j0 = 0)
// and, when symmetric, writes the strip's column log-sum-exps to lse[M + j0 ..].
cudaError_t contrastive_fwd_strip_cuda(const ContrastiveProblem& p, const void* strip, int64_t j0, int64_t width,
                                       void* running, void* lse, cudaStream_t stream);

// Accumulation-type elements the finish step needs as `workspace` (per-node losses).
int64_t contrastive_workspace_size(int64_t nodes);

// Forward, after the last strip: lse[0 .. M) = row log-sum-exps, the positive logits ⟨u_i, v_i⟩/τ,
// and the loss: `loss` [M] (Reduction::kNone) or one value (mean over M, sum).
cudaError_t contrastive_fwd_finish_cuda(const ContrastiveProblem& p, const void* u, const void* v, const void* running,
                                        void* lse, void* loss, void* workspace, cudaStream_t stream);

// Backward, one strip: overwrites `strip` with the strip's columns of the logits' gradient
// G = (c·w_i·softmax_row + [symmetric] ½·w_j·softmax_col − [i = j]·w_i) / τ, w the per-node upstream
// weights from `grad` ([M] for Reduction::kNone, one value otherwise; ÷ M for mean).
cudaError_t contrastive_bwd_strip_cuda(const ContrastiveProblem& p, const void* grad, const void* lse, void* strip,
                                       int64_t j0, int64_t width, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdloss
