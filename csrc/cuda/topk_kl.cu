// Top-k sparse KL CUDA kernels (spec §3). Plain CUDA: launchers take raw pointers (see
// kdloss/topk_kl_cuda.h); the torch glue is csrc/cuda/topk_kl_ops.cpp.
//
// One CTA per row. Forward: each thread streams its share of the row with 16-byte loads keeping a
// running (max, Σexp) of logits/T in the accumulation type, the CTA merges them in a fixed order,
// then the k teacher slots are gathered; per-row losses go to a workspace that a single-CTA
// finalize kernel reduces in a fixed order (deterministic, no atomics). Backward: the CTA
// recomputes the row's coefficients from the saved log-sum-exp, writes g·α·softmax over the row
// with 16-byte stores, then overwrites the k kept entries (spec §3.4). No host synchronisation.
#include <cstdint>

#include "kdloss/cuda_utils.cuh"
#include "kdloss/topk_kl_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr double kTailClamp = 1e-8;  // DistillKit's clamp of Σ_K q in the tail term (spec §3.3)

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }

// 16 bytes of elements, loaded and stored as one vector.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Running log-sum-exp: max m and Σ exp(x − m).
template <typename A>
struct Lse {
  A m, s;
};

template <typename A>
__device__ __forceinline__ void lse_merge(Lse<A>& a, const Lse<A>& b) {
  if (b.m == neg_inf<A>()) return;
  if (a.m == neg_inf<A>()) {
    a = b;
  } else if (b.m > a.m) {
    a.s = a.s * exp_acc(a.m - b.m) + b.s;
    a.m = b.m;
  } else {
    a.s += b.s * exp_acc(b.m - a.m);
  }
}

// Adds x[0..n) (already divided by T) with one rescale at most.
template <typename A, int n>
__device__ __forceinline__ void lse_add(Lse<A>& a, const A (&x)[n]) {
  A pm = x[0];
#pragma unroll
  for (int j = 1; j < n; ++j) pm = x[j] > pm ? x[j] : pm;
  if (pm > a.m) {
    a.s *= exp_acc(a.m - pm);  // 0 while a.m = −inf
    a.m = pm;
  }
  if (a.m == neg_inf<A>()) return;  // everything so far is −inf
#pragma unroll
  for (int j = 0; j < n; ++j) a.s += exp_acc(x[j] - a.m);
}

// Merge over the CTA in a fixed order; the result is returned to every thread.
template <typename A>
__device__ Lse<A> block_lse(Lse<A> v, Lse<A>* scratch /*[33]*/) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Lse<A> other{__shfl_down_sync(0xffffffffu, v.m, offset), __shfl_down_sync(0xffffffffu, v.s, offset)};
    lse_merge(v, other);
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + 31) >> 5;
    v = lane < n_warps ? scratch[lane] : Lse<A>{neg_inf<A>(), A(0)};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      Lse<A> other{__shfl_down_sync(0xffffffffu, v.m, offset), __shfl_down_sync(0xffffffffu, v.s, offset)};
      lse_merge(v, other);
    }
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  const Lse<A> out = scratch[32];
  __syncthreads();
  return out;
}

template <typename A>
__device__ __forceinline__ A lse_value(const Lse<A>& a) {
  return a.m == neg_inf<A>() ? a.m : a.m + log_acc(a.s);
}

// log Σ_j exp(z_j / T) over the row.
template <typename T>
__device__ Acc<T> row_logsumexp(const T* z, int64_t V, Acc<T> inv_t, Lse<Acc<T>>* scratch) {
  using A = Acc<T>;
  constexpr int P = Pack<T>::kSize;
  Lse<A> acc{neg_inf<A>(), A(0)};
  int64_t start = 0;
  if (aligned16(z)) {
    const int64_t packs = V / P;
    const Pack<T>* zp = reinterpret_cast<const Pack<T>*>(z);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const Pack<T> pk = zp[i];
      A x[P];
#pragma unroll
      for (int j = 0; j < P; ++j) x[j] = to_acc(pk.v[j]) * inv_t;
      lse_add(acc, x);
    }
    start = packs * P;
  }
  for (int64_t j = start + threadIdx.x; j < V; j += blockDim.x) {
    const A x[1] = {to_acc(z[j]) * inv_t};
    lse_add(acc, x);
  }
  return lse_value(block_lse(acc, scratch));
}

// One row's teacher slots.
template <typename T>
struct Slots {
  using A = Acc<T>;
  const T* z;
  const int64_t* ids;
  const A* logp;
  int64_t k, vocab;

  // A slot is in K when it carries teacher mass and its id is in range (Python validates ids).
  __device__ bool kept(int64_t i) const { return logp[i] != neg_inf<A>() && ids[i] >= 0 && ids[i] < vocab; }
  __device__ A scaled_logit(int64_t i, A inv_t) const { return to_acc(z[ids[i]]) * inv_t; }
};

template <typename T>
__device__ Slots<T> row_slots(const TopKKLProblem& p, int64_t n) {
  using A = Acc<T>;
  return {static_cast<const T*>(p.logits) + n * p.row_stride, p.ids + n * p.k,
          static_cast<const A*>(p.target_logp) + n * p.k, p.k, p.vocab};
}

// log-sum-exp of z/T over the kept slots (student_support="topk"); 0 when K is empty.
template <typename T>
__device__ Acc<T> kept_logsumexp(const Slots<T>& row, Acc<T> inv_t, Lse<Acc<T>>* scratch) {
  using A = Acc<T>;
  Lse<A> acc{neg_inf<A>(), A(0)};
  for (int64_t i = threadIdx.x; i < row.k; i += blockDim.x) {
    if (!row.kept(i)) continue;
    const A x[1] = {row.scaled_logit(i, inv_t)};
    lse_add(acc, x);
  }
  const Lse<A> total = block_lse(acc, scratch);
  return total.m == neg_inf<A>() ? A(0) : lse_value(total);
}

// Σ_K p̂ and Σ_K q over the kept slots, valid in thread 0.
template <typename T>
__device__ void kept_sums(const Slots<T>& row, Acc<T> inv_t, Acc<T> lse, Acc<T>* scratch, Acc<T>& teacher,
                          Acc<T>& student, Acc<T>* head /* Σ p̂ (log p̂ − log q), or null */) {
  using A = Acc<T>;
  A t = 0, s = 0, h = 0;
  for (int64_t i = threadIdx.x; i < row.k; i += blockDim.x) {
    if (!row.kept(i)) continue;
    const A log_q = row.scaled_logit(i, inv_t) - lse;
    const A p = exp_acc(row.logp[i]);
    t += p;
    s += exp_acc(log_q);
    h += p * (row.logp[i] - log_q);
  }
  teacher = block_sum(t, scratch);
  student = block_sum(s, scratch);
  if (head) *head = block_sum(h, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fwd_rows_kernel(TopKKLProblem p, Acc<T>* row_loss, Acc<T>* lse_out, Acc<T>* loss_none) {
  using A = Acc<T>;
  __shared__ Lse<A> lse_scratch[33];
  __shared__ A sum_scratch[32];
  const int64_t n = blockIdx.x;
  if (!p.valid[n]) {  // uniform over the CTA
    if (threadIdx.x == 0) {
      row_loss[n] = A(0);
      lse_out[n] = A(0);
      if (loss_none) loss_none[n] = A(0);
    }
    return;
  }
  const Slots<T> row = row_slots<T>(p, n);
  const A inv_t = static_cast<A>(p.inv_temperature);
  const A lse = p.full_support ? row_logsumexp<T>(row.z, p.vocab, inv_t, lse_scratch)
                               : kept_logsumexp<T>(row, inv_t, lse_scratch);
  A teacher, student, head;
  kept_sums<T>(row, inv_t, lse, sum_scratch, teacher, student, &head);
  if (threadIdx.x != 0) return;
  A kl = head;
  const A tail = static_cast<const A*>(p.tail_logp)[n];
  if (p.full_support && tail != neg_inf<A>()) {
    const A clamped = fmin(fmax(student, A(kTailClamp)), A(1.0 - kTailClamp));
    kl += exp_acc(tail) * (tail - log1p_acc(-clamped));
  }
  const A value = static_cast<A>(p.scale) * kl;
  row_loss[n] = value;
  lse_out[n] = lse;
  if (loss_none) loss_none[n] = value;
}

// out[0..V) = c · exp(z/T − lse), or zeros when c = 0.
template <typename T>
__device__ void write_dense(T* out, const T* z, int64_t V, Acc<T> inv_t, Acc<T> lse, Acc<T> c) {
  using A = Acc<T>;
  constexpr int P = Pack<T>::kSize;
  int64_t start = 0;
  if (aligned16(out) && aligned16(z)) {
    const int64_t packs = V / P;
    const Pack<T>* zp = reinterpret_cast<const Pack<T>*>(z);
    Pack<T>* op = reinterpret_cast<Pack<T>*>(out);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      Pack<T> pk;
      if (c == A(0)) {
#pragma unroll
        for (int j = 0; j < P; ++j) pk.v[j] = from_acc<T>(A(0));
      } else {
        pk = zp[i];
#pragma unroll
        for (int j = 0; j < P; ++j) pk.v[j] = from_acc<T>(c * exp_acc(to_acc(pk.v[j]) * inv_t - lse));
      }
      op[i] = pk;
    }
    start = packs * P;
  }
  for (int64_t j = start + threadIdx.x; j < V; j += blockDim.x)
    out[j] = from_acc<T>(c == A(0) ? A(0) : c * exp_acc(to_acc(z[j]) * inv_t - lse));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bwd_rows_kernel(TopKKLProblem p, const Acc<T>* grad, const Acc<T>* lse_in, T* grad_logits) {
  using A = Acc<T>;
  __shared__ A sum_scratch[32];
  __shared__ A coef[3];  // α, γ, Σ_K p̂
  const int64_t n = blockIdx.x;
  T* out = grad_logits + n * p.vocab;
  const A inv_t = static_cast<A>(p.inv_temperature);
  A g = grad[p.reduction == Reduction::kNone ? n : 0] * static_cast<A>(p.scale) * inv_t;
  if (p.reduction == Reduction::kMean) {
    const A d = static_cast<const A*>(p.divisor)[0];
    g = d > A(0) ? g / d : A(0);
  }
  if (!p.valid[n]) g = A(0);
  const Slots<T> row = row_slots<T>(p, n);
  if (g == A(0)) {  // uniform over the CTA
    write_dense<T>(out, row.z, p.vocab, inv_t, A(0), A(0));
    return;
  }
  const A lse = lse_in[n];
  A teacher, student;
  kept_sums<T>(row, inv_t, lse, sum_scratch, teacher, student, nullptr);
  if (threadIdx.x == 0) {
    A gamma = 0;  // d/dz of −r̂·log(1 − Σ_K q); zero where DistillKit's clamp is active
    const A tail = static_cast<const A*>(p.tail_logp)[n];
    if (p.full_support && tail != neg_inf<A>() && student > A(kTailClamp) && student < A(1.0 - kTailClamp))
      gamma = exp_acc(tail) / (A(1) - student);
    coef[0] = p.full_support ? teacher - gamma * student : A(0);
    coef[1] = gamma;
    coef[2] = teacher;
  }
  __syncthreads();
  const A alpha = coef[0], gamma = coef[1], mass = coef[2];
  write_dense<T>(out, row.z, p.vocab, inv_t, lse, g * alpha);
  __syncthreads();  // the dense writes of every thread land before the kept entries are overwritten
  for (int64_t i = threadIdx.x; i < row.k; i += blockDim.x) {
    if (!row.kept(i)) continue;
    const A q = exp_acc(row.scaled_logit(i, inv_t) - lse);
    const A pk = exp_acc(row.logp[i]);
    const A d = p.full_support ? (alpha + gamma) * q - pk : mass * q - pk;
    out[row.ids[i]] = from_acc<T>(g * d);
  }
}

}  // namespace

int64_t topk_kl_workspace_size(int64_t rows) { return rows > 0 ? rows : 1; }

cudaError_t topk_kl_fwd_cuda(const TopKKLProblem& p, void* loss, void* lse, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* rows = static_cast<A*>(workspace);
    A* loss_none = p.reduction == Reduction::kNone ? static_cast<A*>(loss) : nullptr;
    if (p.rows > 0)
      fwd_rows_kernel<T><<<one_block_per_row(p.rows), kThreads, 0, stream>>>(p, rows, static_cast<A*>(lse), loss_none);
    if (p.reduction != Reduction::kNone)
      launch_finalize(rows, p.rows, mean_or_sum(p.reduction, DeviceDivisor<A>{static_cast<const A*>(p.divisor)}),
                      static_cast<A*>(loss), stream);
    return cudaGetLastError();
  });
}

cudaError_t topk_kl_bwd_cuda(const TopKKLProblem& p, const void* grad, const void* lse, void* grad_logits,
                             cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    bwd_rows_kernel<T><<<one_block_per_row(p.rows), kThreads, 0, stream>>>(
        p, static_cast<const A*>(grad), static_cast<const A*>(lse), static_cast<T*>(grad_logits));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdloss
