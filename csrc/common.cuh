// Device helpers shared by the ptune_fast kernels (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace ptune_fast {

template <typename T>
struct Pack2;
template <>
struct Pack2<__half> {
  using type = __half2;
};
template <>
struct Pack2<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }

template <typename T>
__device__ __forceinline__ typename Pack2<T>::type from_float2(float a, float b);
template <>
__device__ __forceinline__ __half2 from_float2<__half>(float a, float b) {
  return __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ __nv_bfloat162 from_float2<__nv_bfloat16>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

template <typename T>
__device__ __forceinline__ T from_float(float a);
template <>
__device__ __forceinline__ __half from_float<__half>(float a) {
  return __float2half_rn(a);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float a) {
  return __float2bfloat16_rn(a);
}
template <>
__device__ __forceinline__ float from_float<float>(float a) {
  return a;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Reads element i of an integer/bool array of `bytes`-wide elements (1, 4 or 8).
__device__ __forceinline__ int64_t load_int(const void* base, int64_t i, int bytes) {
  if (bytes == 8) return static_cast<const int64_t*>(base)[i];
  if (bytes == 4) return static_cast<const int32_t*>(base)[i];
  return static_cast<const uint8_t*>(base)[i];
}

}  // namespace ptune_fast
