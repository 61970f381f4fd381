// Launchers of the TRG graph-loss CUDA kernels (csrc/cuda/token_graph.cu), called by the torch glue
// in csrc/cuda/token_graph_ops.cpp. Raw pointers only, so the .cu needs no torch headers.
//
// `student` and `grad_student` are of the dtype `dtype`; `teacher`, `coef`, the loss, `grad` (as
// passed) and `workspace` are of its accumulation type (fp32, fp64 for fp64). All tensors are contiguous. See
// kdloss/_ops/token_graph.py for the op-level contract.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

struct TokenGraphProblem {
  DType dtype;                // element type of the student
  int64_t nodes, k, ds, dt;   // M, k, Ds, Dt
  const void* student;        // [M, Ds]
  const void* teacher;        // [M, Dt], accumulation type
  const int64_t* neighbours;  // [M, k]; entries outside [0, M) act as self-edges (Python validates them)
  double sigma;               // kernel width σ > 0
  int edge;                   // 0 kernel exp(−d²/2σ), 1 log kernel −d²/2σ
  int direction;              // 0 KL(p^S‖p^T), 1 KL(p^T‖p^S)
  Reduction reduction;
};

// Accumulation-type elements the forward needs as `workspace` (teacher edge logits, per-node losses).
int64_t token_graph_workspace_size(int64_t nodes, int64_t k);

// loss: [M] (none) or [] in the accumulation type; coef: [M, k] accumulation type (∂L_i/∂d²_ij).
cudaError_t token_graph_fwd_cuda(const TokenGraphProblem& p, void* loss, void* coef, void* workspace,
                                 cudaStream_t stream);

// grad: [M] (none) or [] in the accumulation type; in_start [M + 1] / in_edge [M·k]: the edges
// pointing at each node (CSR by neighbour, ascending edge ids); grad_student: [M, Ds] in `dtype`.
cudaError_t token_graph_bwd_cuda(const TokenGraphProblem& p, const void* grad, const void* coef,
                                 const int64_t* in_start, const int64_t* in_edge, void* grad_student,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace kdloss
