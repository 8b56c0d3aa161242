// Small kernels that exercise the emulator and its checker (tests/test_csrc_on_cpu.py): each
// case either computes something the test compares, or breaks one rule the checker must report.
#include <cuda_runtime.h>

#include <cooperative_groups.h>

#include "common.cuh"

namespace {

constexpr int kN = 64;

// which 0: out[t] = s[t - 1] without a barrier after the writes (read-after-write race)
// which 1: read the neighbour's slot, then overwrite one's own without a barrier (write-after-read)
// which 2: with the barrier, but thread 5 never writes its slot (initcheck)
// which 3: correct
__global__ void shared_kernel(int which, int* out) {
  __shared__ int s[kN];
  const int t = threadIdx.x;
  if (which == 1) {
    s[t] = t;
    __syncthreads();
    const int nb = s[(t + 1) % kN];
    s[t] = nb;  // thread t-1 reads s[t] in the same interval
    out[t] = nb;
    return;
  }
  if (which != 2 || t != 5) s[t] = t * 10;
  if (which >= 2) __syncthreads();
  out[t] = s[t > 0 ? t - 1 : 0];
}

// Warp collectives: every lane writes what it got; which = 4 also runs the barrier reductions.
__global__ void warp_kernel(int which, int* out) {
  const int t = threadIdx.x;
  const int lane = t & 31;
  if (which == 0) {
    out[t * 8 + 0] = __shfl_xor_sync(0xffffffffu, t, 5);
    out[t * 8 + 1] = __shfl_down_sync(0xffffffffu, t, 3);
    out[t * 8 + 2] = __shfl_up_sync(0xffffffffu, t, 2, 16);
    out[t * 8 + 3] = __shfl_sync(0xffffffffu, t, 7, 8);
    out[t * 8 + 4] = static_cast<int>(__ballot_sync(0xffffffffu, t % 3 == 0));
    out[t * 8 + 5] = __syncthreads_or(t == 77);
    out[t * 8 + 6] = __syncthreads_and(t != 77);
    out[t * 8 + 7] = __syncthreads_count(t % 2);
    return;
  }
  if (which == 1) {  // lanes 16..31 leave: the full-mask shuffle names lanes that never arrive
    if (lane >= 16) return;
    out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
  } else if (which == 2) {  // half-warp mask, but a lane outside it shuffles with it
    out[t] = __shfl_xor_sync(0x0000ffffu, t, 1);
  } else if (which == 3) {  // lane reads a lane that is not in the mask
    if (lane < 16) out[t] = __shfl_xor_sync(0x0000ffffu, t, 16);
  } else if (which == 4) {  // half the warp waits at a barrier, the other half in a full-mask shuffle
    if (lane < 16) {
      __syncthreads();
    } else {
      out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
    }
  }
}

__global__ void atomic_kernel(int* counter, float* sum) {
  atomicAdd(counter, 1);
  atomicAdd(sum, 0.5f);
}

// Blocks exchange through global memory across grid.sync() (cooperative launches only).
__global__ void grid_kernel(int* data, int* out) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int b = blockIdx.x;
  if (threadIdx.x == 0) data[b] = b + 1;
  grid.sync();
  if (threadIdx.x == 0) out[b] = data[(b + 1) % gridDim.x];
}

}  // namespace

// Returns the launch's cudaError_t.
extern "C" int ptf_selftest(int kernel, int which, int* out, int* scratch) {
  switch (kernel) {
    case 0:
      PTF_LAUNCH((1, kN, 0, nullptr), shared_kernel)(which, out);
      return cudaGetLastError();
    case 1:
      PTF_LAUNCH((1, 96, 0, nullptr), warp_kernel)(which, out);
      return cudaGetLastError();
    case 2:
      PTF_LAUNCH((7, 33, 0, nullptr), atomic_kernel)(out, reinterpret_cast<float*>(scratch));
      return cudaGetLastError();
    case 3:
      return PTF_LAUNCH_COOPERATIVE((5, 64, 0, nullptr), grid_kernel)(scratch, out);
    case 4:
      PTF_LAUNCH((5, 64, 0, nullptr), grid_kernel)(scratch, out);
      return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}
