// TRG token-wise contextual loss: CUDA row kernels (spec §5.2–5.3). The similarity GEMMs run in
// the glue (csrc/cuda/token_contextual_ops.cpp); these kernels consume one chunk of similarity
// rows at a time (one thread block per row) and never see an N×N tensor of the whole batch.
#include <cmath>

#include "kdloss/cuda_utils.cuh"
#include "kdloss/token_contextual_cuda.h"

namespace kdloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// The weights kernel keeps ~20 values per thread live (two rows' statistics, coefficients, exps):
// bounding it to 64 registers lets 4 blocks (1024 threads) share an SM instead of 3.
constexpr int kMinBlocksPerSM = 4;

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

// Softmax statistics of scale · row[0..N), by the whole block: the max m and l = log Σ_j exp(v_j − m)
// (kept apart: rounding m + l would cost up to ulp(m) relative error on every probability).
template <typename A>
__device__ void row_stats(const A* row, int64_t N, A scale, A* scratch, A& m_out, A& l_out) {
  A m = -INFINITY;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) m = fmax(m, scale * row[j]);
  m = block_max_all(m, scratch);
  A s = A(0);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) s += ex(scale * row[j] - m);
  m_out = m;
  l_out = lg(block_sum_all(s, scratch));
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    fwd_rows_kernel(const A* __restrict__ sims_s,                                         // [B, rows, N]
                    const A* __restrict__ sims_t,                                         // [B, rows, N]
                    ContextualChunk c, A* __restrict__ stats_s, A* __restrict__ stats_t,  // [2, B, N]
                    A* __restrict__ rho, A* __restrict__ row_loss) {                      // [B, N]
  __shared__ A scratch[33];
  const int64_t task = blockIdx.x;  // b · rows + r
  const int64_t b = c.b0 + task / c.rows, r = task % c.rows, N = c.n;
  const int64_t out_row = b * N + c.i0 + r;
  const A* srow = sims_s + task * N;
  const A* trow = sims_t + task * N;
  const A scale_s = static_cast<A>(c.scale_s), scale_t = static_cast<A>(c.scale_t);
  A a_max, a_log, p_max, p_log;
  row_stats(srow, N, scale_s, scratch, a_max, a_log);
  row_stats(trow, N, scale_t, scratch, p_max, p_log);
  A sq = A(0), rh = A(0);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const A a = ex((scale_s * srow[j] - a_max) - a_log);
    const A e = a - ex((scale_t * trow[j] - p_max) - p_log);
    sq += e * e;
    rh += e * a;
  }
  sq = block_sum(sq, scratch);
  rh = block_sum(rh, scratch);
  if (threadIdx.x == 0) {
    const int64_t rows_total = c.batch * N;
    stats_s[out_row] = a_max;
    stats_s[rows_total + out_row] = a_log;
    stats_t[out_row] = p_max;
    stats_t[rows_total + out_row] = p_log;
    rho[out_row] = rh;
    row_loss[out_row] = sq;
  }
}

// c_i of G = c (A − P) for row `row` of [B, N] (spec §5.3).
template <typename A>
__device__ __forceinline__ A row_coef(const A* grad, Reduction reduction, int64_t row, int64_t B, int64_t N) {
  const A n = static_cast<A>(N);
  if (reduction == Reduction::kNone) return A(2) * grad[row] / n;
  if (reduction == Reduction::kMean) return A(2) * grad[0] / (static_cast<A>(B) * n * n);
  return A(2) * grad[0];
}

template <typename A, typename H>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    bwd_weights_kernel(ContextualChunk c, Reduction reduction, const A* __restrict__ grad,
                       const A* __restrict__ stats_s, const A* __restrict__ stats_t,  // [2, B, N]
                       const A* __restrict__ rho,                                     // [B, N]
                       A* __restrict__ sims_s,                                        // [B, rows, N] in: S raw, out: W
                       const A* __restrict__ sims_t, bool split, A* __restrict__ row_max, H* __restrict__ w_hi,
                       H* __restrict__ w_lo) {  // [B, rows], [B, rows, N]
  __shared__ A scratch[33];
  const int64_t task = blockIdx.x;
  const int64_t b = c.b0 + task / c.rows, N = c.n;
  const int64_t base = b * N, k = base + c.i0 + task % c.rows;
  A* srow = sims_s + task * N;
  const A* trow = sims_t + task * N;
  const A scale_s = static_cast<A>(c.scale_s), scale_t = static_cast<A>(c.scale_t);
  const int64_t rows_total = c.batch * N;
  const A *am = stats_s, *al = stats_s + rows_total, *pm = stats_t, *pl = stats_t + rows_total;
  const A c_k = row_coef(grad, reduction, k, c.batch, N);
  const A r_k = c_k * rho[k];
  A wmax = A(0);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const A s = scale_s * srow[j], t = scale_t * trow[j];
    const A a_kj = ex((s - am[k]) - al[k]), p_kj = ex((t - pm[k]) - pl[k]);
    const A a_jk = ex((s - am[base + j]) - al[base + j]), p_jk = ex((t - pm[base + j]) - pl[base + j]);
    const A c_j = row_coef(grad, reduction, base + j, c.batch, N);
    const A r_j = c_j * rho[base + j];
    const A w = scale_s * (a_kj * (c_k * (a_kj - p_kj) - r_k) + a_jk * (c_j * (a_jk - p_jk) - r_j));
    srow[j] = w;
    wmax = fmax(wmax, fabs(w));
  }
  if (!split) return;
  wmax = block_max_all(wmax, scratch);  // every thread of the block reaches this (split is uniform)
  const A m = wmax > A(0) ? wmax : A(1);
  if (threadIdx.x == 0) row_max[task] = m;
  H* hi = w_hi + task * N;
  H* lo = w_lo + task * N;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const A v = srow[j] / m;
    const H h = from_acc<H>(v);
    hi[j] = h;
    lo[j] = from_acc<H>(v - to_acc(h));
  }
}

template <typename A>
cudaError_t launch_bwd(const ContextualChunk& c, Reduction reduction, const void* grad, const void* stats_s,
                       const void* stats_t, const void* rho, void* sims_s, const void* sims_t, int split_dtype,
                       void* row_max, void* w_hi, void* w_lo, cudaStream_t stream) {
  const dim3 grid(one_block_per_row(c.images * c.rows));
  const auto* g = static_cast<const A*>(grad);
  const auto* ls = static_cast<const A*>(stats_s);
  const auto* lt = static_cast<const A*>(stats_t);
  const auto* rh = static_cast<const A*>(rho);
  auto* ss = static_cast<A*>(sims_s);
  const auto* st = static_cast<const A*>(sims_t);
  auto* rm = static_cast<A*>(row_max);
  if (split_dtype == static_cast<int>(DType::kBFloat16)) {
    bwd_weights_kernel<A, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(c, reduction, g, ls, lt, rh, ss, st, true, rm,
                                                                        static_cast<__nv_bfloat16*>(w_hi),
                                                                        static_cast<__nv_bfloat16*>(w_lo));
  } else if (split_dtype == static_cast<int>(DType::kFloat16)) {
    bwd_weights_kernel<A, __half><<<grid, kThreads, 0, stream>>>(
        c, reduction, g, ls, lt, rh, ss, st, true, rm, static_cast<__half*>(w_hi), static_cast<__half*>(w_lo));
  } else if (split_dtype == kNoSplit) {
    bwd_weights_kernel<A, A>
        <<<grid, kThreads, 0, stream>>>(c, reduction, g, ls, lt, rh, ss, st, false, nullptr, nullptr, nullptr);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t contextual_fwd_rows_cuda(const ContextualChunk& c, const void* sims_s, const void* sims_t, void* stats_s,
                                     void* stats_t, void* rho, void* row_loss, cudaStream_t stream) {
  if (c.batch <= 0 || c.images <= 0 || c.rows <= 0 || c.n <= 0) return cudaSuccess;
  const dim3 grid(one_block_per_row(c.images * c.rows));
  if (c.acc == DType::kFloat64) {
    fwd_rows_kernel<double><<<grid, kThreads, 0, stream>>>(
        static_cast<const double*>(sims_s), static_cast<const double*>(sims_t), c, static_cast<double*>(stats_s),
        static_cast<double*>(stats_t), static_cast<double*>(rho), static_cast<double*>(row_loss));
  } else if (c.acc == DType::kFloat32) {
    fwd_rows_kernel<float><<<grid, kThreads, 0, stream>>>(
        static_cast<const float*>(sims_s), static_cast<const float*>(sims_t), c, static_cast<float*>(stats_s),
        static_cast<float*>(stats_t), static_cast<float*>(rho), static_cast<float*>(row_loss));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t contextual_bwd_weights_cuda(const ContextualChunk& c, Reduction reduction, const void* grad,
                                        const void* stats_s, const void* stats_t, const void* rho, void* sims_s,
                                        const void* sims_t, int split_dtype, void* row_max, void* w_hi, void* w_lo,
                                        cudaStream_t stream) {
  if (c.batch <= 0 || c.images <= 0 || c.rows <= 0 || c.n <= 0) return cudaSuccess;
  if (c.acc == DType::kFloat64) {
    if (split_dtype != kNoSplit) return cudaErrorInvalidValue;  // fp64 students need no split
    return launch_bwd<double>(c, reduction, grad, stats_s, stats_t, rho, sims_s, sims_t, split_dtype, row_max, w_hi,
                              w_lo, stream);
  }
  if (c.acc == DType::kFloat32) {
    return launch_bwd<float>(c, reduction, grad, stats_s, stats_t, rho, sims_s, sims_t, split_dtype, row_max, w_hi,
                             w_lo, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdloss
