// SinKD CUDA kernels (spec §1, decision 1): the same log-domain recursion and adjoint as
// csrc/cpu/sinkhorn.cpp, in plain CUDA (no torch headers). Launched by csrc/cuda/sinkhorn_ops.cpp.
//
// Every pass is a grid-stride device function:
//   row passes     — one warp per row, lanes stride over the B' columns, warp-tree reductions;
//   column passes  — one block per group of 32 columns, its warps split the B rows into R
//                    interleaved subsets, the R partial results combined by warp 0 in order;
//   element passes — one thread per matrix entry.
// Small problems (B·B' <= kFusedMaxElems) run every pass of a direction in ONE thread block
// (gridDim = 1, __syncthreads between passes): one launch per direction, the B×B' matrices stay
// in L1/L2. Larger problems launch each pass as its own multi-block kernel. Reductions use fixed
// trees and fixed orders, never atomics, so results are deterministic run to run.
//
// Data (accumulation type A = fp32, or fp64 for fp64): probabilities s [B, C], t [B', C]; cost
// W [B, B'] (the forward's `cost` output); potentials f [n, B] (after each row step) and
// g [n, B'] (after each column step). The iterate after any half-step is −W/ε + f_i + g_j.
#include "kdloss/cuda_utils.cuh"
#include "kdloss/sinkhorn_cuda.h"

#include <cmath>

namespace kdloss {
namespace cuda {
namespace {

constexpr int kFusedThreads = 512;
constexpr int kThreads = 256;
constexpr int kMaxWarps = 32;
constexpr int64_t kFusedMaxElems = 65536;
constexpr int64_t kMaxBlocks = 65535;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// Running log-sum-exp: Σ exp(x) = s·exp(m).
template <typename A>
struct Lse {
  A m, s;
};

template <typename A>
__device__ __forceinline__ void lse_add(Lse<A>& a, A x) {
  if (x > a.m) {
    a.s = a.s * dexp(a.m - x) + A(1);  // exp(−inf) = 0 for the first element
    a.m = x;
  } else if (x > neg_inf<A>()) {
    a.s += dexp(x - a.m);
  }
}

template <typename A>
__device__ __forceinline__ Lse<A> lse_combine(Lse<A> a, Lse<A> b) {
  const A m = a.m > b.m ? a.m : b.m;
  if (!(m > neg_inf<A>())) return {m, A(0)};
  return {m, a.s * dexp(a.m - m) + b.s * dexp(b.m - m)};
}

// Tree reduction to lane 0, then broadcast: every lane gets lane 0's (deterministic) result.
template <typename A>
__device__ __forceinline__ Lse<A> warp_lse(Lse<A> v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Lse<A> other{__shfl_down_sync(kFull, v.m, offset), __shfl_down_sync(kFull, v.s, offset)};
    v = lse_combine(v, other);
  }
  return {__shfl_sync(kFull, v.m, 0), __shfl_sync(kFull, v.s, 0)};
}

template <typename A>
__device__ __forceinline__ A warp_sum_all(A v) {
  return __shfl_sync(kFull, warp_sum(v), 0);
}

__device__ __forceinline__ int64_t global_warp() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
}
__device__ __forceinline__ int64_t warp_stride() { return static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5); }
__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ------------------------------------------------------------------------------------------
// Forward passes

// out[r, :] = softmax(z[r, :] / T); z rows of stride `stride`.
template <typename In, typename A>
__device__ void softmax_rows(const In* z, int64_t stride, int64_t rows, int64_t C, A temp, A* out) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = global_warp(); r < rows; r += warp_stride()) {
    const In* zr = z + r * stride;
    A m = neg_inf<A>();
    for (int64_t c = lane; c < C; c += 32) {
      const A x = to_acc(zr[c]) / temp;
      m = x > m ? x : m;
    }
    m = warp_max_all(m);
    A s = A(0);
    for (int64_t c = lane; c < C; c += 32) s += dexp(to_acc(zr[c]) / temp - m);
    s = warp_sum_all(s);
    for (int64_t c = lane; c < C; c += 32) out[r * C + c] = dexp(to_acc(zr[c]) / temp - m) / s;
  }
}

// W_ij = Σ_c |s_ic − t_jc|
template <typename A>
__device__ void cost_elems(const A* s, const A* t, int64_t B, int64_t Bt, int64_t C, A* W) {
  for (int64_t idx = global_thread(); idx < B * Bt; idx += thread_stride()) {
    const int64_t i = idx / Bt, j = idx - i * Bt;
    A acc = A(0);
    for (int64_t c = 0; c < C; ++c) acc += fabs(s[i * C + c] - t[j * C + c]);
    W[idx] = acc;
  }
}

// f_i = −log Σ_j exp(−W_ij/ε + g_j)   (g = nullptr: the initial zeros)
template <typename A>
__device__ void row_step(const A* W, const A* g, int64_t B, int64_t Bt, A eps, A* f) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < B; i += warp_stride()) {
    Lse<A> v{neg_inf<A>(), A(0)};
    for (int64_t j = lane; j < Bt; j += 32) lse_add(v, -W[i * Bt + j] / eps + (g ? g[j] : A(0)));
    v = warp_lse(v);
    if (lane == 0) f[i] = -(v.m + dlog(v.s));
  }
}

// g_j = −log Σ_i exp(−W_ij/ε + f_i)
template <typename A>
__device__ void col_step(const A* W, const A* f, int64_t B, int64_t Bt, A eps, A* g) {
  __shared__ A part_m[kMaxWarps][32];
  __shared__ A part_s[kMaxWarps][32];
  const int lane = threadIdx.x & 31, rg = threadIdx.x >> 5, R = blockDim.x >> 5;
  const int64_t groups = (Bt + 31) / 32;
  for (int64_t q = blockIdx.x; q < groups; q += gridDim.x) {
    const int64_t j = q * 32 + lane;
    Lse<A> v{neg_inf<A>(), A(0)};
    if (j < Bt)
      for (int64_t i = rg; i < B; i += R) lse_add(v, -W[i * Bt + j] / eps + f[i]);
    part_m[rg][lane] = v.m;
    part_s[rg][lane] = v.s;
    __syncthreads();
    if (rg == 0 && j < Bt) {
      Lse<A> acc{part_m[0][lane], part_s[0][lane]};
      for (int r = 1; r < R; ++r) acc = lse_combine(acc, Lse<A>{part_m[r][lane], part_s[r][lane]});
      g[j] = -(acc.m + dlog(acc.s));
    }
    __syncthreads();
  }
}

// partial[i] = Σ_j exp(−W_ij/ε + f_i + g_j) · W_ij
template <typename A>
__device__ void loss_rows(const A* W, const A* f, const A* g, int64_t B, int64_t Bt, A eps, A* partial) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < B; i += warp_stride()) {
    A acc = A(0);
    for (int64_t j = lane; j < Bt; j += 32) {
      const A w = W[i * Bt + j];
      acc += dexp(-w / eps + f[i] + g[j]) * w;
    }
    acc = warp_sum(acc);
    if (lane == 0) partial[i] = acc;
  }
}

template <typename T>
struct FwdArgs {
  const T* student;
  int64_t student_stride;
  const Acc<T>* teacher;
  Acc<T>* loss;
  Acc<T>*ps, *pt, *W, *f, *g, *partial;
  int64_t B, Bt, C, n;
  Acc<T> temp, eps;
  double scale;
};

template <typename T>
__global__ void __launch_bounds__(kFusedThreads) fwd_fused_kernel(FwdArgs<T> a) {
  softmax_rows(a.student, a.student_stride, a.B, a.C, a.temp, a.ps);
  softmax_rows(a.teacher, a.C, a.Bt, a.C, a.temp, a.pt);
  __syncthreads();
  cost_elems(a.ps, a.pt, a.B, a.Bt, a.C, a.W);
  __syncthreads();
  for (int64_t k = 0; k < a.n; ++k) {
    row_step(a.W, k ? a.g + (k - 1) * a.Bt : nullptr, a.B, a.Bt, a.eps, a.f + k * a.B);
    __syncthreads();
    col_step(a.W, a.f + k * a.B, a.B, a.Bt, a.eps, a.g + k * a.Bt);
    __syncthreads();
  }
  loss_rows(a.W, a.f + (a.n - 1) * a.B, a.g + (a.n - 1) * a.Bt, a.B, a.Bt, a.eps, a.partial);
  __syncthreads();
  finalize(a.partial, a.B, Scaled{a.scale}, a.loss);  // loss = scale · Σ partial (block 0, fixed order)
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_kernel(FwdArgs<T> a, bool teacher) {
  if (teacher) softmax_rows(a.teacher, a.C, a.Bt, a.C, a.temp, a.pt);
  else softmax_rows(a.student, a.student_stride, a.B, a.C, a.temp, a.ps);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) cost_kernel(FwdArgs<T> a) {
  cost_elems(a.ps, a.pt, a.B, a.Bt, a.C, a.W);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) row_step_kernel(FwdArgs<T> a, int64_t k) {
  row_step(a.W, k ? a.g + (k - 1) * a.Bt : nullptr, a.B, a.Bt, a.eps, a.f + k * a.B);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) col_step_kernel(FwdArgs<T> a, int64_t k) {
  col_step(a.W, a.f + k * a.B, a.B, a.Bt, a.eps, a.g + k * a.Bt);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) loss_rows_kernel(FwdArgs<T> a) {
  loss_rows(a.W, a.f + (a.n - 1) * a.B, a.g + (a.n - 1) * a.Bt, a.B, a.Bt, a.eps, a.partial);
}

// ------------------------------------------------------------------------------------------
// Backward passes (adjoint recursion, spec §1.5); X holds x̄, then W̄.

// X = gs · P ⊙ W with the final plan P = exp(−W/ε + f_n + g_n)
template <typename A>
__device__ void bwd_init(const A* W, const A* fn, const A* gn, int64_t B, int64_t Bt, A eps, A gs, A* X) {
  for (int64_t idx = global_thread(); idx < B * Bt; idx += thread_stride()) {
    const int64_t i = idx / Bt, j = idx - i * Bt;
    const A w = W[idx];
    X[idx] = gs * dexp(-w / eps + fn[i] + gn[j]) * w;
  }
}

// Column sums in groups of 32 columns (one per lane), the rows split over the block's R warps:
// stores this warp's partial sum `acc` of column j, then colsum[j] = Σ_r part[r][lane] in a fixed
// order (deterministic). Every thread of the block must reach it.
template <typename A>
__device__ __forceinline__ void combine_column_partials(A (*part)[32], A acc, int R, int64_t j, int64_t Bt, A* colsum) {
  const int lane = threadIdx.x & 31;
  part[threadIdx.x >> 5][lane] = acc;
  __syncthreads();
  if ((threadIdx.x >> 5) == 0 && j < Bt) {
    A total = part[0][lane];
    for (int r = 1; r < R; ++r) total += part[r][lane];
    colsum[j] = total;
  }
  __syncthreads();
}

// colsum_j = Σ_i X_ij
template <typename A>
__device__ void col_sums(const A* X, int64_t B, int64_t Bt, A* colsum) {
  __shared__ A part[kMaxWarps][32];
  const int lane = threadIdx.x & 31, rg = threadIdx.x >> 5, R = blockDim.x >> 5;
  const int64_t groups = (Bt + 31) / 32;
  for (int64_t q = blockIdx.x; q < groups; q += gridDim.x) {
    const int64_t j = q * 32 + lane;
    A acc = A(0);
    if (j < Bt)
      for (int64_t i = rg; i < B; i += R) acc += X[i * Bt + j];
    combine_column_partials(part, acc, R, j, Bt, colsum);
  }
}

// Column step k: X −= P_col ⊙ colsum (P_col = exp(−W/ε + f_k + g_k)); rowsum_i = Σ_j X_ij.
template <typename A>
__device__ void bwd_row_pass(const A* W, A* X, const A* fk, const A* gk, const A* colsum, int64_t B, int64_t Bt, A eps,
                             A* rowsum) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < B; i += warp_stride()) {
    A acc = A(0);
    for (int64_t j = lane; j < Bt; j += 32) {
      const int64_t o = i * Bt + j;
      const A xb = X[o] - dexp(-W[o] / eps + fk[i] + gk[j]) * colsum[j];
      X[o] = xb;
      acc += xb;
    }
    acc = warp_sum(acc);
    if (lane == 0) rowsum[i] = acc;
  }
}

// Row step k: X −= P_row ⊙ rowsum (P_row = exp(−W/ε + f_k + g_{k−1}), g_0 = 0); colsum_j = Σ_i X_ij.
template <typename A>
__device__ void bwd_col_pass(const A* W, A* X, const A* fk, const A* gprev, const A* rowsum, int64_t B, int64_t Bt,
                             A eps, A* colsum) {
  __shared__ A part[kMaxWarps][32];
  const int lane = threadIdx.x & 31, rg = threadIdx.x >> 5, R = blockDim.x >> 5;
  const int64_t groups = (Bt + 31) / 32;
  for (int64_t q = blockIdx.x; q < groups; q += gridDim.x) {
    const int64_t j = q * 32 + lane;
    A acc = A(0);
    if (j < Bt) {
      const A gj = gprev ? gprev[j] : A(0);
      for (int64_t i = rg; i < B; i += R) {
        const int64_t o = i * Bt + j;
        const A xb = X[o] - dexp(-W[o] / eps + fk[i] + gj) * rowsum[i];
        X[o] = xb;
        acc += xb;
      }
    }
    combine_column_partials(part, acc, R, j, Bt, colsum);
  }
}

// X ← W̄ = gs · P_final − x̄/ε
template <typename A>
__device__ void bwd_wbar(const A* W, A* X, const A* fn, const A* gn, int64_t B, int64_t Bt, A eps, A gs) {
  for (int64_t idx = global_thread(); idx < B * Bt; idx += thread_stride()) {
    const int64_t i = idx / Bt, j = idx - i * Bt;
    X[idx] = gs * dexp(-W[idx] / eps + fn[i] + gn[j]) - X[idx] / eps;
  }
}

// s̄_ic = Σ_j W̄_ij·sign(s_ic − t_jc);  ∂L/∂z_ic = (1/T)·s_ic·(s̄_ic − ⟨s̄_i, s_i⟩)
template <typename T>
__device__ void cost_bwd(const Acc<T>* Wbar, const Acc<T>* s, const Acc<T>* t, int64_t B, int64_t Bt, int64_t C,
                         Acc<T> inv_temp, Acc<T>* sbar, T* out) {
  using A = Acc<T>;
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < B; i += warp_stride()) {
    for (int64_t c = 0; c < C; ++c) {
      const A sc = s[i * C + c];
      A acc = A(0);
      for (int64_t j = lane; j < Bt; j += 32) {
        const A d = sc - t[j * C + c];
        acc += Wbar[i * Bt + j] * (A(d > A(0)) - A(d < A(0)));
      }
      acc = warp_sum(acc);
      if (lane == 0) sbar[i * C + c] = acc;
    }
    __syncwarp();
    A dot = A(0);
    for (int64_t c = lane; c < C; c += 32) dot += sbar[i * C + c] * s[i * C + c];
    dot = warp_sum_all(dot);
    for (int64_t c = lane; c < C; c += 32)
      out[i * C + c] = from_acc<T>(inv_temp * s[i * C + c] * (sbar[i * C + c] - dot));
    __syncwarp();
  }
}

template <typename T>
struct BwdArgs {
  const Acc<T>* grad;
  const Acc<T>*ps, *pt, *W, *f, *g;
  T* out;
  Acc<T>*X, *colsum, *rowsum, *sbar;
  int64_t B, Bt, C, n;
  Acc<T> inv_temp, eps;
  double scale;

  __device__ Acc<T> gs() const { return *grad * static_cast<Acc<T>>(scale); }
  __device__ const Acc<T>* fk(int64_t k) const { return f + (k - 1) * B; }                 // after row step k (1-based)
  __device__ const Acc<T>* gk(int64_t k) const { return k ? g + (k - 1) * Bt : nullptr; }  // after column step k
};

template <typename T>
__global__ void __launch_bounds__(kFusedThreads) bwd_fused_kernel(BwdArgs<T> a) {
  bwd_init(a.W, a.fk(a.n), a.gk(a.n), a.B, a.Bt, a.eps, a.gs(), a.X);
  __syncthreads();
  col_sums(a.X, a.B, a.Bt, a.colsum);
  __syncthreads();
  for (int64_t k = a.n; k >= 1; --k) {
    bwd_row_pass(a.W, a.X, a.fk(k), a.gk(k), a.colsum, a.B, a.Bt, a.eps, a.rowsum);
    __syncthreads();
    bwd_col_pass(a.W, a.X, a.fk(k), a.gk(k - 1), a.rowsum, a.B, a.Bt, a.eps, a.colsum);
    __syncthreads();
  }
  bwd_wbar(a.W, a.X, a.fk(a.n), a.gk(a.n), a.B, a.Bt, a.eps, a.gs());
  __syncthreads();
  cost_bwd(a.X, a.ps, a.pt, a.B, a.Bt, a.C, a.inv_temp, a.sbar, a.out);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_init_kernel(BwdArgs<T> a) {
  bwd_init(a.W, a.fk(a.n), a.gk(a.n), a.B, a.Bt, a.eps, a.gs(), a.X);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) col_sums_kernel(BwdArgs<T> a) {
  col_sums(a.X, a.B, a.Bt, a.colsum);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_row_pass_kernel(BwdArgs<T> a, int64_t k) {
  bwd_row_pass(a.W, a.X, a.fk(k), a.gk(k), a.colsum, a.B, a.Bt, a.eps, a.rowsum);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_col_pass_kernel(BwdArgs<T> a, int64_t k) {
  bwd_col_pass(a.W, a.X, a.fk(k), a.gk(k - 1), a.rowsum, a.B, a.Bt, a.eps, a.colsum);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_wbar_kernel(BwdArgs<T> a) {
  bwd_wbar(a.W, a.X, a.fk(a.n), a.gk(a.n), a.B, a.Bt, a.eps, a.gs());
}
template <typename T>
__global__ void __launch_bounds__(kThreads) cost_bwd_kernel(BwdArgs<T> a) {
  cost_bwd(a.X, a.ps, a.pt, a.B, a.Bt, a.C, a.inv_temp, a.sbar, a.out);
}

unsigned grid_for(int64_t units, int64_t per_block) { return blocks_for(units, per_block, kMaxBlocks); }

}  // namespace

int64_t sinkhorn_fused_max_elems() { return kFusedMaxElems; }

int64_t sinkhorn_fwd_workspace_size(const SinkhornProblem& p) { return p.batch; }

int64_t sinkhorn_bwd_workspace_size(const SinkhornProblem& p) {
  return p.batch * p.batch_t + p.batch_t + p.batch + p.batch * p.classes;
}

cudaError_t sinkhorn_fwd_cuda(const SinkhornProblem& p, const void* student, int64_t student_stride,
                              const void* teacher, void* loss, void* probs_s, void* probs_t, void* cost, void* f,
                              void* g, void* workspace, cudaStream_t stream) {
  if (p.batch < 1 || p.batch_t < 1 || p.classes < 1 || p.n_iters < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    FwdArgs<T> a{static_cast<const T*>(student),
                 student_stride,
                 static_cast<const A*>(teacher),
                 static_cast<A*>(loss),
                 static_cast<A*>(probs_s),
                 static_cast<A*>(probs_t),
                 static_cast<A*>(cost),
                 static_cast<A*>(f),
                 static_cast<A*>(g),
                 static_cast<A*>(workspace),
                 p.batch,
                 p.batch_t,
                 p.classes,
                 p.n_iters,
                 static_cast<A>(p.temperature),
                 static_cast<A>(p.epsilon),
                 p.scale};
    if (p.batch * p.batch_t <= kFusedMaxElems) {
      fwd_fused_kernel<T><<<kSingleBlock, kFusedThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
    const int warps = kThreads / 32;
    const unsigned row_blocks = grid_for(p.batch, warps), col_blocks = grid_for(p.batch_t, 32);
    softmax_kernel<T><<<row_blocks, kThreads, 0, stream>>>(a, false);
    softmax_kernel<T><<<grid_for(p.batch_t, warps), kThreads, 0, stream>>>(a, true);
    cost_kernel<T><<<grid_for(p.batch * p.batch_t, kThreads), kThreads, 0, stream>>>(a);
    for (int64_t k = 0; k < p.n_iters; ++k) {
      row_step_kernel<T><<<row_blocks, kThreads, 0, stream>>>(a, k);
      col_step_kernel<T><<<col_blocks, kThreads, 0, stream>>>(a, k);
    }
    loss_rows_kernel<T><<<row_blocks, kThreads, 0, stream>>>(a);
    launch_finalize(a.partial, a.B, Scaled{a.scale}, a.loss, stream, kThreads);
    return cudaGetLastError();
  });
}

cudaError_t sinkhorn_bwd_cuda(const SinkhornProblem& p, const void* grad, const void* probs_s, const void* probs_t,
                              const void* cost, const void* f, const void* g, void* grad_student, void* workspace,
                              cudaStream_t stream) {
  if (p.batch < 1 || p.batch_t < 1 || p.classes < 1 || p.n_iters < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* ws = static_cast<A*>(workspace);
    A* X = ws;
    A* colsum = X + p.batch * p.batch_t;
    A* rowsum = colsum + p.batch_t;
    A* sbar = rowsum + p.batch;
    BwdArgs<T> a{static_cast<const A*>(grad),
                 static_cast<const A*>(probs_s),
                 static_cast<const A*>(probs_t),
                 static_cast<const A*>(cost),
                 static_cast<const A*>(f),
                 static_cast<const A*>(g),
                 static_cast<T*>(grad_student),
                 X,
                 colsum,
                 rowsum,
                 sbar,
                 p.batch,
                 p.batch_t,
                 p.classes,
                 p.n_iters,
                 static_cast<A>(1.0 / p.temperature),
                 static_cast<A>(p.epsilon),
                 p.scale};
    if (p.batch * p.batch_t <= kFusedMaxElems) {
      bwd_fused_kernel<T><<<kSingleBlock, kFusedThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
    const int warps = kThreads / 32;
    const unsigned row_blocks = grid_for(p.batch, warps), col_blocks = grid_for(p.batch_t, 32);
    const unsigned elem_blocks = grid_for(p.batch * p.batch_t, kThreads);
    bwd_init_kernel<T><<<elem_blocks, kThreads, 0, stream>>>(a);
    col_sums_kernel<T><<<col_blocks, kThreads, 0, stream>>>(a);
    for (int64_t k = p.n_iters; k >= 1; --k) {
      bwd_row_pass_kernel<T><<<row_blocks, kThreads, 0, stream>>>(a, k);
      bwd_col_pass_kernel<T><<<col_blocks, kThreads, 0, stream>>>(a, k);
    }
    bwd_wbar_kernel<T><<<elem_blocks, kThreads, 0, stream>>>(a);
    cost_bwd_kernel<T><<<row_blocks, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdloss
