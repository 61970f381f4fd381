// Shared device helpers for kdloss's CUDA kernels: accumulation types, warp/block reductions, the
// launch-size helpers and the one finalize kernel that turns per-row terms into a scalar loss.
// Plain CUDA: no torch headers, so .cu files that include only this compile in about a second (see
// docs/building.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kdloss/codes.h"

namespace kdloss {
namespace cuda {

// Accumulation type: fp32 for fp32/bf16/fp16, fp64 for fp64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // valid in lane 0
}

// Sum over the block in a fixed order (deterministic). `scratch` holds >= 32 values.
// The result is valid in thread 0. Must be reached by every thread of the block.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  A total = A(0);
  if (warp == 0) {
    total = lane < n_warps ? scratch[lane] : A(0);
    total = warp_sum(total);
  }
  __syncthreads();
  return total;
}

// Max over the warp, returned to every lane (butterfly; the same value in every lane).
template <typename A>
__device__ __forceinline__ A warp_max_all(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// Max over the block, returned to every thread. `scratch` holds >= 33 values; every thread of the
// block must reach it.
template <typename A>
__device__ __forceinline__ A block_max_all(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max_all(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A w = lane < ((blockDim.x + 31) >> 5) ? scratch[lane] : static_cast<A>(-INFINITY);
    w = warp_max_all(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  const A out = scratch[32];
  __syncthreads();
  return out;
}

// block_sum, returned to every thread. `scratch` holds >= 33 values.
template <typename A>
__device__ __forceinline__ A block_sum_all(A v, A* scratch) {
  const A total = block_sum(v, scratch);
  if (threadIdx.x == 0) scratch[32] = total;
  __syncthreads();
  const A out = scratch[32];
  __syncthreads();
  return out;
}

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// ---- launch sizes -------------------------------------------------------------------------------

constexpr unsigned kSingleBlock = 1;       // grid of the one-block kernels
constexpr int kFinalizeThreads = 1024;     // default block of finalize_kernel (32 warps: block_sum's limit)
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit

// Grid of a kernel giving each block `per_block` units: ceil(units / per_block) blocks, at least
// one and at most `max_blocks` (a grid-stride kernel covers the rest).
inline unsigned blocks_for(int64_t units, int64_t per_block, int64_t max_blocks = kMaxGridX) {
  const int64_t blocks = (units + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

// Grid of a kernel with one block per row (1 <= rows < 2^31, checked by the torch glue).
inline unsigned one_block_per_row(int64_t rows) { return static_cast<unsigned>(rows); }

// ---- the scalar loss of a reduction -------------------------------------------------------------
//
// A loss reduced to a scalar is first written as per-row terms, then finalize() sums the terms in a
// fixed order (deterministic, no floating-point atomics) and a "finish" functor turns that sum S
// into the loss: finish(S, scratch) is called by every thread of the block (so it may reduce over
// the block with `scratch`, >= 33 values) and thread 0's result is stored.

// Reduction::kMean: S / divisor(scratch), or 0 when that divisor is <= 0 (an empty mean is 0, never
// 0/0); Reduction::kSum: S. `divisor` is evaluated only for the mean.
template <typename Divisor>
struct MeanOrSum {
  Reduction reduction;
  Divisor divisor;
  template <typename A>
  __device__ A operator()(A total, A* scratch) const {
    if (reduction != Reduction::kMean) return total;
    const A d = divisor(scratch);
    return d > A(0) ? total / d : A(0);
  }
};

template <typename Divisor>
MeanOrSum<Divisor> mean_or_sum(Reduction reduction, Divisor divisor) {
  return {reduction, divisor};
}

// Mean divisor known on the host: a count of terms.
struct CountDivisor {
  int64_t count;
  template <typename A>
  __device__ A operator()(A*) const {
    return static_cast<A>(count);
  }
};

// Mean divisor held in device memory (one value of the accumulation type).
template <typename A>
struct DeviceDivisor {
  const A* value;
  __device__ A operator()(A*) const { return value[0]; }
};

// scale · S (no reduction code: the op always returns a scalar).
struct Scaled {
  double scale;
  template <typename A>
  __device__ A operator()(A total, A*) const {
    return static_cast<A>(scale) * total;
  }
};

// out[0] = finish(Σ terms[0..n)) as an Out (of accumulation type A), by block 0 of the grid; every
// thread of that block must reach it.
template <typename Out, typename A, typename Finish>
__device__ void finalize(const A* __restrict__ terms, int64_t n, const Finish& finish, Out* __restrict__ out) {
  __shared__ A scratch[33];
  if (blockIdx.x != 0) return;
  A v = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += terms[i];
  const A value = finish(block_sum(v, scratch), scratch);
  if (threadIdx.x == 0) out[0] = from_acc<Out>(value);
}

template <typename Out, typename A, typename Finish>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const A* __restrict__ terms, int64_t n, Finish finish, Out* __restrict__ out) {
  finalize(terms, n, finish, out);
}

// Launches finalize_kernel as one block of `threads` (<= kFinalizeThreads) threads. The summation
// order depends on `threads`: keep it fixed for a given loss.
template <typename Out, typename A, typename Finish>
void launch_finalize(const A* terms, int64_t n, const Finish& finish, Out* out, cudaStream_t stream,
                     int threads = kFinalizeThreads) {
  finalize_kernel<<<kSingleBlock, threads, 0, stream>>>(terms, n, finish, out);
}

}  // namespace cuda
}  // namespace kdloss
