"""End to end, every prompt-learning method: PEFT vs PEFT + ``ptune_fast.patch``.

    python -m benchmarks.e2e                              # CPU, preset tiny (a few minutes), fp32
    python -m benchmarks.e2e --device cuda --preset 1b    # GPU, ~1B Llama shape, bf16
    python -m benchmarks.e2e --preset smoke --no-write    # seconds: checks the script itself

Where one command may run at most ~10 minutes (the lent GPU machines), split the GPU run; every
part writes its own files in the same directory::

    python -m benchmarks.e2e --device cuda --only train memory gc profile --name e2e-train
    python -m benchmarks.e2e --device cuda --only generate --name e2e-generate
    python -m benchmarks.e2e --device cuda --only maxbatch --mem-cap-gib 40 --name e2e-maxbatch

Model: ``LlamaForCausalLM`` built from a config (random weights, no download). Methods: prefix
tuning with projection, P-Tuning v2 (prefix, no projection), P-tuning MLP, P-tuning LSTM, prompt
tuning -- PEFT configs with PEFT's default encoder sizes. For each method, PEFT and ptune_fast
hold identical weights (one PEFT model deep-copied, the copy patched), and:

* **parity** (untimed, before any step): loss diff, max |logit diff| on the real tokens, max
  |grad diff| of the trainable parameters; greedy generate: generated tokens equal;
* **training step** -- ``zero_grad``, forward with labels, backward, ``AdamW.step``; the
  implementations alternate call by call (A B, B A, ...), median and IQR (q1-q3);
* **peak memory** of one step above what was live before it (weights, optimizer state and
  batch excluded). CPU: the allocator events of ``torch.profiler(profile_memory=True)``
  (``benchmarks.common.peak_bytes``); CUDA: ``torch.cuda.max_memory_allocated``;
* **gradient checkpointing** (prefix methods): ptune_fast with
  ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``,
  timed with the other two; PEFT's refusal is recorded by trying it (``get_peft_model`` on a
  checkpointing base, and checkpointing turned on after ``get_peft_model``) and catching the error;
* **largest batch that fits** (GPU only; skipped on CPU): doubling from B=1, then bisection,
  under ``--mem-cap-gib`` (``torch.cuda.set_per_process_memory_fraction`` plus a check of
  ``max_memory_allocated``); a fresh model per search;
* **generation** -- greedy ``generate`` of a few prompts (``min_new_tokens = max_new_tokens``),
  generated tokens per second, interleaved like the step;
* **where the time goes** -- one profiled training step per side (``torch.profiler``), self time
  (CPU) or kernel time (CUDA) of every op put in one bucket: *attention* (SDPA ops,
  ``ptune_fast::prefix_attention*``), *copies* (cat / stack / expand / repeat / copy_ / clone /
  casts), *encoder* (everything under the prompt encoder's call, its backward included),
  *frozen GEMMs* (linear / matmul / mm / addmm / bmm outside the encoder), *optimizer*
  (``AdamW.step`` / ``zero_grad``), *other* (norms, RoPE, activations, loss, embedding, ...).
  An op's bucket is the one of its outermost ancestor that has one; a backward node takes the
  bucket of the forward op that created it (encoder and copies wholly, else as a default for
  children without one). The profiler adds per-op overhead: shares, not times.

Writes ``benchmarks/results/<device>-<date>/e2e.json``, ``e2e.md`` and PNG plots
(``step_time.png``, ``peak_memory.png``, ``speedup.png``, ``breakdown.png``); ``<device>`` is
``cpu`` or the GPU's short name (``h100``, ``h200``, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import re
import statistics
import sys
import time

import torch

from benchmarks import common
from benchmarks.fold_bank_report import env_info, interleaved, stats, sync

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEED = 0
PEFT, FAST, FAST_GC = "peft", "ptune_fast", "ptune_fast+gc"
ENC_LABEL = "e2e::encoder"

METHODS = ("prefix_proj", "prefix", "ptuning_mlp", "ptuning_lstm", "prompt")
LABEL = {"prefix_proj": "prefix tuning (projection)", "prefix": "P-Tuning v2 (prefix, no projection)",
         "ptuning_mlp": "P-tuning (MLP)", "ptuning_lstm": "P-tuning (LSTM)", "prompt": "prompt tuning"}
SHORT = {"prefix_proj": "prefix+proj", "prefix": "P-Tuning v2", "ptuning_mlp": "P-tuning MLP",
         "ptuning_lstm": "P-tuning LSTM", "prompt": "prompt tuning"}

#: model + shapes. ``prefix``: B rows of S tokens, P virtual tokens; ``prompt`` (prompt tuning and
#: P-tuning): B rows of S tokens, n virtual tokens; ``gen``: greedy generation.
PRESETS = {
    "tiny": dict(  # CPU, 2 cores, whole run < ~8 min; the shapes scaled down
        model=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=32, vocab_size=1000, max_position_embeddings=1024),
        dtype="float32",
        prefix=dict(B=4, S=512, P=128), prompt=dict(B=16, S=128, n=100),
        gen=dict(prompts=4, prompt_len=32, new_tokens=32),
        warmup=2, repeat=15, gen_warmup=2, gen_repeat=7, profile_sessions=5,
    ),
    "smoke": dict(  # seconds; numbers meaningless
        model=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=128),
        dtype="float32",
        prefix=dict(B=2, S=12, P=4), prompt=dict(B=3, S=8, n=5),
        gen=dict(prompts=2, prompt_len=6, new_tokens=4),
        warmup=1, repeat=3, gen_warmup=1, gen_repeat=2, profile_sessions=1,
    ),
    "1b": dict(  # GPU: Llama-3.2-1B-like shape (vocab 32000), the shapes
        model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                   rope_theta=500000.0),
        dtype="bfloat16",
        prefix=dict(B=16, S=512, P=128), prompt=dict(B=32, S=128, n=100),
        gen=dict(prompts=8, prompt_len=128, new_tokens=128),
        warmup=3, repeat=20, gen_warmup=1, gen_repeat=5, profile_sessions=3,
    ),
}
SECTIONS = ("train", "memory", "gc", "generate", "profile", "maxbatch")


def is_prefix(method):
    return method.startswith("prefix")


def shape_of(preset, method):
    s = PRESETS[preset]["prefix" if is_prefix(method) else "prompt"]
    return s["B"], s["S"], s["P"] if is_prefix(method) else s["n"]


# ------------------------------------------------------------------------------ models


def llama(preset, dev, dtype, gradient_checkpointing=False):
    import transformers

    cfg = transformers.LlamaConfig(**PRESETS[preset]["model"], initializer_range=0.02, attention_dropout=0.0,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(SEED)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def peft_config(method, num_virtual):
    """PEFT's configs with PEFT's default encoder sizes (encoder_hidden_size = the model's hidden size)."""
    import peft

    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual)
    if method == "prefix_proj":
        return peft.PrefixTuningConfig(prefix_projection=True, **kw)
    if method == "prefix":
        return peft.PrefixTuningConfig(prefix_projection=False, **kw)
    if method in ("ptuning_mlp", "ptuning_lstm"):
        return peft.PromptEncoderConfig(encoder_reparameterization_type=method.split("_")[1].upper(), **kw)
    if method == "prompt":
        return peft.PromptTuningConfig(prompt_tuning_init="RANDOM", **kw)
    raise KeyError(method)


def build_peft(preset, method, dev, dtype):
    import peft

    base = llama(preset, dev, dtype)
    torch.manual_seed(SEED + 1)
    return peft.get_peft_model(base, peft_config(method, shape_of(preset, method)[2]))


def make_fast(pm, gradient_checkpointing=False, copy_model=True):
    """``ptune_fast.patch`` of a deep copy of ``pm`` (same weights), or of ``pm`` itself."""
    import ptune_fast

    fast = ptune_fast.patch(copy.deepcopy(pm) if copy_model else pm)
    if gradient_checkpointing:
        fast.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return fast


def make_ids(B, S, vocab, dev, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, S), generator=g).to(dev)


class Trainer:
    """One model + AdamW + a batch; ``step()`` = zero_grad, forward with labels, backward, AdamW step."""

    def __init__(self, pm, B, S, dev, lr=1e-3):
        self.pm, self.dev = pm.train(), dev
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.set_batch(B, S)

    def set_batch(self, B, S):
        self.ids = make_ids(B, S, self.pm.get_base_model().config.vocab_size, self.dev)
        self.mask = torch.ones_like(self.ids)

    def forward(self):
        return self.pm(input_ids=self.ids, attention_mask=self.mask, labels=self.ids)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward().loss
        loss.backward()
        self.opt.step()
        return loss

    def loss_and_grads(self):
        self.opt.zero_grad(set_to_none=True)
        out = self.forward()
        out.loss.backward()
        grads = [p.grad.detach().float().clone() for p in self.params]
        self.opt.zero_grad(set_to_none=True)
        return out, grads


def _max_abs(x):
    return float(x.detach().float().abs().max())


def train_parity(ref_case, case, skip):
    """Untimed: logits on the real tokens (``skip`` leading virtual positions of ``ref``), loss, grads."""
    ref, gref = ref_case.loss_and_grads()
    got, ggot = case.loss_and_grads()
    rl = ref.logits[:, skip:]
    return {"loss_peft": ref.loss.item(), "abs_loss_diff": abs(ref.loss.item() - got.loss.item()),
            "max_abs_logit": _max_abs(rl), "max_abs_logit_diff": _max_abs(got.logits[:, -rl.shape[1]:] - rl),
            "max_abs_grad": max(_max_abs(g) for g in gref),
            "max_abs_grad_diff": max(_max_abs(a - b) for a, b in zip(gref, ggot))}


# ------------------------------------------------------------------------------ PEFT + checkpointing


def peft_gc_refusal(preset, method, dev, dtype):
    """Try PEFT prefix tuning with gradient checkpointing twice; record what happened."""
    import peft

    out = {}
    try:
        peft.get_peft_model(llama(preset, dev, dtype, gradient_checkpointing=True),
                            peft_config(method, shape_of(preset, method)[2]))
        out["get_peft_model_on_checkpointing_base"] = "accepted"
    except Exception as exc:  # noqa: BLE001 - recording whatever PEFT raises
        out["get_peft_model_on_checkpointing_base"] = f"{type(exc).__name__}: {exc}"
    pm = build_peft(preset, method, dev, dtype)
    pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    B, S, _ = shape_of(preset, method)
    try:
        Trainer(pm, min(B, 2), min(S, 16), dev).step()
        out["checkpointing_enabled_after_get_peft_model"] = "ran"
    except Exception as exc:  # noqa: BLE001
        out["checkpointing_enabled_after_get_peft_model"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    del pm
    return out


# ------------------------------------------------------------------------------ generation


def gen_fn(pm, ids, new_tokens):
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad():
            return pm.generate(input_ids=ids, attention_mask=mask, **kw)[:, -new_tokens:]

    return run


# ------------------------------------------------------------------------------ where the time goes

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


def max_batch(make_pm, S, dev, cap_bytes, limit):
    """Largest batch whose training step fits under ``cap_bytes`` of allocated CUDA memory."""
    pm = make_pm()
    gc.collect()
    torch.cuda.empty_cache()
    case = Trainer(pm, 1, S, dev)
    trials = []
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), dev)

    def fits(B):
        ok, peak = False, None
        try:
            case.set_batch(B, S)
            torch.cuda.reset_peak_memory_stats(dev)
            case.step()
            sync(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            ok = peak <= cap_bytes
        except torch.cuda.OutOfMemoryError:
            ok = False
        except RuntimeError as exc:  # a kernel refusing a huge batch does not fit either; recorded
            ok, peak = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        case.opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        trials.append({"B": B, "fits": ok, ("error" if isinstance(peak, str) else "max_allocated_bytes"): peak})
        return ok

    try:
        best, first_fail, at_limit = search_max_batch(fits, limit)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        del case, pm
        gc.collect()
        torch.cuda.empty_cache()
    return {"max_batch": best, "first_failing_batch": first_fail, "reached_limit": at_limit, "trials": trials}


# ------------------------------------------------------------------------------ one method


def measure_generate(peft_model, fast_model, g, vocab, dev, reps, profile):
    """Greedy generate, PEFT vs ptune_fast, interleaved; generated tokens compared; with
    ``profile``, the bucket breakdown of one call per side (median of the profile sessions)."""
    ids = make_ids(g["prompts"], g["prompt_len"], vocab, dev, seed=SEED + 7)
    peft_model.eval()
    fast_model.eval()
    fns = [gen_fn(m, ids, g["new_tokens"]) for m in (peft_model, fast_model)]
    ref, got = fns[0](), fns[1]()
    ts = interleaved(fns, dev, reps["gen_warmup"], reps["gen_repeat"])
    tok = g["prompts"] * g["new_tokens"]
    res = {k: stats(t, tok) for k, t in zip((PEFT, FAST), ts)}
    res.update(prompts=g["prompts"], prompt_len=g["prompt_len"], new_tokens=g["new_tokens"], generated_tokens=tok,
               generated_tokens_equal=int((ref == got).sum()), speedup=res[PEFT]["median_ms"] / res[FAST]["median_ms"])
    if profile:
        res["breakdown"] = breakdowns({PEFT: (fns[0], peft_model), FAST: (fns[1], fast_model)}, dev,
                                      reps["profile_sessions"])
    return res


def run_method(preset, method, dev, dtype, sections, reps, cap_bytes, limit, bar):
    B, S, nv = shape_of(preset, method)
    row = {"method": method, "label": LABEL[method], "B": B, "S": S,
           ("P" if is_prefix(method) else "n"): nv}
    row["tokens_through_model"] = ({PEFT: B * S, FAST: B * S} if is_prefix(method)
                                   else {PEFT: B * (nv + S), FAST: nv + B * S})
    pm = build_peft(preset, method, dev, dtype)
    impls = {PEFT: pm, FAST: make_fast(pm)}
    want_gc = is_prefix(method) and "gc" in sections
    if want_gc:
        impls[FAST_GC] = make_fast(pm, gradient_checkpointing=True)
    vocab = pm.get_base_model().config.vocab_size

    if "generate" in sections:  # first: both models still hold identical weights
        row["generate"] = measure_generate(impls[PEFT], impls[FAST], PRESETS[preset]["gen"], vocab, dev, reps,
                                           "profile" in sections)
        bar.update(1)

    cases = {k: Trainer(m, B, S, dev) for k, m in impls.items()}
    ts = None
    if "train" in sections:
        row["parity"] = train_parity(cases[PEFT], cases[FAST], 0 if is_prefix(method) else nv)
        if want_gc:
            row["parity_gc_vs_no_gc"] = train_parity(cases[FAST], cases[FAST_GC], 0)
        names = list(cases)
        ts = interleaved([cases[k].step for k in names], dev, reps["warmup"], reps["repeat"])
        row["step"] = {k: stats(t, B * S) for k, t in zip(names, ts)}
        for k, t in zip(names, ts):
            if k != PEFT:
                row["step"][k]["speedup_vs_peft"] = row["step"][PEFT]["median_ms"] / row["step"][k]["median_ms"]
                row["step"][k]["paired_speedup_median"] = statistics.median(a / b for a, b in zip(ts[0], t))
        bar.update(1)
    else:
        for c in cases.values():  # optimizer state exists before memory is measured
            c.step()
    if "memory" in sections:
        with quiet_stderr():
            row["peak_bytes"] = {k: common.peak_bytes(c.step, dev) for k, c in cases.items()}
        bar.update(1)
    if "profile" in sections:
        row["breakdown"] = breakdowns({k: (c.step, c.pm) for k, c in cases.items()}, dev, reps["profile_sessions"])
        bar.update(1)
    if want_gc:
        row["peft_gc"] = peft_gc_refusal(preset, method, dev, dtype)
    del cases, impls, pm, ts
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "maxbatch" in sections:
        if dev.type != "cuda":
            row["max_batch"] = "skipped: CPU (no memory cap to search under)"
        else:
            row["max_batch"] = {}
            makers = {PEFT: lambda: build_peft(preset, method, dev, dtype),
                      FAST: lambda: make_fast(build_peft(preset, method, dev, dtype), copy_model=False)}
            if is_prefix(method):
                makers[FAST_GC] = lambda: make_fast(build_peft(preset, method, dev, dtype), gradient_checkpointing=True,
                                                  copy_model=False)
            for k, mk in makers.items():
                row["max_batch"][k] = max_batch(mk, S, dev, cap_bytes, limit)
        bar.update(1)
    return row


# ------------------------------------------------------------------------------ report


def _ms(s):
    f = "{:.1f}" if s["median_ms"] >= 10 else "{:.2f}"
    return f"{f.format(s['median_ms'])} [{f.format(s['q1_ms'])}-{f.format(s['q3_ms'])}]"


def _mib(x):
    return f"{x / 2**20:.1f}"


def _shape(r):
    return f"B={r['B']} S={r['S']} " + (f"P={r['P']}" if "P" in r else f"n={r['n']}")


def _changes(bd, floor=0.015, top=4):
    """'bucket -X ms (a -> b)' for the (at most ``top``) buckets whose PEFT -> ptune_fast change is at
    least ``floor`` of PEFT's profiled total, largest first."""
    p, f = bd[PEFT]["ms"], bd[FAST]["ms"]
    diffs = sorted(((p[k] - f[k], k) for k in BUCKETS), key=lambda x: -abs(x[0]))
    return "; ".join(f"{BUCKET_LABEL[k]} {'-' if d >= 0 else '+'}{abs(d):.1f} ms ({p[k]:.1f} -> {f[k]:.1f})"
                     for d, k in diffs[:top] if abs(d) >= floor * bd[PEFT]["total_ms"])


def _overlap(a, b):
    """True when the two timings' IQRs overlap (the difference is within the run's spread)."""
    return a["q1_ms"] <= b["q3_ms"] and b["q1_ms"] <= a["q3_ms"]


def notes(report):
    """Plain statements computed from the measured rows."""
    out = []
    served = {k.split(" -> ")[1]: v for k, v in report["backend_calls"].items() if k.startswith("prefix_attention -> ")}
    if served and max(served, key=served.get) == "sdpa":
        out.append("ptune_fast's `prefix_attention` ran its `sdpa` backend in this run: it broadcasts the shared "
                   "prefix over the batch and concatenates it onto K/V inside the call, then calls torch's fused "
                   "SDPA -- the kernel PEFT's Llama uses. So on this device the attention work and a per-layer "
                   "concatenation remain on both sides; what ptune_fast removes is the B-row encoder, the "
                   "cache copies of the prefix and, for prompt / P-tuning, the B-1 extra passes of the virtual "
                   "tokens through the frozen model. The fused Triton kernels (no concatenation) run on CUDA only.")
    elif served and max(served, key=served.get) in ("triton", "cuda"):
        out.append(f"ptune_fast's `prefix_attention` ran its `{max(served, key=served.get)}` kernels in this run "
                   "(the shared prefix read in-kernel: no broadcast, no concatenation onto K/V); PEFT's Llama ran "
                   "torch's SDPA on the concatenated cache.")
    for r in report["rows"]:
        st, bd, gn = r.get("step"), r.get("breakdown"), r.get("generate")
        head = f"{r['label']} ({_shape(r)}): "
        if st:
            sp = st[FAST]["speedup_vs_peft"]
            s = (head + f"training step {'faster' if sp >= 1 else 'SLOWER'} with ptune_fast ({sp:.2f}x; PEFT "
                 f"{st[PEFT]['median_ms']:.1f} ms, ptune_fast {st[FAST]['median_ms']:.1f} ms"
                 + ("; the IQRs overlap: within this run's spread" if _overlap(st[PEFT], st[FAST]) else "") + ").")
            t = r["tokens_through_model"]
            if t[PEFT] != t[FAST]:
                s += (f" Tokens through the frozen model per step: PEFT {t[PEFT]}, ptune_fast {t[FAST]} "
                      f"({t[PEFT] / t[FAST]:.2f}x fewer).")
            if bd and _changes(bd):
                s += (f" Profiled step {bd[PEFT]['total_ms']:.0f} -> {bd[FAST]['total_ms']:.0f} ms; largest bucket "
                      "changes: " + _changes(bd) + ".")
            elif bd:
                s += " Profiled, no bucket changes by 1.5% of PEFT's step or more: the two do the same frozen work."
            pk = r.get("peak_bytes")
            if pk:
                s += f" Peak memory {_mib(pk[PEFT])} -> {_mib(pk[FAST])} MiB."
            if FAST_GC in st:
                s += (f" With gradient checkpointing ptune_fast takes {st[FAST_GC]['median_ms']:.1f} ms "
                      f"({st[FAST_GC]['median_ms'] / st[FAST]['median_ms']:.2f}x its step without)"
                      + (f" and peaks at {_mib(pk[FAST_GC])} MiB ({pk[FAST] / pk[FAST_GC]:.1f}x less)" if pk else "")
                      + "; PEFT cannot run this configuration.")
            out.append(s)
        if gn:
            g = gn["speedup"]
            s = (head + f"generation {g:.2f}x ({gn[PEFT]['tokens_per_s']:,.0f} -> {gn[FAST]['tokens_per_s']:,.0f} "
                 f"generated tok/s; {gn['generated_tokens_equal']}/{gn['generated_tokens']} tokens equal"
                 + ("; the IQRs overlap: within this run's spread" if _overlap(gn[PEFT], gn[FAST]) else "") + ").")
            gb = gn.get("breakdown")
            if gb and _changes(gb):
                s += (f" Profiled call {gb[PEFT]['total_ms']:.0f} -> {gb[FAST]['total_ms']:.0f} ms; largest bucket "
                      "changes: " + _changes(gb) + ".")
            out.append(s)
    return out


def render(report):
    env, m, rows = report["env"], report["model"], report["rows"]
    dev = env.get("gpu") or env["cpu"]
    out = [f"# End to end: PEFT vs ptune_fast, every prompt-learning method ({report['device_tag']}, preset "
           f"`{report['preset']}`)", "",
           f"* device: {env['device']} -- {dev} ({env['cpu_count']} logical CPUs, torch threads "
           f"{env['torch_threads']}); load average (1 min) before / after: {report['loadavg_before']} / "
           f"{report['loadavg_after']}",
           f"* versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, ptune_fast "
           f"{env['ptune_fast']} (git {env['git_commit']}"
           + (f"; uncommitted: {', '.join(env['dirty_files_under_ptune_fast'])}" if env.get("dirty_files_under_ptune_fast")
              else "") + f"), python {env['python']}; "
           f"PTUNE_FAST_BACKEND={env['backend_env']}",
           f"* date: {env['date']}",
           f"* command: `{report['command']}` -- wall time {report['wall_s']:.0f} s",
           "* ptune_fast backends that served calls: "
           + (", ".join(f"`{k}` x{v}" for k, v in report["backend_calls"].items()) or "-"),
           f"* model: LlamaForCausalLM from its config, random weights: hidden {m['hidden_size']}, "
           f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads, {m['num_key_value_heads']} KV heads "
           f"(head_dim {m['head_dim']}), intermediate {m['intermediate_size']}, vocab {m['vocab_size']}; "
           f"{report['dtype']}; AdamW(lr=1e-3) on the trainable parameters; PEFT's default encoder sizes",
           f"* shapes: prefix methods {_shape(dict(report['shapes']['prefix']))}; prompt / P-tuning "
           f"{_shape(dict(report['shapes']['prompt']))}; generation: {report['shapes']['gen']['prompts']} prompts x "
           f"{report['shapes']['gen']['prompt_len']} tokens, greedy, {report['shapes']['gen']['new_tokens']} new "
           "tokens. " + report["shape_note"],
           f"* timing: implementations alternate call by call; median [q1-q3] of {report['reps']['repeat']} steps "
           f"after {report['reps']['warmup']} warm-up steps each ({report['reps']['gen_repeat']} / "
           f"{report['reps']['gen_warmup']} for generate). speedup = PEFT median / ptune_fast median.", ""]
    out += ["## Training step, peak memory, generation", "",
            "| method | shape | PEFT step ms | ptune_fast step ms | **step speedup** | PEFT peak MiB | ptune_fast "
            "peak MiB | peak ratio | PEFT gen tok/s | ptune_fast gen tok/s | gen speedup | loss diff | max logit "
            "diff | generated tokens equal |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st, pk, gn, pa = r.get("step"), r.get("peak_bytes"), r.get("generate"), r.get("parity")
        cells = [r["label"], _shape(r)]
        cells += [_ms(st[PEFT]), _ms(st[FAST]), f"**{st[FAST]['speedup_vs_peft']:.2f}x**"] if st else ["-"] * 3
        cells += [_mib(pk[PEFT]), _mib(pk[FAST]), f"{pk[PEFT] / pk[FAST]:.2f}x"] if pk else ["-"] * 3
        cells += ([f"{gn[PEFT]['tokens_per_s']:,.0f}", f"{gn[FAST]['tokens_per_s']:,.0f}", f"{gn['speedup']:.2f}x"]
                  if gn else ["-"] * 3)
        cells += [f"{pa['abs_loss_diff']:.1e}", f"{pa['max_abs_logit_diff']:.1e}"] if pa else ["-"] * 2
        cells += [f"{gn['generated_tokens_equal']}/{gn['generated_tokens']}" if gn else "-"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "peak MiB: tensor memory allocated during one step above what was live before it "
            + ("(`torch.cuda.max_memory_allocated` minus the allocation before the step)" if env["device"] == "cuda"
               else "(CPU allocator events of `torch.profiler(profile_memory=True)`)")
            + "; weights, optimizer state and the batch are not counted. Parity (untimed, before any step): loss "
            "diff and max |logit diff| on the real tokens; max |grad diff| of the trainable parameters is in the JSON.",
            ""]
    gcr = [r for r in rows if "step" in r and FAST_GC in r["step"]]
    if gcr:
        out += ["## Prefix tuning with gradient checkpointing", "",
                "ptune_fast with `gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                "False})`, timed in the same interleaved loop as the two above. PEFT refuses: what it raised when tried.",
                "", "| method | PEFT step ms | ptune_fast ms | ptune_fast + GC ms | GC / no GC | PEFT peak MiB | "
                "ptune_fast peak MiB | ptune_fast + GC peak MiB | loss diff GC vs no GC | PEFT + GC |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in gcr:
            st, pk = r["step"], r.get("peak_bytes")
            ref = r.get("peft_gc", {})
            out.append(f"| {r['label']} | {_ms(st[PEFT])} | {_ms(st[FAST])} | {_ms(st[FAST_GC])} | "
                       f"{st[FAST_GC]['median_ms'] / st[FAST]['median_ms']:.2f}x | "
                       + (f"{_mib(pk[PEFT])} | {_mib(pk[FAST])} | {_mib(pk[FAST_GC])} | " if pk else "- | - | - | ")
                       + f"{r['parity_gc_vs_no_gc']['abs_loss_diff']:.1e} | `get_peft_model`: "
                       f"{ref.get('get_peft_model_on_checkpointing_base', '-')}; enabled afterwards, a step: "
                       f"{ref.get('checkpointing_enabled_after_get_peft_model', '-')} |")
        out.append("")
    out += ["## Largest batch that fits", ""]
    mb = [r for r in rows if "max_batch" in r]
    if not mb:
        out += ["not run (`--only` without maxbatch)", ""]
    elif isinstance(mb[0]["max_batch"], str):
        out += ["Skipped on CPU: the search needs a device memory cap (`torch.cuda.set_per_process_memory_fraction`, "
                "`max_memory_allocated`); run with `--device cuda`.", ""]
    else:
        out += [f"Training step (same S and virtual tokens as above), doubling from B=1 then bisection to within 1/16, under "
                f"{report['mem_cap_gib']} GiB of allocated memory (weights and optimizer included); search limit "
                f"{report['max_batch_limit']} (`N+`: the limit fit). In parentheses: the smallest B tried that did not fit.", "",
                "| method | PEFT max B | ptune_fast max B | ptune_fast + GC max B | ratio |", "|---|---:|---:|---:|---:|"]
        for r in mb:
            x = r["max_batch"]

            def cell(k):
                if k not in x:
                    return "-"
                y = x[k]
                return f"{y['max_batch']}+" if y["reached_limit"] else f"{y['max_batch']} ({y['first_failing_batch']})"

            ratio = f"{x[FAST]['max_batch'] / x[PEFT]['max_batch']:.2f}x" if x[PEFT]["max_batch"] else "-"
            out.append(f"| {r['label']} | {cell(PEFT)} | {cell(FAST)} | {cell(FAST_GC)} | {ratio} |")
        out.append("")
    bdr = [r for r in rows if "breakdown" in r]
    if bdr:
        clock = bdr[0]["breakdown"][PEFT]["clock"]
        out += ["## Where the time goes", "",
                f"{bdr[0]['breakdown'][PEFT]['sessions']} profiled training steps per side, alternating ({clock}); per "
                "bucket the median over those steps: share of the profiled total and ms. Buckets: "
                "attention = SDPA / `ptune_fast::prefix_attention` ops, fwd + bwd; copies = cat / stack / expand / "
                "repeat / copy_ / clone / casts (the backward of a copy too); encoder = the prompt encoder's forward "
                "and backward; frozen GEMMs = linear / matmul / mm / addmm / bmm of the model; optimizer = AdamW "
                "step + zero_grad; other = the rest (norms, RoPE, activations, loss, embedding, autograd glue). "
                "The profiler adds per-op overhead: compare shares, not totals with the step times above.", "",
                "| method | impl | profiled ms | " + " | ".join(BUCKET_LABEL[b] for b in BUCKETS) + " |",
                "|---|---|---:|" + "---:|" * len(BUCKETS)]
        for r in bdr:
            for k, b in r["breakdown"].items():
                out.append(f"| {SHORT[r['method']]} | {k} | {b['total_ms']:.1f} | "
                           + " | ".join(f"{100 * b['share'][x]:.0f}% ({b['ms'][x]:.1f})" for x in BUCKETS) + " |")
        out.append("")
    gbd = [r for r in rows if "breakdown" in r.get("generate", {})]
    if gbd:
        gb = [b for b in BUCKETS if b != "optimizer"]
        out += ["Generation, one greedy `generate` call per side, same buckets (no backward, no optimizer):", "",
                "| method | impl | profiled ms | " + " | ".join(BUCKET_LABEL[b] for b in gb) + " |",
                "|---|---|---:|" + "---:|" * len(gb)]
        for r in gbd:
            for k, b in r["generate"]["breakdown"].items():
                out.append(f"| {SHORT[r['method']]} | {k} | {b['total_ms']:.1f} | "
                           + " | ".join(f"{100 * b['share'][x]:.0f}% ({b['ms'][x]:.1f})" for x in gb) + " |")
        out.append("")
    if report["notes"]:
        out += ["## Observations (computed from the numbers above)", ""] + [f"* {n}" for n in report["notes"]] + [""]
    if report.get("plots"):
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in report["plots"]] + [""]
    return "\n".join(out)


def plots(report, out_dir):
    """step_time / peak_memory / speedup / breakdown PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tag, files = report["rows"], report["device_tag"], []
    colors = {PEFT: "#7f7f7f", FAST: "#1f77b4", FAST_GC: "#2ca02c"}

    def bars(key, fname, ylabel, title, value, err=None):
        rs = [r for r in rows if key in r]
        if not rs:
            return
        impls = [k for k in (PEFT, FAST, FAST_GC) if any(k in r[key] for r in rs)]
        fig, ax = plt.subplots(figsize=(9, 4.2))
        w = 0.8 / len(impls)
        for i, k in enumerate(impls):
            xs = [j + (i - (len(impls) - 1) / 2) * w for j, r in enumerate(rs) if k in r[key]]
            vs = [value(r[key][k]) for r in rs if k in r[key]]
            kw = {}
            if err:
                kw["yerr"] = [[value(r[key][k]) - err(r[key][k])[0] for r in rs if k in r[key]],
                              [err(r[key][k])[1] - value(r[key][k]) for r in rs if k in r[key]]]
                kw["capsize"] = 3
            ax.bar(xs, vs, w, label=k, color=colors[k], **kw)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([SHORT[r["method"]] for r in rs])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=120)
        plt.close(fig)
        files.append(fname)

    bars("step", "step_time.png", "ms per training step (median, IQR bars)",
         f"Training step (fwd + bwd + AdamW), {tag}, preset {report['preset']}",
         lambda s: s["median_ms"], lambda s: (s["q1_ms"], s["q3_ms"]))
    bars("peak_bytes", "peak_memory.png", "MiB above the live set", f"Peak memory of one training step, {tag}",
         lambda b: b / 2**20)
    rs = [r for r in rows if "step" in r or "peak_bytes" in r or "generate" in r]
    if rs:
        series = [("training step", lambda r: r["step"][FAST]["speedup_vs_peft"] if "step" in r else None),
                  ("peak memory (PEFT / ptune_fast)",
                   lambda r: r["peak_bytes"][PEFT] / r["peak_bytes"][FAST] if "peak_bytes" in r else None),
                  ("generation tok/s", lambda r: r["generate"]["speedup"] if "generate" in r else None)]
        fig, ax = plt.subplots(figsize=(9, 4.2))
        w = 0.8 / len(series)
        for i, (name, f) in enumerate(series):
            pts = [(j + (i - 1) * w, f(r)) for j, r in enumerate(rs) if f(r) is not None]
            if pts:
                ax.bar([p[0] for p in pts], [p[1] for p in pts], w, label=name)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([SHORT[r["method"]] for r in rs])
        ax.set_ylabel("ptune_fast vs PEFT (x, > 1 = better)")
        ax.set_title(f"ptune_fast speedup over PEFT, {tag}, preset {report['preset']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "speedup.png"), dpi=120)
        plt.close(fig)
        files.append("speedup.png")
    bd = [(r, k) for r in rows if "breakdown" in r for k in r["breakdown"]]
    if bd:
        fig, ax = plt.subplots(figsize=(12, 5))
        short_impl = {PEFT: "PEFT", FAST: "fast", FAST_GC: "fast+GC"}
        labels = [f"{SHORT[r['method']]}\n{short_impl[k]}" for r, k in bd]
        bottom = [0.0] * len(bd)
        for b in BUCKETS:
            vals = [r["breakdown"][k]["ms"][b] for r, k in bd]
            ax.bar(range(len(bd)), vals, 0.7, bottom=bottom, label=BUCKET_LABEL[b])
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.set_xticks(range(len(bd)))
        ax.set_xticklabels(labels, fontsize=7)
        b0 = bd[0][0]["breakdown"][bd[0][1]]
        ax.set_ylabel(f"ms per training step ({b0['clock']})")
        ax.set_title(f"Where the time goes: one training step, per bucket the median of {b0['sessions']} profiled "
                     f"steps, {tag}, preset {report['preset']}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "breakdown.png"), dpi=120)
        plt.close(fig)
        files.append("breakdown.png")
    return files


def device_tag(dev):
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev)
    m = re.search(r"\b(H100|H200|H20|A100|A10G|A10|L40S|L40|L4|V100|T4|B200|GH200)\b", name.upper())
    return m.group(1).lower() if m else "cuda"


def _dirty():
    """Tracked files under ptune_fast/ with uncommitted changes as the run starts (what ran is HEAD plus these)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "ptune_fast"],
                             cwd=os.path.dirname(os.path.dirname(RESULTS)), capture_output=True, text=True)
    except OSError:
        return None
    return [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else None


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def rerender(path):
    """Notes, Markdown and plots again from a saved JSON report (the measurements are not touched)."""
    with open(path) as f:
        report = json.load(f)
    report["notes"] = notes(report)
    out_dir = os.path.dirname(os.path.abspath(path))
    report["plots"] = plots(report, out_dir)
    md = render(report)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md + "\n")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(md)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: tiny on cpu, 1b on cuda")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: the preset's")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per implementation (default: preset's)")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per implementation (default: preset's)")
    ap.add_argument("--gen-repeat", type=int, default=None, help="timed generate calls (default: preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 1 on cpu)")
    ap.add_argument("--mem-cap-gib", type=float, default=40.0, help="memory cap of the largest-batch search (GPU)")
    ap.add_argument("--max-batch-limit", type=int, default=4096, help="largest B the search tries (GPU)")
    ap.add_argument("--out-dir", default=None, help="default: benchmarks/results/<device>-<date>")
    ap.add_argument("--name", default="e2e", help="file stem of the JSON / Markdown (default e2e)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the Markdown and plots of a saved "
                    "report (next to it), e.g. after a change to the report text")
    args = ap.parse_args(argv)
    if args.render:
        return rerender(args.render)

    from tqdm import tqdm

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False")
    preset = args.preset or ("1b" if dev.type == "cuda" else "tiny")
    spec = PRESETS[preset]
    dtype = getattr(torch, args.dtype or spec["dtype"])
    threads = args.threads if args.threads is not None else (1 if dev.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    reps = {k: spec[k] for k in ("warmup", "repeat", "gen_warmup", "gen_repeat", "profile_sessions")}
    reps.update({k: v for k, v in (("warmup", args.warmup), ("repeat", args.repeat),
                                   ("gen_repeat", args.gen_repeat)) if v is not None})
    sections = set(args.only)
    t0, load0, env = time.perf_counter(), _loadavg(), env_info(dev)
    env["dirty_files_under_ptune_fast"] = _dirty()
    tag = device_tag(dev)

    per_method = {m: sum(s in sections for s in ("generate", "train", "memory", "profile", "maxbatch"))
                  for m in args.methods}
    rows = []
    with tqdm(total=sum(per_method.values()), desc="e2e", unit="case", file=sys.stderr) as bar:
        for method in args.methods:
            bar.set_postfix_str(method)
            rows.append(run_method(preset, method, dev, dtype, sections, reps, int(args.mem_cap_gib * 2**30),
                                   args.max_batch_limit, bar))
            r = rows[-1]
            if "step" in r:
                tqdm.write(f"{method:14s} step PEFT {r['step'][PEFT]['median_ms']:8.1f} ms  ptune_fast "
                           f"{r['step'][FAST]['median_ms']:8.1f} ms  x{r['step'][FAST]['speedup_vs_peft']:.2f}",
                           file=sys.stderr)
    from ptune_fast import _backend

    cmd = sys.argv[1:] if argv is None else list(argv)
    report = {
        "env": env, "device_tag": tag, "preset": preset, "dtype": str(dtype).replace("torch.", ""),
        "command": " ".join(["python -m benchmarks.e2e"] + cmd), "model": spec["model"],
        "shapes": {k: spec[k] for k in ("prefix", "prompt", "gen")}, "reps": reps, "sections": sorted(sections),
        "shape_note": ("The issue's GPU shapes are prefix B=16 S=512 P=128 and prompt / P-tuning n=100 S=128 B=32; "
                       "on CPU both keep S and the virtual tokens and cut the batch (prefix B=4, prompt / P-tuning "
                       "B=16) so that the whole run takes minutes." if preset == "tiny" else
                       "The issue's shapes." if preset == "1b" else "Smoke-test shapes: numbers meaningless."),
        "mem_cap_gib": args.mem_cap_gib, "max_batch_limit": args.max_batch_limit,
        "loadavg_before": load0, "loadavg_after": _loadavg(), "wall_s": time.perf_counter() - t0, "rows": rows,
        "backend_calls": {f"{op} -> {be}": n for (op, be), n in sorted(_backend.CALLS.items())},
        "fallbacks": {" / ".join(map(str, k)): n for k, n in _backend.FALLBACKS.items()},
    }
    report["notes"] = notes(report)
    out_dir = args.out_dir or os.path.join(RESULTS, f"{tag}-{env['date'][:10]}")
    if not args.no_write:
        os.makedirs(out_dir, exist_ok=True)
        report["plots"] = plots(report, out_dir)
    md = render(report)
    print(md)
    if not args.no_write:
        stem = os.path.join(out_dir, args.name)
        with open(stem + ".md", "w") as f:
            f.write(md + "\n")
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {stem}.md, {stem}.json and {len(report['plots'])} plots in {out_dir}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
