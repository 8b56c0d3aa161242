"""pytest-benchmark: one decode step of attention (S = 1 new token) -- the CUDA decode kernel
vs the PEFT path. Skipped without CUDA; ``ptune_fast*`` rows skipped without ``ptune_fast._C``.

Run (GPU)::

    pytest benchmarks/bench_decode_attention.py --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-json=benchmarks/results/decode_attention.json

Llama-3.2-1B-like layer: H=32, Hkv=8, D=64, bf16. Grid: B in {1, 16, 64} x context in
{512, 4096} x P in {16, 128}; row 0 is left-padded by context/8 tokens. Per step and layer:

* ``peft``              -- what PEFT + transformers do: the prefix was copied per row into the
  ``DynamicCache`` at prefill, so the cache is ``[B, Hkv, P + ctx, D]``; the step
  ``torch.cat``s the new token's K/V onto it (``DynamicCache.update``), builds the 4-D mask
  ``[B, 1, 1, P + ctx + 1]`` (P ones prepended), ``repeat_kv`` (transformers repeats K/V when a
  mask is present) and calls SDPA.
* ``ptune_fast``        -- the same cache update without the prefix (``torch.cat`` of
  ``[B, Hkv, ctx, D]`` and the new token) + :func:`ptune_fast.ops.decode_attention.decode_attention`
  with the shared ``[Hkv, P, D]`` prefix and the 2-D padding mask.
* ``ptune_fast_kernel`` -- the kernel alone on the already-updated cache.

Every timed call ends with ``torch.cuda.synchronize()``. ``extra_info``: device, versions,
the number of key splits the kernel chose, and the bytes of prefix PEFT holds per layer.
"""
from __future__ import annotations

import itertools
import platform

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="decode attention benchmarks need a CUDA device")

H, HKV, D, DTYPE = 32, 8, 64, torch.bfloat16
GRID = list(itertools.product((1, 16, 64), (512, 4096), (16, 128)))
IMPLS = ("peft", "ptune_fast", "ptune_fast_kernel")
ROUNDS, WARMUP, ITERS = 30, 5, 10


def _ext_available() -> bool:
    if not CUDA:
        return False
    import importlib

    da = importlib.import_module("ptune_fast.ops.decode_attention")  # the module, not the exported function
    return da._load_ops()


def make_inputs(B, ctx, P, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=DTYPE)  # noqa: E731
    x = dict(q=rnd(B, H, 1, D), k_cache=rnd(B, HKV, ctx, D), v_cache=rnd(B, HKV, ctx, D),
             k_new=rnd(B, HKV, 1, D), v_new=rnd(B, HKV, 1, D), pk=rnd(HKV, P, D), pv=rnd(HKV, P, D))
    mask = torch.ones(B, ctx + 1, dtype=torch.bool, device="cuda")
    mask[0, : ctx // 8] = False
    x["mask"] = mask
    # PEFT's cache: the prefix copied into every row at prefill
    x["k_cache_peft"] = torch.cat([x["pk"].expand(B, -1, -1, -1), x["k_cache"]], dim=2)
    x["v_cache_peft"] = torch.cat([x["pv"].expand(B, -1, -1, -1), x["v_cache"]], dim=2)
    x["k_full"] = torch.cat([x["k_cache"], x["k_new"]], dim=2)
    x["v_full"] = torch.cat([x["v_cache"], x["v_new"]], dim=2)
    return x


def repeat_kv(t, n):
    B, Hkv, T, Dh = t.shape
    return t[:, :, None].expand(B, Hkv, n, T, Dh).reshape(B, Hkv * n, T, Dh)


def peft_step(x, P):
    k = torch.cat([x["k_cache_peft"], x["k_new"]], dim=2)  # DynamicCache.update
    v = torch.cat([x["v_cache_peft"], x["v_new"]], dim=2)
    B = k.shape[0]
    pad = torch.cat([torch.ones(B, P, dtype=torch.bool, device="cuda"), x["mask"]], dim=1)
    attn_mask = pad[:, None, None, :]  # one query: causal = everything
    return F.scaled_dot_product_attention(x["q"], repeat_kv(k, H // HKV), repeat_kv(v, H // HKV), attn_mask=attn_mask)


def ptune_fast_step(x, P):
    from ptune_fast.ops.decode_attention import decode_attention

    k = torch.cat([x["k_cache"], x["k_new"]], dim=2)
    v = torch.cat([x["v_cache"], x["v_new"]], dim=2)
    return decode_attention(x["q"], k, v, x["pk"], x["pv"], key_padding_mask=x["mask"])


def kernel_only(x, P):
    from ptune_fast.ops.decode_attention import decode_attention

    return decode_attention(x["q"], x["k_full"], x["v_full"], x["pk"], x["pv"], key_padding_mask=x["mask"])


FNS = {"peft": peft_step, "ptune_fast": ptune_fast_step, "ptune_fast_kernel": kernel_only}


def _info(B, ctx, P):
    import transformers

    props = torch.cuda.get_device_properties(0)
    return dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                cuda=torch.version.cuda, transformers=transformers.__version__, python=platform.python_version(),
                B=B, ctx=ctx, P=P, H=H, Hkv=HKV, D=D, dtype=str(DTYPE),
                peft_prefix_bytes_per_layer=2 * B * HKV * P * D * 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B, ctx, P", GRID, ids=[f"B{b}-ctx{c}-P{p}" for b, c, p in GRID])
def test_decode_step(benchmark, impl, B, ctx, P):
    if impl.startswith("ptune_fast") and not _ext_available():
        pytest.skip("ptune_fast._C is not built")
    benchmark.group = f"decode B={B} ctx={ctx} P={P}"
    x = make_inputs(B, ctx, P)
    fn = FNS[impl]
    with torch.no_grad():
        if impl != "peft":  # same numbers as the PEFT path (sanity, outside the timing)
            torch.testing.assert_close(fn(x, P).float(), peft_step(x, P).float(), atol=2e-2, rtol=2e-2)

        def step():
            for _ in range(ITERS):
                fn(x, P)
            torch.cuda.synchronize()

        benchmark.extra_info.update(_info(B, ctx, P), iterations_per_round=ITERS)
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
