// Plackett-Luce distillation (PLD) CUDA kernels (spec §2, decision 2). Plain CUDA + CUB (no torch
// headers); the dispatcher glue is in plackett_luce_ops.cpp. Compiled, never run on a GPU by its
// author: kept deliberately simple (one block per row, block-wide CUB primitives).
//
// Forward:
//   1. teacher ranking (skipped when a cached permutation is given): for fp32 teachers and
//      C ≤ 2048, a CUB BlockRadixSort per row of 64-bit keys (order-preserving image of the teacher
//      logit, descending, packed with the class index, so ties order by index); otherwise CUB's
//      DeviceSegmentedSort::StableSortPairs over all rows (descending keys, class indices as values).
//   2. label_first_kernel: π* = label, then the ranking without the label (and checks).
//   3. fwd_row_kernel: suffix log-sum-exp scan of x_j = s[π*_j] (BlockScan over (max, Σexp) pairs
//      and a running carry, tiles from the end): lse_j = m_j + l_j with m_j = max_{l≥j} x_l and
//      l_j = log Σ_{l≥j} exp(x_l − m_j); L = Σ α_j ((m_j − x_j) + l_j).
//   4. finalize_kernel (kdloss/cuda_utils.cuh): fixed-order sum of the row losses (mean over
//      counted rows).
// Backward (closed form, spec §2.5): the same suffix scan stores (m_j, l_j); a prefix scan of the
// affine maps S ↦ e^{δ_j}·S + α_j (δ_j = lse_j − lse_{j−1} ≤ 0) gives S_j = Σ_{k≤j} α_k e^{lse_j − lse_k},
// and ∂L/∂x_j = exp(x_j − lse_j)·S_j − α_j, scattered to s[π*_j].
// As in the CPU kernel, lse_j is never formed: every quantity is a difference of two logits plus
// small terms (accurate for any logit spread; a spread beyond FLT_MAX gives +inf, clamped to the
// largest finite value in the loss, exp(−inf) = 0 in the gradient), and the logits are not shifted
// by their maximum (that difference overflows first).
// All reductions and scans are deterministic (fixed block size, no floating-point atomics).
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include <type_traits>

#include "kdloss/cuda_utils.cuh"
#include "kdloss/plackett_luce_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;                        // elements per thread per scan tile
constexpr int kTile = kThreads * kItems;         // 2048
constexpr int64_t kBlockSortMax = kThreads * 8;  // block radix sort up to 2048 classes
constexpr int64_t kMaxGridStrideBlocks = 4096;   // grid of the element-wise (grid-stride) kernels

template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -__int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -__longlong_as_double(0x7ff0000000000000ll);
}

template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000ll);
}

// A log-sum-exp as (max m, Σ exp(x − m)); (−inf, 0) is the identity (empty tails are exact).
template <typename A>
struct MaxSum {
  A m, s;
};

template <typename A>
struct MaxSumAdd {
  __device__ __forceinline__ MaxSum<A> operator()(const MaxSum<A>& a, const MaxSum<A>& b) const {
    if (a.m == neg_inf<A>()) return b;
    if (b.m == neg_inf<A>()) return a;
    const A m = a.m > b.m ? a.m : b.m;
    return {m, a.s * exp(a.m - m) + b.s * exp(b.m - m)};  // exp(−inf) = 0 for a spread beyond FLT_MAX
  }
};

// The affine map S ↦ a·S + b; composition in scan order (first, then second).
template <typename A>
struct Affine {
  A a, b;
};

template <typename A>
struct AffineThen {
  __device__ __forceinline__ Affine<A> operator()(const Affine<A>& first, const Affine<A>& second) const {
    return {first.a * second.a, first.b * second.a + second.b};
  }
};

// Running carry across scan tiles (called by the first warp; lane 0's return value is the prefix).
template <typename V, typename Op>
struct RunningCarry {
  V carry;
  __device__ explicit RunningCarry(V init) : carry(init) {}
  __device__ V operator()(V block_aggregate) {
    const V old = carry;
    carry = Op()(carry, block_aggregate);
    return old;
  }
};

// Order-preserving unsigned images of floats, descending (smaller key = larger logit); −0 == +0.
__device__ __forceinline__ uint32_t desc_key(float x) {
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0u;
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~u;
}
__device__ __forceinline__ uint64_t desc_key(double x) {
  uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
  if (u == 0x8000000000000000ull) u = 0ull;
  u = (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  return ~u;
}

// ---- 1. ranking ---------------------------------------------------------------------------

template <int ITEMS>
__global__ void __launch_bounds__(kThreads)
    block_sort_kernel(const float* __restrict__ teacher, int64_t C, int32_t* __restrict__ ranking) {
  using Sort = cub::BlockRadixSort<unsigned long long, kThreads, ITEMS>;
  __shared__ typename Sort::TempStorage temp;
  const int64_t row = blockIdx.x;
  const float* t = teacher + row * C;
  unsigned long long keys[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * ITEMS + i;
    keys[i] = j < C ? (static_cast<unsigned long long>(desc_key(t[j])) << 32) | static_cast<unsigned long long>(j)
                    : ~0ull;  // padding sorts last
  }
  Sort(temp).Sort(keys);  // blocked arrangement: thread x holds ranks x·ITEMS … x·ITEMS+ITEMS−1
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t rank = static_cast<int64_t>(threadIdx.x) * ITEMS + i;
    if (rank < C) ranking[row * C + rank] = static_cast<int32_t>(keys[i] & 0xffffffffull);
  }
}

template <typename A, typename K>
__global__ void make_keys_kernel(const A* __restrict__ teacher, int64_t total, int64_t C, K* __restrict__ keys,
                                 int32_t* __restrict__ index) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    keys[i] = desc_key(teacher[i]);
    index[i] = static_cast<int32_t>(i % C);
  }
}

__global__ void offsets_kernel(int64_t* __restrict__ offsets, int64_t rows, int64_t C) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r <= rows; r += int64_t(gridDim.x) * blockDim.x) {
    offsets[r] = r * C;
  }
}

// ---- 2. π* = label first ------------------------------------------------------------------
// row_state: 0 = counts, 1 = ignored, 2 = invalid (label out of range or bad permutation row).

template <typename I>
__global__ void __launch_bounds__(kThreads)
    label_first_kernel(const I* __restrict__ ranking, const int64_t* __restrict__ labels, int64_t C,
                       int64_t ignore_index, bool check, int32_t* __restrict__ counts, int32_t* __restrict__ order,
                       uint8_t* __restrict__ row_state) {
  __shared__ unsigned long long pos;
  __shared__ int bad;
  const int64_t row = blockIdx.x;
  const I* rk = ranking + row * C;
  int32_t* out = order + row * C;
  const int64_t y = labels[row];
  const bool ignored = y == ignore_index;
  const bool label_bad = !ignored && (y < 0 || y >= C);  // the same in every thread of the block
  if (threadIdx.x == 0) {
    pos = static_cast<unsigned long long>(C);
    bad = label_bad ? 1 : 0;
  }
  __syncthreads();
  if (!ignored && !label_bad) {
    int32_t* cnt = check ? counts + row * C : nullptr;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const int64_t p = static_cast<int64_t>(rk[j]);
      if (p < 0 || p >= C) {
        bad = 1;
        continue;
      }
      if (cnt) atomicAdd(cnt + p, 1);
      if (p == y) atomicMin(&pos, static_cast<unsigned long long>(j));
    }
    __syncthreads();
    if (cnt && !bad) {
      for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        if (cnt[j] != 1) bad = 1;
      }
    }
    __syncthreads();
    if (pos >= static_cast<unsigned long long>(C)) bad = 1;  // the label is missing
  }
  __syncthreads();
  if (ignored || bad) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) out[j] = static_cast<int32_t>(j);
  } else {
    const int64_t at = static_cast<int64_t>(pos);
    if (threadIdx.x == 0) out[0] = static_cast<int32_t>(y);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const int32_t p = static_cast<int32_t>(rk[j]);
      if (j < at) out[j + 1] = p;
      else if (j > at) out[j] = p;
    }
  }
  if (threadIdx.x == 0) row_state[row] = ignored ? 1 : (bad ? 2 : 0);
}

// ---- 3. per-row scans ---------------------------------------------------------------------

template <typename T>
struct RowView {
  const T* s;        // student row
  const Acc<T>* t;   // teacher row
  const int32_t* o;  // π*
  int64_t C;
  Acc<T> inv_tau, tmax, log_total;
  // student logit of pick j
  __device__ __forceinline__ Acc<T> x(int64_t j) const { return to_acc(s[o[j]]); }
  __device__ __forceinline__ Acc<T> log_alpha(int64_t j) const { return (t[o[j]] - tmax) * inv_tau - log_total; }
};

// lse_j − x_j = (m_j − x_j) + l_j ≥ 0, the difference clamped to the largest finite value.
template <typename A>
__device__ __forceinline__ A lse_minus_x(A m, A x, A l) {
  const A d = m - x;
  const A big = sizeof(A) == 8 ? static_cast<A>(1.7976931348623157e308) : static_cast<A>(3.4028234663852886e38f);
  return (d < big ? d : big) + l;
}

// Row statistics: the teacher maximum and log Σ exp((t − max)/τ). Block-wide, broadcast to every
// thread.
template <typename T>
__device__ void teacher_stats(RowView<T>& v, Acc<T>* scratch) {
  using A = Acc<T>;
  A m = neg_inf<A>();
  for (int64_t j = threadIdx.x; j < v.C; j += blockDim.x) m = v.t[j] > m ? v.t[j] : m;
  v.tmax = block_max_all(m, scratch);
  A s = A(0);
  for (int64_t j = threadIdx.x; j < v.C; j += blockDim.x) s += exp((v.t[j] - v.tmax) * v.inv_tau);
  v.log_total = log(block_sum_all(s, scratch));
}

// Suffix scan over j = C−1 … 0 in tiles of kTile; calls f(j, x_j, m_j, l_j) for every valid j
// (lse_j = m_j + l_j).
template <typename T, typename ScanStorage, typename F>
__device__ void suffix_scan(const RowView<T>& v, ScanStorage& storage, F&& f) {
  using A = Acc<T>;
  using Scan = cub::BlockScan<MaxSum<A>, kThreads>;
  RunningCarry<MaxSum<A>, MaxSumAdd<A>> carry(MaxSum<A>{neg_inf<A>(), A(0)});
  for (int64_t base = 0; base < v.C; base += kTile) {
    MaxSum<A> items[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t q = base + static_cast<int64_t>(threadIdx.x) * kItems + i;  // reversed position
      items[i] = q < v.C ? MaxSum<A>{v.x(v.C - 1 - q), A(1)} : MaxSum<A>{neg_inf<A>(), A(0)};
    }
    MaxSum<A> lse[kItems];
    Scan(storage).InclusiveScan(items, lse, MaxSumAdd<A>(), carry);
    __syncthreads();  // storage reused by the next tile
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t q = base + static_cast<int64_t>(threadIdx.x) * kItems + i;
      if (q < v.C) f(v.C - 1 - q, items[i].m, lse[i].m, log(lse[i].s));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fwd_row_kernel(PlackettLuceProblem p, const int32_t* __restrict__ order, const uint8_t* __restrict__ row_state,
                   Acc<T>* __restrict__ out_none, Acc<T>* __restrict__ row_loss) {
  using A = Acc<T>;
  using Scan = cub::BlockScan<MaxSum<A>, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ A scratch[33];
  const int64_t row = blockIdx.x, C = p.classes;
  const uint8_t state = row_state[row];
  A loss = A(0);
  if (state == 0) {
    RowView<T> v{static_cast<const T*>(p.student) + row * p.student_stride,
                 static_cast<const A*>(p.teacher) + row * C,
                 order + row * C,
                 C,
                 static_cast<A>(1.0 / p.temperature),
                 A(0),
                 A(0)};
    teacher_stats(v, scratch);
    A acc = A(0);
    suffix_scan(v, storage, [&](int64_t j, A x, A m, A l) {
      const A alpha = exp(v.log_alpha(j));
      if (alpha > A(0)) acc += alpha * lse_minus_x(m, x, l);  // α = 0 contributes exactly 0
    });
    loss = block_sum_all(acc, scratch);
  } else if (state == 2) {
    loss = quiet_nan<A>();
  }
  if (threadIdx.x == 0) {
    if (out_none) out_none[row] = loss;
    else row_loss[row] = loss;
  }
}

// The number of counted rows (label != ignore_index): the divisor of the mean. Block-wide (every
// thread of the block calls it), valid in thread 0.
struct CountedRows {
  const int64_t* labels;
  int64_t rows, ignore_index;
  template <typename A>
  __device__ A operator()(A* scratch) const {
    A count = A(0);
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) count += labels[r] != ignore_index ? A(1) : A(0);
    return block_sum(count, scratch);
  }
};

// ---- backward -----------------------------------------------------------------------------

// scale[0] = upstream factor of the scalar losses: 1/(counted rows) for mean (0 if none), else 1.
template <typename A>
__global__ void scale_kernel(CountedRows counted, Reduction reduction, A* __restrict__ scale) {
  __shared__ A scratch[33];
  const A count = counted(scratch);
  if (threadIdx.x == 0) scale[0] = reduction == Reduction::kMean ? (count > A(0) ? A(1) / count : A(0)) : A(1);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bwd_row_kernel(PlackettLuceProblem p, const int32_t* __restrict__ order, const Acc<T>* __restrict__ grad,
                   const Acc<T>* __restrict__ scale, Acc<T>* __restrict__ mbuf, Acc<T>* __restrict__ lbuf,
                   T* __restrict__ grad_student) {
  using A = Acc<T>;
  using Scan = cub::BlockScan<MaxSum<A>, kThreads>;
  // The prefix scan of S runs in double for every dtype: it composes C factors e^{δ_j}, and only in
  // double do the δ_j (differences of the stored fp32 l_j) telescope without accumulating roundings
  // (in fp32 the error of S grows like √C·eps: 1e-5 relative at C = 32000).
  using W = double;
  using AffineScan = cub::BlockScan<Affine<W>, kThreads>;
  __shared__ union {
    typename Scan::TempStorage lse;
    typename AffineScan::TempStorage affine;
  } storage;
  __shared__ A scratch[33];
  __shared__ int bad;
  const int64_t row = blockIdx.x, C = p.classes;
  const int64_t y = p.labels[row];
  if (y == p.ignore_index || y < 0 || y >= C) return;  // block-uniform; the gradient row stays 0
  const int32_t* o = order + row * C;
  if (threadIdx.x == 0) bad = o[0] != y;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    if (o[j] < 0 || o[j] >= C) bad = 1;  // direct op calls: never index out of bounds
  }
  __syncthreads();
  if (bad) return;
  RowView<T> v{static_cast<const T*>(p.student) + row * p.student_stride,
               static_cast<const A*>(p.teacher) + row * C,
               o,
               C,
               static_cast<A>(1.0 / p.temperature),
               A(0),
               A(0)};
  teacher_stats(v, scratch);
  A* mrow = mbuf + row * C;
  A* lrow = lbuf + row * C;
  suffix_scan(v, storage.lse, [&](int64_t j, A, A m, A l) {
    mrow[j] = m;
    lrow[j] = l;
  });
  __syncthreads();  // mrow, lrow written by other threads of this block
  const A coef = p.reduction == Reduction::kNone ? grad[row] : grad[0] * scale[0];
  T* g = grad_student + row * C;
  RunningCarry<Affine<W>, AffineThen<W>> carry(Affine<W>{W(1), W(0)});  // S_{−1} = 0
  for (int64_t base = 0; base < C; base += kTile) {
    Affine<W> items[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = base + static_cast<int64_t>(threadIdx.x) * kItems + i;
      if (j < C) {
        // e^{δ_j}, δ_j = lse_j − lse_{j−1} = (m_j − m_{j−1}) + (l_j − l_{j−1}); j = 0 starts the sum
        const W factor = j == 0 ? W(0) : exp((W(mrow[j]) - W(mrow[j - 1])) + (W(lrow[j]) - W(lrow[j - 1])));
        items[i] = Affine<W>{factor, exp(W(v.log_alpha(j)))};
      } else {
        items[i] = Affine<W>{W(1), W(0)};
      }
    }
    Affine<W> prefix[kItems];
    AffineScan(storage.affine).InclusiveScan(items, prefix, AffineThen<W>(), carry);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = base + static_cast<int64_t>(threadIdx.x) * kItems + i;
      if (j < C) {
        const W q = exp(W(-lse_minus_x(mrow[j], v.x(j), lrow[j])));  // exp(x_j − lse_j)
        const W d = q * prefix[i].b - exp(W(v.log_alpha(j)));        // S_j = b (applied to S_{−1} = 0)
        g[o[j]] = from_acc<T>(coef * static_cast<A>(d));
      }
    }
  }
}

// ---- workspace layout and launchers -----------------------------------------------------------

size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

bool block_sort_path(const PlackettLuceProblem& p) {
  return p.permutation == nullptr && p.dtype != DType::kFloat64 && p.classes <= kBlockSortMax;
}

size_t acc_size(const PlackettLuceProblem& p) { return p.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Forward workspace: row_loss [R] acc | row_state [R] u8 | ranking [R·C] i32 (sorting) |
// counts [R·C] i32 (permutation) | keys_in, keys_out [R·C] K, index [R·C] i32, offsets [R+1] i64,
// CUB scratch (segmented sort).
struct FwdLayout {
  size_t row_loss = 0, row_state = 0, ranking = 0, counts = 0, keys_in = 0, keys_out = 0, index = 0, offsets = 0,
         cub = 0, cub_bytes = 0, total = 0;
};

template <typename K>
cudaError_t segmented_sort_bytes(int64_t rows, int64_t C, size_t* bytes) {
  *bytes = 0;
  return cub::DeviceSegmentedSort::StableSortPairs(
      nullptr, *bytes, static_cast<const K*>(nullptr), static_cast<K*>(nullptr), static_cast<const int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), rows * C, rows, static_cast<const int64_t*>(nullptr),
      static_cast<const int64_t*>(nullptr) + 1);
}

cudaError_t fwd_layout(const PlackettLuceProblem& p, FwdLayout* L) {
  const size_t R = static_cast<size_t>(p.rows), RC = R * static_cast<size_t>(p.classes);
  const bool fp64 = p.dtype == DType::kFloat64;
  const size_t key_size = fp64 ? sizeof(uint64_t) : sizeof(uint32_t);
  size_t at = 0;
  L->row_loss = at;
  at += align_up(R * acc_size(p) + 1);
  L->row_state = at;
  at += align_up(R + 1);
  if (p.permutation) {
    L->counts = at;
    at += align_up(RC * sizeof(int32_t) + 1);
  } else {
    L->ranking = at;
    at += align_up(RC * sizeof(int32_t) + 1);
    if (!block_sort_path(p) && p.rows > 0) {
      L->keys_in = at;
      at += align_up(RC * key_size);
      L->keys_out = at;
      at += align_up(RC * key_size);
      L->index = at;
      at += align_up(RC * sizeof(int32_t));
      L->offsets = at;
      at += align_up((R + 1) * sizeof(int64_t));
      const cudaError_t err = fp64 ? segmented_sort_bytes<uint64_t>(p.rows, p.classes, &L->cub_bytes)
                                   : segmented_sort_bytes<uint32_t>(p.rows, p.classes, &L->cub_bytes);
      if (err != cudaSuccess) return err;
      L->cub = at;
      at += align_up(L->cub_bytes);
    }
  }
  L->total = at;
  return cudaSuccess;
}

unsigned grid_for(int64_t n) { return blocks_for(n, kThreads, kMaxGridStrideBlocks); }

template <typename A, typename K>
cudaError_t segmented_ranking(const PlackettLuceProblem& p, const FwdLayout& L, unsigned char* ws, int32_t* ranking,
                              cudaStream_t stream) {
  const int64_t total = p.rows * p.classes;
  K* keys_in = reinterpret_cast<K*>(ws + L.keys_in);
  K* keys_out = reinterpret_cast<K*>(ws + L.keys_out);
  int32_t* index = reinterpret_cast<int32_t*>(ws + L.index);
  int64_t* offsets = reinterpret_cast<int64_t*>(ws + L.offsets);
  make_keys_kernel<A, K>
      <<<grid_for(total), kThreads, 0, stream>>>(static_cast<const A*>(p.teacher), total, p.classes, keys_in, index);
  offsets_kernel<<<grid_for(p.rows + 1), kThreads, 0, stream>>>(offsets, p.rows, p.classes);
  size_t bytes = L.cub_bytes;
  return cub::DeviceSegmentedSort::StableSortPairs(ws + L.cub, bytes, keys_in, keys_out, index, ranking, total, p.rows,
                                                   offsets, offsets + 1, stream);
}

cudaError_t launch_block_sort(const PlackettLuceProblem& p, int32_t* ranking, cudaStream_t stream) {
  const float* t = static_cast<const float*>(p.teacher);
  const unsigned grid = one_block_per_row(p.rows);
  if (p.classes <= kThreads) block_sort_kernel<1><<<grid, kThreads, 0, stream>>>(t, p.classes, ranking);
  else if (p.classes <= 2 * kThreads) block_sort_kernel<2><<<grid, kThreads, 0, stream>>>(t, p.classes, ranking);
  else if (p.classes <= 4 * kThreads) block_sort_kernel<4><<<grid, kThreads, 0, stream>>>(t, p.classes, ranking);
  else block_sort_kernel<8><<<grid, kThreads, 0, stream>>>(t, p.classes, ranking);
  return cudaGetLastError();
}

}  // namespace

cudaError_t plackett_luce_fwd_workspace(const PlackettLuceProblem& p, size_t* bytes) {
  FwdLayout L;
  const cudaError_t err = fwd_layout(p, &L);
  *bytes = L.total;
  return err;
}

cudaError_t plackett_luce_fwd_cuda(const PlackettLuceProblem& p, void* out, int32_t* order, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream) {
  FwdLayout L;
  cudaError_t err = fwd_layout(p, &L);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < L.total) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  uint8_t* row_state = ws + L.row_state;
  const bool none = p.reduction == Reduction::kNone;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* row_loss = reinterpret_cast<A*>(ws + L.row_loss);
    if (p.rows > 0) {
      const unsigned grid = one_block_per_row(p.rows);
      if (p.permutation) {
        int32_t* counts = reinterpret_cast<int32_t*>(ws + L.counts);
        cudaError_t e = cudaMemsetAsync(counts, 0, sizeof(int32_t) * p.rows * p.classes, stream);
        if (e != cudaSuccess) return e;
        label_first_kernel<int64_t><<<grid, kThreads, 0, stream>>>(p.permutation, p.labels, p.classes, p.ignore_index,
                                                                   true, counts, order, row_state);
      } else {
        int32_t* ranking = reinterpret_cast<int32_t*>(ws + L.ranking);
        using Key = typename std::conditional<sizeof(A) == 8, uint64_t, uint32_t>::type;
        cudaError_t e = block_sort_path(p) ? launch_block_sort(p, ranking, stream)
                                           : segmented_ranking<A, Key>(p, L, ws, ranking, stream);
        if (e != cudaSuccess) return e;
        label_first_kernel<int32_t><<<grid, kThreads, 0, stream>>>(ranking, p.labels, p.classes, p.ignore_index, false,
                                                                   nullptr, order, row_state);
      }
      fwd_row_kernel<T>
          <<<grid, kThreads, 0, stream>>>(p, order, row_state, none ? static_cast<A*>(out) : nullptr, row_loss);
    }
    if (!none) {
      launch_finalize(row_loss, p.rows, mean_or_sum(p.reduction, CountedRows{p.labels, p.rows, p.ignore_index}),
                      static_cast<A*>(out), stream);
    }
    return cudaGetLastError();
  });
}

size_t plackett_luce_bwd_workspace(const PlackettLuceProblem& p) {
  const size_t a = acc_size(p);
  return align_up(a) + 2 * align_up(static_cast<size_t>(p.rows) * static_cast<size_t>(p.classes) * a + 1);
}

cudaError_t plackett_luce_bwd_cuda(const PlackettLuceProblem& p, const int32_t* order, const void* grad,
                                   void* grad_student, void* workspace, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    A* scale = reinterpret_cast<A*>(ws);
    const size_t buf = align_up(static_cast<size_t>(p.rows) * static_cast<size_t>(p.classes) * sizeof(A) + 1);
    A* mbuf = reinterpret_cast<A*>(ws + align_up(sizeof(A)));
    A* lbuf = reinterpret_cast<A*>(ws + align_up(sizeof(A)) + buf);
    scale_kernel<A><<<kSingleBlock, kFinalizeThreads, 0, stream>>>(CountedRows{p.labels, p.rows, p.ignore_index},
                                                                   p.reduction, scale);
    bwd_row_kernel<T><<<one_block_per_row(p.rows), kThreads, 0, stream>>>(p, order, static_cast<const A*>(grad), scale,
                                                                          mbuf, lbuf, static_cast<T*>(grad_student));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdloss
