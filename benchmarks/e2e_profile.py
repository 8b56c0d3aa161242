"""Where the time goes, for :mod:`benchmarks.e2e`: one profiled call per side, its ops put in buckets.

Self time (CPU) or kernel time (CUDA) of every op put in one bucket: *attention* (SDPA ops,
``ptune_fast::prefix_attention*``), *copies* (cat / stack / expand / repeat / copy_ / clone /
casts), *encoder* (everything under the prompt encoder's call, its backward included), *frozen
GEMMs* (linear / matmul / mm / addmm / bmm outside the encoder), *optimizer* (``AdamW.step`` /
``zero_grad``), *other* (norms, RoPE, activations, loss, embedding, ...). An op's bucket is the
one of its outermost ancestor that has one; a backward node takes the bucket of the forward op
that created it (encoder and copies wholly, else as a default for children without one). The
profiler adds per-op overhead: shares, not times.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch

from benchmarks.fold_bank_report import sync

ENC_LABEL = "e2e::encoder"
_ATTN_PREFIX = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::_flash_attention",
                "aten::_efficient_attention", "aten::_cudnn_attention", "ptune_fast::prefix_attention",
                "ptune_fast_C::decode_attention")
_GEMM = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
         "aten::_addmm_activation"}
_COPY = {"aten::cat", "aten::stack", "aten::repeat", "aten::repeat_interleave", "aten::expand", "aten::expand_as",
         "aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}
BUCKETS = ("attention", "copies", "encoder", "gemm", "optimizer", "other")
BUCKET_LABEL = {"attention": "attention", "copies": "copies", "encoder": "encoder", "gemm": "frozen GEMMs",
                "optimizer": "optimizer", "other": "other"}


def _bucket(name):
    if name == ENC_LABEL:
        return "encoder"
    if name.startswith(_ATTN_PREFIX):
        return "attention"
    if name in _GEMM:
        return "gemm"
    if name in _COPY:
        return "copies"
    if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
        return "optimizer"
    return None


@contextlib.contextmanager
def label_encoders(pm):
    """Wrap every prompt-encoder call in ``record_function(ENC_LABEL)``: PEFT's ``prompt_encoder``
    modules, and ptune_fast's ``encode`` as the patch and the shared pass call it."""
    from torch.profiler import record_function

    from ptune_fast.integrations import peft as ip
    from ptune_fast.integrations import shared_pass as sp

    def wrap(fn):
        def run(*a, **k):
            with record_function(ENC_LABEL):
                return fn(*a, **k)

        return run

    saved = [(ip, ip.encode), (sp, sp.encode)]
    ip.encode, sp.encode = wrap(ip.encode), wrap(sp.encode)
    encs = list(pm.prompt_encoder.values())
    for enc in encs:
        enc.forward = wrap(type(enc).forward.__get__(enc))
    try:
        yield
    finally:
        for mod, fn in saved:
            mod.encode = fn
        for enc in encs:
            del enc.forward


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's native start/stop lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def breakdowns(cases, dev, sessions):
    """``{impl: breakdown}`` from ``sessions`` profiled calls per implementation (``cases``:
    ``{impl: (fn, peft_model)}``), the implementations
    alternating session by session; per bucket the median ms over the sessions (a stray slow op in
    one session does not move it); ``total_ms`` = the sum of those medians."""
    runs = {k: [] for k in cases}
    for i in range(sessions):
        for k in (list(cases) if i % 2 == 0 else list(cases)[::-1]):
            runs[k].append(_breakdown_once(*cases[k], dev))
    out = {}
    for k, rs in runs.items():
        ms = {b: statistics.median(r[b] for r, _ in rs) for b in BUCKETS}
        total = sum(ms.values())
        out[k] = {"ms": {b: round(v, 3) for b, v in ms.items()},
                  "share": {b: round(v / total, 4) if total else None for b, v in ms.items()},
                  "total_ms": round(total, 3), "profiled_wall_ms": round(statistics.median(w for _, w in rs), 3),
                  "sessions": sessions, "clock": "CUDA kernel time" if dev.type == "cuda" else "CPU self time"}
    return out


def _breakdown_once(fn, pm, dev):
    """One profiled call of ``fn``: (ms per bucket, profiled wall ms)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    sync(dev)
    t0 = time.perf_counter()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with quiet_stderr(), label_encoders(pm), profile(activities=acts) as prof:
        fn()
        sync(dev)
    wall = time.perf_counter() - t0
    ms = dict.fromkeys(BUCKETS, 0.0)
    created = {}  # (forward thread, sequence_nr) -> bucket of the op that created the autograd node

    def self_us(e):
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    def walk(e, inherited, default, backward):
        if e.name.startswith("autograd::engine::evaluate_function"):
            made = created.get((e.fwd_thread, e.sequence_nr))
            inherited, default, backward = (made, None, True) if made in ("encoder", "copies") else (None, made, True)
        b = inherited or _bucket(e.name)
        ms[b or default or "other"] += self_us(e) / 1e3
        if not backward and e.sequence_nr >= 0:
            created[(e.thread, e.sequence_nr)] = b  # the last op seeing a sequence number is its node's creator
        for c in e.cpu_children:
            walk(c, b, default, backward)

    cpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    for e in sorted((e for e in cpu_events if e.cpu_parent is None), key=lambda e: e.time_range.start):
        walk(e, None, None, False)
    return ms, wall * 1e3
