// TRG kNN-graph local-structure loss, CUDA kernels (spec §5.2–5.3). Plain CUDA: launchers take raw
// pointers (see kdloss/token_graph_cuda.h); the torch glue is csrc/cuda/token_graph_ops.cpp.
//
// One warp per node, 8 nodes per CTA, accumulation in fp32 (fp64 for fp64); bf16/fp16 are
// converted in registers. Formulas as in csrc/cpu/token_graph.cpp.
//
// Forward: for each of its k edges the warp reduces ‖x_i − x_j‖² over D (lanes stride D, butterfly
// shuffle), lane 0 parks the student edge logit in `coef` and the teacher's in the workspace; then
// the lanes take the edges in turn for the two max-shifted log-softmaxes and the KL, and overwrite
// `coef[i, j]` with ∂L_i/∂d²_ij. Per-node losses go to the workspace; a single-CTA finalize kernel
// sums them in a fixed order (no atomics: deterministic).
// Backward: w_e = 2·g·coef_e; the warp of node i accumulates Σ w (x_i − x_other) over its k outgoing
// edges and over the incoming edges listed by the CSR transpose (built by the glue with a stable
// sort), 256 columns per pass with 8 registers per lane, and writes row i once. No atomics, so the
// gradient is deterministic as well. Neither pass synchronises with the host.
#include <cstdint>

#include "kdloss/cuda_utils.cuh"
#include "kdloss/token_graph_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // nodes per CTA
constexpr int kThreads = 32 * kWarps;
constexpr int kColsPerLane = 8;  // backward: columns per lane per pass (256 per warp)

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A warp_allsum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // identical in every lane (butterfly: same operation order in every lane)
}

// ‖a − b‖² over D, reduced over the warp (every lane gets it).
template <typename T, typename A>
__device__ __forceinline__ A warp_squared_distance(const T* a, const T* b, int64_t D, int lane) {
  A s = A(0);
  for (int64_t d = lane; d < D; d += 32) {
    const A e = to_acc(a[d]) - to_acc(b[d]);
    s += e * e;
  }
  return warp_allsum(s);
}

// The neighbour of edge e, an out-of-range entry acting as a self-edge (zero distance, zero gradient).
__device__ __forceinline__ int64_t neighbour_of(const int64_t* nb, int64_t e, int64_t self, int64_t M) {
  const int64_t n = nb[e];
  return n >= 0 && n < M ? n : self;
}

// Max-shift of z[0..k) over the warp (lanes take the edges in turn): the max, the index of its first
// occurrence and log Σ exp(z − max), identical in every lane. log p_j = (z_j − max) − log_sum keeps
// the rounding at the scale of the shifted logits (see shift_by_max in csrc/cpu/token_graph.cpp).
template <typename A>
struct Shifted {
  A max;
  int64_t top;
  A log_sum;
};

template <typename A>
__device__ __forceinline__ Shifted<A> warp_shift(const A* z, int64_t k, int lane) {
  A m = -static_cast<A>(INFINITY);
  int64_t top = k;
  for (int64_t j = lane; j < k; j += 32) {
    if (z[j] > m) {
      m = z[j];
      top = j;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {  // butterfly argmax, ties to the lower index
    const A om = __shfl_xor_sync(0xffffffffu, m, offset);
    const int64_t ot = __shfl_xor_sync(0xffffffffu, top, offset);
    if (om > m || (om == m && ot < top)) {
      m = om;
      top = ot;
    }
  }
  if (top >= k) top = 0;  // every logit NaN: any entry will do
  A s = A(0);
  for (int64_t j = lane; j < k; j += 32) s += exp_acc(z[j] - m);
  return {m, top, log_acc(warp_allsum(s))};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fwd_nodes_kernel(TokenGraphProblem p, Acc<T>* coef, Acc<T>* zt_all, Acc<T>* row_loss, Acc<T>* loss_none) {
  using A = Acc<T>;
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= p.nodes) return;  // uniform over the warp; no CTA-wide barrier below
  const T* xs = static_cast<const T*>(p.student);
  const A* xt = static_cast<const A*>(p.teacher);
  const A inv_two_sigma = static_cast<A>(0.5 / p.sigma);
  const int64_t k = p.k;
  A* zs = coef + i * k;
  A* zt = zt_all + i * k;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t n = neighbour_of(p.neighbours, i * k + j, i, p.nodes);
    const A ls = -warp_squared_distance<T, A>(xs + i * p.ds, xs + n * p.ds, p.ds, lane) * inv_two_sigma;
    const A lt = -warp_squared_distance<A, A>(xt + i * p.dt, xt + n * p.dt, p.dt, lane) * inv_two_sigma;
    if (lane == 0) {
      zs[j] = p.edge == 0 ? exp_acc(ls) : ls;
      zt[j] = p.edge == 0 ? exp_acc(lt) : lt;
    }
  }
  __syncwarp();  // lane 0's writes are visible to the warp
  A loss = A(0);
  if (k > 0) {
    // KL(p^a ‖ p^b) around the top entry t of p^a (a = student for direction 0, teacher for 1):
    // δ_j = r_j − r_t = (za_j − max_a) − (zb_j − zb_t), L = r_t + Σ_j p^a_j δ_j, r_j − L = δ_j − Σ p^a δ
    // (as in csrc/cpu/token_graph.cpp: no difference of two O(|r|) numbers).
    const Shifted<A> s = warp_shift(zs, k, lane), t = warp_shift(zt, k, lane);
    const bool student_first = p.direction == 0;
    const A* za = student_first ? zs : zt;
    const A* zb = student_first ? zt : zs;
    const Shifted<A> a = student_first ? s : t, b = student_first ? t : s;
    const A zb_top = zb[a.top];
    A part = A(0);
    for (int64_t j = lane; j < k; j += 32)
      part += exp_acc((za[j] - a.max) - a.log_sum) * ((za[j] - a.max) - (zb[j] - zb_top));
    const A mean_delta = warp_allsum(part);
    loss = ((b.log_sum - a.log_sum) - (zb_top - b.max)) + mean_delta;
    __syncwarp();  // every lane has read zs (the coef buffer) before any lane overwrites its entries
    for (int64_t j = lane; j < k; j += 32) {  // each lane rewrites only the edges it read
      const A ps = exp_acc((zs[j] - s.max) - s.log_sum);
      const A dz_dd = p.edge == 0 ? -zs[j] * inv_two_sigma : -inv_two_sigma;
      const A dl_dz = student_first ? ps * (((za[j] - a.max) - (zb[j] - zb_top)) - mean_delta)
                                    : ps - exp_acc((zt[j] - t.max) - t.log_sum);
      zs[j] = dl_dz * dz_dd;
    }
  }
  if (lane == 0) {
    row_loss[i] = loss;
    if (loss_none) loss_none[i] = loss;
  }
}

// 2 × the upstream gradient of node `row`'s loss (÷ M for mean).
template <typename A>
__device__ __forceinline__ A row_scale(const A* grad, Reduction reduction, int64_t row, int64_t M) {
  if (reduction == Reduction::kNone) return A(2) * grad[row];
  return reduction == Reduction::kMean ? A(2) * grad[0] / static_cast<A>(M) : A(2) * grad[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bwd_nodes_kernel(TokenGraphProblem p, const Acc<T>* grad, const Acc<T>* coef, const int64_t* in_start,
                     const int64_t* in_edge, T* out) {
  using A = Acc<T>;
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= p.nodes) return;
  const T* x = static_cast<const T*>(p.student);
  const int64_t D = p.ds, k = p.k, M = p.nodes;
  const T* xi = x + i * D;
  const A gi = row_scale(grad, p.reduction, i, M);
  const int64_t in_begin = k > 0 ? in_start[i] : 0, in_end = k > 0 ? in_start[i + 1] : 0;
  for (int64_t d0 = 0; d0 < D; d0 += 32 * kColsPerLane) {
    A own[kColsPerLane], acc[kColsPerLane];
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) {
      const int64_t d = d0 + lane + 32 * t;
      own[t] = d < D ? to_acc(xi[d]) : A(0);
      acc[t] = A(0);
    }
    for (int64_t j = 0; j < k; ++j) {  // outgoing edges (i, nb(i, j))
      const int64_t e = i * k + j;
      const A w = gi * coef[e];
      const T* xo = x + neighbour_of(p.neighbours, e, i, M) * D;
#pragma unroll
      for (int t = 0; t < kColsPerLane; ++t) {
        const int64_t d = d0 + lane + 32 * t;
        if (d < D) acc[t] += w * (own[t] - to_acc(xo[d]));
      }
    }
    for (int64_t q = in_begin; q < in_end; ++q) {  // incoming edges (m, i), ascending edge ids
      const int64_t e = in_edge[q];
      const int64_t m = e / k;
      const A w = row_scale(grad, p.reduction, m, M) * coef[e];
      const T* xo = x + m * D;
#pragma unroll
      for (int t = 0; t < kColsPerLane; ++t) {
        const int64_t d = d0 + lane + 32 * t;
        if (d < D) acc[t] += w * (own[t] - to_acc(xo[d]));
      }
    }
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) {
      const int64_t d = d0 + lane + 32 * t;
      if (d < D) out[i * D + d] = from_acc<T>(acc[t]);
    }
  }
}

unsigned grid_for(int64_t nodes) { return blocks_for(nodes, kWarps); }

}  // namespace

int64_t token_graph_workspace_size(int64_t nodes, int64_t k) {
  const int64_t n = nodes * k + nodes;
  return n > 0 ? n : 1;
}

cudaError_t token_graph_fwd_cuda(const TokenGraphProblem& p, void* loss, void* coef, void* workspace,
                                 cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* zt = static_cast<A*>(workspace);
    A* rows = zt + p.nodes * p.k;
    A* loss_none = p.reduction == Reduction::kNone ? static_cast<A*>(loss) : nullptr;
    if (p.nodes > 0)
      fwd_nodes_kernel<T><<<grid_for(p.nodes), kThreads, 0, stream>>>(p, static_cast<A*>(coef), zt, rows, loss_none);
    if (p.reduction != Reduction::kNone)
      launch_finalize(rows, p.nodes, mean_or_sum(p.reduction, CountDivisor{p.nodes}), static_cast<A*>(loss), stream);
    return cudaGetLastError();
  });
}

cudaError_t token_graph_bwd_cuda(const TokenGraphProblem& p, const void* grad, const void* coef,
                                 const int64_t* in_start, const int64_t* in_edge, void* grad_student,
                                 cudaStream_t stream) {
  if (p.nodes == 0 || p.ds == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    bwd_nodes_kernel<T><<<grid_for(p.nodes), kThreads, 0, stream>>>(
        p, static_cast<const A*>(grad), static_cast<const A*>(coef), in_start, in_edge, static_cast<T*>(grad_student));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdloss
