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

A bank row whose ``task_ids`` entry lies outside ``[0, N)`` outputs NaN (and ``lse = NaN``); its
gradients are 0 (it contributes nothing to the bank, nor to q/k/v). Every backend does this
without a host sync (raising would need one on CUDA). A ``P = 0`` prefix is no prefix: its
``task_ids`` are not looked at.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "prefix_attention",
    "check_prefix_attention_inputs",
    "task_rows",
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


def check_prefix_attention_inputs(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, dropout_p):
    """Validate the arguments of ``prefix_attention`` (every backend, and ``decode_attention``):
    raise ValueError/TypeError naming the argument and the expected shape."""
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


def task_rows(task_ids: torch.Tensor, n_tasks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, ok)``: ``task_ids`` as int64 with out-of-range entries replaced by 0 (safe to
    gather with), and ``ok [B]`` bool, False where the id was outside ``[0, n_tasks)``. No host sync."""
    ids = task_ids.long()
    ok = (ids >= 0) & (ids < n_tasks)
    return torch.where(ok, ids, torch.zeros_like(ids)), ok


def poison_rows(out: torch.Tensor, ok: Optional[torch.Tensor]) -> torch.Tensor:
    """NaN on the rows ``b`` (dim 0) where ``ok[b]`` is False; the gradient there is 0."""
    if ok is None:
        return out
    return torch.where(ok.view((-1,) + (1,) * (out.dim() - 1)), out, torch.full_like(out, float("nan")))


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

    ok = None
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        if prefix_k.dim() == 4:
            task_ids, ok = task_rows(task_ids, prefix_k.shape[0])
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
    out = poison_rows(torch.matmul(probs, values).to(q.dtype), ok)
    if return_lse:
        return out, poison_rows(lse.float(), ok)
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
    ``"relu"``) sits between layers, not after the last. fp32 math (fp64 for fp64 inputs), output
    in ``out_dtype``.

    Prefix tuning's projection is ``Linear-Tanh-Linear``; P-tuning's MLP head is
    ``Linear-ReLU-Linear-ReLU-Linear``.
    """
    if activation not in ("tanh", "relu"):
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    act = torch.tanh if activation == "tanh" else torch.relu
    # fp32 math, or fp64 when the encoder was moved to float64 (model.to(torch.float64))
    cd = torch.float64 if torch.float64 in (x.dtype, *(w.dtype for w in weights)) else torch.float32
    h = x.to(cd)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w.to(cd), None if b is None else b.to(cd))
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
