// Decode attention over [shared prefix ; per-row KV cache] (flash-decoding), fp16 / bf16 in,
// fp32 math. No torch headers: see kernels.h for the interface and the semantics.
//
// Grid: x = B * Hkv * q_groups, y = num_splits. One block (128 threads, 4 warps) owns one
// (row b, kv head, group of <= GMAX query rows) and one contiguous range of keys. The logical
// key axis is [prefix 0..P-1 ; cache 0..T-1]; a 32-key tile may straddle the boundary, each key
// picks its source pointer. "Query rows" are the rep = H/Hkv query heads of the kv head times
// the S new tokens (row g -> head kvh*rep + g/S, token g%S), so every K/V tile is read from
// global memory once per block and used by all of them (GQA). The prefix is read in place
// (shared [Hkv,P,D] or bank entry task_ids[b]), never copied per row.
//
// Per tile:  flags (in range, not padded) -> skip the tile if no key is valid for the block
//            -> K/V tile to shared memory (16-byte loads; invalid keys are zero-filled)
//            -> scores: warp w owns query rows w, w+4, ...; lane j owns key j of the tile
//            -> online softmax in registers (log2 domain, warp shuffles), P to shared memory
//            -> P @ V: thread owns (row, column pair) accumulators.
// Epilogue:  num_splits == 1: out = acc / l directly; else (acc / l, m + log2 l) per split to an
//            fp32 workspace and a combine kernel (one block per output row) merges the splits.
#include "common.cuh"
#include "kernels.h"

namespace ptune_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileKeys = 32;  // = warp size: lane j owns key j of the tile in the score phase
constexpr float kLog2e = 1.4426950408889634f;

// sc[i] = q_row(i) . k_row for the warp's rows i < R (q_row(i) = q + i * kWarps * D, fp32,
// pre-scaled); R is the smallest of RPT, RPT/2, ..., 1 that covers `rows` (warp-uniform), so
// that a block with fewer query rows than GMAX does not compute scores for the missing ones.
template <typename T, int D, int RPT, int R>
__device__ __forceinline__ void warp_scores(int rows, const T* krow, const float* q, float (&sc)[RPT]) {
  if constexpr (R > 1) {
    if (rows <= R / 2) return warp_scores<T, D, RPT, R / 2>(rows, krow, q, sc);
  }
  if (rows <= 0) return;
  using T2 = typename Pack2<T>::type;
#pragma unroll 4
  for (int d = 0; d < D; d += 2) {
    const float2 kf = to_float2(*reinterpret_cast<const T2*>(krow + d));
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const float2 qf = *reinterpret_cast<const float2*>(q + i * kWarps * D + d);
      sc[i] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, sc[i]));
    }
  }
}

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  using T2 = typename Pack2<T>::type;
  constexpr int KS = D + 2;  // padded K row (elements): odd 32-bit word stride, no bank conflicts
  constexpr int RPT = GMAX / kWarps;  // score rows per warp
  constexpr int DP = D / 2;           // column pairs
  constexpr int ITERS = (GMAX * DP + kThreads - 1) / kThreads;
  constexpr int VPR = D / 8;          // 16-byte vectors per K/V row
  constexpr int PS = kTileKeys + 1;   // padded P row (floats)
  static_assert(D % 8 == 0, "head dim must be a multiple of 8");
  static_assert(GMAX % kWarps == 0, "GMAX must be a multiple of the warp count");

  __shared__ __align__(16) float q_s[GMAX * D];
  __shared__ __align__(16) T k_s[kTileKeys * KS];
  __shared__ __align__(16) T v_s[kTileKeys * D];
  __shared__ float p_s[GMAX * PS];
  __shared__ float alpha_s[GMAX];
  __shared__ float m_s[GMAX];
  __shared__ float l_s[GMAX];
  __shared__ int kvalid_s[kTileKeys];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  int bid = blockIdx.x;
  const int qg = bid % p.q_groups;
  bid /= p.q_groups;
  const int kvh = bid % p.Hkv;
  const int b = bid / p.Hkv;
  const int split = blockIdx.y;

  const int rep = p.H / p.Hkv;
  const int G = rep * p.S;
  const int g0 = qg * GMAX;
  const int Gb = min(GMAX, G - g0);  // query rows of this block (>= 1)
  const int n_keys = p.P + p.T;
  const int key_begin = split * p.tiles_per_split * kTileKeys;
  const int key_end = min(n_keys, key_begin + p.tiles_per_split * kTileKeys);

  // ---- sources
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;
  const T* pk_base = nullptr;
  const T* pv_base = nullptr;
  bool bad_task = false;
  if (p.P > 0) {
    int64_t task = 0;
    if (p.task_ids != nullptr) {
      task = load_int(p.task_ids, b, p.task_ids_bytes);
      if (task < 0 || task >= p.N) {
        bad_task = true;
        task = 0;
      }
    }
    pk_base = static_cast<const T*>(p.pk) + task * p.pk_sn + kvh * p.pk_sh;
    pv_base = static_cast<const T*>(p.pv) + task * p.pv_sn + kvh * p.pv_sh;
  }

  // ---- queries -> shared memory, pre-scaled by scale * log2(e); rows >= Gb are zero
  const float qscale = p.scale * kLog2e;
  const T* q_ptr = static_cast<const T*>(p.q);
  for (int idx = tid; idx < GMAX * D; idx += kThreads) {
    const int g = idx / D;
    const int d = idx - g * D;
    float val = 0.f;
    if (g < Gb) {
      const int gg = g0 + g;
      const int hq = kvh * rep + gg / p.S;
      const int s = gg % p.S;
      val = to_float(q_ptr[b * p.q_sb + hq * p.q_sh + s * p.q_ss + d * p.q_sd]) * qscale;
    }
    q_s[idx] = val;
  }

  // ---- per-thread state
  float m_i[RPT], l_i[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    m_i[i] = -INFINITY;
    l_i[i] = 0.f;
  }
  float2 acc[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) acc[it] = make_float2(0.f, 0.f);

  for (int t0 = key_begin; t0 < key_end; t0 += kTileKeys) {
    // (1) key flags: inside this split's range and not padding (prefix keys always valid)
    int valid = 0;
    if (tid < kTileKeys) {
      const int j = t0 + tid;
      if (j < key_end) {
        if (j < p.P) {
          valid = 1;
        } else if (p.mask == nullptr) {
          valid = 1;
        } else {
          valid = load_int(p.mask, b * p.m_sb + static_cast<int64_t>(j - p.P) * p.m_st, p.mask_bytes) != 0;
        }
      }
      kvalid_s[tid] = valid;
    }
    // (2) barrier: flags visible; skip tiles with no valid key (left padding, ragged rows).
    // Also orders the previous tile's P@V reads of v_s before this tile's writes.
    if (!__syncthreads_or(valid)) continue;

    // (3) K/V tile -> shared memory (zeros for invalid keys: 0 * garbage could be NaN)
    for (int idx = tid; idx < kTileKeys * VPR; idx += kThreads) {
      const int r = idx / VPR;
      const int c = idx - r * VPR;
      uint4 kv = make_uint4(0u, 0u, 0u, 0u);
      uint4 vv = make_uint4(0u, 0u, 0u, 0u);
      if (kvalid_s[r]) {
        const int j = t0 + r;
        const T* kp;
        const T* vp;
        if (j < p.P) {
          kp = pk_base + j * p.pk_sp;
          vp = pv_base + j * p.pv_sp;
        } else {
          const int64_t jc = j - p.P;
          kp = k_base + jc * p.k_st;
          vp = v_base + jc * p.v_st;
        }
        kv = *reinterpret_cast<const uint4*>(kp + c * 8);
        vv = *reinterpret_cast<const uint4*>(vp + c * 8);
      }
      uint32_t* kd = reinterpret_cast<uint32_t*>(k_s + r * KS + c * 8);  // 4-byte aligned (KS even)
      kd[0] = kv.x;
      kd[1] = kv.y;
      kd[2] = kv.z;
      kd[3] = kv.w;
      *reinterpret_cast<uint4*>(v_s + r * D + c * 8) = vv;  // 16-byte aligned (D % 8 == 0)
    }
    __syncthreads();

    // (4) scores + online softmax. Warp w: rows w, w+4, ...; lane: key t0 + lane.
    {
      const int jc = t0 + lane - p.P;  // < 0 for prefix keys
      const bool kv_ok = kvalid_s[lane] != 0;
      float sc[RPT] = {};
      // Only the rows this warp owns (rows >= Gb do no score work; rounded up to a power of 2).
      warp_scores<T, D, RPT, RPT>((Gb - warp + kWarps - 1) / kWarps, k_s + lane * KS, q_s + warp * D, sc);
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int g = warp + kWarps * i;
        if (g < Gb) {  // warp-uniform
          // causal: the row's query s sees cache keys 0 .. T - S + s
          const bool vis = kv_ok && (jc < 0 || !p.causal || jc <= p.T - p.S + (g0 + g) % p.S);
          const float s = vis ? sc[i] : -INFINITY;
          const float m_new = fmaxf(m_i[i], warp_max(s));
          float pr = 0.f;
          float alpha = 1.f;
          if (m_new != -INFINITY) {  // warp-uniform
            pr = vis ? exp2f(s - m_new) : 0.f;
            alpha = exp2f(m_i[i] - m_new);  // 0 when m_i = -inf
          }
          l_i[i] = l_i[i] * alpha + warp_sum(pr);
          m_i[i] = m_new;
          p_s[g * PS + lane] = pr;
          if (lane == 0) alpha_s[g] = alpha;
        }
      }
    }
    __syncthreads();

    // (5) acc = acc * alpha + P @ V. Thread: pairs idx = tid + 128*it -> (row g, column pair dp).
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int idx = tid + kThreads * it;
      const int g = idx / DP;
      const int dp = idx - g * DP;
      if (g < Gb) {
        float2 a = acc[it];
        const float al = alpha_s[g];
        a.x *= al;
        a.y *= al;
        const float* prow = p_s + g * PS;
        const T* vcol = v_s + 2 * dp;
#pragma unroll 8
        for (int j = 0; j < kTileKeys; ++j) {
          const float pj = prow[j];
          const float2 vf = to_float2(*reinterpret_cast<const T2*>(vcol + j * D));
          a.x = fmaf(pj, vf.x, a.x);
          a.y = fmaf(pj, vf.y, a.y);
        }
        acc[it] = a;
      }
    }
    // No barrier here: the next tile's barrier (2) orders these reads before any overwrite.
  }

  // ---- epilogue
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int g = warp + kWarps * i;
      if (g < Gb) {
        m_s[g] = m_i[i];
        l_s[g] = l_i[i];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int idx = tid + kThreads * it;
    const int g = idx / DP;
    const int dp = idx - g * DP;
    if (g < Gb) {
      const int gg = g0 + g;
      const int hq = kvh * rep + gg / p.S;
      const int s = gg % p.S;
      const int64_t row = (static_cast<int64_t>(b) * p.H + hq) * p.S + s;
      const float l = l_s[g];
      const float inv = l > 0.f ? 1.f / l : 0.f;  // fully masked -> 0
      float ox = acc[it].x * inv;
      float oy = acc[it].y * inv;
      if (bad_task) ox = oy = __int_as_float(0x7fc00000);  // NaN
      if (p.num_splits == 1) {
        T2* o = reinterpret_cast<T2*>(static_cast<T*>(p.out) + row * D + 2 * dp);
        *o = from_float2<T>(ox, oy);
      } else {
        const int64_t ws_row = row * p.num_splits + split;
        *reinterpret_cast<float2*>(p.ws_o + ws_row * D + 2 * dp) = make_float2(ox, oy);
        if (dp == 0) {
          p.ws_lse[ws_row] = bad_task ? 0.f : (l > 0.f ? m_s[g] + log2f(l) : -INFINITY);
        }
      }
    }
  }
}

// One block per output row (b, h, s), one thread per head-dim column.
template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                                      T* __restrict__ out, int num_splits, int D) {
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  const float* lse = ws_lse + row * num_splits;
  float m = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, lse[s]);
  float num = 0.f;
  float den = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lse[s] - m);  // 0 for empty splits
      num = fmaf(w, ws_o[(row * num_splits + s) * D + d], num);
      den += w;
    }
  }
  out[row * D + d] = from_float<T>(den > 0.f ? num / den : 0.f);
}

template <typename T, int D, int GMAX>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B) * p.Hkv * p.q_groups, p.num_splits);
  PTF_LAUNCH((grid, kThreads, 0, stream), decode_split_kernel<T, D, GMAX>)(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const unsigned rows = static_cast<unsigned>(p.B) * p.H * p.S;
  PTF_LAUNCH((rows, D, 0, stream), decode_combine_kernel<T>)(p.ws_o, p.ws_lse, static_cast<T*>(p.out), p.num_splits, D);
  return cudaGetLastError();
}

template <typename T, int GMAX>
cudaError_t launch_dim(const DecodeParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64:
      return launch_typed<T, 64, GMAX>(p, stream);
    case 80:
      return launch_typed<T, 80, GMAX>(p, stream);
    case 96:
      return launch_typed<T, 96, GMAX>(p, stream);
    case 128:
      return launch_typed<T, 128, GMAX>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int rows_per_block(const DecodeParams& p) { return (p.H / p.Hkv) * p.S <= 8 ? 8 : 32; }

}  // namespace

bool decode_attention_supports_head_dim(int D) { return D == 64 || D == 80 || D == 96 || D == 128; }

void decode_attention_fill(DecodeParams& p, const TensorRef& q, const TensorRef& k, const TensorRef& v,
                           const TensorRef& pk, const TensorRef& pv, const TensorRef& task_ids,
                           const TensorRef& mask, bool causal, float scale, DType dtype) {
  int64_t P = 0, N = 1;
  if (pk.data != nullptr) {
    P = pk.size[pk.dim - 2];
    p.pk = pk.data;
    p.pv = pv.data;
    p.pk_sh = pk.stride[pk.dim - 3];
    p.pk_sp = pk.stride[pk.dim - 2];
    p.pv_sh = pv.stride[pv.dim - 3];
    p.pv_sp = pv.stride[pv.dim - 2];
    if (pk.dim == 4) {  // bank
      N = pk.size[0];
      p.pk_sn = pk.stride[0];
      p.pv_sn = pv.stride[0];
      p.task_ids = task_ids.data;
      p.task_ids_bytes = task_ids.elem_bytes;
    }
  }
  if (mask.data != nullptr) {
    p.mask = mask.data;
    p.mask_bytes = mask.elem_bytes;
    p.m_sb = mask.stride[0];
    p.m_st = mask.stride[1];
  }
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.q_sb = q.stride[0];
  p.q_sh = q.stride[1];
  p.q_ss = q.stride[2];
  p.q_sd = q.stride[3];
  p.k_sb = k.stride[0];
  p.k_sh = k.stride[1];
  p.k_st = k.stride[2];
  p.v_sb = v.stride[0];
  p.v_sh = v.stride[1];
  p.v_st = v.stride[2];
  p.B = static_cast<int>(q.size[0]);
  p.H = static_cast<int>(q.size[1]);
  p.Hkv = static_cast<int>(k.size[1]);
  p.S = static_cast<int>(q.size[2]);
  p.T = static_cast<int>(k.size[2]);
  p.P = static_cast<int>(P);
  p.N = static_cast<int>(N);
  p.D = static_cast<int>(q.size[3]);
  p.scale = scale;
  p.causal = causal;
  p.dtype = dtype;
}

int decode_attention_plan(DecodeParams& p, int num_sms, int requested_splits) {
  const int G = (p.H / p.Hkv) * p.S;
  const int gmax = rows_per_block(p);
  p.q_groups = (G + gmax - 1) / gmax;
  const int n_keys = p.P + p.T;
  const int n_tiles = n_keys > 0 ? (n_keys + kTileKeys - 1) / kTileKeys : 1;
  int splits;
  if (requested_splits > 0) {
    splits = requested_splits;
  } else {
    // Enough blocks for ~2 waves of the SMs, but at least 4 tiles (128 keys) per split.
    const long long base = static_cast<long long>(p.B) * p.Hkv * p.q_groups;
    const long long target = 2LL * (num_sms > 0 ? num_sms : 132);
    splits = static_cast<int>((target + base - 1) / base);
    splits = min(splits, (n_tiles + 3) / 4);
    splits = min(splits, 128);
  }
  splits = max(1, min(min(splits, n_tiles), 65535));  // gridDim.y limit
  p.tiles_per_split = (n_tiles + splits - 1) / splits;
  p.num_splits = (n_tiles + p.tiles_per_split - 1) / p.tiles_per_split;  // no empty split
  return p.num_splits;
}

cudaError_t decode_attention_launch(const DecodeParams& p, cudaStream_t stream) {
  if (p.B <= 0 || p.H <= 0 || p.Hkv <= 0 || p.H % p.Hkv != 0 || p.S <= 0 || p.P + p.T <= 0 ||
      !decode_attention_supports_head_dim(p.D) || p.q_groups < 1 || p.num_splits < 1 ||
      (p.num_splits > 1 && (p.ws_o == nullptr || p.ws_lse == nullptr)) ||
      p.q_groups * rows_per_block(p) < (p.H / p.Hkv) * p.S) {
    return cudaErrorInvalidValue;
  }
  const bool small = rows_per_block(p) == 8;
  if (p.dtype == kFloat16) {
    return small ? launch_dim<__half, 8>(p, stream) : launch_dim<__half, 32>(p, stream);
  }
  if (p.dtype == kBFloat16) {
    return small ? launch_dim<__nv_bfloat16, 8>(p, stream) : launch_dim<__nv_bfloat16, 32>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ptune_fast
