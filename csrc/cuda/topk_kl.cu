// Top-k sparse KL CUDA kernels (spec §3). Plain CUDA: launchers take raw pointers (see
// kdloss/topk_kl_cuda.h); the torch glue is csrc/cuda/topk_kl_ops.cpp.
//
// One CTA per row. Forward: each thread streams its share of the row with 16-byte loads keeping a
// running (max m of the logits, Σ exp((z − m)/T)) in the accumulation type, the CTA merges them in
// a fixed order, then the k teacher slots are gathered; per-row losses go to a workspace that a
// single-CTA finalize kernel reduces in a fixed order (deterministic, no atomics). Backward: the
// CTA recomputes the row's coefficients from the saved stats (m, l = log Σ exp((z − m)/T)), writes
// g·α·softmax over the row with 16-byte stores, then overwrites the k kept entries (spec §3.4). No
// host synchronisation. Forward with the gradient (fwd_grad_rows_kernel): the forward, then the
// gradient for an upstream gradient of 1 from the same CTA while its row is still in L2 (the grid is
// bounded so that the rows in flight fit in L2; each CTA loops over rows). Rows are addressed with two
// strides ([B, T, V] logits read in place); every sweep peels scalars up to 16-byte alignment and keeps
// two 16-byte loads in flight per thread. A repeated id among the kept slots counts once per slot: its
// lead slot sums the group's gradient and writes it alone (race-free). As on the CPU, every log q_j is (z_j − m)·(1/T)
// − l: the logits are shifted by their maximum before the division by T, which keeps log q accurate at small T.
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

// Running log-sum-exp at temperature T: max m of the logits and Σ exp((z − m)·inv_t).
template <typename A>
struct Lse {
  A m, s;
};

template <typename A>
__device__ __forceinline__ void lse_merge(Lse<A>& a, const Lse<A>& b, A inv_t) {
  if (b.m == neg_inf<A>()) return;
  if (a.m == neg_inf<A>()) {
    a = b;
  } else if (b.m > a.m) {
    a.s = a.s * exp_acc((a.m - b.m) * inv_t) + b.s;
    a.m = b.m;
  } else {
    a.s += b.s * exp_acc((b.m - a.m) * inv_t);
  }
}

// Adds the logits x[0..n) with one rescale at most. A NaN anywhere in x makes the maximum NaN, which
// sticks (no later maximum compares greater) and makes Σ NaN: the row's stats are NaN, as on the CPU.
template <typename A, int n>
__device__ __forceinline__ void lse_add(Lse<A>& a, const A (&x)[n], A inv_t) {
  A pm = x[0];
#pragma unroll
  for (int j = 1; j < n; ++j) pm = (x[j] > pm || x[j] != x[j]) ? x[j] : pm;
  if (pm > a.m || pm != pm) {
    a.s = a.m == neg_inf<A>() ? A(0) : a.s * exp_acc((a.m - pm) * inv_t);
    a.m = pm;
  }
  if (a.m == neg_inf<A>()) return;  // everything so far is −inf
#pragma unroll
  for (int j = 0; j < n; ++j) a.s += exp_acc((x[j] - a.m) * inv_t);
}

// Merge over the CTA in a fixed order; the result is returned to every thread.
template <typename A>
__device__ Lse<A> block_lse(Lse<A> v, Lse<A>* scratch /*[33]*/, A inv_t) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Lse<A> other{__shfl_down_sync(0xffffffffu, v.m, offset), __shfl_down_sync(0xffffffffu, v.s, offset)};
    lse_merge(v, other, inv_t);
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + 31) >> 5;
    v = lane < n_warps ? scratch[lane] : Lse<A>{neg_inf<A>(), A(0)};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      Lse<A> other{__shfl_down_sync(0xffffffffu, v.m, offset), __shfl_down_sync(0xffffffffu, v.s, offset)};
      lse_merge(v, other, inv_t);
    }
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  const Lse<A> out = scratch[32];
  __syncthreads();
  return out;
}

// A row's softmax statistics: m = the largest logit, l = log Σ exp((z − m)/T) (m = −inf, l = 0 for
// an empty or all −inf set), so that log q_j = (z_j − m)/T − l.
template <typename A>
struct Stats {
  A m, l;
};

template <typename A>
__device__ __forceinline__ Stats<A> lse_stats(const Lse<A>& a) {
  return {a.m, a.m == neg_inf<A>() ? A(0) : log_acc(a.s)};
}

// Elements before the first 16-byte boundary of p (all n when p is not even element-aligned).
template <typename T>
__device__ __forceinline__ int64_t head_to_aligned16(const T* p, int64_t n) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  if (address % sizeof(T) != 0) return n;
  const int64_t head = static_cast<int64_t>(((16 - (address & 15u)) & 15u) / sizeof(T));
  return head < n ? head : n;
}

template <typename T, int P>
__device__ __forceinline__ void lse_add_pack(Lse<Acc<T>>& acc, const Pack<T>& pk, Acc<T> inv_t) {
  Acc<T> x[P];
#pragma unroll
  for (int j = 0; j < P; ++j) x[j] = to_acc(pk.v[j]);
  lse_add(acc, x, inv_t);
}

// Stats over the whole row: a scalar head up to 16-byte alignment, 16-byte packs (two loads in flight
// per thread), a scalar tail.
template <typename T>
__device__ Stats<Acc<T>> row_stats(const T* z, int64_t V, Acc<T> inv_t, Lse<Acc<T>>* scratch) {
  using A = Acc<T>;
  constexpr int P = Pack<T>::kSize;
  Lse<A> acc{neg_inf<A>(), A(0)};
  const int64_t head = head_to_aligned16(z, V);
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) {
    const A x[1] = {to_acc(z[j])};
    lse_add(acc, x, inv_t);
  }
  const int64_t packs = (V - head) / P;
  const Pack<T>* zp = reinterpret_cast<const Pack<T>*>(z + head);
  int64_t i = threadIdx.x;
  for (; i + blockDim.x < packs; i += 2 * blockDim.x) {
    const Pack<T> a = zp[i], b = zp[i + blockDim.x];
    lse_add_pack<T, P>(acc, a, inv_t);
    lse_add_pack<T, P>(acc, b, inv_t);
  }
  if (i < packs) lse_add_pack<T, P>(acc, zp[i], inv_t);
  for (int64_t j = head + packs * P + threadIdx.x; j < V; j += blockDim.x) {
    const A x[1] = {to_acc(z[j])};
    lse_add(acc, x, inv_t);
  }
  return lse_stats(block_lse(acc, scratch, inv_t));
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
  __device__ A logit(int64_t i) const { return to_acc(z[ids[i]]); }
  __device__ A log_q(int64_t i, A inv_t, const Stats<A>& st) const { return (logit(i) - st.m) * inv_t - st.l; }
};

template <typename T>
__device__ Slots<T> row_slots(const TopKKLProblem& p, int64_t n) {
  using A = Acc<T>;
  return {static_cast<const T*>(p.logits) + (n / p.seq) * p.batch_stride + (n % p.seq) * p.row_stride, p.ids + n * p.k,
          static_cast<const A*>(p.target_logp) + n * p.k, p.k, p.vocab};
}

// Stats over the kept slots only (student_support="topk"); {−inf, 0} when K is empty.
template <typename T>
__device__ Stats<Acc<T>> kept_stats(const Slots<T>& row, Acc<T> inv_t, Lse<Acc<T>>* scratch) {
  using A = Acc<T>;
  Lse<A> acc{neg_inf<A>(), A(0)};
  for (int64_t i = threadIdx.x; i < row.k; i += blockDim.x) {
    if (!row.kept(i)) continue;
    const A x[1] = {row.logit(i)};
    lse_add(acc, x, inv_t);
  }
  return lse_stats(block_lse(acc, scratch, inv_t));
}

// The student's mass outside K, r_s = Σ_{j∉K} q_j, for a row whose student puts more than half of
// its mass on K (as csrc/cpu/topk_kl.cpp: accurate_tail_mass): 1 − Σ_K q keeps only ~eps/r_s of r_s's
// digits, so Σ_j e_j and Σ_K e_j (e_j = exp((z_j − m)/T), the same exp_acc for every term, so the kept
// terms cancel exactly) are summed in double and subtracted. Block-wide; every thread gets the result.
template <typename T>
__device__ Acc<T> accurate_tail_mass(const Slots<T>& row, Acc<T> inv_t, const Stats<Acc<T>>& st,
                                     double* scratch /*[33]*/) {
  using A = Acc<T>;
  double all = 0, kept = 0;
  for (int64_t j = threadIdx.x; j < row.vocab; j += blockDim.x)
    all += static_cast<double>(exp_acc((to_acc(row.z[j]) - st.m) * inv_t));
  for (int64_t i = threadIdx.x; i < row.k; i += blockDim.x)
    if (row.kept(i)) kept += static_cast<double>(exp_acc((row.logit(i) - st.m) * inv_t));
  all = block_sum_all(all, scratch);
  kept = block_sum_all(kept, scratch);
  return all > 0 ? static_cast<A>((all - kept) / all) : A(0);
}

// The student's tail mass r_s = 1 − Σ_K q as DistillKit clamps it (Σ_K q to [1e-8, 1 − 1e-8]), the
// upper end applied as r_s ≥ 1e-8: 1 − 1e-8 is 1 in fp32 (log1p(−1) = −inf there), 1e-8 is
// representable. `clamped`: a clamp is active, the tail term does not depend on z. Block-wide
// (`kept` = Σ_K q must be the same in every thread).
template <typename A>
struct StudentTail {
  A log_r, r;
  bool clamped;
};

template <typename T>
__device__ StudentTail<Acc<T>> student_tail(const Slots<T>& row, Acc<T> inv_t, const Stats<Acc<T>>& st, Acc<T> kept,
                                            double* scratch) {
  using A = Acc<T>;
  const A lo = static_cast<A>(kTailClamp);
  const A plain = A(1) - kept;  // exact for kept ∈ [0.5, 1], but not r_s's digits
  const A r = plain < A(0.5) ? accurate_tail_mass<T>(row, inv_t, st, scratch) : plain;
  if (!(r > lo)) return {log_acc(lo), r, true};
  if (kept < lo) return {log1p_acc(-lo), r, true};
  return {plain < A(0.5) ? log_acc(r) : log1p_acc(-kept), r, false};
}

// `v`, valid in thread 0, in every thread.
template <typename A>
__device__ __forceinline__ A broadcast(A v, A* slot) {
  if (threadIdx.x == 0) *slot = v;
  __syncthreads();
  const A out = *slot;
  __syncthreads();
  return out;
}

// Σ_K p̂ and Σ_K q over the kept slots, valid in thread 0.
template <typename T>
__device__ void kept_sums(const Slots<T>& row, Acc<T> inv_t, const Stats<Acc<T>>& st, Acc<T>* scratch, Acc<T>& teacher,
                          Acc<T>& student, Acc<T>* head /* Σ p̂ (log p̂ − log q), or null */) {
  using A = Acc<T>;
  A t = 0, s = 0, h = 0;
  for (int64_t i = threadIdx.x; i < row.k; i += blockDim.x) {
    if (!row.kept(i)) continue;
    const A log_q = row.log_q(i, inv_t, st);
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
    fwd_rows_kernel(TopKKLProblem p, Acc<T>* row_loss, Acc<T>* stats_out, Acc<T>* loss_none) {
  using A = Acc<T>;
  __shared__ Lse<A> lse_scratch[33];
  __shared__ A sum_scratch[33];
  __shared__ double wide_scratch[33];
  const int64_t n = blockIdx.x;
  if (!p.valid[n]) {  // uniform over the CTA
    if (threadIdx.x == 0) {
      row_loss[n] = A(0);
      stats_out[2 * n] = stats_out[2 * n + 1] = A(0);
      if (loss_none) loss_none[n] = A(0);
    }
    return;
  }
  const Slots<T> row = row_slots<T>(p, n);
  const A inv_t = static_cast<A>(p.inv_temperature);
  const Stats<A> st =
      p.full_support ? row_stats<T>(row.z, p.vocab, inv_t, lse_scratch) : kept_stats<T>(row, inv_t, lse_scratch);
  A teacher, student, head;
  kept_sums<T>(row, inv_t, st, sum_scratch, teacher, student, &head);
  A kl = head;
  const A tail = static_cast<const A*>(p.tail_logp)[n];
  if (p.full_support && tail != neg_inf<A>()) {  // uniform over the CTA
    const StudentTail<A> rs = student_tail<T>(row, inv_t, st, broadcast(student, &sum_scratch[32]), wide_scratch);
    kl += exp_acc(tail) * (tail - rs.log_r);
  }
  if (threadIdx.x != 0) return;
  const A value = static_cast<A>(p.scale) * kl;
  row_loss[n] = value;
  stats_out[2 * n] = st.m;
  stats_out[2 * n + 1] = st.l;
  if (loss_none) loss_none[n] = value;
}

template <typename T, int P>
__device__ __forceinline__ Pack<T> dense_pack(const Pack<T>& in, Acc<T> inv_t, const Stats<Acc<T>>& st, Acc<T> c) {
  Pack<T> pk;
#pragma unroll
  for (int j = 0; j < P; ++j)
    pk.v[j] = from_acc<T>(c == Acc<T>(0) ? Acc<T>(0) : c * exp_acc((to_acc(in.v[j]) - st.m) * inv_t - st.l));
  return pk;
}

// out[0..V) = c · exp((z − m)/T − l), or zeros when c = 0. 16-byte packs where z and out share their
// alignment (after a scalar head), two loads in flight per thread; scalar otherwise.
template <typename T>
__device__ void write_dense(T* out, const T* z, int64_t V, Acc<T> inv_t, const Stats<Acc<T>>& st, Acc<T> c) {
  using A = Acc<T>;
  constexpr int P = Pack<T>::kSize;
  if (c == A(0)) {  // zeros, without reading z (rows that do not count are never read)
    const int64_t head = head_to_aligned16(out, V);
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) out[j] = from_acc<T>(A(0));
    Pack<T> zero;
#pragma unroll
    for (int j = 0; j < P; ++j) zero.v[j] = from_acc<T>(A(0));
    const int64_t packs = (V - head) / P;
    Pack<T>* op = reinterpret_cast<Pack<T>*>(out + head);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) op[i] = zero;
    for (int64_t j = head + packs * P + threadIdx.x; j < V; j += blockDim.x) out[j] = from_acc<T>(A(0));
    return;
  }
  const bool together = ((reinterpret_cast<uintptr_t>(out) ^ reinterpret_cast<uintptr_t>(z)) & 15u) == 0;
  const int64_t head = together ? head_to_aligned16(z, V) : V;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x)
    out[j] = from_acc<T>(c == A(0) ? A(0) : c * exp_acc((to_acc(z[j]) - st.m) * inv_t - st.l));
  if (head == V) return;
  const int64_t packs = (V - head) / P;
  const Pack<T>* zp = reinterpret_cast<const Pack<T>*>(z + head);
  Pack<T>* op = reinterpret_cast<Pack<T>*>(out + head);
  int64_t i = threadIdx.x;
  for (; i + blockDim.x < packs; i += 2 * blockDim.x) {
    const Pack<T> a = zp[i], b = zp[i + blockDim.x];
    op[i] = dense_pack<T, P>(a, inv_t, st, c);
    op[i + blockDim.x] = dense_pack<T, P>(b, inv_t, st, c);
  }
  if (i < packs) op[i] = dense_pack<T, P>(zp[i], inv_t, st, c);
  for (int64_t j = head + packs * P + threadIdx.x; j < V; j += blockDim.x)
    out[j] = from_acc<T>(c == A(0) ? A(0) : c * exp_acc((to_acc(z[j]) - st.m) * inv_t - st.l));
}

// The kept entries of a gradient row whose dense part g·α·q is written (after a __syncthreads): id j
// gets g·(α·q_j + Σ_{i: ids_i = j} (γ·q_j − p̂_i)) = g·(κ·q_j − p̂_i) for an id held by one slot. The
// first kept slot of each id sums its group and writes it alone: race-free and deterministic.
template <typename T>
__device__ void write_kept(T* out, const Slots<T>& row, Acc<T> inv_t, const Stats<Acc<T>>& st, Acc<T> kept_coef,
                           Acc<T> gamma, Acc<T> g) {
  using A = Acc<T>;
  for (int64_t i = threadIdx.x; i < row.k; i += blockDim.x) {
    if (!row.kept(i)) continue;
    const int64_t id = row.ids[i];
    bool lead = true;
    for (int64_t j = 0; j < i && lead; ++j) lead = !(row.kept(j) && row.ids[j] == id);
    if (!lead) continue;
    A teacher = exp_acc(row.logp[i]);
    int64_t count = 1;
    for (int64_t j = i + 1; j < row.k; ++j) {
      if (!row.kept(j) || row.ids[j] != id) continue;
      teacher += exp_acc(row.logp[j]);
      ++count;
    }
    const A q = exp_acc(row.log_q(i, inv_t, st));
    const A d = (count == 1 ? kept_coef : kept_coef + static_cast<A>(count - 1) * gamma) * q - teacher;
    out[id] = from_acc<T>(g * d);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bwd_rows_kernel(TopKKLProblem p, const Acc<T>* grad, const Acc<T>* stats_in, T* grad_logits) {
  using A = Acc<T>;
  __shared__ A sum_scratch[33];
  __shared__ double wide_scratch[33];
  __shared__ A coef[3];  // α, κ and γ: ∂/∂z_j = g·(α·q_j) off K, g·(κ·q_j − p̂_j) on K
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
    write_dense<T>(out, row.z, p.vocab, inv_t, Stats<A>{A(0), A(0)}, A(0));
    return;
  }
  const Stats<A> st{stats_in[2 * n], stats_in[2 * n + 1]};
  A teacher, student;
  kept_sums<T>(row, inv_t, st, sum_scratch, teacher, student, nullptr);
  // d/dz of −r̂·log r_s (γ = r̂/r_s; zero where DistillKit's clamp is active): α = P + r̂ − γ off K and
  // κ = α + γ = P + r̂ on K, formed directly (α and γ are both huge when r_s is tiny)
  A gamma = 0, tail_mass = 0;
  const A tail = static_cast<const A*>(p.tail_logp)[n];
  if (p.full_support && tail != neg_inf<A>()) {  // uniform over the CTA
    const StudentTail<A> rs = student_tail<T>(row, inv_t, st, broadcast(student, &sum_scratch[32]), wide_scratch);
    if (!rs.clamped) {
      tail_mass = exp_acc(tail);
      gamma = tail_mass / rs.r;
    }
  }
  if (threadIdx.x == 0) {
    coef[0] = p.full_support ? teacher + tail_mass - gamma : A(0);
    coef[1] = teacher + tail_mass;
    coef[2] = gamma;
  }
  __syncthreads();
  const A alpha = coef[0], kept_coef = coef[1], gamma_coef = coef[2];
  write_dense<T>(out, row.z, p.vocab, inv_t, st, g * alpha);
  __syncthreads();  // the dense writes of every thread land before the kept entries are overwritten
  write_kept<T>(out, row, inv_t, st, kept_coef, gamma_coef, g);
}

// Forward and, for an upstream gradient of 1, the gradient of each row (loops over rows: the grid is
// bounded so that the rows in flight stay in L2 between the two sweeps).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fwd_grad_rows_kernel(TopKKLProblem p, Acc<T>* row_loss, Acc<T>* stats_out, Acc<T>* loss_none, T* grad_logits) {
  using A = Acc<T>;
  __shared__ Lse<A> lse_scratch[33];
  __shared__ A sum_scratch[33];
  __shared__ double wide_scratch[33];
  __shared__ A coef[3];
  const A inv_t = static_cast<A>(p.inv_temperature);
  A g = static_cast<A>(p.scale) * inv_t;
  if (p.reduction == Reduction::kMean) {
    const A d = static_cast<const A*>(p.divisor)[0];
    g = d > A(0) ? g / d : A(0);
  }
  for (int64_t n = blockIdx.x; n < p.rows; n += gridDim.x) {
    T* out = grad_logits + n * p.vocab;
    const Slots<T> row = row_slots<T>(p, n);
    if (!p.valid[n]) {  // uniform over the CTA
      if (threadIdx.x == 0) {
        row_loss[n] = A(0);
        stats_out[2 * n] = stats_out[2 * n + 1] = A(0);
        if (loss_none) loss_none[n] = A(0);
      }
      write_dense<T>(out, row.z, p.vocab, inv_t, Stats<A>{A(0), A(0)}, A(0));
      continue;
    }
    const Stats<A> st =
        p.full_support ? row_stats<T>(row.z, p.vocab, inv_t, lse_scratch) : kept_stats<T>(row, inv_t, lse_scratch);
    A teacher, student, head;
    kept_sums<T>(row, inv_t, st, sum_scratch, teacher, student, &head);
    A kl = head, gamma = 0, tail_mass = 0;
    const A tail = static_cast<const A*>(p.tail_logp)[n];
    if (p.full_support && tail != neg_inf<A>()) {  // uniform over the CTA
      const StudentTail<A> rs = student_tail<T>(row, inv_t, st, broadcast(student, &sum_scratch[32]), wide_scratch);
      kl += exp_acc(tail) * (tail - rs.log_r);
      if (!rs.clamped) {
        tail_mass = exp_acc(tail);
        gamma = tail_mass / rs.r;
      }
    }
    if (threadIdx.x == 0) {
      const A value = static_cast<A>(p.scale) * kl;
      row_loss[n] = value;
      stats_out[2 * n] = st.m;
      stats_out[2 * n + 1] = st.l;
      if (loss_none) loss_none[n] = value;
      coef[0] = p.full_support ? teacher + tail_mass - gamma : A(0);
      coef[1] = teacher + tail_mass;
      coef[2] = gamma;
    }
    __syncthreads();
    const A alpha = coef[0], kept_coef = coef[1], gamma_coef = coef[2];
    __syncthreads();  // coef is rewritten by the next row
    write_dense<T>(out, row.z, p.vocab, inv_t, st, g * alpha);
    __syncthreads();
    write_kept<T>(out, row, inv_t, st, kept_coef, gamma_coef, g);
    __syncthreads();
  }
}

// grad[n, :] *= factor[n] (per_row) or factor[0], in place; a row whose factor is exactly 1 is neither read
// nor written — decided on the device, so the common upstream gradient of 1 costs a launch, not a pass.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rescale_rows_kernel(T* grad, const Acc<T>* factor, int64_t rows, int64_t vocab, bool per_row) {
  using A = Acc<T>;
  constexpr int P = Pack<T>::kSize;
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const A f = factor[per_row ? n : 0];
    if (f == A(1)) continue;  // uniform over the CTA
    T* row = grad + n * vocab;
    const int64_t head = head_to_aligned16(row, vocab);
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) row[j] = from_acc<T>(to_acc(row[j]) * f);
    const int64_t packs = (vocab - head) / P;
    Pack<T>* rp = reinterpret_cast<Pack<T>*>(row + head);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      Pack<T> pk = rp[i];
#pragma unroll
      for (int j = 0; j < P; ++j) pk.v[j] = from_acc<T>(to_acc(pk.v[j]) * f);
      rp[i] = pk;
    }
    for (int64_t j = head + packs * P + threadIdx.x; j < vocab; j += blockDim.x)
      row[j] = from_acc<T>(to_acc(row[j]) * f);
  }
}

}  // namespace

int64_t topk_kl_workspace_size(int64_t rows) { return rows > 0 ? rows : 1; }

cudaError_t topk_kl_rescale_cuda(DType dtype, void* grad, const void* factor, int64_t rows, int64_t vocab, bool per_row,
                                 cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    int device = 0, sms = 1;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int64_t grid = rows < 8 * static_cast<int64_t>(sms) ? rows : 8 * static_cast<int64_t>(sms);
    rescale_rows_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        static_cast<T*>(grad), static_cast<const Acc<T>*>(factor), rows, vocab, per_row);
    return cudaGetLastError();
  });
}

cudaError_t topk_kl_fwd_cuda(const TopKKLProblem& p, void* loss, void* stats, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* rows = static_cast<A*>(workspace);
    A* loss_none = p.reduction == Reduction::kNone ? static_cast<A*>(loss) : nullptr;
    if (p.rows > 0)
      fwd_rows_kernel<T>
          <<<one_block_per_row(p.rows), kThreads, 0, stream>>>(p, rows, static_cast<A*>(stats), loss_none);
    if (p.reduction != Reduction::kNone)
      launch_finalize(rows, p.rows, mean_or_sum(p.reduction, DeviceDivisor<A>{static_cast<const A*>(p.divisor)}),
                      static_cast<A*>(loss), stream);
    return cudaGetLastError();
  });
}

cudaError_t topk_kl_fwd_grad_cuda(const TopKKLProblem& p, void* loss, void* stats, void* workspace, void* grad_logits,
                                  cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* rows = static_cast<A*>(workspace);
    A* loss_none = p.reduction == Reduction::kNone ? static_cast<A*>(loss) : nullptr;
    if (p.rows > 0) {
      int device = 0, sms = 1, l2 = 0;
      cudaGetDevice(&device);
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
      // rows in flight: at least one per SM, at most four, and no more than 3/4 of L2 holds
      const int64_t row_bytes = p.vocab * static_cast<int64_t>(sizeof(T)) + 1;
      int64_t grid = (static_cast<int64_t>(l2) * 3 / 4) / row_bytes;
      grid = grid < sms ? sms : (grid > 4 * sms ? 4 * sms : grid);
      grid = grid > p.rows ? p.rows : grid;
      fwd_grad_rows_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          p, rows, static_cast<A*>(stats), loss_none, static_cast<T*>(grad_logits));
    }
    if (p.reduction != Reduction::kNone)
      launch_finalize(rows, p.rows, mean_or_sum(p.reduction, DeviceDivisor<A>{static_cast<const A*>(p.divisor)}),
                      static_cast<A*>(loss), stream);
    return cudaGetLastError();
  });
}

cudaError_t topk_kl_bwd_cuda(const TopKKLProblem& p, const void* grad, const void* stats, void* grad_logits,
                             cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    bwd_rows_kernel<T><<<one_block_per_row(p.rows), kThreads, 0, stream>>>(
        p, static_cast<const A*>(grad), static_cast<const A*>(stats), static_cast<T*>(grad_logits));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdloss
