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
training on CUDA, is deterministic either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptune_fast.reference import poison_rows, task_rows


def why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p) -> str:
    return ""


def run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p):
    B, H, S, D = q.shape
    T = k.shape[2]
    dev = q.device
    visible = None
    if causal and S > 1:
        i = torch.arange(S, device=dev)[:, None]
        j = torch.arange(T, device=dev)[None, :]
        visible = (j <= i + (T - S)).view(1, 1, S, T)
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool).view(B, 1, 1, T)
        visible = pad if visible is None else visible & pad
    empty_rows = ok = None
    if prefix_k is not None and prefix_k.shape[-2] == 0:
        prefix_k = prefix_v = task_ids = None
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
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, dropout_p=dropout_p, scale=scale, enable_gqa=k.shape[1] != H
    )
    if empty_rows is not None:
        out = out.masked_fill(empty_rows.expand(B, 1, S, 1), 0.0)
    return poison_rows(out, ok)
