"""prefix_attention: Triton kernels (run under TRITON_INTERPRET=1 on CPU) against the reference,
the torch.library registration (torch.compile, autograd), dispatch and input checks.

Error bound (FlashAttention's rule): for every output and gradient,
``max|kernel - ref64| <= 3 * max|ref_lp - ref64| + eps`` where ``ref64`` is the reference on
the fp64-cast inputs and ``ref_lp`` the reference run on the same low-precision inputs. Our
reference computes in fp32 and only rounds at its inputs/outputs, whereas a kernel must also
round the probabilities and dS tiles to the input dtype before its tensor-core dots; ``eps``
covers that: a few units in the last place of the dtype, scaled by the largest ``|ref64|``
(``EPS_ULPS * kernel_roundoff * max(1, max|ref64|)``). For fp32 the unit roundoff is 2^-24, and
the extra allowance covers accumulation-order differences over up to P + T terms.

The kernel's roundoff is the error of *its* casts: the unit roundoff on a GPU (round to nearest),
but Triton's interpreter truncates fp32 -> bf16, so there bf16 gets one ulp (2^-7) instead of
half a ulp (``KERNEL_ROUNDOFF``; ``test_kernel_cast_error_is_what_the_bounds_assume`` measures the
cast and fails if it is worse). ``ref_lp`` comes from torch, which rounds to nearest everywhere,
so no bound depends on which of the two roundings the kernels' platform does.
"""
import importlib
import itertools
import os
import types

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is created

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptune_fast import _backend, reference
from ptune_fast.ops import prefix_attention

pa = importlib.import_module("ptune_fast.ops.prefix_attention")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FLOAT_ARGS = ("q", "k", "v", "prefix_k", "prefix_v")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
EPS_ULPS = {torch.float32: 64, torch.float16: 4, torch.bfloat16: 4}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: the relative error of the kernels' own fp32 -> dtype casts (probability / dS tiles, outputs):
#: a GPU rounds to nearest (the unit roundoff); Triton's interpreter *truncates* fp32 -> bf16
#: (measured: max relative error 2^-7 -- one ulp -- instead of 2^-8; fp16 casts round to nearest),
#: so under the interpreter the bf16 allowance is one ulp (test_kernel_cast_error_is_what_the_bounds_assume)
KERNEL_ROUNDOFF = {**UNIT_ROUNDOFF, **({torch.bfloat16: 2.0**-7} if INTERPRET else {})}


# ----------------------------------------------------------------------------- helpers


def make_inputs(B=2, H=4, Hkv=2, S=5, T=None, P=7, D=64, bank=False, pad=None, seed=0, n_tasks=3):
    """Fresh N(0,1) fp32 CPU inputs (never zeros) and an upstream gradient."""
    T = S if T is None else T
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x = dict(q=rnd(B, H, S, D), k=rnd(B, Hkv, T, D), v=rnd(B, Hkv, T, D), prefix_k=None, prefix_v=None,
             task_ids=None, key_padding_mask=None)
    if P:
        shape = (n_tasks, Hkv, P, D) if bank else (Hkv, P, D)
        x["prefix_k"], x["prefix_v"] = rnd(*shape), rnd(*shape)
        if bank:
            x["task_ids"] = torch.tensor([2, 0, 2, 0][:B])  # entry 1 unused: its grad must be 0
    if pad:
        m = torch.ones(B, T, dtype=torch.bool)
        if pad in ("left", "both"):
            m[0, : min(3, T)] = False
        if pad in ("right", "both"):
            m[B - 1, max(T - 2, 0):] = False
        x["key_padding_mask"] = m
    return x, rnd(B, H, S, D)


def run(fn, x, dout, dtype, causal, device=DEV, **kw):
    """``fn(**inputs)`` on ``dtype`` leaves; returns ``{"out": ..., "q": dq, ...}`` (fp64 copies)."""
    leaves = {n: (x[n].to(device, dtype).requires_grad_() if x[n] is not None else None) for n in FLOAT_ARGS}
    other = {n: (x[n].to(device) if x[n] is not None else None) for n in ("task_ids", "key_padding_mask")}
    out = fn(**leaves, **other, causal=causal, **kw)
    wrt = [n for n in FLOAT_ARGS if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in wrt], dout.to(device, out.dtype))
    res = {"out": out.detach().double().cpu()}
    res.update({n: g.double().cpu() for n, g in zip(wrt, grads)})
    return res


def check_against_reference(x, dout, dtype, causal, monkeypatch, backend="triton", device=DEV):
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    before = _backend.CALLS[(pa.OP, backend)]
    got = run(prefix_attention, x, dout, dtype, causal, device)
    assert _backend.CALLS[(pa.OP, backend)] == before + 1
    monkeypatch.delenv(_backend.ENV_VAR)
    ref64 = run(reference.prefix_attention, x, dout, torch.float64, causal, device)
    ref_lp = run(reference.prefix_attention, x, dout, dtype, causal, device)
    for name, r in ref64.items():
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"
        err = (got[name] - r).abs().max().item()
        base = (ref_lp[name] - r).abs().max().item()
        eps = EPS_ULPS[dtype] * KERNEL_ROUNDOFF[dtype] * max(1.0, r.abs().max().item())
        assert err <= 3 * base + eps, f"{name}: |kernel - ref64| = {err:.3g} > 3 * {base:.3g} + {eps:.3g}"
    return got


# ----------------------------------------------------------------------------- kernel vs reference

def _grid():
    """P x S x causal in full (fp32); D, GQA, cache offset, padding and bank rotate over the cases
    so that every value meets every other in some case without a full product."""
    cases = []
    for i, (P, S, causal) in enumerate(itertools.product((0, 1, 7), (1, 5, 17), (True, False))):
        D = (64, 80, 128)[i % 3]
        H, Hkv = ((4, 2), (2, 2))[i % 2]
        T = S + (0, 3)[(i // 2) % 2]
        pad = (None, "left", "right", "both")[i % 4]
        bank = bool(P) and (i // 3) % 2 == 1
        cases.append(pytest.param(dict(H=H, Hkv=Hkv, S=S, T=T, P=P, D=D, pad=pad, bank=bank), causal,
                                  id=f"P{P}-S{S}-T{T}-D{D}-H{H}kv{Hkv}-{pad}-{'bank' if bank else 'shared'}-"
                                     f"{'causal' if causal else 'bidir'}"))
    return cases


@pytest.mark.parametrize("shape, causal", _grid())
def test_triton_fp32_grid(shape, causal, monkeypatch):
    x, dout = make_inputs(seed=hash(str(shape)) % 1000, **shape)
    got = check_against_reference(x, dout, torch.float32, causal, monkeypatch)
    if shape["bank"]:
        assert got["prefix_k"][1].abs().max() == 0 and got["prefix_v"][1].abs().max() == 0


LOW_PRECISION_CASES = [
    pytest.param(dict(H=4, Hkv=2, S=17, T=17, P=7, D=128, pad="left", bank=True), True, id="gqa-bank-left-causal"),
    pytest.param(dict(H=2, Hkv=2, S=5, T=8, P=1, D=80, pad="right"), False, id="mha-cache-right-bidir"),
    pytest.param(dict(H=4, Hkv=1, S=17, T=20, P=0, D=64, pad="both"), True, id="mqa-noprefix-both-causal"),
    pytest.param(dict(H=4, Hkv=2, S=1, T=9, P=7, D=128), True, id="decode-S1-cache"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape, causal", LOW_PRECISION_CASES)
def test_triton_low_precision(shape, causal, dtype, monkeypatch):
    x, dout = make_inputs(seed=7, **shape)
    check_against_reference(x, dout, dtype, causal, monkeypatch)


@pytest.mark.parametrize("shape", [
    pytest.param(dict(H=2, Hkv=1, S=5, T=6, P=3, D=96, pad="left"), id="D96"),
    pytest.param(dict(H=2, Hkv=2, S=3, T=3, P=2, D=256, bank=True), id="D256"),
    pytest.param(dict(H=2, Hkv=1, S=17, T=20, P=20, D=64, pad="both", bank=True), id="P20-multiblock-prefix"),
    pytest.param(dict(B=3, H=2, Hkv=2, S=4, T=4, P=0, D=64, pad="left"), id="fully-masked-rows"),
])
def test_triton_more_shapes(shape, monkeypatch):
    x, dout = make_inputs(seed=3, **shape)
    got = check_against_reference(x, dout, torch.float32, True, monkeypatch)
    if shape["P"] == 0:  # row 0: queries 0..2 see only padded keys -> output 0, zero grads
        assert got["out"][0, :, :3].abs().max() == 0 and got["q"][0, :, :3].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_cast_error_is_what_the_bounds_assume(dtype):
    """The Triton casts fp32 -> dtype on this platform err by at most KERNEL_ROUNDOFF (relative):
    the error the low-precision bounds allow for. Under the interpreter bf16 truncates (error up to
    one ulp, more than torch's rounding: the reason for its larger allowance)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(Y + o, tl.load(X + o).to(Y.dtype.element_ty))

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(DEV)
    y = torch.empty(4096, dtype=dtype, device=DEV)
    cast[(1,)](x, y, N=4096)
    rel = ((y.float() - x).abs() / x.abs()).max().item()
    assert rel <= KERNEL_ROUNDOFF[dtype], rel
    if INTERPRET and dtype == torch.bfloat16:  # documents why the allowance is larger there
        assert not torch.equal(y, x.to(dtype)) and rel > UNIT_ROUNDOFF[dtype]


BACKWARD_MODES = [pytest.param("0", id="fused"), pytest.param("1", id="deterministic")]


@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("shape, causal", [
    # 16 x 16 interpreter tiles: interior and boundary key blocks, a partial prefix block (P = 20),
    # causal diagonals that cut tiles (T - S = 5), a partial last query block, padding
    pytest.param(dict(B=2, H=2, Hkv=1, S=40, T=45, P=20, D=64, pad="both", bank=True), True, id="causal-bank-pad"),
    pytest.param(dict(B=2, H=4, Hkv=2, S=33, T=33, P=16, D=80), True, id="causal-square-P16"),
    pytest.param(dict(B=2, H=2, Hkv=2, S=35, T=37, P=5, D=64, pad="left"), False, id="bidir-pad"),
])
def test_fused_and_split_backward_match_the_reference(mode, shape, causal, monkeypatch):
    """Both backward paths (fused 5-matmul with fp32 dQ atomics; the deterministic split) on shapes
    that exercise the interior (mask-free) and boundary (masked) tiles of every kernel."""
    monkeypatch.setenv("PTUNE_FAST_DETERMINISTIC", mode)
    x, dout = make_inputs(seed=21, **shape)
    check_against_reference(x, dout, torch.float32, causal, monkeypatch)


def test_backward_kernels_follow_the_determinism_setting(monkeypatch):
    """Default: the fused dK/dV/dQ kernel only; torch.use_deterministic_algorithms(True) or
    PTUNE_FAST_DETERMINISTIC=1: the split dK/dV + dQ kernels (no atomics), bitwise reproducible."""
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    launched = []
    real = tri._launch
    monkeypatch.setattr(tri, "_launch", lambda raw, name, *a, **kw: (launched.append(name), real(raw, name, *a, **kw)))
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    x, dout = make_inputs(B=2, H=2, Hkv=1, S=18, T=18, P=3, D=16, bank=True, pad="left", seed=4)
    monkeypatch.delenv("PTUNE_FAST_DETERMINISTIC", raising=False)
    fused = run(prefix_attention, x, dout, torch.float32, True, DEV)
    assert launched == ["fwd", "dkvq"]
    launched.clear()
    monkeypatch.setenv("PTUNE_FAST_DETERMINISTIC", "1")
    split = [run(prefix_attention, x, dout, torch.float32, True, DEV) for _ in range(2)]
    assert launched == ["fwd", "dkv", "dq"] * 2
    assert all(torch.equal(split[0][n], split[1][n]) for n in split[0])
    monkeypatch.delenv("PTUNE_FAST_DETERMINISTIC")
    launched.clear()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run(prefix_attention, x, dout, torch.float32, True, DEV)
    finally:
        torch.use_deterministic_algorithms(was)
    assert launched == ["fwd", "dkv", "dq"]
    # dropout, D > 128: the split backward whatever the setting (no spill-free fused tile there)
    assert tri.backward_path(64, torch.bfloat16, dropout=True) == "split"
    assert tri.backward_path(256, torch.bfloat16, dropout=False) == "split"
    assert tri.backward_path(64, torch.bfloat16, dropout=False) == "fused"
    for n in fused:  # the two paths differ only by summation order
        torch.testing.assert_close(fused[n], split[0][n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_gradients_stay_finite_when_every_score_is_very_negative(mode, monkeypatch):
    """All logits about -225 (lse far below -88): a key row past the end of a partial tile (loaded
    as zeros, score 0) would get probability exp(-lse) = inf; the fused kernel masks those columns
    before dS reaches dQ (inf * 0 = NaN otherwise)."""
    monkeypatch.setenv("PTUNE_FAST_DETERMINISTIC", mode)
    x, dout = make_inputs(B=1, H=2, Hkv=1, S=5, T=21, P=3, D=16, seed=8)
    u = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    x["q"] = 30 * u + 0.01 * x["q"]
    x["k"], x["prefix_k"] = -30 * u + 0.01 * x["k"], -30 * u + 0.01 * x["prefix_k"]
    got = check_against_reference(x, dout, torch.float32, True, monkeypatch)
    assert all(torch.isfinite(g).all() for g in got.values())


def test_triton_lse_and_noncontiguous_inputs(monkeypatch):
    """HF hands over q/k/v as transposed views of [B, S, H, D] and an int64 mask; lse = reference's."""
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    x, dout = make_inputs(B=2, H=4, Hkv=2, S=6, T=9, P=3, D=64, pad="both")
    q, k, v = (x[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("q", "k", "v"))
    assert not q.is_contiguous()
    mask = x["key_padding_mask"].long()
    out, lse, _ = tri.forward(q.to(DEV), k.to(DEV), v.to(DEV), x["prefix_k"].to(DEV), x["prefix_v"].to(DEV), None,
                              mask.to(DEV), True, None, 0.0)
    ref, ref_lse = reference.prefix_attention(q, k, v, x["prefix_k"], x["prefix_v"], None, mask, True, None,
                                              return_lse=True)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=1e-5)
    x.update(q=q, k=k, v=v, key_padding_mask=mask)
    check_against_reference(x, dout.transpose(1, 2).contiguous().transpose(1, 2), torch.float32, True, monkeypatch)


# ----------------------------------------------------------------------------- dropout


def _explicit_dropout_attention(x, keep, p, causal, scale=None):
    """fp64 attention with an explicit keep mask [B, H, S, P+T] (prefix columns first)."""
    q, k, v = x["q"], x["k"], x["v"]
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    P = 0 if x["prefix_k"] is None else x["prefix_k"].shape[-2]
    kk, vv, m = k, v, torch.ones(B, 1, S, T, dtype=torch.bool)
    if causal:
        m = m & torch.ones(S, T, dtype=torch.bool).tril(T - S)
    if x["key_padding_mask"] is not None:
        m = m & x["key_padding_mask"].bool()[:, None, None, :]
    if P:
        kk = torch.cat([reference.expand_prefix(x["prefix_k"], B, x["task_ids"]), k], 2)
        vv = torch.cat([reference.expand_prefix(x["prefix_v"], B, x["task_ids"]), v], 2)
        m = torch.cat([torch.ones(B, 1, S, P, dtype=torch.bool), m.expand(B, 1, S, T)], -1)
    kk, vv = kk.repeat_interleave(H // Hkv, 1), vv.repeat_interleave(H // Hkv, 1)
    s = (q @ kk.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    probs = s.masked_fill(~m, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (probs * keep / (1 - p)) @ vv


def test_triton_dropout_matches_explicit_mask(monkeypatch):
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    B, H, Hkv, S, T, P, p = 2, 4, 2, 5, 8, 7, 0.3
    x, dout = make_inputs(B=B, H=H, Hkv=Hkv, S=S, T=T, P=P, D=64, bank=True, pad="left", seed=11)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    leaves = {n: x[n].to(DEV).requires_grad_() for n in FLOAT_ARGS}
    kw = dict(task_ids=x["task_ids"].to(DEV), key_padding_mask=x["key_padding_mask"].to(DEV))
    out, _lse, rng = pa._prefix_attention_op(*leaves.values(), kw["task_ids"], kw["key_padding_mask"], True, None,
                                             p, True)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(DEV))
    keep = tri.dropout_keep_mask(rng, B, H, S, P, T, p).cpu()
    assert abs(keep.double().mean().item() - (1 - p)) < 0.05
    ref_in = {n: (t.double().requires_grad_() if n in FLOAT_ARGS else t) for n, t in x.items()}
    ref = _explicit_dropout_attention(ref_in, keep, p, True)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in FLOAT_ARGS], dout.double())
    torch.testing.assert_close(out.detach().cpu().double(), ref, atol=1e-5, rtol=1e-5)
    for n, g, r in zip(FLOAT_ARGS, grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, atol=5e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    # the same seed state gives the same mask; another draw gives another
    torch.manual_seed(5)
    a = prefix_attention(*[t.detach() for t in leaves.values()], **kw, dropout_p=p)
    torch.manual_seed(5)
    b = prefix_attention(*[t.detach() for t in leaves.values()], **kw, dropout_p=p)
    c = prefix_attention(*[t.detach() for t in leaves.values()], **kw, dropout_p=p)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reference_dropout_backward_regenerates_the_mask(monkeypatch):
    """Forced reference: the recomputing backward sees the forward's dropout mask."""
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    x, dout = make_inputs(H=2, Hkv=1, S=5, T=6, P=3, D=16, pad="right")
    torch.manual_seed(123)
    got = run(prefix_attention, x, dout, torch.float32, True, "cpu", dropout_p=0.4)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())  # the op's draw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        want = run(reference.prefix_attention, x, dout, torch.float32, True, "cpu", dropout_p=0.4)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_dropout_under_activation_checkpointing(backend, monkeypatch):
    """Non-reentrant checkpointing restores torch's RNG before recomputing: same seed, same mask."""
    if backend != "auto":
        monkeypatch.setenv(_backend.ENV_VAR, backend)
    x, dout = make_inputs(H=2, Hkv=1, S=5, T=6, P=3, D=16)

    def f(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, dropout_p=0.3)

    def grads(use_ckpt):
        leaves = [x[n].clone().requires_grad_() for n in FLOAT_ARGS]
        torch.manual_seed(9)
        out = torch.utils.checkpoint.checkpoint(f, *leaves, use_reentrant=False) if use_ckpt else f(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- torch.compile


class _Block(torch.nn.Module):
    def __init__(self, D, Hkv, P, n_tasks=None):
        super().__init__()
        shape = (n_tasks, Hkv, P, D) if n_tasks else (Hkv, P, D)
        self.pk = torch.nn.Parameter(torch.randn(shape))
        self.pv = torch.nn.Parameter(torch.randn(shape))

    def forward(self, q, k, v, task_ids, mask):
        out = prefix_attention(q * 1.5, k, v, self.pk, self.pv, task_ids, key_padding_mask=mask, causal=True)
        return out.float().tanh().sum()


@pytest.mark.parametrize("backend, compiler", [("auto", "aot_eager"), ("triton", "aot_eager"),
                                               pytest.param("auto", "inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_matches_eager(backend, compiler, monkeypatch):
    if backend != "auto":
        monkeypatch.setenv(_backend.ENV_VAR, backend)
    torch.manual_seed(0)
    B, H, Hkv, S, T, P, D = 2, 4, 2, 5, 7, 3, 16
    mod = _Block(D, Hkv, P, n_tasks=3)
    ins = [torch.randn(B, H, S, D, requires_grad=True), torch.randn(B, Hkv, T, D, requires_grad=True),
           torch.randn(B, Hkv, T, D, requires_grad=True), torch.tensor([1, 2]), torch.ones(B, T, dtype=torch.bool)]
    ins[4][0, :2] = False
    wrt = [*ins[:3], mod.pk, mod.pv]
    eager_loss = mod(*ins)
    eager = torch.autograd.grad(eager_loss, wrt)
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend=compiler, fullgraph=True)  # fullgraph: a graph break raises
    served = "sdpa" if backend == "auto" else backend
    before = (_backend.CALLS[(pa.OP, served)], _backend.CALLS[(pa.OP + ".backward", served)])
    loss = compiled(*ins)
    grads = torch.autograd.grad(loss, wrt)
    assert (_backend.CALLS[(pa.OP, served)], _backend.CALLS[(pa.OP + ".backward", served)]) == (
        before[0] + 1, before[1] + 1)  # the backend is chosen at run time, inside the op
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_op_is_registered_with_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    schema = str(torch.ops.ptune_fast.prefix_attention.default._schema)
    assert "Tensor? prefix_k" in schema and "Tensor? task_ids" in schema
    with FakeTensorMode():
        q, k = torch.empty(2, 4, 3, 80), torch.empty(2, 2, 5, 80)
        out, lse, rng = pa._prefix_attention_op(q, k, k, None, None, None, None, True, None, 0.1, True)
    assert out.shape == (2, 4, 3, 80) and lse.shape == (2, 4, 3) and rng.shape == (1,)


# ----------------------------------------------------------------------------- dispatch and errors


def test_sdpa_fallback_plan_never_sends_cuda_to_the_math_kernel():
    """PyTorch's fused CUDA SDPA kernels take ``enable_gqa`` only without an explicit mask (flash)
    and explicit masks only without GQA (memory-efficient): the plan never combines the two on
    CUDA, and uses torch's lower-right causal bias (no mask tensor) where it is exact."""
    sd = importlib.import_module("ptune_fast.ops._prefix_attention_sdpa")
    for dtype, gqa, causal, S, T, mask in itertools.product(
            (torch.float16, torch.bfloat16, torch.float32), (True, False), (True, False), (1, 5), (3, 5, 9), (True, False)):
        kind, repeat = sd.plan(True, dtype, gqa, causal, S, T, mask)
        assert not (kind == "bool" and gqa and not repeat), (dtype, gqa, causal, S, T, mask)
        if kind == "lower_right" and gqa:  # flash takes GQA; fp32 has no flash: memory-efficient + repeat
            assert repeat == (dtype == torch.float32)
        assert (kind == "lower_right") == (causal and S > 1 and T >= S and not mask)
        cpu_kind, cpu_repeat = sd.plan(False, dtype, gqa, causal, S, T, mask)
        assert cpu_kind in ("bool", "none") and not cpu_repeat
    assert sd._repeat_kv(torch.arange(6.0).view(1, 2, 3, 1), 2)[0, :, 0, 0].tolist() == [0.0, 0.0, 3.0, 3.0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("pad, T", [(None, 20), ("left", 20), (None, 9)], ids=["causal", "padded", "cache"])
def test_gpu_sdpa_fallback_runs_on_fused_kernels(dtype, pad, T, monkeypatch):
    """With the math kernel disabled, the CUDA sdpa backend still serves GQA + prefix + causal /
    padding (a math-only call would raise "No available kernel"), and matches the reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x, dout = make_inputs(B=2, H=8, Hkv=2, S=9, T=T, P=16, D=64, pad=pad, seed=5)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        check_against_reference(x, dout, dtype, True, monkeypatch, backend="sdpa", device="cuda")


def test_cpu_auto_dispatch_uses_sdpa(monkeypatch):
    """CPU tensors: PyTorch's fused SDPA with native autograd (no custom-op backward)."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, dout = make_inputs(P=3, D=16)
    before = dict(_backend.CALLS)
    got = run(prefix_attention, x, dout, torch.float32, True, "cpu")
    after = _backend.CALLS
    assert after[(pa.OP, "sdpa")] == before.get((pa.OP, "sdpa"), 0) + 1
    assert after[(pa.OP, "reference")] == before.get((pa.OP, "reference"), 0)
    assert after[(pa.OP, "triton")] == before.get((pa.OP, "triton"), 0)
    ref = run(reference.prefix_attention, x, dout, torch.float32, True, "cpu")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=2e-6, rtol=1e-5)  # fp32 SDPA vs fp32 reference: summation order (measured max 3.6e-7)


@pytest.mark.parametrize("forced, dtype, D, match", [
    ("cuda", torch.float16, 64, "cuda"),
    ("triton", torch.float64, 64, "dtype"),
    ("triton", torch.float32, 512, "head dim"),
])
def test_forced_backend_raises_when_it_cannot_serve(forced, dtype, D, match, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, forced)
    x, _ = make_inputs(S=2, P=1, D=D)
    args = [x[n].to(dtype) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    with pytest.raises(_backend.BackendUnavailable, match=match):
        prefix_attention(*args)


def test_forced_cuda_raises_when_grads_are_needed(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    with pytest.raises(_backend.BackendUnavailable):
        prefix_attention(q, torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))


def test_cpu_without_interpreter_is_refused_by_triton():
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    x, _ = make_inputs(S=2, P=1, D=16)
    args = (x["q"], x["k"], x["v"], None, None, None, None, True, None, 0.0)
    if not tri._INTERPRET and not CUDA:
        assert "TRITON_INTERPRET" in tri.why_not(*args)
    assert tri.why_not(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])


def _bad(**over):
    x, _ = make_inputs(B=2, H=4, Hkv=2, S=3, T=5, P=2, D=16)
    x.update(over)
    return x


@pytest.mark.parametrize("over, exc, match", [
    (dict(q=torch.randn(2, 4, 3)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8)), ValueError, "k must be"),
    (dict(v=torch.randn(2, 2, 4, 16)), ValueError, "k and v"),
    (dict(k=torch.randn(2, 3, 5, 16), v=torch.randn(2, 3, 5, 16)), ValueError, "multiple of k/v heads"),
    (dict(k=torch.randn(2, 2, 5, 16, dtype=torch.float64)), TypeError, "dtype"),
    (dict(prefix_k=torch.randn(2, 2, 16, dtype=torch.float16), prefix_v=torch.randn(2, 2, 16, dtype=torch.float16)),
     TypeError, "prefix_k"),
    (dict(prefix_k=torch.randn(3, 2, 16), prefix_v=torch.randn(3, 2, 16)), ValueError, "prefix_k must be"),
    (dict(prefix_v=None), ValueError, "prefix_k and prefix_v"),
    (dict(prefix_k=torch.randn(3, 2, 2, 16), prefix_v=torch.randn(3, 2, 2, 16)), ValueError, "task_ids"),
    (dict(task_ids=torch.tensor([0, 1])), ValueError, "task_ids"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(q=torch.randn(2, 4, 6, 16)), ValueError, "causal attention needs T >= S"),
])
def test_bad_inputs_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        prefix_attention(**_bad(**over))


def test_bad_dropout_and_type():
    with pytest.raises(ValueError, match="dropout_p"):
        prefix_attention(**_bad(), dropout_p=1.0)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        prefix_attention(**_bad(q=[1.0]))


# ----------------------------------------------------------------------------- reference vs naive


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), rep=st.sampled_from([1, 2]), Hkv=st.integers(1, 2), S=st.integers(1, 6),
       extra=st.integers(0, 4), P=st.integers(0, 4), D=st.sampled_from([4, 8, 16]), causal=st.booleans(),
       bank=st.booleans(), pad=st.sampled_from([None, "left", "right", "both"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_reference_matches_naive_property(B, rep, Hkv, S, extra, P, D, causal, bank, pad, dtype, seed):
    x, _ = make_inputs(B=B, H=rep * Hkv, Hkv=Hkv, S=S, T=S + extra, P=P, D=D, bank=bank and P > 0, pad=pad,
                       seed=seed)
    args = {n: (t.to(dtype) if t is not None and t.is_floating_point() else t) for n, t in x.items()}
    got = reference.prefix_attention(**args, causal=causal)
    want = reference.naive_prefix_attention(**args, causal=causal)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- issue 11: ids, P=0, determinism, grids


BACKENDS_ON_CPU = ["triton", "reference", "sdpa"]


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_out_of_range_task_ids_give_nan_rows_and_no_gradient(backend, monkeypatch):
    """task_ids outside [0, N): NaN output rows, zero gradients from those rows (bank, q, k, v);
    the other rows are exactly what they are without the bad rows. Same on every backend."""
    x, dout = make_inputs(B=4, H=2, Hkv=1, S=3, T=4, P=2, D=16, bank=True, pad="left", n_tasks=2, seed=5)
    x["task_ids"] = torch.tensor([1, 2, 0, -1])  # rows 1 and 3 are out of range
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    leaves = {n: x[n].clone().requires_grad_() for n in FLOAT_ARGS}
    out = prefix_attention(**leaves, task_ids=x["task_ids"], key_padding_mask=x["key_padding_mask"])
    assert torch.isnan(out[[1, 3]]).all() and torch.isfinite(out[[0, 2]]).all()
    grads = dict(zip(FLOAT_ARGS, torch.autograd.grad(out, list(leaves.values()), dout)))
    for n in ("q", "k", "v"):
        assert grads[n][[1, 3]].abs().max() == 0, n
    # the good rows alone, through the fp64 oracle
    good = {n: (t[[0, 2]] if n in ("q", "k", "v", "task_ids", "key_padding_mask") else t) for n, t in x.items()}
    monkeypatch.delenv(_backend.ENV_VAR)
    ref = run(reference.prefix_attention, good, dout[[0, 2]], torch.float64, True, "cpu")
    torch.testing.assert_close(out[[0, 2]].detach().double(), ref["out"], atol=1e-5, rtol=1e-5)
    for n in FLOAT_ARGS:
        got = grads[n][[0, 2]] if n in ("q", "k", "v") else grads[n]
        torch.testing.assert_close(got.double(), ref[n], atol=5e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_out_of_range_task_ids_lse_is_nan():
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    x, _ = make_inputs(B=2, H=2, Hkv=1, S=3, T=3, P=2, D=16, bank=True, n_tasks=2)
    x["task_ids"] = torch.tensor([0, 7])
    args = [x[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "task_ids", "key_padding_mask")]
    out, lse, _ = tri.forward(*args, True, None, 0.0)
    ref, ref_lse = reference.prefix_attention(*args, return_lse=True)
    assert torch.isnan(lse[1]).all() and torch.isnan(ref_lse[1]).all()
    torch.testing.assert_close(lse[0], ref_lse[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("bank", [False, True], ids=["shared", "bank"])
def test_zero_length_prefix_through_the_registered_op(backend, bank, monkeypatch):
    """The public op strips a P = 0 prefix; the registered op, called directly, must cope too:
    same output as no prefix, zero prefix gradients of the prefix's shape."""
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    x, dout = make_inputs(H=2, Hkv=1, S=3, T=4, P=0, D=16, pad="left")
    shape = (3, 1, 0, 16) if bank else (1, 0, 16)
    pk, pv = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    ids = torch.tensor([0, 5]) if bank else None  # ids are not looked at without prefix columns
    q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out, _, _ = pa._prefix_attention_op(q, k, v, pk, pv, ids, x["key_padding_mask"], True, None, 0.0, True)
    grads = torch.autograd.grad(out, [q, k, v, pk, pv], dout)
    want = run(reference.prefix_attention, x, dout, torch.float32, True, "cpu")
    torch.testing.assert_close(out.detach().double(), want["out"], atol=1e-5, rtol=1e-5)
    for n, g in zip(("q", "k", "v"), grads):
        torch.testing.assert_close(g.double(), want[n], atol=1e-5, rtol=1e-5)
    assert grads[3].shape == shape and grads[4].shape == shape


def test_prefix_gradients_are_a_fixed_order_sum(monkeypatch):
    """Bank / shared-prefix gradients: the Triton backward sums the per-row partials in row order
    (no atomics): bitwise equal to a sequential fp32 sum over the rows, and run to run."""
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    B, E = 6, 3 * 1000  # E > the reduce block: several blocks per entry
    g = torch.Generator().manual_seed(0)
    part = torch.randn(B, 3, 1000, generator=g) * torch.logspace(-4, 4, 1000)  # wide range: order matters
    ids = torch.tensor([2, 0, 2, 9, 2, -1], dtype=torch.int32)  # 9, -1 out of range: no entry
    for bank, n_tasks in ((True, 4), (False, 1)):
        got = torch.empty(n_tasks, 3, 1000)
        tri._prefix_grad_reduce[tri.grids(B, 1, 3, 1, 1, 1000, 1, n_tasks=n_tasks)["reduce"]](
            part, ids, got, B, n_tasks, E, IS_BANK=bank, BLOCK=tri._REDUCE_BLOCK)
        want = torch.zeros(n_tasks, 3, 1000)
        for b in range(B):
            if not bank:
                want[0] = want[0] + part[b]
            elif 0 <= ids[b] < n_tasks:
                want[ids[b]] = want[ids[b]] + part[b]
        assert torch.equal(got, want)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    x, dout = make_inputs(B=4, H=2, Hkv=1, S=3, T=4, P=3, D=16, bank=True, n_tasks=2, seed=2)
    x["task_ids"] = torch.tensor([1, 1, 0, 1])
    a, b = (run(prefix_attention, x, dout, torch.float32, True, "cpu") for _ in range(2))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("B, H, Hkv, S, T, P", [(4096, 32, 8, 1, 4096, 128), (4096, 32, 32, 4096, 4096, 512),
                                                (2048, 32, 8, 8, 300, 0)])
def test_launch_grids_fit_cuda_limits(B, H, Hkv, S, T, P):
    """CUDA caps grid axes y and z at 65,535 (x at 2^31 - 1); B * H = 131,072 here. Host-side:
    the grid tuples the launchers use, for the smallest tiles (the most programs)."""
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    grids = tri.grids(B, H, Hkv, S, T, P, 128, n_tasks=1000, block_m=16, block_n=16)
    assert set(grids) == {"fwd", "pre", "dkv", "dq", "reduce"}
    for name, grid in grids.items():
        assert 1 <= len(grid) <= 3 and grid[0] <= tri.MAX_GRID_X, (name, grid)
        assert all(g <= tri.MAX_GRID_YZ for g in grid[1:]), (name, grid)
        assert tri._check_grid(grid) == grid
    assert grids["fwd"][0] == B * H * -(-S // 16) and grids["dkv"][0] == B * Hkv * (-(-P // 16) + -(-T // 16))
    with pytest.raises(ValueError, match="grid"):
        tri._check_grid((2**31,))


# ----------------------------------------------------------------------------- out layout, fp32, configs, warmup


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU + ["auto"])
def test_out_layout_bshd(backend, monkeypatch):
    """out_layout="bshd": a contiguous [B, S, H, D] output equal to the [B, H, S, D] one
    transposed, with the same gradients."""
    if backend != "auto":
        monkeypatch.setenv(_backend.ENV_VAR, backend)
    x, dout = make_inputs(B=2, H=4, Hkv=2, S=3, T=5, P=2, D=16, bank=True, pad="right")
    want = run(prefix_attention, x, dout, torch.float32, True, "cpu")
    got = run(lambda **kw: prefix_attention(**kw, out_layout="bshd"), x, dout.transpose(1, 2), torch.float32, True,
              "cpu")
    assert got["out"].shape == (2, 3, 4, 16)
    torch.testing.assert_close(got["out"].transpose(1, 2), want["out"], atol=0, rtol=0)
    for n in FLOAT_ARGS:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
    leaves = [x[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    assert prefix_attention(*leaves, x["task_ids"], out_layout="bshd").is_contiguous()
    with pytest.raises(ValueError, match="out_layout"):
        prefix_attention(*leaves, x["task_ids"], out_layout="bsdh")


def test_triton_writes_bshd_in_place():
    """The Triton forward writes [B, S, H, D] memory through the output strides: no copy after."""
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    x, _ = make_inputs(B=2, H=4, Hkv=2, S=3, T=5, P=2, D=16)
    args = [x[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "task_ids", "key_padding_mask")]
    out, _, _ = tri.forward(*args, True, None, 0.0, need_lse=False, out_bshd=True)
    assert out.shape == (2, 3, 4, 16) and out.is_contiguous() and out._base is None
    torch.testing.assert_close(out.transpose(1, 2), reference.prefix_attention(*args), atol=2e-5, rtol=1e-5)


def _fake_cuda_args(dtype, D=64):
    """Stand-ins with what select_backend / why_not look at, as if on a CUDA device."""
    t = types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(2, 4, 8, D), device=torch.device("cuda", 0))
    return (t, t, t, None, None, None, None, True, None, 0.0)


def test_fp32_on_cuda_falls_back_to_sdpa_counted(monkeypatch):
    """fp32 CUDA calls are not autotuned in Triton (IEEE-fp32 compiles take minutes and spill):
    an automatic, counted fallback to sdpa; forced triton raises; PTUNE_FAST_TRITON_TF32=1 opts in."""
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    monkeypatch.setattr(tri, "_INTERPRET", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.delenv(tri.TF32_ENV_VAR, raising=False)
    args = _fake_cuda_args(torch.float32)
    why = tri.why_not(*args)
    assert "fp32 on CUDA" in why and tri.TF32_ENV_VAR in why
    before = sum(n for (op, b, r), n in _backend.FALLBACKS.items() if op == pa.OP and b == "triton" and "fp32" in r)
    assert pa.select_backend(args, need_grad=True) == "sdpa"
    after = sum(n for (op, b, r), n in _backend.FALLBACKS.items() if op == pa.OP and b == "triton" and "fp32" in r)
    assert after == before + 1
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with pytest.raises(_backend.BackendUnavailable, match="fp32 on CUDA"):
        pa.select_backend(args, need_grad=True)
    monkeypatch.setenv(tri.TF32_ENV_VAR, "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert tri.why_not(*args) == "" and tri._dot_prec(torch.float32, interpret=False) == "tf32"
    assert tri.why_not(*_fake_cuda_args(torch.bfloat16)) == ""


def test_configs_are_pruned_by_shape_up_front():
    tri = importlib.import_module("ptune_fast.ops._prefix_attention_triton")
    as_tuple = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    for kernel in ("fwd", "dkv", "dq"):
        for D, block_d in ((64, 64), (80, 128), (128, 128), (32, 64)):
            for dtype in (torch.float16, torch.bfloat16):
                got = [as_tuple(c) for c in tri.configs_for(kernel, D, dtype, S=4096, T=4096, P=128)]
                assert got and set(got) <= set(tri._SPILL_FREE[(kernel, block_d)]), (kernel, D)
        decode = tri.configs_for(kernel, 64, torch.bfloat16, S=1, T=4096, P=128)  # no query tile above 16
        assert decode and all(c.kwargs["BLOCK_M"] == 16 for c in decode), kernel
        # D = 128 dkv has no spill-free 16-row tile: the smallest one it has serves alone
        decode = tri.configs_for(kernel, 128, torch.bfloat16, S=1, T=4096, P=128)
        assert all(c.kwargs["BLOCK_M"] == 16 for c in decode) or len(decode) == 1, kernel
        assert len(tri.configs_for(kernel, 128, torch.bfloat16, S=5, T=7, P=3)) == 1  # the smallest tile only
        assert {as_tuple(c) for c in tri.configs_for(kernel, 256, torch.bfloat16, 512, 512, 16)} <= set(tri._WIDE[kernel])
        assert {as_tuple(c) for c in tri.configs_for(kernel, 64, torch.float32, 512, 512, 16)} <= set(
            tri._FP32[(kernel, 64)])
        every = {as_tuple(c) for c in tri._all_configs(kernel)}  # what the autotuner is built with
        assert set(tri._FP32[(kernel, 128)]) | set(tri._WIDE[kernel]) <= every
    # the fused backward: spill-free tiles for D <= 128, fp16/bf16 (the only calls backward_path sends it)
    for D, block_d in ((64, 64), (96, 128), (128, 128)):
        got = [as_tuple(c) for c in tri.configs_for("dkvq", D, torch.bfloat16, S=4096, T=4096, P=128)]
        assert got and set(got) <= set(tri._SPILL_FREE[("dkvq", block_d)])
    assert {as_tuple(c) for c in tri._all_configs("dkvq")} == set(tri._SPILL_FREE[("dkvq", 64)]) | set(
        tri._SPILL_FREE[("dkvq", 128)])


def test_warmup_runs_every_shape_once_per_mode(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    shapes = [(2, 4, 2, 3, 5, 2, 16), (1, 4, 2, 1, 6, 0, 16)]
    served = pa.warmup(shapes, torch.float32, "cpu", n_tasks=3)
    assert served == [(shapes[0], "sdpa"), (shapes[0], "sdpa"), (shapes[1], "sdpa"), (shapes[1], "sdpa")]
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    before = _backend.CALLS[(pa.OP + ".backward", "triton")]
    assert pa.warmup(shapes[:1], torch.float32, "cpu", inference=False) == [(shapes[0], "triton")]
    assert _backend.CALLS[(pa.OP + ".backward", "triton")] == before + 1
    from ptune_fast import ops

    assert ops.warmup_prefix_attention is pa.warmup


# ----------------------------------------------------------------------------- compiled kernels
# AOT compiles for sm_80 / sm_90 (resources: registers, spills, shared memory): tests/test_triton_resources.py


# ----------------------------------------------------------------------------- GPU, real sizes

GPU_CASES = [
    pytest.param(dict(S=512, T=512, pad="left"), True, id="causal-leftpad-shared"),
    pytest.param(dict(S=512, T=576, pad="right", bank=True), True, id="causal-cache-bank"),
    pytest.param(dict(S=512, T=512, pad="both"), False, id="bidir-pad"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("shape, causal", GPU_CASES)
def test_gpu_real_sizes_bf16(shape, causal, mode, monkeypatch):
    monkeypatch.setenv("PTUNE_FAST_DETERMINISTIC", mode)
    x, dout = make_inputs(B=2, H=32, Hkv=8, P=128, D=128, seed=1, **shape)
    check_against_reference(x, dout, torch.bfloat16, causal, monkeypatch, device="cuda")


@pytest.mark.gpu
def test_gpu_auto_dispatch_uses_triton_for_training(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, dout = make_inputs(B=2, H=32, Hkv=8, S=64, P=16, D=128)
    before = _backend.CALLS[(pa.OP, "triton")]
    run(prefix_attention, x, dout, torch.bfloat16, True, "cuda")
    assert _backend.CALLS[(pa.OP, "triton")] == before + 1


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_recomputing_backward_inside_saved_tensor_hooks(backend, monkeypatch):
    """The registered op's recomputing backward (torch.func) runs inside saved-tensor hooks
    (``save_on_cpu`` around forward *and* backward) and leaves the user's hooks in place."""
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    x, dout = make_inputs(P=3, D=16, pad="left")
    want = run(prefix_attention, x, dout, torch.float32, True, "cpu")
    with torch.autograd.graph.save_on_cpu():
        got = run(prefix_attention, x, dout, torch.float32, True, "cpu")
        assert torch._C._autograd._top_saved_tensors_default_hooks(True) is not None  # restored
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
