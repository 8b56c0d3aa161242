"""encoder_mlp: dispatch, the autograd wrapper of the fused CUDA forward, and (``gpu`` marker)
the one-launch CUDA kernel against the reference.

CPU: the op equals the reference, forced backends behave as documented, refusal reasons, and
the autograd.Function's backward (saved tensors, None biases, indices, needs_input_grad) is
checked by swapping the CUDA forward for the reference forward.

GPU bound: fp32 out: ``max|kernel - ref| <= 1e-5 * sqrt(d_in) * max|ref|`` (accumulation order
only; TF32 is switched off for the reference); fp16/bf16 out: FlashAttention's rule
``max|kernel - ref32| <= 2 * max|ref_lp - ref32| + eps`` (both round an fp32 result once).
"""
import importlib
import os

import pytest
import torch

from ptune_fast import _backend, reference
from ptune_fast.ops.prompt_encoder import encoder_mlp

pe = importlib.import_module("ptune_fast.ops.prompt_encoder")
da = importlib.import_module("ptune_fast.ops.decode_attention")

CUDA = torch.cuda.is_available()
EXT = CUDA and pe._load_ops()
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

if CUDA and not EXT and os.environ.get("PTUNE_FAST_REQUIRE_EXT") == "1":  # pragma: no cover
    raise RuntimeError("PTUNE_FAST_REQUIRE_EXT=1 but ptune_fast._C is not importable: " + _backend.cuda_extension()[1])


def gpu_test(fn):
    for mark in (
        pytest.mark.gpu,
        pytest.mark.skipif(not CUDA, reason="needs a CUDA device"),
        pytest.mark.skipif(CUDA and not EXT, reason="ptune_fast._C is not built (pip install --no-build-isolation -e .)"),
    ):
        fn = mark(fn)
    return fn


def make_head(kind, d, hidden, d_out=None, seed=0, device="cpu", bias=True):
    """PEFT-like encoders: 'prefix' = Linear-Tanh-Linear (d -> hidden -> d_out), 'ptuning' =
    Linear-ReLU-Linear-ReLU-Linear (d -> hidden -> hidden -> d). fp32 parameters."""
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d
    dims = [d, hidden, d_out] if kind == "prefix" else [d, hidden, hidden, d]
    ws = [(torch.randn(o, i, generator=g) / i**0.5).to(device) for i, o in zip(dims[:-1], dims[1:])]
    bs = [(torch.randn(o, generator=g) * 0.1).to(device) if bias else None for o in dims[1:]]
    return ws, bs, ("tanh" if kind == "prefix" else "relu")


def make_x(n, d, seed=1, device="cpu"):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(device)


# ============================================================================ CPU


@pytest.mark.parametrize("kind", ("prefix", "ptuning"))
@pytest.mark.parametrize("out_dtype", (None, torch.float16, torch.bfloat16))
def test_cpu_equals_reference(monkeypatch, kind, out_dtype):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    ws, bs, act = make_head(kind, 16, 24)
    x = make_x(5, 16)
    before = _backend.CALLS[(pe.OP, "reference")]
    out = encoder_mlp(x, ws, bs, act, out_dtype)
    assert _backend.CALLS[(pe.OP, "reference")] == before + 1
    assert out.dtype == (out_dtype or torch.float32)
    torch.testing.assert_close(out, reference.encoder_mlp(x, ws, bs, act, out_dtype), atol=0, rtol=0)


def test_cpu_indices_gather_and_backward():
    ws, bs, act = make_head("prefix", 8, 12, 20)
    table = make_x(10, 8).requires_grad_()
    idx = torch.tensor([3, 3, 0, 9, 5])
    out = encoder_mlp(table, ws, bs, act, indices=idx)
    ref = reference.encoder_mlp(table[idx], ws, bs, act)
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out.square().sum(), table)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), table)
    torch.testing.assert_close(g, g_ref)
    assert g[[1, 2, 4, 6, 7, 8]].abs().sum() == 0 and g[3].abs().sum() > 0


def test_forced_cuda_raises_clearly_without_extension(monkeypatch):
    if EXT:
        pytest.skip("the extension is built here")
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    ws, bs, act = make_head("prefix", 8, 12)
    with pytest.raises(_backend.BackendUnavailable, match=r"PTUNE_FAST_BACKEND=cuda: fused encoder_mlp"):
        encoder_mlp(make_x(3, 8), ws, bs, act)


def test_forced_triton_runs_the_reference_and_counts_a_fallback(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    ws, bs, act = make_head("ptuning", 8, 12)
    x = make_x(3, 8)
    key = (pe.OP, "triton", "no Triton encoder kernel; the reference serves it")
    before = _backend.FALLBACKS[key]
    out = encoder_mlp(x, ws, bs, act)
    assert _backend.FALLBACKS[key] == before + 1
    torch.testing.assert_close(out, reference.encoder_mlp(x, ws, bs, act), atol=0, rtol=0)


def test_forced_reference(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    ws, bs, act = make_head("prefix", 8, 12)
    before = _backend.CALLS[(pe.OP, "reference")]
    encoder_mlp(make_x(3, 8), ws, bs, act)
    assert _backend.CALLS[(pe.OP, "reference")] == before + 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(x=torch.randn(3)), "x must be"),
        (dict(weights=[]), "non-empty"),
        (dict(activation="gelu"), "activation"),
        (dict(weights=[torch.randn(12, 7), torch.randn(8, 12)]), r"weights\[0\]"),
        (dict(biases=[torch.randn(11), None]), r"biases\[0\]"),
        (dict(indices=torch.tensor([0.5])), "indices"),
    ],
)
def test_input_errors(bad, match):
    ws, bs, act = make_head("prefix", 8, 12)
    kw = dict(x=make_x(3, 8), weights=ws, biases=[None] * len(ws), activation=act)
    kw.update(bad)
    if "weights" in bad and bad["weights"]:
        kw["biases"] = [None] * len(bad["weights"])
    if "biases" in bad:
        kw["biases"] = bad["biases"]
    with pytest.raises(ValueError, match=match):
        encoder_mlp(**kw)


@pytest.fixture
def ext_ok(monkeypatch):
    monkeypatch.setattr(da, "device_why_not", lambda device: "")


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(layers=5), "5 layers"),
        (dict(wdtype=torch.float16), "needs float32"),
        (dict(d=6), "d_in=6"),
        (dict(hidden=10), "not a multiple of 4"),
        (dict(out_dtype=torch.float64), "out_dtype"),
    ],
)
def test_why_not_reasons(ext_ok, change, reason):
    d, hidden = change.get("d", 8), change.get("hidden", 12)
    ws, bs, act = make_head("prefix", d, hidden, 16)
    if change.get("layers"):
        ws = [torch.randn(d, d) for _ in range(change["layers"])]
        bs = [None] * len(ws)
    ws = [w.to(change.get("wdtype", torch.float32)) for w in ws]
    why = pe.why_not(make_x(3, d), ws, bs, act, change.get("out_dtype", torch.float32))
    assert reason in why


def test_why_not_accepts_supported(ext_ok):
    for kind in ("prefix", "ptuning"):
        ws, bs, act = make_head(kind, 16, 32)
        for out_dtype in pe.OUT_DTYPES:
            assert pe.why_not(make_x(3, 16), ws, bs, act, out_dtype, torch.arange(3)) == ""


@pytest.mark.parametrize("kind", ("prefix", "ptuning"))
@pytest.mark.parametrize("with_indices", (False, True))
def test_autograd_function_backward_on_cpu(monkeypatch, kind, with_indices):
    """The Function's plumbing, with the CUDA forward swapped for the reference forward."""
    monkeypatch.setattr(pe, "_fused_forward", lambda x, w, b, a, od, idx: pe._reference(x, w, b, a, od, idx))
    ws, bs, act = make_head(kind, 8, 12, bias=True)
    bs[1] = None  # a missing bias in the middle
    ws = [w.requires_grad_() for w in ws]
    bs = [b.requires_grad_() if b is not None else None for b in bs]
    bs[0].requires_grad_(False)  # a frozen bias gets no gradient
    x = make_x(6, 8).requires_grad_()
    idx = torch.tensor([5, 0, 0, 2]) if with_indices else None
    out = pe._FusedEncoderMLP.apply(x, idx, act, torch.bfloat16, len(ws), *ws, *bs)
    ref = pe._reference(x, ws, bs, act, torch.bfloat16, idx)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    dout = torch.randn(out.shape).to(out.dtype)
    leaves = [x, *ws, *[b for b in bs if b is not None and b.requires_grad]]
    got = torch.autograd.grad(out, leaves, dout)
    exp = torch.autograd.grad(ref, leaves, dout)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


# ============================================================================ GPU


def _check(out, x, ws, bs, act, out_dtype, indices=None):
    torch.backends.cuda.matmul.allow_tf32 = False
    h = x if indices is None else x[indices]
    ref32 = reference.encoder_mlp(h, ws, bs, act, torch.float32)
    assert out.dtype == out_dtype and out.shape == ref32.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref32).abs().max().item()
    scale = max(1.0, ref32.abs().max().item())
    if out_dtype == torch.float32:
        assert err <= 1e-5 * max(w.shape[1] for w in ws) ** 0.5 * scale, err
    else:
        ref_err = (ref32.to(out_dtype).float() - ref32).abs().max().item()
        assert err <= 2 * ref_err + 4 * UNIT_ROUNDOFF[out_dtype] * scale + 1e-5 * scale, (err, ref_err)


@gpu_test
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("hidden", (4096, 1024))
@pytest.mark.parametrize("n", (1, 20))
@pytest.mark.parametrize("kind", ("prefix", "ptuning"))
def test_fused_forward_matches_reference(monkeypatch, kind, n, hidden, out_dtype):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    d = 1024
    ws, bs, act = make_head(kind, d, hidden, d_out=2048 if kind == "prefix" else None, device="cuda")
    x = make_x(n, d, device="cuda")
    before = _backend.CALLS[(pe.OP, "cuda")]
    out = encoder_mlp(x, ws, bs, act, out_dtype)
    assert _backend.CALLS[(pe.OP, "cuda")] == before + 1
    _check(out, x, ws, bs, act, out_dtype)


@gpu_test
@pytest.mark.parametrize("n", (33, 100))
def test_fused_forward_many_tokens_odd_widths_indices(n):
    ws, bs, act = make_head("ptuning", 516, 1028, device="cuda", bias=False)
    table = make_x(128, 516, device="cuda")
    idx = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:n].cuda()
    out = encoder_mlp(table, ws, bs, act, torch.float32, indices=idx)
    _check(out, table, ws, bs, act, torch.float32, idx)


@gpu_test
def test_fused_forward_prefix_projection_wide_output():
    """Prefix tuning's projection: d -> hidden -> 2 * L * Hkv * D (wide last layer)."""
    ws, bs, act = make_head("prefix", 512, 512, d_out=2 * 16 * 8 * 64, device="cuda")
    x = make_x(20, 512, device="cuda")
    _check(encoder_mlp(x, ws, bs, act, torch.bfloat16), x, ws, bs, act, torch.bfloat16)


@gpu_test
def test_auto_dispatch_with_grad_takes_the_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    ws, bs, act = make_head("prefix", 64, 128, device="cuda")
    ws[0].requires_grad_()
    before = _backend.CALLS[(pe.OP, "reference")]
    encoder_mlp(make_x(5, 64, device="cuda"), ws, bs, act)
    assert _backend.CALLS[(pe.OP, "reference")] == before + 1
    with torch.no_grad():
        before = _backend.CALLS[(pe.OP, "cuda")]
        encoder_mlp(make_x(5, 64, device="cuda"), ws, bs, act)
        assert _backend.CALLS[(pe.OP, "cuda")] == before + 1


@gpu_test
@pytest.mark.parametrize("kind", ("prefix", "ptuning"))
def test_fused_gradients_match_reference(monkeypatch, kind):
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")  # automatic dispatch gives grads to the reference
    torch.backends.cuda.matmul.allow_tf32 = False
    ws, bs, act = make_head(kind, 256, 512, device="cuda")
    ws = [w.requires_grad_() for w in ws]
    bs = [b.requires_grad_() for b in bs]
    table = make_x(30, 256, device="cuda").requires_grad_()
    idx = torch.arange(20, device="cuda")
    before = _backend.CALLS[(pe.OP, "cuda")]
    out = encoder_mlp(table, ws, bs, act, torch.float16, indices=idx)
    assert _backend.CALLS[(pe.OP, "cuda")] == before + 1
    ref = reference.encoder_mlp(table[idx], ws, bs, act, torch.float16)
    dout = torch.randn(out.shape, device="cuda").half()
    got = torch.autograd.grad(out, [table, *ws, *bs], dout)
    exp = torch.autograd.grad(ref, [table, *ws, *bs], dout)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@gpu_test
def test_fused_x_dtype_and_noncontiguous():
    ws, bs, act = make_head("prefix", 64, 128, device="cuda")
    x = make_x(40, 128, device="cuda")[:, ::2].to(torch.bfloat16)  # strided, bf16 (cast to fp32 first)
    out = encoder_mlp(x, ws, bs, act, torch.float32)
    _check(out, x, ws, bs, act, torch.float32)


@gpu_test
def test_fused_torch_compile():
    ws, bs, act = make_head("ptuning", 128, 256, device="cuda")
    x = make_x(20, 128, device="cuda")
    eager = encoder_mlp(x, ws, bs, act, torch.bfloat16)
    raw = torch.compile(lambda x, w, b: torch.ops.ptune_fast_C.encoder_mlp_fwd(x, None, w, b, 1, torch.bfloat16),
                        fullgraph=True)
    torch.testing.assert_close(raw(x, ws, bs), eager, atol=0, rtol=0)
    public = torch.compile(lambda x: encoder_mlp(x, ws, bs, act, torch.bfloat16))
    torch.testing.assert_close(public(x), eager, atol=0, rtol=0)
