// CUDA's execution model on the CPU, for the tests: csrc/*.cu compiled with `g++ -x c++
// -DPTF_HOST_EMULATION -I tests/cuda_host` find this header behind <cuda_runtime.h>,
// <cuda_fp16.h>, <cuda_bf16.h> and <cooperative_groups.h>. A test tool, not a product.
//
// * Every CUDA thread of a block is a fiber (own stack, switched by runtime.cpp only at
//   __syncthreads*, warp collectives and grid.sync()): deterministic, and ~100x cheaper to
//   switch than OS threads. Blocks of a launch run on a few OS threads (one per block for a
//   cooperative launch, so that all its blocks are live at once, as grid.sync() needs).
// * `__shared__` is `static thread_local`: per OS thread, i.e. per running block. The kernel
//   objects are compiled with -fsanitize=kernel-address in "call" mode, so every load/store the
//   compiler emits goes through runtime.cpp's __asan_* hooks, which shadow the accesses that fall
//   in the kernel module's TLS segment (= its shared memory) and report races (racecheck:
//   read-after-write, write-after-read, write-after-write between two threads with no barrier
//   in between) and reads of shared bytes the block never wrote (initcheck).
//   Not seen: accesses GCC proves in-bounds at compile time (a constant index into a __shared__
//   array is never instrumented), and atomics (runtime calls, never racy among themselves).
// * Warp collectives check CUDA's mask rules: every lane named in the mask must arrive at the
//   same collective with the same mask (an exited lane or one waiting at a barrier fails the
//   launch), a lane must name itself, and a shuffle may only read lanes of the mask.
// * Not emulated: dynamic shared memory (`extern __shared__`), textures, clusters, streams
//   (launches run synchronously), global-memory races between blocks.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

// ------------------------------------------------------------------ vector types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// CUDA's integer min/max (host and device) in the global namespace.
template <typename A, typename B, typename = std::enable_if_t<std::is_integral<A>::value && std::is_integral<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B, typename = std::enable_if_t<std::is_integral<A>::value && std::is_integral<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// ------------------------------------------------------------------ runtime API subset
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
};
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrCooperativeLaunch = 95 };
typedef struct CUstream_st* cudaStream_t;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
namespace cuda_host {
int occupancy_blocks_per_sm(unsigned threads);
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t smem) {
  if (smem != 0) return cudaErrorInvalidValue;
  *n = cuda_host::occupancy_blocks_per_sm(static_cast<unsigned>(threads));
  return cudaSuccess;
}

// ------------------------------------------------------------------ fp16 / bf16 (round to nearest even)
struct __half {
  uint16_t x;
};
struct __attribute__((aligned(4))) __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace cuda_host {
inline uint16_t float_to_half_bits(float f) {  // F. Giesen's float_to_half_fast3_rtne
  const uint32_t f32infty = 255u << 23, f16max = (127u + 16) << 23;
  const uint32_t denorm_magic = ((127u - 15) + (23 - 10) + 1) << 23;
  uint32_t u = __float_as_uint(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16max) {
    o = u > f32infty ? 0x7e00 : 0x7c00;  // NaN -> qNaN, overflow -> inf
  } else if (u < (113u << 23)) {  // result subnormal or zero: let the FPU's RNE addition round
    o = static_cast<uint16_t>(__float_as_uint(__uint_as_float(u) + __uint_as_float(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfff;
    u += mant_odd;
    o = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0) return sign ? -ldexpf(static_cast<float>(m), -24) : ldexpf(static_cast<float>(m), -24);
  if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN (the device's canonical bf16 NaN)
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
}  // namespace cuda_host

inline float __half2float(__half h) { return cuda_host::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return {cuda_host::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {cuda_host::float_to_bf16_bits(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

// ------------------------------------------------------------------ execution model (runtime.cpp)
namespace cuda_host {
struct ThreadCtx {
  uint3 thread, block;  // threadIdx, blockIdx
  dim3 bdim, gdim;      // blockDim, gridDim
};
const ThreadCtx& ctx();  // the running CUDA thread

enum BarrierKind : int { kBarPlain, kBarOr, kBarAnd, kBarCount };
int syncthreads(BarrierKind kind, int pred);
void grid_sync();

enum WarpOp : int { kShflIdx, kShflXor, kShflDown, kShflUp, kBallot, kSyncWarp };
uint32_t warp_collective(WarpOp op, unsigned mask, uint32_t value, int arg, int width);

int atomic_add_i32(int* p, int v);
unsigned atomic_add_u32(unsigned* p, unsigned v);
float atomic_add_f32(float* p, float v);

template <typename T>
inline T shfl(WarpOp op, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
  uint32_t bits;
  memcpy(&bits, &v, 4);
  bits = warp_collective(op, mask, bits, arg, width);
  memcpy(&v, &bits, 4);
  return v;
}

// One launch: the kernel and its by-value arguments; every CUDA thread calls kernel(args...).
struct LaunchSpec {
  const char* name;   // the kernel expression: "decode_split_kernel<T, D, GMAX>"
  const char* where;  // __PRETTY_FUNCTION__ of the launcher (gives the template arguments)
  const void* kernel_addr;
  bool cooperative;
  dim3 grid, block;
  size_t smem;
  void (*run)(void* closure);
  void* closure;
};
cudaError_t launch(const LaunchSpec& spec);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  const char* where;
  bool cooperative;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  cudaError_t operator()(A&&... a) const {
    struct Closure {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } c{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    auto run = [](void* p) {
      Closure* cl = static_cast<Closure*>(p);
      std::apply(cl->kernel, cl->args);  // by value: every thread gets its own copy, as on a GPU
    };
    const LaunchSpec s{name, where, reinterpret_cast<const void*>(kernel), cooperative, grid, block, smem, run, &c};
    return launch(s);
  }
};
template <typename... P>
Launch<P...> make_launch(const char* name, const char* where, bool coop, void (*k)(P...), dim3 grid, dim3 block,
                         size_t smem, cudaStream_t) {
  return {k, name, where, coop, grid, block, smem};
}
}  // namespace cuda_host

#define threadIdx (::cuda_host::ctx().thread)
#define blockIdx (::cuda_host::ctx().block)
#define blockDim (::cuda_host::ctx().bdim)
#define gridDim (::cuda_host::ctx().gdim)
constexpr int warpSize = 32;

inline void __syncthreads() { cuda_host::syncthreads(cuda_host::kBarPlain, 0); }
inline int __syncthreads_or(int pred) { return cuda_host::syncthreads(cuda_host::kBarOr, pred); }
inline int __syncthreads_and(int pred) { return cuda_host::syncthreads(cuda_host::kBarAnd, pred); }
inline int __syncthreads_count(int pred) { return cuda_host::syncthreads(cuda_host::kBarCount, pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_host::warp_collective(cuda_host::kSyncWarp, mask, 0, 0, 32); }
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return cuda_host::warp_collective(cuda_host::kBallot, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) { return (__ballot_sync(mask, pred) & mask) != 0; }
inline int __all_sync(unsigned mask, int pred) { return (__ballot_sync(mask, pred) & mask) == mask; }
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return cuda_host::shfl(cuda_host::kShflIdx, mask, v, src, width); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) { return cuda_host::shfl(cuda_host::kShflXor, mask, v, m, width); }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return cuda_host::shfl(cuda_host::kShflDown, mask, v, static_cast<int>(d), width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return cuda_host::shfl(cuda_host::kShflUp, mask, v, static_cast<int>(d), width);
}
inline int atomicAdd(int* p, int v) { return cuda_host::atomic_add_i32(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return cuda_host::atomic_add_u32(p, v); }
inline float atomicAdd(float* p, float v) { return cuda_host::atomic_add_f32(p, v); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace cooperative_groups {
struct grid_group {
  void sync() const { cuda_host::grid_sync(); }
  unsigned long long size() const {
    const auto& c = cuda_host::ctx();
    return 1ull * c.gdim.x * c.gdim.y * c.gdim.z * c.bdim.x * c.bdim.y * c.bdim.z;
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// Kernel launches (csrc/common.cuh maps PTF_LAUNCH / PTF_LAUNCH_COOPERATIVE here under
// PTF_HOST_EMULATION, to <<<>>> / cudaLaunchCooperativeKernel under nvcc).
#define PTF_HOST_LAUNCH(coop, cfg, ...) \
  ::cuda_host::make_launch(#__VA_ARGS__, __PRETTY_FUNCTION__, coop, __VA_ARGS__, PTF_HOST_UNPAREN cfg)
#define PTF_HOST_UNPAREN(...) __VA_ARGS__
