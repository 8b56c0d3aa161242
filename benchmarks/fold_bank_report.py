"""Fold, shared pass and task bank vs PEFT, end to end: a Markdown table + JSON.

    python -m benchmarks.fold_bank_report                              # CPU, small Llama, fp32
    python -m benchmarks.fold_bank_report --device cuda --preset 1b    # GPU, Llama-3.2-1B shape, bf16

Three measurements; PEFT and ptune_fast hold identical weights (one model deep-copied) and are
timed in the same process, **interleaved** (PEFT, ptune_fast, ..., then reversed) so that drift
and foreign load hit both alike; median and IQR (q1-q3) of ``repeat`` calls after ``warmup``
untimed ones, ``torch.cuda.synchronize``d on GPU:

1. **prefill** -- one no-grad forward of prompt tuning (``PromptTuningConfig``, n virtual tokens)
   over B rows of S real tokens. PEFT prepends the n virtual tokens to every row (B*(n+S) tokens
   through the model); ptune_fast: ``ptune_fast.patch(pm)`` + ``ptune_fast.fold(pm)`` (deep fold:
   the virtual tokens' per-layer K/V computed once and served as a static prefix: B*S tokens).
2. **train** -- one training step (forward + backward + ``AdamW.step``) of prompt tuning and
   P-tuning (MLP encoder): PEFT vs ``ptune_fast.patch(pm)`` (default ``prompt_pass``: the shared
   virtual-token pass, n + B*S tokens instead of B*(n+S)).
3. **bank** -- T PEFT prefix-tuning adapters (``PrefixTuningConfig``, same P) on one base model.
   ptune_fast: one :class:`ptune_fast.TaskBank` forward / ``generate`` over a batch whose rows
   name different tasks. PEFT: the tasks one after another (``set_adapter`` + each task's rows as
   its own batch): one task per batch is all PEFT can do.

Before timing, each case checks (untimed) that the numbers agree -- max |logit diff| on the real
tokens; loss and gradients for training; generated tokens for the bank -- and records it.

Diagnostic columns (not what ptune_fast ships; default on for CPU, ``--sdpa-diagnostic``):

* ``ptune_fast+SDPA`` -- the same ptune_fast model with its attention op swapped, for the timed
  call only, for a PEFT-style path on the same inputs (expand the prefix per row, ``cat`` it onto
  K/V, ``torch.nn.functional.scaled_dot_product_attention`` with an explicit mask). On CPU
  ptune_fast's ``prefix_attention`` runs its pure-PyTorch reference backend, while PEFT's model
  runs torch's fused SDPA: this column separates what the token savings buy from what the CPU
  attention backend costs.
* ``base`` (prefill) -- the bare base model on the S real tokens, no virtual tokens at all: the
  floor any prompt method's prefill can reach.
* ``peft_one_adapter_one_batch`` (bank) -- PEFT on all the rows as one batch under one adapter:
  not a mixed-task answer, but what batching alone buys on this device.
* attention share -- inclusive time of the attention op (forward + backward) in one profiled
  call (``torch.profiler``), divided by the profiled total: attribution only.

On a machine shared with other jobs, ``--threads 1`` gives steadier numbers than torch's default
thread count (the load average before / after is recorded).

Writes ``benchmarks/results/<device>-fold-bank-<date>.md`` and ``.json``. The SDPA diagnostic
lives in :mod:`benchmarks.fold_bank_sdpa`, the targets, notes and Markdown in
:mod:`benchmarks.fold_bank_render`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import functools
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import cpu_model, loadavg, write_report
from benchmarks.fold_bank_render import DIAG, FAST, METHOD_LABEL, ONE_BATCH, PEFT, notes, render, targets  # noqa: F401
from benchmarks.fold_bank_sdpa import sdpa_attention, sdpa_prefix_attention, with_sdpa  # noqa: F401

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: Model shapes and case grids. ``small`` runs on 2 CPU cores in minutes; ``1b`` is the
#: Llama-3.2-1B shape (random weights) for a GPU.
PRESETS = {
    "small": dict(
        model=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=32, vocab_size=1000, max_position_embeddings=1024),
        dtype="float32",
        prefill=dict(n=100, S=(16, 512), B=(1, 8)),
        train=dict(n=100, S=128, B=(8, 32), methods=("prompt", "ptuning_mlp"), encoder_hidden=256),
        bank=dict(tasks=8, rows=4, S=64, P=20, new_tokens=16),
    ),
    "tiny": dict(  # smoke tests of the script itself: seconds, numbers meaningless
        model=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=128),
        dtype="float32",
        prefill=dict(n=10, S=(4, 16), B=(1, 2)),
        train=dict(n=10, S=8, B=(2, 4), methods=("prompt", "ptuning_mlp"), encoder_hidden=32),
        bank=dict(tasks=3, rows=2, S=8, P=5, new_tokens=4),
    ),
    "1b": dict(
        model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=4096,
                   rope_theta=500000.0, tie_word_embeddings=True),
        dtype="bfloat16",
        prefill=dict(n=100, S=(16, 512), B=(1, 8)),
        train=dict(n=100, S=128, B=(8, 32), methods=("prompt", "ptuning_mlp"), encoder_hidden=2048),
        bank=dict(tasks=8, rows=4, S=64, P=20, new_tokens=16),
    ),
}
SEED = 0


# ------------------------------------------------------------------------------ timing


def sync(dev: torch.device) -> None:
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


def stats(xs, tokens):
    """median / q1 / q3 in ms (inclusive quartiles) and real tokens/s at the median."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    med = statistics.median(xs)
    return {"median_ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "n": len(xs),
            "tokens": tokens, "tokens_per_s": tokens / med}


def _is_attention(name):
    return name in ("aten::scaled_dot_product_attention", "ptune_fast::prefix_attention",
                    "ptune_fast::prefix_attention_backward") or (
        name.startswith("aten::_scaled_dot_product") and name.endswith("_backward"))


def attention_profile(fn, dev):
    """One profiled call: inclusive time of the outermost attention ops, forward + backward (SDPA:
    ``aten::scaled_dot_product_attention`` + ``aten::_scaled_dot_product_*_backward``; ptune_fast:
    ``ptune_fast::prefix_attention`` + ``ptune_fast::prefix_attention_backward``; nested ones are
    not counted twice) and the profiled total (sum of self times). CPU time on CPU, device time on
    CUDA. Attribution only: the profiler adds its own overhead per op."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(dev)
    att = tot = 0.0
    for e in prof.events():
        tot += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
        if _is_attention(e.name):
            parent = e.cpu_parent
            while parent is not None and not _is_attention(parent.name):
                parent = parent.cpu_parent
            if parent is None:
                att += (e.device_time_total if cuda else e.cpu_time_total) / 1e3
    return {"attention_ms": round(att, 3), "total_ms": round(tot, 3), "attention_share": round(att / tot, 3) if tot else None}


def compare(fns, dev, warmup, repeat, tokens, profile=True):
    """Time ``fns`` ({impl: fn}) interleaved; stats per impl, speedups vs PEFT, attention profile."""
    names = list(fns)
    ts = interleaved([fns[n] for n in names], dev, warmup, repeat)
    res = {n: stats(t, tokens) for n, t in zip(names, ts)}
    base = res[PEFT]["median_ms"]
    for n, t in zip(names, ts):
        if n != PEFT:
            res[n]["speedup_vs_peft"] = base / res[n]["median_ms"]
            res[n]["paired_speedup_median"] = statistics.median(a / b for a, b in zip(ts[0], t))
        if profile:
            res[n]["profile"] = attention_profile(fns[n], dev)
    res["speedup"] = res[FAST]["speedup_vs_peft"]
    return res


# ------------------------------------------------------------------------------ models


def llama(preset, dev, dtype, seed=SEED):
    import transformers

    cfg = transformers.LlamaConfig(**PRESETS[preset]["model"], initializer_range=0.02, attention_dropout=0.0,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def make_batch(B, S, vocab, dev, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, S), generator=g).to(dev)
    return ids, torch.ones(B, S, dtype=torch.long, device=dev)


def _max_abs(x):
    return float(x.detach().float().abs().max())


def peft_prompt_config(method, n, encoder_hidden=None):
    import peft

    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="RANDOM")
    if method == "ptuning_mlp":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                        encoder_hidden_size=encoder_hidden, encoder_reparameterization_type="MLP")
    raise KeyError(method)


# ------------------------------------------------------------------------------ 1. prefill


def prefill_models(preset, dev, dtype, n):
    """(PEFT prompt tuning, the same model deep-copied + ``patch`` + ``fold``, fold report)."""
    import peft

    import ptune_fast

    base = llama(preset, dev, dtype)
    torch.manual_seed(SEED + 1)
    pm = peft.get_peft_model(base, peft_prompt_config("prompt", n)).eval()
    fast = copy.deepcopy(pm)
    ptune_fast.patch(fast)
    report = ptune_fast.fold(fast)
    return pm, fast, report


def prefill_fn(model, ids, mask):
    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    return run


def measure_prefill(preset, dev, dtype, warmup, repeat, diag):
    spec = PRESETS[preset]["prefill"]
    n, rows = spec["n"], []
    pm, fast, fold_report = prefill_models(preset, dev, dtype, n)
    vocab = pm.get_base_model().config.vocab_size
    for S in spec["S"]:
        for B in spec["B"]:
            ids, mask = make_batch(B, S, vocab, dev)
            fns = {PEFT: prefill_fn(pm, ids, mask), FAST: prefill_fn(fast, ids, mask)}
            if diag:
                fns[DIAG] = with_sdpa(fns[FAST])
                fns["base"] = prefill_fn(pm.get_base_model(), ids, mask)
            ref, got = fns[PEFT](), fns[FAST]()
            row = {"case": "prefill", "method": "prompt", "n": n, "S": S, "B": B,
                   "tokens_through_model": {PEFT: B * (n + S), FAST: B * S},
                   "max_abs_logit_diff": _max_abs(got - ref[:, n:]), "max_abs_logit": _max_abs(ref[:, n:])}
            if diag:
                row["max_abs_logit_diff_sdpa_diagnostic"] = _max_abs(fns[DIAG]() - ref[:, n:])
            row.update(compare(fns, dev, warmup, repeat, B * S))
            rows.append(row)
            _log_row(f"prefill S={S} B={B}", row)
    return rows, {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in fold_report.items()}


# ------------------------------------------------------------------------------ 2. train


class TrainCase:
    """One model + AdamW + batch; ``step()`` = zero_grad, forward with labels, backward, AdamW step."""

    def __init__(self, pm, ids, mask, lr=1e-3):
        self.pm = pm.train()
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.ids, self.mask, self.labels = ids, mask, ids.clone()

    def forward(self):
        return self.pm(input_ids=self.ids, attention_mask=self.mask, labels=self.labels)

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


def train_cases(preset, dev, dtype, method, B):
    """(PEFT case, ptune_fast case): the same PEFT model, deep-copied, the copy patched."""
    import peft

    import ptune_fast

    spec = PRESETS[preset]["train"]
    base = llama(preset, dev, dtype)
    torch.manual_seed(SEED + 1)
    pm = peft.get_peft_model(base, peft_prompt_config(method, spec["n"], spec["encoder_hidden"]))
    fast = ptune_fast.patch(copy.deepcopy(pm))
    ids, mask = make_batch(B, spec["S"], base.config.vocab_size, dev)
    return TrainCase(pm, ids, mask), TrainCase(fast, ids, mask)


def train_parity(cp, cf, n, diag):
    """Untimed, before any step: logits on the real tokens, loss, trainable parameters' gradients."""
    ref, gref = cp.loss_and_grads()
    res = {"max_abs_logit": _max_abs(ref.logits[:, n:]), "loss_peft": ref.loss.item(),
           "max_abs_grad": max(_max_abs(g) for g in gref)}
    for tag, ctx in (("", contextlib.nullcontext), ("_sdpa_diagnostic", sdpa_attention))[: 2 if diag else 1]:
        with ctx():
            got, ggot = cf.loss_and_grads()
        res["max_abs_logit_diff" + tag] = _max_abs(got.logits - ref.logits[:, n:])
        res["abs_loss_diff" + tag] = abs(ref.loss.item() - got.loss.item())
        res["max_abs_grad_diff" + tag] = max(_max_abs(a - b) for a, b in zip(gref, ggot))
    return res


def measure_train(preset, dev, dtype, warmup, repeat, diag):
    spec = PRESETS[preset]["train"]
    n, S, rows = spec["n"], spec["S"], []
    for method in spec["methods"]:
        for B in spec["B"]:
            cp, cf = train_cases(preset, dev, dtype, method, B)
            row = {"case": "train", "method": method, "n": n, "S": S, "B": B,
                   "tokens_through_model": {PEFT: B * (n + S), FAST: n + B * S}, **train_parity(cp, cf, n, diag)}
            fns = {PEFT: cp.step, FAST: cf.step}
            if diag:
                fns[DIAG] = with_sdpa(cf.step)  # same model and optimizer: timing only
            row.update(compare(fns, dev, warmup, repeat, B * S))
            rows.append(row)
            _log_row(f"train {method} B={B}", row)
            del cp, cf, fns
    return rows


# ------------------------------------------------------------------------------ 3. bank


class BankCase:
    """T PEFT prefix-tuning adapters (``PrefixTuningConfig``, same P) on one PEFT model, and a
    :class:`ptune_fast.TaskBank` of PromptAdapters holding the same encoder weights on its own copy
    of the base model; a batch of T*R rows interleaving the tasks (0 1 .. T-1 0 1 ..)."""

    def __init__(self, preset, dev, dtype):
        import peft

        from ptune_fast import PromptAdapter, TaskBank

        spec = PRESETS[preset]["bank"]
        self.T, self.R, self.S, self.G, self.P = spec["tasks"], spec["rows"], spec["S"], spec["new_tokens"], spec["P"]
        base = llama(preset, dev, dtype)
        hf = copy.deepcopy(base)  # the bank's own copy (attaching switches its attention implementation)
        self.names = names = [f"task{i}" for i in range(self.T)]
        torch.manual_seed(SEED + 1)
        cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=self.P)
        self.pm = peft.get_peft_model(base, peft.PrefixTuningConfig(**cfg), adapter_name=names[0])
        for name in names[1:]:
            self.pm.add_adapter(name, peft.PrefixTuningConfig(**cfg))
        adapters = {}
        for name in names:
            adapters[name] = PromptAdapter.prefix_tuning(hf, self.P)
            adapters[name].encoder.load_state_dict(self.pm.prompt_encoder[name].state_dict(), strict=True)
        self.pm.eval()
        self.bank = TaskBank(hf, adapters).eval()
        self.B = B = self.T * self.R
        self.ids, self.mask = make_batch(B, self.S, base.config.vocab_size, dev)
        self.tasks = [names[i % self.T] for i in range(B)]
        self.rows_of = {t: torch.tensor([i for i in range(B) if self.tasks[i] == t], device=dev) for t in names}
        self.gen_kw = dict(max_new_tokens=self.G, min_new_tokens=self.G, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def peft_forward(self):
        outs = {}
        for t in self.names:
            self.pm.set_adapter(t)
            r = self.rows_of[t]
            outs[t] = self.pm(input_ids=self.ids[r], attention_mask=self.mask[r]).logits
        return outs

    @torch.no_grad()
    def bank_forward(self):
        return self.bank(input_ids=self.ids, attention_mask=self.mask, tasks=self.tasks).logits

    @torch.no_grad()
    def peft_generate(self):
        outs = {}
        for t in self.names:
            self.pm.set_adapter(t)
            r = self.rows_of[t]
            outs[t] = self.pm.generate(input_ids=self.ids[r], attention_mask=self.mask[r], **self.gen_kw)
        return outs

    def bank_generate(self):
        return self.bank.generate(input_ids=self.ids, attention_mask=self.mask, tasks=self.tasks, **self.gen_kw)

    @torch.no_grad()
    def peft_one_batch(self, call):
        """Reference, not a mixed-task answer: all B rows as one batch under one adapter (the
        most batching alone can buy)."""
        self.pm.set_adapter(self.names[0])
        if call == "forward":
            return self.pm(input_ids=self.ids, attention_mask=self.mask).logits
        return self.pm.generate(input_ids=self.ids, attention_mask=self.mask, **self.gen_kw)

    def parity(self, ref=None, gref=None):
        """Untimed: the bank's logits and greedy tokens vs PEFT's, task by task."""
        ref = self.peft_forward() if ref is None else ref
        gref = self.peft_generate() if gref is None else gref
        got, ggot, S = self.bank_forward(), self.bank_generate(), self.S
        return {"max_abs_logit_diff": max(_max_abs(got[self.rows_of[t]] - ref[t]) for t in self.names),
                "max_abs_logit": max(_max_abs(r) for r in ref.values()), "generated_tokens": self.B * self.G,
                "tasks_generating_identical_tokens": sum(int(torch.equal(ggot[self.rows_of[t]], gref[t]))
                                                         for t in self.names),
                "generated_tokens_equal": sum(int((ggot[self.rows_of[t]][:, S:] == gref[t][:, S:]).sum())
                                              for t in self.names)}


def measure_bank(preset, dev, dtype, warmup, repeat, diag):
    c = BankCase(preset, dev, dtype)
    ref, gref = c.peft_forward(), c.peft_generate()
    agree = c.parity(ref, gref)
    if diag:
        with sdpa_attention():
            agree["sdpa_diagnostic"] = c.parity(ref, gref)
    rows = []
    for kind, fp, ff, tokens in (("forward", c.peft_forward, c.bank_forward, c.B * c.S),
                                 ("generate", c.peft_generate, c.bank_generate, c.B * c.G)):
        fns = {PEFT: fp, FAST: ff, ONE_BATCH: functools.partial(c.peft_one_batch, kind)}
        if diag:
            fns[DIAG] = with_sdpa(ff)
        row = {"case": "bank", "call": kind, "method": "prefix", "tasks": c.T, "rows_per_task": c.R, "B": c.B,
               "S": c.S, "P": c.P, "new_tokens": c.G if kind == "generate" else 0, **agree}
        row.update(compare(fns, dev, warmup, repeat, tokens))
        rows.append(row)
        _log_row(f"bank {kind} {c.T}x{c.R} S={c.S}", row)
    return rows


# ------------------------------------------------------------------------------ environment


def git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "ptune_fast"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out.stdout.strip() + ("+dirty(ptune_fast/)" if dirty else "") if out.returncode == 0 else None


def env_info(dev):
    import peft
    import transformers

    import ptune_fast

    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": dev.type,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "ptune_fast": ptune_fast.__version__,
            "git_commit": git_commit(), "backend_env": os.environ.get("PTUNE_FAST_BACKEND", "auto"),
            "platform": platform.platform()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def peft_attn_implementation(preset):
    import transformers

    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**PRESETS[preset]["model"]))
    return m.config._attn_implementation


def _log_row(label, row):
    extra = f"  {DIAG} x{row[DIAG]['speedup_vs_peft']:.2f}" if DIAG in row else ""
    print(f"{label:28s} peft {row[PEFT]['median_ms']:9.2f} ms  ptune_fast {row[FAST]['median_ms']:9.2f} ms  "
          f"x{row['speedup']:.2f}{extra}  logit diff {row['max_abs_logit_diff']:.1e}", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="model + case grid (default: small on cpu, 1b on cuda)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: the preset's")
    ap.add_argument("--only", nargs="+", default=["prefill", "train", "bank"], choices=["prefill", "train", "bank"])
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per implementation (default 3/1/2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per implementation (default 20/6/10)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--sdpa-diagnostic", choices=("auto", "on", "off"), default="auto",
                    help="time ptune_fast with its attention swapped for SDPA too (auto: on for cpu)")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False")
    preset = args.preset or ("1b" if dev.type == "cuda" else "small")
    dtype = getattr(torch, args.dtype or PRESETS[preset]["dtype"])
    diag = args.sdpa_diagnostic == "on" or (args.sdpa_diagnostic == "auto" and dev.type == "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = ("prefill", "train", "bank")
    warm = dict(zip(sections, (3, 1, 2))) if args.warmup is None else dict.fromkeys(sections, args.warmup)
    rep = dict(zip(sections, (20, 6, 10))) if args.repeat is None else dict.fromkeys(sections, args.repeat)

    t0, load0, env = time.perf_counter(), loadavg(), env_info(dev)  # git state as the code is imported
    rows, extra = [], {}
    if "prefill" in args.only:
        r, extra["fold_report"] = measure_prefill(preset, dev, dtype, warm["prefill"], rep["prefill"], diag)
        rows += r
    if "train" in args.only:
        rows += measure_train(preset, dev, dtype, warm["train"], rep["train"], diag)
    if "bank" in args.only:
        rows += measure_bank(preset, dev, dtype, warm["bank"], rep["bank"], diag)
    if git_commit() != env["git_commit"]:
        env["git_commit_at_end"] = git_commit()
    cmd = sys.argv[1:] if argv is None else list(argv)
    report = {
        "env": env, "preset": preset, "dtype": str(dtype).replace("torch.", ""), "sdpa_diagnostic": diag,
        "command": " ".join(["python -m benchmarks.fold_bank_report"] + cmd),
        "model": PRESETS[preset]["model"], "grid": {k: PRESETS[preset][k] for k in sections},
        "peft_attn_implementation": peft_attn_implementation(preset),
        "warmup": warm, "repeat": rep, "loadavg_before": load0, "loadavg_after": loadavg(),
        "wall_s": time.perf_counter() - t0, "rows": rows, **extra,
    }
    from ptune_fast import _backend

    report["backend_calls"] = {f"{op} -> {be}": n for (op, be), n in sorted(_backend.CALLS.items())}
    report["targets"] = targets(rows)
    report["notes"] = notes(report)
    md = render(report)
    print(md)
    if not args.no_write:
        write_report(report, md, args.out_dir, f"{dev.type}-fold-bank-{env['date'][:10]}")
    return report


if __name__ == "__main__":
    main()
