// Plain C++ interface of the ptune_fast CUDA kernels (no torch headers).
//
// The .cu files implement these launchers with raw pointers, int64 strides (in elements) and
// a cudaStream_t; csrc/bindings.cpp is the only file that sees torch and turns tensors into
// these parameter structs.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace ptune_fast {

enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// ------------------------------------------------------------------ decode attention
//
// out[b, h, s, :] = softmax(q[b,h,s] . [prefix_k ; k[b, h/rep]]^T * scale) @ [prefix_v ; v[b, h/rep]]
// with the semantics of ptune_fast.reference.prefix_attention (dropout 0): prefix keys always
// visible, key_padding_mask on the T sequence keys (nonzero = keep), causal bottom-right
// (query s sees sequence keys 0 .. T - S + s), fully masked rows -> 0.
//
// Layouts (element strides; the last dim of q/k/v/prefix must have stride 1 -- except q, which
// has q_sd -- and, for k/v/prefix, base pointers 16-byte aligned with strides multiples of 8):
//   q    [B, H, S, D]        dtype = `dtype` (fp16 / bf16)
//   k, v [B, Hkv, T, D]
//   pk, pv [N, Hkv, P, D]    N = 1 and pk_sn ignored for a shared prefix (task_ids == nullptr)
//   task_ids [B]             int32 (task_ids_bytes = 4) or int64 (8); out-of-range ids give NaN rows
//   mask [B, T]              1-, 4- or 8-byte integers / bool (mask_bytes), nonzero = keep; may be null
//   out  [B, H, S, D]        contiguous, dtype = `dtype`
struct DecodeParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* pk = nullptr;
  const void* pv = nullptr;
  const void* task_ids = nullptr;
  const void* mask = nullptr;
  void* out = nullptr;
  float* ws_o = nullptr;    // [B*H*S, num_splits, D] fp32, only when num_splits > 1
  float* ws_lse = nullptr;  // [B*H*S, num_splits]    fp32 (log2 domain), only when num_splits > 1
  int64_t q_sb = 0, q_sh = 0, q_ss = 0, q_sd = 1;
  int64_t k_sb = 0, k_sh = 0, k_st = 0;
  int64_t v_sb = 0, v_sh = 0, v_st = 0;
  int64_t pk_sn = 0, pk_sh = 0, pk_sp = 0;
  int64_t pv_sn = 0, pv_sh = 0, pv_sp = 0;
  int64_t m_sb = 0, m_st = 0;
  int task_ids_bytes = 0;
  int mask_bytes = 0;
  int B = 0, H = 0, Hkv = 0, S = 0, T = 0, P = 0, N = 1, D = 0;
  float scale = 1.0f;
  bool causal = true;
  DType dtype = kFloat16;
  // Filled by decode_attention_plan():
  int q_groups = 1;         // blocks per (row, kv head): ceil((H/Hkv)*S / rows per block)
  int num_splits = 1;       // key-range splits (flash-decoding); > 1 needs ws_o / ws_lse
  int tiles_per_split = 1;  // 32-key tiles per split
};

// A torch-free view of one tensor argument (sizes and strides in elements). csrc/bindings.cpp
// makes these from at::Tensor after its checks, tests/cuda_host/shim.cpp from ctypes; both fill
// the parameter structs with the functions below, so the host-run tests exercise that code too.
struct TensorRef {
  const void* data = nullptr;  // nullptr: the optional argument is absent
  int dim = 0;
  int elem_bytes = 0;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
};

// Fills every field of p except out, ws_o / ws_lse and the plan, from validated operands:
// q [B, H, S, D], k / v [B, Hkv, T, D], pk / pv [Hkv, P, D] or bank [N, Hkv, P, D] (absent when
// P == 0), task_ids [B] (bank only), mask [B, T] (optional).
void decode_attention_fill(DecodeParams& p, const TensorRef& q, const TensorRef& k, const TensorRef& v,
                           const TensorRef& pk, const TensorRef& pv, const TensorRef& task_ids,
                           const TensorRef& mask, bool causal, float scale, DType dtype);

// Head dims the kernel is instantiated for.
bool decode_attention_supports_head_dim(int D);

// Chooses q_groups, num_splits and tiles_per_split (requested_splits <= 0: heuristic from the
// SM count; otherwise clamped to [1, number of 32-key tiles]). Returns num_splits.
int decode_attention_plan(DecodeParams& p, int num_sms, int requested_splits);

// Launches the split kernel (and the combine kernel when num_splits > 1) on `stream`.
// Requires B*H*S > 0 and P + T > 0 (the caller returns zeros / empty otherwise).
cudaError_t decode_attention_launch(const DecodeParams& p, cudaStream_t stream);

// ------------------------------------------------------------------ prompt encoder MLP
//
// out = Linear_{L-1}(act(... act(Linear_0(x[indices])) ...)) in one cooperative launch.
// fp32 weights/bias/x, fp32 accumulation, out in out_dtype (fp32 / fp16 / bf16).
constexpr int kEncoderMaxLayers = 4;

struct EncoderParams {
  const float* x = nullptr;      // [x_rows, dims[0]], row stride x_stride (multiple of 4), 16B aligned
  int64_t x_rows = 0;
  int64_t x_stride = 0;
  const void* indices = nullptr; // [n] int32/int64 rows of x, or null for rows 0..n-1
  int indices_bytes = 0;
  int n = 0;                     // number of tokens (rows)
  int n_layers = 0;              // 1 .. kEncoderMaxLayers
  int dims[kEncoderMaxLayers + 1] = {0};         // all multiples of 4
  const float* w[kEncoderMaxLayers] = {nullptr};  // [dims[l+1], dims[l]] contiguous, 16B aligned
  const float* bias[kEncoderMaxLayers] = {nullptr};  // [dims[l+1]] or null
  int act = 0;                   // 0 = tanh, 1 = relu (between layers, not after the last)
  float* scratch = nullptr;      // 2 * n * hidden_stride fp32 (n_layers > 1)
  int64_t hidden_stride = 0;     // >= every hidden width, multiple of 4
  void* out = nullptr;           // [n, dims[n_layers]] contiguous
  DType out_dtype = kFloat32;
};

// Fills every field of p except scratch and out from validated operands: x [rows, dims[0]] (row
// stride x.stride[0]), indices [n] (optional; n = rows without), weights[l] [dims[l+1], dims[l]],
// biases[l] [dims[l+1]] (absent = none). Returns the scratch size the launch needs, in floats
// (2 * n * hidden_stride; 0 for one layer).
int64_t encoder_mlp_fill(EncoderParams& p, const TensorRef& x, const TensorRef& indices, const TensorRef* weights,
                         const TensorRef* biases, int n_layers, int act, DType out_dtype);

// Launches the fused encoder (requires n > 0). Returns cudaErrorNotSupported when the device
// cannot do cooperative launches.
cudaError_t encoder_mlp_launch(const EncoderParams& p, cudaStream_t stream);

}  // namespace ptune_fast
