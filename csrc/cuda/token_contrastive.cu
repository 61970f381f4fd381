// TRG global contrastive (InfoNCE) loss: CUDA strip kernels. The GEMMs run in the glue
// (csrc/cuda/token_contrastive_ops.cpp), one column strip [M, width] of the logits at a time; these
// kernels fold a strip into the per-row online log-sum-exp (one warp per row, merged strip after
// strip in column order), compute the strip's column log-sum-exps (whole columns: exact), finish the
// per-node losses, and turn a recomputed strip into the logits' gradient in place. Every value is
// reduced in a fixed order (no atomics): bitwise deterministic run to run.
#include <cmath>
#include <type_traits>

#include "kdloss/cuda_utils.cuh"
#include "kdloss/token_contrastive_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;  // row kernels: one warp per row
constexpr int kColThreads = 32;    // column kernel: 32 columns × kColSlices row slices per block
constexpr int kColSlices = 8;
constexpr int kElementThreads = 256;

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

// (m, s) ⊕ (m2, s2): the running max and Σ exp(· − max) of two sets of values.
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
  const A mx = m2 > m ? m2 : m;
  if (mx == static_cast<A>(-INFINITY)) return;
  s = s * ex(m - mx) + s2 * ex(m2 - mx);
  m = mx;
}

template <typename A>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    fwd_rows_kernel(const A* __restrict__ strip, int64_t M, int64_t j0, int64_t width, A inv_tau,
                    A* __restrict__ running) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (i >= M) return;  // whole warps leave together
  const A* row = strip + i * width;
  A m = -INFINITY;
  for (int64_t c = lane; c < width; c += 32) m = fmax(m, inv_tau * row[c]);
  m = warp_max_all(m);
  A s = A(0);
  for (int64_t c = lane; c < width; c += 32) s += ex(inv_tau * row[c] - m);
  s = warp_sum(s);
  if (lane == 0) {
    A run_m = j0 == 0 ? static_cast<A>(-INFINITY) : running[i];
    A run_s = j0 == 0 ? A(0) : running[M + i];
    merge(run_m, run_s, m, s);
    running[i] = run_m;
    running[M + i] = run_s;
  }
}

// Column log-sum-exps of a strip: block (32 columns × kColSlices row slices), each thread an online
// (max, sum) over its slice's rows, the slices merged in order by the first row of threads.
template <typename A>
__global__ void __launch_bounds__(kColThreads* kColSlices)
    fwd_cols_kernel(const A* __restrict__ strip, int64_t M, int64_t j0, int64_t width, A inv_tau,
                    A* __restrict__ lse_col) {
  __shared__ A sm[kColSlices][kColThreads], ss[kColSlices][kColThreads];
  const int tx = threadIdx.x % kColThreads, ty = threadIdx.x / kColThreads;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreads + tx;
  A m = -INFINITY, s = A(0);
  if (c < width) {
    for (int64_t i = ty; i < M; i += kColSlices) {
      const A x = inv_tau * strip[i * width + c];
      if (x > m) {
        s = s * ex(m - x) + A(1);
        m = x;
      } else {
        s += ex(x - m);
      }
    }
  }
  sm[ty][tx] = m;
  ss[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && c < width) {
    for (int k = 1; k < kColSlices; ++k) merge(m, s, sm[k][tx], ss[k][tx]);
    lse_col[j0 + c] = m + lg(s);
  }
}

// One warp per node: the positive logit, the row log-sum-exp and the node's loss.
template <typename A>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    finish_kernel(const A* __restrict__ u, const A* __restrict__ v, ContrastiveProblem p, const A* __restrict__ running,
                  A* __restrict__ lse, A* __restrict__ per_node) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t M = p.nodes, E = p.E;
  if (i >= M) return;
  A dot = A(0);
  for (int64_t k = lane; k < E; k += 32) dot += u[i * E + k] * v[i * E + k];
  dot = warp_sum(dot);
  if (lane == 0) {
    const A diag = static_cast<A>(p.inv_tau) * dot;
    const A lse_row = running[i] + lg(running[M + i]);
    lse[i] = lse_row;
    A loss = lse_row - diag;
    if (p.symmetric) loss = A(0.5) * loss + A(0.5) * (lse[M + i] - diag);
    per_node[i] = loss;
  }
}

template <typename A>
__device__ __forceinline__ A node_weight(const A* grad, Reduction reduction, int64_t M, int64_t i) {
  if (reduction == Reduction::kNone) return grad[i];
  return reduction == Reduction::kMean ? grad[0] / static_cast<A>(M) : grad[0];
}

template <typename A>
__global__ void __launch_bounds__(kElementThreads)
    bwd_strip_kernel(ContrastiveProblem p, const A* __restrict__ grad, const A* __restrict__ lse, A* __restrict__ strip,
                     int64_t j0, int64_t width) {
  const int64_t M = p.nodes, total = M * width;
  const A inv_tau = static_cast<A>(p.inv_tau);
  const A own_share = p.symmetric ? A(0.5) : A(1);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / width, j = j0 + e % width;
    const A x = inv_tau * strip[e];
    const A wi = node_weight(grad, p.reduction, M, i);
    A g = own_share * wi * ex(x - lse[i]);
    if (p.symmetric) g += A(0.5) * node_weight(grad, p.reduction, M, j) * ex(x - lse[M + j]);
    if (i == j) g -= wi;
    strip[e] = inv_tau * g;
  }
}

unsigned row_blocks(int64_t M) { return blocks_for(M, kWarpsPerBlock); }

}  // namespace

int64_t contrastive_workspace_size(int64_t nodes) { return nodes; }

cudaError_t contrastive_fwd_strip_cuda(const ContrastiveProblem& p, const void* strip, int64_t j0, int64_t width,
                                       void* running, void* lse, cudaStream_t stream) {
  return dispatch_dtype(p.acc, [&](auto tag) -> cudaError_t {
    using A = decltype(tag);
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
      const A inv_tau = static_cast<A>(p.inv_tau);
      const A* s = static_cast<const A*>(strip);
      fwd_rows_kernel<A><<<row_blocks(p.nodes), kWarpsPerBlock * 32, 0, stream>>>(s, p.nodes, j0, width, inv_tau,
                                                                                  static_cast<A*>(running));
      if (p.symmetric)
        fwd_cols_kernel<A><<<blocks_for(width, kColThreads), kColThreads * kColSlices, 0, stream>>>(
            s, p.nodes, j0, width, inv_tau, static_cast<A*>(lse) + p.nodes);
      return cudaGetLastError();
    } else {
      return cudaErrorInvalidValue;
    }
  });
}

cudaError_t contrastive_fwd_finish_cuda(const ContrastiveProblem& p, const void* u, const void* v, const void* running,
                                        void* lse, void* loss, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(p.acc, [&](auto tag) -> cudaError_t {
    using A = decltype(tag);
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
      const bool none = p.reduction == Reduction::kNone;
      A* per_node = static_cast<A*>(none ? loss : workspace);
      finish_kernel<A><<<row_blocks(p.nodes), kWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const A*>(u), static_cast<const A*>(v), p, static_cast<const A*>(running), static_cast<A*>(lse),
          per_node);
      if (!none)
        launch_finalize(per_node, p.nodes, mean_or_sum(p.reduction, CountDivisor{p.nodes}), static_cast<A*>(loss),
                        stream);
      return cudaGetLastError();
    } else {
      return cudaErrorInvalidValue;
    }
  });
}

cudaError_t contrastive_bwd_strip_cuda(const ContrastiveProblem& p, const void* grad, const void* lse, void* strip,
                                       int64_t j0, int64_t width, cudaStream_t stream) {
  return dispatch_dtype(p.acc, [&](auto tag) -> cudaError_t {
    using A = decltype(tag);
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
      bwd_strip_kernel<A><<<blocks_for(p.nodes * width, kElementThreads, 65535), kElementThreads, 0, stream>>>(
          p, static_cast<const A*>(grad), static_cast<const A*>(lse), static_cast<A*>(strip), j0, width);
      return cudaGetLastError();
    } else {
      return cudaErrorInvalidValue;
    }
  });
}

}  // namespace cuda
}  // namespace kdloss
