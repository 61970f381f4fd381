// Margin-MSE CUDA kernels (spec §4). Plain CUDA (no torch headers); the dispatcher glue is in
// margin_mse_ops.cpp. Reductions are deterministic: per-row sums are written to a workspace and
// summed by one block in a fixed order (no floating-point atomics).
#include "kdloss/cuda_utils.cuh"
#include "kdloss/margin_mse_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Row computations run in Wide<T>: fp64 for fp32 (and fp64) data, fp32 for bf16/fp16. The sums
// ∂L/∂s⁺ = 2·Σ_i e_i and ∂L/∂q = Σ_i g_i·(p − n_i) cancel and ⟨q, p⟩'s rounding enters all n margins;
// in fp32 that rounding would set the gradient's error (see csrc/cpu/margin_mse.cpp). The kernels
// are bound by memory traffic.
template <typename T>
struct WideOf {
  using type = Acc<T>;
};
template <>
struct WideOf<float> {
  using type = double;
};
template <typename T>
using Wide = typename WideOf<T>::type;

template <typename T>
__device__ __forceinline__ T from_wide(Wide<T> x) {
  return from_acc<T>(static_cast<Acc<T>>(x));
}

template <typename T>
struct Teacher {
  const Acc<T>* t;  // stored in the accumulation type
  int64_t n;
  bool is_scores;
  // Teacher margin t⁺_b − t⁻_{b,i}.
  __device__ __forceinline__ Wide<T> margin(int64_t b, int64_t i) const {
    if (is_scores) {
      const Acc<T>* row = t + b * (n + 1);
      return Wide<T>(row[0]) - Wide<T>(row[1 + i]);
    }
    return Wide<T>(t[b * n + i]);
  }
};

template <typename A>
__device__ __forceinline__ A reduction_scale(Reduction reduction, int64_t batch, int64_t n) {
  return reduction == Reduction::kMean ? A(1) / (A(batch) * A(n)) : A(1);
}

// Upstream gradient of margin (b, i) (stored in the accumulation type G), already multiplied by the
// reduction scale, in the wide type W.
template <typename W, typename G>
__device__ __forceinline__ W upstream(const G* grad, Reduction reduction, int64_t b, int64_t i, int64_t n, W scale) {
  return W(reduction == Reduction::kNone ? grad[b * n + i] : grad[0]) * scale;
}

// ---- scores: one warp per row --------------------------------------------------------------

template <typename T>
__global__ void scores_fwd_kernel(const T* __restrict__ pos, const T* __restrict__ neg, Teacher<T> teacher,
                                  int64_t batch, Acc<T>* __restrict__ out_none, Wide<T>* __restrict__ row_sums) {
  using A = Wide<T>;
  const int lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= batch) return;
  const int64_t n = teacher.n;
  const A s_pos = to_acc(pos[b]);
  A acc = A(0);
  for (int64_t i = lane; i < n; i += 32) {
    const A e = (s_pos - to_acc(neg[b * n + i])) - teacher.margin(b, i);
    acc += e * e;
    if (out_none) out_none[b * n + i] = static_cast<Acc<T>>(e * e);
  }
  acc = warp_sum(acc);
  if (lane == 0 && row_sums) row_sums[b] = acc;
}

template <typename T>
__global__ void scores_bwd_kernel(const T* __restrict__ pos, const T* __restrict__ neg, Teacher<T> teacher,
                                  int64_t batch, const Acc<T>* __restrict__ grad, Reduction reduction,
                                  T* __restrict__ grad_pos, T* __restrict__ grad_neg) {
  using A = Wide<T>;
  const int lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= batch) return;
  const int64_t n = teacher.n;
  const A scale = reduction_scale<A>(reduction, batch, n);
  const A s_pos = to_acc(pos[b]);
  A acc = A(0);
  for (int64_t i = lane; i < n; i += 32) {
    const A e = (s_pos - to_acc(neg[b * n + i])) - teacher.margin(b, i);
    const A g = upstream(grad, reduction, b, i, n, scale) * A(2) * e;
    grad_neg[b * n + i] = from_wide<T>(-g);
    acc += g;
  }
  acc = warp_sum(acc);
  if (lane == 0) grad_pos[b] = from_wide<T>(acc);
}

// Divisor of the mean over the B·n margins.
struct MarginCount {
  int64_t batch, n;
  template <typename A>
  __device__ A operator()(A*) const {
    return A(batch) * A(n);
  }
};

// ---- embeddings: one block per row, one warp per candidate (0 = positive, 1+i = negative i) ----

template <typename T>
struct EmbRows {
  const T* q;
  const T* p;
  const T* negs;
  int64_t dim, q_stride, p_stride, n_stride0, n_stride1;
  __device__ __forceinline__ const T* query(int64_t b) const { return q + b * q_stride; }
  // candidate 0 is the positive document, candidate 1 + i the i-th negative
  __device__ __forceinline__ const T* candidate(int64_t b, int64_t j) const {
    return j == 0 ? p + b * p_stride : negs + b * n_stride0 + (j - 1) * n_stride1;
  }
};

template <typename T>
__device__ __forceinline__ Wide<T> warp_dot(const T* x, const T* y, int64_t dim) {
  Wide<T> acc = Wide<T>(0);
  for (int64_t d = threadIdx.x & 31; d < dim; d += 32) acc += Wide<T>(to_acc(x[d])) * Wide<T>(to_acc(y[d]));
  return warp_sum(acc);
}

// Fills scores[0..n] (shared memory) for row b: scores[0] = s⁺, scores[1+i] = s⁻_i.
template <typename T>
__device__ void row_scores(const EmbRows<T>& rows, int64_t b, int64_t n, Wide<T>* scores) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* q = rows.query(b);
  for (int64_t j = warp; j <= n; j += kWarpsPerBlock) {
    const Wide<T> s = warp_dot(q, rows.candidate(b, j), rows.dim);
    if (lane == 0) scores[j] = s;
  }
  __syncthreads();
}

template <typename T>
__global__ void emb_fwd_kernel(EmbRows<T> rows, Teacher<T> teacher, Acc<T>* __restrict__ out_none,
                               Wide<T>* __restrict__ row_sums) {
  using A = Wide<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* scores = reinterpret_cast<A*>(smem_raw);  // [n + 1]
  __shared__ A scratch[32];
  const int64_t b = blockIdx.x, n = teacher.n;
  row_scores(rows, b, n, scores);
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const A e = (scores[0] - scores[1 + i]) - teacher.margin(b, i);
    acc += e * e;
    if (out_none) out_none[b * n + i] = static_cast<Acc<T>>(e * e);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0 && row_sums) row_sums[b] = acc;
}

template <typename T>
__global__ void emb_bwd_kernel(EmbRows<T> rows, Teacher<T> teacher, int64_t batch, const Acc<T>* __restrict__ grad,
                               Reduction reduction, T* __restrict__ grad_q, T* __restrict__ grad_p,
                               T* __restrict__ grad_n) {
  using A = Wide<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* scores = reinterpret_cast<A*>(smem_raw);  // [n + 1] scores, then [n + 1] coefficients
  A* coef = scores + (teacher.n + 1);
  __shared__ A scratch[32];
  const int64_t b = blockIdx.x, n = teacher.n, dim = rows.dim;
  row_scores(rows, b, n, scores);
  const A scale = reduction_scale<A>(reduction, batch, n);
  // coef[1+i] = ∂L/∂s⁻_i = −g_i,  coef[0] = ∂L/∂s⁺ = Σ_i g_i,  g_i = 2·grad·scale·e_i
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const A e = (scores[0] - scores[1 + i]) - teacher.margin(b, i);
    const A g = upstream(grad, reduction, b, i, n, scale) * A(2) * e;
    coef[1 + i] = -g;
    acc += g;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) coef[0] = acc;
  __syncthreads();
  const T* q = rows.query(b);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const A qd = to_acc(q[d]);
    A gq = A(0);
    for (int64_t j = 0; j <= n; ++j) gq += coef[j] * to_acc(rows.candidate(b, j)[d]);
    grad_q[b * dim + d] = from_wide<T>(gq);
    grad_p[b * dim + d] = from_wide<T>(coef[0] * qd);
    for (int64_t i = 0; i < n; ++i) grad_n[(b * n + i) * dim + d] = from_wide<T>(coef[1 + i] * qd);
  }
}

template <typename T>
Teacher<T> make_teacher(const MarginMSEProblem& p) {
  return {static_cast<const Acc<T>*>(p.teacher), p.n_neg, p.teacher_is_scores};
}

template <typename T>
EmbRows<T> make_rows(const MarginMSEEmbeddings& e) {
  return {static_cast<const T*>(e.query),
          static_cast<const T*>(e.positive),
          static_cast<const T*>(e.negatives),
          e.dim,
          e.query_stride,
          e.positive_stride,
          e.neg_stride0,
          e.neg_stride1};
}

unsigned warp_row_blocks(int64_t batch) { return blocks_for(batch, kWarpsPerBlock); }

// Sums the per-row sums in the workspace into the scalar loss.
template <typename T>
void launch_reduce(const MarginMSEProblem& p, void* workspace, void* out, cudaStream_t stream) {
  launch_finalize(static_cast<const Wide<T>*>(workspace), p.batch,
                  mean_or_sum(p.reduction, MarginCount{p.batch, p.n_neg}), static_cast<Acc<T>*>(out), stream);
}

}  // namespace

int64_t margin_mse_workspace_size(int64_t batch) { return batch > 0 ? batch : 1; }

cudaError_t margin_mse_fwd_cuda(const MarginMSEProblem& p, const MarginMSEScores& s, void* out, void* workspace,
                                cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool none = p.reduction == Reduction::kNone;
    if (p.batch > 0) {
      scores_fwd_kernel<T><<<warp_row_blocks(p.batch), kThreads, 0, stream>>>(
          static_cast<const T*>(s.pos), static_cast<const T*>(s.neg), make_teacher<T>(p), p.batch,
          none ? static_cast<Acc<T>*>(out) : nullptr, none ? nullptr : static_cast<Wide<T>*>(workspace));
    }
    if (!none) launch_reduce<T>(p, workspace, out, stream);
    return cudaGetLastError();
  });
}

cudaError_t margin_mse_bwd_cuda(const MarginMSEProblem& p, const MarginMSEScores& s, const void* grad, void* grad_pos,
                                void* grad_neg, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.batch > 0) {
      scores_bwd_kernel<T><<<warp_row_blocks(p.batch), kThreads, 0, stream>>>(
          static_cast<const T*>(s.pos), static_cast<const T*>(s.neg), make_teacher<T>(p), p.batch,
          static_cast<const Acc<T>*>(grad), p.reduction, static_cast<T*>(grad_pos), static_cast<T*>(grad_neg));
    }
    return cudaGetLastError();
  });
}

cudaError_t margin_mse_emb_fwd_cuda(const MarginMSEProblem& p, const MarginMSEEmbeddings& e, void* out, void* workspace,
                                    cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool none = p.reduction == Reduction::kNone;
    const size_t smem = sizeof(Wide<T>) * (p.n_neg + 1);
    if (p.batch > 0) {
      emb_fwd_kernel<T><<<one_block_per_row(p.batch), kThreads, smem, stream>>>(
          make_rows<T>(e), make_teacher<T>(p), none ? static_cast<Acc<T>*>(out) : nullptr,
          none ? nullptr : static_cast<Wide<T>*>(workspace));
    }
    if (!none) launch_reduce<T>(p, workspace, out, stream);
    return cudaGetLastError();
  });
}

cudaError_t margin_mse_emb_bwd_cuda(const MarginMSEProblem& p, const MarginMSEEmbeddings& e, const void* grad,
                                    void* grad_query, void* grad_positive, void* grad_negatives, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t smem = 2 * sizeof(Wide<T>) * (p.n_neg + 1);
    if (p.batch > 0) {
      emb_bwd_kernel<T><<<one_block_per_row(p.batch), kThreads, smem, stream>>>(
          make_rows<T>(e), make_teacher<T>(p), p.batch, static_cast<const Acc<T>*>(grad), p.reduction,
          static_cast<T*>(grad_query), static_cast<T*>(grad_positive), static_cast<T*>(grad_negatives));
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdloss
