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
``cpu`` or the GPU's short name (``h100``, ``h200``, ...). The profiled breakdown lives in
:mod:`benchmarks.e2e_profile`, the notes, Markdown and plots in :mod:`benchmarks.e2e_report`.
"""
from __future__ import annotations

import argparse
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
from benchmarks.e2e_profile import BUCKET_LABEL, BUCKETS, ENC_LABEL, breakdowns, quiet_stderr  # noqa: F401
from benchmarks.e2e_report import FAST, FAST_GC, PEFT, SHORT, notes, plots, render, rerender  # noqa: F401
from benchmarks.fold_bank_report import TrainCase, env_info, interleaved, stats, sync

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEED = 0

METHODS = ("prefix_proj", "prefix", "ptuning_mlp", "ptuning_lstm", "prompt")
LABEL = {"prefix_proj": "prefix tuning (projection)", "prefix": "P-Tuning v2 (prefix, no projection)",
         "ptuning_mlp": "P-tuning (MLP)", "ptuning_lstm": "P-tuning (LSTM)", "prompt": "prompt tuning"}

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


class Trainer(TrainCase):
    """``TrainCase`` on a random batch of ``B x S`` tokens that ``set_batch`` can resize
    (the largest-batch search); ``step()`` = zero_grad, forward with labels, backward, AdamW step."""

    def __init__(self, pm, B, S, dev, lr=1e-3):
        self.dev = dev
        ids = make_ids(B, S, pm.get_base_model().config.vocab_size, dev)
        super().__init__(pm, ids, torch.ones_like(ids), lr=lr)

    def set_batch(self, B, S):
        self.ids = make_ids(B, S, self.pm.get_base_model().config.vocab_size, self.dev)
        self.mask = torch.ones_like(self.ids)
        self.labels = self.ids


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


# ------------------------------------------------------------------------------ environment


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
    t0, load0, env = time.perf_counter(), common.loadavg(), env_info(dev)
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
        "loadavg_before": load0, "loadavg_after": common.loadavg(), "wall_s": time.perf_counter() - t0, "rows": rows,
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
