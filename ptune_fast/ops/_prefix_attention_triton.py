"""Triton kernels for :func:`ptune_fast.ops.prefix_attention` (flash-attention style).

Forward: one launch, grid ``(cdiv(S, BLOCK_M), B * H)``. Each program keeps an online softmax
over the prefix blocks (read straight from ``prefix_k/v [Hkv, P, D]`` or the bank row
``[task_ids[b], Hkv, P, D]``, never expanded nor concatenated) and then over the sequence
blocks of ``k/v [B, Hkv, T, D]`` (bottom-right causal limit, key padding mask). GQA maps query
head ``h`` to kv head ``h // (H // Hkv)`` in the kernel. Writes ``out`` and ``lse`` (natural
log, fp32, ``-inf`` on rows with no visible key, whose output is 0).

Backward (FlashAttention-2 split, no atomics, deterministic):

1. ``_bwd_pre``: ``delta = rowsum(dO * O)`` in fp32;
2. ``_bwd_dkv``: grid ``(cdiv(P, BLOCK_N) + cdiv(T, BLOCK_N), B * Hkv)``; a program owns one
   key block and loops over the ``H // Hkv`` query heads of its group and the query blocks.
   Sequence blocks write ``dk/dv``; prefix blocks write an fp32 partial ``[B, Hkv, P, D]``
   (the row's contribution) that the host sums over the rows (shared prefix) or
   ``index_add``s into the bank entries (``task_ids``);
3. ``_bwd_dq``: grid ``(cdiv(S, BLOCK_M), B * H)`` over prefix and sequence blocks.

Dropout (``dropout_p > 0``) drops softmax probabilities with Philox (``tl.rand``): the keep
decision of score ``(b, h, i, j)`` (``j`` counting prefix columns first) is a pure function of
``(seed, ((b * H + h) * S + i) * (P + T) + j)``, so the backward regenerates the same mask.
``seed`` lives in a small int64 device tensor (no host sync); see :func:`dropout_keep_mask`.

``D`` need not be a power of two (80, 96): tiles are padded to ``BLOCK_D`` with a mask.
fp32 inputs use IEEE fp32 dots (no TF32) so that fp32 results match the reference.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ptune_fast import _backend

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """``tl.dot``; DOT_PREC "upcast" computes in fp32 (the Triton interpreter multiplies the raw
    bits of bf16 operands: bf16 tiles are upcast there)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, lo, hi, n_end, offs_m, offs_d, qpos,
               KPM, rng_row, seed, col0, qk_scale, dropout_p,
               D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update of one program's rows with key blocks ``[lo, hi)`` of K/V."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_end) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PREC) * qk_scale  # log2 units
        valid = offs_n[None, :] < n_end
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= qpos[:, None])
        if HAS_KPM:
            keep = tl.load(KPM + offs_n, mask=offs_n < n_end, other=0)
            valid = valid & (keep[None, :] != 0)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            r = tl.rand(seed, rng_row[:, None] + (col0 + offs_n)[None, :])
            p = tl.where(r >= dropout_p, p, 0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, PK, PV, TID, KPM, O, LSE, RNG,
                sqb, sqh, sqs, skb, skh, skt, svb, svh, svt,
                spkn, spkh, spkp, spvn, spvh, spvp, sob, soh, sos, skpm,
                H, REP, S, T, P, qk_scale, dropout_p, TUNE_S, TUNE_T,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_BANK: tl.constexpr,
                DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // REP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < S) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seed = 0
    rng_row = (bh.to(tl.int64) * S + offs_m) * (P + T)
    if DROPOUT:
        seed = tl.load(RNG)
    qpos = (T - S) + offs_m

    if IS_BANK:
        n = tl.load(TID + b).to(tl.int64)
    else:
        n = 0
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, PK + n * spkn + hk * spkh, PV + n * spvn + hk * spvh,
                               spkp, spvp, 0, P, P, offs_m, offs_d, qpos, KPM, rng_row, seed, 0,
                               qk_scale, dropout_p, D, BLOCK_N, False, False, DROPOUT, DOT_PREC)
    hi = T
    if IS_CAUSAL:
        hi = tl.minimum(T, (T - S) + (pid_m + 1) * BLOCK_M)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K + b * skb + hk * skh, V + b * svb + hk * svh,
                               skt, svt, 0, hi, T, offs_m, offs_d, qpos, KPM + b * skpm, rng_row, seed, P,
                               qk_scale, dropout_p, D, BLOCK_N, IS_CAUSAL, HAS_KPM, DROPOUT, DOT_PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out / (1.0 - dropout_p)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_mask)
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
        tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _bwd_pre(O, DO, DELTA, sob, soh, sos, sdob, sdoh, sdos, H, S,
             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < S) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)


@triton.jit
def _bwd_kv_block(Q, DO, LSE, DELTA, K, V, stride_kn, stride_vn, KPM, seed,
                  sqb, sqh, sqs, sdob, sdoh, sdos, b, hk, start_n, n_end, col0,
                  H, REP, S, T, P, qk_scale, dropout_p,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """dK, dV (unscaled dK) of key block ``[start_n, start_n + BLOCK_N)`` over the query heads of
    kv head ``hk`` of row ``b``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < n_end) & (offs_d[None, :] < D)
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    col_ok = offs_n < n_end
    if HAS_KPM:
        col_ok = col_ok & (tl.load(KPM + offs_n, mask=offs_n < n_end, other=0) != 0)
    m_lo = 0
    if IS_CAUSAL:
        m_lo = (tl.maximum(start_n - (T - S), 0) // BLOCK_M) * BLOCK_M
    for hh in range(0, REP):
        h = hk * REP + hh
        bh = b * H + h
        rng_col = (col0 + offs_n).to(tl.int64)
        for start_m in range(m_lo, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < S
            q_mask = row_ok[:, None] & (offs_d[None, :] < D)
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=q_mask,
                         other=0.0)
            lse = tl.load(LSE + bh * S + offs_m, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(DELTA + bh * S + offs_m, mask=row_ok, other=0.0)
            s_t = _dot(k, tl.trans(q), None, DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
            valid = col_ok[:, None] & row_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= ((T - S) + offs_m)[None, :])
            p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
            dp_t = _dot(v, tl.trans(do), None, DOT_PREC)
            if DROPOUT:
                r = tl.rand(seed, ((bh * S + offs_m).to(tl.int64) * (P + T))[None, :] + rng_col[:, None])
                keep = r >= dropout_p
                inv = 1.0 / (1.0 - dropout_p)
                dv = _dot(tl.where(keep, p_t * inv, 0.0).to(do.dtype), do, dv, DOT_PREC)
                dp_t = tl.where(keep, dp_t * inv, 0.0)
            else:
                dv = _dot(p_t.to(do.dtype), do, dv, DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkv_kernel(Q, K, V, PK, PV, TID, KPM, DO, LSE, DELTA, RNG, DK, DV, DPK, DPV,
                    sqb, sqh, sqs, skb, skh, skt, svb, svh, svt,
                    spkn, spkh, spkp, spvn, spvh, spvp, sdob, sdoh, sdos, skpm,
                    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                    H, HKV, REP, S, T, P, scale, qk_scale, dropout_p, TUNE_S, TUNE_T,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_BANK: tl.constexpr,
                    DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bk = tl.program_id(1)
    b = (bk // HKV).to(tl.int64)
    hk = (bk % HKV).to(tl.int64)
    n_pblocks = tl.cdiv(P, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    seed = 0
    if DROPOUT:
        seed = tl.load(RNG)
    if pid_n < n_pblocks:
        if IS_BANK:
            n = tl.load(TID + b).to(tl.int64)
        else:
            n = 0
        start_n = pid_n * BLOCK_N
        dk, dv = _bwd_kv_block(Q, DO, LSE, DELTA, PK + n * spkn + hk * spkh, PV + n * spvn + hk * spvh, spkp,
                               spvp, KPM, seed, sqb, sqh, sqs, sdob, sdoh, sdos, b, hk, start_n, P, 0,
                               H, REP, S, T, P, qk_scale, dropout_p, D, BLOCK_D, BLOCK_M, BLOCK_N,
                               False, False, DROPOUT, DOT_PREC)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < P) & (offs_d[None, :] < D)
        # fp32 partials [B, Hkv, P, D], contiguous; reduced over rows on the host
        off = ((b * HKV + hk) * P + offs_n[:, None]) * D + offs_d[None, :]
        tl.store(DPK + off, dk * scale, mask=mask)
        tl.store(DPV + off, dv, mask=mask)
    else:
        start_n = (pid_n - n_pblocks) * BLOCK_N
        dk, dv = _bwd_kv_block(Q, DO, LSE, DELTA, K + b * skb + hk * skh, V + b * svb + hk * svh, skt, svt,
                               KPM + b * skpm, seed, sqb, sqh, sqs, sdob, sdoh, sdos, b, hk, start_n, T, P,
                               H, REP, S, T, P, qk_scale, dropout_p, D, BLOCK_D, BLOCK_M, BLOCK_N,
                               IS_CAUSAL, HAS_KPM, DROPOUT, DOT_PREC)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
        tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_q_block(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, lo, hi, n_end, offs_m, offs_d, qpos,
                 KPM, rng_row, seed, col0, qk_scale, dropout_p,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_end) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PREC) * qk_scale
        valid = offs_n[None, :] < n_end
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= qpos[:, None])
        if HAS_KPM:
            keep = tl.load(KPM + offs_n, mask=offs_n < n_end, other=0)
            valid = valid & (keep[None, :] != 0)
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PREC)
        if DROPOUT:
            r = tl.rand(seed, rng_row[:, None] + (col0 + offs_n)[None, :])
            dp = tl.where(r >= dropout_p, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, PK, PV, TID, KPM, DO, LSE, DELTA, RNG, DQ,
                   sqb, sqh, sqs, skb, skh, skt, svb, svh, svt,
                   spkn, spkh, spkp, spvn, spvh, spvp, sdob, sdoh, sdos, skpm, sdqb, sdqh, sdqs,
                   H, REP, S, T, P, scale, qk_scale, dropout_p, TUNE_S, TUNE_T,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_BANK: tl.constexpr,
                   DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // REP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(RNG)
    rng_row = (bh.to(tl.int64) * S + offs_m) * (P + T)
    qpos = (T - S) + offs_m
    if IS_BANK:
        n = tl.load(TID + b).to(tl.int64)
    else:
        n = 0
    dq = _bwd_q_block(dq, q, do, lse, delta, PK + n * spkn + hk * spkh, PV + n * spvn + hk * spvh, spkp, spvp,
                      0, P, P, offs_m, offs_d, qpos, KPM, rng_row, seed, 0, qk_scale, dropout_p,
                      D, BLOCK_N, False, False, DROPOUT, DOT_PREC)
    hi = T
    if IS_CAUSAL:
        hi = tl.minimum(T, (T - S) + (pid_m + 1) * BLOCK_M)
    dq = _bwd_q_block(dq, q, do, lse, delta, K + b * skb + hk * skh, V + b * svb + hk * svh, skt, svt,
                      0, hi, T, offs_m, offs_d, qpos, KPM + b * skpm, rng_row, seed, P, qk_scale, dropout_p,
                      D, BLOCK_N, IS_CAUSAL, HAS_KPM, DROPOUT, DOT_PREC)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dropout_mask_kernel(RNG, KEEP, N, dropout_p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r = tl.rand(tl.load(RNG), offs)
    tl.store(KEEP + offs, (r >= dropout_p).to(tl.int8), mask=offs < N)


# ----------------------------------------------------------------------------- launch configs

_INTERPRET = _backend.triton_interpret()
# Under TRITON_INTERPRET=1 autotuning is pointless (and slow): one small fixed config.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}
_TUNE_KEY = ["TUNE_S", "TUNE_T", "P", "D", "IS_CAUSAL", "HAS_KPM", "DROPOUT"]


def _cfgs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem and, for wide heads, tiles that cannot fit."""
    S, D = named_args["S"], kwargs.get("D", named_args.get("D"))
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > max(16, triton.next_power_of_2(S)):
            continue
        if D > 128 and bm * bn > 64 * 64:
            continue
        keep.append(c)
    if not keep:  # always keep the smallest tile
        keep = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return keep


_FWD_CONFIGS = _cfgs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3),
                      (64, 128, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 2)])
_DKV_CONFIGS = _cfgs([(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 3),
                      (16, 128, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)])
_DQ_CONFIGS = _cfgs([(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3),
                     (16, 64, 4, 3), (16, 32, 4, 2)])

if not _INTERPRET:
    _fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
        _fwd_kernel)
    _dkv_tuned = triton.autotune(_DKV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
        _bwd_dkv_kernel)
    _dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
        _bwd_dq_kernel)


def _launch(raw, tuned_name, grid, *args, **kwargs):
    if _INTERPRET:
        raw[grid(_INTERPRET_META)](*args, **kwargs, **_INTERPRET_META)
    else:
        globals()[tuned_name][grid](*args, **kwargs)


# ----------------------------------------------------------------------------- host side


def why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p) -> str:
    """Empty string when these kernels can serve the call, else the reason."""
    if not (q.is_cuda or _INTERPRET):
        return f"tensors on {q.device.type} need TRITON_INTERPRET=1 to run Triton kernels"
    if _backend.triton_interpret() != _INTERPRET:
        return "TRITON_INTERPRET changed after the Triton kernels were imported"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (fp16, bf16, fp32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("task_ids", task_ids),
                    ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != q.device:
            return f"{name} is on {t.device}, q on {q.device}"
    if q.is_cuda and not _INTERPRET:
        if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
            return "bf16 needs compute capability >= 8.0"
    return ""


def _lastdim_contig(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _common(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, scale):
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    if P:
        pk, pv = _lastdim_contig(prefix_k), _lastdim_contig(prefix_v)
        bank = pk.dim() == 4
        pk_strides = (pk.stride(0), pk.stride(1), pk.stride(2)) if bank else (0, pk.stride(0), pk.stride(1))
        pv_strides = (pv.stride(0), pv.stride(1), pv.stride(2)) if bank else (0, pv.stride(0), pv.stride(1))
        tid = task_ids.contiguous() if bank else q
    else:
        pk = pv = tid = q
        bank, pk_strides, pv_strides = False, (0, 0, 0), (0, 0, 0)
    if key_padding_mask is not None:
        kpm = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
        kpm = kpm.contiguous().view(torch.int8)
    else:
        kpm = q
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    meta = dict(
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_KPM=key_padding_mask is not None, IS_BANK=bank,
        DOT_PREC=_dot_prec(q.dtype),
    )
    return (B, H, S, D, Hkv, T, P, scale), (q, k, v, pk, pv, tid, kpm), (pk_strides, pv_strides), meta


def _dot_prec(dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # no TF32: fp32 inputs get fp32 accuracy
    return "upcast" if _INTERPRET and dtype == torch.bfloat16 else "tf32"  # (ignored for 16-bit dots)


def new_rng_state(device) -> torch.Tensor:
    """A fresh dropout seed: int64 ``[1]`` on ``device``, drawn from torch's generator (no host sync)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def forward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p,
            need_lse=True, rng=None):
    """Returns ``(out [B,H,S,D] q.dtype, lse [B,H,S] fp32 (or empty), rng int64 [1] (or empty))``."""
    (B, H, S, D, Hkv, T, P, scale), (q, k, v, pk, pv, tid, kpm), (pks, pvs), meta = _common(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, scale)
    out = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S) if need_lse else (0,), dtype=torch.float32, device=q.device)
    dropout = dropout_p > 0.0
    if dropout and rng is None:
        rng = new_rng_state(q.device)
    if not dropout:
        rng = torch.empty((0,), dtype=torch.int64, device=q.device)
    grid = lambda META: (triton.cdiv(S, META["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_fwd_kernel, "_fwd_tuned", grid,
            q, k, v, pk, pv, tid, kpm, out, lse, rng if dropout else q,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *pks, *pvs, out.stride(0), out.stride(1), out.stride(2),
            kpm.stride(0) if meta["HAS_KPM"] else 0,
            H, H // Hkv, S, T, P, scale * LOG2E, float(dropout_p), _bucket(S), _bucket(T),
            IS_CAUSAL=bool(causal), DROPOUT=dropout, STORE_LSE=need_lse, **meta)
    return out, lse, rng


def _bucket(n: int) -> int:
    """Autotune key bucket: next power of two (>= 16, so the argument never specializes)."""
    return max(16, triton.next_power_of_2(n))


def backward(dout, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng,
             causal, scale, dropout_p):
    """Returns ``(dq, dk, dv, dprefix_k, dprefix_v)``; the prefix grads are None without a prefix,
    have the prefix's shape (shared: summed over rows; bank: per entry) and dtype otherwise."""
    (B, H, S, D, Hkv, T, P, scale), (q, k, v, pk, pv, tid, kpm), (pks, pvs), meta = _common(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, scale)
    dout = _lastdim_contig(dout)
    out = _lastdim_contig(out)
    dev = q.device
    dropout = dropout_p > 0.0
    delta = torch.empty((B, H, S), dtype=torch.float32, device=dev)
    bm_pre = 16 if _INTERPRET else 64
    _bwd_pre[(triton.cdiv(S, bm_pre), B * H)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), H, S, D=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=bm_pre)
    dq = torch.empty((B, H, S, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hkv, T, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, T, D), dtype=v.dtype, device=dev)
    if P:
        dpk_part = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=dev)
        dpv_part = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=dev)
    else:
        dpk_part = dpv_part = delta
    rng_arg = rng if dropout else q
    common = dict(IS_CAUSAL=bool(causal), DROPOUT=dropout, **meta)
    grid_kv = lambda META: (triton.cdiv(P, META["BLOCK_N"]) + triton.cdiv(T, META["BLOCK_N"]), B * Hkv)  # noqa
    _launch(_bwd_dkv_kernel, "_dkv_tuned", grid_kv,
            q, k, v, pk, pv, tid, kpm, dout, lse, delta, rng_arg, dk, dv, dpk_part, dpv_part,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *pks, *pvs, dout.stride(0), dout.stride(1), dout.stride(2),
            kpm.stride(0) if meta["HAS_KPM"] else 0,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, Hkv, H // Hkv, S, T, P, scale, scale * LOG2E, float(dropout_p), _bucket(S), _bucket(T), **common)
    grid_q = lambda META: (triton.cdiv(S, META["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_bwd_dq_kernel, "_dq_tuned", grid_q,
            q, k, v, pk, pv, tid, kpm, dout, lse, delta, rng_arg, dq,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *pks, *pvs, dout.stride(0), dout.stride(1), dout.stride(2),
            kpm.stride(0) if meta["HAS_KPM"] else 0, dq.stride(0), dq.stride(1), dq.stride(2),
            H, H // Hkv, S, T, P, scale, scale * LOG2E, float(dropout_p), _bucket(S), _bucket(T), **common)
    dpk = dpv = None
    if P:
        if meta["IS_BANK"]:
            idx = task_ids.long()
            dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=dev).index_add_(0, idx, dpk_part)
            dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=dev).index_add_(0, idx, dpv_part)
        else:
            dpk, dpv = dpk_part.sum(0), dpv_part.sum(0)
        dpk, dpv = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv


def run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p):
    """Forward only (no LSE kept): ``out [B,H,S,D]``."""
    return forward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p,
                   need_lse=False)[0]


def dropout_keep_mask(rng, B, H, S, P, T, dropout_p) -> torch.Tensor:
    """The keep mask ``[B, H, S, P + T]`` (bool; prefix columns first) that the kernels derive from
    ``rng`` -- for tests and debugging."""
    n = B * H * S * (P + T)
    keep = torch.empty(n, dtype=torch.int8, device=rng.device)
    block = 1024
    _dropout_mask_kernel[(triton.cdiv(n, block),)](rng, keep, n, float(dropout_p), BLOCK=block)
    return keep.view(B, H, S, P + T).bool()
