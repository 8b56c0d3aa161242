// Prompt / prefix encoder MLP head in ONE kernel launch (no torch headers; see kernels.h).
//
//   h_0 = x[indices]            (gather of the virtual-token embedding rows)
//   h_{l+1} = act(h_l @ W_l^T + b_l)   for l < L-1,   out = h_{L-1} @ W_{L-1}^T + b_{L-1}
//
// Design: a persistent *cooperative* kernel (cudaLaunchCooperativeKernel, grid = co-resident
// blocks). Each layer is a skinny GEMM [n x in] . [in x out] whose cost is streaming the fp32
// weights (n ~ 10..100 tokens), so every weight is read from memory once per 32 tokens: a
// block tile is 32 tokens x 16 output columns (8 warps x 2 columns); blocks loop over the
// layer's tiles, then grid.sync() before the next layer (whose input is the whole previous
// activation). Intermediate activations live in an fp32 global scratch (2 x n x hidden,
// ping-pong; a few hundred KB, L2 resident).
//
// Inside a tile the K axis is split over the 32 lanes of a warp (4 consecutive k per lane,
// 128 k per chunk): a lane loads float4 pieces of its 2 weight rows straight from global memory
// (coalesced, prefetched one chunk ahead) and the block stages the 32 x 128 activation chunk
// in shared memory (read as conflict-free float4). Each lane keeps 32 x 2 partial sums, reduced
// across lanes at the end with a 31-shuffle transpose-reduction that leaves token `lane`'s sum
// in lane `lane`, which then adds the bias, applies the activation and stores.
// More than 32 tokens: token tiles are the fast tile index, so a column tile's weights are
// re-read from L2 rather than HBM by the blocks that run together.
#include <cooperative_groups.h>

#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace cg = cooperative_groups;

namespace ptune_fast {
namespace {

constexpr int kEncThreads = 256;
constexpr int kEncWarps = kEncThreads / 32;
constexpr int kTok = 32;                   // tokens per tile (= warp size, see the reduction)
constexpr int kColsPerWarp = 2;
constexpr int kCols = kEncWarps * kColsPerWarp;  // 16 output columns per tile
constexpr int kChunk = 128;                // k per chunk = 32 lanes x float4

__device__ __forceinline__ float4 load_w4(const float* __restrict__ w, int c, int n_out, int n_in, int k) {
  if (c < n_out && k < n_in) return *reinterpret_cast<const float4*>(w + static_cast<int64_t>(c) * n_in + k);
  return make_float4(0.f, 0.f, 0.f, 0.f);
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

// One step of the transpose-reduction: lanes L and L^OFF exchange halves of acc[0 .. 2*OFF).
template <int OFF>
__device__ __forceinline__ void reduce_step(float (&acc)[kTok], int lane) {
  const bool upper = (lane & OFF) != 0;
#pragma unroll
  for (int i = 0; i < OFF; ++i) {
    const float send = upper ? acc[i] : acc[i + OFF];
    const float keep = upper ? acc[i + OFF] : acc[i];
    acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
  }
}

// After this, lane L's acc[0] holds the sum over all lanes of acc[L] (31 shuffles).
__device__ __forceinline__ void transpose_reduce(float (&acc)[kTok], int lane) {
  static_assert(kTok == 32, "the transpose-reduction maps token t to lane t");
  reduce_step<16>(acc, lane);
  reduce_step<8>(acc, lane);
  reduce_step<4>(acc, lane);
  reduce_step<2>(acc, lane);
  reduce_step<1>(acc, lane);
}

__device__ __forceinline__ void store_out(void* out, DType dt, int64_t i, float v) {
  if (dt == kFloat32) {
    static_cast<float*>(out)[i] = v;
  } else if (dt == kFloat16) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

__global__ void __launch_bounds__(kEncThreads, 2) encoder_mlp_kernel(const EncoderParams p) {
  __shared__ __align__(16) float h_s[kTok * kChunk];  // 16 KB
  cg::grid_group grid = cg::this_grid();

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_tok_tiles = (p.n + kTok - 1) / kTok;

  for (int l = 0; l < p.n_layers; ++l) {
    const int n_in = p.dims[l];
    const int n_out = p.dims[l + 1];
    const float* __restrict__ W = p.w[l];
    const float* __restrict__ bias = p.bias[l];
    const bool last = l == p.n_layers - 1;
    const float* h_in = p.scratch + static_cast<int64_t>((l + 1) & 1) * p.n * p.hidden_stride;  // l >= 1
    float* h_out = p.scratch + static_cast<int64_t>(l & 1) * p.n * p.hidden_stride;             // !last
    const int n_col_tiles = (n_out + kCols - 1) / kCols;
    const int n_tiles = n_col_tiles * n_tok_tiles;
    const int n_chunks = (n_in + kChunk - 1) / kChunk;

    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
      const int tok0 = (tile % n_tok_tiles) * kTok;
      const int ntok = min(kTok, p.n - tok0);
      const int c0 = (tile / n_tok_tiles) * kCols + warp * kColsPerWarp;

      float acc0[kTok], acc1[kTok];
#pragma unroll
      for (int t = 0; t < kTok; ++t) acc0[t] = acc1[t] = 0.f;

      float4 w0 = load_w4(W, c0, n_out, n_in, lane * 4);
      float4 w1 = load_w4(W, c0 + 1, n_out, n_in, lane * 4);

      for (int kc = 0; kc < n_chunks; ++kc) {
        const int k0 = kc * kChunk;
        __syncthreads();  // everyone is done reading the previous chunk of h_s
        for (int idx = tid; idx < kTok * (kChunk / 4); idx += kEncThreads) {
          const int r = idx / (kChunk / 4);
          const int k = k0 + (idx - r * (kChunk / 4)) * 4;
          float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
          if (r < ntok && k < n_in) {  // n_in % 4 == 0: the whole float4 is in range
            const int t = tok0 + r;
            if (l == 0) {
              const int64_t row = p.indices == nullptr ? t : load_int(p.indices, t, p.indices_bytes);
              if (row >= 0 && row < p.x_rows) {
                val = *reinterpret_cast<const float4*>(p.x + row * p.x_stride + k);
              } else {
                const float nan = __int_as_float(0x7fc00000);
                val = make_float4(nan, nan, nan, nan);  // bad index -> NaN row, no fault
              }
            } else {
              val = *reinterpret_cast<const float4*>(h_in + static_cast<int64_t>(t) * p.hidden_stride + k);
            }
          }
          *reinterpret_cast<float4*>(h_s + r * kChunk + (k - k0)) = val;
        }
        __syncthreads();

        // Prefetch the next chunk's weights while computing this one.
        float4 w0n = make_float4(0.f, 0.f, 0.f, 0.f);
        float4 w1n = w0n;
        if (kc + 1 < n_chunks) {
          w0n = load_w4(W, c0, n_out, n_in, k0 + kChunk + lane * 4);
          w1n = load_w4(W, c0 + 1, n_out, n_in, k0 + kChunk + lane * 4);
        }
#pragma unroll
        for (int t8 = 0; t8 < kTok; t8 += 8) {
          if (t8 < ntok) {  // block-uniform: rows >= ntok are zero anyway, skip the work
#pragma unroll
            for (int t = t8; t < t8 + 8; ++t) {
              const float4 hv = *reinterpret_cast<const float4*>(h_s + t * kChunk + lane * 4);
              acc0[t] = dot4(hv, w0, acc0[t]);
              acc1[t] = dot4(hv, w1, acc1[t]);
            }
          }
        }
        w0 = w0n;
        w1 = w1n;
      }

      transpose_reduce(acc0, lane);
      transpose_reduce(acc1, lane);
      if (lane < ntok) {
        const int64_t t = tok0 + lane;
#pragma unroll
        for (int cc = 0; cc < kColsPerWarp; ++cc) {
          const int c = c0 + cc;
          if (c < n_out) {
            float v = (cc == 0 ? acc0[0] : acc1[0]) + (bias != nullptr ? bias[c] : 0.f);
            if (last) {
              store_out(p.out, p.out_dtype, t * n_out + c, v);
            } else {
              v = p.act == 0 ? tanhf(v) : (v < 0.f ? 0.f : v);  // relu keeps NaN like torch
              h_out[t * p.hidden_stride + c] = v;
            }
          }
        }
      }
    }
    if (!last) grid.sync();  // the next layer reads every column of this one
  }
}

int g_blocks_per_sm[64];
bool g_blocks_per_sm_init[64];

}  // namespace

int64_t encoder_mlp_fill(EncoderParams& p, const TensorRef& x, const TensorRef& indices, const TensorRef* weights,
                         const TensorRef* biases, int n_layers, int act, DType out_dtype) {
  int64_t n = x.size[0];
  if (indices.data != nullptr) {
    n = indices.size[0];
    p.indices = indices.data;
    p.indices_bytes = indices.elem_bytes;
  }
  p.dims[0] = static_cast<int>(x.size[1]);
  int64_t hidden = 4;
  for (int l = 0; l < n_layers; ++l) {
    const int64_t d = weights[l].size[0];
    p.w[l] = static_cast<const float*>(weights[l].data);
    p.dims[l + 1] = static_cast<int>(d);
    if (l + 1 < n_layers) hidden = std::max(hidden, d);
    if (biases[l].data != nullptr) p.bias[l] = static_cast<const float*>(biases[l].data);
  }
  p.x = static_cast<const float*>(x.data);
  p.x_rows = x.size[0];
  p.x_stride = x.stride[0];
  p.n = static_cast<int>(n);
  p.n_layers = n_layers;
  p.act = act;
  p.out_dtype = out_dtype;
  if (n_layers <= 1) return 0;
  p.hidden_stride = hidden;
  return 2 * n * hidden;
}

cudaError_t encoder_mlp_launch(const EncoderParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.n_layers < 1 || p.n_layers > kEncoderMaxLayers || p.x == nullptr || p.out == nullptr ||
      (p.n_layers > 1 && p.scratch == nullptr)) {
    return cudaErrorInvalidValue;
  }
  for (int l = 0; l <= p.n_layers; ++l) {
    if (p.dims[l] <= 0 || p.dims[l] % 4 != 0) return cudaErrorInvalidValue;
    if (l > 0 && l < p.n_layers && p.dims[l] > p.hidden_stride) return cudaErrorInvalidValue;
  }
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int coop = 0;
  int num_sms = 0;
  if ((err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev)) != cudaSuccess) return err;
  if (!coop) return cudaErrorNotSupported;
  if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
  int per_sm = 0;
  if (dev >= 0 && dev < 64 && g_blocks_per_sm_init[dev]) {
    per_sm = g_blocks_per_sm[dev];
  } else {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, encoder_mlp_kernel, kEncThreads, 0);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) {
      g_blocks_per_sm[dev] = per_sm;
      g_blocks_per_sm_init[dev] = true;
    }
  }
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  long long max_tiles = 1;
  const long long n_tok_tiles = (p.n + kTok - 1) / kTok;
  for (int l = 0; l < p.n_layers; ++l) {
    const long long tiles = n_tok_tiles * ((p.dims[l + 1] + kCols - 1) / kCols);
    if (tiles > max_tiles) max_tiles = tiles;
  }
  const long long resident = static_cast<long long>(per_sm) * num_sms;
  const unsigned grid = static_cast<unsigned>(max_tiles < resident ? max_tiles : resident);
  return PTF_LAUNCH_COOPERATIVE((dim3(grid), dim3(kEncThreads), 0, stream), encoder_mlp_kernel)(p);
}

}  // namespace ptune_fast
