"""``prefix_attention``: attention over ``[shared prefix ; sequence]`` without expanding or
concatenating the prefix. Public op, input checks and backend dispatch.

Backends (see :mod:`ptune_fast._backend`):

* ``cuda``      -- ``ptune_fast._C`` decode kernel (1..8 query tokens, no autograd, fp16/bf16);
* ``triton``    -- fused flash-attention forward/backward (``_prefix_attention_triton``);
* ``reference`` -- :func:`ptune_fast.reference.prefix_attention`.

Semantics, layouts and the causal alignment are those of the reference: ``q [B,H,S,D]``,
``k/v [B,Hkv,T,D]``, ``prefix_k/v [Hkv,P,D]`` (shared) or ``[N,Hkv,P,D]`` + ``task_ids [B]``,
``key_padding_mask [B,T]`` (True = keep). Returns ``out [B,H,S,D]`` in ``q.dtype``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ptune_fast import _backend, reference

OP = "prefix_attention"


def check_inputs(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, dropout_p):
    """Validate shapes/dtypes; raise ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ([B, H, S, D] / [B, Hkv, T, D]), got shape {tuple(t.shape)}")
    B, H, S, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, T, D={D}], got {tuple(k.shape)}")
    Hkv, T = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if S < 1:
        raise ValueError(f"q must hold at least one query (S >= 1), got S={S}")
    if causal and T < S:
        raise ValueError(f"causal attention needs T >= S (k holds the cache + the new tokens), got T={T}, S={S}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is not None:
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
            )
        if prefix_k.dim() not in (3, 4) or prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D:
            raise ValueError(
                f"prefix_k must be [Hkv={Hkv}, P, D={D}] (shared) or [N, Hkv={Hkv}, P, D={D}] (bank), "
                f"got {tuple(prefix_k.shape)}"
            )
        if prefix_k.dtype != q.dtype or prefix_v.dtype != q.dtype:
            raise TypeError(f"prefix_k/prefix_v dtype must equal q's ({q.dtype}), got {prefix_k.dtype}")
        if prefix_k.dim() == 4:
            if task_ids is None:
                raise ValueError("task_ids [B] is required when prefix_k is a bank [N, Hkv, P, D]")
            if task_ids.shape != (B,) or task_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"task_ids must be an int32/int64 tensor of shape [B={B}], got {task_ids.dtype} {tuple(task_ids.shape)}"
                )
        elif task_ids is not None:
            raise ValueError("task_ids is only meaningful with a prefix bank [N, Hkv, P, D]")
    elif task_ids is not None:
        raise ValueError("task_ids given without a prefix")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, T):
        raise ValueError(f"key_padding_mask must be [B={B}, T={T}] (True = real token), got {tuple(key_padding_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor] = None,
    prefix_v: Optional[torch.Tensor] = None,
    task_ids: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of ``q`` over ``[prefix ; k/v]``; see :mod:`ptune_fast.reference` for the
    exact semantics (bottom-right causal alignment, prefix always visible, GQA, padding)."""
    check_inputs(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, dropout_p)
    if prefix_k is not None and prefix_k.shape[-2] == 0:
        prefix_k = prefix_v = task_ids = None
    args = (q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p)
    forced = _backend.forced_backend()
    order = [forced] if forced else (["cuda", "triton", "reference"] if q.is_cuda else ["reference"])
    for backend in order:
        why = _BACKENDS[backend][0](*args)
        if why:
            if forced:
                raise _backend.BackendUnavailable(f"{_backend.ENV_VAR}={forced}: {OP} cannot run this call: {why}")
            _backend.fallback(OP, backend, why)
            continue
        _backend.served(OP, backend)
        return _BACKENDS[backend][1](*args)
    raise AssertionError("the reference backend serves every call")  # pragma: no cover


# ------------------------------------------------------------------------------ backends
# Each backend is (why_not(*args) -> "" | reason, run(*args) -> out).


def _reference_why_not(*args) -> str:
    return ""


def _reference_run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p):
    return reference.prefix_attention(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p
    )


def _triton_why_not(*args) -> str:
    ok, why = _backend.triton_importable()
    if not ok:
        return why
    from ptune_fast.ops import _prefix_attention_triton as tri

    return tri.why_not(*args)


def _triton_run(*args):
    from ptune_fast.ops import _prefix_attention_triton as tri

    return tri.run(*args)


def _cuda_why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p) -> str:
    ext, why = _backend.cuda_extension()
    if ext is None:
        return why
    from ptune_fast.ops import decode_attention as dec

    return dec.why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p)


def _cuda_run(*args):
    from ptune_fast.ops import decode_attention as dec

    return dec.run(*args)


_BACKENDS = {
    "reference": (_reference_why_not, _reference_run),
    "triton": (_triton_why_not, _triton_run),
    "cuda": (_cuda_why_not, _cuda_run),
}
