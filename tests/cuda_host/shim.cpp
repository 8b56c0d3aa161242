// tests/cuda_host/shim.cpp: a C ABI over csrc/kernels.h for ctypes, doing what csrc/bindings.cpp
// does after its checks (fill the structs with the same functions, plan, workspace, launch).
// Workspaces and scratch are NaN-filled so that a read of an entry nobody wrote shows.
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

using namespace ptune_fast;

extern "C" {

// Returns a cudaError_t; plan (may be null) receives q_groups, num_splits, tiles_per_split.
int ptf_decode_attention(const TensorRef* q, const TensorRef* k, const TensorRef* v, const TensorRef* pk,
                         const TensorRef* pv, const TensorRef* task_ids, const TensorRef* mask, int causal, float scale,
                         int dtype, int num_splits, int num_sms, void* out, int* plan) {
  DecodeParams p;
  decode_attention_fill(p, *q, *k, *v, *pk, *pv, *task_ids, *mask, causal != 0, scale, static_cast<DType>(dtype));
  if (static_cast<int64_t>(p.B) * p.H * p.S == 0) return cudaSuccess;
  const size_t out_bytes = static_cast<size_t>(p.B) * p.H * p.S * p.D * 2;
  if (p.P + p.T == 0) {
    memset(out, 0, out_bytes);
    return cudaSuccess;
  }
  p.out = out;
  const int splits = decode_attention_plan(p, num_sms, num_splits);
  if (plan != nullptr) {
    plan[0] = p.q_groups;
    plan[1] = p.num_splits;
    plan[2] = p.tiles_per_split;
  }
  std::vector<float> ws_o, ws_lse;
  if (splits > 1) {
    const size_t rows = static_cast<size_t>(p.B) * p.H * p.S;
    ws_o.assign(rows * splits * p.D, NAN);
    ws_lse.assign(rows * splits, NAN);
    p.ws_o = ws_o.data();
    p.ws_lse = ws_lse.data();
  }
  return decode_attention_launch(p, nullptr);
}

int ptf_encoder_mlp(const TensorRef* x, const TensorRef* indices, const TensorRef* weights, const TensorRef* biases,
                    int n_layers, int act, int out_dtype, void* out) {
  EncoderParams p;
  const int64_t scratch_floats =
      encoder_mlp_fill(p, *x, *indices, weights, biases, n_layers, act, static_cast<DType>(out_dtype));
  if (p.n == 0) return cudaSuccess;
  std::vector<float> scratch(static_cast<size_t>(scratch_floats), NAN);
  if (scratch_floats > 0) p.scratch = scratch.data();
  p.out = out;
  return encoder_mlp_launch(p, nullptr);
}

// The emulated conversions, for the rounding test.
void ptf_round(const float* in, uint16_t* out, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = bf16 ? __float2bfloat16_rn(in[i]).x : __float2half_rn(in[i]).x;
  }
}
void ptf_widen(const uint16_t* in, float* out, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = bf16 ? __bfloat162float(__nv_bfloat16{in[i]}) : __half2float(__half{in[i]});
  }
}
}
