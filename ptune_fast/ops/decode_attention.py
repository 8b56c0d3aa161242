"""``decode_attention``: the compiled CUDA decode kernel (``ptune_fast._C``) behind the ``cuda``
backend of :func:`ptune_fast.ops.prefix_attention.prefix_attention`.

For 1..8 new query tokens per row over ``[prefix ; KV cache]`` (flash-decoding: the keys are
split across thread blocks, each block computes a partial softmax, a second kernel combines
them). One block serves all ``H / Hkv`` query heads x ``S`` queries of a KV head, so a K/V
tile is read once for all of them (GQA); the prefix is read in place (shared ``[Hkv, P, D]``
or bank ``[N, Hkv, P, D]`` + ``task_ids``), never copied per row. fp16/bf16 in, fp32 math.

Layouts and semantics are those of :func:`ptune_fast.reference.prefix_attention`:

* ``q [B, H, S, D]`` (any strides), ``k/v [B, Hkv, T, D]`` (last dim contiguous; others are
  copied first), ``D`` in {64, 80, 96, 128}, ``S <= 8``, ``T >= S`` when causal;
* ``key_padding_mask [B, T]`` bool/uint8/int (nonzero = keep), checked per key: left
  padding and ragged rows are fine; the prefix is never masked;
* causal is bottom-right: query ``i`` sees every prefix key and cache keys ``0 .. T-S+i``::

                  prefix | cache
                  p0 p1  | t0 t1 t2 t3         (P = 2, T = 4, S = 2)
        q0 (t2)    x  x  |  x  x  x  .
        q1 (t3)    x  x  |  x  x  x  x

* rows with no visible key output 0; a ``task_ids`` entry outside ``[0, N)`` gives a NaN row
  (the kernel cannot raise).

No autograd: :func:`why_not` refuses calls that need gradients (the Triton / reference
backends serve those).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ptune_fast import _backend, reference

__all__ = ["decode_attention", "why_not", "run", "HEAD_DIMS", "MAX_QUERIES", "DTYPES"]

OP = "decode_attention"
HEAD_DIMS = (64, 80, 96, 128)
MAX_QUERIES = 8
DTYPES = (torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)


# ------------------------------------------------------------------ extension + fake impls


@functools.lru_cache(maxsize=None)
def _load_ops() -> bool:
    """Import ``ptune_fast._C`` (registers ``torch.ops.ptune_fast_C``) and the fake impls."""
    try:
        from ptune_fast import _C  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or OSError for a broken build
        return False

    @torch.library.register_fake("ptune_fast_C::decode_attention")
    def _decode_attention_fake(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, num_splits=0):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    return True


@functools.lru_cache(maxsize=None)
def _device_why_not(device_index: int) -> str:
    """'' when ``ptune_fast._C`` has machine code (or PTX) for this device, else a reason."""
    ext, why = _backend.cuda_extension()
    if ext is None:
        return why
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return f"the CUDA kernels need compute capability >= 8.0, device {device_index} is {major}.{minor}"
    try:
        archs = list(ext.built_archs())
    except Exception:  # noqa: BLE001 - an old build without built_archs(): let the launch decide
        return ""
    for entry in archs:
        text = entry.strip().lower()
        ptx = text.endswith("+ptx")
        try:
            a_major, a_minor = (int(x) for x in text.replace("+ptx", "").split(".")[:2])
        except ValueError:
            return ""  # unparseable ("unknown", "native", ...): let the launch decide
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return ""
    return f"ptune_fast._C was built for {';'.join(archs)}, not for compute capability {major}.{minor}"


def device_why_not(device: torch.device) -> str:
    """Shared with :mod:`ptune_fast.ops.prompt_encoder`: can the extension run on ``device``?"""
    if not _load_ops():
        return _backend.cuda_extension()[1] or "ptune_fast._C is not built"
    if device.type != "cuda":
        return f"tensors are on {device.type}, not CUDA"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_why_not(index)


# ------------------------------------------------------------------ backend protocol


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p) -> str:
    """``""`` when the decode kernel can serve this (already validated) call, else the reason."""
    why = device_why_not(q.device)
    if why:
        return why
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v),
                    ("task_ids", task_ids), ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != q.device:
            return f"{name} is on {t.device}, q on {q.device}"
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p} (the decode kernel has no dropout)"
    if _needs_grad(q, k, v, prefix_k, prefix_v):
        return "an input requires grad (the decode kernel has no backward)"
    S, D = q.shape[2], q.shape[3]
    if S > MAX_QUERIES:
        return f"S={S} new tokens; the decode kernel serves 1..{MAX_QUERIES}"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}; the decode kernel serves float16/bfloat16"
    if D not in HEAD_DIMS:
        return f"head dim {D}; the decode kernel serves {HEAD_DIMS}"
    return ""


def _vec_ready(t: torch.Tensor) -> torch.Tensor:
    """k / v / prefix: last dim contiguous, other strides multiples of 8 elements, 16-byte
    aligned start (the caching allocator aligns storages; a view's offset may not be)."""
    ok = t.stride(-1) == 1 and t.storage_offset() % 8 == 0 and all(
        st % 8 == 0 or sz == 1 for st, sz in zip(t.stride()[:-1], t.shape[:-1])
    )
    if ok:
        return t
    t = t.contiguous()
    return t if t.storage_offset() % 8 == 0 else t.clone()


def _mask_ready(m: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if m is None or m.dtype in _MASK_DTYPES:
        return m
    return m != 0


def run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p, num_splits: int = 0):
    """Launch the kernel (call :func:`why_not` first). Returns ``out [B, H, S, D]`` (contiguous)."""
    if not _load_ops():  # pragma: no cover - why_not said yes
        raise _backend.BackendUnavailable("ptune_fast._C is not built")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if prefix_k is None or prefix_k.shape[-2] == 0:
        pk = pv = tids = None
    else:
        pk, pv = _vec_ready(prefix_k), _vec_ready(prefix_v)
        tids = task_ids.contiguous() if (prefix_k.dim() == 4 and task_ids is not None) else None
    return torch.ops.ptune_fast_C.decode_attention(
        q, _vec_ready(k), _vec_ready(v), pk, pv, tids, _mask_ready(key_padding_mask),
        bool(causal), scale, int(num_splits),
    )


# ------------------------------------------------------------------ public op


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor] = None,
    prefix_v: Optional[torch.Tensor] = None,
    task_ids: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    *,
    num_splits: int = 0,
) -> torch.Tensor:
    """Attention of ``q [B, H, S<=8, D]`` over ``[prefix ; k/v [B, Hkv, T, D]]`` with the CUDA
    decode kernel, whatever ``PTUNE_FAST_BACKEND`` says. Returns ``out [B, H, S, D]`` in
    ``q.dtype``; semantics of :func:`ptune_fast.reference.prefix_attention` (no dropout).

    ``num_splits``: key-range splits (0 = heuristic from the SM count; tests force 1 or more).
    Raises :class:`ptune_fast._backend.BackendUnavailable` (with the reason) when the kernel
    cannot run the call: extension not built, not CUDA, grad needed, S > 8, dtype, head dim.
    """
    reference.check_prefix_attention_inputs(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, 0.0)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    if prefix_k is not None and prefix_k.shape[-2] == 0:
        prefix_k = prefix_v = task_ids = None
    why = why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, 0.0)
    if why:
        raise _backend.BackendUnavailable(f"{OP}: the CUDA decode kernel cannot run this call: {why}")
    _backend.served(OP, "cuda")
    return run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, 0.0, num_splits)
