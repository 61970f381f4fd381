// Shared device helpers for kdloss's CUDA kernels. Plain CUDA: no torch headers, so .cu files
// that include only this compile in about a second (see docs/building.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

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
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

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

// dtype codes shared by the launchers and the torch glue.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

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

}  // namespace cuda
}  // namespace kdloss
