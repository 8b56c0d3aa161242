"""``encoder_mlp``: the prompt/prefix encoder's MLP head over the n virtual tokens, run once
per step (never once per batch row). Public op and backend dispatch.

``x [n, d_in]`` (or an embedding table ``x [V, d_in]`` with ``indices [n]``: rows ``x[indices]``)
-> ``Linear (act Linear)*`` with ``act`` in {"tanh", "relu"} between layers (not after the
last), fp32 accumulation, output ``[n, d_out]`` in ``out_dtype`` (default ``x.dtype``). Prefix
tuning's projection is Linear-Tanh-Linear, P-tuning's MLP head Linear-ReLU-Linear-ReLU-Linear.

Backends (``PTUNE_FAST_BACKEND``, see :mod:`ptune_fast._backend`):

* ``cuda`` -- ``ptune_fast._C``: gather + every layer in ONE cooperative kernel launch
  (csrc/prompt_encoder.cu), fp32 weights, 1..4 layers, widths multiples of 4, out
  fp32/fp16/bf16. The backward recomputes the forward with :func:`ptune_fast.reference.
  encoder_mlp` under autograd (n is small; the weights dominate), so gradients are exact
  reference gradients. Forced (``PTUNE_FAST_BACKEND=cuda``) it raises
  :class:`~ptune_fast._backend.BackendUnavailable` when it cannot serve the call.
* ``reference`` -- :func:`ptune_fast.reference.encoder_mlp` (cuBLAS on GPU).
* there is no Triton encoder: with ``PTUNE_FAST_BACKEND=triton`` this op runs the reference
  (counted as a ``triton`` fallback) instead of raising, so that whole models still run with
  the Triton attention kernels forced.

Automatic dispatch on CUDA tensors: cuda -> reference (each miss counted in
``_backend.FALLBACKS``); CPU tensors: reference. When a gradient is needed, automatic dispatch
takes the reference: the fused forward would be followed by the reference recompute in the
backward, i.e. two forwards instead of one (autograd keeps the reference forward's
activations). The fused kernel thus serves no-grad calls (evaluation, generation with an
unfolded encoder) automatically, and everything when forced with ``PTUNE_FAST_BACKEND=cuda``.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from ptune_fast import _backend, reference

__all__ = ["encoder_mlp", "why_not", "ACTIVATIONS", "MAX_LAYERS", "OUT_DTYPES"]

OP = "encoder_mlp"
ACTIVATIONS = {"tanh": 0, "relu": 1}
MAX_LAYERS = 4
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _load_ops() -> bool:
    try:
        from ptune_fast import _C  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or OSError for a broken build
        return False

    @torch.library.register_fake("ptune_fast_C::encoder_mlp_fwd")
    def _encoder_mlp_fwd_fake(x, indices, weights, biases, activation, out_dtype):
        n = x.shape[0] if indices is None else indices.shape[0]
        return x.new_empty((n, weights[-1].shape[0]), dtype=out_dtype)

    return True


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _gather(x: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
    return x if indices is None else x.index_select(0, indices)


def _reference(x, weights, biases, activation, out_dtype, indices):
    return reference.encoder_mlp(_gather(x, indices), weights, biases, activation, out_dtype)


def why_not(x, weights, biases, activation, out_dtype, indices=None) -> str:
    """``""`` when the fused CUDA forward can serve this (validated) call, else the reason."""
    from ptune_fast.ops.decode_attention import device_why_not

    why = device_why_not(x.device)
    if why:
        return why
    if activation not in ACTIVATIONS:
        return f"activation {activation!r}"
    if len(weights) > MAX_LAYERS:
        return f"{len(weights)} layers; the fused encoder serves 1..{MAX_LAYERS}"
    if x.dtype not in OUT_DTYPES:
        return f"x dtype {x.dtype}"
    if out_dtype not in OUT_DTYPES:
        return f"out_dtype {out_dtype}; the fused encoder writes float32/float16/bfloat16"
    if indices is not None and (indices.device != x.device or indices.dtype not in (torch.int32, torch.int64)):
        return "indices must be an int32/int64 tensor on x's device"
    if x.shape[1] % 4:
        return f"d_in={x.shape[1]} is not a multiple of 4"
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.device != x.device or w.dtype != torch.float32:
            return f"weights[{i}] is {w.dtype} on {w.device}; the fused encoder needs float32 on {x.device}"
        if b is not None and (b.device != x.device or b.dtype != torch.float32):
            return f"biases[{i}] is {b.dtype} on {b.device}; the fused encoder needs float32 on {x.device}"
        if w.shape[0] % 4:
            return f"weights[{i}] has {w.shape[0]} outputs, not a multiple of 4"
    return ""


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """x: fp32 with contiguous, 16-byte aligned rows (float4 loads); other strides are fine."""
    if t.dtype != torch.float32:
        t = t.float()
    if t.stride(-1) == 1 and t.stride(0) % 4 == 0 and t.storage_offset() % 4 == 0:
        return t
    return _contiguous_aligned(t)


def _contiguous_aligned(t: torch.Tensor) -> torch.Tensor:
    """fp32, contiguous, 16-byte aligned start (the caching allocator aligns storages)."""
    t = t.float().contiguous()
    return t if t.storage_offset() % 4 == 0 else t.clone()


def _fused_forward(x, weights, biases, activation, out_dtype, indices):
    ws = [_contiguous_aligned(w) for w in weights]
    empty = x.new_empty(0, dtype=torch.float32)
    bs = [empty if b is None else _contiguous_aligned(b) for b in biases]
    idx = None if indices is None else indices.contiguous()
    return torch.ops.ptune_fast_C.encoder_mlp_fwd(_rows_ready(x), idx, ws, bs, ACTIVATIONS[activation], out_dtype)


class _FusedEncoderMLP(torch.autograd.Function):
    """Forward: the one-launch CUDA kernel. Backward: recompute with the reference under
    autograd and differentiate that (exact reference gradients; no double backward)."""

    @staticmethod
    def forward(ctx, x, indices, activation, out_dtype, n_layers, *params):
        weights, biases = params[:n_layers], params[n_layers:]
        ctx.activation, ctx.out_dtype, ctx.n_layers = activation, out_dtype, n_layers
        ctx.save_for_backward(x, indices, *params)
        return _fused_forward(x, weights, biases, activation, out_dtype, indices)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, indices, *params = ctx.saved_tensors
        L = ctx.n_layers
        needs = ctx.needs_input_grad  # (x, indices, activation, out_dtype, n_layers, *params)
        with torch.enable_grad():
            xs = x.detach().requires_grad_(needs[0])
            ps = [None if p is None else p.detach().requires_grad_(needs[5 + i]) for i, p in enumerate(params)]
            out = _reference(xs, ps[:L], ps[L:], ctx.activation, ctx.out_dtype, indices)
            leaves = [t for t in [xs, *ps] if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, leaves, grad_out, allow_unused=True) if leaves else ())
        gx = next(grads) if xs.requires_grad else None
        gps = [next(grads) if (p is not None and p.requires_grad) else None for p in ps]
        return (gx, None, None, None, None, *gps)


def encoder_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    activation: str,
    out_dtype: Optional[torch.dtype] = None,
    *,
    indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x [n, d_in]`` (or table ``x [V, d_in]`` + ``indices [n]``) through ``Linear (act
    Linear)*``; ``weights[i] [out_i, in_i]``, ``biases[i] [out_i]`` or None. Returns
    ``[n, d_out]`` in ``out_dtype`` (default ``x.dtype``). Differentiable w.r.t. ``x``
    (the table, with indices), weights and biases on every backend."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be [n, d_in], got shape {tuple(getattr(x, 'shape', ()))}")
    if len(weights) != len(biases) or not weights:
        raise ValueError("weights and biases must be non-empty sequences of the same length")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    d = x.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != d:
            raise ValueError(f"weights[{i}] must be [out, {d}], got {tuple(w.shape)}")
        d = w.shape[0]
        if b is not None and tuple(b.shape) != (d,):
            raise ValueError(f"biases[{i}] must be [{d}], got {tuple(b.shape)}")
    if indices is not None:
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be a 1-D int32/int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
    out_dtype = out_dtype or x.dtype

    forced = _backend.forced_backend()
    if forced == "triton":
        _backend.fallback(OP, "triton", "no Triton encoder kernel; the reference serves it")
    elif forced == "cuda" or (forced is None and x.is_cuda):
        why = why_not(x, weights, biases, activation, out_dtype, indices)
        if not why and not forced and _needs_grad(x, *weights, *biases):
            why = "gradient needed (fused forward + reference recompute = two forwards)"
        if not why:
            _backend.served(OP, "cuda")
            return _FusedEncoderMLP.apply(x, indices, activation, out_dtype, len(weights), *weights, *biases)
        if forced:
            raise _backend.BackendUnavailable(f"{_backend.ENV_VAR}=cuda: fused {OP} cannot run this call: {why}")
        _backend.fallback(OP, "cuda", why)
    _backend.served(OP, "reference")
    return _reference(x, weights, biases, activation, out_dtype, indices)
