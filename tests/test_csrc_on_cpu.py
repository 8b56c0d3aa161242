"""csrc/ CUDA kernels executed on the CPU (tests/cuda_host): numerics against ptune_fast.reference,
with the shared-memory race checker and the warp-mask checks on for every launch.

The kernels are compiled from the same .cu files with g++ against tests/cuda_host/cuda_host.h
(one build per session, cached on the sources' hash) and called through the same code path as
the CUDA extension: the ops' Python preparation (ptune_fast.ops.decode_attention._vec_ready, ...),
the struct-filling functions of csrc/kernels.h that csrc/bindings.cpp uses, decode_attention_plan
and the launchers. Error bounds are those of the GPU tests (tests/test_decode_attention.py,
tests/test_prompt_encoder.py); the emulator rounds fp16/bf16 to nearest even like the device.

PTF_HOST_LIBS=<kernels.so>:<runtime.so> runs the tests against a prebuilt library (the mutation
tests, tests/test_csrc_mutations.py, use it to run this suite on mutants).
"""
import os

import pytest
import torch

from ptune_fast import reference
from tests.cuda_host import harness
from tests.test_decode_attention import UNIT_ROUNDOFF, make_inputs
from tests.test_prompt_encoder import _check as check_encoder
from tests.test_prompt_encoder import make_head, make_x

WHY = harness.why_unavailable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY or "")
F16, BF16 = torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def kern():
    libs = os.environ.get("PTF_HOST_LIBS")
    k = harness.Kernels(*(libs.split(os.pathsep) if libs else harness.build()))
    return k


@pytest.fixture(autouse=True)
def _fresh_device(kern):
    """Every test starts on the default fake device with an empty launch log."""
    kern.configure()
    kern.launch_log()


# ============================================================================ the emulator itself


def test_fp16_bf16_rounding_is_round_to_nearest_even(kern):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-6, 1e-3, 1.0, 1e3, 6e4, 1e38)])
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5, 2**-25, 65520.0, 1 + 2**-8, 1 + 3 * 2**-8])
    x = torch.cat([x, ties, -ties, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    for dt in (F16, BF16):
        got = kern.round_to(x, dt)
        assert torch.equal(got.view(torch.int16), x.to(dt).view(torch.int16)), dt
        assert torch.isnan(kern.round_to(torch.tensor([float("nan")]), dt).float()).all()


def _expect_reports(kern, kernel, out, scratch, cases):
    """Each (which, regex): the selftest launch fails with a report matching regex."""
    for which, match in cases:
        with pytest.raises(harness.KernelError, match=match):
            kern.selftest(kernel, which, out, scratch)


def test_shared_memory_checker(kern):
    out, scratch = torch.zeros(96 * 8, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
    kern.selftest(0, 3, out, scratch)  # correct: out[t] = 10 * (t - 1)
    assert out[1:64].tolist() == [10 * t for t in range(63)]
    _expect_reports(kern, 0, out, scratch, (
        (0, r"racecheck: kernel shared_kernel, block \(0,0,0\): read-after-write hazard: thread \(1,0,0\) "
            r"reads 4 byte\(s\) at shared\+0x[0-9a-f]+ \[.*shared_kernel.*::s\+0\].*written by thread \(0,0,0\) "
            r"since the block started"),
        (1, r"write-after-read hazard: thread \(1,0,0\) writes .*::s\+4\].* read by thread \(0,0,0\) "
            r"since the block's barrier #1"),
        (2, r"initcheck: .*uninitialized read: thread \(6,0,0\) .*::s\+20\]")))


def test_warp_collectives_and_their_mask_checks(kern):
    out, scratch = torch.zeros(96 * 8, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
    kern.selftest(1, 0, out, scratch)
    got = out.view(96, 8)
    t = torch.arange(96)
    lane, base = t % 32, t - t % 32
    assert torch.equal(got[:, 0], base + (lane ^ 5))
    assert torch.equal(got[:, 1], torch.where(lane + 3 < 32, t + 3, t))
    assert torch.equal(got[:, 2], torch.where(lane % 16 >= 2, t - 2, t))  # width 16
    assert torch.equal(got[:, 3], base + lane // 8 * 8 + 7)  # width 8
    ballot = [sum(1 << i for i in range(32) if (b + i) % 3 == 0) for b in base.tolist()]
    assert got[:, 4].tolist() == [m - 2**32 if m >= 2**31 else m for m in ballot]
    assert got[:, 5].eq(1).all() and got[:, 6].eq(0).all() and got[:, 7].eq(48).all()
    _expect_reports(kern, 1, out, scratch, (
        (1, r"__shfl_xor_sync\(mask 0xffffffff\).*did not arrive: lane 16 \(exited\)"),
        (2, r"mask 0x0000ffff\) in thread \(16,0,0\).*does not name its own lane"),
        (3, r"lane 0 reads lane 16, which is not in the mask"),
        (4, r"did not arrive: lane 0 \(__syncthreads\)")))


def test_atomics_and_cooperative_grid_sync(kern):
    out, scratch = torch.zeros(96 * 8, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
    kern.selftest(2, 0, out, scratch)
    assert out[0] == 7 * 33 and scratch[:1].view(torch.float32).item() == 7 * 33 * 0.5
    kern.selftest(3, 0, out, scratch)  # 5 blocks exchange values across grid.sync()
    assert out[:5].tolist() == [2, 3, 4, 5, 1]
    with pytest.raises(harness.KernelError, match="grid.sync.*without cooperative launch"):
        kern.selftest(4, 0, out, scratch)


# ============================================================================ decode attention


def check_decode(kern, x, dtype, causal=True, num_splits=0, num_sms=132, bad_rows=()):
    """The kernel on dtype inputs against the reference: FlashAttention's bound (see
    tests/test_decode_attention.py); rows of invalid task ids must be NaN."""
    lp = {n: (t.to(dtype) if t is not None and t.is_floating_point() else t) for n, t in x.items()}
    out, plan = kern.decode_attention(**lp, causal=causal, num_splits=num_splits, num_sms=num_sms)
    f32 = {n: (t.float() if t is not None and t.is_floating_point() else t) for n, t in lp.items()}
    ref32 = reference.prefix_attention(**f32, causal=causal)
    ref_lp = reference.prefix_attention(**lp, causal=causal)
    ok = torch.ones(out.shape[0], dtype=torch.bool)
    ok[list(bad_rows)] = False
    assert torch.isnan(out[~ok]).all() and torch.isnan(ref32[~ok]).all()
    out, ref32, ref_lp = out[ok].float(), ref32[ok], ref_lp[ok].float()
    assert torch.isfinite(out).all()
    err = (out - ref32).abs().max().item()
    ref_err = (ref_lp - ref32).abs().max().item()
    eps = 4 * UNIT_ROUNDOFF[dtype] * max(1.0, ref32.abs().max().item())
    assert err <= 2 * ref_err + eps, f"max err {err:.3g} > 2 * {ref_err:.3g} + {eps:.3g}"
    return plan


# D, dtype, Hkv, rep (GQA ratio H / Hkv), S, T, P, prefix, pad, causal, num_splits (0 = heuristic)
DECODE_CASES = [
    (64, F16, 2, 1, 1, 37, 7, "shared", None, True, 1),
    (64, BF16, 2, 4, 2, 70, 0, None, "left", True, 0),
    (64, F16, 1, 8, 8, 45, 19, "bank", "ragged", True, 3),
    (64, BF16, 2, 1, 5, 33, 32, "shared", "hole", False, 2),
    (80, F16, 2, 4, 1, 50, 7, "bank", None, True, 1),
    (80, BF16, 1, 8, 3, 65, 0, None, "ragged", True, 3),
    (80, F16, 2, 1, 8, 40, 13, "shared", "left", False, 1),
    (80, BF16, 2, 4, 4, 90, 5, "bank", "hole", True, 4),
    (96, F16, 2, 8, 1, 35, 7, "shared", None, True, 2),
    (96, BF16, 2, 1, 2, 64, 0, None, None, True, 1),
    (96, F16, 1, 4, 6, 41, 11, "bank", "ragged", True, 3),
    (96, BF16, 2, 8, 7, 55, 0, None, "hole", True, 1),
    (128, F16, 1, 1, 3, 37, 7, "bank", "left", True, 2),
    (128, BF16, 2, 4, 8, 60, 9, "shared", None, False, 1),
    (128, F16, 1, 8, 2, 100, 3, "shared", "ragged", True, 4),
    (128, BF16, 2, 1, 1, 33, 0, None, "all", True, 1),  # row 0 fully padded, no prefix: zeros
    (64, F16, 2, 4, 1, 9, 5, "shared", "all", True, 1),  # row 0 sees the prefix only
]


def _case_id(c):
    D, dt, Hkv, rep, S, T, P, prefix, pad, causal, splits = c
    return (f"D{D}-{'f16' if dt == F16 else 'bf16'}-Hkv{Hkv}x{rep}-S{S}-T{T}-P{P}-{prefix or 'noprefix'}"
            f"-{pad or 'nopad'}-{'causal' if causal else 'full'}-splits{splits}")


@pytest.mark.parametrize("case", DECODE_CASES, ids=[_case_id(c) for c in DECODE_CASES])
def test_decode_matches_reference(kern, case):
    D, dtype, Hkv, rep, S, T, P, prefix, pad, causal, splits = case
    B = 3 if prefix == "bank" else 2
    x = make_inputs(B=B, H=Hkv * rep, Hkv=Hkv, S=S, T=T, P=P, D=D, bank=prefix == "bank", pad=pad,
                    seed=D + T, n_tasks=3)
    bad = ()
    if prefix == "bank":  # row 1: id -1, row 2: id N (both NaN rows); int32 ids on odd T
        x["task_ids"] = torch.tensor([2, -1, 3], dtype=torch.int32 if T % 2 else torch.int64)
        bad = (1, 2)
    if pad and T % 2:  # the other mask dtypes the kernel reads (1-, 4-, 8-byte)
        x["key_padding_mask"] = x["key_padding_mask"].to(torch.int64 if T % 4 == 1 else torch.uint8)
    q_groups, num_splits, tiles = check_decode(kern, x, dtype, causal, splits, bad_rows=bad)
    n_tiles = -(-(P + T) // 32)
    assert q_groups == -(-(rep * S) // (8 if rep * S <= 8 else 32))
    assert (num_splits - 1) * tiles < n_tiles <= num_splits * tiles  # every key, no empty split
    if splits:  # requested: at most that many, and several whenever asked and there are tiles to split
        assert num_splits <= splits and (num_splits > 1) == (splits > 1 and n_tiles > 1)
    log = kern.launch_log()
    assert len(log) == (2 if num_splits > 1 else 1) and f"grid=({B * Hkv * q_groups},{num_splits},1)" in log[0]


@pytest.mark.parametrize("dtype", (F16, BF16), ids=("f16", "bf16"))
@pytest.mark.parametrize("D", (64, 80, 96, 128))
def test_decode_every_head_dim_gqa_ratio_and_query_count(kern, D, dtype):
    """GQA ratio 1/4/8 x S = 1..8 (rows per block 8 or 32, one or two query groups), with a
    shared prefix and one split or three, T not a multiple of the tile."""
    for rep in (1, 4, 8):
        for S in range(1, 9):
            x = make_inputs(B=1, H=2 * rep, Hkv=2, S=S, T=41, P=5, D=D, seed=S + rep)
            check_decode(kern, x, dtype, num_splits=1 + 2 * (S % 2))


def test_decode_strided_inputs_and_heuristic_splits(kern):
    """q a strided view (q_sd = 2, heads and tokens transposed), k/v slices of a longer cache; num_splits from
    the SM-count heuristic of decode_attention_plan."""
    B, H, Hkv, S, T, P, D = 2, 8, 2, 3, 200, 16, 64
    x = make_inputs(B=B, H=H, Hkv=Hkv, S=S, T=T, P=P, D=D, pad="ragged", seed=5)
    q = torch.zeros(B, S, H, D, 2, dtype=torch.float16)  # [B, S, H] storage, every other element
    q[..., 0] = x["q"].transpose(1, 2)
    x["q"] = q[..., 0].transpose(1, 2)
    cache = torch.randn(2, B, Hkv, T + 24, D).half()
    cache[:, :, :, :T] = torch.stack([x["k"], x["v"]])
    x["k"], x["v"] = cache[0, :, :, :T], cache[1, :, :, :T]
    assert x["q"].stride() == (S * H * D * 2, D * 2, H * D * 2, 2) and not x["k"].is_contiguous()
    _, splits, _ = check_decode(kern, x, F16, num_splits=0, num_sms=8)
    assert splits == 2  # 4 blocks for 2 * 8 SMs -> 4 splits, capped at ceil(7 tiles / 4) = 2
    assert "grid=(4,2,1)" in kern.launch_log()[0]


def test_decode_splits_agree_and_empty_inputs(kern):
    x = make_inputs(B=2, H=4, Hkv=1, S=2, T=150, P=10, D=64, seed=3)
    lp = {n: (t.half() if t is not None and t.is_floating_point() else t) for n, t in x.items()}
    outs = [kern.decode_attention(**lp, num_splits=n)[0] for n in (1, 2, 5)]
    for o in outs[1:]:  # the GPU test's tolerance (split merging reorders fp32 sums)
        torch.testing.assert_close(o, outs[0], atol=2e-3, rtol=2e-3)
    assert len(kern.launch_log()) == 5  # split kernel x 3, combine kernel x 2
    empty = {n: (t[:, :, :0] if n in ("k", "v") else t) for n, t in lp.items() if n in ("q", "k", "v")}
    out, _ = kern.decode_attention(**empty, causal=False)  # P + T == 0: zeros, no launch
    assert out.eq(0).all() and kern.launch_log() == []


# ============================================================================ prompt encoder


@pytest.mark.parametrize("layers, act, n, dims, out_dtype", [
    (1, "tanh", 5, (36, 20), torch.float32),
    (2, "tanh", 33, (132, 260, 68), BF16),
    (3, "relu", 70, (20, 132, 36, 20), torch.float32),
    (4, "relu", 1, (260, 36, 132, 20, 44), F16),
])
def test_encoder_matches_reference(kern, layers, act, n, dims, out_dtype):
    g = torch.Generator().manual_seed(n)
    ws = [torch.randn(o, i, generator=g) / i**0.5 for i, o in zip(dims[:-1], dims[1:])]
    bs = [torch.randn(o, generator=g) * 0.1 if l % 2 == 0 else None for l, o in enumerate(dims[1:])]
    x = make_x(n, dims[0])
    kern.configure(num_sms=3, blocks_per_sm=2)  # 6 co-resident blocks: the tile loop wraps
    out = kern.encoder_mlp(x, ws, bs, act, out_dtype)
    check_encoder(out, x, ws, bs, act, out_dtype)
    tiles = max(-(-n // 32) * -(-o // 16) for o in dims[1:])
    assert f"grid=({min(tiles, 6)},1,1) block=(256,1,1) cooperative" in kern.launch_log()[0]


def test_encoder_indices_bad_rows_and_strided_x(kern):
    ws, bs, act = make_head("prefix", 36, 132, d_out=68)
    table = make_x(50, 40)[:, :36]  # row stride 40 (a multiple of 4: read in place)
    for dt in (torch.int32, torch.int64):
        idx = torch.tensor([3, 49, -1, 0, 50, 7, 7, 12], dtype=dt)
        out = kern.encoder_mlp(table, ws, bs, act, F16, indices=idx)
        ok = (idx >= 0) & (idx < 50)
        assert torch.isnan(out[~ok]).all()  # a bad index is a NaN row, not a fault
        check_encoder(out[ok], table, ws, bs, act, F16, idx[ok])


def test_encoder_refuses_without_cooperative_launch(kern):
    ws, bs, act = make_head("ptuning", 20, 36)
    kern.configure(cooperative=False)
    with pytest.raises(harness.KernelError, match="cudaError 801"):
        kern.encoder_mlp(make_x(4, 20), ws, bs, act)
    kern.configure()
    kern.encoder_mlp(make_x(4, 20), ws, bs, act)
