"""Pure-PyTorch oracles: the semantics every kernel of ptune_fast must reproduce.

Readable first, fast never. Tests compare the Triton and CUDA kernels against these functions
run in fp32/fp64. Nothing here is on a hot path of a patched model except on CPU, where the
reference *is* the backend.

Layouts
-------
* ``q``            ``[B, H, S, D]``   queries of the S new tokens of every row.
* ``k``, ``v``     ``[B, Hkv, T, D]`` the sequence's own keys/values (earlier cache + the S new
  tokens, so ``T >= S``); ``H % Hkv == 0`` (GQA/MQA: query head ``h`` reads KV head
  ``h // (H // Hkv)``).
* ``prefix_k/v``   ``[Hkv, P, D]``     one prefix shared by every row, or
                   ``[N, Hkv, P, D]``  a bank of N task prefixes, with ``task_ids`` ``[B]`` (int)
                   naming the bank entry of each row.
* ``key_padding_mask`` ``[B, T]`` bool, True = real token (HF's 2-D ``attention_mask`` over
  the sequence keys; the prefix is never masked).

Causal alignment is bottom-right: query ``i`` sits at sequence position ``T - S + i`` and sees
every prefix column plus sequence keys ``0 .. T - S + i``. For P = 2, T = 4, S = 2::

              prefix | sequence
              p0 p1  | t0 t1 t2 t3
    q0 (t2)    x  x  |  x  x  x  .
    q1 (t3)    x  x  |  x  x  x  x

A query row with no visible key at all (possible only when P = 0 and padding hides every
visible key) outputs zeros and has ``lse = -inf`` (FlashAttention's convention).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "prefix_attention",
    "expand_prefix",
    "naive_prefix_attention",
    "encoder_mlp",
    "prefix_encoder",
    "prompt_encoder_mlp",
    "prompt_encoder_lstm",
    "split_prefix",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_prefix(
    prefix: torch.Tensor, batch: int, task_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-row view ``[B, Hkv, P, D]`` of a shared ``[Hkv, P, D]`` prefix or a bank + task_ids."""
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, -1, -1, -1)
    if task_ids is None:
        raise ValueError("task_ids is required when the prefix is a bank [N, Hkv, P, D]")
    return prefix.index_select(0, task_ids.long())


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
    return_lse: bool = False,
):
    """Attention of ``q [B,H,S,D]`` over ``[prefix ; k/v]`` (see the module docstring).

    Computed in fp32 (fp64 for fp64 inputs), returned in ``q.dtype``. Returns ``out [B,H,S,D]``,
    or ``(out, lse [B,H,S] fp32)`` with ``return_lse``. ``dropout_p`` drops attention
    probabilities after the softmax (training only; the caller passes 0 in eval).
    """
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    rep = H // Hkv
    cdt = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    qf = q.to(cdt)
    kf = k.to(cdt).repeat_interleave(rep, dim=1)
    vf = v.to(cdt).repeat_interleave(rep, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B,H,S,T]

    visible = torch.ones(S, T, dtype=torch.bool, device=q.device)
    if causal:
        qpos = torch.arange(S, device=q.device)[:, None] + (T - S)
        visible = torch.arange(T, device=q.device)[None, :] <= qpos
    visible = visible[None, None].expand(B, 1, S, T)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))

    if prefix_k is not None and prefix_k.shape[-2] > 0:
        pk = expand_prefix(prefix_k, B, task_ids).to(cdt).repeat_interleave(rep, dim=1)
        pv = expand_prefix(prefix_v, B, task_ids).to(cdt).repeat_interleave(rep, dim=1)
        pscores = torch.matmul(qf, pk.transpose(-1, -2)) * scale  # [B,H,S,P]
        scores = torch.cat([pscores, scores], dim=-1)
        values = torch.cat([pv, vf], dim=-2)
    else:
        values = vf

    lse = torch.logsumexp(scores, dim=-1)  # -inf on fully masked rows
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])  # exactly 0 on masked columns
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, values).to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out


def naive_prefix_attention(
    q, k, v, prefix_k=None, prefix_v=None, task_ids=None, key_padding_mask=None,
    causal=True, scale=None,
):
    """What PEFT does: expand the prefix over the batch, ``torch.cat`` it onto K/V, prepend
    ``P`` ones to the padding mask, and run SDPA with an explicit bottom-right mask.

    An independent implementation used to cross-check :func:`prefix_attention` (property
    tests) and as the PEFT-path baseline in benchmarks.
    """
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    if P:
        k = torch.cat([expand_prefix(prefix_k, B, task_ids), k], dim=2)
        v = torch.cat([expand_prefix(prefix_v, B, task_ids), v], dim=2)
    rep = H // Hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    mask = torch.ones(B, 1, S, P + T, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(P + T, device=q.device)[None, :]
        mask = mask & (j < P + T - S + i + 1)[None, None]
    if key_padding_mask is not None:
        pad = torch.cat(
            [torch.ones(B, P, dtype=torch.bool, device=q.device), key_padding_mask.bool()], dim=1
        )
        mask = mask & pad[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    empty = ~mask.any(-1, keepdim=True)  # SDPA gives NaN there; our convention is 0
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------- encoders


def encoder_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    activation: str,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x [n, d_in]`` through ``Linear (act Linear)*``: the activation (``"tanh"`` or
    ``"relu"``) sits between layers, not after the last. fp32 math, output in ``out_dtype``.

    Prefix tuning's projection is ``Linear-Tanh-Linear``; P-tuning's MLP head is
    ``Linear-ReLU-Linear-ReLU-Linear``.
    """
    if activation not in ("tanh", "relu"):
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    act = torch.tanh if activation == "tanh" else torch.relu
    h = x.float()
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w.float(), None if b is None else b.float())
        if i < len(weights) - 1:
            h = act(h)
    return h.to(out_dtype or x.dtype)


def prefix_encoder(embedding_weight, transform_weights=None, transform_biases=None):
    """Prefix tuning / P-Tuning v2 encoder output ``[P, 2 * L * Hkv * D]``.

    Without projection (P-Tuning v2) the embedding table *is* the output; with projection
    (prefix tuning) it goes through ``Linear-Tanh-Linear``.
    """
    if transform_weights is None:
        return embedding_weight
    return encoder_mlp(embedding_weight, transform_weights, transform_biases, "tanh")


def prompt_encoder_mlp(embedding_weight, weights, biases):
    """P-tuning MLP head: ``[n, d] -> Linear-ReLU-Linear-ReLU-Linear -> [n, d]``."""
    return encoder_mlp(embedding_weight, weights, biases, "relu")


def prompt_encoder_lstm(embedding_weight, lstm: torch.nn.LSTM, weights, biases):
    """P-tuning LSTM head: biLSTM over the n virtual tokens (one sequence), then
    ``Linear-ReLU-Linear``."""
    h = lstm(embedding_weight.unsqueeze(0))[0].squeeze(0)
    return encoder_mlp(h, weights, biases, "relu", out_dtype=h.dtype)


def split_prefix(
    encoded: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's prefix layout: ``[P, 2*L*Hkv*D]`` viewed ``(P, 2L, Hkv, D)``; layer ``i`` takes
    index ``2i`` as K and ``2i+1`` as V. Returns ``(keys, values)`` each ``[L, Hkv, P, D]``."""
    P = encoded.shape[0]
    x = encoded.view(P, 2 * num_layers, num_kv_heads, head_dim).permute(1, 2, 0, 3)
    return x[0::2], x[1::2]
