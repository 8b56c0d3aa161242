"""The one results writer of :mod:`benchmarks.run`: JSON first, then Markdown, then (optional)
matplotlib plots; the environment a report records; the README section made from reports.

A report is one dict: ``env`` (device, CPU / GPU, versions, date, git commit, backend), ``command``,
``suites``, ``preset``, ``model``, ``dtype``, ``reps``, ``wall_s``, load averages, ``backend_calls``
and ``rows`` (one per case: the case's fields, ``time`` / ``speedup`` / ``paired_speedup`` /
``verdict`` keyed by implementation, ``parity`` and the extra measurements).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys

from benchmarks.cases import FAST, LABEL, PEFT, label, shape
from benchmarks.measure import BUCKET_LABEL, BUCKETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
KIND_TITLE = {"train": "Training step (forward + backward + AdamW step)", "prefill": "Prefill (no-grad forward)",
              "generate": "Greedy generation", "bank": "Mixed-task batch: TaskBank vs PEFT task after task"}
KIND_NOTE = {
    "train": "PEFT vs the same model deep-copied and `ptune_fast.patch`-ed (prompt / P-tuning: the shared "
             "virtual-token pass); `ptune_fast+gc`: with non-reentrant gradient checkpointing.",
    "prefill": "prompt tuning; ptune_fast = `patch` + `fold` (deep fold: the virtual tokens' K/V computed once); "
               "`base`: the bare model on the real tokens alone, the floor no prompt method can beat.",
    "generate": "PEFT vs patched, same weights; tok/s counts generated tokens.",
    "bank": "PEFT: per task `set_adapter` + that task's rows as one batch; ptune_fast: one `TaskBank` call over "
            "the mixed rows; `peft_one_adapter_one_batch`: all rows under one adapter (not a mixed-task answer: "
            "what batching alone buys).",
}


# ------------------------------------------------------------------------------ environment


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    """``<short sha>`` plus ``+dirty`` when tracked files under ptune_fast/ or benchmarks/ changed; None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "ptune_fast", "benchmarks"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None


def loadavg():
    """1-minute load average (the CPU may be shared), or None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def device_tag(dev):
    if dev.type != "cuda":
        return "cpu"
    import torch

    m = re.search(r"\b(H100|H200|H20|A100|A10G|A10|L40S|L40|L4|V100|T4|B200|GH200)\b",
                  torch.cuda.get_device_name(dev).upper())
    return m.group(1).lower() if m else "cuda"


def env_info(dev):
    import peft
    import torch
    import transformers

    import ptune_fast

    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": dev.type,
            "device_tag": device_tag(dev), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "ptune_fast": ptune_fast.__version__, "git_commit": git_commit(),
            "backend_env": os.environ.get("PTUNE_FAST_BACKEND", "auto"), "platform": platform.platform()}
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    return info


# ------------------------------------------------------------------------------ writing


def write(report, out_dir, stem, plots=True):
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` first, then the plots (when asked
    and matplotlib is importable; a missing matplotlib is recorded and said, never fatal), then the
    JSON and Markdown again with the plots listed. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    report.setdefault("plots", [])
    paths = _dump(report, base)
    if plots:
        try:
            report["plots"] = make_plots(report, out_dir, stem)
        except ImportError as exc:
            report["plots"] = []
            report["plots_skipped"] = f"matplotlib is not importable ({exc}): pip install matplotlib (or '.[bench]')"
            print(f"plots skipped: {report['plots_skipped']}; the JSON and Markdown are written", file=sys.stderr)
            paths = _dump(report, base)
        else:
            report.pop("plots_skipped", None)
            paths = _dump(report, base) + [os.path.join(out_dir, p) for p in report["plots"]]
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths), file=sys.stderr)
    return paths


def _dump(report, base):
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(render(report) + "\n")
    return [base + ".json", base + ".md"]


def load(path):
    """A saved report; ValueError naming the file when it is not one of :mod:`benchmarks.run`'s."""
    with open(path) as f:
        report = json.load(f)
    for k in ("rows", "env", "command", "suites", "models"):
        if k not in report:
            raise ValueError(f"{path}: not a benchmarks.run report (no {k!r}); reports of the scripts before "
                             "benchmarks.run are history, kept as they are")
    return report


def rerender(path, plots=True):
    """Markdown (and plots) again from a saved JSON report; the measurements are not touched."""
    report = load(path)
    write(report, os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0], plots)
    return report


# ------------------------------------------------------------------------------ Markdown


def _ms(s):
    f = "{:.1f}" if s["median_ms"] >= 10 else "{:.2f}"
    return f"{f.format(s['median_ms'])} [{f.format(s['q1_ms'])}-{f.format(s['q3_ms'])}]"


def _mib(x):
    return "-" if x is None else f"{x / 2**20:.2f}"


def _impls(rows, key="time"):
    out = []
    for r in rows:
        out += [k for k in r.get(key, {}) if k not in out]
    return out


def _table(head, lines):
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in lines]


def header(report):
    env = report["env"]
    models = "; ".join(
        f"`{name}`: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads, "
        f"{m['num_key_value_heads']} KV heads (head_dim {m['head_dim']}), intermediate {m['intermediate_size']}, "
        f"vocab {m['vocab_size']}" for name, m in report["models"].items())
    reps = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in report["reps"].items() if isinstance(v, (list, tuple)))
    return [
        f"* device: {env['device']} -- {env.get('gpu') or env['cpu']} ({env['cpu_count']} logical CPUs, torch threads "
        f"{env['torch_threads']}); load average (1 min) before / after: {report['loadavg_before']} / "
        f"{report['loadavg_after']}",
        f"* versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, ptune_fast "
        f"{env['ptune_fast']}, python {env['python']}; git {env['git_commit']}; PTUNE_FAST_BACKEND={env['backend_env']}",
        f"* date: {env['date']}; command: `{report['command']}` -- wall time {report['wall_s']:.0f} s",
        "* ptune_fast backends that served calls: "
        + (", ".join(f"`{k}` x{v}" for k, v in report["backend_calls"].items()) or "none recorded"),
        f"* model: LlamaForCausalLM from its config, random weights, {report['dtype']}, AdamW(lr=1e-3) -- {models}",
        f"* timing: implementations alternate call by call; warm-up / timed calls: {reps}; median [q1-q3] ms. "
        "**speedup = PEFT median / ptune_fast median** (> 1: ptune_fast faster); verdict only where the IQRs "
        "do not overlap.",
    ]


def render(report):
    rows = report["rows"]
    out = [f"# Benchmarks: {', '.join(report['suites'])} -- PEFT vs ptune_fast ({report['env']['device_tag']}, "
           f"preset `{report['preset']}`)", ""] + header(report) + [""]
    for suite, kind in dict.fromkeys((r["suite"], r["kind"]) for r in rows if "time" in r):
        rs = [r for r in rows if r["kind"] == kind and r["suite"] == suite and "time" in r]
        impls = _impls(rs)
        others = [k for k in impls if k != PEFT]
        head = ["case"] + [f"{k} ms" for k in impls] + [f"speedup {k}" for k in others] + [
            "verdict (ptune_fast)", "tokens through model PEFT / ptune_fast", "agreement"]
        lines = []
        for r in rs:
            t, tok = r["time"], r.get("tokens_through_model")
            lines.append([label(r)] + [_ms(t[k]) if k in t else "-" for k in impls]
                         + [f"{r['speedup'][k]:.2f}x" if k in r["speedup"] else "-" for k in others]
                         + [r["verdict"].get(FAST, "-"), f"{tok[PEFT]} / {tok[FAST]}" if tok else "-", _parity(r)])
        out += [f"## {suite}: {KIND_TITLE[kind]}", "", KIND_NOTE[kind], ""] + _table(head, lines) + [""]
    out += _memory(rows) + _encoder_attention(rows) + _gc(rows) + _maxbatch(rows) + _breakdown(rows)
    notes = report.get("notes") or []
    if notes:
        out += ["## Observations (computed from the numbers above)", ""] + [f"* {n}" for n in notes] + [""]
    if report.get("plots"):
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in report["plots"]] + [""]
    elif report.get("plots_skipped"):
        out += [f"Plots skipped: {report['plots_skipped']}.", ""]
    return "\n".join(out)


def _parity(r):
    p = r.get("parity") or {}
    bits = []
    if "max_abs_logit_diff" in p:
        bits.append(f"logit diff {p['max_abs_logit_diff']:.1e}")
    if "abs_loss_diff" in p:
        bits.append(f"loss diff {p['abs_loss_diff']:.1e}")
    if "generated_tokens_equal" in p:
        bits.append(f"{p['generated_tokens_equal']}/{p['generated_tokens']} tokens equal")
    return "; ".join(bits) or "-"


def _memory(rows):
    rs = [r for r in rows if "peak_bytes" in r]
    if not rs:
        return []
    impls = _impls(rs, "peak_bytes")
    head = (["case"] + [f"{k} peak MiB" for k in impls] + [f"{k} saved MiB" for k in impls]
            + [f"{k} prefix bytes" for k in impls])
    lines = [[label(r)] + [_mib(r["peak_bytes"].get(k)) for k in impls]
             + [_mib(r.get("saved_bytes", {}).get(k)) for k in impls]
             + [f"{r['prefix_bytes'][k]:,}" if k in r.get("prefix_bytes", {}) else "-" for k in impls] for r in rs]
    return ["## Memory of one training step", "",
            "peak: tensor memory allocated during one step above what was live before it (weights, optimizer "
            "state, batch excluded; CUDA `max_memory_allocated`, CPU the allocator events of "
            "`torch.profiler(profile_memory=True)`). saved: storages autograd keeps for backward. prefix bytes: "
            "computed from shapes (`X = L*2*Hkv*P*D*elem`: PEFT prefix tuning 2*B*X, PEFT prompt / P-tuning B*X, a "
            "lower bound; ptune_fast X).", ""] + _table(head, lines) + [""]


def _encoder_attention(rows):
    rs = [r for r in rows if "encoder" in r or "attention" in r]
    if not rs:
        return []
    impls = _impls(rs, "attention") or _impls(rs, "encoder")
    head = (["case"] + [f"{k} encoder ms" for k in impls] + ["encoder calls per step (ptune_fast)"]
            + [f"{k} attention share" for k in impls])
    lines = []
    for r in rs:
        enc, att = r.get("encoder", {}), r.get("attention", {})
        lines.append([label(r)] + [_ms(enc[k]) if k in enc else "-" for k in impls]
                     + [str(r.get("encoder_calls_per_step", {}).get(FAST, "-"))]
                     + [f"{100 * att[k]['attention_share']:.0f}%" if att.get(k, {}).get("attention_share") is not None
                        else "-" for k in impls])
    return ["## Encoder and attention", "",
            "encoder: the encoder forward alone, autograd on (PEFT `get_prompt(B)`; ptune_fast: once, batch-"
            "independent). attention share: the attention op (fwd + bwd) / total, in profiled calls.", ""] + \
        _table(head, lines) + [""]


def _gc(rows):
    rs = [r for r in rows if "peft_gc" in r]
    if not rs:
        return []
    lines = []
    for r in rs:
        t, g = r.get("time", {}), r["peft_gc"]
        ratio = (f"{t['ptune_fast+gc']['median_ms'] / t[FAST]['median_ms']:.2f}x" if "ptune_fast+gc" in t and FAST in t
                 else "-")
        pk = r.get("peak_bytes", {})
        lines.append([label(r), ratio, f"{_mib(pk.get(FAST))} -> {_mib(pk.get('ptune_fast+gc'))}",
                      g["get_peft_model_on_checkpointing_base"], g["checkpointing_enabled_after_get_peft_model"]])
    return ["## Prefix tuning with gradient checkpointing", "",
            "ptune_fast with `gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})`; "
            "PEFT tried both ways, what it did is quoted.", ""] + _table(
        ["case", "ptune_fast step time with / without GC", "ptune_fast peak MiB without -> with GC",
         "PEFT: get_peft_model on a checkpointing base", "PEFT: checkpointing enabled afterwards, one step"],
        lines) + [""]


def _maxbatch(rows):
    rs = [r for r in rows if "max_batch" in r]
    if not rs:
        return []
    if any(isinstance(r["max_batch"], str) for r in rs):
        return ["## Largest batch that fits", "", rs[0]["max_batch"], ""]
    impls = _impls(rs, "max_batch")

    def cell(y):
        return f"{y['max_batch']}+" if y["reached_limit"] else f"{y['max_batch']} ({y['first_failing_batch']})"

    lines = [[label(r)] + [cell(r["max_batch"][k]) if k in r["max_batch"] else "-" for k in impls] for r in rs]
    return ["## Largest batch that fits", "", "Doubling from B=1 then bisection to within 1/16 under the memory cap "
            "(weights and optimizer included); in parentheses the smallest B that did not fit; `N+`: the search "
            "limit fit.", ""] + _table(["case"] + [f"{k} max B" for k in impls], lines) + [""]


def _breakdown(rows):
    out = []
    for key, what in (("breakdown", "training step"), ("breakdown", "generate call")):
        rs = [r for r in rows if key in r and (r["kind"] == "train") == (what == "training step")]
        if not rs:
            continue
        b0 = next(iter(rs[0][key].values()))
        lines = [[label(r), k, f"{b['total_ms']:.1f}"] + [f"{100 * b['share'][x]:.0f}% ({b['ms'][x]:.1f})"
                                                          for x in BUCKETS] for r in rs for k, b in r[key].items()]
        out += [f"## Where the time goes: one profiled {what}", "",
                f"Median over {b0['sessions']} profiled calls per side ({b0['clock']}); per bucket share and ms. "
                "The profiler adds per-op overhead: compare shares, not totals with the times above.", ""]
        out += _table(["case", "impl", "profiled ms"] + [BUCKET_LABEL[b] for b in BUCKETS], lines) + [""]
    return out


def notes(report):
    """Plain statements computed from the rows: the attention backend that ran, and per case a verdict
    only where PEFT's and ptune_fast's IQRs do not overlap."""
    out = []
    served = {k.split(" -> ")[1]: v for k, v in report["backend_calls"].items() if k.startswith("prefix_attention -> ")}
    main = max(served, key=served.get) if served else None
    if main in ("sdpa", "reference"):
        out.append(f"ptune_fast's `prefix_attention` ran its `{main}` backend here (the prefix broadcast and "
                   "concatenated onto K/V inside the call): what these numbers show is the structural saving (encoder "
                   "once per step, no per-row prefix copies, the shared virtual-token pass, folding, task batching), "
                   "not the fused Triton/CUDA kernels, which run on CUDA only.")
    elif main:
        out.append(f"ptune_fast's `prefix_attention` ran its `{main}` kernels (the shared prefix read in-kernel).")
    for r in report["rows"]:
        if FAST not in r.get("verdict", {}):
            continue
        v, sp = r["verdict"][FAST], r["speedup"][FAST]
        out.append(f"{label(r)}: speedup {sp:.2f}x -- "
                   + (f"ptune_fast {v}" if v != "within noise" else "within noise (the IQRs overlap): no verdict"))
    return out


# ------------------------------------------------------------------------------ README section


def readme_section(paths):
    """The README's benchmark section, from saved reports: per report, what ran where, and a compact
    table of PEFT vs ptune_fast per case; links relative to the repository root."""
    out = ["Every number below was produced by `python -m benchmarks.run` and is copied from its report; "
           "speedup = PEFT time / ptune_fast time (> 1: ptune_fast faster), median of interleaved calls, and a "
           "verdict only where the IQRs (q1-q3) do not overlap.", ""]
    for path in paths:
        rep = load(path)
        env = rep["env"]
        md = os.path.relpath(os.path.splitext(os.path.abspath(path))[0] + ".md", ROOT)
        out += [f"**{', '.join(rep['suites'])}** on {env.get('gpu') or env['cpu']} ({env['device']}, torch threads "
                f"{env['torch_threads']}), torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
                f"git {env['git_commit']}, {env['date'][:10]}: `{rep['command']}` ({rep['wall_s']:.0f} s, "
                f"[report]({md}))", ""]
        rows = [r for r in rep["rows"] if FAST in r.get("speedup", {})]
        mem = any("peak_bytes" in r for r in rows)
        lines = []
        for r in rows:
            t, pk = r["time"], r.get("peak_bytes")
            lines.append([LABEL[r["method"]] if r["kind"] != "bank" else "TaskBank vs PEFT (prefix)",
                          r["kind"] + (f" {r['call']}" if r["kind"] == "bank" else ""), shape(r),
                          f"{t[PEFT]['median_ms']:.1f}", f"{t[FAST]['median_ms']:.1f}", f"{r['speedup'][FAST]:.2f}x",
                          r["verdict"][FAST]] + ([f"{_mib(pk[PEFT])} / {_mib(pk[FAST])}" if pk else "-"] if mem else []))
        head = ["method", "case", "shape", "PEFT ms", "ptune_fast ms", "speedup", "verdict"]
        out += _table(head + (["peak MiB PEFT / ptune_fast"] if mem else []), lines) + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------ plots


def make_plots(report, out_dir, stem):
    """``<stem>-time.png`` (median ms with IQR bars), ``<stem>-speedup.png``, ``<stem>-peak_memory.png``,
    ``<stem>-breakdown.png`` (where present); returns their file names. ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, files = [r for r in report["rows"] if "time" in r], []
    title = f"{report['env']['device_tag']}, preset {report['preset']}"

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{stem}-{name}.png"), dpi=110)
        plt.close(fig)
        files.append(f"{stem}-{name}.png")

    def bars(ax, rs, key, value, err=None):
        impls = _impls(rs, key)
        w = 0.8 / max(1, len(impls))
        for i, k in enumerate(impls):
            pts = [(j + (i - (len(impls) - 1) / 2) * w, r[key][k]) for j, r in enumerate(rs) if k in r[key]]
            kw = {}
            if err:
                kw = dict(capsize=2, yerr=[[value(v) - err(v)[0] for _, v in pts], [err(v)[1] - value(v) for _, v in pts]])
            ax.bar([x for x, _ in pts], [value(v) for _, v in pts], w, label=k, **kw)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([label(r) for r in rs], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)

    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4.5))
        bars(ax, rows, "time", lambda s: s["median_ms"], lambda s: (s["q1_ms"], s["q3_ms"]))
        ax.set_yscale("log")
        ax.set(ylabel="ms per call (median, IQR bars)", title=f"Time per call, {title}")
        save(fig, "time")
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4.5))
        bars(ax, rows, "speedup", lambda x: x)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(ylabel="PEFT time / impl time (> 1: faster)", title=f"Speedup over PEFT, {title}")
        save(fig, "speedup")
    mem = [r for r in report["rows"] if "peak_bytes" in r]
    if mem:
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(mem)), 4.5))
        bars(ax, mem, "peak_bytes", lambda b: b / 2**20)
        ax.set(ylabel="MiB above the live set", title=f"Peak memory of one training step, {title}")
        save(fig, "peak_memory")
    bd = [(r, k) for r in report["rows"] if r["kind"] == "train" and "breakdown" in r for k in r["breakdown"]]
    if bd:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(bd)), 5))
        bottom = [0.0] * len(bd)
        for b in BUCKETS:
            vals = [r["breakdown"][k]["ms"][b] for r, k in bd]
            ax.bar(range(len(bd)), vals, 0.7, bottom=bottom, label=BUCKET_LABEL[b])
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.set_xticks(range(len(bd)))
        ax.set_xticklabels([f"{label(r)}\n{k}" for r, k in bd], rotation=60, ha="right", fontsize=6)
        ax.set(ylabel="profiled ms per training step", title=f"Where the time goes, {title}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "breakdown")
    return files
