"""pytest-benchmark: the end-to-end cases of :mod:`benchmarks.run`, PEFT vs ``ptune_fast.patch``.

Run::

    python -m pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,min,rounds
    PTUNE_FAST_BENCH_SUITES=train_step python -m pytest benchmarks/bench_e2e.py --benchmark-only

The same cases as ``python -m benchmarks.run`` (suites ``train_step``, ``fold_bank``, ``e2e`` of
:data:`benchmarks.cases.SUITES`; which writes the committed tables with interleaved timing, memory,
the profiler breakdown and plots), one benchmark group per case holding its implementations side
by side (same weights: one PEFT model deep-copied, the copy patched), so the ratio shows. Before
timing, each case checks untimed that ptune_fast agrees with PEFT (max |logit diff| on the real
tokens); ``extra_info`` holds that agreement, the tokens per call and through the model, device
and versions.

Environment: ``PTUNE_FAST_BENCH_DEVICE`` (``cpu``/``cuda``; default cuda when available),
``PTUNE_FAST_BENCH_PRESET`` (``smoke``/``small``/``1b``; default small on CPU, 1b on CUDA),
``PTUNE_FAST_BENCH_SUITES`` (comma-separated; default all), ``PTUNE_FAST_BENCH_ROUNDS`` (timed
rounds; default 5), ``PTUNE_FAST_BENCH_THREADS`` (CPU torch threads; default 1, 0 = torch's).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("peft")

from benchmarks import cases as C  # noqa: E402
from benchmarks import measure as M  # noqa: E402
from benchmarks.run import prepare  # noqa: E402

DEV = torch.device(os.environ.get("PTUNE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRESET = os.environ.get("PTUNE_FAST_BENCH_PRESET") or ("1b" if DEV.type == "cuda" else "small")
SUITES = [s for s in os.environ.get("PTUNE_FAST_BENCH_SUITES", ",".join(C.SUITES)).split(",") if s]
ROUNDS = int(os.environ.get("PTUNE_FAST_BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("PTUNE_FAST_BENCH_THREADS", "1" if DEV.type == "cpu" else "0"))
if THREADS > 0:
    torch.set_num_threads(THREADS)


def _plan():
    """(case, model, dtype, impl) of every selected suite; the diagnostic implementations
    (``ptune_fast+sdpa``, ``base``, PEFT on one batch) are the runner's, not benchmarked here."""
    out = []
    for suite in SUITES:
        model, dtype, _, cases = C.expand(suite, PRESET)
        for c in cases:
            gc = c["kind"] == "train" and "gc" in c["measure"] and C.is_prefix(c["method"])
            out += [(c, model, getattr(torch, dtype), impl) for impl in (C.PEFT, C.FAST) + ((C.FAST_GC,) if gc else ())]
    return out


PLAN = _plan()


@functools.lru_cache(maxsize=1)
def _prepared(case_id):
    case, model, dtype, _ = next(x for x in PLAN if x[0]["id"] == case_id)
    return prepare(case, model, DEV, dtype)


@pytest.mark.parametrize("case,model,dtype,impl", PLAN, ids=[f"{c['id']}-{impl}" for c, _, _, impl in PLAN])
def test_case(benchmark, case, model, dtype, impl):
    pytest.importorskip("pytest_benchmark")
    p = _prepared(case["id"])
    if "max_abs_logit_diff" in p.parity:
        assert p.parity["max_abs_logit_diff"] <= (1e-4 if dtype == torch.float32 else 0.5), p.parity
    benchmark.group = f"{case['id']}"
    benchmark.extra_info.update(
        parity=p.parity, tokens_per_call=p.tokens, device=DEV.type, preset=PRESET,
        dtype=str(dtype).replace("torch.", ""), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        **({"tokens_through_model": p.tokens_through_model.get(impl)} if p.tokens_through_model else {}),
        **({"gpu": torch.cuda.get_device_name(DEV)} if DEV.type == "cuda" else {}))

    def call():
        out = p.fns[impl]()
        M.sync(DEV)
        return out

    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if impl == C.FAST and case["kind"] == "train":  # the patched encoder runs once per step
        t = p.trainers[C.FAST]
        before = t.encoder_calls()
        t.step()
        assert t.encoder_calls() - before == 1, "the patched encoder should run once per step"
        measured = t.state_bytes()  # one shared K/V per layer, not one per row
        assert measured is None or measured == C.prefix_bytes(t.pm, C.FAST, t.B), measured
