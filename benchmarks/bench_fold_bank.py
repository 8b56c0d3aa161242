"""pytest-benchmark: deep fold, shared virtual-token pass and TaskBank vs PEFT.

Run::

    python -m pytest benchmarks/bench_fold_bank.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,min,rounds

One benchmark group per case, holding ``peft`` and ``ptune_fast`` side by side (same weights: one
model deep-copied), so the ratio shows:

* ``prefill n=100 S=.. B=..`` -- no-grad forward of prompt tuning: PEFT vs ``ptune_fast.patch`` +
  ``ptune_fast.fold`` (deep fold: the virtual tokens' per-layer K/V served as a static prefix);
* ``train <method> n=100 S=128 B=..`` -- forward + backward + ``AdamW.step`` of prompt tuning /
  P-tuning (MLP): PEFT vs ``ptune_fast.patch`` (shared virtual-token pass);
* ``bank forward|generate`` -- 8 prefix-tuning tasks x 4 rows, S=64: PEFT task after task
  (``set_adapter`` + each task's rows as a batch) vs one :class:`ptune_fast.TaskBank` call over the
  mixed batch; generate: 16 greedy tokens.

Shapes come from :data:`benchmarks.fold_bank_report.PRESETS` (``small``: hidden 256, 4 layers,
8 heads, 4 KV heads, intermediate 512, vocab 1000, fp32). ``extra_info`` holds the real tokens per
call, the tokens pushed through the model, and the untimed agreement check with PEFT (max abs
logit diff on the real tokens; loss / gradient diffs; equal generated tokens).

Environment: ``PTUNE_FAST_BENCH_DEVICE`` (``cpu``/``cuda``; default cuda when available),
``PTUNE_FAST_BENCH_PRESET`` (default ``small`` on CPU, ``1b`` on CUDA), ``PTUNE_FAST_BENCH_ROUNDS``
(timed rounds; default 10, training 5), ``PTUNE_FAST_BENCH_THREADS`` (CPU torch threads).
On CUDA every round is ``torch.cuda.synchronize``d.

For the committed table (interleaved timing, IQR, where the time goes, JSON) use
``python -m benchmarks.fold_bank_report``.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("pytest_benchmark")

from benchmarks import fold_bank_report as R  # noqa: E402

DEV = torch.device(os.environ.get("PTUNE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRESET = os.environ.get("PTUNE_FAST_BENCH_PRESET") or ("1b" if DEV.type == "cuda" else "small")
DTYPE = getattr(torch, R.PRESETS[PRESET]["dtype"])
_ROUNDS = os.environ.get("PTUNE_FAST_BENCH_ROUNDS")
ROUNDS = int(_ROUNDS) if _ROUNDS else 10
TRAIN_ROUNDS = int(_ROUNDS) if _ROUNDS else 5
WARMUP = 1
if os.environ.get("PTUNE_FAST_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PTUNE_FAST_BENCH_THREADS"]))
IMPLS = (R.PEFT, R.FAST)
SPEC = R.PRESETS[PRESET]


def _synced(fn):
    def run():
        out = fn()
        R.sync(DEV)
        return out

    return run


def _run(benchmark, group, fn, rounds, info):
    benchmark.group = group
    benchmark.extra_info.update(info, device=DEV.type, preset=PRESET, dtype=str(DTYPE).replace("torch.", ""),
                                cpu=R.cpu_model(), torch_threads=torch.get_num_threads(),
                                **({"gpu": torch.cuda.get_device_name(DEV)} if DEV.type == "cuda" else {}))
    benchmark.pedantic(_synced(fn), rounds=rounds, warmup_rounds=WARMUP, iterations=1)


# ------------------------------------------------------------------------------ 1. prefill


@functools.lru_cache(maxsize=1)
def _prefill_models():
    return R.prefill_models(PRESET, DEV, DTYPE, SPEC["prefill"]["n"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", SPEC["prefill"]["B"])
@pytest.mark.parametrize("S", SPEC["prefill"]["S"])
def test_prefill(benchmark, S, B, impl):
    n = SPEC["prefill"]["n"]
    pm, fast, _ = _prefill_models()
    ids, mask = R.make_batch(B, S, pm.get_base_model().config.vocab_size, DEV)
    ref = R.prefill_fn(pm, ids, mask)()[:, n:]
    fn = R.prefill_fn(pm if impl == R.PEFT else fast, ids, mask)
    diff = R._max_abs(R.prefill_fn(fast, ids, mask)() - ref)
    assert diff <= (1e-4 if DTYPE == torch.float32 else 0.5), diff
    _run(benchmark, f"prefill n={n} S={S} B={B}", fn, ROUNDS,
         dict(real_tokens=B * S, tokens_through_model=B * (n + S) if impl == R.PEFT else B * S,
              max_abs_logit_diff=diff))


# ------------------------------------------------------------------------------ 2. train


@functools.lru_cache(maxsize=1)
def _train_cases(method, B):
    cp, cf = R.train_cases(PRESET, DEV, DTYPE, method, B)
    return cp, cf, R.train_parity(cp, cf, SPEC["train"]["n"], diag=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", SPEC["train"]["B"])
@pytest.mark.parametrize("method", SPEC["train"]["methods"])
def test_train_step(benchmark, method, B, impl):
    n, S = SPEC["train"]["n"], SPEC["train"]["S"]
    cp, cf, parity = _train_cases(method, B)
    assert parity["max_abs_logit_diff"] <= (1e-4 if DTYPE == torch.float32 else 0.5), parity
    case = cp if impl == R.PEFT else cf
    _run(benchmark, f"train {method} n={n} S={S} B={B}", case.step, TRAIN_ROUNDS,
         dict(real_tokens=B * S, tokens_through_model=B * (n + S) if impl == R.PEFT else n + B * S, **parity))


# ------------------------------------------------------------------------------ 3. bank


@functools.lru_cache(maxsize=1)
def _bank_case():
    case = R.BankCase(PRESET, DEV, DTYPE)
    return case, case.parity()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call", ("forward", "generate"))
def test_bank(benchmark, call, impl):
    case, parity = _bank_case()
    assert parity["max_abs_logit_diff"] <= (1e-4 if DTYPE == torch.float32 else 0.5), parity
    fn = {(R.PEFT, "forward"): case.peft_forward, (R.FAST, "forward"): case.bank_forward,
          (R.PEFT, "generate"): case.peft_generate, (R.FAST, "generate"): case.bank_generate}[(impl, call)]
    tokens = case.B * (case.S if call == "forward" else case.G)
    _run(benchmark, f"bank {call} {case.T} tasks x {case.R} rows S={case.S}", fn, ROUNDS,
         dict(real_tokens=tokens, tasks=case.T, rows_per_task=case.R, P=case.P,
              peft="sequential: set_adapter + one batch per task", ptune_fast="one TaskBank call, mixed rows",
              **parity))
