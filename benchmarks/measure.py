"""How the benchmarks measure: interleaved timing, statistics, memory, profiler attribution,
the largest-batch search and the SDPA diagnostic.

* **Timing** -- the implementations alternate call by call (A B C, C B A, ...) so that drift and
  foreign load hit all alike; median and IQR (q1-q3, inclusive quartiles) of ``repeat`` calls after
  ``warmup`` untimed ones, ``torch.cuda.synchronize``d on GPU. speedup = PEFT median / ptune_fast
  median (> 1: ptune_fast faster); a verdict only when the two IQRs do not overlap.
* **peak bytes** -- tensor memory allocated while one call runs, above what was live before it
  (weights, optimizer state, batch excluded). CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
  running sum of the allocator's ``[memory]`` events of ``torch.profiler(profile_memory=True)``.
* **saved bytes** -- the distinct storages autograd saves for backward during a forward
  (``saved_tensors_hooks``), parameters excluded: activation memory held until backward.
* **attention share** -- inclusive time of the outermost attention ops (forward + backward) in one
  profiled call over the profiled total (CPU time on CPU, device time on CUDA): attribution only.
* **breakdown** -- self time (CPU) or kernel time (CUDA) of every op of one profiled call put in one
  bucket: attention (SDPA, ``ptune_fast::prefix_attention*``), copies (cat / stack / expand / repeat /
  copy_ / clone / casts), encoder (everything under the prompt encoder's call, its backward too),
  frozen GEMMs (linear / matmul / mm / addmm / bmm outside the encoder), optimizer (``AdamW.step`` /
  ``zero_grad``), other (norms, RoPE, activations, loss, embedding, ...). An op's bucket is the one of
  its outermost ancestor that has one; a backward node takes the bucket of the forward op that
  created it (encoder and copies wholly, else as a default for children without one). The profiler
  adds per-op overhead: shares, not times.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def interleaved(fns, dev, warmup, repeat):
    """Seconds per call of each fn; the order alternates (ABC, CBA, ...) so drift hits all alike."""
    for _ in range(warmup):
        for f in fns:
            f()
    sync(dev)
    times = [[] for _ in fns]
    order = list(range(len(fns)))
    for i in range(repeat):
        for j in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fns[j]()
            sync(dev)
            times[j].append(time.perf_counter() - t0)
    return times


def stats(xs, tokens=None):
    """median / q1 / q3 in ms (inclusive quartiles), n, and tokens/s at the median."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    med = statistics.median(xs)
    out = {"median_ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "n": len(xs)}
    if tokens:
        out.update(tokens=tokens, tokens_per_s=tokens / med)
    return out


def verdict(ref, got):
    """'faster' / 'slower' (``got`` vs ``ref``) when their IQRs do not overlap, else 'within noise'."""
    if got["q3_ms"] < ref["q1_ms"]:
        return "faster"
    if got["q1_ms"] > ref["q3_ms"]:
        return "slower"
    return "within noise"


def compare(fns, dev, warmup, repeat, tokens=None, ref="peft"):
    """Time ``fns`` ({impl: fn}) interleaved: ``{"time": {impl: stats}, "speedup": {impl: ref median /
    impl median}, "paired_speedup": {impl: median of per-round ratios}, "verdict": {impl: ...}}``."""
    names = list(fns)
    ts = interleaved([fns[n] for n in names], dev, warmup, repeat)
    res = {"time": {n: stats(t, tokens) for n, t in zip(names, ts)}, "speedup": {}, "paired_speedup": {},
           "verdict": {}}
    r = res["time"][ref]
    for n, t in zip(names, ts):
        if n != ref:
            res["speedup"][n] = r["median_ms"] / res["time"][n]["median_ms"]
            res["paired_speedup"][n] = statistics.median(a / b for a, b in zip(ts[names.index(ref)], t))
            res["verdict"][n] = verdict(r, res["time"][n])
    return res


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


# ------------------------------------------------------------------------------ memory


def peak_bytes(fn, dev):
    """Peak tensor memory allocated while ``fn`` runs, above what was live before (see module doc)."""
    sync(dev)
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


def saved_bytes(forward, params):
    """Bytes of the distinct storages autograd saves during ``forward()`` (parameters excluded);
    ``forward`` returns a scalar loss, then backward frees the graph."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            st = t.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return int(sum(seen.values()))


# ------------------------------------------------------------------------------ profiler


def _profile(fn, dev, **kw):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t0 = time.perf_counter()
    with quiet_stderr(), profile(activities=acts, **kw) as prof:
        fn()
        sync(dev)
    return prof, (time.perf_counter() - t0) * 1e3


def _is_attention(name):
    return name in ("aten::scaled_dot_product_attention", "ptune_fast::prefix_attention",
                    "ptune_fast::prefix_attention_backward") or (
        name.startswith("aten::_scaled_dot_product") and name.endswith("_backward"))


def attention_share(fn, dev, sessions=1):
    """Median over ``sessions`` profiled calls: ``attention_ms`` (outermost attention ops, fwd + bwd,
    inclusive), ``total_ms`` (sum of self times), ``attention_share``."""
    cuda, runs = dev.type == "cuda", []
    for _ in range(sessions):
        prof, _ = _profile(fn, dev)
        att = tot = 0.0
        for e in prof.events():
            tot += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
            if _is_attention(e.name):
                parent = e.cpu_parent
                while parent is not None and not _is_attention(parent.name):
                    parent = parent.cpu_parent
                if parent is None:
                    att += (e.device_time_total if cuda else e.cpu_time_total) / 1e3
        runs.append((att, tot))
    att, tot = statistics.median(a for a, _ in runs), statistics.median(t for _, t in runs)
    return {"attention_ms": round(att, 3), "total_ms": round(tot, 3),
            "attention_share": round(att / tot, 3) if tot else None}


ENC_LABEL = "bench::encoder"
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


def breakdowns(cases, dev, sessions):
    """``{impl: breakdown}`` from ``sessions`` profiled calls per implementation (``cases``:
    ``{impl: (fn, peft_model)}``), alternating session by session; per bucket the median ms over the
    sessions; ``total_ms`` = the sum of those medians."""
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
    cuda = dev.type == "cuda"
    with label_encoders(pm):
        prof, wall = _profile(fn, dev)
    ms = dict.fromkeys(BUCKETS, 0.0)
    created = {}  # (forward thread, sequence_nr) -> bucket of the op that created the autograd node

    def walk(e, inherited, default, backward):
        if e.name.startswith("autograd::engine::evaluate_function"):
            made = created.get((e.fwd_thread, e.sequence_nr))
            inherited, default, backward = (made, None, True) if made in ("encoder", "copies") else (None, made, True)
        b = inherited or _bucket(e.name)
        ms[b or default or "other"] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
        if not backward and e.sequence_nr >= 0:
            created[(e.thread, e.sequence_nr)] = b  # the last op seeing a sequence number is its node's creator
        for c in e.cpu_children:
            walk(c, b, default, backward)

    cpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    for e in sorted((e for e in cpu_events if e.cpu_parent is None), key=lambda e: e.time_range.start):
        walk(e, None, None, False)
    return ms, wall


# ------------------------------------------------------------------------------ largest batch (GPU)


def search_max_batch(fits, limit, resolution=1 / 16):
    """Largest B in [1, limit] with ``fits(B)`` (assumed monotone): doubling from 1, then bisection
    until the first failing B is within ``max(1, B * resolution)`` of the last fitting one.
    Returns ``(B, first_failing_B or None, reached_limit)``; B = 0 if B=1 does not fit."""
    lo, hi, B = 0, None, 1
    while B <= limit:
        if fits(B):
            lo, B = B, B * 2
        else:
            hi = B
            break
    if hi is None:  # every doubling up to the limit fit
        if lo == limit or fits(limit):
            return limit, None, True
        hi = limit
    while hi - lo > max(1, int(lo * resolution)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, False


def max_batch(trainer, S, dev, cap_bytes, limit):
    """Largest batch whose training step (``trainer``: a fresh :class:`benchmarks.cases.Trainer`) fits
    under ``cap_bytes`` of allocated CUDA memory (``set_per_process_memory_fraction`` + a check of
    ``max_memory_allocated``)."""
    if dev.type != "cuda":
        raise ValueError(f"max_batch needs a CUDA device (a memory cap to search under), got {dev}")
    trials = []
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), dev)

    def fits(B):
        ok, peak = False, None
        try:
            trainer.set_batch(B, S)
            torch.cuda.reset_peak_memory_stats(dev)
            trainer.step()
            sync(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            ok = peak <= cap_bytes
        except torch.cuda.OutOfMemoryError:
            ok = False
        except RuntimeError as exc:  # a kernel refusing a huge batch does not fit either; recorded
            ok, peak = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        trainer.opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        trials.append({"B": B, "fits": ok, ("error" if isinstance(peak, str) else "max_allocated_bytes"): peak})
        return ok

    try:
        best, first_fail, at_limit = search_max_batch(fits, limit)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        gc.collect()
        torch.cuda.empty_cache()
    return {"max_batch": best, "first_failing_batch": first_fail, "reached_limit": at_limit, "trials": trials}


# ------------------------------------------------------------------------------ SDPA diagnostic


def sdpa_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, task_ids=None, key_padding_mask=None,
                          causal=True, scale=None, dropout_p=0.0):
    """PEFT's way on ptune_fast's inputs (diagnostic, not what ptune_fast ships): the prefix expanded
    (bank: gathered) per row and ``cat``-ed onto K/V, KV heads repeated, SDPA with a bottom-right
    causal mask. ``q [B,H,S,D]``, ``k/v [B,Hkv,T,D]``, prefix ``[Hkv,P,D]`` or ``[N,Hkv,P,D]`` +
    ``task_ids``; returns ``[B,H,S,D]``."""
    from ptune_fast.reference import expand_prefix

    B, H, S, _ = q.shape
    Hkv = k.shape[1]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    if P:
        k = torch.cat([expand_prefix(prefix_k, B, task_ids).to(k.dtype), k], dim=2)
        v = torch.cat([expand_prefix(prefix_v, B, task_ids).to(v.dtype), v], dim=2)
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    T = k.shape[2]
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    if key_padding_mask is None and (not causal or T == S):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and S > 1, scale=scale, dropout_p=dropout_p)
    mask = torch.ones(S, T, dtype=torch.bool, device=q.device)
    if causal:
        mask = torch.arange(T, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None] + (T - S)
    mask = mask[None, None]
    if key_padding_mask is not None:
        pad = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device), key_padding_mask.bool()], dim=1)
        mask = mask & pad[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


@contextlib.contextmanager
def sdpa_attention():
    """Swap the op behind ptune_fast's registered attention function (restored on exit)."""
    from ptune_fast.integrations import attention as A

    def served(*args, out_layout="bhsd", **kw):  # the integration asks for transformers' [B, S, H, D]
        out = sdpa_prefix_attention(*args, **kw)
        return out.transpose(1, 2).contiguous() if out_layout == "bshd" else out

    prev = A.prefix_attention
    A.prefix_attention = served
    try:
        yield
    finally:
        A.prefix_attention = prev


def with_sdpa(fn):
    def run():
        with sdpa_attention():
            return fn()

    return run
