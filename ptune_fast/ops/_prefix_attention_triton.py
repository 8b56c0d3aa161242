"""Triton kernels for :func:`ptune_fast.ops.prefix_attention` (flash-attention style).

Forward: one launch, 1-D grid ``cdiv(S, BLOCK_M) * B * H`` (query blocks fastest). Each program
keeps an online softmax over the prefix blocks (read straight from ``prefix_k/v [Hkv, P, D]`` or
the bank row ``[task_ids[b], Hkv, P, D]``, never expanded nor concatenated) and then over the
sequence blocks of ``k/v [B, Hkv, T, D]`` (bottom-right causal limit, key padding mask). GQA maps
query head ``h`` to kv head ``h // (H // Hkv)`` in the kernel. Writes ``out`` through its strides
(``[B, H, S, D]`` or ``[B, S, H, D]`` memory, no copy) and ``lse`` (natural log, fp32, ``-inf``
on rows with no visible key, whose output is 0).

Backward (FlashAttention-2 structure), two paths chosen by :func:`backward_path`:

1. ``_bwd_pre``: ``delta = rowsum(dO * O)`` in fp32;
2. ``_bwd_dkv_kernel``: grid ``(cdiv(P, BLOCK_N) + cdiv(T, BLOCK_N)) * B * Hkv``; a program owns
   one key block (K/V resident in registers) and loops over the ``H // Hkv`` query heads of its
   group and the query blocks. Sequence blocks write ``dk/dv``; prefix blocks write an fp32
   partial ``[B, Hkv, P, D]`` (the row's contribution);

   * **fused** (default, FlashAttention-2's choice): 5 matmuls per (key block, query block) pair
     -- ``S^T = K Q^T``, ``dP^T = V dO^T``, ``dV += P^T dO``, ``dK += dS^T Q``, ``dQ_part = dS K``
     -- the last added to an fp32 ``dQ`` accumulator ``[B, H, S, D]`` with atomics (cast to the
     input dtype after the launch). Run to run, ``dq`` may differ in the last bits;
   * **split** (``torch.use_deterministic_algorithms(True)`` or ``PTUNE_FAST_DETERMINISTIC=1``; also
     with dropout, D > 128 and compiled fp32, where no fused tile compiles spill-free):
     the same kernel without dQ (4 matmuls), then ``_bwd_dq_kernel`` (grid ``cdiv(S, BLOCK_M) * B *
     H``, 3 matmuls: ``S = Q K^T``, ``dP = dO V^T``, ``dQ += dS K``): 7 in all, no atomics;

3. ``_prefix_grad_reduce``: the prefix gradient, summed over the rows in row order (shared
   prefix: every row; bank: the rows whose ``task_ids`` names the entry) -- a fixed-order sum,
   so dK, dV and the prefix gradients are bitwise reproducible run to run for a given tile config
   on both paths (the autotuner picks tiles by timing: another process may pick another tile).

Masks only where they can change a result. Forward and dQ: key blocks wholly in range and below
the causal diagonal of the query block (``_seq_split``) and full prefix blocks take no range or
causal mask and no row predicate on their loads; the diagonal and partial last blocks do. dK/dV:
the causal mask only on the query blocks that cross the diagonal; no row mask anywhere (rows past
``S`` and rows with no visible key get ``lse = +inf``, so their probabilities are exactly 0); the
key-range mask only where a padded key row could reach a stored value (the fused path's dQ). The
padding mask (``key_padding_mask``) is data, not geometry: it is applied to every tile of a row
that has one (the masks are per column, loaded once per program in dK/dV).

Grids are 1-D: CUDA caps grid axes y/z at 65,535, x at 2^31 - 1 (:func:`grids`).

Out-of-range bank ids (``task_ids[b]`` outside ``[0, N)``): the kernels read entry 0 instead
(the address is clamped, nothing is read out of bounds), row ``b``'s output is NaN and its
gradients (dq, dk, dv of row ``b`` and its contribution to the bank) are 0 -- the semantics of
:func:`ptune_fast.reference.prefix_attention`, with no host sync.

Dropout (``dropout_p > 0``) drops softmax probabilities with Philox (``tl.rand``): the keep
decision of score ``(b, h, i, j)`` (``j`` counting prefix columns first) is a pure function of
``(seed, ((b * H + h) * S + i) * (P + T) + j)``, so the backward regenerates the same mask.
``seed`` lives in a small int64 device tensor (no host sync); see :func:`dropout_keep_mask`.

``D`` need not be a power of two (80, 96): tiles are padded to ``BLOCK_D`` with a mask.

Configs: :func:`configs_for` is the autotuner's candidate list for a shape, pruned up front by
head dim, dtype and sequence lengths; for ``D <= 128`` and fp16/bf16 it only holds configs that
compile with 0 spill bytes and fit shared memory on sm_80 and sm_90
(``scripts/triton_aot_report.py``, ``tests/test_triton_resources.py``).

fp32: on CUDA, fp32 calls are refused (:func:`why_not`) and served by the ``sdpa`` backend --
IEEE-fp32 dots take minutes to compile and spill heavily -- unless ``PTUNE_FAST_TRITON_TF32=1``
opts in to TF32 dots (about 10 mantissa bits in the products; small tiles). Under the
interpreter fp32 uses IEEE dots so that fp32 results match the reference.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ptune_fast import _backend

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
TF32_ENV_VAR = "PTUNE_FAST_TRITON_TF32"
DETERMINISTIC_ENV_VAR = "PTUNE_FAST_DETERMINISTIC"
#: CUDA's grid limits: axis x, axes y and z
MAX_GRID_X, MAX_GRID_YZ = 2**31 - 1, 65535


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
def _task_entry(TID, b, N_TASKS, IS_BANK: tl.constexpr):
    """``(entry, ok)``: the bank entry row ``b`` reads and whether ``task_ids[b]`` is in range.
    An out-of-range id reads entry 0 (never out of bounds); the caller poisons / zeroes the row."""
    if IS_BANK:
        n = tl.load(TID + b).to(tl.int64)
        ok = (n >= 0) & (n < N_TASKS)
        n = tl.where(ok, n, 0)
    else:
        n = b * 0
        ok = n == 0
    return n, ok


@triton.jit
def _load_rows(ptrs, offs_r, r_end, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN: tl.constexpr):
    """Load a ``[rows, BLOCK_D]`` tile; ``EVEN``: every row is in range (no row predicate), and the
    head-dim predicate only when ``D`` is padded to ``BLOCK_D``."""
    if EVEN:
        if D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    else:
        x = tl.load(ptrs, mask=(offs_r[:, None] < r_end) & (offs_d[None, :] < D), other=0.0)
    return x


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, lo, hi, n_end, offs_m, offs_d, qpos,
               KPM, rng_row, seed, col0, qk_scale, dropout_p,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_KPM: tl.constexpr, EVEN: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update of one program's rows with key blocks ``[lo, hi)`` of K/V (2 matmuls
    per block). ``EVEN`` (interior blocks: ``hi <= n_end``, below the causal diagonal): no range
    or causal mask; the padding mask (``HAS_KPM``) applies to every block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, n_end, offs_d, D, BLOCK_D, EVEN)
        s = _dot(q, tl.trans(k), None, DOT_PREC) * qk_scale  # log2 units
        if not EVEN:
            valid = offs_n[None, :] < n_end
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= qpos[:, None])
            s = tl.where(valid, s, float("-inf"))
        if HAS_KPM:
            keep = tl.load(KPM + offs_n, mask=offs_n < n_end, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            r = tl.rand(seed, rng_row[:, None] + (col0 + offs_n)[None, :])
            p = tl.where(r >= dropout_p, p, 0.0)
        v = _load_rows(V + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, n_end, offs_d, D, BLOCK_D, EVEN)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _seq_split(pid_m, S, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """``(n_full, hi)`` for query block ``pid_m``: sequence key blocks ``[0, n_full)`` are interior
    (in range and visible to every row of the block: no mask), ``[n_full, hi)`` the boundary (the
    causal diagonal and the partial last block: masked); keys ``>= hi`` are invisible."""
    if IS_CAUSAL:
        hi = tl.minimum(T, (T - S) + (pid_m + 1) * BLOCK_M)
        n_full = tl.maximum(tl.minimum((T - S) + pid_m * BLOCK_M + 1, T), 0)
    else:
        hi = T
        n_full = T
    return (n_full // BLOCK_N) * BLOCK_N, hi


# S, T (and the mask stride T) vary call to call: no divisibility specialisation on them, so one
# compiled variant per config serves every length in an autotune bucket (see ``warmup``).
_NO_SPECIALIZE = ["S", "T", "skpm", "N_TASKS"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, PK, PV, TID, KPM, O, LSE, RNG,
                sqb, sqh, sqs, skb, skh, skt, svb, svh, svt,
                spkn, spkh, spkp, spvn, spvh, spvp, sob, soh, sos, skpm,
                H, REP, S, T, P, N_TASKS, qk_scale, dropout_p, TUNE_S, TUNE_T,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_BANK: tl.constexpr,
                DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PREC: tl.constexpr):
    n_m = tl.cdiv(S, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh = tl.program_id(0) // n_m
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

    n, ok = _task_entry(TID, b, N_TASKS, IS_BANK)
    pk, pv = PK + n * spkn + hk * spkh, PV + n * spvn + hk * spvh
    p_full = (P // BLOCK_N) * BLOCK_N  # prefix: full blocks unmasked, the partial last one masked
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, pk, pv, spkp, spvp, 0, p_full, P, offs_m, offs_d, qpos, KPM,
                               rng_row, seed, 0, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, False, False, True,
                               DROPOUT, DOT_PREC)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, pk, pv, spkp, spvp, p_full, P, P, offs_m, offs_d, qpos, KPM,
                               rng_row, seed, 0, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, False, False, False,
                               DROPOUT, DOT_PREC)
    n_full, hi = _seq_split(pid_m, S, T, BLOCK_M, BLOCK_N, IS_CAUSAL)
    kb, vb, kpm = K + b * skb + hk * skh, V + b * svb + hk * svh, KPM + b * skpm
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, kb, vb, skt, svt, 0, n_full, T, offs_m, offs_d, qpos, kpm,
                               rng_row, seed, P, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, False, HAS_KPM, True,
                               DROPOUT, DOT_PREC)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, kb, vb, skt, svt, n_full, hi, T, offs_m, offs_d, qpos, kpm,
                               rng_row, seed, P, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_KPM,
                               False, DROPOUT, DOT_PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out / (1.0 - dropout_p)
    if IS_BANK:
        out = tl.where(ok, out, float("nan"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_mask)
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
        if IS_BANK:
            lse = tl.where(ok, lse, float("nan"))
        tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _bwd_pre(O, DO, DELTA, sob, soh, sos, sdob, sdoh, sdos, H, S,
             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    n_m = tl.cdiv(S, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh = tl.program_id(0) // n_m
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
def _row_stats(LSE, DELTA, bh, offs_m, S):
    """``lse`` (log2 units; ``+inf`` for rows past ``S`` and rows with no visible key, so that their
    probabilities are exactly 0 -- no row mask needed) and ``delta`` of query rows ``offs_m``."""
    lse = tl.load(LSE + bh * S + offs_m, mask=offs_m < S, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    return lse, tl.load(DELTA + bh * S + offs_m, mask=offs_m < S, other=0.0)


@triton.jit
def _bwd_kv_rows(dk, dv, k, v, Q, DO, LSE, DELTA, DQA, bh, m_lo, m_hi, offs_n, offs_d, col_ok, rng_col, seed,
                 sqs, sdos, S, T, P, scale, qk_scale, dropout_p, ok,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 EVEN: tl.constexpr, COL_MASK: tl.constexpr, DROPOUT: tl.constexpr, FUSE_DQ: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Query blocks ``[m_lo, m_hi)`` of head ``bh`` against one resident K/V block: 4 matmuls per
    block (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q), 5 with ``FUSE_DQ``
    (dQ += dS K, added to the fp32 ``DQA`` with atomics). Rows past ``S`` need no mask (``lse =
    +inf``); ``IS_CAUSAL`` only on the diagonal blocks; ``COL_MASK`` (padding mask, and key range
    when ``FUSE_DQ``: a padded key row would reach dQ) on every block; ``EVEN``: no row predicate on
    the loads."""
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q + offs_m[:, None] * sqs + offs_d[None, :], offs_m, S, offs_d, D, BLOCK_D, EVEN)
        do = _load_rows(DO + offs_m[:, None] * sdos + offs_d[None, :], offs_m, S, offs_d, D, BLOCK_D, EVEN)
        lse, delta = _row_stats(LSE, DELTA, bh, offs_m, S)
        s_t = _dot(k, tl.trans(q), None, DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse[None, :])
        if IS_CAUSAL:
            p_t = tl.where(offs_n[:, None] <= ((T - S) + offs_m)[None, :], p_t, 0.0)
        if COL_MASK:
            p_t = tl.where(col_ok[:, None], p_t, 0.0)
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
        if FUSE_DQ:
            dq = _dot(tl.trans(ds_t.to(k.dtype)), k, None, DOT_PREC) * scale  # [BLOCK_M, BLOCK_D]
            tl.atomic_add(DQA + (bh * S + offs_m[:, None]) * D + offs_d[None, :], dq,
                          mask=(offs_m[:, None] < tl.where(ok, S, 0)) & (offs_d[None, :] < D),
                          sem="relaxed")  # (an out-of-range bank row adds nothing)
    return dk, dv


@triton.jit
def _bwd_kv_block(Q, DO, LSE, DELTA, DQA, K, V, stride_kn, stride_vn, KPM, seed,
                  sqb, sqh, sqs, sdob, sdoh, sdos, b, hk, start_n, n_end, col0,
                  H, REP, S, T, P, scale, qk_scale, dropout_p, ok,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                  FUSE_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV (unscaled dK) of key block ``[start_n, start_n + BLOCK_N)`` over the query heads of
    kv head ``hk`` of row ``b``; K/V stay resident. Query blocks are split into the causal
    diagonal ``[m_lo, m_full)`` (masked), the interior ``[m_full, S_even)`` (no mask, no load
    predicate) and the partial last block."""
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
    s_even = (S // BLOCK_M) * BLOCK_M
    m_lo = 0
    m_full = 0
    if IS_CAUSAL:  # row i sees key j iff j <= T - S + i
        m_lo = (tl.maximum(start_n - (T - S), 0) // BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (T - S), 0), BLOCK_M) * BLOCK_M, S)
    rng_col = (col0 + offs_n).to(tl.int64)
    for hh in range(0, REP):
        h = hk * REP + hh
        bh = b * H + h
        q_ptr, do_ptr = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh
        if IS_CAUSAL:
            dk, dv = _bwd_kv_rows(dk, dv, k, v, q_ptr, do_ptr, LSE, DELTA, DQA, bh, m_lo, m_full, offs_n, offs_d,
                                  col_ok, rng_col, seed, sqs, sdos, S, T, P, scale, qk_scale, dropout_p, ok,
                                  D, BLOCK_D, BLOCK_M, True, False, HAS_KPM or FUSE_DQ, DROPOUT, FUSE_DQ, DOT_PREC)
        dk, dv = _bwd_kv_rows(dk, dv, k, v, q_ptr, do_ptr, LSE, DELTA, DQA, bh, m_full, s_even, offs_n, offs_d,
                              col_ok, rng_col, seed, sqs, sdos, S, T, P, scale, qk_scale, dropout_p, ok,
                              D, BLOCK_D, BLOCK_M, False, True, HAS_KPM or FUSE_DQ, DROPOUT, FUSE_DQ, DOT_PREC)
        dk, dv = _bwd_kv_rows(dk, dv, k, v, q_ptr, do_ptr, LSE, DELTA, DQA, bh, tl.maximum(m_full, s_even), S,
                              offs_n, offs_d, col_ok, rng_col, seed, sqs, sdos, S, T, P, scale, qk_scale, dropout_p,
                              ok, D, BLOCK_D, BLOCK_M, False, False, HAS_KPM or FUSE_DQ, DROPOUT, FUSE_DQ, DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkv_kernel(Q, K, V, PK, PV, TID, KPM, DO, LSE, DELTA, RNG, DK, DV, DPK, DPV, DQA,
                    sqb, sqh, sqs, skb, skh, skt, svb, svh, svt,
                    spkn, spkh, spkp, spvn, spvh, spvp, sdob, sdoh, sdos, skpm,
                    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                    H, HKV, REP, S, T, P, N_TASKS, scale, qk_scale, dropout_p, TUNE_S, TUNE_T,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_BANK: tl.constexpr,
                    DROPOUT: tl.constexpr, FUSE_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    n_pblocks = tl.cdiv(P, BLOCK_N)
    n_blocks = n_pblocks + tl.cdiv(T, BLOCK_N)
    pid_n = tl.program_id(0) % n_blocks
    bk = tl.program_id(0) // n_blocks
    b = (bk // HKV).to(tl.int64)
    hk = (bk % HKV).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    seed = 0
    if DROPOUT:
        seed = tl.load(RNG)
    n, ok = _task_entry(TID, b, N_TASKS, IS_BANK)
    if pid_n < n_pblocks:
        start_n = pid_n * BLOCK_N
        dk, dv = _bwd_kv_block(Q, DO, LSE, DELTA, DQA, PK + n * spkn + hk * spkh, PV + n * spvn + hk * spvh, spkp,
                               spvp, KPM, seed, sqb, sqh, sqs, sdob, sdoh, sdos, b, hk, start_n, P, 0,
                               H, REP, S, T, P, scale, qk_scale, dropout_p, ok, D, BLOCK_D, BLOCK_M, BLOCK_N,
                               False, False, DROPOUT, FUSE_DQ, DOT_PREC)
        if IS_BANK:  # a row with an out-of-range id contributes nothing
            dk = tl.where(ok, dk, 0.0)
            dv = tl.where(ok, dv, 0.0)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < P) & (offs_d[None, :] < D)
        # fp32 partials [B, Hkv, P, D], contiguous; reduced over rows on the host
        off = ((b * HKV + hk) * P + offs_n[:, None]) * D + offs_d[None, :]
        tl.store(DPK + off, dk * scale, mask=mask)
        tl.store(DPV + off, dv, mask=mask)
    else:
        start_n = (pid_n - n_pblocks) * BLOCK_N
        dk, dv = _bwd_kv_block(Q, DO, LSE, DELTA, DQA, K + b * skb + hk * skh, V + b * svb + hk * svh, skt, svt,
                               KPM + b * skpm, seed, sqb, sqh, sqs, sdob, sdoh, sdos, b, hk, start_n, T, P,
                               H, REP, S, T, P, scale, qk_scale, dropout_p, ok, D, BLOCK_D, BLOCK_M, BLOCK_N,
                               IS_CAUSAL, HAS_KPM, DROPOUT, FUSE_DQ, DOT_PREC)
        if IS_BANK:
            dk = tl.where(ok, dk, 0.0)
            dv = tl.where(ok, dv, 0.0)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
        tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_q_block(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, lo, hi, n_end, offs_m, offs_d, qpos,
                 KPM, rng_row, seed, col0, qk_scale, dropout_p,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 HAS_KPM: tl.constexpr, EVEN: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ over key blocks ``[lo, hi)``: 3 matmuls per block (S = Q K^T, dP = dO V^T, dQ += dS K).
    ``EVEN`` (interior) blocks: no range / causal mask; the padding mask on every block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, n_end, offs_d, D, BLOCK_D, EVEN)
        v = _load_rows(V + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, n_end, offs_d, D, BLOCK_D, EVEN)
        s = _dot(q, tl.trans(k), None, DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN:
            valid = offs_n[None, :] < n_end
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= qpos[:, None])
            p = tl.where(valid, p, 0.0)
        if HAS_KPM:
            keep = tl.load(KPM + offs_n, mask=offs_n < n_end, other=0)
            p = tl.where(keep[None, :] != 0, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PREC)
        if DROPOUT:
            r = tl.rand(seed, rng_row[:, None] + (col0 + offs_n)[None, :])
            dp = tl.where(r >= dropout_p, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(Q, K, V, PK, PV, TID, KPM, DO, LSE, DELTA, RNG, DQ,
                   sqb, sqh, sqs, skb, skh, skt, svb, svh, svt,
                   spkn, spkh, spkp, spvn, spvh, spvp, sdob, sdoh, sdos, skpm, sdqb, sdqh, sdqs,
                   H, REP, S, T, P, N_TASKS, scale, qk_scale, dropout_p, TUNE_S, TUNE_T,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_BANK: tl.constexpr,
                   DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    n_m = tl.cdiv(S, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh = tl.program_id(0) // n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // REP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < S) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=q_mask, other=0.0)
    lse, delta = _row_stats(LSE, DELTA, bh.to(tl.int64), offs_m, S)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(RNG)
    rng_row = (bh.to(tl.int64) * S + offs_m) * (P + T)
    qpos = (T - S) + offs_m
    n, ok = _task_entry(TID, b, N_TASKS, IS_BANK)
    pk, pv = PK + n * spkn + hk * spkh, PV + n * spvn + hk * spvh
    p_full = (P // BLOCK_N) * BLOCK_N
    dq = _bwd_q_block(dq, q, do, lse, delta, pk, pv, spkp, spvp, 0, p_full, P, offs_m, offs_d, qpos, KPM, rng_row,
                      seed, 0, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, False, False, True, DROPOUT, DOT_PREC)
    dq = _bwd_q_block(dq, q, do, lse, delta, pk, pv, spkp, spvp, p_full, P, P, offs_m, offs_d, qpos, KPM, rng_row,
                      seed, 0, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, False, False, False, DROPOUT, DOT_PREC)
    n_full, hi = _seq_split(pid_m, S, T, BLOCK_M, BLOCK_N, IS_CAUSAL)
    kb, vb, kpm = K + b * skb + hk * skh, V + b * svb + hk * svh, KPM + b * skpm
    dq = _bwd_q_block(dq, q, do, lse, delta, kb, vb, skt, svt, 0, n_full, T, offs_m, offs_d, qpos, kpm, rng_row,
                      seed, P, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, False, HAS_KPM, True, DROPOUT, DOT_PREC)
    dq = _bwd_q_block(dq, q, do, lse, delta, kb, vb, skt, svt, n_full, hi, T, offs_m, offs_d, qpos, kpm, rng_row,
                      seed, P, qk_scale, dropout_p, D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_KPM, False, DROPOUT,
                      DOT_PREC)
    if IS_BANK:
        dq = tl.where(ok, dq, 0.0)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _prefix_grad_reduce(PART, TID, OUT, B, N_TASKS, E, IS_BANK: tl.constexpr, BLOCK: tl.constexpr):
    """``OUT[n, :E] = sum_b PART[b, :E]`` over the rows ``b`` whose ``task_ids[b] == n`` (every row
    for a shared prefix, ``N_TASKS = 1``), summed in row order: deterministic, no atomics. A row
    with an out-of-range id matches no entry. 1-D grid ``N_TASKS * cdiv(E, BLOCK)``."""
    n_blk = tl.cdiv(E, BLOCK)
    n = tl.program_id(0) // n_blk
    offs = (tl.program_id(0) % n_blk).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < E
    acc = tl.zeros([BLOCK], tl.float32)
    ptr = PART + offs
    for b in range(0, B):
        if IS_BANK:
            hit = (tl.zeros([BLOCK], tl.int64) + tl.load(TID + b)) == n  # (a block: the interpreter
            acc += tl.load(ptr, mask=in_range & hit, other=0.0)  # rejects a scalar & block mask)
        else:
            acc += tl.load(ptr, mask=in_range, other=0.0)
        ptr += E
    tl.store(OUT + n.to(tl.int64) * E + offs, acc.to(OUT.dtype.element_ty), mask=in_range)


@triton.jit
def _dropout_mask_kernel(RNG, KEEP, N, dropout_p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r = tl.rand(tl.load(RNG), offs)
    tl.store(KEEP + offs, (r >= dropout_p).to(tl.int8), mask=offs < N)


# ----------------------------------------------------------------------------- launch configs

_INTERPRET = _backend.triton_interpret()
# Under TRITON_INTERPRET=1 autotuning is pointless (and slow): one small fixed config.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}
_TUNE_KEY = ["TUNE_S", "TUNE_T", "P", "D", "IS_CAUSAL", "HAS_KPM", "IS_BANK", "DROPOUT"]
_PRE_BLOCK_M = 64  # _bwd_pre (compiled); 16 under the interpreter
_REDUCE_BLOCK = 1024  # _prefix_grad_reduce

#: Autotune candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for fp16/bf16 by kernel and
#: ``BLOCK_D`` (64: D <= 64; 128: D in 65..128): only tiles measured to compile with 0 spill bytes
#: and to fit shared memory on sm_80 and sm_90 with bank + padding mask, with Triton 3.9 *and* 3.6
#: (the GPU image's; ptxas and the compiler differ: 5 tiles clean on 3.9 spilled on 3.6)
#: (``scripts/triton_aot_report.py``; ``benchmarks/results/triton-aot-2026-12-02.md``): bf16,
#: D = 64 and 128, causal + dropout (the most registers; "dkvq" never runs with dropout: without
#: it), forward D = 128 also bidirectional without dropout -- ptxas is not monotone in the flags.
#: Single-stage (num_stages = 1) dK/dV tiles: software pipelining of the query loop is what
#: spilled them. The 2026-12-01 sweep (older kernels) covered fp16 and D = 80 / 96 too; those are
#: not re-measured for these kernels.
_SPILL_FREE = {
    ("fwd", 64): [(128, 32, 8, 3), (32, 64, 4, 3), (16, 32, 4, 2)],
    ("fwd", 128): [(64, 32, 8, 3), (64, 32, 8, 2), (16, 32, 4, 2)],
    ("dkv", 64): [(64, 32, 8, 1), (32, 32, 8, 1), (16, 32, 4, 1)],
    ("dkv", 128): [(64, 32, 8, 1), (32, 32, 8, 1)],
    ("dkvq", 64): [(32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
    ("dkvq", 128): [(32, 32, 8, 1)],
    ("dq", 64): [(128, 32, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3), (16, 32, 4, 2)],
    ("dq", 128): [(64, 32, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
}
#: D in 129..256 (BLOCK_D = 256): small tiles that must run, not necessarily spill-free: fwd and
#: dq are spill-free on sm_80/sm_90 (causal + dropout); dkv spills a few dozen bytes.
_WIDE = {"fwd": [(32, 32, 4, 2), (16, 32, 4, 2)], "dkv": [(16, 32, 4, 2), (16, 16, 4, 2)],
         "dq": [(32, 32, 4, 2), (16, 32, 4, 2)]}
#: fp32 with the TF32 opt-in (PTUNE_FAST_TRITON_TF32=1): fp32 tiles take twice the registers;
#: spill-free on sm_80/sm_90 at D = 64 and 128, causal + dropout (the report's fp32 section).
_FP32 = {("fwd", 64): [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)], ("fwd", 128): [(32, 64, 4, 2)],
         ("dkv", 64): [(16, 64, 4, 2)], ("dkv", 128): [(16, 32, 4, 2)],
         ("dq", 64): [(64, 32, 4, 2), (16, 32, 4, 2)], ("dq", 128): [(64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)]}
_FIXED = {"pre": [dict(BLOCK_M=_PRE_BLOCK_M)], "reduce": [dict(BLOCK=_REDUCE_BLOCK)]}


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _cfg(m, n, w, st):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)


def configs_for(kernel: str, D: int, dtype: torch.dtype, S: int, T: int, P: int, dropout: bool = False):
    """The configs the autotuner may try for ``kernel`` ("fwd", "dkv", "dq"; "pre" and "reduce"
    have one fixed config) at this shape: chosen by head dim and dtype (spill-free tables above),
    then pruned by sequence length (no ``BLOCK_M`` above ``S``, no ``BLOCK_N`` above ``max(P, T)``,
    rounded up to powers of two >= 16). ``dropout`` is accepted for callers that key on it; the
    tables are spill-free with and without dropout."""
    if kernel in _FIXED:
        return [triton.Config(dict(c), num_warps=4, num_stages=2) for c in _FIXED[kernel]]
    block_d = _block_d(D)
    if block_d > 128:
        cands = _WIDE[kernel]
    else:
        cands = (_FP32 if dtype == torch.float32 else _SPILL_FREE)[(kernel, max(64, block_d))]
    max_m, max_n = max(16, triton.next_power_of_2(S)), max(16, triton.next_power_of_2(max(P, T)))
    keep = [c for c in cands if c[0] <= max_m and c[1] <= max_n]
    if not keep:  # always keep the smallest tile
        keep = [min(cands, key=lambda c: (c[0] * c[1], c[2]))]
    return [_cfg(*c) for c in keep]


def _all_configs(kernel):
    seen = dict.fromkeys(c for table in (_SPILL_FREE, _WIDE, _FP32) for key, cs in table.items()
                         if (key[0] if isinstance(key, tuple) else key) == kernel for c in cs)
    return [_cfg(*c) for c in seen]


def _pruner(kernel):
    def prune(configs, named_args, **kwargs):
        D = kwargs.get("D", named_args.get("D"))
        want = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in configs_for(kernel, D, named_args["Q"].dtype, named_args["S"], named_args["T"],
                                     named_args["P"], bool(kwargs.get("DROPOUT", False)))}
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
    return prune


#: the autotuned kernels by name: "dkvq" is ``_bwd_dkv_kernel`` with ``FUSE_DQ`` (the fused
#: 5-matmul backward; its fp32 dQ accumulator is zeroed before every autotune trial)
KERNELS = {"fwd": _fwd_kernel, "dkv": _bwd_dkv_kernel, "dkvq": _bwd_dkv_kernel, "dq": _bwd_dq_kernel}
if not _INTERPRET:
    _TUNED = {
        name: triton.autotune(_all_configs(name), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner(name)},
                              reset_to_zero=["DQA"] if name == "dkvq" else None)(fn)
        for name, fn in KERNELS.items()
    }


def _launch(raw, name, grid, *args, **kwargs):
    if _INTERPRET:
        _check_grid(grid(_INTERPRET_META))
        raw[grid(_INTERPRET_META)](*args, **kwargs, **_INTERPRET_META)
    else:
        _TUNED[name][lambda meta: _check_grid(grid(meta))](*args, **kwargs)


# ----------------------------------------------------------------------------- grids


def _check_grid(grid):
    if grid[0] > MAX_GRID_X or any(g > MAX_GRID_YZ for g in grid[1:]):
        raise ValueError(f"prefix_attention: launch grid {grid} exceeds CUDA's limits (x < 2^31, y/z <= 65535)")
    return grid


def grids(B, H, Hkv, S, T, P, D, n_tasks=1, block_m=16, block_n=16) -> dict:
    """The launch grid of every kernel for a shape (host-side, nothing launched): 1-D grids whose
    only axis holds the large ``B * H`` (or ``B * Hkv``) product."""
    return {
        "fwd": (triton.cdiv(S, block_m) * B * H,),
        "pre": (triton.cdiv(S, 16 if _INTERPRET else _PRE_BLOCK_M) * B * H,),
        "dkv": ((triton.cdiv(P, block_n) + triton.cdiv(T, block_n)) * B * Hkv,),
        "dq": (triton.cdiv(S, block_m) * B * H,),
        "reduce": (n_tasks * triton.cdiv(Hkv * P * D, _REDUCE_BLOCK),) if P else (0,),
    }


# ----------------------------------------------------------------------------- host side


def deterministic() -> bool:
    """The backward's choice: ``torch.use_deterministic_algorithms(True)`` or
    ``PTUNE_FAST_DETERMINISTIC=1`` -> the split backward (no atomics, bitwise reproducible);
    otherwise the fused one (dQ by fp32 atomics: FlashAttention-2's default, run-to-run dQ may
    differ in the last bits; dK, dV and the prefix gradients are reproducible either way)."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get(DETERMINISTIC_ENV_VAR, "0").strip() == "1"


def backward_path(D: int, dtype: torch.dtype, dropout: bool) -> str:
    """``"fused"`` (one dK/dV/dQ kernel, dQ by fp32 atomics, 5 matmuls per tile pair) or ``"split"``
    (dK/dV, then dQ: 7 matmuls, no atomics). Split when :func:`deterministic`, with dropout (the
    fused kernel regenerating the Philox mask spills in every tile on sm_80/sm_90: AOT report), for
    ``D > 128``, and for compiled fp32 (TF32 opt-in; no spill-free fused tile measured). Under the
    interpreter the same rule applies except for fp32, which takes the fused path there too."""
    if deterministic() or dropout or _block_d(D) > 128:
        return "split"
    if dtype == torch.float32 and not _INTERPRET:
        return "split"
    return "fused"


def tf32_allowed() -> bool:
    """``PTUNE_FAST_TRITON_TF32=1``: let the Triton kernels serve fp32 on CUDA with TF32 dots."""
    return os.environ.get(TF32_ENV_VAR, "0").strip() == "1"


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
        if q.dtype == torch.float32 and not tf32_allowed():
            return (f"fp32 on CUDA: IEEE-fp32 Triton dots compile for minutes and spill; {TF32_ENV_VAR}=1 "
                    f"opts in to TF32 dots")
        if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
            return "bf16 needs compute capability >= 8.0"
    return ""


def _lastdim_contig(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _dot_prec(dtype, interpret=None) -> str:
    interpret = _INTERPRET if interpret is None else interpret
    if dtype == torch.float32:
        return "ieee" if interpret else "tf32"  # compiled fp32 only runs with the TF32 opt-in
    return "upcast" if interpret and dtype == torch.bfloat16 else "tf32"  # (ignored for 16-bit dots)


def kernel_constexprs(D, dtype, *, causal, dropout, kpm, bank, store_lse=True, interpret=None) -> dict:
    """The constexpr arguments (other than the tile sizes) of the fwd/dkv/dq kernels."""
    return dict(D=D, BLOCK_D=_block_d(D), IS_CAUSAL=bool(causal), HAS_KPM=bool(kpm), IS_BANK=bool(bank),
                DROPOUT=bool(dropout), STORE_LSE=bool(store_lse), DOT_PREC=_dot_prec(dtype, interpret))


def _common(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, scale, causal, dropout_p):
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    n_tasks = 1
    if P:
        pk, pv = _lastdim_contig(prefix_k), _lastdim_contig(prefix_v)
        bank = pk.dim() == 4
        pk_strides = (pk.stride(0), pk.stride(1), pk.stride(2)) if bank else (0, pk.stride(0), pk.stride(1))
        pv_strides = (pv.stride(0), pv.stride(1), pv.stride(2)) if bank else (0, pv.stride(0), pv.stride(1))
        tid = task_ids.contiguous() if bank else q
        n_tasks = pk.shape[0] if bank else 1
    else:
        pk = pv = tid = q
        bank, pk_strides, pv_strides = False, (0, 0, 0), (0, 0, 0)
    if key_padding_mask is not None:
        kpm = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
        kpm = kpm.contiguous().view(torch.int8)
    else:
        kpm = q
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    meta = kernel_constexprs(D, q.dtype, causal=causal, dropout=dropout_p > 0.0, kpm=key_padding_mask is not None,
                             bank=bank)
    dims = (B, H, S, D, Hkv, T, P, n_tasks, scale)
    return dims, (q, k, v, pk, pv, tid, kpm), (pk_strides, pv_strides), meta


def new_rng_state(device) -> torch.Tensor:
    """A fresh dropout seed: int64 ``[1]`` on ``device``, drawn from torch's generator (no host sync)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def forward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p,
            need_lse=True, rng=None, out_bshd=False):
    """Returns ``(out, lse [B,H,S] fp32 (or empty), rng int64 [1] (or empty))``; ``out`` is
    ``[B,H,S,D]``, or with ``out_bshd`` a contiguous ``[B,S,H,D]`` written in place by the kernel."""
    (B, H, S, D, Hkv, T, P, n_tasks, scale), (q, k, v, pk, pv, tid, kpm), (pks, pvs), meta = _common(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, scale, causal, dropout_p)
    if out_bshd:
        out_mem = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
        out = out_mem.transpose(1, 2)  # the kernel's [B, H, S, D] view of [B, S, H, D] memory
    else:
        out_mem = out = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S) if need_lse else (0,), dtype=torch.float32, device=q.device)
    dropout = meta["DROPOUT"]
    if dropout and rng is None:
        rng = new_rng_state(q.device)
    if not dropout:
        rng = torch.empty((0,), dtype=torch.int64, device=q.device)
    meta["STORE_LSE"] = need_lse
    _launch(_fwd_kernel, "fwd", lambda META: grids(B, H, Hkv, S, T, P, D, block_m=META["BLOCK_M"])["fwd"],
            q, k, v, pk, pv, tid, kpm, out, lse, rng if dropout else q,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *pks, *pvs, out.stride(0), out.stride(1), out.stride(2),
            kpm.stride(0) if meta["HAS_KPM"] else 0,
            H, H // Hkv, S, T, P, n_tasks, scale * LOG2E, float(dropout_p), _bucket(S), _bucket(T), **meta)
    return out_mem, lse, rng


def _bucket(n: int) -> int:
    """Autotune key bucket: next power of two (>= 16, so the argument never specializes)."""
    return max(16, triton.next_power_of_2(n))


def backward(dout, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng,
             causal, scale, dropout_p):
    """Returns ``(dq, dk, dv, dprefix_k, dprefix_v)``; the prefix grads are None without a prefix,
    have the prefix's shape (shared: summed over rows; bank: per entry) and dtype otherwise.
    ``dout`` and ``out`` are ``[B,H,S,D]`` with any strides (e.g. views of ``[B,S,H,D]`` memory)."""
    (B, H, S, D, Hkv, T, P, n_tasks, scale), (q, k, v, pk, pv, tid, kpm), (pks, pvs), meta = _common(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, scale, causal, dropout_p)
    meta.pop("STORE_LSE")
    dout = _lastdim_contig(dout)
    out = _lastdim_contig(out)
    dev = q.device
    delta = torch.empty((B, H, S), dtype=torch.float32, device=dev)
    bm_pre = 16 if _INTERPRET else _PRE_BLOCK_M
    _bwd_pre[_check_grid(grids(B, H, Hkv, S, T, P, D)["pre"])](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), H, S, D=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=bm_pre)
    dk = torch.empty((B, Hkv, T, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, T, D), dtype=v.dtype, device=dev)
    if P:
        dpk_part = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=dev)
        dpv_part = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=dev)
    else:
        dpk_part = dpv_part = delta
    rng_arg = rng if meta["DROPOUT"] else q
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), *pks, *pvs, dout.stride(0), dout.stride(1), dout.stride(2),
               kpm.stride(0) if meta["HAS_KPM"] else 0)
    fuse = backward_path(D, q.dtype, meta["DROPOUT"]) == "fused"
    # fused: dQ accumulated in fp32 with atomics by the dK/dV programs (5 matmuls per tile pair);
    # deterministic: a separate dQ pass (7 matmuls), no atomics
    dqa = torch.zeros((B, H, S, D), dtype=torch.float32, device=dev) if fuse else q
    _launch(_bwd_dkv_kernel, "dkvq" if fuse else "dkv",
            lambda META: grids(B, H, Hkv, S, T, P, D, block_n=META["BLOCK_N"])["dkv"],
            q, k, v, pk, pv, tid, kpm, dout, lse, delta, rng_arg, dk, dv, dpk_part, dpv_part, dqa, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, Hkv, H // Hkv, S, T, P, n_tasks, scale, scale * LOG2E, float(dropout_p), _bucket(S), _bucket(T),
            FUSE_DQ=fuse, **meta)
    if fuse:
        dq = dqa.to(q.dtype)
    else:
        dq = torch.empty((B, H, S, D), dtype=q.dtype, device=dev)
        _launch(_bwd_dq_kernel, "dq", lambda META: grids(B, H, Hkv, S, T, P, D, block_m=META["BLOCK_M"])["dq"],
                q, k, v, pk, pv, tid, kpm, dout, lse, delta, rng_arg, dq, *strides,
                dq.stride(0), dq.stride(1), dq.stride(2),
                H, H // Hkv, S, T, P, n_tasks, scale, scale * LOG2E, float(dropout_p), _bucket(S), _bucket(T),
                **meta)
    dpk = dpv = None
    if P:
        dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=dev)
        dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=dev)
        grid = _check_grid(grids(B, H, Hkv, S, T, P, D, n_tasks=n_tasks)["reduce"])
        for part, grad in ((dpk_part, dpk), (dpv_part, dpv)):
            _prefix_grad_reduce[grid](part, tid, grad, B, n_tasks, Hkv * P * D, IS_BANK=meta["IS_BANK"],
                                      BLOCK=_REDUCE_BLOCK)
    return dq, dk, dv, dpk, dpv


def run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p, out_bshd=False):
    """Forward only (no LSE kept): ``out [B,H,S,D]`` (or ``[B,S,H,D]`` with ``out_bshd``)."""
    return forward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p,
                   need_lse=False, out_bshd=out_bshd)[0]


def dropout_keep_mask(rng, B, H, S, P, T, dropout_p) -> torch.Tensor:
    """The keep mask ``[B, H, S, P + T]`` (bool; prefix columns first) that the kernels derive from
    ``rng`` -- for tests and debugging."""
    n = B * H * S * (P + T)
    keep = torch.empty(n, dtype=torch.int8, device=rng.device)
    block = 1024
    _dropout_mask_kernel[(triton.cdiv(n, block),)](rng, keep, n, float(dropout_p), BLOCK=block)
    return keep.view(B, H, S, P + T).bool()
