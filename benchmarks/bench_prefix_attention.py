"""pytest-benchmark: ``prefix_attention`` vs the PEFT path vs SDPA on pre-concatenated K/V.

Run (GPU)::

    pytest benchmarks/bench_prefix_attention.py --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-json=benchmarks/results/prefix_attention.json

Implementations, all with bottom-right causal alignment and a key padding mask (row 0 is
left-padded by S/8 tokens):

* ``ptune_fast``   -- :func:`ptune_fast.ops.prefix_attention` (Triton on CUDA; the reference on
  CPU). The prefix stays ``[Hkv, P, D]``.
* ``ptune_fast_deterministic`` -- the same with ``PTUNE_FAST_DETERMINISTIC=1``: the split
  backward (separate dQ pass, 7 matmuls per tile pair, no atomics) instead of the fused one
  (5 matmuls, fp32 dQ atomics); ``fwd_bwd`` only.
* ``peft``         -- what PEFT + transformers do per layer: expand the prefix to
  ``[B, Hkv, P, D]``, ``torch.cat`` it onto K/V, build the 4-D bool mask ``[B, 1, S, P+T]``
  (prefix columns all visible), ``repeat_kv`` (transformers repeats K/V when a mask is
  present), SDPA. All of it is inside the timed function.
* ``sdpa_concat``  -- SDPA alone on already-concatenated, already-repeated K/V with a prebuilt
  mask: the floor of the PEFT path without its copies.

``fwd`` times the forward, ``fwd_bwd`` forward + backward (grads of q, k, v and the prefix; of
the concatenated K/V for ``sdpa_concat``). Each shape is one benchmark group so that the
ratios show side by side; ``extra_info`` holds the peak memory of one fwd+bwd above the inputs
(``torch.cuda.max_memory_allocated``), the backend that served ``ptune_fast``, device and versions.

CUDA grid: B in {1, 8, 32} x S in {128, 512, 2048} x P in {16, 128}, H=32, Hkv=8, D=128, bf16.
CPU (collect/smoke only): tiny shapes, fp32, the reference backend.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ptune_fast import _backend
from ptune_fast.ops import prefix_attention

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

if CUDA:
    DTYPE, H, HKV, D = torch.bfloat16, 32, 8, 128
    GRID = list(itertools.product((1, 8, 32), (128, 512, 2048), (16, 128)))
    ROUNDS, WARMUP = 20, 3
else:
    DTYPE, H, HKV, D = torch.float32, 4, 2, 16
    GRID = list(itertools.product((1, 2), (16,), (4,)))
    ROUNDS, WARMUP = 3, 1

IMPLS = ("ptune_fast", "ptune_fast_deterministic", "peft", "sdpa_concat")
MODES = ("fwd", "fwd_bwd")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def make_inputs(B, S, P, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEV, DTYPE)  # noqa: E731
    T = S
    x = dict(q=rnd(B, H, S, D), k=rnd(B, HKV, T, D), v=rnd(B, HKV, T, D), pk=rnd(HKV, P, D), pv=rnd(HKV, P, D))
    mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
    mask[0, : S // 8] = False
    x["mask"] = mask
    x["dout"] = rnd(B, H, S, D)
    return x


def peft_mask(mask, B, S, P, T):
    """[B, 1, S, P+T] bool: prefix always visible, bottom-right causal and padding on the sequence."""
    i = torch.arange(S, device=DEV)[:, None]
    j = torch.arange(T, device=DEV)[None, :]
    seq = (j <= i + (T - S))[None, None] & mask[:, None, None, :]
    return torch.cat([torch.ones(B, 1, S, P, dtype=torch.bool, device=DEV), seq], dim=-1)


def repeat_kv(x, n):
    """transformers' repeat_kv: [B, Hkv, L, D] -> [B, Hkv*n, L, D]."""
    B, Hkv, L, Dh = x.shape
    return x[:, :, None].expand(B, Hkv, n, L, Dh).reshape(B, Hkv * n, L, Dh)


def build(impl, x):
    """``(fn, leaves)``: ``fn()`` returns the output ``[B, H, S, D]``; ``leaves`` get gradients."""
    B, _, S, _ = x["q"].shape
    P, T = x["pk"].shape[1], x["k"].shape[2]
    if impl.startswith("ptune_fast"):
        leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v", "pk", "pv")]
        q, k, v, pk, pv = leaves
        return (lambda: prefix_attention(q, k, v, pk, pv, None, x["mask"], causal=True)), leaves
    if impl == "peft":
        leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v", "pk", "pv")]
        q, k, v, pk, pv = leaves

        def fn():
            kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
            vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
            m = peft_mask(x["mask"], B, S, P, T)
            return F.scaled_dot_product_attention(q, repeat_kv(kk, H // HKV), repeat_kv(vv, H // HKV), attn_mask=m)

        return fn, leaves
    if impl == "sdpa_concat":
        kk = repeat_kv(torch.cat([x["pk"].unsqueeze(0).expand(B, -1, -1, -1), x["k"]], 2), H // HKV).contiguous()
        vv = repeat_kv(torch.cat([x["pv"].unsqueeze(0).expand(B, -1, -1, -1), x["v"]], 2), H // HKV).contiguous()
        leaves = [x["q"].detach().requires_grad_(), kk.requires_grad_(), vv.requires_grad_()]
        if bool(x["mask"].all()):
            # no padding: bottom-right causal over [prefix ; K/V] is exactly torch's lower-right causal
            # bias, which keeps SDPA on its flash / memory-efficient kernels (torch's is_causal=True is
            # top-left when S != P + T: less work and another pattern)
            from torch.nn.attention.bias import causal_lower_right

            m = causal_lower_right(S, P + T)
        else:
            m = peft_mask(x["mask"], B, S, P, T)
        return (lambda: F.scaled_dot_product_attention(leaves[0], leaves[1], leaves[2], attn_mask=m)), leaves
    raise KeyError(impl)


def timed(fn, leaves, mode, dout):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn()
            sync()
    else:
        def step():
            torch.autograd.grad(fn(), leaves, dout)
            sync()
    return step


def peak_memory(step) -> int | None:
    if not CUDA:
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return int(torch.cuda.max_memory_allocated() - base)


def env_info():
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
            "dtype": str(DTYPE).replace("torch.", "")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        info["triton"] = None
    return info


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, S, P", GRID, ids=[f"B{b}-S{s}-P{p}" for b, s, p in GRID])
def test_prefix_attention(benchmark, B, S, P, mode, impl, monkeypatch):
    if impl == "ptune_fast_deterministic":
        if mode == "fwd":
            pytest.skip("the forward has one path")
        monkeypatch.setenv("PTUNE_FAST_DETERMINISTIC", "1")  # the split backward, no atomics
    x = make_inputs(B, S, P)
    fn, leaves = build(impl, x)
    step = timed(fn, leaves, mode, x["dout"])
    before = dict(_backend.CALLS)
    step()  # first call: Triton autotuning / compilation, outside the timing
    served = [b for (op, b), n in _backend.CALLS.items() if op == "prefix_attention" and n > before.get((op, b), 0)]
    benchmark.group = f"{mode} B={B} S={S} P={P} H={H} Hkv={HKV} D={D}"
    benchmark.extra_info.update(env_info(), impl=impl, mode=mode, B=B, S=S, P=P, H=H, Hkv=HKV, D=D,
                                backend=served[0] if served else None, peak_mem_bytes=peak_memory(step))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
