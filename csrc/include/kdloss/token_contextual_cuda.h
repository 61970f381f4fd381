// Launchers of the TRG contextual-loss CUDA row kernels (csrc/cuda/token_contextual.cu), called by
// the torch glue in csrc/cuda/token_contextual_ops.cpp, which runs the similarity GEMMs (cuBLAS via
// ATen) chunk by chunk. Raw pointers only, so the .cu needs no torch headers.
//
// A chunk is rows [i0, i0 + rows) of images [b0, b0 + images): the glue fills sims_s / sims_t, each
// [images, rows, N] contiguous in the accumulation type (fp32, fp64 for fp64), with the raw dot products
// ⟨x_i, x_j⟩ (no 1/√D scale). Per-row state, contiguous, accumulation type: stats_s / stats_t
// [2, B, N] (row max m of the scaled similarities, then l = log Σ_j exp(v_j − m)); rho, row_loss
// and the upstream grad for reduction none [B, N].
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

struct ContextualChunk {
  DType acc;                // element type of the buffers and row state: kFloat32 or kFloat64
  int64_t batch, n;         // B >= 1 (the whole batch: row-state layout, the mean's divisor), N >= 1
  int64_t i0, rows;         // first row of the chunk, rows in it (>= 1)
  double scale_s, scale_t;  // 1/√Ds, 1/√Dt
  int64_t b0, images;       // the chunk's images [b0, b0 + images) (>= 1; all B when chunked by rows)
};

// Forward: per row, the softmax statistics of the scaled student / teacher similarities,
// ρ = Σ_j (A − P) A and Σ_j (P − A)², written at row b·N + i0 + r.
cudaError_t contextual_fwd_rows_cuda(const ContextualChunk& c, const void* sims_s, const void* sims_t, void* stats_s,
                                     void* stats_t, void* rho, void* row_loss, cudaStream_t stream);

// split_dtype of contextual_bwd_weights_cuda when W is not split.
constexpr int kNoSplit = -1;

// Backward: overwrites sims_s with the rows of W = (dS + dSᵀ)/√Ds (spec §5.3); `grad` is the
// upstream gradient (accumulation type: [B, N] for Reduction::kNone, one value otherwise).
// With split_dtype = static_cast<int>(DType::kBFloat16 or kFloat16), also writes row_max [B, rows]
// (acc; max |W| of the row, 1 for an all-zero row) and w_hi, w_lo [B, rows, N] of that dtype with
// w_hi + w_lo ≈ W / row_max to about 16 significant bits (two half-precision GEMMs then give an
// fp32-accurate W·X). split_dtype = kNoSplit skips that.
cudaError_t contextual_bwd_weights_cuda(const ContextualChunk& c, Reduction reduction, const void* grad,
                                        const void* stats_s, const void* stats_t, const void* rho, void* sims_s,
                                        const void* sims_t, int split_dtype, void* row_max, void* w_hi, void* w_lo,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace kdloss
