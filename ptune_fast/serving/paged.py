"""The attention function continuous batching calls: per-request prefixes over a packed batch.

transformers' continuous batching (``transformers.generation.continuous_batching``) packs every
scheduled request's new tokens into one sequence ``[1, sum(q_r)]`` and hands the attention
function the request boundaries as ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (cumulative lengths;
the keys of request ``r`` are its paged-cache past followed by its new tokens). The prefix never
enters the paged cache: :func:`paged_prefix_attention` regroups the packed queries and keys per
request (left-padded, so the kernels' bottom-right causal alignment holds), and attends each row
to its task's prefix from the bank (``[N, Hkv, P, D]``, ``task_ids [R]``) with
:func:`ptune_fast.ops.prefix_attention`, then packs the output back.

Which request belongs to which task is per-batch data: :class:`BatchTasks`, set by the serving
manager around each forward in the generation thread (thread-local, never shared state).

Two transformers behaviours, detected from the installed release (:func:`cache_style`):

* ``"layer"`` (5.24): the attention *module* writes/reads the paged cache
  (``PagedAttentionCache.update(..., kwargs=...)``) before calling the attention function, and
  continuous batching accepts only ``sdpa``, ``paged|eager`` or flash implementations at start;
  we register :data:`NAME` and switch the model to it once the manager has been created.
* ``"function"`` (5.17): the paged attention *function* updates the cache (as ``paged|sdpa``
  does, ``update(key, value, layer_idx, read_index, write_index)``); continuous batching prefixes
  the model's implementation with ``paged|``, so we register :data:`PREFIXED_NAME`.
"""
from __future__ import annotations

import functools
import inspect
import threading
from typing import List, Optional

import torch

from ptune_fast.ops.prefix_attention import prefix_attention

NAME = "ptune_fast_paged"
PREFIXED_NAME = "paged|ptune_fast"

_local = threading.local()
_registered = False


@functools.lru_cache(maxsize=None)
def cache_style() -> str:
    """``"layer"`` or ``"function"``: who updates the paged cache in the installed transformers."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    params = inspect.signature(PagedAttentionCache.update).parameters
    if "kwargs" in params and "read_index" not in params:
        return "layer"
    if "read_index" in params and "write_index" in params:
        return "function"
    raise RuntimeError(
        "ptune_fast cannot serve this transformers release through continuous batching: "
        f"PagedAttentionCache.update{inspect.signature(PagedAttentionCache.update)} is neither the 5.24 "
        "(module updates the cache) nor the 5.17 (attention function updates it) interface")


def implementation_name() -> str:
    """The attention implementation the model runs under while it serves continuous batching."""
    return NAME if cache_style() == "layer" else PREFIXED_NAME


class BatchTasks:
    """Per-forward data of one continuous-batching step: the task index of each request, in the
    order the requests were packed, and the gather layout (computed once, reused by every layer)."""

    def __init__(self, task_ids: Optional[torch.Tensor], num_requests: int):
        self.task_ids = task_ids  # int32 [R] on the model's device, or None (single-task bank)
        self.num_requests = num_requests
        self._layout = None

    def layout(self, cu_q: torch.Tensor, cu_k: torch.Tensor, device):
        if self._layout is None:
            self._layout = _Layout(cu_q.tolist(), cu_k.tolist(), self.num_requests, device)
        return self._layout


class _Layout:
    """Gather indices from the packed ``[sum q_r]`` / ``[sum k_r]`` tokens to left-padded
    ``[R, S]`` / ``[R, T]`` rows, and back."""

    def __init__(self, cu_q: List[int], cu_k: List[int], R: int, device):
        if len(cu_q) < R + 1 or len(cu_k) < R + 1:
            raise RuntimeError(f"continuous batching passed {len(cu_q) - 1} sequences for {R} requests")
        q_lens = [cu_q[r + 1] - cu_q[r] for r in range(R)]
        k_lens = [cu_k[r + 1] - cu_k[r] for r in range(R)]
        if any(q < 1 or k < q for q, k in zip(q_lens, k_lens)):
            raise RuntimeError(f"unexpected continuous-batching lengths: queries {q_lens}, keys {k_lens}")
        self.R, self.S, self.T = R, max(q_lens), max(k_lens)
        self.total_q = cu_q[R]
        q_idx, k_idx, kpm, real = [], [], [], []
        for r in range(R):
            pad_q, pad_k = self.S - q_lens[r], self.T - k_lens[r]
            q_idx += [cu_q[r]] * pad_q + list(range(cu_q[r], cu_q[r + 1]))
            k_idx += [cu_k[r]] * pad_k + list(range(cu_k[r], cu_k[r + 1]))
            kpm += [False] * pad_k + [True] * k_lens[r]
            real += list(range(r * self.S + pad_q, (r + 1) * self.S))
        self.q_index = torch.tensor(q_idx, dtype=torch.long, device=device)
        self.k_index = torch.tensor(k_idx, dtype=torch.long, device=device)
        self.key_padding_mask = torch.tensor(kpm, dtype=torch.bool, device=device).view(R, self.T)
        self.real = torch.tensor(real, dtype=torch.long, device=device)  # row-major slots, packed order


def _rows(x: torch.Tensor, index: torch.Tensor, R: int, L: int) -> torch.Tensor:
    """``[1, H, tokens, D]`` packed -> ``[R, H, L, D]`` rows."""
    H, D = x.shape[1], x.shape[3]
    return x[0].index_select(1, index).view(H, R, L, D).transpose(0, 1)


def paged_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention interface entry for continuous batching; returns ``(out [1, sum q_r, H, D], None)``."""
    batch: Optional[BatchTasks] = getattr(_local, "batch", None)
    if batch is None:
        raise RuntimeError(
            f"the {implementation_name()!r} attention only runs inside ptune_fast's continuous batching "
            "(ptune_fast.serving.TaskBatchingManager); this model is switched to it while the manager serves")
    cache = kwargs.pop("cache", None)
    if cache_style() == "function":  # 5.17: the paged attention function updates the cache
        if cache is None:
            raise RuntimeError("continuous batching called the paged attention without its PagedAttentionCache")
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                                  read_index=kwargs["read_index"], write_index=kwargs["write_index"])
        key, value = key.transpose(0, 1).unsqueeze(0), value.transpose(0, 1).unsqueeze(0)
    if kwargs.get("block_table") is not None:
        raise RuntimeError("ptune_fast's continuous batching does not use the block-table decode path "
                           "(max_blocks_per_request must be 0)")
    cu_k = kwargs["cu_seq_lens_k"]
    if isinstance(cu_k, dict):
        if set(cu_k) != {"full_attention"}:
            raise NotImplementedError(f"ptune_fast serves full-attention layers only, got layer types {sorted(cu_k)}")
        cu_k = cu_k["full_attention"]
    layout = batch.layout(kwargs["cu_seq_lens_q"], cu_k, query.device)
    state = getattr(module, "_ptune_fast_state", None)
    layer = state.layer(getattr(module, "layer_idx", None)) if state is not None else None
    if layer is None:
        raise RuntimeError("continuous batching reached an attention module without the bank's prefix")
    pk, pv, _ = layer
    if pk.dtype != query.dtype:
        pk, pv = pk.to(query.dtype), pv.to(query.dtype)
    R, S, T = layout.R, layout.S, layout.T
    q = _rows(query, layout.q_index, R, S)
    k = _rows(key, layout.k_index, R, T)
    v = _rows(value, layout.k_index, R, T)
    out = prefix_attention(q, k, v, pk, pv, batch.task_ids if pk.dim() == 4 else None,
                           key_padding_mask=layout.key_padding_mask, causal=True, scale=scaling,
                           dropout_p=0.0, out_layout="bshd")  # [R, S, H, D]
    H, D = out.shape[2], out.shape[3]
    packed = out.reshape(R * S, H, D).index_select(0, layout.real)
    if packed.shape[0] != query.shape[2]:  # padded query slots (none without CUDA graphs): zeros
        full = packed.new_zeros(query.shape[2], H, D)
        full[: packed.shape[0]] = packed
        packed = full
    return packed.unsqueeze(0), None


def paged_mask(*args, **kwargs):
    """``AttentionMaskInterface`` entry: no mask (the attention function derives causality and
    request boundaries from ``cu_seq_lens_*``)."""
    return None


def register() -> str:
    """Register the paged function under the name the installed transformers needs (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        from ptune_fast.integrations import attention as _attention

        _attention.register()  # "ptune_fast" itself (5.17 validates the base of "paged|ptune_fast")
        for name in (NAME, PREFIXED_NAME):
            AttentionInterface.register(name, paged_prefix_attention)
            AttentionMaskInterface.register(name, paged_mask)
        _registered = True
    return implementation_name()


def set_batch(batch: Optional[BatchTasks]) -> None:
    _local.batch = batch
