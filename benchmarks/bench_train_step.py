"""pytest-benchmark: one training step (forward + backward + AdamW step), PEFT vs ``ptune_fast.patch``.

Run::

    python -m pytest benchmarks/bench_train_step.py --benchmark-only
    python -m pytest benchmarks/bench_train_step.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-json=/tmp/train_step.json

Model: the small Llama of :mod:`benchmarks.common` (hidden 256, 4 layers, 8 heads, 4 KV heads,
vocab 1000, seq 64, P = 20 virtual tokens), fp32, built from its config. Methods: prefix tuning
with projection (``PrefixTuningConfig(prefix_projection=True)``) and P-tuning
(``PromptEncoderConfig``, MLP). B in {1, 8, 32}. Each (method, B) is one benchmark group holding
``peft`` and ``ptune_fast`` side by side, so the ratio shows; the two models are identical
(same seed) except for the patch. On CUDA every round is ``torch.cuda.synchronize``d.

``extra_info`` of every benchmark:

* ``encoder_ms`` -- the encoder forward alone (autograd on), median of its own loop: PEFT's
  ``pm.get_prompt(B)`` vs the patched encode (prefix tuning: the state's provider on the P rows;
  P-tuning: ``encode`` of the encoder's n rows once); ``encoder_share`` = encoder_ms / step median;
  ``encoder_input_rows`` = rows the encoder runs on (PEFT prefix tuning: B*P; patched: P).
* ``prefix_bytes`` -- K/V of the P virtual tokens per step, computed from shapes with
  X = L*2*Hkv*P*D*elem (PEFT prefix tuning: 2*B*X, the encoder output plus as much again in the
  per-layer ``torch.cat`` copies; PEFT P-tuning: B*X, a lower bound; patched: X);
  ``state_bytes_measured`` -- the patched state's keys + values storages after a step.
* ``peak_bytes`` -- measured peak tensor memory of one step above what was live before it
  (CPU: allocator events of ``torch.profiler``; CUDA: ``max_memory_allocated``).
* ``saved_bytes`` -- measured bytes autograd saves for backward in the forward.
* ``attention_ms_profiled`` -- the attention op's forward + backward per step under
  ``torch.profiler`` (SDPA for PEFT, ``ptune_fast::prefix_attention`` patched): attribution only.
* device, versions, backend environment.

Environment: ``PTUNE_FAST_BENCH_ROUNDS`` (default 10), ``PTUNE_FAST_BENCH_THREADS`` (torch
intra-op threads; default 1 on CPU, 0 = torch's default), ``PTUNE_FAST_BENCH_DEVICE``
(``cpu``/``cuda``).

For a committed table with interleaved timing, median/IQR and JSON, use
``python -m benchmarks.train_step_report``.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import common as C

DEV = C.device()
ROUNDS = int(os.environ.get("PTUNE_FAST_BENCH_ROUNDS", "10"))
WARMUP = 2
# One intra-op thread on CPU by default: on a shared machine, OpenMP threads competing with other
# processes turn a 60 ms step into 500+ ms at random; 0 keeps torch's default.
THREADS = int(os.environ.get("PTUNE_FAST_BENCH_THREADS", "1" if DEV.type == "cpu" else "0"))
if THREADS > 0:
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def env():
    return C.env_info(DEV)


@pytest.mark.parametrize("impl", ("peft", "ptune_fast"))
@pytest.mark.parametrize("B", C.BATCHES)
@pytest.mark.parametrize("method", C.METHODS)
def test_train_step(benchmark, env, method, B, impl):
    case = C.make_case(method, impl, B, dev=DEV)
    benchmark.group = f"train_step {method} B={B}"
    step = C.synced(case.step, DEV)

    # encoder forward alone (own loop, not the benchmarked function)
    enc = C.median_iqr(C.time_fn(case.encoder, DEV, warmup=3, repeat=30))[0]

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

    calls = None
    patch = getattr(case.pm, "_ptune_fast_patch", None)
    if patch is not None:
        holder = patch.state if patch.state is not None else patch
        before = holder.encoder_calls
        case.step()
        calls = holder.encoder_calls - before
    case.opt.zero_grad(set_to_none=True)
    peak = C.peak_bytes(case.step, DEV)
    case.opt.zero_grad(set_to_none=True)
    saved = C.saved_bytes(case.forward_loss, [p for g in case.opt.param_groups for p in g["params"]])

    attn = C.attention_ms(case.step, DEV)
    stats = getattr(benchmark, "stats", None)
    step_median = stats.stats.median if stats is not None else None
    benchmark.extra_info.update(
        method=method, impl=impl, B=B, S=C.SEQ_LEN, P=C.NUM_VIRTUAL_TOKENS,
        encoder_ms=enc * 1e3,
        encoder_share=(enc / step_median) if step_median else None,
        encoder_input_rows=(B if impl == "peft" and method.startswith("prefix") else 1) * C.NUM_VIRTUAL_TOKENS,
        encoder_calls_per_step=calls,
        prefix_bytes=case.prefix_bytes(),
        state_bytes_measured=case.state_bytes(),
        attention_ms_profiled=attn["attention_ms"],
        peak_bytes=peak,
        saved_bytes=saved,
        peak_method="torch.cuda.max_memory_allocated" if DEV.type == "cuda" else "torch.profiler CPU allocator events",
        **{k: env[k] for k in ("device", "cpu", "torch_threads", "torch", "transformers", "peft", "ptune_fast",
                               "git_commit", "backend_env")},
        **({"gpu": env["gpu"]} if "gpu" in env else {}),
    )
    if impl == "ptune_fast":
        assert calls == 1, f"the patched encoder should run once per step, ran {calls} times"
        measured = case.state_bytes()
        if measured is not None:
            assert measured == case.prefix_bytes(), (measured, case.prefix_bytes())
