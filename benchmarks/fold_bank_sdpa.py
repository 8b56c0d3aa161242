"""The SDPA diagnostic of :mod:`benchmarks.fold_bank_report` (``--sdpa-diagnostic``): ptune_fast's
model with its attention op swapped, for the timed call only, for a PEFT-style path on the same
inputs (expand the prefix per row, ``cat`` it onto K/V, ``torch.nn.functional.scaled_dot_product_attention``
with an explicit mask). Not what ptune_fast ships: it separates what the token savings buy from
what the attention backend costs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def sdpa_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, task_ids=None, key_padding_mask=None,
                          causal=True, scale=None, dropout_p=0.0):
    """PEFT's way on ptune_fast's inputs: the prefix expanded (bank: gathered) per row and
    ``cat``-ed onto K/V, KV heads repeated, SDPA with a bottom-right causal mask. ``q [B,H,S,D]``,
    ``k/v [B,Hkv,T,D]``, prefix ``[Hkv,P,D]`` or ``[N,Hkv,P,D]`` + ``task_ids``; returns ``[B,H,S,D]``."""
    from ptune_fast.reference import expand_prefix

    B, H, S, _ = q.shape
    Hkv = k.shape[1]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    if P:
        k = torch.cat([expand_prefix(prefix_k, B, task_ids).to(k.dtype), k], dim=2)
        v = torch.cat([expand_prefix(prefix_v, B, task_ids).to(v.dtype), v], dim=2)
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    T = k.shape[2]
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    if key_padding_mask is None and (not causal or T == S):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and S > 1, scale=scale, dropout_p=dropout_p)
    mask = torch.ones(S, T, dtype=torch.bool, device=q.device)
    if causal:
        mask = torch.arange(T, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None] + (T - S)
    mask = mask[None, None]
    if key_padding_mask is not None:
        pad = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device), key_padding_mask.bool()], dim=1)
        mask = mask & pad[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


@contextlib.contextmanager
def sdpa_attention():
    """Swap the op behind ptune_fast's registered attention function (restored on exit)."""
    from ptune_fast.integrations import attention as A

    prev = A.prefix_attention
    A.prefix_attention = sdpa_prefix_attention
    try:
        yield
    finally:
        A.prefix_attention = prev


def with_sdpa(fn):
    def run():
        with sdpa_attention():
            return fn()

    return run
