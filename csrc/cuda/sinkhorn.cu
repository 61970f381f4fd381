// SinKD CUDA kernels (spec §1, decision 1): the log-domain recursion and its adjoint in plain CUDA
// (no torch headers). Launched by csrc/cuda/sinkhorn_ops.cpp.
//
// Every pass is a grid-stride device function:
//   row passes     — one warp per row, lanes stride over the B' columns, warp-tree reductions;
//   column passes  — one block per group of 32 columns, its warps split the B rows into R
//                    interleaved subsets, the R partial results combined by warp 0 in order;
//   element passes — one thread per matrix entry.
// The passes of one direction run in ONE kernel, separated by a barrier (the Sync policy):
//   * small problems (B·B' <= kFusedMaxElems and B·B'·C <= kFusedMaxCostWork): one thread block,
//     __syncthreads between passes, the B×B' matrices in L1/L2;
//   * larger ones: a persistent cooperative kernel (as many blocks as fit on the device at once,
//     cooperative_groups grid sync between passes) — one launch instead of 2·n_iters + 5;
//   * where a cooperative launch is not possible: each pass as its own multi-block kernel.
// So the path depends on B, B' and C (the cost matrix is O(B·B'·C) work: B = B' = 256, C = 1000
// must not run on one SM). Reductions use fixed trees and fixed orders, never atomics, so results
// are deterministic run to run (for a given path; the paths differ in the order of column sums).
//
// Data (accumulation type A = fp32, or fp64 for fp64): probabilities s [B, C], t [B', C], and t
// transposed, tT [C, B'] (workspace), so that the cost pass (consecutive threads: consecutive j)
// and the cost backward (lanes over j) read the teacher coalesced; cost W [B, B'] (the forward's
// `cost` output); increments a [n, B] (subtracted from the rows by each row step) and b [n, B']
// (from the columns by each column step), stored one after the other in the op's `steps` output. As
// in the CPU kernel's log-domain path the iterate x (x = −W/ε, then x ← x − a_i, x ← x − b_j) is
// kept in a B×B' workspace and updated in place, never recomposed as −W/ε + Σa + Σb (which cancels
// to a few bits at small ε); the column subtraction is applied by the next row pass. The backward
// regenerates the forward's iterates bitwise — state h = the iterate after h half-steps — by
// replaying the same subtractions (__fsub_rn/__dsub_rn, and state 0 = __fdiv_rn(−W, ε): rounded the
// same way in every kernel, whatever --use_fast_math does to ordinary arithmetic) from checkpoints
// stored every ⌈√(2n)⌉ half-steps. The 1/ε in the adjoint (W̄ −= x̄/ε) would amplify any mismatch.
#include "kdloss/cuda_utils.cuh"
#include "kdloss/sinkhorn_cuda.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>

namespace kdloss {
namespace cuda {
namespace {

constexpr int kFusedThreads = 512;
constexpr int kThreads = 256;
constexpr int kMaxWarps = 32;
constexpr int64_t kFusedMaxElems = 65536;
constexpr int64_t kFusedMaxCostWork = int64_t(1) << 21;  // B·B'·C of the one-block path
constexpr int64_t kMaxBlocks = 65535;
constexpr unsigned kFull = 0xffffffffu;

// The barrier between two passes: the block's (one-block kernels) or the grid's (cooperative).
struct BlockSync {
  __device__ void operator()() const { __syncthreads(); }
};
struct GridSync {
  __device__ void operator()() const { cooperative_groups::this_grid().sync(); }
};

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
// correctly rounded subtraction / division, never fused or approximated (the replay must
// reproduce the forward's iterates bit for bit)
__device__ __forceinline__ float sub_rn(float x, float y) { return __fsub_rn(x, y); }
__device__ __forceinline__ double sub_rn(double x, double y) { return __dsub_rn(x, y); }
__device__ __forceinline__ float div_rn(float x, float y) { return __fdiv_rn(x, y); }
__device__ __forceinline__ double div_rn(double x, double y) { return __ddiv_rn(x, y); }

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

// out[r, :] = softmax(z[r, :] / T); z rows of stride `stride`. The logits are shifted by their
// maximum before the division by T (z/T itself overflows for a tiny T). Computed in float64 and
// rounded once: rounding is monotone, so sign(s_ic − t_jc) of the rounded probabilities is the exact
// sign wherever they differ (an fp32 softmax could order two nearly equal probabilities wrongly, and
// the backward's sign flip moves a gradient by 2·W̄_ij·s_ic/T).
template <typename In, typename A>
__device__ void softmax_rows(const In* z, int64_t stride, int64_t rows, int64_t C, A temp_a, A* out,
                             A* outT = nullptr) {
  const int lane = threadIdx.x & 31;
  const double temp = static_cast<double>(temp_a);
  for (int64_t r = global_warp(); r < rows; r += warp_stride()) {
    const In* zr = z + r * stride;
    double m = neg_inf<double>();
    for (int64_t c = lane; c < C; c += 32) {
      const double x = static_cast<double>(to_acc(zr[c]));
      m = x > m ? x : m;
    }
    m = warp_max_all(m);
    double s = 0.0;
    for (int64_t c = lane; c < C; c += 32) s += dexp((static_cast<double>(to_acc(zr[c])) - m) / temp);
    s = warp_sum_all(s);
    for (int64_t c = lane; c < C; c += 32) {
      const A p = static_cast<A>(dexp((static_cast<double>(to_acc(zr[c])) - m) / temp) / s);
      out[r * C + c] = p;
      if (outT) outT[c * rows + r] = p;  // transposed [C, rows]: the cost passes read it coalesced
    }
  }
}

// State 0 of the iterate: x_ij = −W_ij/ε.
template <typename A>
__device__ __forceinline__ A initial_iterate(A w, A eps) {
  return div_rn(-w, eps);
}

// W_ij = Σ_c |s_ic − t_jc| and the iterate's state 0, X = −W/ε; tT = t transposed [C, B'].
template <typename A>
__device__ void cost_elems(const A* s, const A* tT, int64_t B, int64_t Bt, int64_t C, A eps, A* W, A* X) {
  for (int64_t idx = global_thread(); idx < B * Bt; idx += thread_stride()) {
    const int64_t i = idx / Bt, j = idx - i * Bt;
    A acc = A(0);
    for (int64_t c = 0; c < C; ++c) acc += fabs(s[i * C + c] - tT[c * Bt + j]);
    W[idx] = acc;
    X[idx] = initial_iterate(acc, eps);
  }
}

// Row step: x_ij ← x_ij − b_j (the pending column step; b_prev = nullptr before the first), then
// a_i = log Σ_j exp(x_ij) and x_ij ← x_ij − a_i. Each lane rewrites only its own entries.
template <typename A>
__device__ void row_step(A* X, const A* b_prev, int64_t B, int64_t Bt, A* a) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < B; i += warp_stride()) {
    A* Xi = X + i * Bt;
    Lse<A> v{neg_inf<A>(), A(0)};
    for (int64_t j = lane; j < Bt; j += 32) {
      A x = Xi[j];
      if (b_prev) {
        x = sub_rn(x, b_prev[j]);
        Xi[j] = x;
      }
      lse_add(v, x);
    }
    v = warp_lse(v);
    const A ai = v.m + dlog(v.s);
    if (lane == 0) a[i] = ai;
    for (int64_t j = lane; j < Bt; j += 32) Xi[j] = sub_rn(Xi[j], ai);
  }
}

// Column step: b_j = log Σ_i exp(x_ij); the subtraction is left to the next row pass.
template <typename A>
__device__ void col_step(const A* X, int64_t B, int64_t Bt, A* b) {
  __shared__ A part_m[kMaxWarps][32];
  __shared__ A part_s[kMaxWarps][32];
  const int lane = threadIdx.x & 31, rg = threadIdx.x >> 5, R = blockDim.x >> 5;
  const int64_t groups = (Bt + 31) / 32;
  for (int64_t q = blockIdx.x; q < groups; q += gridDim.x) {
    const int64_t j = q * 32 + lane;
    Lse<A> v{neg_inf<A>(), A(0)};
    if (j < Bt)
      for (int64_t i = rg; i < B; i += R) lse_add(v, X[i * Bt + j]);
    part_m[rg][lane] = v.m;
    part_s[rg][lane] = v.s;
    __syncthreads();
    if (rg == 0 && j < Bt) {
      Lse<A> acc{part_m[0][lane], part_s[0][lane]};
      for (int r = 1; r < R; ++r) acc = lse_combine(acc, Lse<A>{part_m[r][lane], part_s[r][lane]});
      b[j] = acc.m + dlog(acc.s);
    }
    __syncthreads();
  }
}

// partial[i] = Σ_j exp(x_ij − b_j) · W_ij with the last column step applied
template <typename A>
__device__ void loss_rows(const A* W, const A* X, const A* b, int64_t B, int64_t Bt, A* partial) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < B; i += warp_stride()) {
    A acc = A(0);
    for (int64_t j = lane; j < Bt; j += 32) {
      const int64_t o = i * Bt + j;
      acc += dexp(sub_rn(X[o], b[j])) * W[o];
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
  Acc<T>*ps, *pt, *W, *a, *b, *partial, *X, *tT;
  int64_t B, Bt, C, n;
  Acc<T> temp, eps;
  double scale;

  __device__ const Acc<T>* b_prev(int64_t k) const { return k ? b + (k - 1) * Bt : nullptr; }
};

// Every pass of the forward, `sync` between them.
template <typename T, typename Sync>
__device__ void fwd_passes(const FwdArgs<T>& a, Sync sync) {
  softmax_rows(a.student, a.student_stride, a.B, a.C, a.temp, a.ps);
  softmax_rows(a.teacher, a.C, a.Bt, a.C, a.temp, a.pt, a.tT);
  sync();
  cost_elems(a.ps, a.tT, a.B, a.Bt, a.C, a.eps, a.W, a.X);
  sync();
  for (int64_t k = 0; k < a.n; ++k) {
    row_step(a.X, a.b_prev(k), a.B, a.Bt, a.a + k * a.B);
    sync();
    col_step(a.X, a.B, a.Bt, a.b + k * a.Bt);
    sync();
  }
  loss_rows(a.W, a.X, a.b + (a.n - 1) * a.Bt, a.B, a.Bt, a.partial);
  sync();
  finalize(a.partial, a.B, Scaled{a.scale}, a.loss);  // loss = scale · Σ partial (block 0, fixed order)
}

template <typename T>
__global__ void __launch_bounds__(kFusedThreads) fwd_fused_kernel(FwdArgs<T> a) {
  fwd_passes(a, BlockSync{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_cooperative_kernel(FwdArgs<T> a) {
  fwd_passes(a, GridSync{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_kernel(FwdArgs<T> a, bool teacher) {
  if (teacher) softmax_rows(a.teacher, a.C, a.Bt, a.C, a.temp, a.pt, a.tT);
  else softmax_rows(a.student, a.student_stride, a.B, a.C, a.temp, a.ps);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) cost_kernel(FwdArgs<T> a) {
  cost_elems(a.ps, a.tT, a.B, a.Bt, a.C, a.eps, a.W, a.X);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) row_step_kernel(FwdArgs<T> a, int64_t k) {
  row_step(a.X, a.b_prev(k), a.B, a.Bt, a.a + k * a.B);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) col_step_kernel(FwdArgs<T> a, int64_t k) {
  col_step(a.X, a.B, a.Bt, a.b + k * a.Bt);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) loss_rows_kernel(FwdArgs<T> a) {
  loss_rows(a.W, a.X, a.b + (a.n - 1) * a.Bt, a.B, a.Bt, a.partial);
}

// ------------------------------------------------------------------------------------------
// Backward passes (adjoint recursion, spec §1.5); X holds x̄, then W̄.

// The forward's iterates, regenerated: state(h) = the iterate after h half-steps (state 0 = −W/ε;
// half-step t subtracts a_{t/2} from the rows for even t, b_{t/2} from the columns for odd t),
// replayed from the nearest checkpoint at or below h (states every, 2·every, … are stored).
template <typename A>
struct Replay {
  const A *W, *a, *b, *ckpt;
  int64_t B, Bt, every;
  A eps;

  __device__ A state(int64_t h, int64_t i, int64_t j) const {
    const int64_t c = h / every, o = i * Bt + j;
    A x = c == 0 ? initial_iterate(W[o], eps) : ckpt[(c - 1) * B * Bt + o];
    for (int64_t t = c * every; t < h; ++t) x = sub_rn(x, (t & 1) ? b[(t >> 1) * Bt + j] : a[(t >> 1) * B + i]);
    return x;
  }
};

// Checkpoints: states every, 2·every, …, n_ckpt·every of every entry.
template <typename A>
__device__ void store_checkpoints(const Replay<A> r, int64_t n_ckpt, A* ckpt) {
  for (int64_t idx = global_thread(); idx < r.B * r.Bt; idx += thread_stride()) {
    const int64_t i = idx / r.Bt, j = idx - i * r.Bt;
    A x = initial_iterate(r.W[idx], r.eps);
    for (int64_t t = 0; t < n_ckpt * r.every; ++t) {
      x = sub_rn(x, (t & 1) ? r.b[(t >> 1) * r.Bt + j] : r.a[(t >> 1) * r.B + i]);
      if ((t + 1) % r.every == 0) ckpt[((t + 1) / r.every - 1) * r.B * r.Bt + idx] = x;
    }
  }
}

// X = gs · P ⊙ W with the final plan P = exp(state 2n)
template <typename A>
__device__ void bwd_init(const Replay<A> r, int64_t n, A gs, A* X) {
  for (int64_t idx = global_thread(); idx < r.B * r.Bt; idx += thread_stride()) {
    const int64_t i = idx / r.Bt, j = idx - i * r.Bt;
    X[idx] = gs * dexp(r.state(2 * n, i, j)) * r.W[idx];
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

// Column step k: X −= P_col ⊙ colsum (P_col = exp(state 2k)); rowsum_i = Σ_j X_ij.
template <typename A>
__device__ void bwd_row_pass(const Replay<A> r, A* X, int64_t k, const A* colsum, A* rowsum) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < r.B; i += warp_stride()) {
    A acc = A(0);
    for (int64_t j = lane; j < r.Bt; j += 32) {
      const int64_t o = i * r.Bt + j;
      const A xb = X[o] - dexp(r.state(2 * k, i, j)) * colsum[j];
      X[o] = xb;
      acc += xb;
    }
    acc = warp_sum(acc);
    if (lane == 0) rowsum[i] = acc;
  }
}

// Row step k: X −= P_row ⊙ rowsum (P_row = exp(state 2k − 1)); colsum_j = Σ_i X_ij.
template <typename A>
__device__ void bwd_col_pass(const Replay<A> r, A* X, int64_t k, const A* rowsum, A* colsum) {
  __shared__ A part[kMaxWarps][32];
  const int lane = threadIdx.x & 31, rg = threadIdx.x >> 5, R = blockDim.x >> 5;
  const int64_t groups = (r.Bt + 31) / 32;
  for (int64_t q = blockIdx.x; q < groups; q += gridDim.x) {
    const int64_t j = q * 32 + lane;
    A acc = A(0);
    if (j < r.Bt) {
      for (int64_t i = rg; i < r.B; i += R) {
        const int64_t o = i * r.Bt + j;
        const A xb = X[o] - dexp(r.state(2 * k - 1, i, j)) * rowsum[i];
        X[o] = xb;
        acc += xb;
      }
    }
    combine_column_partials(part, acc, R, j, r.Bt, colsum);
  }
}

// X ← W̄ = gs · P_final − x̄/ε
template <typename A>
__device__ void bwd_wbar(const Replay<A> r, A* X, int64_t n, A gs) {
  for (int64_t idx = global_thread(); idx < r.B * r.Bt; idx += thread_stride()) {
    const int64_t i = idx / r.Bt, j = idx - i * r.Bt;
    X[idx] = gs * dexp(r.state(2 * n, i, j)) - X[idx] / r.eps;
  }
}

// s̄_ic = Σ_j W̄_ij·sign(s_ic − t_jc);  ∂L/∂z_ic = (1/T)·s_ic·(s̄_ic − ⟨s̄_i, s_i⟩)
// tT = t transposed [C, B'] (lanes over j read it coalesced).
template <typename A>
__device__ void transpose_rows(const A* t, int64_t rows, int64_t C, A* tT) {
  for (int64_t idx = global_thread(); idx < rows * C; idx += thread_stride()) {
    const int64_t c = idx / rows, r = idx - c * rows;
    tT[idx] = t[r * C + c];
  }
}

template <typename T>
__device__ void cost_bwd(const Acc<T>* Wbar, const Acc<T>* s, const Acc<T>* tT, int64_t B, int64_t Bt, int64_t C,
                         Acc<T> inv_temp, Acc<T>* sbar, T* out) {
  using A = Acc<T>;
  const int lane = threadIdx.x & 31;
  for (int64_t i = global_warp(); i < B; i += warp_stride()) {
    for (int64_t c = 0; c < C; ++c) {
      const A sc = s[i * C + c];
      A acc = A(0);
      for (int64_t j = lane; j < Bt; j += 32) {
        const A d = sc - tT[c * Bt + j];
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

// Half-steps between checkpoints: ⌈√(2n)⌉ (so ⌊2n/every⌋ stored B×B' states, ≤ every − 1
// subtractions per replayed entry).
int64_t checkpoint_every(int64_t n_iters) {
  int64_t e = 1;
  while (e * e < 2 * n_iters) ++e;
  return e;
}

template <typename T>
struct BwdArgs {
  const Acc<T>* grad;
  const Acc<T>*ps, *pt;
  T* out;
  Acc<T>*X, *colsum, *rowsum, *sbar, *ckpt, *tT;
  int64_t B, Bt, C, n, n_ckpt;
  Acc<T> inv_temp;
  double scale;
  Replay<Acc<T>> r;

  __device__ Acc<T> gs() const { return *grad * static_cast<Acc<T>>(scale); }
};

// Every pass of the backward, `sync` between them.
template <typename T, typename Sync>
__device__ void bwd_passes(const BwdArgs<T>& a, Sync sync) {
  store_checkpoints(a.r, a.n_ckpt, a.ckpt);
  transpose_rows(a.pt, a.Bt, a.C, a.tT);
  sync();
  bwd_init(a.r, a.n, a.gs(), a.X);
  sync();
  col_sums(a.X, a.B, a.Bt, a.colsum);
  sync();
  for (int64_t k = a.n; k >= 1; --k) {
    bwd_row_pass(a.r, a.X, k, a.colsum, a.rowsum);
    sync();
    bwd_col_pass(a.r, a.X, k, a.rowsum, a.colsum);
    sync();
  }
  bwd_wbar(a.r, a.X, a.n, a.gs());
  sync();
  cost_bwd(a.X, a.ps, a.tT, a.B, a.Bt, a.C, a.inv_temp, a.sbar, a.out);
}

template <typename T>
__global__ void __launch_bounds__(kFusedThreads) bwd_fused_kernel(BwdArgs<T> a) {
  bwd_passes(a, BlockSync{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_cooperative_kernel(BwdArgs<T> a) {
  bwd_passes(a, GridSync{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) checkpoint_kernel(BwdArgs<T> a) {
  store_checkpoints(a.r, a.n_ckpt, a.ckpt);
  transpose_rows(a.pt, a.Bt, a.C, a.tT);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_init_kernel(BwdArgs<T> a) {
  bwd_init(a.r, a.n, a.gs(), a.X);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) col_sums_kernel(BwdArgs<T> a) {
  col_sums(a.X, a.B, a.Bt, a.colsum);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_row_pass_kernel(BwdArgs<T> a, int64_t k) {
  bwd_row_pass(a.r, a.X, k, a.colsum, a.rowsum);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_col_pass_kernel(BwdArgs<T> a, int64_t k) {
  bwd_col_pass(a.r, a.X, k, a.rowsum, a.colsum);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_wbar_kernel(BwdArgs<T> a) {
  bwd_wbar(a.r, a.X, a.n, a.gs());
}
template <typename T>
__global__ void __launch_bounds__(kThreads) cost_bwd_kernel(BwdArgs<T> a) {
  cost_bwd(a.X, a.ps, a.tT, a.B, a.Bt, a.C, a.inv_temp, a.sbar, a.out);
}

unsigned grid_for(int64_t units, int64_t per_block) { return blocks_for(units, per_block, kMaxBlocks); }

// The one-block path: the whole problem fits one SM's L1/L2 and its cost matrix is little work.
bool one_block(const SinkhornProblem& p) {
  const int64_t elems = p.batch * p.batch_t;
  return elems <= kFusedMaxElems && elems * p.classes <= kFusedMaxCostWork;
}

// Blocks every pass could use: rows (a warp each), column groups (a block each), entries.
unsigned wanted_blocks(const SinkhornProblem& p) {
  const unsigned rows = grid_for(p.batch, kThreads / 32), cols = grid_for(p.batch_t, 32);
  const unsigned elems = grid_for(p.batch * p.batch_t, kThreads);
  return std::max(rows, std::max(cols, elems));
}

// Launches `kernel` (kThreads per block) as a cooperative grid of as many blocks as the passes
// can use and the device can hold at once. Returns false, with no error left pending, where the
// device or the occupancy does not allow it (the caller then launches pass by pass).
template <typename Args>
bool launch_cooperative(void (*kernel)(Args), Args args, unsigned wanted, cudaStream_t stream) {
  int device = 0, cooperative = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) != cudaSuccess || !cooperative ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess || per_sm < 1) {
    (void)cudaGetLastError();
    return false;
  }
  const unsigned grid = std::min<unsigned>(wanted, static_cast<unsigned>(per_sm) * static_cast<unsigned>(sms));
  void* params[] = {&args};
  if (cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(kThreads), params, 0,
                                  stream) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

}  // namespace

int64_t sinkhorn_fused_max_elems() { return kFusedMaxElems; }

bool sinkhorn_one_block(const SinkhornProblem& p) { return one_block(p); }

int64_t sinkhorn_fwd_workspace_size(const SinkhornProblem& p) {
  return p.batch + p.batch * p.batch_t + p.classes * p.batch_t;
}

int64_t sinkhorn_bwd_workspace_size(const SinkhornProblem& p) {
  const int64_t n_ckpt = 2 * p.n_iters / checkpoint_every(p.n_iters);
  return (1 + n_ckpt) * p.batch * p.batch_t + p.batch_t + p.batch + p.batch * p.classes + p.classes * p.batch_t;
}

cudaError_t sinkhorn_fwd_cuda(const SinkhornProblem& p, const void* student, int64_t student_stride,
                              const void* teacher, void* loss, void* probs_s, void* probs_t, void* cost, void* a_hist,
                              void* b_hist, void* workspace, cudaStream_t stream) {
  if (p.batch < 1 || p.batch_t < 1 || p.classes < 1 || p.n_iters < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* ws = static_cast<A*>(workspace);
    FwdArgs<T> a{static_cast<const T*>(student),
                 student_stride,
                 static_cast<const A*>(teacher),
                 static_cast<A*>(loss),
                 static_cast<A*>(probs_s),
                 static_cast<A*>(probs_t),
                 static_cast<A*>(cost),
                 static_cast<A*>(a_hist),
                 static_cast<A*>(b_hist),
                 ws,
                 ws + p.batch,
                 ws + p.batch + p.batch * p.batch_t,
                 p.batch,
                 p.batch_t,
                 p.classes,
                 p.n_iters,
                 static_cast<A>(p.temperature),
                 static_cast<A>(p.epsilon),
                 p.scale};
    if (one_block(p)) {
      fwd_fused_kernel<T><<<kSingleBlock, kFusedThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
    if (launch_cooperative(fwd_cooperative_kernel<T>, a, wanted_blocks(p), stream)) return cudaGetLastError();
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
                              const void* cost, const void* a_hist, const void* b_hist, void* grad_student,
                              void* workspace, cudaStream_t stream) {
  if (p.batch < 1 || p.batch_t < 1 || p.classes < 1 || p.n_iters < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    const int64_t every = checkpoint_every(p.n_iters), n_ckpt = 2 * p.n_iters / every;
    A* ws = static_cast<A*>(workspace);
    A* X = ws;
    A* colsum = X + p.batch * p.batch_t;
    A* rowsum = colsum + p.batch_t;
    A* sbar = rowsum + p.batch;
    A* tT = sbar + p.batch * p.classes;
    A* ckpt = tT + p.classes * p.batch_t;
    const Replay<A> replay{static_cast<const A*>(cost),
                           static_cast<const A*>(a_hist),
                           static_cast<const A*>(b_hist),
                           ckpt,
                           p.batch,
                           p.batch_t,
                           every,
                           static_cast<A>(p.epsilon)};
    BwdArgs<T> a{static_cast<const A*>(grad),
                 static_cast<const A*>(probs_s),
                 static_cast<const A*>(probs_t),
                 static_cast<T*>(grad_student),
                 X,
                 colsum,
                 rowsum,
                 sbar,
                 ckpt,
                 tT,
                 p.batch,
                 p.batch_t,
                 p.classes,
                 p.n_iters,
                 n_ckpt,
                 static_cast<A>(1.0 / p.temperature),
                 p.scale,
                 replay};
    if (one_block(p)) {
      bwd_fused_kernel<T><<<kSingleBlock, kFusedThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
    if (launch_cooperative(bwd_cooperative_kernel<T>, a, wanted_blocks(p), stream)) return cudaGetLastError();
    const int warps = kThreads / 32;
    const unsigned row_blocks = grid_for(p.batch, warps), col_blocks = grid_for(p.batch_t, 32);
    const unsigned elem_blocks = grid_for(p.batch * p.batch_t, kThreads);
    checkpoint_kernel<T><<<elem_blocks, kThreads, 0, stream>>>(a);
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
