"""``sdpa`` backend of prefix_attention: PyTorch's fused SDPA over ``[prefix ; k/v]``.

The fast path where no custom kernel runs (CPU, or a CUDA call Triton cannot serve): it
broadcasts the prefix over the batch and concatenates it onto K/V *inside this call* (the
copies live for the call and its backward only; the model never holds them), builds one
boolean mask (prefix always visible, bottom-right causal, key padding) and lets
``F.scaled_dot_product_attention`` (fused, native autograd, GQA without ``repeat_kv``) do the
rest. Same semantics as :func:`ptune_fast.reference.prefix_attention`, including zeros for rows
with no visible key and NaN rows (zero gradients) for out-of-range bank ids (gathered as entry 0,
then poisoned: no host sync).

Bank gradients come from autograd's ``index_select`` backward (``index_add_``): sequential on
CPU; on CUDA it uses atomics, so the bank gradient is not bitwise reproducible there unless
``torch.use_deterministic_algorithms(True)`` is on (the Triton backward, which serves fp16/bf16
training on CUDA, sums the bank gradient in row order on both of its paths; its dQ is atomic
unless that same switch is on).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptune_fast.reference import poison_rows, task_rows


def why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p) -> str:
    return ""


def plan(is_cuda: bool, dtype: torch.dtype, gqa: bool, causal: bool, S: int, T: int, has_mask: bool) -> tuple:
    """``(mask_kind, repeat_kv)`` for one call. On CUDA, PyTorch's fused SDPA kernels take GQA
    (``enable_gqa``) only without an explicit mask (flash) and explicit masks only without GQA
    (memory-efficient); a bool mask with ``enable_gqa=True`` runs the math kernel (the full score
    matrix). So on CUDA:

    * no padding mask, causal with ``T >= S``: ``[prefix ; sequence]`` bottom-right causal is
      exactly torch's lower-right causal bias over ``P + T`` keys (``"lower_right"``): flash for
      fp16/bf16 with GQA; fp32 (no flash) repeats K/V so that memory-efficient attention serves it;
    * a padding mask (or a causal call with ``T < S``): a bool mask (``"bool"``) with K/V repeated
      to ``H`` heads under GQA (memory-efficient attention);
    * neither: no mask (``"none"``), flash / memory-efficient.

    On CPU a bool mask with ``enable_gqa`` is served by PyTorch's CPU kernels (no repeat)."""
    lower_right = causal and S > 1 and T >= S and not has_mask
    kind = "lower_right" if (lower_right and is_cuda) else ("bool" if has_mask or (causal and S > 1) else "none")
    repeat = is_cuda and gqa and (kind == "bool" or (kind == "lower_right" and dtype == torch.float32))
    return kind, repeat


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    B, Hkv, L, D = x.shape
    return x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)


def run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p):
    B, H, S, D = q.shape
    T = k.shape[2]
    dev = q.device
    kind, repeat = plan(q.is_cuda, q.dtype, k.shape[1] != H, causal, S, T, key_padding_mask is not None)
    visible = None
    if kind == "bool" and causal and S > 1:
        i = torch.arange(S, device=dev)[:, None]
        j = torch.arange(T, device=dev)[None, :]
        visible = (j <= i + (T - S)).view(1, 1, S, T)
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool).view(B, 1, 1, T)
        visible = pad if visible is None else visible & pad
    empty_rows = ok = None
    if prefix_k is not None and prefix_k.shape[-2] == 0:
        prefix_k = prefix_v = task_ids = None
    P = 0
    if prefix_k is not None:
        P = prefix_k.shape[-2]
        if prefix_k.dim() == 3:
            pk = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
            pv = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
        else:
            idx, ok = task_rows(task_ids, prefix_k.shape[0])
            pk, pv = prefix_k.index_select(0, idx), prefix_v.index_select(0, idx)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        if visible is not None:
            visible = torch.cat(
                [torch.ones(visible.shape[0], 1, visible.shape[2], P, dtype=torch.bool, device=dev),
                 visible.expand(visible.shape[0], 1, visible.shape[2], T)], dim=-1)
    elif visible is not None:
        # rows with no visible key (padding only, P = 0): attend to everything, then zero them
        empty_rows = ~visible.any(dim=-1, keepdim=True)
        visible = visible | empty_rows
    if kind == "lower_right":
        from torch.nn.attention.bias import causal_lower_right

        visible = causal_lower_right(S, P + T)
    gqa = k.shape[1] != H
    if repeat:
        k, v, gqa = _repeat_kv(k, H // k.shape[1]), _repeat_kv(v, H // v.shape[1]), False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=gqa)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows.expand(B, 1, S, 1), 0.0)
    return poison_rows(out, ok)
