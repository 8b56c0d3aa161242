// Device helpers shared by the ptune_fast kernels (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

// Kernel launches that compile with nvcc and in the host emulation of the tests (g++ with
// -DPTF_HOST_EMULATION, tests/cuda_host), so that the launchers need no #ifdef:
//   PTF_LAUNCH((grid, block, smem, stream), kernel<T, D>)(args...);   // kernel<<<...>>>(args...)
//   err = PTF_LAUNCH_COOPERATIVE((grid, block, smem, stream), kernel)(args...);
//                                             // cudaLaunchCooperativeKernel(kernel, ..., {&args...})
#if defined(PTF_HOST_EMULATION)
#define PTF_LAUNCH(cfg, ...) PTF_HOST_LAUNCH(false, cfg, __VA_ARGS__)
#define PTF_LAUNCH_COOPERATIVE(cfg, ...) PTF_HOST_LAUNCH(true, cfg, __VA_ARGS__)
#else
#define PTF_UNPAREN(...) __VA_ARGS__
#define PTF_LAUNCH(cfg, ...) __VA_ARGS__<<<PTF_UNPAREN cfg>>>
#define PTF_LAUNCH_COOPERATIVE(cfg, ...) ::ptune_fast::cooperative_launch(__VA_ARGS__, PTF_UNPAREN cfg)
#endif

namespace ptune_fast {

#if !defined(PTF_HOST_EMULATION)
template <typename... P>
struct CooperativeLaunch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  cudaError_t operator()(P... a) const {
    void* args[] = {static_cast<void*>(&a)...};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, args, smem, stream);
  }
};
template <typename... P>
CooperativeLaunch<P...> cooperative_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                                           cudaStream_t stream) {
  return {kernel, grid, block, smem, stream};
}
#endif

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
