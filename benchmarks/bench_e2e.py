"""pytest-benchmark: every prompt-learning method end to end, PEFT vs ``ptune_fast.patch``.

Run::

    python -m pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,min,rounds
    python -m pytest benchmarks/bench_e2e.py -k "refuses or search"   # only the plain checks

The same comparisons as ``python -m benchmarks.e2e`` (which writes the committed table, the
interleaved timing, peak memory, the time breakdown and the plots), at CPU-safe sizes: the
``tiny`` preset of :data:`benchmarks.e2e.PRESETS` by default on CPU (hidden 256, 4 layers,
8 heads, 4 KV heads, vocab 1000, fp32; prefix methods B=4 S=256 P=64, prompt / P-tuning B=8
S=128 n=100), ``1b`` on CUDA. One benchmark group per case, holding the implementations side by
side (same weights: one PEFT model deep-copied, the copy patched), so the ratio shows:

* ``train <method> ...`` -- zero_grad + forward with labels + backward + ``AdamW.step``: ``peft``,
  ``ptune_fast`` and, for prefix tuning / P-Tuning v2, ``ptune_fast+gc`` (non-reentrant gradient
  checkpointing, which PEFT refuses);
* ``generate <method> ...`` -- greedy ``generate`` of a few prompts.

``extra_info``: the untimed agreement with PEFT (loss diff, max |logit diff| on the real tokens,
max |grad diff|; generate: equal generated tokens), tokens through the model, device, versions.
Plain tests (no timing): PEFT's refusal of gradient checkpointing with prefix tuning, and the
largest-batch search of the GPU run.

Environment: ``PTUNE_FAST_BENCH_DEVICE`` (``cpu``/``cuda``; default cuda when available),
``PTUNE_FAST_BENCH_PRESET`` (``tiny``/``smoke``/``1b``), ``PTUNE_FAST_BENCH_ROUNDS`` (timed rounds;
default 5 train, 3 generate), ``PTUNE_FAST_BENCH_THREADS`` (CPU torch threads; default 1).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("peft")

from benchmarks import e2e as E  # noqa: E402

DEV = torch.device(os.environ.get("PTUNE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRESET = os.environ.get("PTUNE_FAST_BENCH_PRESET") or ("1b" if DEV.type == "cuda" else "tiny")
DTYPE = getattr(torch, E.PRESETS[PRESET]["dtype"])
_ROUNDS = os.environ.get("PTUNE_FAST_BENCH_ROUNDS")
TRAIN_ROUNDS = int(_ROUNDS) if _ROUNDS else 5
GEN_ROUNDS = int(_ROUNDS) if _ROUNDS else 3
WARMUP = 1
THREADS = int(os.environ.get("PTUNE_FAST_BENCH_THREADS", "1" if DEV.type == "cpu" else "0"))
if THREADS > 0:
    torch.set_num_threads(THREADS)
LOGIT_TOL = 1e-4 if DTYPE == torch.float32 else 0.5


def _synced(fn):
    def run():
        out = fn()
        E.sync(DEV)
        return out

    return run


def _run(benchmark, group, fn, rounds, info):
    pytest.importorskip("pytest_benchmark")
    benchmark.group = group
    benchmark.extra_info.update(info, device=DEV.type, preset=PRESET, dtype=str(DTYPE).replace("torch.", ""),
                                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                                **({"gpu": torch.cuda.get_device_name(DEV)} if DEV.type == "cuda" else {}))
    benchmark.pedantic(_synced(fn), rounds=rounds, warmup_rounds=WARMUP, iterations=1)


def _label(method):
    B, S, nv = E.shape_of(PRESET, method)
    return f"{method} B={B} S={S} {'P' if E.is_prefix(method) else 'n'}={nv}"


# ------------------------------------------------------------------------------ training step


@functools.lru_cache(maxsize=1)
def _train_cases(method):
    """{impl: Trainer} on one PEFT model's weights, and the untimed parity with PEFT."""
    B, S, nv = E.shape_of(PRESET, method)
    pm = E.build_peft(PRESET, method, DEV, DTYPE)
    impls = {E.PEFT: pm, E.FAST: E.make_fast(pm)}
    if E.is_prefix(method):
        impls[E.FAST_GC] = E.make_fast(pm, gradient_checkpointing=True)
    cases = {k: E.Trainer(m, B, S, DEV) for k, m in impls.items()}
    parity = {E.FAST: E.train_parity(cases[E.PEFT], cases[E.FAST], 0 if E.is_prefix(method) else nv)}
    if E.FAST_GC in cases:
        parity[E.FAST_GC] = E.train_parity(cases[E.PEFT], cases[E.FAST_GC], 0)
    return cases, parity


@pytest.mark.parametrize("impl", (E.PEFT, E.FAST, E.FAST_GC))
@pytest.mark.parametrize("method", E.METHODS)
def test_train_step(benchmark, method, impl):
    if impl == E.FAST_GC and not E.is_prefix(method):
        pytest.skip("gradient checkpointing case: prefix methods only")
    cases, parity = _train_cases(method)
    for k, p in parity.items():
        assert p["max_abs_logit_diff"] <= LOGIT_TOL, (k, p)
    B, S, nv = E.shape_of(PRESET, method)
    if E.is_prefix(method):
        tokens = B * S  # + P prefix keys per layer
    else:
        tokens = B * (nv + S) if impl == E.PEFT else nv + B * S  # shared virtual-token pass
    _run(benchmark, f"train {_label(method)}", cases[impl].step, TRAIN_ROUNDS,
         dict(real_tokens=B * S, tokens_through_model=tokens, **(parity.get(impl) or {})))


# ------------------------------------------------------------------------------ generation


@functools.lru_cache(maxsize=1)
def _gen_models(method):
    pm = E.build_peft(PRESET, method, DEV, DTYPE).eval()
    fast = E.make_fast(pm).eval()
    g = E.PRESETS[PRESET]["gen"]
    ids = E.make_ids(g["prompts"], g["prompt_len"], pm.get_base_model().config.vocab_size, DEV, seed=E.SEED + 7)
    fns = {E.PEFT: E.gen_fn(pm, ids, g["new_tokens"]), E.FAST: E.gen_fn(fast, ids, g["new_tokens"])}
    equal = int((fns[E.PEFT]() == fns[E.FAST]()).sum())
    return fns, dict(generated_tokens=g["prompts"] * g["new_tokens"], generated_tokens_equal=equal,
                     prompts=g["prompts"], prompt_len=g["prompt_len"], new_tokens=g["new_tokens"])


@pytest.mark.parametrize("impl", (E.PEFT, E.FAST))
@pytest.mark.parametrize("method", E.METHODS)
def test_generate(benchmark, method, impl):
    fns, info = _gen_models(method)
    if DTYPE == torch.float32:
        assert info["generated_tokens_equal"] == info["generated_tokens"], info
    g = E.PRESETS[PRESET]["gen"]
    _run(benchmark, f"generate {method} {g['prompts']} prompts x {g['prompt_len']} tokens +{g['new_tokens']} greedy",
         fns[impl], GEN_ROUNDS, info)


# ------------------------------------------------------------------------------ plain checks


@pytest.mark.parametrize("method", ("prefix_proj", "prefix"))
def test_peft_refuses_gradient_checkpointing_with_prefix_tuning(method):
    """What the e2e report records: PEFT raises where ptune_fast trains (see test_train_step[...gc])."""
    res = E.peft_gc_refusal("smoke", method, torch.device("cpu"), torch.float32)
    assert res["get_peft_model_on_checkpointing_base"].startswith("ValueError"), res
    assert res["checkpointing_enabled_after_get_peft_model"] != "ran", res


def test_max_batch_search():
    """The GPU largest-batch search (doubling, then bisection to 1/16) on a known threshold."""
    for true_max in (0, 1, 2, 3, 17, 100, 1000, 4095, 4096, 5000):
        tried = []

        def fits(B):
            tried.append(B)
            return B <= true_max

        best, first_fail, at_limit = E.search_max_batch(fits, 4096)
        assert best <= true_max and (first_fail is None or first_fail > true_max)
        assert at_limit == (true_max >= 4096)
        assert first_fail is None or first_fail - best <= max(1, best // 16)
        assert len(tried) <= 2 * 13 + 1
