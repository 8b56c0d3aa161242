"""decode_attention: the compiled CUDA decode kernel (``ptune_fast._C``) behind the ``cuda``
backend of prefix_attention.

CPU (always): dispatch, refusal reasons (``why_not``), forced-backend errors, input
preparation helpers. GPU (``gpu`` marker; skipped without CUDA or without the built
extension, unless ``PTUNE_FAST_REQUIRE_EXT=1`` turns a missing extension into a failure):
numerics against the reference.

Error bound (FlashAttention's rule): ``max|kernel - ref32| <= 2 * max|ref_lp - ref32| + eps``
where ``ref32`` is the reference on the fp32-cast inputs and ``ref_lp`` the reference on the
same fp16/bf16 inputs (fp32 math, output rounded to the dtype). The kernel also computes in
fp32 and rounds once, so its error should be that rounding; ``eps`` (a few units of the
dtype's roundoff times ``max|ref32|``) absorbs a rounding that falls the other way.
"""
import importlib
import itertools
import os

import pytest
import torch

from ptune_fast import _backend, reference
from ptune_fast.ops import prefix_attention

da = importlib.import_module("ptune_fast.ops.decode_attention")
pa = importlib.import_module("ptune_fast.ops.prefix_attention")

CUDA = torch.cuda.is_available()
EXT = CUDA and da._load_ops()
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

if CUDA and not EXT and os.environ.get("PTUNE_FAST_REQUIRE_EXT") == "1":  # pragma: no cover
    raise RuntimeError("PTUNE_FAST_REQUIRE_EXT=1 but ptune_fast._C is not importable: " + _backend.cuda_extension()[1])

gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device"),
    pytest.mark.skipif(CUDA and not EXT, reason="ptune_fast._C is not built (pip install --no-build-isolation -e .)"),
]


def gpu_test(fn):
    for mark in gpu:
        fn = mark(fn)
    return fn


def make_inputs(B=2, H=8, Hkv=2, S=1, T=37, P=7, D=64, bank=False, pad=None, seed=0, n_tasks=3, device="cpu"):
    """Fresh N(0,1) fp32 inputs. ``pad``: 'left' (row 0 loses its first keys), 'ragged' (every
    row a different left-padding), 'hole' (arbitrary pattern), 'all' (row 0 fully padded)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    x = dict(q=rnd(B, H, S, D), k=rnd(B, Hkv, T, D), v=rnd(B, Hkv, T, D), prefix_k=None, prefix_v=None,
             task_ids=None, key_padding_mask=None)
    if P:
        shape = (n_tasks, Hkv, P, D) if bank else (Hkv, P, D)
        x["prefix_k"], x["prefix_v"] = rnd(*shape), rnd(*shape)
        if bank:
            x["task_ids"] = (torch.arange(B) * 2 % n_tasks).to(device)
    if pad:
        m = torch.ones(B, T, dtype=torch.bool)
        if pad == "left":
            m[0, : min(5, T - 1)] = False
        elif pad == "ragged":
            for b in range(B):
                m[b, : min(b * 13 + 1, T - 1)] = False
        elif pad == "hole":
            m[:, 1::3] = False
            m[:, -1] = True
        elif pad == "all":
            m[0] = False
        x["key_padding_mask"] = m.to(device)
    return x


def cast(x, dtype, device="cuda"):
    return {n: (None if t is None else (t.to(device, dtype) if t.is_floating_point() else t.to(device)))
            for n, t in x.items()}


def check(x, dtype, causal=True, num_splits=0, scale=None):
    """Run the kernel on dtype inputs and check it against the reference (error bound above)."""
    lp = cast(x, dtype)
    out = da.decode_attention(**lp, causal=causal, scale=scale, num_splits=num_splits)
    assert out.shape == lp["q"].shape and out.dtype == dtype and out.is_contiguous()
    f32 = {n: (t.float() if t is not None and t.is_floating_point() else t) for n, t in lp.items()}
    ref32 = reference.prefix_attention(**f32, causal=causal, scale=scale)
    ref_lp = reference.prefix_attention(**lp, causal=causal, scale=scale)
    assert torch.isfinite(out).all()
    err = (out.float() - ref32).abs().max().item()
    ref_err = (ref_lp.float() - ref32).abs().max().item()
    eps = 4 * UNIT_ROUNDOFF[dtype] * max(1.0, ref32.abs().max().item())
    assert err <= 2 * ref_err + eps, f"max err {err:.3g} > 2 * {ref_err:.3g} + {eps:.3g}"
    return out


# ============================================================================ CPU: dispatch


def test_ops_export_the_functions_and_modules_do_not_import_each_other():
    """``ptune_fast.ops.decode_attention`` / ``.prefix_attention`` are the documented functions
    (right after ``import ptune_fast``), and decode_attention.py does not import prefix_attention.py
    (both take the input checks from the reference): no import cycle."""
    import ast
    import subprocess
    import sys

    code = ("import ptune_fast, sys; "
            "assert callable(ptune_fast.ops.decode_attention) and callable(ptune_fast.ops.prefix_attention); "
            "assert ptune_fast.ops.decode_attention is sys.modules['ptune_fast.ops.decode_attention'].decode_attention; "
            "assert ptune_fast.prefix_attention is ptune_fast.ops.prefix_attention; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    tree = ast.parse(open(da.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("prefix_attention" in (m or "") for m in imported), imported
    assert pa.check_inputs is reference.check_prefix_attention_inputs


def test_public_op_raises_without_extension_or_cuda():
    x = make_inputs()
    with pytest.raises(_backend.BackendUnavailable, match="decode kernel cannot run this call"):
        da.decode_attention(**x)


def test_forced_cuda_backend_raises_clearly(monkeypatch):
    if EXT:
        pytest.skip("the extension serves CUDA calls here; this checks the CPU / no-extension path")
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    x = make_inputs()
    with pytest.raises(_backend.BackendUnavailable, match=r"PTUNE_FAST_BACKEND=cuda: prefix_attention"):
        prefix_attention(**x)


def test_auto_dispatch_on_cpu_uses_sdpa(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x = make_inputs()
    before = _backend.CALLS[(pa.OP, "sdpa")]
    out = prefix_attention(**x)
    assert _backend.CALLS[(pa.OP, "sdpa")] == before + 1
    torch.testing.assert_close(out, reference.prefix_attention(**x))


def test_why_not_reports_missing_extension_or_device():
    x = make_inputs()
    why = da.why_not(**x, causal=True, scale=None, dropout_p=0.0)
    assert why  # CPU tensors or no extension: never served
    if not EXT:
        assert "not built" in why or "CUDA" in why or "cuda" in why


@pytest.fixture
def ext_ok(monkeypatch):
    """Pretend the extension and device are fine to test the remaining refusal reasons on CPU."""
    monkeypatch.setattr(da, "device_why_not", lambda device: "")


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(dropout_p=0.1), "dropout"),
        (dict(S=9), "S=9"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(D=48), "head dim 48"),
        (dict(grad=True), "requires grad"),
    ],
)
def test_why_not_reasons(ext_ok, change, reason):
    dtype = change.get("dtype", torch.float16)
    x = make_inputs(S=change.get("S", 1), T=16, D=change.get("D", 64))
    x = {n: (t.to(dtype) if t is not None and t.is_floating_point() else t) for n, t in x.items()}
    if change.get("grad"):
        x["q"].requires_grad_()
    why = da.why_not(**x, causal=True, scale=None, dropout_p=change.get("dropout_p", 0.0))
    assert reason in why


def test_why_not_accepts_a_supported_call(ext_ok):
    for D, S, dtype in itertools.product(da.HEAD_DIMS, (1, 8), da.DTYPES):
        x = make_inputs(S=S, T=16, D=D, bank=True, pad="left")
        x = {n: (t.to(dtype) if t is not None and t.is_floating_point() else t) for n, t in x.items()}
        x["q"].requires_grad_()
        with torch.no_grad():  # grad-requiring inputs are fine when grad mode is off
            assert da.why_not(**x, causal=True, scale=None, dropout_p=0.0) == ""


def test_public_op_validates_inputs():
    x = make_inputs()
    with pytest.raises(ValueError, match="num_splits"):
        da.decode_attention(**x, num_splits=-1)
    bad = dict(x, k=x["k"][:, :, :, :32])
    with pytest.raises(ValueError):
        da.decode_attention(**bad)


def test_vec_ready_copies_only_when_needed():
    t = torch.randn(2, 4, 10, 64)
    assert da._vec_ready(t) is t
    view = torch.randn(2, 4, 20, 64)[:, :, 3:13]  # static-cache slice: strides fine, offset 3*64
    assert da._vec_ready(view) is view
    odd = torch.randn(2, 4, 10, 65)[..., 1:]  # misaligned start, row stride 65
    fixed = da._vec_ready(odd)
    assert fixed.is_contiguous() and fixed.storage_offset() % 8 == 0 and torch.equal(fixed, odd)
    tr = torch.randn(2, 10, 4, 64).transpose(1, 2)  # [B, T, H, D] viewed [B, H, T, D]: strides ok
    assert da._vec_ready(tr) is tr
    last = torch.randn(2, 4, 64, 10).transpose(-1, -2)
    assert da._vec_ready(last).stride(-1) == 1


def test_mask_ready():
    m = torch.tensor([[1, 0, 2]])
    assert da._mask_ready(m) is m
    f = torch.tensor([[1.0, 0.0, 0.5]])
    assert torch.equal(da._mask_ready(f), torch.tensor([[True, False, True]]))
    assert da._mask_ready(None) is None


# ============================================================================ GPU numerics


def _case(S, P, T, D):
    """Deterministic cycling of the other axes so that every value appears across the grid."""
    i = hash((S, P, T, D)) % 1000003
    B = (1, 3)[i % 2]
    H, Hkv = ((32, 8), (8, 8))[(i // 2) % 2]
    dtype = (torch.float16, torch.bfloat16)[(i // 4) % 2]
    bank = P > 0 and (i // 8) % 2 == 1
    pad = (None, "left", "ragged")[(i // 16) % 3] if T > 1 else None
    return B, H, Hkv, dtype, bank, pad


@gpu_test
@pytest.mark.parametrize("D", (64, 80, 128))
@pytest.mark.parametrize("T", (1, 37, 600))
@pytest.mark.parametrize("P", (0, 1, 7, 128))
@pytest.mark.parametrize("S", (1, 4, 8))
def test_decode_grid(S, P, T, D):
    B, H, Hkv, dtype, bank, pad = _case(S, P, T, D)
    causal = T >= S  # causal needs the S new tokens inside the T keys
    x = make_inputs(B=B, H=H, Hkv=Hkv, S=S, T=T, P=P, D=D, bank=bank, pad=pad, seed=S * 1000 + P + T + D,
                    device="cuda")
    check(x, dtype, causal=causal)


@gpu_test
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("H, Hkv", ((32, 8), (8, 8), (32, 1), (28, 4)))
@pytest.mark.parametrize("bank", (False, True))
@pytest.mark.parametrize("pad", (None, "left", "ragged", "hole"))
def test_decode_heads_bank_padding(dtype, H, Hkv, bank, pad):
    x = make_inputs(B=3, H=H, Hkv=Hkv, S=4, T=200, P=7, D=128, bank=bank, pad=pad, device="cuda")
    check(x, dtype)


@gpu_test
@pytest.mark.parametrize("D", da.HEAD_DIMS)
@pytest.mark.parametrize("num_splits", (1, 2, 5, 0))
def test_decode_num_splits(D, num_splits):
    x = make_inputs(B=2, H=8, Hkv=2, S=2, T=700, P=33, D=D, pad="ragged", device="cuda")
    check(x, torch.bfloat16, num_splits=num_splits)


@gpu_test
def test_decode_split_results_agree():
    x = cast(make_inputs(B=3, H=32, Hkv=8, S=1, T=1000, P=16, D=64, pad="ragged", device="cuda"), torch.float16)
    outs = [da.decode_attention(**x, num_splits=s).float() for s in (1, 3, 8, 32)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-3, rtol=2e-3)


@gpu_test
@pytest.mark.parametrize("causal", (True, False))
def test_decode_causal_flag(causal):
    x = make_inputs(B=2, H=8, Hkv=4, S=8, T=40, P=3, D=64, device="cuda")
    check(x, torch.float16, causal=causal, scale=0.3)


@gpu_test
def test_decode_fully_masked_row_is_zero():
    x = make_inputs(B=2, H=8, Hkv=2, S=1, T=50, P=0, D=64, pad="all", device="cuda")
    out = check(x, torch.float16)
    assert torch.all(out[0] == 0)


@gpu_test
def test_decode_noncontiguous_inputs():
    """q as HF makes it ([B, S, H, D] transposed), k/v as slices of a longer static cache."""
    B, H, Hkv, S, T, D = 2, 16, 4, 3, 90, 80
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, S, H, D, device="cuda", generator=g).transpose(1, 2)
    big_k = torch.randn(B, Hkv, 128, D, device="cuda", generator=g)
    big_v = torch.randn(B, Hkv, 128, D, device="cuda", generator=g)
    pk = torch.randn(Hkv, 5, D, device="cuda", generator=g)
    x = dict(q=q, k=big_k[:, :, 10 : 10 + T], v=big_v[:, :, 10 : 10 + T], prefix_k=pk, prefix_v=pk * 0.5,
             task_ids=None, key_padding_mask=None)
    check(x, torch.bfloat16)
    x["k"] = torch.randn(B, T, Hkv, D, device="cuda", generator=g).transpose(1, 2)  # [B, T, Hkv, D] storage
    check(x, torch.float16)


@gpu_test
@pytest.mark.parametrize("mask_dtype", (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32))
@pytest.mark.parametrize("ids_dtype", (torch.int32, torch.int64))
def test_decode_mask_and_task_id_dtypes(mask_dtype, ids_dtype):
    x = make_inputs(B=3, H=8, Hkv=2, S=1, T=64, P=9, D=64, bank=True, pad="ragged", device="cuda")
    x["key_padding_mask"] = x["key_padding_mask"].to(mask_dtype)
    x["task_ids"] = x["task_ids"].to(ids_dtype)
    check(x, torch.float16)


@gpu_test
def test_decode_bad_task_id_gives_nan_row_not_a_fault():
    x = cast(make_inputs(B=2, H=8, Hkv=2, S=1, T=20, P=4, D=64, bank=True, device="cuda"), torch.float16)
    x["task_ids"] = torch.tensor([0, 7], device="cuda")
    out = da.decode_attention(**x)
    torch.cuda.synchronize()
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@gpu_test
def test_prefix_attention_dispatches_decode_to_cuda(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x = cast(make_inputs(B=2, H=8, Hkv=2, S=1, T=30, P=5, D=64, device="cuda"), torch.float16)
    before = _backend.CALLS[(pa.OP, "cuda")]
    with torch.no_grad():
        out = prefix_attention(**x)
    assert _backend.CALLS[(pa.OP, "cuda")] == before + 1
    torch.testing.assert_close(out, da.decode_attention(**x), atol=0, rtol=0)
    x["q"].requires_grad_()
    before = _backend.CALLS[(pa.OP, "cuda")]
    prefix_attention(**x)  # needs grad: another backend
    assert _backend.CALLS[(pa.OP, "cuda")] == before


@gpu_test
def test_decode_torch_compile_and_cuda_graph():
    x = cast(make_inputs(B=2, H=8, Hkv=2, S=2, T=300, P=6, D=128, pad="left", device="cuda"), torch.bfloat16)
    eager = da.decode_attention(**x)
    args = (x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], None, x["key_padding_mask"], True,
            1.0 / 128**0.5, 0)
    raw = torch.compile(lambda *a: torch.ops.ptune_fast_C.decode_attention(*a), fullgraph=True)  # fake impl
    torch.testing.assert_close(raw(*args), eager, atol=0, rtol=0)
    public = torch.compile(lambda **kw: da.decode_attention(**kw))  # graph breaks allowed
    torch.testing.assert_close(public(**x), eager, atol=0, rtol=0)

    static = {n: (t.clone() if t is not None else None) for n, t in x.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        da.decode_attention(**static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(**static)
    static["q"].copy_(x["q"] * 2)
    graph.replay()
    torch.testing.assert_close(out, da.decode_attention(**dict(x, q=x["q"] * 2)), atol=0, rtol=0)


@gpu_test
def test_decode_large_batch_long_context():
    x = make_inputs(B=16, H=32, Hkv=8, S=1, T=4096, P=128, D=64, pad="ragged", device="cuda")
    check(x, torch.bfloat16)
